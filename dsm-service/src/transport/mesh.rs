//! Bringing up the full mesh, shared by the transports: the node with the
//! higher id dials the lower one, so each pair gets exactly one connection;
//! start-up waits until every peer is linked, a peer refuses us, or the
//! connect timeout passes (naming the nodes that never came).

use std::io;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use tracing::warn;

use super::TransportError;
use crate::{ClusterConfig, NodeId};

/// What the mesh bootstrap needs from a transport's internals.
pub(crate) trait MeshSide: Send + Sync + 'static {
    /// Connects to `peer` (a lower id) and links it, retrying until `deadline`.
    fn dial(self: &Arc<Self>, peer: NodeId, deadline: Instant) -> Result<(), TransportError>;
    /// Whether `peer` is linked.
    fn linked(&self, peer: NodeId) -> bool;
    /// Links up so far, and the condition signalled when that changes.
    fn up(&self) -> (&Mutex<usize>, &Condvar);
    /// Tears down what was started (start-up failed).
    fn abort(&self);
}

/// Starts a dialer thread per lower-id peer and waits for the whole mesh.
pub(crate) fn establish<S: MeshSide>(
    side: &Arc<S>,
    cfg: &ClusterConfig,
    tag: &str,
) -> Result<(), TransportError> {
    let me = cfg.node_id;
    let n = cfg.nodes();
    let deadline = Instant::now() + cfg.connect_timeout;
    let (err_tx, err_rx) = std::sync::mpsc::channel();
    for peer in 0..me {
        let side = side.clone();
        let err_tx = err_tx.clone();
        thread::Builder::new()
            .name(format!("fv-{tag}dial-{me}-{peer}"))
            .spawn(move || {
                if let Err(e) = side.dial(peer, deadline) {
                    let _ = err_tx.send(e);
                    side.up().1.notify_all();
                }
            })
            .expect("spawn dialer");
    }
    drop(err_tx);
    let (up_lock, up_cv) = side.up();
    let mut up = up_lock.lock().expect("lock");
    while *up < n - 1 {
        let failure = if let Ok(e) = err_rx.try_recv() {
            Some(e)
        } else if Instant::now() >= deadline {
            Some(TransportError::ConnectTimeout {
                secs: cfg.connect_timeout.as_secs(),
                missing: (0..n as NodeId)
                    .filter(|&p| p != me && !side.linked(p))
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

/// Accepts connections until `stopping` is set, handing each to `handle` in
/// a short-lived thread named `thread_name` (its handshake), so a slow or
/// hostile stranger never holds up the others.
pub(crate) fn accept_loop(
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

/// Counts and reports a refused connection, on the log and on stderr (where
/// a user running nodes by hand sees it).
pub(crate) fn refuse(refused: &AtomicU64, node: NodeId, from: SocketAddr, why: &str) {
    refused.fetch_add(1, Ordering::Relaxed);
    warn!(node, %from, "refused connection from {from}: {why}");
    eprintln!("fragvisor-dsm: node {node}: refused connection from {from}: {why}");
}
