//! The supplier and sharer roles: this node gives up or hands over a copy
//! it holds — data for a `Fetch`, its copy for an `Invalidate`, and the
//! home's own copy when a transaction it decided needs it.
//!
//! Order, for a page this node may have written: write-protect, read, send,
//! then drop (PROTOCOL.md). Write-protect and `MADV_DONTNEED` both fire
//! KVM's MMU notifier, so KVM drops its mapping too.

use crate::coherence::messages::Msg;
use crate::coherence::LocalState;
use crate::uffd::{self, PAGE_SIZE};
use crate::NodeId;

use super::outbox::Outbox;
use super::NodeCore;

impl NodeCore {
    /// Supplies this node's copy of `page` to `to`, in the message `make`
    /// builds around the bytes, and keeps `keep` of it.
    pub(super) fn supply(
        &self,
        page: u64,
        to: NodeId,
        keep: LocalState,
        out: &mut Outbox<'_>,
        make: impl FnOnce(&[u8]) -> Msg<'_>,
    ) -> Result<(), String> {
        let addr = self.space.addr_of(page);
        let (mut sh, i) = self.pages.lock(page);
        let st = sh.state[i];
        if st == LocalState::Invalid {
            return Err(format!(
                "asked to supply page {page}, which this node does not hold"
            ));
        }
        if st == LocalState::Exclusive {
            self.uffd
                .write_protect(addr, PAGE_SIZE as u64, true)
                .map_err(|e| e.to_string())?;
        }
        // SAFETY: the page is present (state Shared/Exclusive, and only this
        // node's DSM drops it, under the lock we hold) and write-protected, so
        // it is mapped and stable for the read.
        let bytes = unsafe { std::slice::from_raw_parts(addr as *const u8, PAGE_SIZE) };
        out.emit(to, &make(bytes));
        crate::stats::Stats::bump(&self.stats.pages_sent);
        if keep == LocalState::Invalid {
            self.discard(addr)?;
        }
        sh.state[i] = keep;
        Ok(())
    }

    /// Drops the local contents of the page at `addr` and tells the
    /// application (translated code over it is stale).
    pub(super) fn discard(&self, addr: u64) -> Result<(), String> {
        // SAFETY: the page belongs to a registered region and its contents
        // were sent on or are no longer valid; dropping it is the protocol's
        // invalidation.
        unsafe { uffd::discard(addr, PAGE_SIZE as u64) }
            .map_err(|e| format!("MADV_DONTNEED at {addr:#x}: {e}"))?;
        self.page_changed(addr, PAGE_SIZE as u64);
        Ok(())
    }

    /// Drops this node's copy of `page`, if it has one.
    pub(super) fn drop_local(&self, page: u64) -> Result<(), String> {
        let (mut sh, i) = self.pages.lock(page);
        if sh.state[i] != LocalState::Invalid {
            self.discard(self.space.addr_of(page))?;
            sh.state[i] = LocalState::Invalid;
        }
        crate::stats::Stats::bump(&self.stats.invalidations_received);
        Ok(())
    }

    /// `Fetch`: send the page to `requester` and keep `keep`.
    pub(super) fn on_fetch(
        &self,
        page: u64,
        requester: NodeId,
        keep: LocalState,
        out: &mut Outbox<'_>,
    ) -> Result<(), String> {
        self.check_node(requester)?;
        if requester == self.me {
            return Err(format!("fetch of page {page} for this very node"));
        }
        self.supply(page, requester, keep, out, |bytes| Msg::Data {
            page,
            bytes,
        })
    }

    /// `Invalidate`: drop the copy, acknowledge to `requester`.
    pub(super) fn on_invalidate(
        &self,
        page: u64,
        requester: NodeId,
        out: &mut Outbox<'_>,
    ) -> Result<(), String> {
        self.check_node(requester)?;
        self.drop_local(page)?;
        if requester == self.me {
            return Err(format!("invalidation of page {page} for this very node"));
        }
        out.emit(requester, &Msg::InvAck { page });
        Ok(())
    }
}
