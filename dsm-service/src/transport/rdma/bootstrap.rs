//! The bootstrap of a queue pair over the authenticated TCP side channel:
//! the handshake first, then (and only then) a queue pair for the proven
//! peer, the endpoint exchange (`QP`), the receive buffers posted and
//! `READY` traded; afterwards the connection stays open as the link's
//! liveness signal and carries the `GOODBYE` of a clean exit.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ibverbs::{PreparedQueuePair, QueuePairEndpoint};
use serde::{Deserialize, Serialize};
use tracing::debug;

use super::device::wr_id;
use super::flow::TxState;
use super::poll::RxState;
use super::wire::RDMA_WIRE_VERSION;
use super::{Inner, Link, RECV_DEPTH, SEND_SLOTS, SLOT_BYTES};
use crate::transport::handshake::{self, Expect, HandshakeError};
use crate::transport::mesh::{self, already_connected_error, BootstrapError};
use crate::transport::peers::{self, LinkState};
use crate::transport::{PeerDown, TransportError};
use crate::NodeId;

/// Bootstrap frame (handshake framing): this side's queue-pair endpoint.
const CH_QP: u8 = 0xFC;
/// Bootstrap frame: this side's receive buffers are posted.
const CH_READY: u8 = 0xFB;
/// Bootstrap frame: a clean exit, after this node's queued SENDs completed.
pub(super) const CH_GOODBYE: u8 = 0xFA;

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
    let peer = handshake::accept(s, key, exp)?.peer;
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

impl Inner {
    /// The acceptor's side: a queue pair only for an authenticated peer that
    /// has none yet.
    pub(super) fn accept_bootstrap(
        self: &Arc<Self>,
        mut stream: TcpStream,
    ) -> Result<(), BootstrapError> {
        let cfg = &self.peers.cfg;
        let (peer, prepared, theirs) =
            bootstrap_accept(&mut stream, &cfg.key, &Expect::for_node(cfg), |peer| {
                if self.peers.linked(peer) {
                    return Err(already_connected_error(peer));
                }
                self.prepare()
            })?;
        self.finish_link(peer, stream, prepared, theirs)
            .map_err(BootstrapError::Local)
    }

    /// The dialer's side, with `peer`.
    pub(super) fn dial_bootstrap(
        self: &Arc<Self>,
        mut stream: TcpStream,
        peer: NodeId,
    ) -> Result<(), BootstrapError> {
        let cfg = &self.peers.cfg;
        let (prepared, theirs) =
            bootstrap_dial(&mut stream, &cfg.key, &Expect::for_node(cfg), peer, || {
                self.prepare()
            })?;
        self.finish_link(peer, stream, prepared, theirs)
            .map_err(BootstrapError::Local)
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
            tx: Mutex::new(TxState::new(tx_mr)),
            rx: Mutex::new(RxState::new(rx_mr)),
            owed: AtomicU32::new(0),
            state: LinkState::default(),
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
        if !self.peers.install(link.clone()) {
            return Err(already_connected_error(peer));
        }
        if let Err(source) = exchange_ready(&mut stream) {
            // Never reported up, so no peer-down event either.
            link.state.set_down();
            link.tx.lock().expect("lock").closed = true;
            let _ = link.tcp.shutdown(Shutdown::Both);
            return Err(TransportError::Handshake { peer, source });
        }
        let _ = stream.set_read_timeout(None);
        let _ = stream.set_write_timeout(None);
        let me = self.peers.me();
        {
            let inner = self.clone();
            let link = link.clone();
            mesh::spawn(format!("fv-rdma-watch-{me}-{peer}"), move || {
                inner.watch_loop(&link, stream)
            });
        }
        debug!(node = me, peer, device = %self.verbs.name, "RDMA link up");
        self.peers.link_up();
        Ok(())
    }

    /// Reads the bootstrap connection: a goodbye, or its loss (the peer
    /// process is gone).
    fn watch_loop(&self, link: &Link, mut stream: TcpStream) {
        let why = match handshake::read_handshake_frame(&mut stream) {
            Ok((CH_GOODBYE, _)) => {
                link.state.mark_left();
                // Let the poller deliver what arrived before the goodbye.
                let seen = self.epoch.load(Ordering::Acquire);
                let until = Instant::now() + Duration::from_millis(200);
                peers::wait_until(until, Duration::from_millis(1), || {
                    self.epoch.load(Ordering::Acquire) >= seen + 2
                });
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use ibverbs::Gid;
    use std::os::unix::net::UnixStream;
    use std::thread;

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
            security: crate::TransportSecurity::AuthOnly,
            layout: String::new(),
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

    #[test]
    fn rdma_endpoint_checks_name_each_mismatch() {
        let i = info();
        let mut other = info();
        other.slot = 4096;
        let e = i.check_peer(&other).unwrap_err().to_string();
        assert!(
            e.contains("peer uses 32 receive buffers of 4096 bytes"),
            "{e}"
        );
        let mut other = info();
        other.ep.gid = None;
        let e = i.check_peer(&other).unwrap_err().to_string();
        assert!(e.contains("routes with a GID"), "{e}");
        assert!(i.check_peer(&info()).is_ok());
    }

    #[test]
    fn rdma_bootstrap_refuses_a_peer_speaking_another_format() {
        let (mut a, mut b) = UnixStream::pair().unwrap();
        let t = thread::spawn(move || {
            let mut theirs = info();
            theirs.v = 9;
            exchange_info(&mut b, &theirs)
        });
        let e = exchange_info(&mut a, &info()).unwrap_err().to_string();
        assert!(e.contains("version 9 is not supported"), "{e}");
        drop(a);
        assert!(t.join().unwrap().is_err(), "the other side is rejected too");
    }
}
