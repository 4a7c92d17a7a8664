//! [`DsmNode`]: one node of the DSM — the userfaultfd engine, the coherence
//! protocol and a transport, wired together in one process.
//!
//! Threads:
//! * `fv-uffd-K` reads fault events, turns them into requests (batched per
//!   home, with sequential prefetch) and resolves home-local faults itself;
//! * the transport's receive threads run [`Engine::on_frame`]: the home's
//!   directory, suppliers, sharers and requesters all react to messages there;
//! * nothing here ever blocks on a vCPU, QEMU's big lock or RCU — a vCPU
//!   blocked in a fault may hold those (DESIGN.md §3).
//!
//! Locks: per-page state lives in sharded mutexes, one set for the home's
//! directory and one for this node's pages; a thread may take a page's
//! directory lock and then its local lock, never the other way round.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Condvar, Mutex, OnceLock, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tracing::{debug, error, info, warn};

use crate::cluster::{ClusterConfig, ConfigError};
use crate::coherence::messages::{decode_all, GrantData, Msg};
use crate::coherence::{bit, decide, Access, DataSource, DirState, LocalState};
use crate::home::HomeMap;
use crate::space::{AddressSpace, SpaceError};
use crate::stats::{Stats, StatsSnapshot};
use crate::transport::{channel, FrameSink, PeerDown, SharedTransport, TransportError};
use crate::uffd::{self, Fault, Uffd, UffdError, PAGE_SIZE};
use crate::NodeId;

const SHARDS: usize = 256;
/// An outgoing frame is sent once it grows past this.
const FLUSH_AT: usize = 1 << 20;
static ZERO_PAGE: [u8; PAGE_SIZE] = [0; PAGE_SIZE];

/// Called with `(host address, length)` after this node dropped or replaced
/// the contents of local pages (QEMU's TCG uses it to drop translated code).
pub type PageChangeHook = Arc<dyn Fn(u64, u64) + Send + Sync>;
/// Receives application frames (channels >= [`channel::APP_BASE`] and
/// [`channel::BENCH`]).
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

/// Options of a node beyond cluster membership.
#[derive(Clone)]
pub struct DsmOptions {
    /// Homes of the pages.
    pub homes: HomeMap,
    /// Most pages fetched ahead on a sequential read stream (0: no prefetch).
    pub prefetch_max: u32,
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
    engine: Arc<Engine>,
    uffd_thread: Mutex<Option<JoinHandle<()>>>,
    stop: Arc<AtomicBool>,
}

impl std::fmt::Debug for DsmNode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DsmNode")
            .field("node", &self.engine.me)
            .finish()
    }
}

struct Pending {
    prefetch: bool,
    /// A write fault arrived while this request was outstanding; if the
    /// grant is only Shared, the writer needs an upgrade (its fault event is
    /// consumed, so nobody else would ask).
    want_write: bool,
    t0: Instant,
    grant: Option<(LocalState, u8)>,
    acks_needed: u16,
    acks_got: u16,
    data: Option<Box<[u8]>>,
}

const GRANT_NONE: u8 = 0;
const GRANT_ZERO: u8 = 1;
const GRANT_DATA: u8 = 2;

struct LocalShard {
    state: Vec<u8>,
    pending: HashMap<u64, Pending>,
}

#[derive(Default)]
struct DirEntry {
    dir: DirState,
    busy: Option<NodeId>,
    /// Boxed so that an entry stays small: there is one per page, and few
    /// pages ever have a queue.
    #[allow(clippy::box_collection)]
    queue: Option<Box<VecDeque<(NodeId, Access)>>>,
}

struct Control {
    touched_done: bool,
    entered: HashMap<u64, u64>,
    released: u64,
}

#[derive(Default)]
struct Stream {
    /// First page after the stream's last requested page.
    next: u64,
    /// Pages per batch (0: no stream).
    window: u64,
    /// First page of the last batch requested.
    batch_start: u64,
    /// The last page a thread of this node waited for in the stream.
    last_demand: u64,
}

/// How far (in pages) a sequential stream may run ahead of the last page a
/// thread waited for.
const LOOKAHEAD_BATCHES: u64 = 16;

const PEER_ALIVE: u8 = 0;
const PEER_LEFT: u8 = 1;
const PEER_FAILED: u8 = 2;

pub(crate) struct Engine {
    me: NodeId,
    nodes: usize,
    space: AddressSpace,
    homes: HomeMap,
    uffd: Uffd,
    local: Vec<Mutex<LocalShard>>,
    dir: Vec<Mutex<Vec<DirEntry>>>,
    transport: OnceLock<SharedTransport>,
    stats: Stats,
    events: Mutex<Sender<DsmEvent>>,
    events_rx: Mutex<Option<Receiver<DsmEvent>>>,
    peers: Vec<AtomicU8>,
    peer_reason: Mutex<Vec<String>>,
    control: Mutex<Control>,
    control_cv: Condvar,
    barrier_gen: AtomicU64,
    stream: Mutex<Stream>,
    prefetch_max: u64,
    on_page_change: Option<PageChangeHook>,
    app: RwLock<Option<AppHandler>>,
    /// Faults of each page, when counted ([`DsmOptions::count_page_faults`]).
    page_faults: Option<Box<[AtomicU32]>>,
}

/// Messages gathered while handling one batch, sent at the end.
struct Outbox {
    bufs: Vec<Vec<u8>>,
    local: VecDeque<Msg<'static>>,
    /// Direct grants `(requester, page)` waiting to be on the wire; their
    /// pages stay busy until then.
    direct: Vec<(NodeId, u64)>,
    /// Prefetched pages installed in this batch.
    landed: Vec<u64>,
}

fn shard(page: u64) -> (usize, usize) {
    (
        (page % SHARDS as u64) as usize,
        (page / SHARDS as u64) as usize,
    )
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
        let uffd = Uffd::new()?;
        let pages = space.pages();
        let me = cfg.node_id;
        let origin = me == 0;
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
        let per_shard = (pages as usize).div_ceil(SHARDS);
        let local = (0..SHARDS)
            .map(|_| {
                Mutex::new(LocalShard {
                    state: vec![LocalState::Invalid as u8; per_shard],
                    pending: HashMap::new(),
                })
            })
            .collect();
        let dir = (0..SHARDS)
            .map(|_| Mutex::new((0..per_shard).map(|_| DirEntry::default()).collect()))
            .collect();
        let (tx, rx) = mpsc::channel();
        let engine = Arc::new(Engine {
            me,
            nodes: cfg.nodes(),
            space,
            homes: opts.homes,
            uffd,
            local,
            dir,
            transport: OnceLock::new(),
            stats: Stats::default(),
            events: Mutex::new(tx),
            events_rx: Mutex::new(Some(rx)),
            peers: (0..cfg.nodes())
                .map(|_| AtomicU8::new(PEER_ALIVE))
                .collect(),
            peer_reason: Mutex::new(vec![String::new(); cfg.nodes()]),
            control: Mutex::new(Control {
                touched_done: origin,
                entered: HashMap::new(),
                released: 0,
            }),
            control_cv: Condvar::new(),
            barrier_gen: AtomicU64::new(0),
            stream: Mutex::new(Stream::default()),
            prefetch_max: u64::from(opts.prefetch_max),
            on_page_change: opts.on_page_change,
            app: RwLock::new(None),
            page_faults: opts
                .count_page_faults
                .then(|| (0..pages).map(|_| AtomicU32::new(0)).collect()),
        });
        let ranges = if origin {
            let ranges = runs(&touched);
            engine.apply_touched(&ranges, true);
            ranges
        } else {
            Vec::new()
        };
        let sink: Arc<dyn FrameSink> = engine.clone();
        let transport: SharedTransport = match opts.transport {
            TransportKind::Tcp => crate::transport::tcp::TcpTransport::connect(cfg, sink)?,
            #[cfg(feature = "rdma")]
            TransportKind::Rdma => crate::transport::rdma::RdmaTransport::connect(cfg, sink)?,
            #[cfg(not(feature = "rdma"))]
            TransportKind::Rdma => {
                return Err(
                    TransportError::Unavailable("built without the `rdma` feature".into()).into(),
                )
            }
        };
        let _ = engine.transport.set(transport);
        if origin {
            engine.send_touched(&ranges)?;
        } else {
            engine.wait_touched(cfg.connect_timeout)?;
        }
        let stop = Arc::new(AtomicBool::new(false));
        let uffd_thread = {
            let engine = engine.clone();
            let stop = stop.clone();
            std::thread::Builder::new()
                .name(format!("fv-uffd-{me}"))
                .spawn(move || engine.fault_loop(&stop))
                .map_err(|source| DsmError::Io {
                    what: "spawning the fault thread".into(),
                    source,
                })?
        };
        let node = DsmNode {
            engine,
            uffd_thread: Mutex::new(Some(uffd_thread)),
            stop,
        };
        node.barrier()?;
        info!(node = me, pages, "DSM node ready");
        Ok(node)
    }

    /// This node's id.
    pub fn id(&self) -> NodeId {
        self.engine.me
    }

    /// Cluster size.
    pub fn nodes(&self) -> usize {
        self.engine.nodes
    }

    /// The registered address space.
    pub fn space(&self) -> &AddressSpace {
        &self.engine.space
    }

    /// A copy of the statistics.
    pub fn stats(&self) -> StatsSnapshot {
        self.engine.stats.snapshot()
    }

    /// The event stream (once; later calls get `None`).
    pub fn take_events(&self) -> Option<Receiver<DsmEvent>> {
        self.engine.events_rx.lock().expect("lock").take()
    }

    /// This node's state for a page.
    pub fn local_state(&self, page: u64) -> LocalState {
        let (s, i) = shard(page);
        LocalState::from_u8(self.engine.local[s].lock().expect("lock").state[i])
    }

    /// A human-readable dump of the transactions in progress: this node's
    /// outstanding requests and, as a home, its busy pages and their queues.
    /// The `n` pages with the most faults on this node, as `(host address,
    /// faults)`, most first; empty unless
    /// [`DsmOptions::count_page_faults`] was set.
    pub fn hottest_pages(&self, n: usize) -> Vec<(u64, u32)> {
        let Some(counts) = &self.engine.page_faults else {
            return Vec::new();
        };
        let mut hot: Vec<(u64, u32)> = counts
            .iter()
            .enumerate()
            .map(|(page, c)| (page as u64, c.load(Ordering::Relaxed)))
            .filter(|&(_, c)| c > 0)
            .collect();
        hot.sort_unstable_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        hot.truncate(n);
        hot.into_iter()
            .map(|(page, c)| (self.engine.space.addr_of(page), c))
            .collect()
    }

    /// For diagnosing a stuck cluster (`fragvisor-dsm` prints it on SIGUSR1).
    pub fn dump_state(&self) -> String {
        use std::fmt::Write;
        let e = &self.engine;
        let mut out = format!("node {} DSM state:\n", e.me);
        for (k, sh) in e.local.iter().enumerate() {
            let sh = sh.lock().expect("lock");
            for (page, p) in &sh.pending {
                let i = (*page / SHARDS as u64) as usize;
                let _ = writeln!(
                    out,
                    "  pending page {page} (shard {k}) home {} state {:?} prefetch {} grant {:?} acks {}/{} age {:?}",
                    e.homes.home(*page),
                    LocalState::from_u8(sh.state[i]),
                    p.prefetch,
                    p.grant,
                    p.acks_got,
                    p.acks_needed,
                    p.t0.elapsed()
                );
            }
        }
        for (k, d) in e.dir.iter().enumerate() {
            let d = d.lock().expect("lock");
            for (i, ent) in d.iter().enumerate() {
                if ent.busy.is_some() || ent.queue.is_some() {
                    let page = (i * SHARDS + k) as u64;
                    let _ = writeln!(
                        out,
                        "  home page {page}: owner {:?} sharers {:#x} busy {:?} queue {:?}",
                        ent.dir.owner, ent.dir.sharers, ent.busy, ent.queue
                    );
                }
            }
        }
        out
    }

    /// Waits until every node has called `barrier` the same number of times.
    pub fn barrier(&self) -> Result<(), DsmError> {
        self.engine.barrier()
    }

    /// Sets the receiver of application frames.
    pub fn set_app_handler(&self, h: AppHandler) {
        *self.engine.app.write().expect("lock") = Some(h);
    }

    /// Sends an application frame.
    pub fn send_app(&self, to: NodeId, ch: u8, payload: &[u8]) -> Result<(), TransportError> {
        self.engine.transport().send(to, ch, payload)
    }

    /// Stops the fault thread and leaves the cluster cleanly. The regions
    /// stay registered: a touch of a page this node does not hold blocks
    /// rather than reading stale or zero memory.
    pub fn shutdown(&self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.uffd_thread.lock().expect("lock").take() {
            let _ = t.join();
        }
        if let Some(t) = self.engine.transport.get() {
            t.shutdown();
        }
    }
}

impl Drop for DsmNode {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Runs of `true` as `(first, count)`.
fn runs(bits: &[bool]) -> Vec<(u64, u64)> {
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

const CTL_TOUCHED: u8 = 1;
const CTL_BARRIER_ENTER: u8 = 2;
const CTL_BARRIER_RELEASE: u8 = 3;

impl Engine {
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

    // ----- start-up -------------------------------------------------------

    /// Marks the origin's touched pages: owned by node 0 in the directory,
    /// Exclusive at the origin itself.
    fn apply_touched(&self, ranges: &[(u64, u64)], origin: bool) {
        for &(first, count) in ranges {
            for page in first..first + count {
                let (s, i) = shard(page);
                if let Some(e) = self.dir[s].lock().expect("lock").get_mut(i) {
                    e.dir.owner = Some(0);
                }
                if origin {
                    self.local[s].lock().expect("lock").state[i] = LocalState::Exclusive as u8;
                }
            }
        }
    }

    fn send_touched(&self, ranges: &[(u64, u64)]) -> Result<(), DsmError> {
        let chunks: Vec<&[(u64, u64)]> = if ranges.is_empty() {
            vec![&[]]
        } else {
            ranges.chunks(32 * 1024).collect()
        };
        for peer in 1..self.nodes as NodeId {
            for (k, chunk) in chunks.iter().enumerate() {
                let mut b = vec![CTL_TOUCHED, u8::from(k + 1 == chunks.len())];
                for &(f, c) in chunk.iter() {
                    b.extend_from_slice(&f.to_le_bytes());
                    b.extend_from_slice(&c.to_le_bytes());
                }
                self.transport().send(peer, channel::DSM_CONTROL, &b)?;
            }
        }
        Ok(())
    }

    fn wait_touched(&self, timeout: Duration) -> Result<(), DsmError> {
        self.wait_control(
            |c| c.touched_done,
            Some((Instant::now() + timeout, timeout)),
        )
    }

    /// Waits until `done` holds for the control state, failing as soon as a
    /// peer is gone or at the deadline (with the timeout it came from).
    fn wait_control(
        &self,
        done: impl Fn(&Control) -> bool,
        deadline: Option<(Instant, Duration)>,
    ) -> Result<(), DsmError> {
        let mut c = self.control.lock().expect("lock");
        while !done(&c) {
            self.check_peers()?;
            if let Some((at, timeout)) = deadline {
                if Instant::now() >= at {
                    return Err(DsmError::StartTimeout(timeout));
                }
            }
            c = self
                .control_cv
                .wait_timeout(c, Duration::from_millis(50))
                .expect("lock")
                .0;
        }
        Ok(())
    }

    fn check_peers(&self) -> Result<(), DsmError> {
        for (n, p) in self.peers.iter().enumerate() {
            let s = p.load(Ordering::Acquire);
            if s != PEER_ALIVE {
                let reason = if s == PEER_LEFT {
                    "left the cluster".to_string()
                } else {
                    self.peer_reason.lock().expect("lock")[n].clone()
                };
                return Err(DsmError::PeerFailed {
                    node: n as NodeId,
                    reason,
                });
            }
        }
        Ok(())
    }

    fn barrier(&self) -> Result<(), DsmError> {
        let gen = self.barrier_gen.fetch_add(1, Ordering::AcqRel) + 1;
        if self.me == 0 {
            self.barrier_enter(0, gen);
        } else {
            let mut b = vec![CTL_BARRIER_ENTER];
            b.extend_from_slice(&gen.to_le_bytes());
            self.transport().send(0, channel::DSM_CONTROL, &b)?;
        }
        self.wait_control(|c| c.released >= gen, None)
    }

    fn barrier_enter(&self, from: NodeId, gen: u64) {
        let all = if self.nodes == 64 {
            u64::MAX
        } else {
            (1u64 << self.nodes) - 1
        };
        let mut c = self.control.lock().expect("lock");
        let m = c.entered.entry(gen).or_insert(0);
        *m |= bit(from);
        if *m == all {
            c.entered.remove(&gen);
            c.released = c.released.max(gen);
            drop(c);
            let mut b = vec![CTL_BARRIER_RELEASE];
            b.extend_from_slice(&gen.to_le_bytes());
            for peer in 1..self.nodes as NodeId {
                let _ = self.transport().send(peer, channel::DSM_CONTROL, &b);
            }
            self.control_cv.notify_all();
        }
    }

    fn on_control(&self, from: NodeId, p: &[u8]) -> Result<(), String> {
        let u64_at = |i: usize| -> Result<u64, String> {
            p.get(i..i + 8)
                .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")))
                .ok_or_else(|| format!("control message of {} bytes is truncated", p.len()))
        };
        match p.first() {
            Some(&CTL_TOUCHED) if from == 0 && p.len() >= 2 && (p.len() - 2).is_multiple_of(16) => {
                let ranges: Vec<(u64, u64)> = p[2..]
                    .chunks_exact(16)
                    .map(|c| {
                        (
                            u64::from_le_bytes(c[..8].try_into().expect("8")),
                            u64::from_le_bytes(c[8..].try_into().expect("8")),
                        )
                    })
                    .collect();
                let pages = self.space.pages();
                if ranges
                    .iter()
                    .any(|&(f, c)| f.checked_add(c).is_none_or(|e| e > pages))
                {
                    return Err("start-up state names pages outside the registered regions".into());
                }
                self.apply_touched(&ranges, false);
                if p[1] == 1 {
                    self.control.lock().expect("lock").touched_done = true;
                    self.control_cv.notify_all();
                }
                Ok(())
            }
            Some(&CTL_BARRIER_ENTER) if self.me == 0 => {
                self.barrier_enter(from, u64_at(1)?);
                Ok(())
            }
            Some(&CTL_BARRIER_RELEASE) if from == 0 => {
                let gen = u64_at(1)?;
                let mut c = self.control.lock().expect("lock");
                c.released = c.released.max(gen);
                drop(c);
                self.control_cv.notify_all();
                Ok(())
            }
            _ => Err(format!("unexpected control message {:?}", p.first())),
        }
    }

    // ----- faults -----------------------------------------------------------

    fn fault_loop(&self, stop: &AtomicBool) {
        use std::os::fd::AsRawFd;
        let mut faults = Vec::with_capacity(64);
        let mut out = Outbox::new(self.nodes);
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

    fn on_fault(&self, f: Fault, t0: Instant, out: &mut Outbox) {
        let Some(page) = self.space.page_of(f.addr) else {
            warn!(
                node = self.me,
                addr = f.addr,
                "fault outside the DSM regions"
            );
            return;
        };
        let write = f.write || f.wp;
        let (s, i) = shard(page);
        {
            let mut sh = self.local[s].lock().expect("lock");
            let st = LocalState::from_u8(sh.state[i]);
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
                    self.stream_demand(page);
                }
                return;
            }
            sh.pending.insert(page, Pending::new(false, t0));
            if let Some(c) = self.page_faults.as_ref().and_then(|c| c.get(page as usize)) {
                c.fetch_add(1, Ordering::Relaxed);
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
        if !write {
            self.prefetch_after(page, out);
        }
    }

    /// Sequential read streams. A read fault at the page right after the
    /// stream (or inside it) doubles the batch (up to `prefetch_max`) and
    /// requests the next batch; any other fault ends the stream. While the
    /// stream is on, each batch that lands requests the next one
    /// ([`Engine::continue_stream`]), up to [`LOOKAHEAD_BATCHES`] batches
    /// ahead of the last page a thread waited for, so the transfer is
    /// pipelined rather than one round trip per batch.
    fn prefetch_after(&self, page: u64, out: &mut Outbox) {
        if self.prefetch_max == 0 {
            return;
        }
        let (start, window) = {
            let mut st = self.stream.lock().expect("lock");
            // Strictly forward: a page faulted again (a write or a spin
            // loop on a moving page) is no stream.
            let sequential =
                st.window > 0 && page > st.last_demand && page <= st.next || page == st.next;
            st.last_demand = page;
            if sequential {
                st.window = (st.window * 2).clamp(4, self.prefetch_max);
                let start = st.next.max(page + 1);
                st.batch_start = start;
                st.next = start + st.window;
                (start, st.window)
            } else {
                st.window = 0;
                st.next = page + 1;
                return;
            }
        };
        self.request_batch(page, start, window, out);
    }

    /// A thread waits for a page the stream already requested: the stream
    /// is being consumed, let it run further.
    fn stream_demand(&self, page: u64) {
        let mut st = self.stream.lock().expect("lock");
        if st.window > 0 && page > st.last_demand && page < st.next {
            st.last_demand = page;
        }
    }

    /// A prefetched page landed: when it is the first of the stream's last
    /// batch, request the next batch.
    fn continue_stream(&self, landed: u64, out: &mut Outbox) {
        let (start, window) = {
            let mut st = self.stream.lock().expect("lock");
            if st.window == 0
                || landed != st.batch_start
                || st.next > st.last_demand + LOOKAHEAD_BATCHES * st.window
            {
                return;
            }
            let start = st.next;
            st.batch_start = start;
            st.next = start + st.window;
            (start, st.window)
        };
        self.request_batch(landed, start, window, out);
    }

    fn request_batch(&self, anchor: u64, start: u64, window: u64, out: &mut Outbox) {
        let t0 = Instant::now();
        for q in start..start + window {
            if !self.space.same_region(anchor, q) {
                break;
            }
            let (s, i) = shard(q);
            {
                let mut sh = self.local[s].lock().expect("lock");
                if sh.state[i] != LocalState::Invalid as u8 || sh.pending.contains_key(&q) {
                    continue;
                }
                sh.pending.insert(q, Pending::new(true, t0));
            }
            Stats::bump(&self.stats.prefetched);
            self.request(q, false, true, out);
        }
    }

    fn request(&self, page: u64, write: bool, prefetch: bool, out: &mut Outbox) {
        let home = self.homes.home(page);
        let msg = Msg::Request {
            page,
            write,
            prefetch,
        };
        if home == self.me {
            out.local.push_back(msg);
        } else {
            self.emit(out, home, &msg);
        }
    }

    // ----- message handling ---------------------------------------------------

    fn emit(&self, out: &mut Outbox, to: NodeId, msg: &Msg<'_>) {
        let b = &mut out.bufs[usize::from(to)];
        msg.encode(b);
        if b.len() >= FLUSH_AT {
            let buf = std::mem::take(b);
            self.send_buf(to, &buf);
        }
    }

    fn send_buf(&self, to: NodeId, buf: &[u8]) {
        Stats::add(&self.stats.bytes_sent, buf.len() as u64);
        if let Err(e) = self.transport().send(to, channel::COHERENCE, buf) {
            // The peer is down; its failure is (or will be) reported through
            // on_peer_down. Nothing waits silently: the event names the node.
            debug!(node = self.me, peer = to, error = %e, "send failed");
            if self.peers[usize::from(to)].load(Ordering::Acquire) == PEER_ALIVE {
                self.peer_down(to, PeerDown::Disconnected(e.to_string()));
            }
        }
    }

    /// Handles the local messages, sends every buffered frame, then ends the
    /// direct-grant transactions those frames carried (which may start queued
    /// ones, so it repeats until nothing is left).
    fn flush(&self, out: &mut Outbox) {
        loop {
            self.run_local(out);
            for to in 0..self.nodes as NodeId {
                self.flush_to(out, to);
            }
            for q in std::mem::take(&mut out.landed) {
                self.continue_stream(q, out);
            }
            if out.direct.is_empty() && out.local.is_empty() && out.bufs.iter().all(Vec::is_empty) {
                break;
            }
            for (r, page) in std::mem::take(&mut out.direct) {
                if let Err(e) = self.on_done(r, page, out) {
                    self.fatal(format!("ending a direct grant failed: {e}"));
                }
            }
        }
    }

    fn flush_to(&self, out: &mut Outbox, to: NodeId) {
        let b = &mut out.bufs[usize::from(to)];
        if !b.is_empty() {
            let buf = std::mem::take(b);
            self.send_buf(to, &buf);
            let b = &mut out.bufs[usize::from(to)];
            *b = buf;
            b.clear();
        }
    }

    fn run_local(&self, out: &mut Outbox) {
        while let Some(m) = out.local.pop_front() {
            if let Err(e) = self.handle(self.me, m, out) {
                self.fatal(format!("local message failed: {e}"));
            }
        }
    }

    fn handle(&self, from: NodeId, m: Msg<'_>, out: &mut Outbox) -> Result<(), String> {
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
            Msg::GrantRun { mode, bytes, .. } => {
                let count = (bytes.len() / PAGE_SIZE) as u64;
                if page + count > self.space.pages()
                    || (page..page + count).any(|p| self.homes.home(p) != from)
                {
                    return Err(format!(
                        "grant run at page {page} from node {from}, which is not its home"
                    ));
                }
                if self.install_run(page, mode, bytes, out)? {
                    Ok(())
                } else {
                    self.grant_run_one_by_one(from, page, mode, bytes, out)
                }
            }
            Msg::InvAck { .. } => self.on_ack(page, None, out),
        }
    }

    fn check_requester(&self, r: NodeId) -> Result<(), String> {
        if usize::from(r) >= self.nodes {
            return Err(format!("requester {r} is not in the cluster"));
        }
        Ok(())
    }

    /// The home takes a request: run it now or queue it behind the page's
    /// transaction in progress.
    fn on_request(
        &self,
        r: NodeId,
        page: u64,
        write: bool,
        out: &mut Outbox,
    ) -> Result<(), String> {
        if self.homes.home(page) != self.me {
            return Err(format!(
                "request for page {page}, whose home is node {}",
                self.homes.home(page)
            ));
        }
        let access = if write { Access::Write } else { Access::Read };
        let (s, i) = shard(page);
        let mut dir = self.dir[s].lock().expect("lock");
        let e = &mut dir[i];
        if e.busy.is_none() && e.queue.is_none() {
            e.busy = Some(r);
            return self.run_transaction(page, e, r, access, out);
        }
        e.queue
            .get_or_insert_with(Default::default)
            .push_back((r, access));
        self.drain_queue(page, e, out)
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
        out: &mut Outbox,
    ) -> Result<u64, String> {
        // Claim: the directory takes the decision for each page and marks it
        // busy, so no other transaction touches it until the grant is sent.
        let mut claimed = 0;
        while claimed < n {
            let page = first + claimed;
            let (s, i) = shard(page);
            let mut dir = self.dir[s].lock().expect("lock");
            let e = &mut dir[i];
            let idle = e.busy.is_none() && e.queue.is_none();
            let held = self.local[s].lock().expect("lock").state[i] == LocalState::Exclusive as u8;
            if !idle || !held || e.dir.owner != Some(self.me) || r == self.me {
                break;
            }
            let plan = decide(&mut e.dir, self.me, r, Access::Read);
            debug_assert_eq!(plan.data, DataSource::Node(self.me));
            e.busy = Some(r);
            claimed += 1;
        }
        if claimed == 0 {
            return Ok(0);
        }
        let addr = self.space.addr_of(first);
        self.uffd
            .write_protect(addr, claimed * PAGE_SIZE as u64, true)
            .map_err(|e| e.to_string())?;
        for page in first..first + claimed {
            let (s, i) = shard(page);
            self.local[s].lock().expect("lock").state[i] = LocalState::Shared as u8;
            Self::note_direct(out, r, page, 0);
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
        self.emit(out, r, &run);
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
            .take(256)
            .enumerate()
            .take_while(|&(k, m)| {
                matches!(*m, Msg::Request { page, write: false, .. }
                    if page == first + k as u64 && page < self.space.pages()
                        && self.space.same_region(first, page) && self.homes.home(page) == self.me)
            })
            .count() as u64
    }

    fn on_done(&self, from: NodeId, page: u64, out: &mut Outbox) -> Result<(), String> {
        let (s, i) = shard(page);
        let mut dir = self.dir[s].lock().expect("lock");
        let e = &mut dir[i];
        if e.busy != Some(from) || self.homes.home(page) != self.me {
            return Err(format!(
                "done for page {page} from node {from}, which has no transaction on it"
            ));
        }
        e.busy = None;
        self.drain_queue(page, e, out)
    }

    /// Starts the next queued request of a page that is not busy.
    fn drain_queue(&self, page: u64, e: &mut DirEntry, out: &mut Outbox) -> Result<(), String> {
        let next = match e.busy {
            None => e.queue.as_mut().and_then(|q| q.pop_front()),
            Some(_) => None,
        };
        if e.queue.as_ref().is_some_and(|q| q.is_empty()) {
            e.queue = None;
        }
        if let Some((r, access)) = next {
            e.busy = Some(r);
            self.run_transaction(page, e, r, access, out)?;
        }
        Ok(())
    }

    /// The home's side of a transaction (PROTOCOL.md, "The home's decision").
    /// Called with the page's directory lock held.
    fn run_transaction(
        &self,
        page: u64,
        e: &mut DirEntry,
        r: NodeId,
        access: Access,
        out: &mut Outbox,
    ) -> Result<(), String> {
        self.check_requester(r)?;
        let plan = decide(&mut e.dir, self.me, r, access);
        Stats::bump(&self.stats.served);
        let mut acks: u16 = 0;
        let mut invalidate = plan.invalidate;
        while invalidate != 0 {
            let y = invalidate.trailing_zeros() as NodeId;
            invalidate &= invalidate - 1;
            if y == self.me {
                self.drop_local(page)?;
            } else {
                self.emit(out, y, &Msg::Invalidate { page, requester: r });
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
                Self::note_direct(out, r, page, acks);
                return Ok(());
            }
            DataSource::Node(x) => {
                self.emit(
                    out,
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
        if r == self.me {
            out.local.push_back(grant);
        } else {
            self.emit(out, r, &grant);
            Self::note_direct(out, r, page, acks);
        }
        Ok(())
    }

    /// A grant to remote `r` with `acks == 0` is *direct*: the requester
    /// sends no `Done`. The page stays busy until the grant is on the wire
    /// (see [`Engine::flush`]), so that whatever a later transaction sends
    /// `r` about this page — from any thread of this node — follows it on the
    /// link.
    fn note_direct(out: &mut Outbox, r: NodeId, page: u64, acks: u16) {
        if acks == 0 {
            out.direct.push((r, page));
        }
    }

    /// Supplies this node's copy of `page` to `to` in the message `make`
    /// builds around the bytes: write-protect, read, send, then drop if this
    /// node keeps nothing.
    fn supply(
        &self,
        page: u64,
        to: NodeId,
        keep: LocalState,
        out: &mut Outbox,
        make: impl FnOnce(&[u8]) -> Msg<'_>,
    ) -> Result<(), String> {
        let (s, i) = shard(page);
        let addr = self.space.addr_of(page);
        let mut sh = self.local[s].lock().expect("lock");
        let st = LocalState::from_u8(sh.state[i]);
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
        self.emit(out, to, &make(bytes));
        Stats::bump(&self.stats.pages_sent);
        if keep == LocalState::Invalid {
            self.discard(addr)?;
        }
        sh.state[i] = keep as u8;
        Ok(())
    }

    fn discard(&self, addr: u64) -> Result<(), String> {
        // SAFETY: the page belongs to a registered region and its contents
        // were sent on or are no longer valid; dropping it is the protocol's
        // invalidation.
        unsafe { uffd::discard(addr, PAGE_SIZE as u64) }
            .map_err(|e| format!("MADV_DONTNEED at {addr:#x}: {e}"))?;
        if let Some(h) = &self.on_page_change {
            h(addr, PAGE_SIZE as u64);
        }
        Ok(())
    }

    fn drop_local(&self, page: u64) -> Result<(), String> {
        let (s, i) = shard(page);
        let mut sh = self.local[s].lock().expect("lock");
        if sh.state[i] != LocalState::Invalid as u8 {
            self.discard(self.space.addr_of(page))?;
            sh.state[i] = LocalState::Invalid as u8;
        }
        Stats::bump(&self.stats.invalidations_received);
        Ok(())
    }

    fn on_fetch(
        &self,
        page: u64,
        requester: NodeId,
        keep: LocalState,
        out: &mut Outbox,
    ) -> Result<(), String> {
        self.check_requester(requester)?;
        if requester == self.me {
            return Err(format!("fetch of page {page} for this very node"));
        }
        self.supply(page, requester, keep, out, |bytes| Msg::Data {
            page,
            bytes,
        })
    }

    fn on_invalidate(&self, page: u64, requester: NodeId, out: &mut Outbox) -> Result<(), String> {
        self.check_requester(requester)?;
        self.drop_local(page)?;
        if requester == self.me {
            return Err(format!("invalidation of page {page} for this very node"));
        }
        self.emit(out, requester, &Msg::InvAck { page });
        Ok(())
    }

    fn on_grant(
        &self,
        page: u64,
        mode: LocalState,
        data: GrantData<'_>,
        acks: u16,
        out: &mut Outbox,
    ) -> Result<(), String> {
        let (s, i) = shard(page);
        let mut sh = self.local[s].lock().expect("lock");
        let p = sh
            .pending
            .get_mut(&page)
            .ok_or_else(|| format!("grant for page {page}, which this node did not request"))?;
        if p.grant.is_some() {
            return Err(format!("second grant for page {page}"));
        }
        let kind = match data {
            GrantData::None => GRANT_NONE,
            GrantData::Zero => GRANT_ZERO,
            GrantData::Inline(_) | GrantData::FromSupplier => GRANT_DATA,
        };
        p.grant = Some((mode, kind));
        p.acks_needed = acks;
        let inline = match data {
            GrantData::Inline(b) => Some(b),
            _ => None,
        };
        if p.acks_got < p.acks_needed {
            if let Some(b) = inline {
                p.data = Some(b.into());
            }
            return Ok(());
        }
        if kind == GRANT_DATA && inline.is_none() && p.data.is_none() {
            return Err(format!(
                "grant for page {page} promises data that never came"
            ));
        }
        self.complete(&mut sh, page, i, inline, out)
    }

    fn on_ack(&self, page: u64, bytes: Option<&[u8]>, out: &mut Outbox) -> Result<(), String> {
        let (s, i) = shard(page);
        let mut sh = self.local[s].lock().expect("lock");
        let p = sh
            .pending
            .get_mut(&page)
            .ok_or_else(|| format!("data/ack for page {page}, which this node did not request"))?;
        p.acks_got += 1;
        let ready = p.grant.is_some() && p.acks_got >= p.acks_needed;
        if !ready {
            if let Some(b) = bytes {
                p.data = Some(b.into());
            }
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
        out: &mut Outbox,
    ) -> Result<(), String> {
        let p = sh.pending.remove(&page).expect("checked by the caller");
        let (mode, kind) = p.grant.expect("checked by the caller");
        let addr = self.space.addr_of(page);
        let st = LocalState::from_u8(sh.state[i]);
        let wp = mode == LocalState::Shared;
        let data: Option<&[u8]> = match kind {
            GRANT_ZERO => Some(&ZERO_PAGE),
            GRANT_DATA => {
                Stats::bump(&self.stats.pages_received);
                Some(bytes.or(p.data.as_deref()).ok_or("data missing")?)
            }
            _ => None,
        };
        match data {
            Some(d) => {
                if st != LocalState::Invalid {
                    return Err(format!("page {page} granted with data while held {st:?}"));
                }
                // SAFETY: `addr` is a page of a region registered with this uffd.
                unsafe { self.uffd.copy(addr, d, wp) }.map_err(|e| e.to_string())?;
                if let Some(h) = &self.on_page_change {
                    h(addr, PAGE_SIZE as u64);
                }
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
        sh.state[i] = mode as u8;
        if p.prefetch {
            out.landed.push(page);
        } else {
            self.stats
                .fault_latency
                .record(p.t0.elapsed().as_nanos() as u64);
        }
        let home = self.homes.home(page);
        if home == self.me {
            Stats::bump(&self.stats.local_faults);
            out.local.push_back(Msg::Done { page });
        } else if p.acks_needed > 0 {
            self.emit(out, home, &Msg::Done { page });
        }
        // else: a direct grant; the home already considers it done.
        self.upgrade_if_wanted(sh, page, mode, p.want_write, out);
        Ok(())
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
        out: &mut Outbox,
    ) {
        if want_write && mode == LocalState::Shared {
            sh.pending.insert(page, Pending::new(false, Instant::now()));
            Stats::bump(&self.stats.upgrades);
            self.request(page, true, false, out);
        }
    }

    /// Handles one coherence frame; a malformed frame is refused whole.
    fn on_coherence_frame(
        &self,
        from: NodeId,
        payload: &[u8],
        out: &mut Outbox,
    ) -> Result<(), String> {
        let msgs = decode_all(payload).map_err(|e| e.to_string())?;
        let mut i = 0;
        while i < msgs.len() {
            let run = self.direct_grant_run(from, &msgs[i..]);
            if run >= 2 {
                let (first, mode) = match msgs[i] {
                    Msg::Grant { page, mode, .. } => (page, mode),
                    _ => unreachable!("a run starts with a grant"),
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
                if self.install_run(first, mode, &data, out)? {
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

    /// How many messages at the head of `msgs` are direct grants with data
    /// for consecutive pages of one region, in one mode (at most 256).
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
            .take(256)
            .enumerate()
            .take_while(|&(k, m)| {
                matches!(*m, Msg::Grant { page, mode: m2, data: GrantData::Inline(_), acks: 0 }
                    if page == first + k as u64 && m2 == mode
                        && self.space.same_region(first, page) && self.homes.home(page) == from)
            })
            .count()
    }

    /// Installs a run of direct grants (`data` holds consecutive pages from
    /// `first`) with one `UFFDIO_COPY`. Returns false (having changed
    /// nothing) when some page is not in the expected state; the caller then
    /// handles the grants one by one.
    fn install_run(
        &self,
        first: u64,
        mode: LocalState,
        data: &[u8],
        out: &mut Outbox,
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
            let (s, i) = shard(page);
            let sh = self.local[s].lock().expect("lock");
            let ok = sh.state[i] == LocalState::Invalid as u8
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
        if let Some(h) = &self.on_page_change {
            h(addr, data.len() as u64);
        }
        // Phase 3: record.
        for page in first..first + count {
            let (s, i) = shard(page);
            let mut sh = self.local[s].lock().expect("lock");
            sh.state[i] = mode as u8;
            let p = sh.pending.remove(&page).expect("checked in phase 1");
            if p.prefetch {
                out.landed.push(page);
            } else {
                self.stats
                    .fault_latency
                    .record(p.t0.elapsed().as_nanos() as u64);
            }
            // A write fault between the copy and here found the page still
            // pending; it waits for us.
            self.upgrade_if_wanted(&mut sh, page, mode, p.want_write, out);
        }
        Stats::add(&self.stats.pages_received, count);
        Ok(true)
    }

    /// A run that cannot be installed at once: its pages one by one.
    fn grant_run_one_by_one(
        &self,
        from: NodeId,
        first: u64,
        mode: LocalState,
        data: &[u8],
        out: &mut Outbox,
    ) -> Result<(), String> {
        for (k, bytes) in data.chunks_exact(PAGE_SIZE).enumerate() {
            let grant = Msg::Grant {
                page: first + k as u64,
                mode,
                data: GrantData::Inline(bytes),
                acks: 0,
            };
            self.handle(from, grant, out)?;
        }
        Ok(())
    }

    fn peer_down(&self, peer: NodeId, why: PeerDown) {
        let new = if why == PeerDown::Left {
            PEER_LEFT
        } else {
            PEER_FAILED
        };
        if self.peers[usize::from(peer)].swap(new, Ordering::AcqRel) != PEER_ALIVE {
            return;
        }
        if new == PEER_LEFT {
            self.event(DsmEvent::PeerLeft { node: peer });
        } else {
            let reason = why.to_string();
            self.peer_reason.lock().expect("lock")[usize::from(peer)] = reason.clone();
            error!(node = self.me, peer, %reason, "peer failed");
            self.event(DsmEvent::PeerFailed { node: peer, reason });
        }
        self.control_cv.notify_all();
    }
}

impl Pending {
    fn new(prefetch: bool, t0: Instant) -> Pending {
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
}

impl Outbox {
    fn new(nodes: usize) -> Outbox {
        Outbox {
            bufs: (0..nodes).map(|_| Vec::new()).collect(),
            local: VecDeque::new(),
            direct: Vec::new(),
            landed: Vec::new(),
        }
    }
}

impl FrameSink for Engine {
    fn on_frame(&self, from: NodeId, ch: u8, payload: &[u8]) {
        match ch {
            channel::COHERENCE => {
                Stats::add(&self.stats.bytes_received, payload.len() as u64);
                let mut out = Outbox::new(self.nodes);
                if let Err(what) = self.on_coherence_frame(from, payload, &mut out) {
                    warn!(node = self.me, peer = from, %what, "protocol error");
                    eprintln!(
                        "fragvisor-dsm: node {}: protocol error from node {from}: {what}",
                        self.me
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
