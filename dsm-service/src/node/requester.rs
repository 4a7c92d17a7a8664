//! The requester role: this node asks a page's home for it, gathers the
//! grant and every acknowledgement, installs the page, wakes the faulting
//! threads and tells the home it is done. Runs of direct grants are
//! installed with one `UFFDIO_COPY`.

use std::time::Instant;

use crate::coherence::messages::{GrantData, Msg};
use crate::coherence::LocalState;
use crate::stats::Stats;
use crate::uffd::{self, PAGE_SIZE};
use crate::NodeId;

use super::outbox::Outbox;
use super::pages::{GrantKind, LocalShard, Pending};
use super::NodeCore;

static ZERO_PAGE: [u8; PAGE_SIZE] = [0; PAGE_SIZE];

impl NodeCore {
    /// Sends a request for `page` to its home (to this node's own queue
    /// when it is the home).
    pub(super) fn request(&self, page: u64, write: bool, prefetch: bool, out: &mut Outbox<'_>) {
        let msg = Msg::Request {
            page,
            write,
            prefetch,
        };
        out.route(self.me, self.homes.home(page), msg);
    }

    /// A grant for a page this node requested.
    pub(super) fn on_grant(
        &self,
        page: u64,
        mode: LocalState,
        data: GrantData<'_>,
        acks: u16,
        out: &mut Outbox<'_>,
    ) -> Result<(), String> {
        let (mut sh, i) = self.pages.lock(page);
        let p = sh.pending_mut(page, "grant")?;
        if p.grant.is_some() {
            return Err(format!("second grant for page {page}"));
        }
        let kind = GrantKind::from(data);
        p.grant = Some((mode, kind));
        p.acks_needed = acks;
        let inline = match data {
            GrantData::Inline(b) => Some(b),
            _ => None,
        };
        if !p.complete_or_keep(inline) {
            return Ok(());
        }
        if kind == GrantKind::Data && inline.is_none() && p.data.is_none() {
            return Err(format!(
                "grant for page {page} promises data that never came"
            ));
        }
        self.complete(&mut sh, page, i, inline, out)
    }

    /// A `Data` (with `bytes`) or `InvAck` for a page this node requested.
    pub(super) fn on_ack(
        &self,
        page: u64,
        bytes: Option<&[u8]>,
        out: &mut Outbox<'_>,
    ) -> Result<(), String> {
        let (mut sh, i) = self.pages.lock(page);
        let p = sh.pending_mut(page, "data/ack")?;
        p.acks_got += 1;
        if !p.complete_or_keep(bytes) {
            return Ok(());
        }
        self.complete(&mut sh, page, i, bytes, out)
    }

    /// Every message of the transaction is in: install the page, wake the
    /// faulting threads, tell the home.
    fn complete(
        &self,
        sh: &mut LocalShard,
        page: u64,
        i: usize,
        bytes: Option<&[u8]>,
        out: &mut Outbox<'_>,
    ) -> Result<(), String> {
        let p = sh.pending.remove(&page).expect("checked by the caller");
        let (mode, kind) = p.grant.expect("checked by the caller");
        let addr = self.space.addr_of(page);
        let st = sh.state[i];
        let data: Option<&[u8]> = match kind {
            GrantKind::Zero => Some(&ZERO_PAGE),
            GrantKind::Data => {
                Stats::bump(&self.stats.pages_received);
                Some(bytes.or(p.data.as_deref()).ok_or("data missing")?)
            }
            GrantKind::None => None,
        };
        match data {
            Some(d) => {
                if st != LocalState::Invalid {
                    return Err(format!("page {page} granted with data while held {st:?}"));
                }
                // SAFETY: `addr` is a page of a region registered with this uffd.
                unsafe { self.uffd.copy(addr, d, mode == LocalState::Shared) }
                    .map_err(|e| e.to_string())?;
                self.page_changed(addr, PAGE_SIZE as u64);
            }
            None if mode == LocalState::Exclusive && st == LocalState::Shared => {
                self.uffd
                    .write_protect(addr, PAGE_SIZE as u64, false)
                    .map_err(|e| e.to_string())?;
            }
            None if st == LocalState::Invalid => {
                return Err(format!(
                    "page {page} granted without data but this node holds none"
                ));
            }
            None => self
                .uffd
                .wake(addr, PAGE_SIZE as u64)
                .map_err(|e| e.to_string())?,
        }
        sh.state[i] = mode;
        self.landed(&p, page, out);
        let home = self.homes.home(page);
        if home == self.me {
            Stats::bump(&self.stats.local_faults);
            out.local.push_back(Msg::Done { page });
        } else if p.acks_needed > 0 {
            out.emit(home, &Msg::Done { page });
        }
        // else: a direct grant; the home already considers it done.
        self.upgrade_if_wanted(sh, page, mode, p.want_write, out);
        Ok(())
    }

    /// A requested page is installed: a prefetch feeds the read stream, a
    /// demand fault records its latency.
    fn landed(&self, p: &Pending, page: u64, out: &mut Outbox<'_>) {
        if p.prefetch {
            out.landed.push(page);
        } else {
            self.stats
                .fault_latency
                .record(p.t0.elapsed().as_nanos() as u64);
        }
    }

    /// After installing `page` in `mode`: a write fault that arrived while
    /// the request was outstanding still waits if the page is only Shared;
    /// ask for it (after the `Done`, which is already in the outbox).
    fn upgrade_if_wanted(
        &self,
        sh: &mut LocalShard,
        page: u64,
        mode: LocalState,
        want_write: bool,
        out: &mut Outbox<'_>,
    ) {
        if want_write && mode == LocalState::Shared {
            sh.pending.insert(page, Pending::new(false, Instant::now()));
            Stats::bump(&self.stats.upgrades);
            self.request(page, true, false, out);
        }
    }

    /// A `GrantRun` from `from`: installed at once, or page by page when
    /// some page is not in the expected state.
    pub(super) fn on_grant_run(
        &self,
        from: NodeId,
        first: u64,
        mode: LocalState,
        bytes: &[u8],
        out: &mut Outbox<'_>,
    ) -> Result<(), String> {
        let count = (bytes.len() / PAGE_SIZE) as u64;
        if first + count > self.space.pages()
            || (first..first + count).any(|p| self.homes.home(p) != from)
        {
            return Err(format!(
                "grant run at page {first} from node {from}, which is not its home"
            ));
        }
        if self.install_run(first, mode, bytes, out)? {
            return Ok(());
        }
        for (k, page_bytes) in bytes.chunks_exact(PAGE_SIZE).enumerate() {
            let page = first + k as u64;
            self.on_grant(page, mode, GrantData::Inline(page_bytes), 0, out)?;
        }
        Ok(())
    }

    /// Installs a run of direct grants (`data` holds consecutive pages from
    /// `first`) with one `UFFDIO_COPY`. Returns false (having changed
    /// nothing) when some page is not in the expected state; the caller then
    /// handles the grants one by one.
    pub(super) fn install_run(
        &self,
        first: u64,
        mode: LocalState,
        data: &[u8],
        out: &mut Outbox<'_>,
    ) -> Result<bool, String> {
        let count = (data.len() / PAGE_SIZE) as u64;
        if first + count > self.space.pages() || !self.space.same_region(first, first + count - 1) {
            return Err(format!(
                "grant run of {count} pages at {first} crosses a region"
            ));
        }
        // Phase 1: every page awaits exactly this grant. Nothing else can
        // change them meanwhile: later messages about them come from their
        // home over this same link, and are handled after this frame.
        for page in first..first + count {
            let (sh, i) = self.pages.lock(page);
            let ok = sh.state[i] == LocalState::Invalid
                && sh
                    .pending
                    .get(&page)
                    .is_some_and(|p| p.grant.is_none() && p.acks_got == 0);
            if !ok {
                return Ok(false);
            }
        }
        // Phase 2: one copy for the whole run.
        let addr = self.space.addr_of(first);
        // SAFETY: the run lies in one registered region (checked above).
        match unsafe { self.uffd.copy(addr, data, mode == LocalState::Shared) } {
            Ok(uffd::CopyOutcome::Copied) => {}
            Ok(uffd::CopyOutcome::AlreadyPresent) => {
                return Err(format!("pages {first}.. granted while already present"));
            }
            Err(e) => return Err(e.to_string()),
        }
        self.page_changed(addr, data.len() as u64);
        // Phase 3: record.
        for page in first..first + count {
            let (mut sh, i) = self.pages.lock(page);
            sh.state[i] = mode;
            let p = sh.pending.remove(&page).expect("checked in phase 1");
            self.landed(&p, page, out);
            // A write fault between the copy and here found the page still
            // pending; it waits for us.
            self.upgrade_if_wanted(&mut sh, page, mode, p.want_write, out);
        }
        Stats::add(&self.stats.pages_received, count);
        Ok(true)
    }
}
