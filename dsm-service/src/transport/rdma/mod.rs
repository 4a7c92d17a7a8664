//! The RDMA transport (feature `rdma`): the same full mesh, framing and
//! failure semantics as [`super::tcp::TcpTransport`], with the frames carried
//! by two-sided SEND/RECV on reliable-connected (RC) queue pairs.
//!
//! * **Bootstrap** (`bootstrap.rs`). Each pair of nodes first connects over
//!   TCP to the same addresses as the TCP transport (the higher id dials the
//!   lower one) and runs the versioned, authenticated handshake of
//!   [`super::handshake`]. Only once the peer has proven the cluster key does
//!   a node create a queue pair for it; the endpoints (QP number, LID, GID)
//!   are then traded over that authenticated connection. A stranger never
//!   learns a QP number, and the queue pairs allow no remote memory access
//!   (local write only).
//! * **Data** (`wire.rs`). A frame (channel byte + payload, at most
//!   `max_frame` bytes) is cut into fragments of at most [`SLOT_BYTES`] bytes
//!   including an 8-byte header, copied into a registered send slot and
//!   posted as one SEND. The receiver keeps [`RECV_DEPTH`] registered receive
//!   buffers posted per peer; one poller thread per transport (`poll.rs`)
//!   polls the shared completion queue, reassembles frames, calls
//!   [`FrameSink::on_frame`] and reposts buffers.
//! * **Flow control** (`flow.rs`). Credits: a sender starts with
//!   [`RECV_DEPTH`] credits, each SEND costs one, and the receiver returns one
//!   per reposted buffer, piggybacked on its own traffic or in a credit-only
//!   message once half the window is owed. Data keeps one credit in reserve
//!   so that credit messages can always flow: the receiver never runs out of
//!   posted buffers (no RNR) and two nodes streaming at each other cannot
//!   deadlock. What cannot be posted at once is queued per peer, in order,
//!   and posted by the poller as credits and send slots come back, so `send`
//!   never blocks.
//! * **Failure.** Heartbeats every `peer_timeout / 4` on [`channel::LINK`], a
//!   silent peer is [`PeerDown::Silent`], a failed work completion (retry
//!   exceeded: the peer's QP is gone) or the bootstrap TCP connection closing
//!   (the peer process died) is [`PeerDown::Disconnected`]. The bootstrap
//!   connection stays open for that, and carries the goodbye of a clean exit
//!   ([`PeerDown::Left`]) after the node's queued frames have been delivered.
//!
//! The device, protection domain and completion queue are `device.rs`'s.
//! `transport/WIRE.md` documents the bytes.

mod bootstrap;
mod device;
mod flow;
mod poll;
mod wire;

use std::net::{Shutdown, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ibverbs::QueuePair;
use tracing::info;

use super::handshake;
use super::mesh::{self, BootstrapError, MeshSide};
use super::peers::{self, LinkState, PeerLink, Peers, LEAVE_DRAIN, LINK_HEARTBEAT};
use super::{channel, FrameSink, PeerDown, Transport, TransportError};
use crate::{ClusterConfig, NodeId};

use device::Verbs;
use flow::TxState;
use poll::RxState;

pub use device::DEVICE_ENV;
pub use wire::{MSG_HEADER, RDMA_WIRE_VERSION};

/// Size of one registered send or receive buffer: the largest SEND.
pub const SLOT_BYTES: usize = 32 << 10;
/// Receive buffers posted per peer, which is also the initial credit count.
pub const RECV_DEPTH: usize = 32;
/// Registered send slots per peer.
const SEND_SLOTS: usize = RECV_DEPTH;

/// A full-mesh RDMA transport.
pub struct RdmaTransport {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for RdmaTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RdmaTransport")
            .field("node", &self.inner.peers.me())
            .field("device", &self.inner.verbs.name)
            .finish()
    }
}

/// Why the RDMA transport refuses `transport-security=aead`.
pub const RDMA_IN_CLEAR: &str = "the RDMA transport does not seal its frames: \
     start every node with transport-security=auth-only to run RDMA authenticated \
     but in clear, on a fabric you trust, or use TCP";

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
        if cfg.security != crate::TransportSecurity::AuthOnly {
            return Err(TransportError::Unavailable(RDMA_IN_CLEAR.to_string()));
        }
        info!(node = me, device = %verbs.name, gid_index = ?verbs.gid_index, "RDMA device opened");
        let listener = mesh::listen(cfg)?;
        let inner = Arc::new(Inner {
            peers: Peers::new(cfg, sink),
            verbs,
            poller_exit: AtomicBool::new(false),
            epoch: AtomicU64::new(0),
            start: Instant::now(),
        });
        {
            let inner = inner.clone();
            mesh::spawn(format!("fv-rdma-poll-{me}"), move || inner.poll_loop());
        }
        mesh::start(&inner, listener, "rdma-")?;
        info!(node = me, peers = n - 1, "RDMA cluster mesh is up");
        Ok(Arc::new(RdmaTransport { inner }))
    }

    /// Bootstrap connections refused so far (strangers, malformed frames,
    /// wrong keys).
    pub fn refused_connections(&self) -> u64 {
        self.inner.peers.refused_connections()
    }

    /// Bytes sent and received on all queue pairs, message headers included.
    pub fn bytes(&self) -> (u64, u64) {
        self.inner.peers.bytes()
    }

    /// Name of the RDMA device in use.
    pub fn device_name(&self) -> &str {
        &self.inner.verbs.name
    }
}

impl Transport for RdmaTransport {
    fn local_id(&self) -> NodeId {
        self.inner.peers.me()
    }

    fn nodes(&self) -> usize {
        self.inner.peers.cfg.nodes()
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

struct Inner {
    peers: Peers<Link>,
    verbs: Arc<Verbs>,
    poller_exit: AtomicBool,
    /// Poller iterations, to let a goodbye wait for frames already received.
    epoch: AtomicU64,
    start: Instant,
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
    state: LinkState,
    /// Nanoseconds since `Inner::start` at the last receive.
    last_rx_ns: AtomicU64,
    /// The bootstrap connection, kept for liveness and the goodbye.
    tcp: TcpStream,
    _verbs: Arc<Verbs>,
}

impl PeerLink for Link {
    fn peer(&self) -> NodeId {
        self.peer
    }

    fn state(&self) -> &LinkState {
        &self.state
    }
}

impl MeshSide for Inner {
    type Link = Link;

    fn peers(&self) -> &Peers<Link> {
        &self.peers
    }

    fn dial_bootstrap(
        self: &Arc<Self>,
        stream: TcpStream,
        peer: NodeId,
    ) -> Result<(), BootstrapError> {
        Inner::dial_bootstrap(self, stream, peer)
    }

    fn accept_bootstrap(self: &Arc<Self>, stream: TcpStream) -> Result<(), BootstrapError> {
        Inner::accept_bootstrap(self, stream)
    }

    fn heartbeat(&self, link: &Arc<Link>) {
        let timeout = self.peers.cfg.peer_timeout;
        let last = link.last_rx_ns.load(Ordering::Acquire);
        if self.now_ns().saturating_sub(last) > timeout.as_nanos() as u64 {
            self.link_failed(link, PeerDown::Silent(timeout));
            return;
        }
        // Skipped when traffic is queued: that traffic is behind credits, and
        // a heartbeat would only add to it.
        let _ = self.send_on(link, channel::LINK, &[LINK_HEARTBEAT], false);
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

    fn send(&self, to: NodeId, ch: u8, payload: &[u8]) -> Result<(), TransportError> {
        self.peers.frame_len(payload)?;
        let link = self.peers.alive(to)?;
        self.send_on(link, ch, payload, true).map(|_| ())
    }

    fn link_failed(&self, link: &Link, why: PeerDown) {
        self.peers.report_down(link, why, || {
            {
                let mut tx = link.tx.lock().expect("lock");
                tx.closed = true;
                tx.pending.clear();
            }
            let _ = link.tcp.shutdown(Shutdown::Both);
        });
    }

    /// Leaves cleanly: waits (up to 2 s) until what is queued has been
    /// delivered, then says goodbye on every bootstrap connection.
    fn stop(&self) {
        if !self.peers.begin_stop() {
            return;
        }
        let deadline = Instant::now() + LEAVE_DRAIN;
        for l in self.peers.installed() {
            if !l.state.is_alive() {
                continue;
            }
            peers::wait_until(deadline, Duration::from_millis(1), || {
                let tx = l.tx.lock().expect("lock");
                tx.closed || tx.drained()
            });
            let mut s = &l.tcp;
            let _ = handshake::write_frame(&mut s, bootstrap::CH_GOODBYE, &[]);
            let _ = l.tcp.shutdown(Shutdown::Write);
        }
        self.poller_exit.store(true, Ordering::Release);
    }

    /// Closes every bootstrap connection so that the watcher threads end and
    /// the verbs resources can be freed.
    fn close_all(&self) {
        self.poller_exit.store(true, Ordering::Release);
        for l in self.peers.installed() {
            let _ = l.tcp.shutdown(Shutdown::Both);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
