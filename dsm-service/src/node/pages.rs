//! This node's own view of its pages: the state of each page
//! ([`LocalState`], exactly what the page table shows), the requests it has
//! outstanding ([`Pending`]) and, when asked for, how often each page
//! faulted ([`FaultCounts`]).
//!
//! The state is sharded by page number ([`shard`]) so that faults on
//! different pages never contend for one lock.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::Instant;

use crate::coherence::messages::GrantData;
use crate::coherence::LocalState;

/// Lock shards of the per-page tables (local state and home directory).
pub(super) const SHARDS: usize = 256;

/// `(shard, index in the shard)` of a page.
pub(super) fn shard(page: u64) -> (usize, usize) {
    (
        (page % SHARDS as u64) as usize,
        (page / SHARDS as u64) as usize,
    )
}

/// The page number at `index` of shard `shard` (the inverse of [`shard`]).
pub(super) fn page_at(shard: usize, index: usize) -> u64 {
    (index * SHARDS + shard) as u64
}

/// Entries each shard needs for `pages` pages.
pub(super) fn per_shard(pages: u64) -> usize {
    (pages as usize).div_ceil(SHARDS)
}

/// How a grant brings the page's contents, once its message is gone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum GrantKind {
    /// The requester already holds the data (an upgrade).
    None,
    /// An unowned page: install zeros.
    Zero,
    /// Data comes inline or from the supplier.
    Data,
}

impl From<GrantData<'_>> for GrantKind {
    fn from(d: GrantData<'_>) -> GrantKind {
        match d {
            GrantData::None => GrantKind::None,
            GrantData::Zero => GrantKind::Zero,
            GrantData::Inline(_) | GrantData::FromSupplier => GrantKind::Data,
        }
    }
}

/// A request this node has outstanding for one page.
#[derive(Debug)]
pub(super) struct Pending {
    /// Speculative: no thread waits for it.
    pub prefetch: bool,
    /// A write fault arrived while this request was outstanding; if the
    /// grant is only Shared, the writer needs an upgrade (its fault event is
    /// consumed, so nobody else would ask).
    pub want_write: bool,
    /// When the fault (or prefetch) was taken.
    pub t0: Instant,
    /// The grant, once it came: the mode and how its data arrives.
    pub grant: Option<(LocalState, GrantKind)>,
    /// `Data`/`InvAck` messages the grant said to wait for.
    pub acks_needed: u16,
    /// `Data`/`InvAck` messages received so far.
    pub acks_got: u16,
    /// Page contents that came before the transaction was complete.
    pub data: Option<Box<[u8]>>,
}

impl Pending {
    /// A request just sent.
    pub fn new(prefetch: bool, t0: Instant) -> Pending {
        Pending {
            prefetch,
            want_write: false,
            t0,
            grant: None,
            acks_needed: 0,
            acks_got: 0,
            data: None,
        }
    }

    /// Every message of the transaction is in.
    pub fn is_complete(&self) -> bool {
        self.grant.is_some() && self.acks_got >= self.acks_needed
    }

    /// True once the transaction is complete; until then keeps the page
    /// contents that came with this message, if any.
    pub fn complete_or_keep(&mut self, bytes: Option<&[u8]>) -> bool {
        if self.is_complete() {
            return true;
        }
        if let Some(b) = bytes {
            self.data = Some(b.into());
        }
        false
    }
}

/// One shard of this node's pages.
#[derive(Debug)]
pub(super) struct LocalShard {
    /// The state of each page of the shard, by index.
    pub state: Vec<LocalState>,
    /// Outstanding requests, by page number.
    pub pending: HashMap<u64, Pending>,
}

impl LocalShard {
    /// The outstanding request for `page`, which a `what` message answers.
    pub fn pending_mut(&mut self, page: u64, what: &str) -> Result<&mut Pending, String> {
        self.pending
            .get_mut(&page)
            .ok_or_else(|| format!("{what} for page {page}, which this node did not request"))
    }
}

/// This node's state of every page.
#[derive(Debug)]
pub(super) struct LocalPages {
    shards: Vec<Mutex<LocalShard>>,
}

impl LocalPages {
    /// `pages` pages, all Invalid, nothing outstanding.
    pub fn new(pages: u64) -> LocalPages {
        let n = per_shard(pages);
        LocalPages {
            shards: (0..SHARDS)
                .map(|_| {
                    Mutex::new(LocalShard {
                        state: vec![LocalState::Invalid; n],
                        pending: HashMap::new(),
                    })
                })
                .collect(),
        }
    }

    /// The shard holding `page`, locked, and the page's index in it.
    pub fn lock(&self, page: u64) -> (MutexGuard<'_, LocalShard>, usize) {
        let (s, i) = shard(page);
        (self.shards[s].lock().expect("lock"), i)
    }

    /// The state of `page`.
    pub fn state(&self, page: u64) -> LocalState {
        let (sh, i) = self.lock(page);
        sh.state[i]
    }

    /// Sets the state of `page`.
    pub fn set_state(&self, page: u64, state: LocalState) {
        let (mut sh, i) = self.lock(page);
        sh.state[i] = state;
    }

    /// Every shard, in order, for diagnostics.
    pub fn shards(&self) -> impl Iterator<Item = (usize, MutexGuard<'_, LocalShard>)> {
        self.shards
            .iter()
            .enumerate()
            .map(|(k, s)| (k, s.lock().expect("lock")))
    }
}

/// Faults taken on each page, for the hot-page report (4 bytes a page).
#[derive(Debug)]
pub(super) struct FaultCounts(Box<[AtomicU32]>);

impl FaultCounts {
    /// `pages` counters at zero.
    pub fn new(pages: u64) -> FaultCounts {
        FaultCounts((0..pages).map(|_| AtomicU32::new(0)).collect())
    }

    /// Counts one fault of `page`.
    pub fn count(&self, page: u64) {
        if let Some(c) = self.0.get(page as usize) {
            c.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The `n` pages with the most faults, as `(page, faults)`, most first
    /// (ties by page number).
    pub fn hottest(&self, n: usize) -> Vec<(u64, u32)> {
        let mut hot: Vec<(u64, u32)> = self
            .0
            .iter()
            .enumerate()
            .map(|(page, c)| (page as u64, c.load(Ordering::Relaxed)))
            .filter(|&(_, c)| c > 0)
            .collect();
        hot.sort_unstable_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        hot.truncate(n);
        hot
    }
}

/// Runs of `true` as `(first, count)`.
pub(super) fn runs(bits: &[bool]) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < bits.len() {
        if bits[i] {
            let s = i;
            while i < bits.len() && bits[i] {
                i += 1;
            }
            out.push((s as u64, (i - s) as u64));
        } else {
            i += 1;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shard_and_page_at_are_inverse() {
        for page in [0, 1, 255, 256, 257, 1 << 20, (1 << 20) + 77] {
            let (s, i) = shard(page);
            assert!(s < SHARDS);
            assert_eq!(page_at(s, i), page);
        }
        assert_eq!(per_shard(0), 0);
        assert_eq!(per_shard(1), 1);
        assert_eq!(per_shard(256), 1);
        assert_eq!(per_shard(257), 2);
    }

    #[test]
    fn pages_start_invalid_and_keep_their_state() {
        let pages = LocalPages::new(1000);
        assert_eq!(pages.state(999), LocalState::Invalid);
        pages.set_state(999, LocalState::Exclusive);
        pages.set_state(743, LocalState::Shared);
        assert_eq!(pages.state(999), LocalState::Exclusive);
        assert_eq!(pages.state(743), LocalState::Shared);
        assert_eq!(pages.state(487), LocalState::Invalid, "same shard as 743");
    }

    #[test]
    fn a_pending_request_completes_with_its_grant_and_every_ack() {
        let mut p = Pending::new(false, Instant::now());
        assert!(!p.is_complete());
        p.grant = Some((LocalState::Exclusive, GrantKind::Data));
        p.acks_needed = 2;
        p.acks_got = 1;
        assert!(!p.is_complete());
        p.acks_got = 2;
        assert!(p.is_complete());
    }

    #[test]
    fn early_data_is_kept_until_the_transaction_is_complete() {
        let mut p = Pending::new(false, Instant::now());
        p.acks_needed = 1;
        assert!(!p.complete_or_keep(Some(&[5; 8])));
        assert_eq!(p.data.as_deref(), Some(&[5u8; 8][..]));
        p.grant = Some((LocalState::Shared, GrantKind::Data));
        p.acks_got = 1;
        assert!(p.complete_or_keep(None));
        assert!(p.data.is_some(), "what came early stays for the install");
    }

    #[test]
    fn grant_kind_follows_the_grant_data() {
        assert_eq!(GrantKind::from(GrantData::None), GrantKind::None);
        assert_eq!(GrantKind::from(GrantData::Zero), GrantKind::Zero);
        assert_eq!(GrantKind::from(GrantData::FromSupplier), GrantKind::Data);
        assert_eq!(GrantKind::from(GrantData::Inline(&[0; 8])), GrantKind::Data);
    }

    #[test]
    fn hottest_pages_are_sorted_and_cut() {
        let c = FaultCounts::new(10);
        for (page, n) in [(3, 5), (7, 9), (1, 5), (9, 1)] {
            for _ in 0..n {
                c.count(page);
            }
        }
        c.count(1000); // outside: ignored
        assert_eq!(c.hottest(3), vec![(7, 9), (1, 5), (3, 5)]);
        assert_eq!(c.hottest(10).len(), 4);
    }

    #[test]
    fn runs_of_true() {
        assert_eq!(runs(&[]), vec![]);
        assert_eq!(
            runs(&[true, true, false, true, false, false, true]),
            vec![(0, 2), (3, 1), (6, 1)]
        );
    }
}
