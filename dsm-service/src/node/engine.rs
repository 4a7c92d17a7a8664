//! Frame dispatch: what arrives from the transport goes to the role that
//! handles it, the home's decisions are carried out, and each batch's
//! outbox is flushed.
//!
//! A coherence frame is a batch of messages. Two shapes get a fast path:
//! a run of direct grants for consecutive pages (installed with one copy)
//! and a run of read requests for consecutive pages the home holds (served
//! with one write-protect and one `GrantRun`).

use tracing::{debug, warn};

use crate::coherence::messages::{decode_all, GrantData, Msg};
use crate::coherence::{Access, DataSource, LocalState};
use crate::stats::Stats;
use crate::transport::{channel, FrameSink, PeerDown, TransportError};
use crate::uffd::PAGE_SIZE;
use crate::{DsmEvent, NodeId};

use super::directory::Transaction;
use super::outbox::{FrameLink, Outbox};
use super::NodeCore;

/// Longest run of messages one fast path takes at once.
const MAX_RUN: usize = 256;

impl FrameSink for NodeCore {
    fn on_frame(&self, from: NodeId, ch: u8, payload: &[u8]) {
        match ch {
            channel::COHERENCE => {
                Stats::add(&self.stats.bytes_received, payload.len() as u64);
                let mut out = Outbox::new(self.nodes, self);
                if let Err(what) = self.on_coherence_frame(from, payload, &mut out) {
                    warn!(
                        node = self.me,
                        peer = from,
                        "protocol error from node {from}: {what}"
                    );
                    self.event(DsmEvent::ProtocolError { node: from, what });
                }
                self.flush(&mut out);
            }
            channel::DSM_CONTROL => {
                if let Err(what) = self.on_control(from, payload) {
                    warn!(node = self.me, peer = from, %what, "control protocol error");
                    self.event(DsmEvent::ProtocolError { node: from, what });
                }
            }
            _ => {
                let h = self.app.read().expect("lock").clone();
                match h {
                    Some(h) => h(from, ch, payload),
                    None => debug!(
                        node = self.me,
                        peer = from,
                        ch,
                        "frame on a channel nobody listens to"
                    ),
                }
            }
        }
    }

    fn on_peer_down(&self, peer: NodeId, why: PeerDown) {
        self.peer_down(peer, why);
    }
}

impl FrameLink for NodeCore {
    fn send_coherence(&self, to: NodeId, frame: &[u8]) -> Result<(), TransportError> {
        Stats::add(&self.stats.bytes_sent, frame.len() as u64);
        self.transport().send(to, channel::COHERENCE, frame)
    }
}

impl NodeCore {
    /// Handles the local messages, sends every buffered frame, then ends the
    /// direct-grant transactions those frames carried (which may start queued
    /// ones, so it repeats until nothing is left). A send that failed
    /// declares its peer down.
    pub(super) fn flush(&self, out: &mut Outbox<'_>) {
        loop {
            self.run_local(out);
            out.flush_all();
            for (to, e) in out.take_failures() {
                // Nothing waits silently: the peer-down event names the node.
                debug!(node = self.me, peer = to, error = %e, "send failed");
                self.peer_down(to, PeerDown::Disconnected(e.to_string()));
            }
            for q in std::mem::take(&mut out.landed) {
                self.continue_stream(q, out);
            }
            if out.is_idle() {
                break;
            }
            for (r, page) in std::mem::take(&mut out.direct) {
                if let Err(e) = self.on_done(r, page, out) {
                    self.fatal(format!("ending a direct grant failed: {e}"));
                }
            }
        }
    }

    fn run_local(&self, out: &mut Outbox<'_>) {
        while let Some(m) = out.local.pop_front() {
            if let Err(e) = self.handle(self.me, m, out) {
                self.fatal(format!("local message failed: {e}"));
            }
        }
    }

    /// Handles one coherence frame; a malformed frame is refused whole.
    pub(super) fn on_coherence_frame(
        &self,
        from: NodeId,
        payload: &[u8],
        out: &mut Outbox<'_>,
    ) -> Result<(), String> {
        let msgs = decode_all(payload).map_err(|e| e.to_string())?;
        let mut i = 0;
        while i < msgs.len() {
            let run = self.direct_grant_run(from, &msgs[i..]);
            if run >= 2 {
                let Msg::Grant { page, mode, .. } = msgs[i] else {
                    unreachable!("a run starts with a grant")
                };
                let mut data = Vec::with_capacity(run * PAGE_SIZE);
                for m in &msgs[i..i + run] {
                    if let Msg::Grant {
                        data: GrantData::Inline(b),
                        ..
                    } = *m
                    {
                        data.extend_from_slice(b);
                    }
                }
                if self.install_run(page, mode, &data, out)? {
                    i += run;
                    continue;
                }
            }
            let reads = self.read_request_run(from, &msgs[i..]);
            if reads >= 2 {
                let Msg::Request { page, .. } = msgs[i] else {
                    unreachable!("a run starts with a request")
                };
                let served = self.serve_read_run(from, page, reads, out)?;
                if served > 0 {
                    i += served as usize;
                    self.flush(out);
                    continue;
                }
            }
            let urgent = matches!(
                msgs[i],
                Msg::Request {
                    prefetch: false,
                    ..
                }
            );
            self.handle(from, msgs[i], out)?;
            if urgent {
                // Answer a demand fault before the prefetches that follow it.
                self.flush(out);
            }
            i += 1;
        }
        Ok(())
    }

    /// One message from `from` (this node itself for local ones).
    pub(super) fn handle(
        &self,
        from: NodeId,
        m: Msg<'_>,
        out: &mut Outbox<'_>,
    ) -> Result<(), String> {
        let page = m.page();
        if page >= self.space.pages() {
            return Err(format!(
                "page {page} is outside the {} registered pages",
                self.space.pages()
            ));
        }
        match m {
            Msg::Request { write, .. } => self.on_request(from, page, write, out),
            Msg::Done { .. } => self.on_done(from, page, out),
            Msg::Fetch {
                requester, keep, ..
            } => self.on_fetch(page, requester, keep, out),
            Msg::Invalidate { requester, .. } => self.on_invalidate(page, requester, out),
            Msg::Grant {
                mode, data, acks, ..
            } => {
                if self.homes.home(page) != from {
                    return Err(format!(
                        "grant for page {page} from node {from}, which is not its home"
                    ));
                }
                self.on_grant(page, mode, data, acks, out)
            }
            Msg::Data { bytes, .. } => self.on_ack(page, Some(bytes), out),
            Msg::GrantRun { mode, bytes, .. } => self.on_grant_run(from, page, mode, bytes, out),
            Msg::InvAck { .. } => self.on_ack(page, None, out),
        }
    }

    /// The home takes a request: the directory starts or queues it.
    fn on_request(
        &self,
        r: NodeId,
        page: u64,
        write: bool,
        out: &mut Outbox<'_>,
    ) -> Result<(), String> {
        if self.homes.home(page) != self.me {
            return Err(format!(
                "request for page {page}, whose home is node {}",
                self.homes.home(page)
            ));
        }
        let access = if write { Access::Write } else { Access::Read };
        match self.dir.request(page, r, access) {
            Ok(Some(t)) => self.carry_out(t, out),
            Ok(None) => Ok(()),
            Err(e) => Err(e.to_string()),
        }
    }

    /// The home ends a transaction; the next queued one starts.
    fn on_done(&self, from: NodeId, page: u64, out: &mut Outbox<'_>) -> Result<(), String> {
        if self.homes.home(page) != self.me {
            return Err(format!(
                "done for page {page} from node {from}, which has no transaction on it"
            ));
        }
        match self.dir.done(page, from) {
            Ok(Some(t)) => self.carry_out(t, out),
            Ok(None) => Ok(()),
            Err(e) => Err(e.to_string()),
        }
    }

    /// Carries out a transaction the directory started: invalidations, the
    /// data (from this home inline, or a `Fetch` to the supplier) and the
    /// grant.
    pub(super) fn carry_out(&self, t: Transaction, out: &mut Outbox<'_>) -> Result<(), String> {
        let Transaction {
            page,
            requester: r,
            plan,
        } = t;
        Stats::bump(&self.stats.served);
        let mut acks: u16 = 0;
        let mut invalidate = plan.invalidate;
        while invalidate != 0 {
            let y = invalidate.trailing_zeros() as NodeId;
            invalidate &= invalidate - 1;
            if y == self.me {
                self.drop_local(page)?;
            } else {
                out.emit(y, &Msg::Invalidate { page, requester: r });
                Stats::bump(&self.stats.invalidations_sent);
                acks += 1;
            }
        }
        let data: GrantData<'static> = match plan.data {
            DataSource::None => GrantData::None,
            DataSource::Zero => GrantData::Zero,
            DataSource::Node(x) if x == self.me => {
                // The home supplies the page itself, inline in the grant.
                self.supply(page, r, plan.supplier_keeps, out, |bytes| Msg::Grant {
                    page,
                    mode: plan.mode,
                    data: GrantData::Inline(bytes),
                    acks,
                })?;
                note_direct(out, r, page, acks);
                return Ok(());
            }
            DataSource::Node(x) => {
                out.emit(
                    x,
                    &Msg::Fetch {
                        page,
                        requester: r,
                        keep: plan.supplier_keeps,
                    },
                );
                acks += 1;
                GrantData::FromSupplier
            }
        };
        let grant = Msg::Grant {
            page,
            mode: plan.mode,
            data,
            acks,
        };
        out.route(self.me, r, grant);
        if r != self.me {
            note_direct(out, r, page, acks);
        }
        Ok(())
    }

    /// Serves a run of read requests from `r` for consecutive pages that
    /// this home holds Exclusive and nobody else has — the shape of a
    /// sequential prefetch — with one write-protect for the whole run instead
    /// of one per page (each costs a TLB shootdown). Returns how many pages
    /// from `first` it served (0: none qualified; handle them one by one).
    fn serve_read_run(
        &self,
        r: NodeId,
        first: u64,
        n: u64,
        out: &mut Outbox<'_>,
    ) -> Result<u64, String> {
        let claimed = self.dir.claim_read_run(r, first, n, |page| {
            self.pages.state(page) == LocalState::Exclusive
        });
        if claimed == 0 {
            return Ok(0);
        }
        let addr = self.space.addr_of(first);
        self.uffd
            .write_protect(addr, claimed * PAGE_SIZE as u64, true)
            .map_err(|e| e.to_string())?;
        for page in first..first + claimed {
            self.pages.set_state(page, LocalState::Shared);
            note_direct(out, r, page, 0);
        }
        // SAFETY: the run's pages are present (held, claimed busy so no
        // transaction can drop them), consecutive in one region, and
        // write-protected just above.
        let bytes =
            unsafe { std::slice::from_raw_parts(addr as *const u8, claimed as usize * PAGE_SIZE) };
        let run = Msg::GrantRun {
            page: first,
            mode: LocalState::Shared,
            bytes,
        };
        out.emit(r, &run);
        Stats::add(&self.stats.served, claimed);
        Stats::add(&self.stats.pages_sent, claimed);
        Ok(claimed)
    }

    /// How many messages at the head of `msgs` are read requests from a
    /// remote node for consecutive pages of one region homed here.
    fn read_request_run(&self, from: NodeId, msgs: &[Msg<'_>]) -> u64 {
        let Some(&Msg::Request {
            page: first,
            write: false,
            ..
        }) = msgs.first()
        else {
            return 0;
        };
        if from == self.me {
            return 0;
        }
        msgs.iter()
            .take(MAX_RUN)
            .enumerate()
            .take_while(|&(k, m)| {
                matches!(*m, Msg::Request { page, write: false, .. }
                    if page == first + k as u64 && page < self.space.pages()
                        && self.space.same_region(first, page) && self.homes.home(page) == self.me)
            })
            .count() as u64
    }

    /// How many messages at the head of `msgs` are direct grants with data
    /// for consecutive pages of one region, in one mode.
    fn direct_grant_run(&self, from: NodeId, msgs: &[Msg<'_>]) -> usize {
        let Some(&Msg::Grant {
            page: first,
            mode,
            data: GrantData::Inline(_),
            acks: 0,
        }) = msgs.first()
        else {
            return 0;
        };
        if self.homes.home(first) != from {
            return 0;
        }
        msgs.iter()
            .take(MAX_RUN)
            .enumerate()
            .take_while(|&(k, m)| {
                matches!(*m, Msg::Grant { page, mode: m2, data: GrantData::Inline(_), acks: 0 }
                    if page == first + k as u64 && m2 == mode
                        && self.space.same_region(first, page) && self.homes.home(page) == from)
            })
            .count()
    }
}

/// A grant to remote `r` with `acks == 0` is *direct*: the requester sends
/// no `Done`. The page stays busy until the grant is on the wire (see
/// [`NodeCore::flush`]), so that whatever a later transaction sends `r`
/// about this page — from any thread of this node — follows it on the link.
fn note_direct(out: &mut Outbox<'_>, r: NodeId, page: u64, acks: u16) {
    if acks == 0 {
        out.direct.push((r, page));
    }
}
