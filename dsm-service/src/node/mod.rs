//! [`DsmNode`]: one node of the DSM — the userfaultfd engine, the coherence
//! protocol and a transport, wired together in one process.
//!
//! The node's roles, one file each, all working on one [`NodeCore`]:
//!
//! | file | role |
//! |---|---|
//! | `fault.rs` | fault intake (`fv-uffd-K`) and sequential read-ahead |
//! | `engine.rs` | frame dispatch; carries out the home's decisions |
//! | `directory.rs` | the home: per-page directory, busy flag, queue, decisions |
//! | `requester.rs` | grants, acknowledgements, install, `Done`, upgrades |
//! | `supplier.rs` | supply, fetch, invalidate, discard |
//! | `control.rs` | start-up state and barriers (typed control messages) |
//! | `outbox.rs` | per-batch message buffers; returns failed sends |
//! | `pages.rs` | this node's page states, outstanding requests, fault counts |
//! | `peers.rs` | which peers are alive, left or failed |
//!
//! Dependencies go one way: the directory decides and never acts; the
//! engine carries its decisions out through the supplier and requester; the
//! outbox only sends.
//!
//! Threads: `fv-uffd-K` runs [`fault.rs`](fault); the transport's receive
//! threads run the engine's `on_frame`. Nothing here ever blocks on a vCPU,
//! QEMU's big lock or RCU — a vCPU blocked in a fault may hold those
//! (DESIGN.md §3).
//!
//! Locks: per-page state lives in sharded mutexes, one set for the home's
//! directory and one for this node's pages; a thread may take a page's
//! directory lock and then its local lock, never the other way round.

pub mod control;
mod directory;
mod engine;
mod fault;
mod outbox;
mod pages;
mod peers;
mod requester;
mod supplier;
#[cfg(test)]
mod tests;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::thread::JoinHandle;
use std::time::Duration;

use tracing::{error, info};

use crate::cluster::{ClusterConfig, ConfigError};
use crate::coherence::LocalState;
use crate::home::HomeMap;
use crate::space::{AddressSpace, SpaceError};
use crate::stats::{Stats, StatsSnapshot};
use crate::transport::{FrameSink, PeerDown, SharedTransport, TransportError};
use crate::uffd::{self, Uffd, UffdError};
use crate::NodeId;

use control::ControlState;
use directory::HomeDirectory;
use fault::Stream;
use pages::{FaultCounts, LocalPages};
use peers::{PeerState, Peers};

/// Called with `(host address, length)` after this node dropped or replaced
/// the contents of local pages (QEMU's TCG uses it to drop translated code).
pub type PageChangeHook = Arc<dyn Fn(u64, u64) + Send + Sync>;
/// Receives application frames (channels >= [`crate::transport::channel::APP_BASE`]
/// and [`crate::transport::channel::BENCH`]).
pub type AppHandler = Arc<dyn Fn(NodeId, u8, &[u8]) + Send + Sync>;

/// Which transport to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TransportKind {
    /// TCP (default).
    #[default]
    Tcp,
    /// RDMA verbs (feature `rdma`).
    Rdma,
}

/// Default [`DsmOptions::zero_run`]: 16 pages (64 KiB).
pub const DEFAULT_ZERO_RUN: u32 = 16;

/// The largest [`DsmOptions::zero_run`].
pub const MAX_ZERO_RUN: u32 = 64;

/// Options of a node beyond cluster membership.
#[derive(Clone)]
pub struct DsmOptions {
    /// Homes of the pages.
    pub homes: HomeMap,
    /// Most pages fetched ahead on a sequential read stream (0: no prefetch).
    pub prefetch_max: u32,
    /// Most pages a first touch of an unowned page homed here takes at once
    /// (the zero run; 1: none but the faulting page). See PROTOCOL.md.
    pub zero_run: u32,
    /// See [`PageChangeHook`].
    pub on_page_change: Option<PageChangeHook>,
    /// The transport.
    pub transport: TransportKind,
    /// Count the faults of each page, for [`DsmNode::hottest_pages`] (4
    /// bytes per page).
    pub count_page_faults: bool,
}

impl Default for DsmOptions {
    fn default() -> Self {
        DsmOptions {
            homes: HomeMap::all_on(0),
            prefetch_max: 64,
            zero_run: DEFAULT_ZERO_RUN,
            on_page_change: None,
            transport: TransportKind::Tcp,
            count_page_faults: false,
        }
    }
}

impl std::fmt::Debug for DsmOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DsmOptions")
            .field("homes", &self.homes)
            .field("prefetch_max", &self.prefetch_max)
            .field("zero_run", &self.zero_run)
            .field("transport", &self.transport)
            .field("count_page_faults", &self.count_page_faults)
            .finish()
    }
}

/// Something the application must know about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DsmEvent {
    /// A peer failed; faults that need it cannot be served.
    PeerFailed {
        /// The node.
        node: NodeId,
        /// Why.
        reason: String,
    },
    /// A peer left cleanly.
    PeerLeft {
        /// The node.
        node: NodeId,
    },
    /// A peer broke the protocol (malformed frame, impossible message); its
    /// frame was dropped.
    ProtocolError {
        /// The node.
        node: NodeId,
        /// What it did.
        what: String,
    },
    /// A local operation failed; memory may no longer be coherent.
    Fatal(String),
}

/// Errors of a DSM node.
#[derive(Debug, thiserror::Error)]
pub enum DsmError {
    /// Bad cluster description.
    #[error("invalid cluster configuration")]
    Config(#[from] ConfigError),
    /// Bad region.
    #[error("invalid region")]
    Space(#[from] SpaceError),
    /// userfaultfd failed.
    #[error("userfaultfd")]
    Uffd(#[from] UffdError),
    /// The transport failed.
    #[error("transport")]
    Transport(#[from] TransportError),
    /// A home outside the cluster.
    #[error("the home map names node {0}, outside the cluster")]
    BadHome(NodeId),
    /// A peer failed while we waited for it.
    #[error("node {node} failed: {reason}")]
    PeerFailed {
        /// The node.
        node: NodeId,
        /// Why.
        reason: String,
    },
    /// Start-up did not complete.
    #[error("timed out after {0:?} waiting for the origin's start-up state")]
    StartTimeout(Duration),
    /// Other I/O.
    #[error("{what}")]
    Io {
        /// What failed.
        what: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
}

/// One node of the DSM.
pub struct DsmNode {
    core: Arc<NodeCore>,
    uffd_thread: Mutex<Option<JoinHandle<()>>>,
    stop: Arc<AtomicBool>,
}

impl std::fmt::Debug for DsmNode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DsmNode")
            .field("node", &self.core.me)
            .finish()
    }
}

/// What every role of a node works on: the registered memory, this node's
/// page states, the home directory, the transport, membership and counters.
pub(crate) struct NodeCore {
    me: NodeId,
    nodes: usize,
    space: AddressSpace,
    homes: HomeMap,
    uffd: Uffd,
    pages: LocalPages,
    dir: HomeDirectory,
    transport: OnceLock<SharedTransport>,
    stats: Stats,
    events: Mutex<Sender<DsmEvent>>,
    events_rx: Mutex<Option<Receiver<DsmEvent>>>,
    peers: Peers,
    control: ControlState,
    stream: Mutex<Stream>,
    prefetch_max: u64,
    zero_run: u64,
    on_page_change: Option<PageChangeHook>,
    app: RwLock<Option<AppHandler>>,
    /// Faults of each page, when counted ([`DsmOptions::count_page_faults`]).
    page_faults: Option<FaultCounts>,
}

/// What a node joins with (checked against every peer at the handshake):
/// each region's name and size, then the application's part.
fn join_layout(regions: &[(&str, u64, u64)], app: &str) -> String {
    let ram: Vec<String> = regions
        .iter()
        .map(|&(name, _, len)| match len {
            l if l % (1 << 20) == 0 => format!("{name} {} MiB", l >> 20),
            l => format!("{name} {l} B"),
        })
        .collect();
    let mut s = format!("ram: {}", ram.join(", "));
    if !app.is_empty() {
        s.push_str("; ");
        s.push_str(app);
    }
    s
}

impl DsmNode {
    /// Registers `regions` (`(name, host address, length)`, the same list on
    /// every node), joins the cluster, takes the origin's start-up state and
    /// returns once every node is ready. On the origin (node 0) the pages
    /// already written are kept; on every other node they are discarded.
    pub fn start(
        cfg: &ClusterConfig,
        regions: &[(&str, u64, u64)],
        opts: DsmOptions,
    ) -> Result<DsmNode, DsmError> {
        cfg.validate()?;
        if usize::from(opts.homes.max_node()) >= cfg.nodes() {
            return Err(DsmError::BadHome(opts.homes.max_node()));
        }
        let mut space = AddressSpace::default();
        for &(name, base, len) in regions {
            space.add(name, base, len)?;
        }
        let me = cfg.node_id;
        let origin = me == 0;
        let (uffd, touched) = register(&space, origin)?;
        let kind = opts.transport;
        let core = Arc::new(NodeCore::new(me, cfg.nodes(), space, uffd, opts));
        let runs = if origin {
            let runs = pages::runs(&touched);
            core.apply_touched(&runs, true);
            runs
        } else {
            Vec::new()
        };
        let mut cfg = cfg.clone();
        cfg.layout = join_layout(regions, &cfg.layout);
        let cfg = &cfg;
        let _ = core.transport.set(connect(kind, cfg, core.clone())?);
        if origin {
            core.send_touched(&runs)?;
        } else {
            core.wait_touched(cfg.connect_timeout)?;
        }
        let stop = Arc::new(AtomicBool::new(false));
        let uffd_thread = {
            let core = core.clone();
            let stop = stop.clone();
            std::thread::Builder::new()
                .name(format!("fv-uffd-{me}"))
                .spawn(move || core.fault_loop(&stop))
                .map_err(|source| DsmError::Io {
                    what: "spawning the fault thread".into(),
                    source,
                })?
        };
        let node = DsmNode {
            core,
            uffd_thread: Mutex::new(Some(uffd_thread)),
            stop,
        };
        node.barrier()?;
        info!(node = me, pages = node.core.space.pages(), "DSM node ready");
        Ok(node)
    }

    /// This node's id.
    pub fn id(&self) -> NodeId {
        self.core.me
    }

    /// Cluster size.
    pub fn nodes(&self) -> usize {
        self.core.nodes
    }

    /// The registered address space.
    pub fn space(&self) -> &AddressSpace {
        &self.core.space
    }

    /// A copy of the statistics.
    pub fn stats(&self) -> StatsSnapshot {
        self.core.stats.snapshot()
    }

    /// The event stream (once; later calls get `None`).
    pub fn take_events(&self) -> Option<Receiver<DsmEvent>> {
        self.core.events_rx.lock().expect("lock").take()
    }

    /// This node's state for a page.
    pub fn local_state(&self, page: u64) -> LocalState {
        self.core.pages.state(page)
    }

    /// The `n` pages with the most faults on this node, as `(host address,
    /// faults)`, most first; empty unless
    /// [`DsmOptions::count_page_faults`] was set.
    pub fn hottest_pages(&self, n: usize) -> Vec<(u64, u32)> {
        let Some(counts) = &self.core.page_faults else {
            return Vec::new();
        };
        counts
            .hottest(n)
            .into_iter()
            .map(|(page, c)| (self.core.space.addr_of(page), c))
            .collect()
    }

    /// A human-readable dump of the transactions in progress: this node's
    /// outstanding requests and, as a home, its busy pages and their queues.
    /// For diagnosing a stuck cluster (`fragvisor-dsm` prints it on SIGUSR1).
    pub fn dump_state(&self) -> String {
        self.core.dump_state()
    }

    /// Waits until every node has called `barrier` the same number of times.
    pub fn barrier(&self) -> Result<(), DsmError> {
        self.core.barrier()
    }

    /// Sets the receiver of application frames.
    pub fn set_app_handler(&self, h: AppHandler) {
        *self.core.app.write().expect("lock") = Some(h);
    }

    /// Sends an application frame.
    pub fn send_app(&self, to: NodeId, ch: u8, payload: &[u8]) -> Result<(), TransportError> {
        self.core.transport().send(to, ch, payload)
    }

    /// Says goodbye to every live peer (and drains what is queued to them,
    /// up to 2 s) without stopping the fault thread, which may be blocked
    /// on a page of a failed peer. For a node about to exit because a peer
    /// failed: the others then see it leave, not fail, and name the peer
    /// that really failed.
    pub fn leave_peers(&self) {
        if let Some(t) = self.core.transport.get() {
            t.shutdown();
        }
    }

    /// Stops the fault thread and leaves the cluster cleanly. The regions
    /// stay registered: a touch of a page this node does not hold blocks
    /// rather than reading stale or zero memory.
    pub fn shutdown(&self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.uffd_thread.lock().expect("lock").take() {
            let _ = t.join();
        }
        if let Some(t) = self.core.transport.get() {
            t.shutdown();
        }
    }
}

impl Drop for DsmNode {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Prepares the regions of `space` for the DSM and registers them with a new
/// userfaultfd. On the origin, returns which pages are already written
/// (`mincore`); every other node discards its local copy.
fn register(space: &AddressSpace, origin: bool) -> Result<(Uffd, Vec<bool>), DsmError> {
    let uffd = Uffd::new()?;
    let mut touched = Vec::new();
    for r in space.regions() {
        // SAFETY: the caller handed us these mappings for the DSM's use;
        // disabling THP on them does not change their contents.
        unsafe {
            libc::madvise(
                r.base as *mut libc::c_void,
                r.len as usize,
                libc::MADV_NOHUGEPAGE,
            )
        };
        if origin {
            let res = uffd::resident_pages(r.base, r.len).map_err(|source| DsmError::Io {
                what: format!("mincore on region {}", r.name),
                source,
            })?;
            touched.extend(res);
        } else {
            // SAFETY: non-origin nodes start with no copy of any page: the
            // local contents are discarded by design (DESIGN.md §3).
            unsafe { uffd::discard(r.base, r.len) }.map_err(|source| DsmError::Io {
                what: format!("discarding region {}", r.name),
                source,
            })?;
        }
        uffd.register(r.base, r.len)?;
    }
    Ok((uffd, touched))
}

/// Connects the transport of `kind`, delivering to `sink`.
fn connect(
    kind: TransportKind,
    cfg: &ClusterConfig,
    sink: Arc<dyn FrameSink>,
) -> Result<SharedTransport, DsmError> {
    Ok(match kind {
        TransportKind::Tcp => crate::transport::tcp::TcpTransport::connect(cfg, sink)?,
        #[cfg(feature = "rdma")]
        TransportKind::Rdma => crate::transport::rdma::RdmaTransport::connect(cfg, sink)?,
        #[cfg(not(feature = "rdma"))]
        TransportKind::Rdma => {
            return Err(
                TransportError::Unavailable("built without the `rdma` feature".into()).into(),
            )
        }
    })
}

impl NodeCore {
    /// A node over registered `space`, before it joins: every page Invalid,
    /// every directory entry unowned, no transport yet.
    fn new(me: NodeId, nodes: usize, space: AddressSpace, uffd: Uffd, opts: DsmOptions) -> Self {
        let pages = space.pages();
        let (tx, rx) = mpsc::channel();
        NodeCore {
            me,
            nodes,
            homes: opts.homes,
            uffd,
            pages: LocalPages::new(pages),
            dir: HomeDirectory::new(me, nodes, pages),
            transport: OnceLock::new(),
            stats: Stats::default(),
            events: Mutex::new(tx),
            events_rx: Mutex::new(Some(rx)),
            peers: Peers::new(nodes),
            control: ControlState::new(me == 0),
            stream: Mutex::new(Stream::default()),
            prefetch_max: u64::from(opts.prefetch_max),
            zero_run: u64::from(opts.zero_run.clamp(1, MAX_ZERO_RUN)),
            on_page_change: opts.on_page_change,
            app: RwLock::new(None),
            page_faults: opts.count_page_faults.then(|| FaultCounts::new(pages)),
            space,
        }
    }

    fn transport(&self) -> &SharedTransport {
        self.transport
            .get()
            .expect("transport is set before any use")
    }

    fn event(&self, e: DsmEvent) {
        let _ = self.events.lock().expect("lock").send(e);
    }

    fn fatal(&self, what: String) {
        error!(node = self.me, "{what}");
        self.event(DsmEvent::Fatal(what));
    }

    /// Local contents of `len` bytes at `addr` were dropped or replaced.
    fn page_changed(&self, addr: u64, len: u64) {
        if let Some(h) = &self.on_page_change {
            h(addr, len);
        }
    }

    /// A node id taken from a message must name a node of the cluster.
    fn check_node(&self, r: NodeId) -> Result<(), String> {
        if usize::from(r) >= self.nodes {
            return Err(format!("requester {r} is not in the cluster"));
        }
        Ok(())
    }

    /// Marks the origin's touched pages: owned by node 0 in the directory,
    /// Exclusive at the origin itself.
    fn apply_touched(&self, runs: &[(u64, u64)], origin: bool) {
        for &(first, count) in runs {
            for page in first..first + count {
                self.dir.set_owned_by_origin(page);
                if origin {
                    self.pages.set_state(page, LocalState::Exclusive);
                }
            }
        }
    }

    /// `peer` went down: recorded once, reported as an event, and every
    /// waiter woken so it can fail naming the peer.
    fn peer_down(&self, peer: NodeId, why: PeerDown) {
        match self.peers.mark_down(peer, &why) {
            None => return,
            Some(PeerState::Left) => self.event(DsmEvent::PeerLeft { node: peer }),
            Some(_) => {
                let reason = why.to_string();
                error!(node = self.me, peer, %reason, "peer failed");
                self.event(DsmEvent::PeerFailed { node: peer, reason });
            }
        }
        self.control.notify();
    }

    fn dump_state(&self) -> String {
        use std::fmt::Write;
        let mut out = format!("node {} DSM state:\n", self.me);
        for (k, sh) in self.pages.shards() {
            for (page, p) in &sh.pending {
                let (_, i) = pages::shard(*page);
                let _ = writeln!(
                    out,
                    "  pending page {page} (shard {k}) home {} state {:?} prefetch {} grant {:?} acks {}/{} age {:?}",
                    self.homes.home(*page),
                    sh.state[i],
                    p.prefetch,
                    p.grant,
                    p.acks_got,
                    p.acks_needed,
                    p.t0.elapsed()
                );
            }
        }
        self.dir.dump(&mut out);
        out
    }
}
