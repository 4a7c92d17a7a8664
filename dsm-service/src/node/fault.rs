//! Fault intake: the `fv-uffd-K` thread reads userfaultfd events, turns each
//! into a request to the page's home (batched per home) and runs sequential
//! read-ahead ([`Stream`]).

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use tracing::warn;

use crate::coherence::LocalState;
use crate::stats::Stats;
use crate::uffd::{Fault, PAGE_SIZE};

use super::outbox::Outbox;
use super::pages::Pending;
use super::NodeCore;

/// How far (in batches) a sequential stream may run ahead of the last page
/// a thread waited for.
const LOOKAHEAD_BATCHES: u64 = 16;

/// This node's sequential read stream.
///
/// A read fault at the page right after the stream (or inside it) doubles
/// the batch (from 4 up to the maximum) and requests the next batch; any
/// other fault ends the stream. While the stream is on, each batch that
/// lands requests the next one, up to [`LOOKAHEAD_BATCHES`] batches ahead of
/// the last page a thread waited for, so the transfer is pipelined rather
/// than one round trip per batch.
#[derive(Debug, Default)]
pub(super) struct Stream {
    /// First page after the stream's last requested page.
    next: u64,
    /// Pages per batch (0: no stream).
    window: u64,
    /// First page of the last batch requested.
    batch_start: u64,
    /// The last page a thread of this node waited for in the stream.
    last_demand: u64,
}

impl Stream {
    /// A read fault at `page`: the batch `(first, count)` to request, if the
    /// fault continues the stream.
    pub fn on_read_fault(&mut self, page: u64, max: u64) -> Option<(u64, u64)> {
        // Strictly forward: a page faulted again (a write or a spin loop on
        // a moving page) is no stream.
        let sequential =
            self.window > 0 && page > self.last_demand && page <= self.next || page == self.next;
        self.last_demand = page;
        if !sequential {
            self.window = 0;
            self.next = page + 1;
            return None;
        }
        self.window = (self.window * 2).clamp(4, max);
        let start = self.next.max(page + 1);
        self.batch_start = start;
        self.next = start + self.window;
        Some((start, self.window))
    }

    /// A thread waits for `page`, which the stream already requested: the
    /// stream is being consumed, let it run further.
    pub fn on_wait(&mut self, page: u64) {
        if self.window > 0 && page > self.last_demand && page < self.next {
            self.last_demand = page;
        }
    }

    /// A prefetched page landed: when it is the first of the stream's last
    /// batch and the stream is not too far ahead, the next batch.
    pub fn on_landed(&mut self, landed: u64) -> Option<(u64, u64)> {
        if self.window == 0
            || landed != self.batch_start
            || self.next > self.last_demand + LOOKAHEAD_BATCHES * self.window
        {
            return None;
        }
        let start = self.next;
        self.batch_start = start;
        self.next = start + self.window;
        Some((start, self.window))
    }
}

impl NodeCore {
    /// The fault thread: until `stop`, reads fault events and handles them
    /// as one batch each time.
    pub(super) fn fault_loop(&self, stop: &AtomicBool) {
        use std::os::fd::AsRawFd;
        let mut faults = Vec::with_capacity(64);
        let mut out = Outbox::new(self.nodes, self);
        while !stop.load(Ordering::Acquire) {
            let mut pfd = libc::pollfd {
                fd: self.uffd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd for the duration of the call.
            let r = unsafe { libc::poll(&mut pfd, 1, 100) };
            if r <= 0 {
                continue;
            }
            if let Err(e) = self.uffd.read_faults(&mut faults) {
                self.fatal(format!("reading userfaultfd events failed: {e}"));
                return;
            }
            let t0 = Instant::now();
            for f in &faults {
                self.on_fault(*f, t0, &mut out);
            }
            self.flush(&mut out);
        }
    }

    /// One fault event: nothing (already resolved), joins the request in
    /// flight, or a new request (and read-ahead).
    pub(super) fn on_fault(&self, f: Fault, t0: Instant, out: &mut Outbox<'_>) {
        let Some(page) = self.space.page_of(f.addr) else {
            warn!(
                node = self.me,
                addr = f.addr,
                "fault outside the DSM regions"
            );
            return;
        };
        let write = f.write || f.wp;
        {
            let (mut sh, i) = self.pages.lock(page);
            let st = sh.state[i];
            let satisfied = st == LocalState::Exclusive || (st == LocalState::Shared && !write);
            if satisfied {
                drop(sh);
                // A duplicate event (the thread was interrupted and faulted
                // again after we had resolved it).
                let _ = self.uffd.wake(f.addr, PAGE_SIZE as u64);
                return;
            }
            if let Some(p) = sh.pending.get_mut(&page) {
                p.want_write |= write;
                drop(sh);
                if !write {
                    self.stream.lock().expect("lock").on_wait(page);
                }
                return;
            }
            sh.pending.insert(page, Pending::new(false, t0));
            if let Some(c) = &self.page_faults {
                c.count(page);
            }
            if st == LocalState::Shared {
                Stats::bump(&self.stats.upgrades);
            } else if write {
                Stats::bump(&self.stats.write_faults);
            } else {
                Stats::bump(&self.stats.read_faults);
            }
        }
        self.request(page, write, false, out);
        if self.zero_run > 1 && self.homes.home(page) == self.me {
            if let Err(e) = self.zero_run_around(page, out) {
                self.fatal(format!("zero run around page {page} failed: {e}"));
            }
        }
        if !write && self.prefetch_max > 0 {
            let batch = self
                .stream
                .lock()
                .expect("lock")
                .on_read_fault(page, self.prefetch_max);
            if let Some((start, window)) = batch {
                self.request_batch(page, start, window, out);
            }
        }
    }

    /// The zero run: a fault on a page homed here also takes the pages
    /// around it, in its aligned block of the zero run's length, that are
    /// homed here, unowned, and neither held nor awaited by this node — as
    /// if this home had write-faulted each — with one `UFFDIO_COPY` of zeros
    /// for the run after the page and one for the run before it. A guest
    /// touches the fresh memory of its own NUMA node in runs (up or down:
    /// the page allocator hands out high pages first); each page would
    /// otherwise cost one fault event.
    fn zero_run_around(&self, page: u64, out: &mut Outbox<'_>) -> Result<(), String> {
        let block = page - page % self.zero_run;
        let end = (block + self.zero_run).min(self.space.pages());
        let free = |q: u64| {
            if !self.space.same_region(page, q) || self.homes.home(q) != self.me {
                return false;
            }
            let (sh, i) = self.pages.lock(q);
            sh.state[i] == LocalState::Invalid && !sh.pending.contains_key(&q)
        };
        let after = self.dir.claim_zero_run(page + 1..end, free);
        self.install_zeros(page + 1, after, out)?;
        let before = self.dir.claim_zero_run((block..page).rev(), free);
        self.install_zeros(page - before, before, out)
    }

    /// Installs the `count` pages from `first` that [`Self::zero_run_around`]
    /// claimed, Exclusive and zero, and ends their transactions.
    fn install_zeros(&self, first: u64, count: u64, out: &mut Outbox<'_>) -> Result<(), String> {
        static ZEROS: [u8; super::MAX_ZERO_RUN as usize * PAGE_SIZE] =
            [0; super::MAX_ZERO_RUN as usize * PAGE_SIZE];
        if count == 0 {
            return Ok(());
        }
        let addr = self.space.addr_of(first);
        let len = count as usize * PAGE_SIZE;
        // SAFETY: the run lies in one registered region (each claimed page
        // is checked to be in the faulting page's region) and none of it is
        // present: each page is Invalid here and claimed busy, so nothing
        // installs it meanwhile.
        match unsafe { self.uffd.copy(addr, &ZEROS[..len], false) } {
            Ok(crate::uffd::CopyOutcome::Copied) => {}
            Ok(crate::uffd::CopyOutcome::AlreadyPresent) => {
                return Err(format!("pages {first}.. were present while Invalid"));
            }
            Err(e) => return Err(e.to_string()),
        }
        self.page_changed(addr, len as u64);
        for q in first..first + count {
            self.pages.set_state(q, LocalState::Exclusive);
            Stats::bump(&self.stats.prefetched);
            // A request queued behind the claim (a remote node touched the
            // page meanwhile) starts now.
            if let Some(t) = self.dir.done(q, self.me).map_err(|e| e.to_string())? {
                self.carry_out(t, out)?;
            }
        }
        Ok(())
    }

    /// A prefetched page landed: the stream may ask for its next batch.
    pub(super) fn continue_stream(&self, landed: u64, out: &mut Outbox<'_>) {
        let batch = self.stream.lock().expect("lock").on_landed(landed);
        if let Some((start, window)) = batch {
            self.request_batch(landed, start, window, out);
        }
    }

    /// Prefetch requests for the pages of `start..start + window` in
    /// `anchor`'s region that this node neither holds nor awaits.
    fn request_batch(&self, anchor: u64, start: u64, window: u64, out: &mut Outbox<'_>) {
        let t0 = Instant::now();
        for q in start..start + window {
            if !self.space.same_region(anchor, q) {
                break;
            }
            {
                let (mut sh, i) = self.pages.lock(q);
                if sh.state[i] != LocalState::Invalid || sh.pending.contains_key(&q) {
                    continue;
                }
                sh.pending.insert(q, Pending::new(true, t0));
            }
            Stats::bump(&self.stats.prefetched);
            self.request(q, false, true, out);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sequential_stream_doubles_its_batch_up_to_the_maximum() {
        let mut s = Stream::default();
        assert_eq!(s.on_read_fault(100, 16), None, "a first fault is no stream");
        assert_eq!(s.on_read_fault(101, 16), Some((102, 4)));
        assert_eq!(
            s.on_read_fault(103, 16),
            Some((106, 8)),
            "inside the stream"
        );
        assert_eq!(s.on_read_fault(106, 16), Some((114, 16)));
        assert_eq!(s.on_read_fault(114, 16), Some((130, 16)), "capped");
    }

    #[test]
    fn any_other_fault_ends_the_stream() {
        let mut s = Stream::default();
        s.on_read_fault(10, 64);
        assert!(s.on_read_fault(11, 64).is_some());
        assert_eq!(s.on_read_fault(11, 64), None, "the same page again");
        assert_eq!(s.on_landed(12), None, "nothing continues an ended stream");
        assert_eq!(s.on_read_fault(500, 64), None);
        assert_eq!(s.on_read_fault(501, 64), Some((502, 4)), "a new stream");
    }

    #[test]
    fn a_landed_batch_requests_the_next_while_it_is_consumed() {
        let mut s = Stream::default();
        s.on_read_fault(10, 4);
        assert_eq!(s.on_read_fault(11, 4), Some((12, 4)));
        assert_eq!(s.on_landed(13), None, "only the batch's first page counts");
        let mut next = 12;
        let mut batches = 0;
        while let Some((start, n)) = s.on_landed(next) {
            assert_eq!((start, n), (next + 4, 4));
            next = start;
            batches += 1;
        }
        // It stops once its end is past the reader (page 11) plus
        // LOOKAHEAD_BATCHES batches of 4 pages: 11 + 64 = 75.
        assert_eq!(s.next, 76);
        assert_eq!(batches, 15);
        s.on_wait(next - 2);
        assert!(
            s.on_landed(next).is_some(),
            "a waiting reader lets it run on"
        );
    }
}
