//! The RDMA transport (feature `rdma`): the same full mesh, framing and
//! failure semantics as [`super::tcp::TcpTransport`], with the frames carried
//! by two-sided SEND/RECV on reliable-connected (RC) queue pairs.
//!
//! * **Bootstrap.** Each pair of nodes first connects over TCP to the same
//!   addresses as the TCP transport (the higher id dials the lower one) and
//!   runs the versioned, authenticated handshake of [`super::handshake`].
//!   Only once the peer has proven the cluster key does a node create a queue
//!   pair for it; the endpoints (QP number, LID, GID) are then traded over
//!   that authenticated connection. A stranger never learns a QP number, and
//!   the queue pairs allow no remote memory access (local write only).
//! * **Data.** A frame (channel byte + payload, at most `max_frame` bytes) is
//!   cut into fragments of at most [`SLOT_BYTES`] bytes including an 8-byte
//!   header, copied into a registered send slot and posted as one SEND. The
//!   receiver keeps [`RECV_DEPTH`] registered receive buffers posted per peer;
//!   one poller thread per transport polls the shared completion queue,
//!   reassembles frames, calls [`FrameSink::on_frame`] and reposts buffers.
//! * **Flow control.** Credits: a sender starts with [`RECV_DEPTH`] credits,
//!   each SEND costs one, and the receiver returns one per reposted buffer,
//!   piggybacked on its own traffic or in a credit-only message once half the
//!   window is owed. Data keeps one credit in reserve so that credit messages
//!   can always flow: the receiver never runs out of posted buffers (no RNR)
//!   and two nodes streaming at each other cannot deadlock. What cannot be
//!   posted at once is queued per peer, in order, and posted by the poller as
//!   credits and send slots come back, so `send` never blocks.
//! * **Failure.** Heartbeats every `peer_timeout / 4` on [`channel::LINK`], a
//!   silent peer is [`PeerDown::Silent`], a failed work completion (retry
//!   exceeded: the peer's QP is gone) or the bootstrap TCP connection closing
//!   (the peer process died) is [`PeerDown::Disconnected`]. The bootstrap
//!   connection stays open for that, and carries the goodbye of a clean exit
//!   ([`PeerDown::Left`]) after the node's queued frames have been delivered.
//!
//! `RDMA.md` next to this file documents the bytes.

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

use ibverbs::{
    CompletionQueue, Context, Gid, GidEntry, MemoryRegion, PreparedQueuePair, ProtectionDomain,
    QueuePair, QueuePairEndpoint,
};
use serde::{Deserialize, Serialize};
use tracing::{debug, error, info, warn};

use super::handshake::HANDSHAKE_TIMEOUT;
use super::handshake::{self, Expect, HandshakeError};
use super::mesh::{self, MeshSide};
use super::{channel, FrameSink, PeerDown, Transport, TransportError};
use crate::{ClusterConfig, NodeId};

/// Size of one registered send or receive buffer: the largest SEND.
pub const SLOT_BYTES: usize = 32 << 10;
/// Receive buffers posted per peer, which is also the initial credit count.
pub const RECV_DEPTH: usize = 32;
/// Registered send slots per peer.
const SEND_SLOTS: usize = RECV_DEPTH;
/// Bytes of the header in front of every SEND.
pub const MSG_HEADER: usize = 8;
/// Frame bytes a fragment carries at most.
const CHUNK: usize = SLOT_BYTES - MSG_HEADER;
/// Owed credits that trigger a credit-only message.
const CREDIT_THRESHOLD: u32 = (RECV_DEPTH / 2) as u32;
/// Version of the RDMA message format, traded with the queue-pair endpoints.
pub const RDMA_WIRE_VERSION: u16 = 1;
/// Environment variable that picks an RDMA device by name (`mlx5_0`, `rxe0`).
pub const DEVICE_ENV: &str = "FRAGVISOR_RDMA_DEVICE";

/// Message kinds (header byte 0).
const KIND_DATA: u8 = 1;
const KIND_CREDIT: u8 = 2;
/// Data fragment flags (header byte 1).
const FLAG_FIRST: u8 = 1;
const FLAG_LAST: u8 = 2;

/// Bootstrap frames after the handshake (same framing as the handshake).
const CH_QP: u8 = 0xFC;
const CH_READY: u8 = 0xFB;
const CH_GOODBYE: u8 = 0xFA;

const LINK_HEARTBEAT: u8 = 0;
const LINK_GOODBYE: u8 = 1;

const ALIVE: u8 = 0;
const LEFT: u8 = 1;
const DOWN: u8 = 2;

/// `IBV_GID_TYPE_ROCE_V2` (the crate does not re-export the constant).
const GID_TYPE_ROCE_V2: ibverbs::ibv_gid_type = 2;
/// Local ACK timeout exponent: 4.096 µs × 2^14 ≈ 67 ms per retry.
const QP_TIMEOUT: u8 = 14;
/// Transport retries before a send fails (the peer is declared gone).
const QP_RETRY: u8 = 7;
/// RNR retries; 7 means "forever", which credits make moot.
const QP_RNR_RETRY: u8 = 7;

/// How long the poller spins on an empty completion queue before yielding.
const SPIN: Duration = Duration::from_micros(200);
/// How long it yields before sleeping between polls.
const YIELD: Duration = Duration::from_millis(2);
/// Its sleep when idle for longer.
const IDLE_SLEEP: Duration = Duration::from_micros(50);

/// A full-mesh RDMA transport.
pub struct RdmaTransport {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for RdmaTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RdmaTransport")
            .field("node", &self.inner.cfg.node_id)
            .field("device", &self.inner.verbs.name)
            .finish()
    }
}

impl RdmaTransport {
    /// Opens the first usable RDMA device (or the one named by
    /// `FRAGVISOR_RDMA_DEVICE`), listens on this node's address, bootstraps a
    /// queue pair with every peer and waits until the whole mesh is up (or
    /// `connect_timeout` passes, or a peer refuses us).
    ///
    /// Without an RDMA device this returns [`TransportError::Unavailable`] at
    /// once, before binding anything.
    pub fn connect(
        cfg: &ClusterConfig,
        sink: Arc<dyn FrameSink>,
    ) -> Result<Arc<RdmaTransport>, TransportError> {
        let me = cfg.node_id;
        let n = cfg.nodes();
        let verbs = Arc::new(Verbs::open(n.saturating_sub(1))?);
        info!(node = me, device = %verbs.name, gid_index = ?verbs.gid_index, "RDMA device opened");
        let listener = TcpListener::bind(cfg.addrs[usize::from(me)]).map_err(|source| {
            TransportError::Listen {
                addr: cfg.addrs[usize::from(me)],
                source,
            }
        })?;
        let inner = Arc::new(Inner {
            cfg: cfg.clone(),
            verbs,
            links: (0..n).map(|_| OnceLock::new()).collect(),
            sink,
            stopping: AtomicBool::new(false),
            poller_exit: AtomicBool::new(false),
            epoch: AtomicU64::new(0),
            start: Instant::now(),
            up: Mutex::new(0),
            up_cv: Condvar::new(),
            refused: AtomicU64::new(0),
            bytes_sent: AtomicU64::new(0),
            bytes_received: AtomicU64::new(0),
        });
        {
            let inner = inner.clone();
            thread::Builder::new()
                .name(format!("fv-rdma-poll-{me}"))
                .spawn(move || inner.poll_loop())
                .expect("spawn poller");
        }
        {
            let inner = inner.clone();
            thread::Builder::new()
                .name(format!("fv-rdma-accept-{me}"))
                .spawn(move || inner.accept_loop(listener))
                .expect("spawn acceptor");
        }
        {
            let inner = inner.clone();
            thread::Builder::new()
                .name(format!("fv-rdma-heartbeat-{me}"))
                .spawn(move || inner.heartbeat_loop())
                .expect("spawn heartbeat");
        }
        mesh::establish(&inner, cfg, "rdma-")?;
        info!(node = me, peers = n - 1, "RDMA cluster mesh is up");
        Ok(Arc::new(RdmaTransport { inner }))
    }

    /// Bootstrap connections refused so far (strangers, malformed frames,
    /// wrong keys).
    pub fn refused_connections(&self) -> u64 {
        self.inner.refused.load(Ordering::Relaxed)
    }

    /// Bytes sent and received on all queue pairs, message headers included.
    pub fn bytes(&self) -> (u64, u64) {
        (
            self.inner.bytes_sent.load(Ordering::Relaxed),
            self.inner.bytes_received.load(Ordering::Relaxed),
        )
    }

    /// Name of the RDMA device in use.
    pub fn device_name(&self) -> &str {
        &self.inner.verbs.name
    }
}

impl Transport for RdmaTransport {
    fn local_id(&self) -> NodeId {
        self.inner.cfg.node_id
    }

    fn nodes(&self) -> usize {
        self.inner.cfg.nodes()
    }

    fn send(&self, to: NodeId, channel: u8, payload: &[u8]) -> Result<(), TransportError> {
        self.inner.send(to, channel, payload)
    }

    fn shutdown(&self) {
        self.inner.stop();
    }
}

impl Drop for RdmaTransport {
    fn drop(&mut self) {
        self.inner.stop();
        self.inner.close_all();
    }
}

// ---------------------------------------------------------------------------
// Verbs resources.

/// The device context, protection domain and the completion queue shared by
/// every queue pair of a transport.
struct Verbs {
    name: String,
    gid_index: Option<u32>,
    // Dropped by hand in this order, before `ctx`, which they borrow.
    cq: Option<CompletionQueue<'static>>,
    pd: Option<ProtectionDomain<'static>>,
    /// Leaked from a `Box` in [`Verbs::with_context`], freed in `drop`.
    ctx: &'static Context,
}

impl Verbs {
    /// Opens a device, or says clearly why there is none.
    fn open(peers: usize) -> Result<Verbs, TransportError> {
        let list = ibverbs::devices().map_err(|e| {
            TransportError::Unavailable(format!(
                "no RDMA device found: listing RDMA devices failed ({e}); this host has no \
                 usable RDMA stack (kernel ib_uverbs and a verbs provider); use the TCP transport"
            ))
        })?;
        if list.is_empty() {
            return Err(TransportError::Unavailable(
                "no RDMA device found: the device list is empty; load an RDMA driver or create \
                 a SoftRoCE device (`rdma link add rxe0 type rxe netdev <interface>`), or use \
                 the TCP transport"
                    .into(),
            ));
        }
        let want = std::env::var(DEVICE_ENV).ok().filter(|s| !s.is_empty());
        let mut names = Vec::new();
        let mut problems = Vec::new();
        for dev in list.iter() {
            let name = dev
                .name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| "<unnamed>".into());
            names.push(name.clone());
            if want.as_deref().is_some_and(|w| w != name) {
                continue;
            }
            match dev.open() {
                Ok(ctx) => return Verbs::with_context(ctx, name, peers),
                Err(e) => problems.push(format!("{name}: {e}")),
            }
        }
        Err(TransportError::Unavailable(match want {
            Some(w) if problems.is_empty() => format!(
                "no RDMA device named {w:?} (set by {DEVICE_ENV}); this host has {}",
                names.join(", ")
            ),
            _ => format!("no usable RDMA device: {}", problems.join("; ")),
        }))
    }

    fn with_context(ctx: Context, name: String, peers: usize) -> Result<Verbs, TransportError> {
        let gid_index = pick_gid(ctx.gid_table());
        let ctx: &'static Context = Box::leak(Box::new(ctx));
        // From here on `v`'s Drop frees the context, also on the error paths.
        let mut v = Verbs {
            name,
            gid_index,
            cq: None,
            pd: None,
            ctx,
        };
        let cqe = i32::try_from(peers.max(1) * (SEND_SLOTS + RECV_DEPTH)).unwrap_or(i32::MAX);
        v.cq = Some(
            ctx.create_cq(cqe, 0)
                .map_err(|e| v.unavailable("creating the completion queue", e))?,
        );
        v.pd = Some(
            ctx.alloc_pd()
                .map_err(|e| v.unavailable("allocating the protection domain", e))?,
        );
        Ok(v)
    }

    fn unavailable(&self, what: &str, e: io::Error) -> TransportError {
        TransportError::Unavailable(format!("RDMA device {}: {what} failed: {e}", self.name))
    }

    fn cq(&self) -> &CompletionQueue<'static> {
        self.cq.as_ref().expect("set in with_context")
    }

    fn pd(&self) -> &ProtectionDomain<'static> {
        self.pd.as_ref().expect("set in with_context")
    }

    /// Creates an RC queue pair on the shared completion queue.
    ///
    /// # Safety
    ///
    /// The queue pair borrows this protection domain and completion queue
    /// (and the context) for `'static`: the caller must drop it before the
    /// last `Arc<Verbs>` goes. [`Link`] holds the queue pair and an
    /// `Arc<Verbs>` declared after it, so it is dropped first.
    unsafe fn prepare_qp(&self) -> io::Result<PreparedQueuePair<'static>> {
        // SAFETY: `pd` and `cq` live as long as `self`, which by this
        // function's contract outlives the queue pair made from them.
        let pd: &'static ProtectionDomain<'static> =
            unsafe { &*(self.pd() as *const ProtectionDomain<'static>) };
        // SAFETY: as above.
        let cq: &'static CompletionQueue<'static> =
            unsafe { &*(self.cq() as *const CompletionQueue<'static>) };
        let mut b = pd.create_qp(cq, cq, ibverbs::ibv_qp_type::IBV_QPT_RC);
        b.set_max_send_wr(SEND_SLOTS as u32)
            .set_max_recv_wr(RECV_DEPTH as u32)
            .set_timeout(QP_TIMEOUT)
            .set_retry_count(QP_RETRY)
            .set_rnr_retry(QP_RNR_RETRY);
        if let Some(g) = self.gid_index {
            b.set_gid_index(g);
        }
        b.build()
    }
}

impl Drop for Verbs {
    fn drop(&mut self) {
        drop(self.cq.take());
        drop(self.pd.take());
        // SAFETY: `ctx` was leaked from a `Box` in `with_context` and is freed
        // only here. Nothing borrows it any more: the completion queue and
        // protection domain were just dropped, and every queue pair and memory
        // region lives in a `Link` that holds an `Arc<Verbs>`, so they are
        // gone before this runs.
        drop(unsafe { Box::from_raw(self.ctx as *const Context as *mut Context) });
    }
}

/// Picks the GID to route with: RoCE v2 over IPv4 first, then any RoCE v2,
/// then the first valid entry (InfiniBand).
fn pick_gid(table: &[GidEntry]) -> Option<u32> {
    let v4_mapped = |g: &Gid| g.subnet_prefix() == 0 && (g.interface_id() >> 32) == 0xffff;
    table
        .iter()
        .enumerate()
        .filter(|(i, e)| e.gid_index as usize == *i && e.gid != Gid::default())
        .max_by_key(|(i, e)| {
            (
                e.gid_type == GID_TYPE_ROCE_V2,
                v4_mapped(&e.gid),
                std::cmp::Reverse(*i),
            )
        })
        .map(|(i, _)| i as u32)
}

// ---------------------------------------------------------------------------
// Message format, fragmentation, flow control: no verbs, unit-tested.

/// The 8 bytes in front of every SEND.
///
/// ```text
/// 0: kind (1 data, 2 credit-only)   1: flags (data: 1 first, 2 last)
/// 2..4: credits returned, u16 LE    4..8: first fragment: frame length, u32 LE
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct MsgHeader {
    kind: u8,
    flags: u8,
    credits: u16,
    total: u32,
}

impl MsgHeader {
    fn write(&self, b: &mut [u8]) {
        b[0] = self.kind;
        b[1] = self.flags;
        b[2..4].copy_from_slice(&self.credits.to_le_bytes());
        b[4..8].copy_from_slice(&self.total.to_le_bytes());
    }

    fn read(b: &[u8]) -> Result<MsgHeader, String> {
        if b.len() < MSG_HEADER {
            return Err(format!(
                "message of {} bytes is shorter than its {MSG_HEADER}-byte header",
                b.len()
            ));
        }
        Ok(MsgHeader {
            kind: b[0],
            flags: b[1],
            credits: u16::from_le_bytes([b[2], b[3]]),
            total: u32::from_le_bytes([b[4], b[5], b[6], b[7]]),
        })
    }
}

/// Cuts a frame of `len` bytes into `(offset, bytes, flags)` fragments of at
/// most `chunk` bytes.
fn fragments(len: usize, chunk: usize) -> impl Iterator<Item = (usize, usize, u8)> {
    let count = len.div_ceil(chunk).max(1);
    (0..count).map(move |i| {
        let off = i * chunk;
        let mut flags = 0;
        if i == 0 {
            flags |= FLAG_FIRST;
        }
        if i + 1 == count {
            flags |= FLAG_LAST;
        }
        (off, chunk.min(len - off), flags)
    })
}

/// Copies bytes `off..off + dst.len()` of the frame `[channel] ++ payload`.
fn write_body(dst: &mut [u8], ch: u8, payload: &[u8], off: usize) {
    if dst.is_empty() {
        return;
    }
    if off == 0 {
        dst[0] = ch;
        let n = dst.len() - 1;
        dst[1..].copy_from_slice(&payload[..n]);
    } else {
        let n = dst.len();
        dst.copy_from_slice(&payload[off - 1..off - 1 + n]);
    }
}

/// Puts fragmented frames back together and checks their framing.
#[derive(Debug, Default)]
struct Reassembler {
    buf: Vec<u8>,
    total: usize,
    active: bool,
}

impl Reassembler {
    /// Takes one data fragment; returns the whole frame (channel byte first)
    /// once its last fragment is in.
    fn push<'a>(
        &'a mut self,
        h: &MsgHeader,
        chunk: &'a [u8],
        max: usize,
    ) -> Result<Option<&'a [u8]>, String> {
        if h.flags & !(FLAG_FIRST | FLAG_LAST) != 0 {
            return Err(format!("unknown fragment flags {:#x}", h.flags));
        }
        if chunk.is_empty() {
            return Err("data fragment without data".into());
        }
        let first = h.flags & FLAG_FIRST != 0;
        let last = h.flags & FLAG_LAST != 0;
        if first {
            if self.active {
                return Err("a new frame started before the previous one ended".into());
            }
            let total = h.total as usize;
            if total == 0 || total > max {
                return Err(format!("frame length {total} outside 1..={max}"));
            }
            if last {
                if chunk.len() != total {
                    return Err(format!(
                        "single-fragment frame carries {} bytes, its header says {total}",
                        chunk.len()
                    ));
                }
                return Ok(Some(chunk));
            }
            if chunk.len() >= total {
                return Err(format!(
                    "first fragment carries {} bytes of a {total}-byte frame but is not the last",
                    chunk.len()
                ));
            }
            self.buf.clear();
            self.buf.reserve(total);
            self.buf.extend_from_slice(chunk);
            self.total = total;
            self.active = true;
            return Ok(None);
        }
        if !self.active {
            return Err("continuation fragment without a first fragment".into());
        }
        if self.buf.len() + chunk.len() > self.total {
            return Err(format!(
                "fragments exceed the announced frame length {}",
                self.total
            ));
        }
        self.buf.extend_from_slice(chunk);
        if !last {
            return Ok(None);
        }
        self.active = false;
        if self.buf.len() != self.total {
            return Err(format!(
                "frame ended after {} of its {} bytes",
                self.buf.len(),
                self.total
            ));
        }
        Ok(Some(&self.buf))
    }
}

/// Whether a data message may be posted: one credit always stays in reserve
/// for credit-only messages.
fn can_send_data(credits: u32, free_slots: usize) -> bool {
    credits >= 2 && free_slots > 0
}

/// Whether a credit-only message should be posted now.
fn credit_message_due(owed: u32, credits: u32, free_slots: usize) -> bool {
    owed >= CREDIT_THRESHOLD && credits >= 1 && free_slots > 0
}

/// Work request ids: peer in bits 32..48, bit 31 set for receives, slot below.
const RECV_BIT: u64 = 1 << 31;

fn wr_id(peer: NodeId, recv: bool, slot: usize) -> u64 {
    let recv_bit = if recv { RECV_BIT } else { 0 };
    (u64::from(peer) << 32) | recv_bit | slot as u64
}

fn split_wr_id(id: u64) -> (NodeId, bool, usize) {
    (
        (id >> 32) as NodeId,
        id & RECV_BIT != 0,
        (id & (RECV_BIT - 1)) as usize,
    )
}

// ---------------------------------------------------------------------------
// Bootstrap over the authenticated TCP connection.

/// What a node tells a peer about its queue pair.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct QpInfo {
    /// [`RDMA_WIRE_VERSION`].
    v: u16,
    /// [`SLOT_BYTES`].
    slot: u32,
    /// [`RECV_DEPTH`].
    depth: u32,
    /// QP number, LID, GID.
    ep: QueuePairEndpoint,
}

impl QpInfo {
    fn new(ep: QueuePairEndpoint) -> QpInfo {
        QpInfo {
            v: RDMA_WIRE_VERSION,
            slot: SLOT_BYTES as u32,
            depth: RECV_DEPTH as u32,
            ep,
        }
    }

    fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("serializing a plain struct")
    }

    fn decode(b: &[u8]) -> Result<QpInfo, HandshakeError> {
        serde_json::from_slice(b)
            .map_err(|e| HandshakeError::Malformed(format!("bad queue pair endpoint: {e}")))
    }

    /// Checks that the peer speaks the same message format.
    fn check_peer(&self, theirs: &QpInfo) -> Result<(), HandshakeError> {
        if theirs.v != self.v {
            return Err(HandshakeError::Malformed(format!(
                "RDMA message format version {} is not supported (this node speaks version {})",
                theirs.v, self.v
            )));
        }
        if (theirs.slot, theirs.depth) != (self.slot, self.depth) {
            return Err(HandshakeError::Malformed(format!(
                "peer uses {} receive buffers of {} bytes; this node uses {} of {}",
                theirs.depth, theirs.slot, self.depth, self.slot
            )));
        }
        if theirs.ep.gid.is_some() != self.ep.gid.is_some() {
            return Err(HandshakeError::Malformed(
                "one side routes with a GID (RoCE) and the other does not".into(),
            ));
        }
        Ok(())
    }
}

/// Why a bootstrap failed.
#[derive(Debug)]
enum BootstrapError {
    /// The handshake or the endpoint exchange failed.
    Handshake(HandshakeError),
    /// This node could not (or would not) set up the queue pair.
    Local(TransportError),
}

impl From<HandshakeError> for BootstrapError {
    fn from(e: HandshakeError) -> Self {
        BootstrapError::Handshake(e)
    }
}

/// Sends our endpoint, reads and checks the peer's.
fn exchange_info(s: &mut (impl Read + Write), mine: &QpInfo) -> Result<QpInfo, HandshakeError> {
    handshake::write_frame(s, CH_QP, &mine.encode())?;
    let payload = handshake::expect_frame(s, CH_QP, "queue pair endpoint")?;
    match QpInfo::decode(&payload).and_then(|t| mine.check_peer(&t).map(|()| t)) {
        Ok(t) => Ok(t),
        Err(e) => {
            handshake::send_reject(s, &e.to_string());
            Err(e)
        }
    }
}

/// The acceptor's bootstrap: authenticates the dialer first; only then does
/// `prepare` create a queue pair for it, and endpoints are traded.
fn bootstrap_accept<S: Read + Write, Q>(
    s: &mut S,
    key: &[u8],
    exp: &Expect,
    prepare: impl FnOnce(NodeId) -> Result<(Q, QpInfo), TransportError>,
) -> Result<(NodeId, Q, QpInfo), BootstrapError> {
    let peer = handshake::accept(s, key, exp)?;
    let (q, mine) = prepare(peer).map_err(|e| {
        handshake::send_reject(s, &e.to_string());
        BootstrapError::Local(e)
    })?;
    let theirs = exchange_info(s, &mine)?;
    Ok((peer, q, theirs))
}

/// The dialer's bootstrap: the handshake with `peer`, then the queue pair
/// from `prepare`, then the endpoint exchange.
fn bootstrap_dial<S: Read + Write, Q>(
    s: &mut S,
    key: &[u8],
    exp: &Expect,
    peer: NodeId,
    prepare: impl FnOnce() -> Result<(Q, QpInfo), TransportError>,
) -> Result<(Q, QpInfo), BootstrapError> {
    handshake::dial(s, key, exp, peer)?;
    let (q, mine) = prepare().map_err(|e| {
        handshake::send_reject(s, &e.to_string());
        BootstrapError::Local(e)
    })?;
    let theirs = exchange_info(s, &mine)?;
    Ok((q, theirs))
}

/// Both sides have their receive buffers posted: sending may start.
fn exchange_ready(s: &mut (impl Read + Write)) -> Result<(), HandshakeError> {
    handshake::write_frame(s, CH_READY, &[])?;
    handshake::expect_frame(s, CH_READY, "ready")?;
    Ok(())
}

// ---------------------------------------------------------------------------
// The transport.

struct Inner {
    cfg: ClusterConfig,
    verbs: Arc<Verbs>,
    links: Vec<OnceLock<Arc<Link>>>,
    sink: Arc<dyn FrameSink>,
    stopping: AtomicBool,
    poller_exit: AtomicBool,
    /// Poller iterations, to let a goodbye wait for frames already received.
    epoch: AtomicU64,
    start: Instant,
    up: Mutex<usize>,
    up_cv: Condvar,
    refused: AtomicU64,
    bytes_sent: AtomicU64,
    bytes_received: AtomicU64,
}

/// One peer. Field order is drop order: the queue pair is destroyed before
/// the registered buffers it uses, and those before the verbs resources.
struct Link {
    peer: NodeId,
    qp: Mutex<QueuePair<'static>>,
    tx: Mutex<TxState>,
    rx: Mutex<RxState>,
    /// Receive buffers reposted since we last told the peer: credits to return.
    owed: AtomicU32,
    state: AtomicU8,
    /// Nanoseconds since `Inner::start` at the last receive.
    last_rx_ns: AtomicU64,
    /// The bootstrap connection, kept for liveness and the goodbye.
    tcp: TcpStream,
    _verbs: Arc<Verbs>,
}

struct TxState {
    mr: MemoryRegion<u8>,
    /// Send slots not owned by the device.
    free: Vec<usize>,
    /// SENDs we may still post.
    credits: u32,
    /// Whole messages (header included) waiting for a credit or a slot.
    pending: VecDeque<Vec<u8>>,
    closed: bool,
}

struct RxState {
    mr: MemoryRegion<u8>,
    asm: Reassembler,
}

impl MeshSide for Inner {
    fn dial(self: &Arc<Self>, peer: NodeId, deadline: Instant) -> Result<(), TransportError> {
        Inner::dial(self, peer, deadline)
    }

    fn linked(&self, peer: NodeId) -> bool {
        self.links[usize::from(peer)].get().is_some()
    }

    fn up(&self) -> (&Mutex<usize>, &Condvar) {
        (&self.up, &self.up_cv)
    }

    fn abort(&self) {
        self.stop();
        self.close_all();
    }
}

impl Inner {
    fn now_ns(&self) -> u64 {
        self.start.elapsed().as_nanos() as u64
    }

    fn installed(&self) -> impl Iterator<Item = &Arc<Link>> {
        self.links.iter().filter_map(|l| l.get())
    }

    fn link(&self, to: NodeId) -> Result<&Arc<Link>, TransportError> {
        let link = self
            .links
            .get(usize::from(to))
            .and_then(|l| l.get())
            .ok_or(TransportError::PeerDown(to))?;
        if link.state.load(Ordering::Acquire) != ALIVE {
            return Err(TransportError::PeerDown(to));
        }
        Ok(link)
    }

    fn send(&self, to: NodeId, ch: u8, payload: &[u8]) -> Result<(), TransportError> {
        let len = payload.len() + 1;
        if len > self.cfg.max_frame {
            return Err(TransportError::FrameTooLarge {
                len,
                max: self.cfg.max_frame,
            });
        }
        let link = self.link(to)?;
        self.send_on(link, ch, payload, true).map(|_| ())
    }

    /// Posts (or, with `may_queue`, queues) one frame; `Ok(false)` when it
    /// could not be posted at once and `may_queue` is off.
    fn send_on(
        &self,
        link: &Link,
        ch: u8,
        payload: &[u8],
        may_queue: bool,
    ) -> Result<bool, TransportError> {
        let len = payload.len() + 1;
        let mut tx = link.tx.lock().expect("lock");
        if tx.closed {
            return Err(TransportError::PeerDown(link.peer));
        }
        let can_post_now = tx.pending.is_empty() && can_send_data(tx.credits, tx.free.len());
        if !may_queue && !can_post_now {
            return Ok(false);
        }
        for (off, n, flags) in fragments(len, CHUNK) {
            let h = MsgHeader {
                kind: KIND_DATA,
                flags,
                credits: 0,
                total: if flags & FLAG_FIRST != 0 {
                    len as u32
                } else {
                    0
                },
            };
            if tx.pending.is_empty() && can_send_data(tx.credits, tx.free.len()) {
                let posted = self.post(link, &mut tx, |buf| {
                    h.write(buf);
                    write_body(&mut buf[MSG_HEADER..MSG_HEADER + n], ch, payload, off);
                    MSG_HEADER + n
                });
                if let Err(e) = posted {
                    drop(tx);
                    self.link_failed(
                        link,
                        PeerDown::Disconnected(format!("posting a send failed: {e}")),
                    );
                    return Err(TransportError::Send {
                        peer: link.peer,
                        source: e,
                    });
                }
            } else {
                let mut m = vec![0u8; MSG_HEADER + n];
                h.write(&mut m);
                write_body(&mut m[MSG_HEADER..], ch, payload, off);
                tx.pending.push_back(m);
            }
        }
        Ok(true)
    }

    /// Takes a free send slot and a credit, lets `fill` write the message
    /// (returning its length), stamps the credits we owe and posts the SEND.
    fn post(
        &self,
        link: &Link,
        tx: &mut TxState,
        fill: impl FnOnce(&mut [u8]) -> usize,
    ) -> io::Result<()> {
        let slot = tx.free.pop().expect("caller checked for a free slot");
        tx.credits -= 1;
        let start = slot * SLOT_BYTES;
        let len = fill(&mut tx.mr[start..start + SLOT_BYTES]);
        let owed = link.owed.swap(0, Ordering::AcqRel);
        let stamped = owed.min(u32::from(u16::MAX));
        if owed > stamped {
            link.owed.fetch_add(owed - stamped, Ordering::AcqRel);
        }
        tx.mr[start + 2..start + 4].copy_from_slice(&(stamped as u16).to_le_bytes());
        let mut qp = link.qp.lock().expect("lock");
        // SAFETY: `slot` came off the free list, so the device does not own
        // it; it goes back on the list only when the poller takes this send's
        // completion, and nothing writes it before then. The memory region
        // lives in the same `Link` as the queue pair, which is destroyed
        // before the region is deregistered.
        let r = unsafe {
            qp.post_send(
                &mut tx.mr,
                start..start + len,
                wr_id(link.peer, false, slot),
            )
        };
        match r {
            Ok(()) => {
                self.bytes_sent.fetch_add(len as u64, Ordering::Relaxed);
                Ok(())
            }
            Err(e) => {
                tx.free.push(slot);
                tx.credits += 1;
                link.owed.fetch_add(stamped, Ordering::AcqRel);
                Err(e)
            }
        }
    }

    /// Posts what is queued as far as credits and slots allow, then a
    /// credit-only message if one is due.
    fn pump(&self, link: &Link) {
        let mut tx = link.tx.lock().expect("lock");
        if tx.closed {
            return;
        }
        let mut failed = None;
        while !tx.pending.is_empty() && can_send_data(tx.credits, tx.free.len()) {
            let m = tx.pending.pop_front().expect("not empty");
            if let Err(e) = self.post(link, &mut tx, |buf| {
                buf[..m.len()].copy_from_slice(&m);
                m.len()
            }) {
                failed = Some(e);
                break;
            }
        }
        if failed.is_none()
            && credit_message_due(link.owed.load(Ordering::Acquire), tx.credits, tx.free.len())
        {
            let h = MsgHeader {
                kind: KIND_CREDIT,
                flags: 0,
                credits: 0,
                total: 0,
            };
            if let Err(e) = self.post(link, &mut tx, |buf| {
                h.write(buf);
                MSG_HEADER
            }) {
                failed = Some(e);
            }
        }
        drop(tx);
        if let Some(e) = failed {
            self.link_failed(
                link,
                PeerDown::Disconnected(format!("posting a send failed: {e}")),
            );
        }
    }

    fn poll_loop(self: Arc<Self>) {
        let mut wcs = vec![ibverbs::ibv_wc::default(); 64];
        let mut touched = vec![false; self.links.len()];
        let mut idle_since: Option<Instant> = None;
        while !self.poller_exit.load(Ordering::Acquire) {
            let done = match self.verbs.cq().poll(&mut wcs) {
                Ok(done) => done,
                Err(e) => {
                    error!(node = self.cfg.node_id, error = %e, "polling the completion queue failed");
                    for l in self.installed() {
                        self.link_failed(
                            l,
                            PeerDown::Disconnected(format!("completion queue failed: {e}")),
                        );
                    }
                    return;
                }
            };
            self.epoch.fetch_add(1, Ordering::AcqRel);
            if done.is_empty() {
                let since = *idle_since.get_or_insert_with(Instant::now);
                let idle = since.elapsed();
                if idle < SPIN {
                    std::hint::spin_loop();
                } else if idle < YIELD {
                    thread::yield_now();
                } else {
                    thread::sleep(IDLE_SLEEP);
                }
                continue;
            }
            idle_since = None;
            for wc in done.iter() {
                self.completion(wc, &mut touched);
            }
            for (peer, t) in touched.iter_mut().enumerate() {
                if std::mem::take(t) {
                    if let Some(l) = self.links[peer].get() {
                        self.pump(l);
                    }
                }
            }
        }
    }

    fn completion(&self, wc: &ibverbs::ibv_wc, touched: &mut [bool]) {
        let (peer, recv, slot) = split_wr_id(wc.wr_id());
        let Some(link) = self.links.get(usize::from(peer)).and_then(|l| l.get()) else {
            warn!(
                node = self.cfg.node_id,
                peer, "completion for an unknown peer"
            );
            return;
        };
        if let Some((status, vendor)) = wc.error() {
            // Flushes after a link went down are expected.
            if link.state.load(Ordering::Acquire) != DOWN {
                let what = if recv { "receive" } else { "send" };
                self.link_failed(
                    link,
                    PeerDown::Disconnected(format!(
                        "RDMA {what} failed: {} (status {status}, vendor error {vendor:#x})",
                        wc_status_name(status)
                    )),
                );
            }
            return;
        }
        if recv {
            if link.state.load(Ordering::Acquire) == DOWN {
                // Not reposted: a peer we dropped gets no more buffers.
                return;
            }
            link.last_rx_ns.store(self.now_ns(), Ordering::Release);
            self.bytes_received
                .fetch_add(wc.len() as u64, Ordering::Relaxed);
            if let Err(why) = self.on_message(link, slot, wc.len()) {
                self.link_failed(link, why);
                return;
            }
        } else {
            link.tx.lock().expect("lock").free.push(slot);
        }
        touched[usize::from(peer)] = true;
    }

    /// Handles one received message in receive buffer `slot` and reposts it.
    fn on_message(&self, link: &Link, slot: usize, len: usize) -> Result<(), PeerDown> {
        if slot >= RECV_DEPTH || len > SLOT_BYTES {
            return Err(PeerDown::ProtocolError(format!(
                "receive completion for slot {slot} of {len} bytes"
            )));
        }
        let mut rx = link.rx.lock().expect("lock");
        let RxState { mr, asm } = &mut *rx;
        let start = slot * SLOT_BYTES;
        let msg = &mr[start..start + len];
        let h = MsgHeader::read(msg).map_err(PeerDown::ProtocolError)?;
        if h.credits > 0 {
            let mut tx = link.tx.lock().expect("lock");
            let credits = tx.credits + u32::from(h.credits);
            if credits as usize > RECV_DEPTH {
                return Err(PeerDown::ProtocolError(format!(
                    "peer returned {} credits, more than it was given",
                    h.credits
                )));
            }
            tx.credits = credits;
        }
        match h.kind {
            KIND_CREDIT => {}
            KIND_DATA => {
                let frame = asm
                    .push(&h, &msg[MSG_HEADER..], self.cfg.max_frame)
                    .map_err(PeerDown::ProtocolError)?;
                if let Some(body) = frame {
                    self.deliver(link, body)?;
                }
            }
            k => return Err(PeerDown::ProtocolError(format!("unknown message kind {k}"))),
        }
        let mut qp = link.qp.lock().expect("lock");
        // SAFETY: the device handed this buffer back with the completion just
        // polled, and the frame read from it has been delivered (`msg` is no
        // longer used). The region outlives the queue pair (field order of
        // `Link`).
        unsafe { qp.post_receive(mr, start..start + SLOT_BYTES, wr_id(link.peer, true, slot)) }
            .map_err(|e| {
                PeerDown::Disconnected(format!("reposting a receive buffer failed: {e}"))
            })?;
        link.owed.fetch_add(1, Ordering::AcqRel);
        Ok(())
    }

    fn deliver(&self, link: &Link, body: &[u8]) -> Result<(), PeerDown> {
        if link.state.load(Ordering::Acquire) == DOWN {
            return Ok(());
        }
        let ch = body[0];
        if ch == channel::LINK {
            match body.get(1) {
                Some(&LINK_HEARTBEAT) => {}
                Some(&LINK_GOODBYE) => {
                    let _ = link.state.compare_exchange(
                        ALIVE,
                        LEFT,
                        Ordering::AcqRel,
                        Ordering::Acquire,
                    );
                }
                _ => return Err(PeerDown::ProtocolError("malformed link frame".into())),
            }
            return Ok(());
        }
        self.sink.on_frame(link.peer, ch, &body[1..]);
        Ok(())
    }

    fn accept_loop(self: Arc<Self>, listener: TcpListener) {
        let node = self.cfg.node_id;
        let inner = self.clone();
        mesh::accept_loop(
            listener,
            &self.stopping,
            node,
            "fv-rdma-handshake",
            move |stream, from| inner.clone().accept_one(stream, from),
        );
    }

    fn accept_one(self: Arc<Self>, mut stream: TcpStream, from: SocketAddr) {
        let _ = stream.set_nonblocking(false);
        let _ = stream.set_read_timeout(Some(HANDSHAKE_TIMEOUT));
        let _ = stream.set_write_timeout(Some(HANDSHAKE_TIMEOUT));
        let boot = bootstrap_accept(
            &mut stream,
            &self.cfg.key,
            &Expect::for_node(&self.cfg),
            |peer| {
                if self.links[usize::from(peer)].get().is_some() {
                    return Err(TransportError::Refused {
                        peer,
                        reason: format!("node {peer} is already connected"),
                    });
                }
                self.prepare()
            },
        );
        match boot {
            Ok((peer, prepared, theirs)) => {
                if let Err(e) = self.finish_link(peer, stream, prepared, theirs) {
                    mesh::refuse(&self.refused, self.cfg.node_id, from, &e.to_string());
                }
            }
            Err(BootstrapError::Handshake(e)) => mesh::refuse(
                &self.refused,
                self.cfg.node_id,
                from,
                &handshake::refusal_reason(&e),
            ),
            Err(BootstrapError::Local(e)) => {
                mesh::refuse(&self.refused, self.cfg.node_id, from, &e.to_string())
            }
        }
    }

    fn prepare(&self) -> Result<(PreparedQueuePair<'static>, QpInfo), TransportError> {
        // SAFETY: the queue pair either ends up in a `Link`, which drops it
        // before its `Arc<Verbs>`, or is dropped on an error path while
        // `self.verbs` is alive.
        let prepared = unsafe { self.verbs.prepare_qp() }
            .map_err(|e| self.verbs.unavailable("creating a queue pair", e))?;
        let info = QpInfo::new(prepared.endpoint());
        Ok((prepared, info))
    }

    fn dial(self: &Arc<Self>, peer: NodeId, deadline: Instant) -> Result<(), TransportError> {
        let addr = self.cfg.addrs[usize::from(peer)];
        loop {
            if self.stopping.load(Ordering::Acquire) {
                return Ok(());
            }
            let mut stream = match TcpStream::connect_timeout(&addr, Duration::from_millis(500)) {
                Ok(s) => s,
                Err(e) => {
                    if Instant::now() >= deadline {
                        return Err(TransportError::ConnectTimeout {
                            secs: self.cfg.connect_timeout.as_secs(),
                            missing: vec![peer],
                        });
                    }
                    debug!(node = self.cfg.node_id, peer, error = %e, "peer not up yet");
                    thread::sleep(Duration::from_millis(50));
                    continue;
                }
            };
            let _ = stream.set_read_timeout(Some(HANDSHAKE_TIMEOUT));
            let _ = stream.set_write_timeout(Some(HANDSHAKE_TIMEOUT));
            let boot = bootstrap_dial(
                &mut stream,
                &self.cfg.key,
                &Expect::for_node(&self.cfg),
                peer,
                || self.prepare(),
            );
            match boot {
                Ok((prepared, theirs)) => return self.finish_link(peer, stream, prepared, theirs),
                Err(BootstrapError::Local(e)) => return Err(e),
                Err(BootstrapError::Handshake(HandshakeError::Rejected(reason))) => {
                    return Err(TransportError::Refused { peer, reason })
                }
                Err(BootstrapError::Handshake(
                    source @ (HandshakeError::Io(_) | HandshakeError::Truncated { .. }),
                )) => {
                    // The peer restarted or closed early: retry until the deadline.
                    if Instant::now() >= deadline {
                        return Err(TransportError::Handshake { peer, source });
                    }
                    thread::sleep(Duration::from_millis(50));
                }
                Err(BootstrapError::Handshake(source)) => {
                    return Err(TransportError::Handshake { peer, source })
                }
            }
        }
    }

    /// Connects the queue pair, registers and posts the buffers, installs the
    /// link, then trades "ready" so that neither side sends before the other
    /// has its receive buffers posted.
    fn finish_link(
        self: &Arc<Self>,
        peer: NodeId,
        mut stream: TcpStream,
        prepared: PreparedQueuePair<'static>,
        theirs: QpInfo,
    ) -> Result<(), TransportError> {
        let qp = prepared
            .handshake(theirs.ep)
            .map_err(|e| self.verbs.unavailable("connecting the queue pair", e))?;
        let pd = self.verbs.pd();
        let tx_mr = pd
            .allocate::<u8>(SEND_SLOTS * SLOT_BYTES)
            .map_err(|e| self.verbs.unavailable("registering send buffers", e))?;
        let rx_mr = pd
            .allocate::<u8>(RECV_DEPTH * SLOT_BYTES)
            .map_err(|e| self.verbs.unavailable("registering receive buffers", e))?;
        let tcp = stream
            .try_clone()
            .map_err(|source| TransportError::Send { peer, source })?;
        let link = Arc::new(Link {
            peer,
            qp: Mutex::new(qp),
            tx: Mutex::new(TxState {
                mr: tx_mr,
                free: (0..SEND_SLOTS).rev().collect(),
                credits: RECV_DEPTH as u32,
                pending: VecDeque::new(),
                closed: false,
            }),
            rx: Mutex::new(RxState {
                mr: rx_mr,
                asm: Reassembler::default(),
            }),
            owed: AtomicU32::new(0),
            state: AtomicU8::new(ALIVE),
            last_rx_ns: AtomicU64::new(self.now_ns()),
            tcp,
            _verbs: self.verbs.clone(),
        });
        {
            let mut rx = link.rx.lock().expect("lock");
            let mut qp = link.qp.lock().expect("lock");
            for slot in 0..RECV_DEPTH {
                let start = slot * SLOT_BYTES;
                // SAFETY: the buffer belongs to the device until the poller
                // takes its completion; nothing touches it before. The region
                // outlives the queue pair (field order of `Link`).
                unsafe {
                    qp.post_receive(
                        &mut rx.mr,
                        start..start + SLOT_BYTES,
                        wr_id(peer, true, slot),
                    )
                }
                .map_err(|e| self.verbs.unavailable("posting receive buffers", e))?;
            }
        }
        if self.links[usize::from(peer)].set(link.clone()).is_err() {
            return Err(TransportError::Refused {
                peer,
                reason: format!("node {peer} is already connected"),
            });
        }
        if let Err(source) = exchange_ready(&mut stream) {
            // Never reported up, so no peer-down event either.
            link.state.store(DOWN, Ordering::Release);
            link.tx.lock().expect("lock").closed = true;
            let _ = link.tcp.shutdown(Shutdown::Both);
            return Err(TransportError::Handshake { peer, source });
        }
        let _ = stream.set_read_timeout(None);
        let _ = stream.set_write_timeout(None);
        let me = self.cfg.node_id;
        {
            let inner = self.clone();
            let link = link.clone();
            thread::Builder::new()
                .name(format!("fv-rdma-watch-{me}-{peer}"))
                .spawn(move || inner.watch_loop(&link, stream))
                .expect("spawn watcher");
        }
        debug!(node = me, peer, device = %self.verbs.name, "RDMA link up");
        *self.up.lock().expect("lock") += 1;
        self.up_cv.notify_all();
        Ok(())
    }

    /// Reads the bootstrap connection: a goodbye, or its loss (the peer
    /// process is gone).
    fn watch_loop(&self, link: &Link, mut stream: TcpStream) {
        let why = match handshake::read_handshake_frame(&mut stream) {
            Ok((CH_GOODBYE, _)) => {
                let _ =
                    link.state
                        .compare_exchange(ALIVE, LEFT, Ordering::AcqRel, Ordering::Acquire);
                // Let the poller deliver what arrived before the goodbye.
                let seen = self.epoch.load(Ordering::Acquire);
                let until = Instant::now() + Duration::from_millis(200);
                while self.epoch.load(Ordering::Acquire) < seen + 2 && Instant::now() < until {
                    thread::sleep(Duration::from_millis(1));
                }
                PeerDown::Left
            }
            Ok((ch, _)) => PeerDown::ProtocolError(format!(
                "unexpected frame on channel {ch:#x} on the bootstrap connection"
            )),
            Err(HandshakeError::Io(e)) => PeerDown::Disconnected(e.to_string()),
            Err(HandshakeError::Truncated { .. }) => {
                PeerDown::Disconnected("bootstrap connection closed".into())
            }
            Err(e) => PeerDown::ProtocolError(e.to_string()),
        };
        self.link_failed(link, why);
    }

    fn link_failed(&self, link: &Link, why: PeerDown) {
        let prev = link.state.swap(DOWN, Ordering::AcqRel);
        if prev == DOWN {
            return;
        }
        let why = if prev == LEFT { PeerDown::Left } else { why };
        {
            let mut tx = link.tx.lock().expect("lock");
            tx.closed = true;
            tx.pending.clear();
        }
        let _ = link.tcp.shutdown(Shutdown::Both);
        if self.stopping.load(Ordering::Acquire) {
            return;
        }
        if why == PeerDown::Left {
            info!(node = self.cfg.node_id, peer = link.peer, "peer left");
        } else {
            warn!(node = self.cfg.node_id, peer = link.peer, %why, "peer failed");
        }
        self.sink.on_peer_down(link.peer, why);
    }

    fn heartbeat_loop(&self) {
        let period = (self.cfg.peer_timeout / 4).max(Duration::from_millis(20));
        let timeout_ns = self.cfg.peer_timeout.as_nanos() as u64;
        while !self.stopping.load(Ordering::Acquire) {
            thread::sleep(period);
            for link in self.installed() {
                if self.stopping.load(Ordering::Acquire) {
                    return;
                }
                if link.state.load(Ordering::Acquire) != ALIVE {
                    continue;
                }
                let last = link.last_rx_ns.load(Ordering::Acquire);
                if self.now_ns().saturating_sub(last) > timeout_ns {
                    self.link_failed(link, PeerDown::Silent(self.cfg.peer_timeout));
                    continue;
                }
                // Skipped when traffic is queued: that traffic is behind
                // credits, and a heartbeat would only add to it.
                let _ = self.send_on(link, channel::LINK, &[LINK_HEARTBEAT], false);
            }
        }
    }

    /// Leaves cleanly: waits (up to 2 s) until what is queued has been
    /// delivered, then says goodbye on every bootstrap connection.
    fn stop(&self) {
        if self.stopping.swap(true, Ordering::AcqRel) {
            return;
        }
        let deadline = Instant::now() + Duration::from_secs(2);
        for l in self.installed() {
            if l.state.load(Ordering::Acquire) != ALIVE {
                continue;
            }
            while Instant::now() < deadline {
                {
                    let tx = l.tx.lock().expect("lock");
                    if tx.closed || (tx.pending.is_empty() && tx.free.len() == SEND_SLOTS) {
                        break;
                    }
                }
                thread::sleep(Duration::from_millis(1));
            }
            let mut s = &l.tcp;
            let _ = handshake::write_frame(&mut s, CH_GOODBYE, &[]);
            let _ = l.tcp.shutdown(Shutdown::Write);
        }
        self.poller_exit.store(true, Ordering::Release);
    }

    /// Closes every bootstrap connection so that the watcher threads end and
    /// the verbs resources can be freed.
    fn close_all(&self) {
        self.poller_exit.store(true, Ordering::Release);
        for l in self.installed() {
            let _ = l.tcp.shutdown(Shutdown::Both);
        }
    }
}

fn wc_status_name(status: ibverbs::ibv_wc_status::Type) -> &'static str {
    use ibverbs::ibv_wc_status::*;
    match status {
        IBV_WC_LOC_LEN_ERR => "local length error",
        IBV_WC_LOC_QP_OP_ERR => "local QP operation error",
        IBV_WC_LOC_PROT_ERR => "local protection error",
        IBV_WC_WR_FLUSH_ERR => "work request flushed",
        IBV_WC_REM_INV_REQ_ERR => "remote invalid request",
        IBV_WC_REM_ACCESS_ERR => "remote access error",
        IBV_WC_REM_OP_ERR => "remote operation error",
        IBV_WC_RETRY_EXC_ERR => "transport retry counter exceeded (peer unreachable)",
        IBV_WC_RNR_RETRY_EXC_ERR => "receiver-not-ready retry counter exceeded",
        IBV_WC_FATAL_ERR => "fatal error",
        IBV_WC_GENERAL_ERR => "general error",
        _ => "error",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixStream;

    fn frame(len: usize) -> (u8, Vec<u8>) {
        (7, (0..len - 1).map(|i| (i * 31 + 5) as u8).collect())
    }

    /// Fragments a frame like the send path does and reassembles it.
    fn roundtrip(len: usize, chunk: usize, asm: &mut Reassembler) -> Vec<u8> {
        let (ch, payload) = frame(len);
        let mut out = None;
        for (off, n, flags) in fragments(len, chunk) {
            let mut msg = vec![0u8; MSG_HEADER + n];
            let h = MsgHeader {
                kind: KIND_DATA,
                flags,
                credits: 0,
                total: if flags & FLAG_FIRST != 0 {
                    len as u32
                } else {
                    0
                },
            };
            h.write(&mut msg);
            write_body(&mut msg[MSG_HEADER..], ch, &payload, off);
            let h = MsgHeader::read(&msg).unwrap();
            assert!(out.is_none(), "frame delivered before its last fragment");
            out = asm
                .push(&h, &msg[MSG_HEADER..], 1 << 20)
                .unwrap()
                .map(|b| b.to_vec());
        }
        let out = out.expect("frame delivered");
        assert_eq!(out[0], ch);
        assert_eq!(&out[1..], &payload[..]);
        out
    }

    #[test]
    fn rdma_header_roundtrips() {
        let h = MsgHeader {
            kind: KIND_DATA,
            flags: FLAG_FIRST,
            credits: 17,
            total: 123_456,
        };
        let mut b = [0u8; MSG_HEADER];
        h.write(&mut b);
        assert_eq!(MsgHeader::read(&b).unwrap(), h);
        assert!(MsgHeader::read(&b[..5]).unwrap_err().contains("shorter"));
    }

    #[test]
    fn rdma_wr_ids_roundtrip() {
        for (peer, recv, slot) in [(0, false, 0), (63, true, RECV_DEPTH - 1), (5, true, 3)] {
            assert_eq!(split_wr_id(wr_id(peer, recv, slot)), (peer, recv, slot));
        }
    }

    #[test]
    fn rdma_fragments_cover_frames_exactly() {
        for len in [1, 2, 99, 100, 101, 1000, 12_345] {
            let frags: Vec<_> = fragments(len, 100).collect();
            assert_eq!(frags.iter().map(|f| f.1).sum::<usize>(), len);
            assert_eq!(frags[0].2 & FLAG_FIRST, FLAG_FIRST);
            assert_eq!(frags.last().unwrap().2 & FLAG_LAST, FLAG_LAST);
            assert!(frags.iter().all(|f| f.1 >= 1 && f.1 <= 100));
            assert_eq!(frags.len(), len.div_ceil(100));
        }
        let mut asm = Reassembler::default();
        for len in [1, 2, 99, 100, 101, 1000, 12_345, 1, CHUNK + 1] {
            roundtrip(len, 100, &mut asm);
        }
        roundtrip(3 * CHUNK + 17, CHUNK, &mut asm);
        roundtrip(CHUNK, CHUNK, &mut asm);
    }

    #[test]
    fn rdma_reassembler_refuses_bad_framing() {
        let data = |flags, total| MsgHeader {
            kind: KIND_DATA,
            flags,
            credits: 0,
            total,
        };
        let mut a = Reassembler::default();
        let e = a
            .push(&data(FLAG_FIRST | FLAG_LAST, 5000), &[0; 5000], 4096)
            .unwrap_err();
        assert!(e.contains("outside 1..=4096"), "{e}");
        let e = a.push(&data(FLAG_LAST, 0), &[1], 4096).unwrap_err();
        assert!(e.contains("without a first fragment"), "{e}");
        let e = a
            .push(&data(FLAG_FIRST | FLAG_LAST, 3), &[1, 2], 4096)
            .unwrap_err();
        assert!(e.contains("header says 3"), "{e}");
        assert!(a
            .push(&data(FLAG_FIRST, 10), &[1, 2], 4096)
            .unwrap()
            .is_none());
        let e = a.push(&data(FLAG_FIRST, 10), &[1, 2], 4096).unwrap_err();
        assert!(e.contains("before the previous one ended"), "{e}");
        let mut a = Reassembler::default();
        a.push(&data(FLAG_FIRST, 4), &[1, 2], 4096).unwrap();
        let e = a.push(&data(0, 0), &[1, 2, 3], 4096).unwrap_err();
        assert!(e.contains("exceed"), "{e}");
        let mut a = Reassembler::default();
        a.push(&data(FLAG_FIRST, 4), &[1, 2], 4096).unwrap();
        let e = a.push(&data(FLAG_LAST, 0), &[3], 4096).unwrap_err();
        assert!(e.contains("after 3 of its 4"), "{e}");
        let e = a.push(&data(0x80 | FLAG_FIRST, 1), &[3], 4096).unwrap_err();
        assert!(e.contains("flags"), "{e}");
        let e = a.push(&data(FLAG_FIRST, 1), &[], 4096).unwrap_err();
        assert!(e.contains("without data"), "{e}");
    }

    /// Two endpoints under the credit rules with random interleavings: no
    /// SEND ever finds the peer without a posted receive buffer, and all
    /// traffic drains (no credit deadlock), even when both sides stream.
    #[test]
    fn rdma_credit_flow_control_never_overruns_or_deadlocks() {
        #[derive(Default)]
        struct Side {
            credits: u32,
            owed: u32,
            posted: usize,
            pending: usize,
            sent_data: usize,
            got_data: usize,
        }
        // (is_data, credits carried)
        type Wire = VecDeque<(bool, u32)>;
        fn pump(s: &mut Side, wire: &mut Wire) {
            while s.pending > 0 && can_send_data(s.credits, 1) {
                s.pending -= 1;
                s.credits -= 1;
                s.sent_data += 1;
                wire.push_back((true, std::mem::take(&mut s.owed)));
            }
            if credit_message_due(s.owed, s.credits, 1) {
                s.credits -= 1;
                wire.push_back((false, std::mem::take(&mut s.owed)));
            }
        }
        fn receive(s: &mut Side, (data, credits): (bool, u32)) {
            assert!(s.posted > 0, "a SEND arrived with no receive buffer posted");
            s.posted -= 1;
            s.credits += credits;
            assert!(s.credits as usize <= RECV_DEPTH);
            if data {
                s.got_data += 1;
            }
            s.posted += 1;
            s.owed += 1;
        }
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut rand = move |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        };
        for round in 0..200 {
            let new = || Side {
                credits: RECV_DEPTH as u32,
                posted: RECV_DEPTH,
                ..Side::default()
            };
            let mut sides = [new(), new()];
            let mut wires: [Wire; 2] = [VecDeque::new(), VecDeque::new()];
            let bursts = 1 + rand(400) as usize;
            let one_way = round % 3 == 0;
            let mut queued = [0usize; 2];
            for _ in 0..bursts * 4 {
                match rand(4) {
                    0 | 1 => {
                        let i = if one_way { 0 } else { rand(2) as usize };
                        let k = 1 + rand(3 * RECV_DEPTH as u64) as usize;
                        sides[i].pending += k;
                        queued[i] += k;
                        pump(&mut sides[i], &mut wires[i]);
                    }
                    _ => {
                        let i = rand(2) as usize;
                        if let Some(m) = wires[i].pop_front() {
                            let j = 1 - i;
                            receive(&mut sides[j], m);
                            pump(&mut sides[j], &mut wires[j]);
                        }
                    }
                }
            }
            // Drain: deliver until quiet.
            let mut steps = 0;
            while !wires[0].is_empty() || !wires[1].is_empty() {
                for i in 0..2 {
                    if let Some(m) = wires[i].pop_front() {
                        receive(&mut sides[1 - i], m);
                        pump(&mut sides[1 - i], &mut wires[1 - i]);
                    }
                }
                steps += 1;
                assert!(steps < 1_000_000, "no progress");
            }
            for i in 0..2 {
                assert_eq!(
                    sides[i].pending, 0,
                    "round {round}: side {i} stuck with queued data"
                );
                assert_eq!(sides[1 - i].got_data, queued[i]);
                assert_eq!(sides[i].sent_data, queued[i]);
            }
        }
    }

    fn info() -> QpInfo {
        QpInfo::new(QueuePairEndpoint {
            num: u32::MAX,
            lid: u16::MAX,
            gid: Some(Gid::default()),
        })
    }

    #[test]
    fn rdma_endpoint_info_fits_a_handshake_frame_and_roundtrips() {
        let i = info();
        let b = i.encode();
        assert!(
            b.len() < handshake::MAX_HANDSHAKE_FRAME,
            "{} bytes",
            b.len()
        );
        assert_eq!(QpInfo::decode(&b).unwrap(), i);
        let mut other = info();
        other.v = 9;
        let e = i.check_peer(&other).unwrap_err().to_string();
        assert!(e.contains("version 9 is not supported"), "{e}");
        let mut other = info();
        other.depth = 8;
        assert!(i.check_peer(&other).is_err());
        assert!(QpInfo::decode(b"{]").is_err());
    }

    fn exp(local: NodeId) -> Expect {
        Expect {
            cluster_id: 42,
            local,
            nodes: 2,
        }
    }

    type DialResult = Result<((), QpInfo), BootstrapError>;
    type AcceptResult = Result<(NodeId, (), QpInfo), BootstrapError>;

    /// Runs both bootstrap sides over a socket pair; counts queue pairs made.
    fn bootstrap_pair(
        dial_key: &'static [u8],
        accept_key: &'static [u8],
    ) -> (DialResult, AcceptResult, usize) {
        let made = Arc::new(AtomicU64::new(0));
        let (mut a, mut b) = UnixStream::pair().unwrap();
        let m = made.clone();
        let t = thread::spawn(move || {
            bootstrap_accept(&mut b, accept_key, &exp(0), |peer| {
                assert_eq!(peer, 1);
                m.fetch_add(1, Ordering::SeqCst);
                Ok(((), info()))
            })
        });
        let m = made.clone();
        let d = bootstrap_dial(&mut a, dial_key, &exp(1), 0, || {
            m.fetch_add(1, Ordering::SeqCst);
            Ok(((), info()))
        });
        drop(a);
        let acc = t.join().unwrap();
        (d, acc, made.load(Ordering::SeqCst) as usize)
    }

    #[test]
    fn rdma_bootstrap_trades_endpoints_after_authentication() {
        let (d, a, made) = bootstrap_pair(b"0123456789abcdef", b"0123456789abcdef");
        assert_eq!(d.unwrap().1, info());
        let (peer, (), theirs) = a.unwrap();
        assert_eq!((peer, theirs), (1, info()));
        assert_eq!(made, 2);
    }

    #[test]
    fn rdma_bootstrap_gives_a_stranger_no_queue_pair() {
        let (d, a, made) = bootstrap_pair(b"wrong key wrong key", b"0123456789abcdef");
        assert!(
            matches!(a, Err(BootstrapError::Handshake(HandshakeError::BadKey))),
            "{a:?}"
        );
        assert!(d.is_err());
        assert_eq!(
            made, 0,
            "a queue pair was created for an unauthenticated peer"
        );
    }

    /// Runs everywhere: without a device `connect` must say so at once.
    #[test]
    fn rdma_connect_without_device_is_unavailable() {
        if ibverbs::devices().is_ok_and(|l| !l.is_empty()) {
            eprintln!("skipping: this host has an RDMA device");
            return;
        }
        struct Null;
        impl FrameSink for Null {
            fn on_frame(&self, _: NodeId, _: u8, _: &[u8]) {}
            fn on_peer_down(&self, _: NodeId, _: PeerDown) {}
        }
        let cfg = ClusterConfig::new(
            1,
            0,
            vec![
                "127.0.0.1:1".parse().unwrap(),
                "127.0.0.1:2".parse().unwrap(),
            ],
            b"0123456789abcdef".to_vec(),
        );
        let t = Instant::now();
        let e = RdmaTransport::connect(&cfg, Arc::new(Null)).unwrap_err();
        assert!(
            t.elapsed() < Duration::from_secs(2),
            "took {:?}",
            t.elapsed()
        );
        let TransportError::Unavailable(msg) = &e else {
            panic!("expected Unavailable, got {e:?}");
        };
        assert!(msg.starts_with("no RDMA device found"), "{msg}");
        assert!(e.to_string().contains("TCP transport"), "{e}");
    }
}
