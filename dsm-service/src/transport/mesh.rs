//! Bringing up the full mesh, shared by the transports: the node with the
//! higher id dials the lower one, so each pair gets exactly one connection;
//! start-up waits until every peer is linked, a peer refuses us, or the
//! connect timeout passes (naming the nodes that never came).
//!
//! [`start`] runs the threads every transport has (the acceptor and the
//! heartbeat) and the dialers; a transport brings only its bootstrap (what
//! it does over a fresh TCP connection) and its heartbeat tick, through
//! [`MeshSide`].

use std::io;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use tracing::{debug, warn};

use super::handshake::{self, HandshakeError, HANDSHAKE_TIMEOUT};
use super::peers::{PeerLink, Peers};
use super::TransportError;
use crate::{ClusterConfig, NodeId};

/// Why bringing up a link over a fresh connection failed.
#[derive(Debug)]
pub(crate) enum BootstrapError {
    /// The handshake (or a transport's exchange after it) failed.
    Handshake(HandshakeError),
    /// This node could not (or would not) set up the link.
    #[cfg_attr(not(feature = "rdma"), allow(dead_code))]
    Local(TransportError),
    /// The authenticated peer already has a link.
    AlreadyConnected(NodeId),
}

impl From<HandshakeError> for BootstrapError {
    fn from(e: HandshakeError) -> Self {
        BootstrapError::Handshake(e)
    }
}

impl BootstrapError {
    /// The reason logged when the acceptor refuses the connection.
    fn refusal_reason(&self) -> String {
        match self {
            BootstrapError::Handshake(e) => handshake::refusal_reason(e),
            BootstrapError::Local(e) => e.to_string(),
            BootstrapError::AlreadyConnected(peer) => already_connected(*peer),
        }
    }
}

/// The refusal reason for a second connection from `peer`.
pub(crate) fn already_connected(peer: NodeId) -> String {
    format!("node {peer} is already connected")
}

/// The error of a link set up for a `peer` that already has one.
pub(crate) fn already_connected_error(peer: NodeId) -> TransportError {
    TransportError::Refused {
        peer,
        reason: already_connected(peer),
    }
}

/// What the mesh needs from a transport's internals.
pub(crate) trait MeshSide: Send + Sync + 'static {
    /// The transport's per-peer link.
    type Link: PeerLink;
    /// Its peers.
    fn peers(&self) -> &Peers<Self::Link>;
    /// Runs the dialer's bootstrap with `peer` over a fresh connection (its
    /// handshake timeouts set) and links it.
    fn dial_bootstrap(
        self: &Arc<Self>,
        stream: TcpStream,
        peer: NodeId,
    ) -> Result<(), BootstrapError>;
    /// Runs the acceptor's bootstrap over an accepted connection (its
    /// handshake timeouts set) and links the peer.
    fn accept_bootstrap(self: &Arc<Self>, stream: TcpStream) -> Result<(), BootstrapError>;
    /// One heartbeat period has passed for a live link.
    fn heartbeat(&self, link: &Arc<Self::Link>);
    /// Tears down what was started (start-up failed).
    fn abort(&self);
}

/// Starts a transport thread named `name` (a thread that cannot be started
/// is a broken host: that panics, naming the thread).
pub(crate) fn spawn(name: String, f: impl FnOnce() + Send + 'static) {
    if let Err(e) = thread::Builder::new().name(name.clone()).spawn(f) {
        panic!("cannot start thread {name}: {e}");
    }
}

/// Binds this node's listen address.
pub(crate) fn listen(cfg: &ClusterConfig) -> Result<TcpListener, TransportError> {
    let addr = cfg.addrs[usize::from(cfg.node_id)];
    TcpListener::bind(addr).map_err(|source| TransportError::Listen { addr, source })
}

/// Starts the acceptor and heartbeat threads (named `fv-{tag}accept-N`,
/// `fv-{tag}heartbeat-N`), then a dialer per lower-id peer, and waits for
/// the whole mesh.
pub(crate) fn start<S: MeshSide>(
    side: &Arc<S>,
    listener: TcpListener,
    tag: &str,
) -> Result<(), TransportError> {
    let me = side.peers().me();
    {
        let side = side.clone();
        let handshake_thread = format!("fv-{tag}handshake");
        spawn(format!("fv-{tag}accept-{me}"), move || {
            let s = side.clone();
            accept_loop(
                listener,
                side.peers().stop_flag(),
                me,
                &handshake_thread,
                move |stream, from| accept_one(&s, stream, from),
            )
        });
    }
    {
        let side = side.clone();
        spawn(format!("fv-{tag}heartbeat-{me}"), move || {
            heartbeat_loop(&*side)
        });
    }
    establish(side, tag)
}

/// Starts a dialer thread per lower-id peer and waits for the whole mesh.
fn establish<S: MeshSide>(side: &Arc<S>, tag: &str) -> Result<(), TransportError> {
    let cfg = &side.peers().cfg;
    let me = cfg.node_id;
    let n = cfg.nodes();
    let deadline = Instant::now() + cfg.connect_timeout;
    let (err_tx, err_rx) = std::sync::mpsc::channel();
    for peer in 0..me {
        let side = side.clone();
        let err_tx = err_tx.clone();
        spawn(format!("fv-{tag}dial-{me}-{peer}"), move || {
            if let Err(e) = dial(&side, peer, deadline) {
                let _ = err_tx.send(e);
                side.peers().up().1.notify_all();
            }
        });
    }
    drop(err_tx);
    let (up_lock, up_cv) = side.peers().up();
    let mut up = up_lock.lock().expect("lock");
    while *up < n - 1 {
        let failure = if let Ok(e) = err_rx.try_recv() {
            Some(e)
        } else if let Some(e) = side.peers().start_failure() {
            Some(e)
        } else if Instant::now() >= deadline {
            Some(TransportError::ConnectTimeout {
                secs: cfg.connect_timeout.as_secs(),
                missing: (0..n as NodeId)
                    .filter(|&p| p != me && !side.peers().linked(p))
                    .collect(),
            })
        } else {
            None
        };
        if let Some(e) = failure {
            drop(up);
            side.abort();
            return Err(e);
        }
        let wait = deadline
            .saturating_duration_since(Instant::now())
            .min(Duration::from_millis(50));
        up = up_cv.wait_timeout(up, wait).expect("lock").0;
    }
    Ok(())
}

/// Connects to `peer` (a lower id) and runs the dialer's bootstrap, retrying
/// until `deadline` while the peer is not up or closes early.
fn dial<S: MeshSide>(side: &Arc<S>, peer: NodeId, deadline: Instant) -> Result<(), TransportError> {
    let peers = side.peers();
    let addr = peers.cfg.addrs[usize::from(peer)];
    loop {
        if peers.stopping() {
            return Ok(());
        }
        let stream = match TcpStream::connect_timeout(&addr, Duration::from_millis(500)) {
            Ok(s) => s,
            Err(e) => {
                if Instant::now() >= deadline {
                    return Err(TransportError::ConnectTimeout {
                        secs: peers.cfg.connect_timeout.as_secs(),
                        missing: vec![peer],
                    });
                }
                debug!(node = peers.me(), peer, error = %e, "peer not up yet");
                thread::sleep(Duration::from_millis(50));
                continue;
            }
        };
        let _ = stream.set_read_timeout(Some(HANDSHAKE_TIMEOUT));
        let _ = stream.set_write_timeout(Some(HANDSHAKE_TIMEOUT));
        match side.dial_bootstrap(stream, peer) {
            Ok(()) => return Ok(()),
            Err(BootstrapError::Local(e)) => return Err(e),
            Err(BootstrapError::AlreadyConnected(p)) => return Err(already_connected_error(p)),
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

/// Runs the acceptor's bootstrap on one accepted connection, under the
/// handshake timeouts; a failure is counted and reported as a refusal.
fn accept_one<S: MeshSide>(side: &Arc<S>, stream: TcpStream, from: SocketAddr) {
    let _ = stream.set_nonblocking(false);
    let _ = stream.set_read_timeout(Some(HANDSHAKE_TIMEOUT));
    let _ = stream.set_write_timeout(Some(HANDSHAKE_TIMEOUT));
    if let Err(e) = side.accept_bootstrap(stream) {
        let reason = e.refusal_reason();
        side.peers().refuse(from, &reason);
        // A member with the key but another VM: the cluster cannot start.
        if let BootstrapError::Handshake(HandshakeError::Layout { theirs_id, .. }) = e {
            side.peers().fail_start(TransportError::Mismatch {
                peer: theirs_id,
                reason,
            });
        }
    }
}

/// Ticks every quarter of the peer timeout (20 ms at least) until the
/// transport stops, calling the transport's heartbeat for each live link.
fn heartbeat_loop<S: MeshSide>(side: &S) {
    let peers = side.peers();
    let period = (peers.cfg.peer_timeout / 4).max(Duration::from_millis(20));
    while !peers.stopping() {
        thread::sleep(period);
        for link in peers.installed() {
            if peers.stopping() {
                return;
            }
            if link.state().is_alive() {
                side.heartbeat(link);
            }
        }
    }
}

/// Accepts connections until `stopping` is set, handing each to `handle` in
/// a short-lived thread named `thread_name` (its handshake), so a slow or
/// hostile stranger never holds up the others.
fn accept_loop(
    listener: TcpListener,
    stopping: &AtomicBool,
    node: NodeId,
    thread_name: &str,
    handle: impl Fn(TcpStream, SocketAddr) + Clone + Send + 'static,
) {
    listener
        .set_nonblocking(true)
        .expect("nonblocking listener");
    while !stopping.load(Ordering::Acquire) {
        match listener.accept() {
            Ok((stream, from)) => {
                let handle = handle.clone();
                let _ = thread::Builder::new()
                    .name(thread_name.into())
                    .spawn(move || handle(stream, from));
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                thread::sleep(Duration::from_millis(20))
            }
            Err(e) => {
                warn!(node, error = %e, "accept failed");
                thread::sleep(Duration::from_millis(100));
            }
        }
    }
}
