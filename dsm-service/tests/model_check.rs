//! Exhaustive model check of the coherence protocol described in
//! `src/coherence/PROTOCOL.md`, with the `stateright` crate.
//!
//! # What is modelled
//!
//! * 3 nodes and 2 pages; node 0 is the origin. Page 0 starts `Exclusive` at
//!   the origin (it touched it), page 1 starts unowned (a zero page nobody
//!   holds). The home of each page is a parameter of the model.
//! * Each node runs one vCPU that performs a bounded number of operations, each
//!   a read or a write (of a fresh value) of either page, chosen
//!   nondeterministically. An access that the local state allows completes at
//!   once; otherwise it faults, the node sends a `Request` (or makes a local
//!   call when it is the page's home) and the vCPU sleeps until the transaction
//!   installs the page, then retries the access (and may fault again, since a
//!   `Fetch`/`Invalidate` may have arrived in between).
//! * A bounded number of *spurious* faults: a node with no transaction in
//!   progress for a page requests it although its vCPU does not wait for it
//!   (a duplicate uffd fault event). They exercise the "duplicate fault" rows
//!   of the home's decision tables.
//! * Every message of the protocol (`Request`, `Grant`, `Fetch`, `Data`,
//!   `Invalidate`, `InvAck`, `Done`) is in flight until delivered, and any
//!   deliverable message may be delivered next. As PROTOCOL.md assumes, each
//!   link (sender, receiver) keeps its order and different links are not
//!   ordered at all ([`Network::PerLinkFifo`]).
//! * Direct grants (PROTOCOL.md, "Direct grants"): a `Grant` with `acks = 0`
//!   to a remote requester ends the transaction at once, with no `Done`. The
//!   variant without them (every transaction ends with `Done`) is checked
//!   too, over a network that keeps no order whatsoever
//!   ([`Network::Unordered`], a multiset of messages); and direct grants over
//!   such a network are shown to break (a negative control), so the link
//!   order PROTOCOL.md relies on is really needed.
//! * The home's per-page directory (`owner`, `sharers`, `busy`, FIFO `queue`),
//!   its decisions — made by `dsm_service::coherence::decide` itself, the
//!   function the DSM node runs, not a copy of it — its local calls when it is
//!   the requester, the supplier or a sharer (no message then, the home-local
//!   fast path included), the requester collecting the `Grant` and `acks`
//!   further messages in any order, the supplier (write-protect, read, send,
//!   drop) and the sharer (drop, acknowledge).
//! * Each handler runs atomically, as the per-node, per-page lock of
//!   PROTOCOL.md makes it. A node has at most one transaction in progress per
//!   page: a fault on a page whose transaction is in progress waits for it,
//!   then retries.
//! * Page contents are values: a write stores a fresh value, and a ghost
//!   variable knows the last value written to each page. Since every written
//!   value is fresh, a copy is represented by whether it *is* the last written
//!   value (see [`Val`]); a write makes every other copy of the page, installed
//!   or in flight, stale.
//!
//! # What is checked
//!
//! * single writer / multiple readers on the installed local states;
//! * every valid copy holds the last written value, every completed read
//!   returns the last written value;
//! * no handler ever finds the protocol in a state it cannot handle (a grant
//!   with no data for a page that is not held, a copy over a present page, a
//!   fetch at a node without a copy, a `Done` from a node that is not the
//!   busy requester, ...);
//! * the directory agrees with the local states whenever a page has no
//!   transaction in progress;
//! * no deadlock: whenever the network is empty no transaction is in progress,
//!   a state with no enabled action has every operation completed, and (by an
//!   explicit-state search on smaller bounds) from every reachable state a
//!   state where every operation completed is still reachable;
//! * coverage: every row of the home's decision tables and the interesting
//!   interleavings (data before grant, a sharer invalidated while its upgrade
//!   waits in the queue, a refault after an install, ...) are exercised;
//! * negative controls: deliberately broken variants of the protocol are
//!   caught, so these tests can fail.
//!
//! Each check runs for three assignments of homes: both pages at the origin;
//! page 0 at the origin and page 1 at node 2; page 0 (owned by the origin) at
//! node 1 and page 1 at node 2. The state counts are printed
//! (`cargo test --release --test model_check -- --nocapture`).
//!
//! Not checked: progress of one particular vCPU. Under an adversarial
//! schedule two nodes can take a page from each other forever, each time
//! before the other's vCPU retries its access (the classic DSM ping-pong);
//! completion stays reachable from every state, which is what is checked.

use dsm_service::coherence::{self, DataSource, DirState, LocalState};
use dsm_service::NodeId;
use stateright::{Checker, Expectation, HasDiscoveries, Model, Property};
use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

/// Number of nodes.
const N: usize = 3;
/// Number of pages.
const P: usize = 2;
/// The origin node, which holds every touched page at start.
const ORIGIN: Node = 0;

type Node = u8;
type Page = u8;
/// A page's contents, abstracted to whether they are the last value written
/// to the page. Every write stores a fresh value, so all older contents are
/// equally stale and need not be told apart: the properties only compare a
/// copy with the last written value. (This keeps the order of writes out of
/// the state, which would otherwise multiply the state space.)
type Val = bool;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Access {
    Read,
    Write,
}

/// The mode a `Grant` installs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Mode {
    Shared,
    Exclusive,
}

/// What a supplier downgrades its copy to on `Fetch`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Down {
    Shared,
    Invalid,
}

/// A node's installed local state for a page, with the page's contents.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Local {
    Invalid,
    Shared(Val),
    Exclusive(Val),
}

impl Local {
    fn value(self) -> Option<Val> {
        match self {
            Local::Invalid => None,
            Local::Shared(v) | Local::Exclusive(v) => Some(v),
        }
    }

    /// The state after a supplier (or the home as supplier) downgrades to `d`.
    fn downgraded(self, d: Down) -> Local {
        match (d, self.value()) {
            (Down::Shared, Some(v)) => Local::Shared(v),
            _ => Local::Invalid,
        }
    }
}

/// The payload of a `Grant`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
struct Grant {
    mode: Mode,
    /// `None`: no data (the requester has it); `Some(v)`: the zero page or
    /// the home's own copy.
    data: Option<Val>,
    /// How many `Data` + `InvAck` messages to wait for.
    acks: u8,
}

/// A requester's transaction in progress for one page.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct Pending {
    access: Access,
    grant: Option<Grant>,
    /// `Data` + `InvAck` messages received so far.
    got: u8,
    /// Contents received in a `Data` message.
    data: Option<Val>,
}

/// The home's directory entry for one page.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct Dir {
    owner: Option<Node>,
    /// Bit set of the nodes holding a `Shared` copy.
    sharers: u8,
    /// Requester of the transaction in progress.
    busy: Option<Node>,
    /// Requests waiting for this page, FIFO.
    queue: Vec<(Node, Access)>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Msg {
    Request {
        from: Node,
        page: Page,
        access: Access,
    },
    Grant {
        to: Node,
        page: Page,
        grant: Grant,
    },
    Fetch {
        to: Node,
        page: Page,
        requester: Node,
        down: Down,
    },
    Data {
        from: Node,
        to: Node,
        page: Page,
        val: Val,
    },
    Invalidate {
        to: Node,
        page: Page,
        requester: Node,
    },
    InvAck {
        from: Node,
        to: Node,
        page: Page,
    },
    Done {
        from: Node,
        page: Page,
    },
}

impl Msg {
    fn page(&self) -> Page {
        match *self {
            Msg::Request { page, .. }
            | Msg::Grant { page, .. }
            | Msg::Fetch { page, .. }
            | Msg::Data { page, .. }
            | Msg::Invalidate { page, .. }
            | Msg::InvAck { page, .. }
            | Msg::Done { page, .. } => page,
        }
    }
}

/// A node's vCPU.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct Vcpu {
    /// Operations it may still start.
    ops_left: u8,
    /// The access it is performing (it faulted and waits, or must retry).
    op: Option<(Page, Access)>,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct State {
    local: [[Local; P]; N],
    pending: [[Option<Pending>; P]; N],
    vcpu: [Vcpu; N],
    dir: [Dir; P],
    /// In-flight messages, each with its link (sender, receiver), kept sorted
    /// by link so that equal networks are equal states. With
    /// [`Network::PerLinkFifo`] the messages of one link stay in the order
    /// sent; with [`Network::Unordered`] the whole vector is sorted (a
    /// multiset).
    net: Vec<(Link, Msg)>,
    /// Ghost: whether each page has been written during the run (the zero
    /// page is the page's last value only if it has not).
    written: [bool; P],
    /// Spurious (duplicate) faults that may still happen.
    spurious_left: u8,
    /// Only for [`Bug::SendBeforeProtect`]: a supplier that sent its data but
    /// has not yet applied the downgrade.
    unprotected: [[Option<Down>; P]; N],
    /// Ghost: a completed read returned something else than the last write.
    stale_read: bool,
    /// Ghost: the first handler that met a state the protocol cannot handle.
    error: Option<&'static str>,
}

impl State {
    /// A fresh value is written to page `p`: every other copy of it, wherever
    /// it is (installed, in flight, received), no longer holds the last value.
    fn write(&mut self, p: Page, network: Network) {
        self.written[usize::from(p)] = true;
        for node in &mut self.local {
            node[usize::from(p)] = match node[usize::from(p)] {
                Local::Invalid => Local::Invalid,
                Local::Shared(_) => Local::Shared(false),
                Local::Exclusive(_) => Local::Exclusive(false),
            };
        }
        for pend in self
            .pending
            .iter_mut()
            .filter_map(|n| n[usize::from(p)].as_mut())
        {
            if pend.data.is_some() {
                pend.data = Some(false);
            }
            if let Some(g) = pend.grant.as_mut().filter(|g| g.data.is_some()) {
                g.data = Some(false);
            }
        }
        for (_, m) in &mut self.net {
            match m {
                Msg::Data { page, val, .. } if *page == p => *val = false,
                Msg::Grant { page, grant, .. } if *page == p && grant.data.is_some() => {
                    grant.data = Some(false);
                }
                _ => {}
            }
        }
        if network == Network::Unordered {
            self.net.sort_unstable();
        }
    }

    fn fail(&mut self, what: &'static str) {
        self.error.get_or_insert(what);
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Action {
    /// The vCPU of a node starts an access to a page.
    Start(Node, Page, Access),
    /// A vCPU whose page was installed retries its access.
    Retry(Node),
    /// A duplicate fault event: the node requests a page nobody waits for.
    Spurious(Node, Page, Access),
    /// One in-flight message is delivered and handled.
    Deliver(Msg),
    /// Only for [`Bug::SendBeforeProtect`]: the supplier's late downgrade.
    Protect(Node, Page),
}

/// What the transport guarantees about order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Network {
    /// Messages from one node to another arrive in the order sent; messages
    /// on different links are not ordered (one TCP connection per pair).
    PerLinkFifo,
    /// Any in-flight message may arrive next.
    Unordered,
}

/// Sender and receiver of a message.
type Link = (Node, Node);

/// Deliberately broken variants, for the negative controls.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Bug {
    /// The requester installs an `Exclusive` grant as soon as it has the data,
    /// without waiting for the `InvAck`s.
    InstallWithoutInvAcks,
    /// The supplier reads and sends its page before write-protecting it.
    SendBeforeProtect,
    /// The home starts the next transaction without waiting for `Done`.
    NoBusy,
    /// On `Done` the home clears `busy` but does not start the next queued
    /// request.
    QueueStallsOnDone,
}

/// Protocol situations the model is expected to exercise (bits of
/// [`Dsm::coverage`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Cov {
    ReadDuplicateOwner,
    ReadDuplicateSharer,
    ReadFromRemoteOwner,
    ReadFromHomeOwner,
    ReadFromRemoteSharer,
    ReadFromHomeSharer,
    ReadUnowned,
    WriteDuplicateOwner,
    WriteFromRemoteOwner,
    WriteFromHomeOwner,
    WriteUpgrade,
    WriteUpgradeInvalidatesTwo,
    WriteFromRemoteSharer,
    WriteFromHomeSharer,
    WriteUnowned,
    HomeDropsItsOwnCopy,
    HomeLocalFastPath,
    DirectGrant,
    RequestQueuedBehindBusy,
    DataBeforeGrant,
    InvAckBeforeGrant,
    FetchAtWaitingNode,
    SharerInvalidatedWhileUpgradeQueued,
    RefaultAfterInstall,
    StaleUpgradeGetsData,
}

const ALL_COV: [Cov; 25] = [
    Cov::ReadDuplicateOwner,
    Cov::ReadDuplicateSharer,
    Cov::ReadFromRemoteOwner,
    Cov::ReadFromHomeOwner,
    Cov::ReadFromRemoteSharer,
    Cov::ReadFromHomeSharer,
    Cov::ReadUnowned,
    Cov::WriteDuplicateOwner,
    Cov::WriteFromRemoteOwner,
    Cov::WriteFromHomeOwner,
    Cov::WriteUpgrade,
    Cov::WriteUpgradeInvalidatesTwo,
    Cov::WriteFromRemoteSharer,
    Cov::WriteFromHomeSharer,
    Cov::WriteUnowned,
    Cov::HomeDropsItsOwnCopy,
    Cov::HomeLocalFastPath,
    Cov::DirectGrant,
    Cov::RequestQueuedBehindBusy,
    Cov::DataBeforeGrant,
    Cov::InvAckBeforeGrant,
    Cov::FetchAtWaitingNode,
    Cov::SharerInvalidatedWhileUpgradeQueued,
    Cov::RefaultAfterInstall,
    Cov::StaleUpgradeGetsData,
];

/// The model: the protocol's parameters.
struct Dsm {
    /// Home node of each page.
    homes: [Node; P],
    /// Operations each node's vCPU performs.
    ops: [u8; N],
    /// Spurious (duplicate) fault events in the whole run.
    spurious: u8,
    bug: Option<Bug>,
    /// Whether a `Grant` with `acks = 0` to a remote requester ends the
    /// transaction at once, with no `Done` (PROTOCOL.md, "Direct grants").
    direct_grants: bool,
    network: Network,
    /// Bit set of the [`Cov`] situations met while exploring (a side channel
    /// written by `next_state`, not part of the state).
    coverage: AtomicU64,
}

impl Dsm {
    /// The protocol as PROTOCOL.md specifies it today: direct grants, over
    /// links that keep each sender's order.
    fn new(homes: [Node; P], ops: [u8; N], spurious: u8, bug: Option<Bug>) -> Self {
        Dsm {
            homes,
            ops,
            spurious,
            bug,
            direct_grants: true,
            network: Network::PerLinkFifo,
            coverage: AtomicU64::new(0),
        }
    }

    /// The protocol before direct grants: every transaction ends with `Done`,
    /// which needs no order from the network at all.
    fn always_done_unordered(self) -> Self {
        Dsm {
            direct_grants: false,
            network: Network::Unordered,
            ..self
        }
    }

    /// Direct grants over a network that does not keep any order.
    fn unordered(self) -> Self {
        Dsm {
            network: Network::Unordered,
            ..self
        }
    }

    fn describe(&self) -> String {
        format!(
            "homes {:?}, operations per node {:?}, {} spurious fault(s), {}, {:?}",
            self.homes,
            self.ops,
            self.spurious,
            if self.direct_grants {
                "direct grants"
            } else {
                "Done always"
            },
            self.network
        )
    }

    fn cover(&self, c: Cov) {
        self.coverage.fetch_or(1 << c as u32, Ordering::Relaxed);
    }

    fn covered(&self) -> BTreeSet<Cov> {
        let bits = self.coverage.load(Ordering::Relaxed);
        ALL_COV
            .iter()
            .copied()
            .filter(|c| bits & (1 << *c as u32) != 0)
            .collect()
    }

    fn home(&self, p: Page) -> Node {
        self.homes[usize::from(p)]
    }

    /// The link (sender, receiver) a message travels on.
    fn link(&self, m: &Msg) -> Link {
        match *m {
            Msg::Request { from, page, .. } | Msg::Done { from, page } => (from, self.home(page)),
            Msg::Grant { to, page, .. }
            | Msg::Fetch { to, page, .. }
            | Msg::Invalidate { to, page, .. } => (self.home(page), to),
            Msg::Data { from, to, .. } | Msg::InvAck { from, to, .. } => (from, to),
        }
    }

    /// Puts a message on the network.
    fn send(&self, s: &mut State, m: Msg) {
        let link = self.link(&m);
        let at = match self.network {
            // Behind the messages already on its link.
            Network::PerLinkFifo => s.net.partition_point(|(l, _)| *l <= link),
            Network::Unordered => s.net.partition_point(|x| *x <= (link, m)),
        };
        s.net.insert(at, (link, m));
    }

    // ----- the vCPU -------------------------------------------------------

    /// The vCPU of `n` touches page `p`: completes if the local state allows
    /// the access, faults otherwise.
    fn access(&self, s: &mut State, n: Node, p: Page, a: Access) {
        let (ni, pi) = (usize::from(n), usize::from(p));
        match (a, s.local[ni][pi]) {
            (Access::Read, Local::Shared(v) | Local::Exclusive(v)) => {
                if !v {
                    s.stale_read = true;
                }
                s.vcpu[ni].op = None;
            }
            (Access::Write, Local::Exclusive(_)) => {
                s.write(p, self.network);
                s.local[ni][pi] = Local::Exclusive(true);
                s.vcpu[ni].op = None;
            }
            _ => {
                // A MISSING fault (Invalid) or a WP fault (write on Shared).
                s.vcpu[ni].op = Some((p, a));
                if s.pending[ni][pi].is_none() {
                    self.request(s, n, p, a);
                }
                // Otherwise the fault waits for the transaction in progress
                // and retries after it.
            }
        }
    }

    /// Node `n` starts a transaction for page `p`.
    fn request(&self, s: &mut State, n: Node, p: Page, access: Access) {
        s.pending[usize::from(n)][usize::from(p)] = Some(Pending {
            access,
            grant: None,
            got: 0,
            data: None,
        });
        if n == self.home(p) {
            // Local call, no message.
            self.home_request(s, p, n, access);
        } else {
            self.send(
                s,
                Msg::Request {
                    from: n,
                    page: p,
                    access,
                },
            );
        }
    }

    // ----- the home -------------------------------------------------------

    /// The home receives a request (a message, or a local call).
    fn home_request(&self, s: &mut State, p: Page, r: Node, access: Access) {
        let d = &mut s.dir[usize::from(p)];
        d.queue.push((r, access));
        if d.busy.is_some() {
            self.cover(Cov::RequestQueuedBehindBusy);
        }
        self.start_next(s, p);
    }

    /// The home receives `Done` (a message, or a local call).
    fn home_done(&self, s: &mut State, p: Page, from: Node) {
        let d = &mut s.dir[usize::from(p)];
        if self.bug == Some(Bug::NoBusy) {
            return;
        }
        if d.busy != Some(from) {
            s.fail("Done from a node that is not the busy requester");
            return;
        }
        d.busy = None;
        if self.bug != Some(Bug::QueueStallsOnDone) {
            self.start_next(s, p);
        }
    }

    /// The home takes the request at the head of `p`'s queue if `p` is not busy.
    fn start_next(&self, s: &mut State, p: Page) {
        let d = &mut s.dir[usize::from(p)];
        if d.busy.is_some() || d.queue.is_empty() {
            return;
        }
        let (r, access) = d.queue.remove(0);
        if self.bug != Some(Bug::NoBusy) {
            d.busy = Some(r);
        }
        self.decide(s, p, r, access);
    }

    /// The home's decision: `dsm_service::coherence::decide`, the function
    /// the DSM runs, over this page's directory; the model carries its plan
    /// out as the node's engine does (invalidations, then the data, then the
    /// grant).
    fn decide(&self, s: &mut State, p: Page, r: Node, access: Access) {
        let (pi, h) = (usize::from(p), self.home(p));
        let messages_before = s.net.len();
        self.cover_decision(s, p, r, access);
        let mut dir = DirState {
            owner: s.dir[pi].owner.map(NodeId::from),
            sharers: u64::from(s.dir[pi].sharers),
        };
        let real_access = match access {
            Access::Read => coherence::Access::Read,
            Access::Write => coherence::Access::Write,
        };
        let plan = coherence::decide(&mut dir, NodeId::from(h), NodeId::from(r), real_access);
        s.dir[pi].owner = dir.owner.map(|o| o as Node);
        s.dir[pi].sharers = dir.sharers as u8;
        let mut acks = self.invalidate(s, p, plan.invalidate as u8, r);
        let data = match plan.data {
            DataSource::None => None,
            DataSource::Zero => Some(!s.written[pi]),
            DataSource::Node(x) => {
                let down = match plan.supplier_keeps {
                    LocalState::Shared => Down::Shared,
                    _ => Down::Invalid,
                };
                let (data, fetch_acks) = self.fetch(s, p, x as Node, r, down);
                acks += fetch_acks;
                data
            }
        };
        let mode = match plan.mode {
            LocalState::Shared => Mode::Shared,
            _ => Mode::Exclusive,
        };
        let grant = grant(mode, data, acks);
        if r == h {
            // Local call: the home is the requester.
            if s.net.len() == messages_before {
                self.cover(Cov::HomeLocalFastPath);
            }
            self.grant_arrives(s, r, p, grant);
        } else {
            self.send(
                s,
                Msg::Grant {
                    to: r,
                    page: p,
                    grant,
                },
            );
            if self.direct_grants && grant.acks == 0 {
                // A direct grant: the transaction is over, take the next one.
                self.cover(Cov::DirectGrant);
                s.dir[pi].busy = None;
                self.start_next(s, p);
            }
        }
    }

    /// Which row of PROTOCOL.md's decision tables a request of `r` meets,
    /// from the directory before the decision (coverage only).
    fn cover_decision(&self, s: &State, p: Page, r: Node, access: Access) {
        let (pi, h) = (usize::from(p), self.home(p));
        let rbit = 1u8 << r;
        let (owner, sharers) = (s.dir[pi].owner, s.dir[pi].sharers);
        let at = |node: Node, home: Cov, remote: Cov| if node == h { home } else { remote };
        let c = match (access, owner) {
            (Access::Read, Some(o)) if o == r => Cov::ReadDuplicateOwner,
            (Access::Write, Some(o)) if o == r => Cov::WriteDuplicateOwner,
            (Access::Read, Some(o)) => at(o, Cov::ReadFromHomeOwner, Cov::ReadFromRemoteOwner),
            (Access::Write, Some(o)) => at(o, Cov::WriteFromHomeOwner, Cov::WriteFromRemoteOwner),
            (Access::Read, None) if sharers & rbit != 0 => Cov::ReadDuplicateSharer,
            (Access::Read, None) if sharers != 0 => at(
                supplier_of(sharers, h),
                Cov::ReadFromHomeSharer,
                Cov::ReadFromRemoteSharer,
            ),
            (Access::Read, None) => Cov::ReadUnowned,
            (Access::Write, None) if sharers & rbit != 0 => {
                if (sharers & !rbit).count_ones() >= 2 {
                    self.cover(Cov::WriteUpgradeInvalidatesTwo);
                }
                Cov::WriteUpgrade
            }
            (Access::Write, None) if sharers != 0 => {
                if s.pending[usize::from(r)][pi].is_some()
                    && s.vcpu[usize::from(r)].op == Some((p, Access::Write))
                    && s.local[usize::from(r)][pi] == Local::Invalid
                {
                    self.cover(Cov::StaleUpgradeGetsData);
                }
                at(
                    supplier_of(sharers, h),
                    Cov::WriteFromHomeSharer,
                    Cov::WriteFromRemoteSharer,
                )
            }
            (Access::Write, None) => Cov::WriteUnowned,
        };
        self.cover(c);
    }

    /// The home asks `supplier` for the data of `p` on behalf of `r`, or reads
    /// its own copy when it is the supplier. Returns the grant's data and how
    /// many messages the requester must wait for.
    fn fetch(
        &self,
        s: &mut State,
        p: Page,
        supplier: Node,
        r: Node,
        down: Down,
    ) -> (Option<Val>, u8) {
        let (pi, h) = (usize::from(p), self.home(p));
        if supplier == h {
            // Write-protect, read, put the data in the Grant, drop if asked.
            let hi = usize::from(h);
            let Some(v) = s.local[hi][pi].value() else {
                s.fail("home is the supplier but holds no copy");
                return (None, 0);
            };
            if down == Down::Invalid {
                self.cover(Cov::HomeDropsItsOwnCopy);
            }
            s.local[hi][pi] = s.local[hi][pi].downgraded(down);
            (Some(v), 0)
        } else {
            self.send(
                s,
                Msg::Fetch {
                    to: supplier,
                    page: p,
                    requester: r,
                    down,
                },
            );
            (None, 1)
        }
    }

    /// The home invalidates the sharers in `set` on behalf of `r`: its own
    /// copy at once, the others with `Invalidate`. Returns how many `InvAck`s
    /// the requester must wait for.
    fn invalidate(&self, s: &mut State, p: Page, set: u8, r: Node) -> u8 {
        let (pi, h) = (usize::from(p), self.home(p));
        let mut acks = 0;
        for x in 0..N as Node {
            if set & (1 << x) == 0 {
                continue;
            }
            if x == h {
                self.cover(Cov::HomeDropsItsOwnCopy);
                if !matches!(s.local[usize::from(h)][pi], Local::Shared(_)) {
                    s.fail("home invalidates its own copy but does not hold it Shared");
                }
                s.local[usize::from(h)][pi] = Local::Invalid;
            } else {
                self.send(
                    s,
                    Msg::Invalidate {
                        to: x,
                        page: p,
                        requester: r,
                    },
                );
                acks += 1;
            }
        }
        acks
    }

    // ----- supplier and sharer -------------------------------------------

    fn on_fetch(&self, s: &mut State, o: Node, p: Page, r: Node, down: Down) {
        let (oi, pi) = (usize::from(o), usize::from(p));
        if s.pending[oi][pi].is_some() {
            self.cover(Cov::FetchAtWaitingNode);
        }
        let Some(v) = s.local[oi][pi].value() else {
            s.fail("Fetch at a node that holds no copy");
            return;
        };
        if self.bug == Some(Bug::SendBeforeProtect)
            && matches!(s.local[oi][pi], Local::Exclusive(_))
        {
            // Broken: read and send while the page is still writable; the
            // downgrade comes later (action `Protect`).
            s.unprotected[oi][pi] = Some(down);
        } else {
            // Write-protect (if Exclusive), read, then drop if asked.
            s.local[oi][pi] = s.local[oi][pi].downgraded(down);
        }
        self.send(
            s,
            Msg::Data {
                from: o,
                to: r,
                page: p,
                val: v,
            },
        );
    }

    fn on_invalidate(&self, s: &mut State, x: Node, p: Page, r: Node) {
        let (xi, pi) = (usize::from(x), usize::from(p));
        if let Some(pend) = s.pending[xi][pi] {
            if pend.access == Access::Write {
                self.cover(Cov::SharerInvalidatedWhileUpgradeQueued);
            }
        }
        if !matches!(s.local[xi][pi], Local::Shared(_)) {
            s.fail("Invalidate at a node that does not hold the page Shared");
        }
        s.local[xi][pi] = Local::Invalid;
        self.send(
            s,
            Msg::InvAck {
                from: x,
                to: r,
                page: p,
            },
        );
    }

    // ----- the requester --------------------------------------------------

    fn grant_arrives(&self, s: &mut State, n: Node, p: Page, g: Grant) {
        let Some(pend) = s.pending[usize::from(n)][usize::from(p)].as_mut() else {
            s.fail("Grant with no transaction in progress");
            return;
        };
        if pend.grant.is_some() {
            s.fail("second Grant for one transaction");
            return;
        }
        pend.grant = Some(g);
        self.try_install(s, n, p);
    }

    fn data_arrives(&self, s: &mut State, n: Node, p: Page, v: Val) {
        let Some(pend) = s.pending[usize::from(n)][usize::from(p)].as_mut() else {
            s.fail("Data with no transaction in progress");
            return;
        };
        if pend.grant.is_none() {
            self.cover(Cov::DataBeforeGrant);
        }
        if pend.data.is_some() {
            s.fail("second Data for one transaction");
            return;
        }
        pend.data = Some(v);
        pend.got += 1;
        self.try_install(s, n, p);
    }

    fn invack_arrives(&self, s: &mut State, n: Node, p: Page) {
        let Some(pend) = s.pending[usize::from(n)][usize::from(p)].as_mut() else {
            if self.bug == Some(Bug::InstallWithoutInvAcks) {
                return; // The broken requester no longer waits for it.
            }
            s.fail("InvAck with no transaction in progress");
            return;
        };
        if pend.grant.is_none() {
            self.cover(Cov::InvAckBeforeGrant);
        }
        pend.got += 1;
        self.try_install(s, n, p);
    }

    /// Installs the page once the Grant and all `acks` messages are in, then
    /// sends `Done`.
    fn try_install(&self, s: &mut State, n: Node, p: Page) {
        let (ni, pi) = (usize::from(n), usize::from(p));
        let pend = s.pending[ni][pi].expect("caller checked");
        let Some(g) = pend.grant else { return };
        let cur = s.local[ni][pi];
        let complete = if self.bug == Some(Bug::InstallWithoutInvAcks) && g.mode == Mode::Exclusive
        {
            // Broken: as soon as there is data to install.
            g.data.is_some() || pend.data.is_some() || cur != Local::Invalid
        } else {
            pend.got == g.acks
        };
        if !complete {
            if pend.got > g.acks {
                s.fail("more Data/InvAck than the Grant announced");
            }
            return;
        }
        if g.data.is_some() && pend.data.is_some() {
            s.fail("data both in the Grant and in a Data message");
        }
        let new = match (g.mode, g.data.or(pend.data)) {
            (mode, Some(v)) => {
                // UFFDIO_COPY (with COPY_MODE_WP for Shared): the page must
                // not be present, or the copy fails with EEXIST and leaves
                // stale contents behind.
                if cur != Local::Invalid {
                    s.fail("data installed over a present page");
                }
                match mode {
                    Mode::Shared => Local::Shared(v),
                    Mode::Exclusive => Local::Exclusive(v),
                }
            }
            // Duplicate read: the page stays as it is.
            (Mode::Shared, None) => match cur {
                Local::Shared(_) => cur,
                _ => {
                    s.fail("Shared grant without data for a page not held Shared");
                    cur
                }
            },
            // Upgrade (WP clear + wake) or duplicate write.
            (Mode::Exclusive, None) => match cur {
                Local::Shared(v) | Local::Exclusive(v) => Local::Exclusive(v),
                Local::Invalid => {
                    s.fail("Exclusive grant without data for a page not held");
                    cur
                }
            },
        };
        s.local[ni][pi] = new;
        s.pending[ni][pi] = None;
        if n == self.home(p) {
            self.home_done(s, p, n);
        } else if g.acks > 0 || !self.direct_grants {
            self.send(s, Msg::Done { from: n, page: p });
        }
        // Otherwise a direct grant: the home already ended the transaction.
    }

    fn deliver(&self, s: &mut State, m: Msg) {
        match m {
            Msg::Request { from, page, access } => self.home_request(s, page, from, access),
            Msg::Grant { to, page, grant } => self.grant_arrives(s, to, page, grant),
            Msg::Fetch {
                to,
                page,
                requester,
                down,
            } => self.on_fetch(s, to, page, requester, down),
            Msg::Data { to, page, val, .. } => self.data_arrives(s, to, page, val),
            Msg::Invalidate {
                to,
                page,
                requester,
            } => self.on_invalidate(s, to, page, requester),
            Msg::InvAck { to, page, .. } => self.invack_arrives(s, to, page),
            Msg::Done { from, page } => self.home_done(s, page, from),
        }
    }
}

fn grant(mode: Mode, data: Option<Val>, acks: u8) -> Grant {
    Grant { mode, data, acks }
}

/// The sharer that supplies data: the home if it is one, else the lowest.
fn supplier_of(sharers: u8, home: Node) -> Node {
    if sharers & (1 << home) != 0 {
        home
    } else {
        sharers.trailing_zeros() as Node
    }
}

impl Model for Dsm {
    type State = State;
    type Action = Action;

    fn init_states(&self) -> Vec<State> {
        let mut local = [[Local::Invalid; P]; N];
        local[usize::from(ORIGIN)][0] = Local::Exclusive(true);
        let dir = |owner| Dir {
            owner,
            sharers: 0,
            busy: None,
            queue: Vec::new(),
        };
        vec![State {
            local,
            pending: [[None; P]; N],
            vcpu: self.ops.map(|ops_left| Vcpu { ops_left, op: None }),
            // Page 0 was touched by the origin, page 1 was not (unowned).
            dir: [dir(Some(ORIGIN)), dir(None)],
            net: Vec::new(),
            written: [false; P],
            spurious_left: self.spurious,
            unprotected: [[None; P]; N],
            stale_read: false,
            error: None,
        }]
    }

    fn actions(&self, s: &State, actions: &mut Vec<Action>) {
        const ACCESSES: [Access; 2] = [Access::Read, Access::Write];
        for n in 0..N as Node {
            let v = s.vcpu[usize::from(n)];
            match v.op {
                None if v.ops_left > 0 => {
                    for p in 0..P as Page {
                        for a in ACCESSES {
                            actions.push(Action::Start(n, p, a));
                        }
                    }
                }
                Some((p, _)) if s.pending[usize::from(n)][usize::from(p)].is_none() => {
                    actions.push(Action::Retry(n));
                }
                _ => {}
            }
        }
        if s.spurious_left > 0 {
            for n in 0..N as Node {
                for p in 0..P as Page {
                    if s.pending[usize::from(n)][usize::from(p)].is_none() {
                        for a in ACCESSES {
                            actions.push(Action::Spurious(n, p, a));
                        }
                    }
                }
            }
        }
        // The messages that may arrive next: the first of each link, or with
        // an unordered network every distinct message (`net` is sorted).
        let mut prev = None;
        for x in &s.net {
            let next = match self.network {
                Network::PerLinkFifo => !matches!(prev, Some((link, _)) if link == x.0),
                Network::Unordered => prev != Some(*x),
            };
            if next {
                actions.push(Action::Deliver(x.1));
            }
            prev = Some(*x);
        }
        for n in 0..N as Node {
            for p in 0..P as Page {
                if s.unprotected[usize::from(n)][usize::from(p)].is_some() {
                    actions.push(Action::Protect(n, p));
                }
            }
        }
    }

    fn next_state(&self, last: &State, action: Action) -> Option<State> {
        let mut s = last.clone();
        match action {
            Action::Start(n, p, a) => {
                s.vcpu[usize::from(n)].ops_left -= 1;
                self.access(&mut s, n, p, a);
            }
            Action::Retry(n) => {
                let (p, a) = s.vcpu[usize::from(n)].op.expect("enabled");
                self.access(&mut s, n, p, a);
                if s.vcpu[usize::from(n)].op.is_some() {
                    self.cover(Cov::RefaultAfterInstall);
                }
            }
            Action::Spurious(n, p, a) => {
                s.spurious_left -= 1;
                self.request(&mut s, n, p, a);
            }
            Action::Deliver(m) => {
                let link = self.link(&m);
                let at = match self.network {
                    Network::PerLinkFifo => s.net.partition_point(|(l, _)| *l < link),
                    Network::Unordered => s.net.binary_search(&(link, m)).expect("in flight"),
                };
                assert_eq!(s.net.remove(at), (link, m), "deliverable");
                self.deliver(&mut s, m);
            }
            Action::Protect(n, p) => {
                let (ni, pi) = (usize::from(n), usize::from(p));
                let down = s.unprotected[ni][pi].take().expect("enabled");
                s.local[ni][pi] = s.local[ni][pi].downgraded(down);
            }
        }
        Some(s)
    }

    fn properties(&self) -> Vec<Property<Self>> {
        vec![
            Property::always("single writer / multiple readers", |_, s| swmr(s)),
            Property::always("valid copies hold the last written value", |_, s| {
                values_current(s)
            }),
            Property::always("reads return the last written value", |_, s: &State| {
                !s.stale_read
            }),
            Property::always("handlers meet only states they handle", |_, s: &State| {
                s.error.is_none()
            }),
            Property::always(
                "directory matches local states when a page is idle",
                |_, s| directory_matches(s),
            ),
            Property::always(
                "empty network means no transaction in progress",
                |_, s: &State| !s.net.is_empty() || no_transaction(s),
            ),
            Property::always(
                "no deadlock: a stuck state has completed everything",
                |m, s: &State| {
                    // Any in-flight message can be delivered: only look closer
                    // when the network is empty.
                    !s.net.is_empty() || {
                        let mut actions = Vec::new();
                        m.actions(s, &mut actions);
                        !actions.is_empty() || all_done(s)
                    }
                },
            ),
            Property::sometimes("every operation completes", |_, s| all_done(s)),
            Property::eventually("every operation eventually completes", |_, s| all_done(s)),
        ]
    }
}

/// At most one `Exclusive` copy, and none `Shared` beside it.
fn swmr(s: &State) -> bool {
    (0..P).all(|p| {
        let exclusive = (0..N)
            .filter(|&n| matches!(s.local[n][p], Local::Exclusive(_)))
            .count();
        let shared = (0..N)
            .filter(|&n| matches!(s.local[n][p], Local::Shared(_)))
            .count();
        exclusive == 0 || (exclusive == 1 && shared == 0)
    })
}

/// Every installed copy holds the last written value. (A write updates the
/// writer's copy and the ghost in one step.)
fn values_current(s: &State) -> bool {
    (0..P).all(|p| (0..N).all(|n| s.local[n][p].value().unwrap_or(true)))
}

/// For every page with no transaction in progress and nothing but `Request`s
/// in flight, the directory says exactly who holds what.
fn directory_matches(s: &State) -> bool {
    (0..P).all(|p| {
        let d = &s.dir[p];
        let idle = d.busy.is_none()
            && s.net
                .iter()
                .all(|(_, m)| usize::from(m.page()) != p || matches!(m, Msg::Request { .. }));
        if !idle {
            return true;
        }
        (d.owner.is_none() || d.sharers == 0)
            && (0..N).all(|n| {
                let owner = d.owner == Some(n as Node);
                let sharer = d.sharers & (1 << n) != 0;
                match s.local[n][p] {
                    Local::Exclusive(_) => owner,
                    Local::Shared(_) => sharer,
                    Local::Invalid => !owner && !sharer,
                }
            })
    })
}

fn no_transaction(s: &State) -> bool {
    s.dir.iter().all(|d| d.busy.is_none() && d.queue.is_empty())
        && s.pending.iter().flatten().all(Option::is_none)
}

fn all_done(s: &State) -> bool {
    s.vcpu.iter().all(|v| v.ops_left == 0 && v.op.is_none())
        && s.net.is_empty()
        && no_transaction(s)
}

// ----- running the checks --------------------------------------------------

/// Operations per node in the main exhaustive run, and the bounds of the run
/// with a spurious (duplicate) fault. `cargo test --release` (what CI runs)
/// checks the full bounds; an unoptimized build checks smaller ones so that a
/// plain `cargo test` stays quick (stateright is about ten times slower
/// unoptimized).
const MAIN_OPS: [u8; N] = if cfg!(debug_assertions) {
    [2, 1, 1]
} else {
    [2, 2, 2]
};
const SPURIOUS_OPS: [u8; N] = if cfg!(debug_assertions) {
    [1, 1, 0]
} else {
    [1, 1, 1]
};
/// Bounds of the check of the variant without direct grants over an
/// unordered network.
const UNORDERED_RUNS: [([u8; N], u8); 2] = [(MAIN_OPS, 0), (SPURIOUS_OPS, 1)];
/// Bounds of the explicit-state check that completion stays reachable.
const LIVENESS_RUNS: [([u8; N], u8); 2] = [([2, 1, 1], 0), ([1, 1, 0], 1)];

/// Runs the stateright checker over the whole state space (or until
/// `finish_when` holds) and returns it.
fn explore(model: Dsm, finish_when: HasDiscoveries, bfs: bool) -> Box<dyn Checker<Dsm>> {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let builder = model.checker().threads(threads).finish_when(finish_when);
    if bfs {
        Box::new(builder.spawn_bfs().join())
    } else {
        Box::new(builder.spawn_dfs().join())
    }
}

/// Formats a counterexample: the actions from the initial state, then the
/// state reached.
fn trace(path: stateright::Path<State, Action>) -> String {
    let last = format!("{:?}", path.last_state());
    let mut out = String::new();
    for (i, action) in path.into_actions().into_iter().enumerate() {
        out += &format!("  {i:3}. {action:?}\n");
    }
    out + "  reaching " + &last
}

/// Checks `model` exhaustively; panics with a counterexample on any
/// violation. Returns the situations covered.
fn check(model: Dsm) -> BTreeSet<Cov> {
    let started = Instant::now();
    let what = model.describe();
    let checker = explore(model, HasDiscoveries::All, false);
    println!(
        "{what}: {} states explored ({} transitions), {:.1?}",
        checker.unique_state_count(),
        checker.state_count(),
        started.elapsed()
    );
    assert!(checker.is_done(), "the exploration must be exhaustive");
    let discoveries = checker.discoveries();
    for property in checker.model().properties() {
        let found = discoveries.get(property.name);
        match property.expectation {
            Expectation::Always | Expectation::Eventually => {
                if let Some(path) = found {
                    panic!(
                        "{what}: property {:?} violated; counterexample:\n{}",
                        property.name,
                        trace(path.clone())
                    );
                }
            }
            Expectation::Sometimes => {
                assert!(found.is_some(), "{what}: {:?} never happens", property.name);
            }
        }
    }
    checker.model().covered()
}

/// Explicit-state check that from *every* reachable state a state where every
/// operation completed is still reachable: no deadlock and no trap the
/// protocol cannot leave (stateright's `eventually` only looks at paths that
/// end, not at cycles). Returns the number of states.
fn check_completion_always_reachable(model: Dsm) -> usize {
    let mut ids: HashMap<State, usize> = HashMap::new();
    let mut states = Vec::new();
    let mut predecessors: Vec<Vec<usize>> = Vec::new();
    for s in model.init_states() {
        ids.insert(s.clone(), states.len());
        states.push(s);
        predecessors.push(Vec::new());
    }
    let mut i = 0;
    while i < states.len() {
        for next in model.next_states(&states[i]) {
            let id = *ids.entry(next).or_insert_with_key(|next| {
                states.push(next.clone());
                predecessors.push(Vec::new());
                states.len() - 1
            });
            predecessors[id].push(i);
        }
        i += 1;
    }
    // Walk back from the completed states.
    let mut can_complete = vec![false; states.len()];
    let mut stack: Vec<usize> = (0..states.len())
        .filter(|&i| all_done(&states[i]))
        .collect();
    for &i in &stack {
        can_complete[i] = true;
    }
    while let Some(i) = stack.pop() {
        for &pred in &predecessors[i] {
            if !can_complete[pred] {
                can_complete[pred] = true;
                stack.push(pred);
            }
        }
    }
    if let Some(stuck) = can_complete.iter().position(|ok| !ok) {
        panic!(
            "{}: no completion is reachable from this reachable state: {:?}",
            model.describe(),
            states[stuck]
        );
    }
    println!(
        "{}: completion reachable from all {} states",
        model.describe(),
        states.len()
    );
    states.len()
}

/// All the checks for one assignment of homes.
fn check_homes(homes: [Node; P]) {
    let started = Instant::now();
    // The protocol as specified.
    let mut covered = check(Dsm::new(homes, MAIN_OPS, 0, None));
    covered.extend(check(Dsm::new(homes, SPURIOUS_OPS, 1, None)));
    let missing: Vec<_> = ALL_COV.iter().filter(|c| !covered.contains(c)).collect();
    assert!(
        missing.is_empty(),
        "situations never exercised: {missing:?}"
    );
    for (ops, spurious) in LIVENESS_RUNS {
        check_completion_always_reachable(Dsm::new(homes, ops, spurious, None));
    }
    // Without direct grants the protocol needs no order from the network.
    for (ops, spurious) in UNORDERED_RUNS {
        check(Dsm::new(homes, ops, spurious, None).always_done_unordered());
    }
    println!(
        "homes {homes:?}: all checks passed in {:.1?}",
        started.elapsed()
    );
}

#[test]
fn protocol_both_pages_homed_at_origin() {
    check_homes([0, 0]);
}

#[test]
fn protocol_page_1_homed_at_node_2() {
    check_homes([0, 2]);
}

#[test]
fn protocol_origin_page_homed_elsewhere() {
    // Page 0 is owned by the origin (node 0) but homed at node 1.
    check_homes([1, 2]);
}

// ----- negative controls -----------------------------------------------------

/// Runs a broken variant and asserts that the checker finds a violation of
/// `property`; prints the counterexample.
fn assert_caught(model: Dsm, property: &'static str) {
    let started = Instant::now();
    let what = model.describe();
    let bug = model
        .bug
        .map_or("the unbroken protocol".to_string(), |b| format!("{b:?}"));
    let checker = explore(
        model,
        HasDiscoveries::AnyOf(BTreeSet::from([property])),
        true,
    );
    let Some(path) = checker.discovery(property) else {
        panic!(
            "the checker missed the broken variant {bug} ({what}): no violation of {property:?}"
        );
    };
    println!(
        "{bug} ({what}) violates {property:?} (found after {} states, {:.1?}); counterexample:\n{}",
        checker.unique_state_count(),
        started.elapsed(),
        trace(path)
    );
}

/// The broken variants run with every node doing two operations.
fn broken(bug: Bug, homes: [Node; P]) -> Dsm {
    Dsm::new(homes, [2, 2, 2], 0, Some(bug))
}

#[test]
fn negative_control_install_without_invacks() {
    assert_caught(
        broken(Bug::InstallWithoutInvAcks, [0, 2]),
        "single writer / multiple readers",
    );
}

#[test]
fn negative_control_send_before_write_protect() {
    assert_caught(
        broken(Bug::SendBeforeProtect, [1, 2]),
        "reads return the last written value",
    );
}

#[test]
fn negative_control_no_busy_flag() {
    assert_caught(
        broken(Bug::NoBusy, [0, 0]),
        "single writer / multiple readers",
    );
}

#[test]
fn negative_control_queue_stalls() {
    assert_caught(
        broken(Bug::QueueStallsOnDone, [0, 2]),
        "no deadlock: a stuck state has completed everything",
    );
}

/// Direct grants rely on each link keeping its order: over a network that
/// reorders a link, a `Fetch` or `Invalidate` of a later transaction can
/// overtake the grant.
#[test]
fn negative_control_direct_grants_need_link_order() {
    assert_caught(
        Dsm::new([0, 2], [2, 2, 2], 0, None).unordered(),
        "handlers meet only states they handle",
    );
}
