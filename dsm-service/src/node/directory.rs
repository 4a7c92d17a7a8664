//! [`HomeDirectory`]: the home's side of the protocol for the pages homed on
//! this node (PROTOCOL.md, "The home's decision").
//!
//! Per page the directory keeps who holds it ([`DirState`]), whether a
//! transaction is in progress (`busy`, naming its requester) and a FIFO of
//! requests waiting behind it. It decides ([`decide`]) and records; it does
//! nothing else. Each decision comes back as a [`Transaction`] that the node
//! carries out (invalidations, the data, the grant); the directory never
//! touches a page or sends a message, so it is tested here on its own.

use std::collections::VecDeque;
use std::sync::Mutex;

use crate::coherence::{decide, Access, DataSource, DirState, Plan};
use crate::NodeId;

use super::pages::{page_at, per_shard, shard, SHARDS};

/// The home's entry for one page.
#[derive(Debug, Default)]
struct DirEntry {
    dir: DirState,
    /// The requester of the transaction in progress.
    busy: Option<NodeId>,
    /// Boxed so that an entry stays small: there is one per page, and few
    /// pages ever have a queue.
    #[allow(clippy::box_collection)]
    queue: Option<Box<VecDeque<(NodeId, Access)>>>,
}

impl DirEntry {
    fn idle(&self) -> bool {
        self.busy.is_none() && self.queue.is_none()
    }
}

/// A transaction the home has started: the page is busy for `requester`
/// until its `Done` (or, for a direct grant, until the grant is sent).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Transaction {
    /// The page.
    pub page: u64,
    /// Who asked.
    pub requester: NodeId,
    /// What the home decided.
    pub plan: Plan,
}

/// A request or `Done` the directory cannot accept.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(super) enum DirectoryError {
    /// The requester is not a node of the cluster.
    #[error("requester {0} is not in the cluster")]
    NotInCluster(NodeId),
    /// A `Done` from a node that has no transaction on the page.
    #[error("done for page {page} from node {from}, which has no transaction on it")]
    NoTransaction {
        /// The page.
        page: u64,
        /// The sender.
        from: NodeId,
    },
}

/// The directory of every page homed on this node (entries exist for every
/// page; those homed elsewhere are never used).
#[derive(Debug)]
pub(super) struct HomeDirectory {
    me: NodeId,
    nodes: usize,
    shards: Vec<Mutex<Vec<DirEntry>>>,
}

impl HomeDirectory {
    /// Home `me` of a cluster of `nodes`, for `pages` pages, all unowned.
    pub fn new(me: NodeId, nodes: usize, pages: u64) -> HomeDirectory {
        let n = per_shard(pages);
        HomeDirectory {
            me,
            nodes,
            shards: (0..SHARDS)
                .map(|_| Mutex::new((0..n).map(|_| DirEntry::default()).collect()))
                .collect(),
        }
    }

    fn with_entry<T>(&self, page: u64, f: impl FnOnce(&mut DirEntry) -> T) -> T {
        let (s, i) = shard(page);
        f(&mut self.shards[s].lock().expect("lock")[i])
    }

    /// Start-up: the origin holds `page` Exclusive.
    pub fn set_owned_by_origin(&self, page: u64) {
        self.with_entry(page, |e| e.dir.owner = Some(0));
    }

    /// Takes a request of `r` for `page`: starts its transaction now, or
    /// queues it behind the page's transaction in progress.
    pub fn request(
        &self,
        page: u64,
        r: NodeId,
        access: Access,
    ) -> Result<Option<Transaction>, DirectoryError> {
        if usize::from(r) >= self.nodes {
            return Err(DirectoryError::NotInCluster(r));
        }
        Ok(self.with_entry(page, |e| {
            if e.idle() {
                return Some(self.start(page, e, r, access));
            }
            e.queue
                .get_or_insert_with(Default::default)
                .push_back((r, access));
            self.next_queued(page, e)
        }))
    }

    /// Ends `from`'s transaction on `page`; returns the next queued one,
    /// now started.
    pub fn done(&self, page: u64, from: NodeId) -> Result<Option<Transaction>, DirectoryError> {
        self.with_entry(page, |e| {
            if e.busy != Some(from) {
                return Err(DirectoryError::NoTransaction { page, from });
            }
            e.busy = None;
            Ok(self.next_queued(page, e))
        })
    }

    /// Starts the next queued request of a page that is not busy.
    fn next_queued(&self, page: u64, e: &mut DirEntry) -> Option<Transaction> {
        let next = match e.busy {
            None => e.queue.as_mut().and_then(|q| q.pop_front()),
            Some(_) => None,
        };
        if e.queue.as_ref().is_some_and(|q| q.is_empty()) {
            e.queue = None;
        }
        next.map(|(r, access)| self.start(page, e, r, access))
    }

    fn start(&self, page: u64, e: &mut DirEntry, r: NodeId, access: Access) -> Transaction {
        e.busy = Some(r);
        Transaction {
            page,
            requester: r,
            plan: decide(&mut e.dir, self.me, r, access),
        }
    }

    /// Read-run fast path: claims, from `first`, up to `n` consecutive pages
    /// that are idle, owned by this home and `held` Exclusive here, for a
    /// read by remote `r` — each decided and busy exactly as if requested
    /// one by one. Returns how many it claimed (it stops at the first page
    /// that does not qualify). The caller supplies them as one run; each
    /// is a direct grant.
    pub fn claim_read_run(&self, r: NodeId, first: u64, n: u64, held: impl Fn(u64) -> bool) -> u64 {
        if r == self.me || usize::from(r) >= self.nodes {
            return 0;
        }
        let mut claimed = 0;
        while claimed < n {
            let page = first + claimed;
            let ok = self.with_entry(page, |e| {
                // `held` takes the page's local lock inside the directory
                // lock: the one order allowed.
                if !e.idle() || e.dir.owner != Some(self.me) || !held(page) {
                    return false;
                }
                let t = self.start(page, e, r, Access::Read);
                debug_assert_eq!(t.plan.data, DataSource::Node(self.me));
                true
            });
            if !ok {
                break;
            }
            claimed += 1;
        }
        claimed
    }

    /// Zero-run fast path: claims for this home itself the pages of
    /// `pages`, in order, while each is idle, unowned and `free` here — each
    /// decided and busy exactly as a write request of this home would be
    /// (owner: this home, data: a zero page). Returns how many it claimed
    /// (it stops at the first page that does not qualify). The caller
    /// installs them and ends each transaction with [`Self::done`].
    pub fn claim_zero_run(
        &self,
        pages: impl Iterator<Item = u64>,
        free: impl Fn(u64) -> bool,
    ) -> u64 {
        let mut claimed = 0;
        for page in pages {
            let ok = self.with_entry(page, |e| {
                // `free` takes the page's local lock inside the directory
                // lock: the one order allowed.
                if !e.idle() || e.dir.owner.is_some() || e.dir.sharers != 0 || !free(page) {
                    return false;
                }
                let t = self.start(page, e, self.me, Access::Write);
                debug_assert_eq!(t.plan.data, DataSource::Zero);
                true
            });
            if !ok {
                break;
            }
            claimed += 1;
        }
        claimed
    }

    /// The busy pages and their queues, for diagnostics.
    pub fn dump(&self, out: &mut String) {
        use std::fmt::Write;
        for (k, d) in self.shards.iter().enumerate() {
            let d = d.lock().expect("lock");
            for (i, e) in d.iter().enumerate().filter(|(_, e)| !e.idle()) {
                let _ = writeln!(
                    out,
                    "  home page {}: owner {:?} sharers {:#x} busy {:?} queue {:?}",
                    page_at(k, i),
                    e.dir.owner,
                    e.dir.sharers,
                    e.busy,
                    e.queue
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::coherence::{bit, LocalState};

    fn dir() -> HomeDirectory {
        HomeDirectory::new(0, 3, 1024)
    }

    #[test]
    fn an_unowned_page_is_granted_as_zeros() {
        let d = dir();
        let t = d
            .request(5, 1, Access::Write)
            .unwrap()
            .expect("starts at once");
        assert_eq!(t.page, 5);
        assert_eq!(t.requester, 1);
        assert_eq!(t.plan.mode, LocalState::Exclusive);
        assert_eq!(t.plan.data, DataSource::Zero);
        assert_eq!(t.plan.invalidate, 0);
    }

    #[test]
    fn requests_queue_behind_a_busy_page_in_order() {
        let d = dir();
        d.request(9, 1, Access::Write).unwrap().unwrap();
        assert_eq!(d.request(9, 2, Access::Read).unwrap(), None);
        assert_eq!(d.request(9, 0, Access::Write).unwrap(), None);
        let t = d.done(9, 1).unwrap().expect("node 2's read starts");
        assert_eq!(t.requester, 2);
        assert_eq!(t.plan.data, DataSource::Node(1), "node 1 supplies");
        assert_eq!(t.plan.supplier_keeps, LocalState::Shared);
        let t = d.done(9, 2).unwrap().expect("node 0's write starts");
        assert_eq!(t.requester, 0);
        assert_eq!(t.plan.data, DataSource::Node(1), "a sharer supplies");
        assert_eq!(t.plan.invalidate, bit(2), "the other sharer drops its copy");
        assert_eq!(d.done(9, 0).unwrap(), None, "queue empty");
        let mut s = String::new();
        d.dump(&mut s);
        assert!(s.is_empty(), "nothing busy: {s}");
    }

    #[test]
    fn a_done_without_a_transaction_is_refused() {
        let d = dir();
        assert_eq!(
            d.done(3, 1),
            Err(DirectoryError::NoTransaction { page: 3, from: 1 })
        );
        d.request(3, 1, Access::Read).unwrap().unwrap();
        assert_eq!(
            d.done(3, 2),
            Err(DirectoryError::NoTransaction { page: 3, from: 2 }),
            "only the requester ends it"
        );
        assert!(d.done(3, 1).is_ok());
    }

    #[test]
    fn a_requester_outside_the_cluster_is_refused() {
        assert_eq!(
            dir().request(1, 3, Access::Read),
            Err(DirectoryError::NotInCluster(3))
        );
    }

    #[test]
    fn a_read_run_claims_idle_pages_the_home_holds() {
        let d = dir();
        for p in 10..20 {
            d.set_owned_by_origin(p);
        }
        d.request(14, 2, Access::Read).unwrap().unwrap();
        assert_eq!(d.claim_read_run(1, 10, 8, |_| true), 4, "stops at busy 14");
        assert_eq!(
            d.claim_read_run(1, 15, 3, |p| p != 16),
            1,
            "stops where not held"
        );
        assert_eq!(
            d.claim_read_run(0, 17, 2, |_| true),
            0,
            "never for the home itself"
        );
        assert_eq!(
            d.claim_read_run(1, 30, 2, |_| true),
            0,
            "unowned pages are not held"
        );
        let t = d.done(10, 1).unwrap();
        assert_eq!(t, None, "a claimed page is busy for its requester");
        let w = d.request(10, 2, Access::Write).unwrap().unwrap();
        assert_eq!(w.plan.data, DataSource::Node(0), "the home supplies first");
        assert_eq!(w.plan.invalidate, bit(1));
    }
}
