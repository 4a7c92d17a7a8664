//! How nodes talk: the [`Transport`] trait and its implementations.
//!
//! A transport gives every pair of nodes one reliable, authenticated,
//! message-framed connection, sealed (encrypted and integrity-protected) by
//! default ([`sealed`]). See `transport/WIRE.md` for the bytes.
//!
//! * [`tcp::TcpTransport`]: TCP, always available and always tested;
//! * `rdma::RdmaTransport` (feature `rdma`): InfiniBand/RoCE verbs.
//!
//! Both are built on the same pieces: `mesh.rs` brings the full mesh up (the
//! dialing rule, the accept loop, the dialers, the heartbeat thread) and
//! `peers.rs` keeps what every transport knows about its peers (the link
//! table and each link's life, `LINK` frames, frame-size checks, peer-down
//! reports, counters); [`handshake`] authenticates every connection.

pub mod handshake;
mod mesh;
mod peers;
#[cfg(feature = "rdma")]
pub mod rdma;
pub mod sealed;
pub mod tcp;

use std::io;
use std::sync::Arc;
use std::time::Duration;

use crate::NodeId;

/// Channel numbers: the first byte of every frame.
pub mod channel {
    /// Transport-internal: heartbeats and goodbyes.
    pub const LINK: u8 = 0;
    /// Coherence protocol messages.
    pub const COHERENCE: u8 = 1;
    /// DSM control: start-up state, barriers.
    pub const DSM_CONTROL: u8 = 2;
    /// First channel free for the embedding application (QEMU's forwarding).
    pub const APP_BASE: u8 = 16;
    /// Benchmarks (round-trip floor).
    pub const BENCH: u8 = 15;
}

/// Why a peer is gone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PeerDown {
    /// It said goodbye: a clean exit.
    Left,
    /// The connection broke (closed, reset).
    Disconnected(String),
    /// Nothing arrived for longer than the peer timeout.
    Silent(Duration),
    /// It sent something that breaks the protocol.
    ProtocolError(String),
}

impl std::fmt::Display for PeerDown {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PeerDown::Left => write!(f, "left the cluster"),
            PeerDown::Disconnected(e) => write!(f, "connection lost: {e}"),
            PeerDown::Silent(t) => {
                write!(f, "no message or heartbeat for {:.1} s", t.as_secs_f64())
            }
            PeerDown::ProtocolError(e) => write!(f, "protocol error: {e}"),
        }
    }
}

/// Receives what a transport delivers. Called from the transport's receive
/// threads; must not block for long.
///
/// Every transport guarantees that the frames from one peer are delivered in
/// the order that peer sent them, one at a time (the coherence protocol's
/// direct grants rely on it; see `coherence/PROTOCOL.md`).
pub trait FrameSink: Send + Sync {
    /// A frame arrived from an authenticated peer on `channel`.
    fn on_frame(&self, from: NodeId, channel: u8, payload: &[u8]);
    /// A peer is gone (failed, or left cleanly).
    fn on_peer_down(&self, peer: NodeId, why: PeerDown);
}

/// Errors of a transport.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// Binding the listen address failed.
    #[error("cannot listen on {addr}")]
    Listen {
        /// The address.
        addr: std::net::SocketAddr,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// Some peers did not come up in time.
    #[error("timed out after {secs} s waiting for node(s) {missing:?} to connect")]
    ConnectTimeout {
        /// Seconds waited.
        secs: u64,
        /// Node ids that never connected.
        missing: Vec<NodeId>,
    },
    /// A peer refused us during the handshake.
    #[error("node {peer} refused the connection: {reason}")]
    Refused {
        /// The peer.
        peer: NodeId,
        /// Its reason.
        reason: String,
    },
    /// An authenticated peer cannot join this cluster (it runs another VM).
    #[error("node {peer} cannot join: {reason}")]
    Mismatch {
        /// The peer.
        peer: NodeId,
        /// Why.
        reason: String,
    },
    /// The handshake with a peer failed.
    #[error("handshake with node {peer} failed: {source}")]
    Handshake {
        /// The peer.
        peer: NodeId,
        /// Cause.
        #[source]
        source: handshake::HandshakeError,
    },
    /// The peer is not connected (down or left).
    #[error("node {0} is not connected")]
    PeerDown(NodeId),
    /// A frame larger than the limit.
    #[error("frame of {len} bytes exceeds the {max}-byte limit")]
    FrameTooLarge {
        /// Size.
        len: usize,
        /// Limit.
        max: usize,
    },
    /// Sending failed.
    #[error("sending to node {peer} failed")]
    Send {
        /// The peer.
        peer: NodeId,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// The transport is not available on this host.
    #[error("transport unavailable: {0}")]
    Unavailable(String),
}

/// One connection per peer pair, framed, authenticated.
pub trait Transport: Send + Sync {
    /// This node's id.
    fn local_id(&self) -> NodeId;
    /// Number of nodes in the cluster.
    fn nodes(&self) -> usize;
    /// Sends one frame to `to` on `channel`. Never blocks on a slow peer for
    /// long: what the socket does not take at once is queued and written by
    /// the peer's writer thread, in order.
    fn send(&self, to: NodeId, channel: u8, payload: &[u8]) -> Result<(), TransportError>;
    /// Tells every peer that this node leaves cleanly, then closes.
    fn shutdown(&self);
}

/// A shared transport.
pub type SharedTransport = Arc<dyn Transport>;

/// `n` free TCP addresses on a loopback address of its own for a cluster
/// whose nodes all run on this machine.
///
/// A port found free (bound to port 0, then released) may be taken again
/// before the node binds it, by another local cluster doing the same or as
/// the source port of an outgoing connection. Each call therefore picks a
/// random address in 127.0.0.0/8 (all of it is loopback on Linux), so that
/// clusters started side by side do not share addresses; it falls back to
/// 127.0.0.1 where that address cannot be bound.
pub fn free_loopback_addrs(n: usize) -> io::Result<Vec<std::net::SocketAddr>> {
    use std::net::{Ipv4Addr, TcpListener};
    let r = handshake::random_nonce();
    let ip = Ipv4Addr::new(127, r[0], r[1], 1 + r[2] % 254);
    let bind_all = |ip: Ipv4Addr| -> io::Result<Vec<std::net::SocketAddr>> {
        let ls: Vec<TcpListener> = (0..n)
            .map(|_| TcpListener::bind((ip, 0)))
            .collect::<io::Result<_>>()?;
        ls.iter().map(TcpListener::local_addr).collect()
    };
    bind_all(ip).or_else(|_| bind_all(Ipv4Addr::LOCALHOST))
}
