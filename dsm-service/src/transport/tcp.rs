//! The TCP transport: a full mesh of authenticated connections, one per peer
//! pair (the node with the higher id dials the lower one).
//!
//! Each link has a receive thread (blocking reads, a read timeout equal to
//! the peer timeout, so silence is detected) and a writer thread. `send`
//! writes straight to the socket with `MSG_DONTWAIT` when nothing is queued —
//! the common, latency-critical case costs one `sendmsg` and no thread hop —
//! and queues whatever the socket does not take, in order, for the writer
//! thread. So a receive thread that answers a request never blocks on a full
//! socket, and two nodes streaming at each other cannot deadlock.
//!
//! Under `transport-security=aead` a frame is sealed under the same lock
//! that orders it onto the socket (so the sealing counter and the wire
//! order agree), and the receive thread opens each frame before it is
//! delivered ([`super::sealed`]).

use std::collections::VecDeque;
use std::io::{self, BufReader, Read};
use std::net::{Shutdown, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use tracing::{debug, info, warn};

use super::handshake::{self, Expect, Session};
use super::mesh::{self, BootstrapError, MeshSide};
use super::peers::{self, LinkState, PeerLink, Peers, LEAVE_DRAIN, LINK_GOODBYE, LINK_HEARTBEAT};
use super::sealed::{Opener, Sealer};
use super::{channel, FrameSink, PeerDown, Transport, TransportError};
use crate::{ClusterConfig, NodeId};

/// A full-mesh TCP transport.
pub struct TcpTransport {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for TcpTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TcpTransport")
            .field("node", &self.inner.peers.me())
            .finish()
    }
}

struct Inner {
    peers: Peers<Link>,
}

struct Link {
    peer: NodeId,
    stream: TcpStream,
    out: Mutex<OutQueue>,
    out_cv: Condvar,
    state: LinkState,
}

impl PeerLink for Link {
    fn peer(&self) -> NodeId {
        self.peer
    }

    fn state(&self) -> &LinkState {
        &self.state
    }
}

#[derive(Default)]
struct OutQueue {
    bufs: VecDeque<Vec<u8>>,
    writer_busy: bool,
    closed: bool,
    /// Seals outgoing frames (`None` under `auth-only`).
    sealer: Option<Sealer>,
    /// Where the next frame is sealed; kept to reuse its allocation.
    scratch: Vec<u8>,
}

impl TcpTransport {
    /// Listens on this node's address, connects to every peer and waits until
    /// the whole mesh is up (or `connect_timeout` passes, or a peer refuses us).
    pub fn connect(
        cfg: &ClusterConfig,
        sink: Arc<dyn FrameSink>,
    ) -> Result<Arc<TcpTransport>, TransportError> {
        let listener = mesh::listen(cfg)?;
        let inner = Arc::new(Inner {
            peers: Peers::new(cfg, sink),
        });
        mesh::start(&inner, listener, "")?;
        info!(
            node = cfg.node_id,
            peers = cfg.nodes() - 1,
            "cluster mesh is up"
        );
        Ok(Arc::new(TcpTransport { inner }))
    }

    /// Connections refused so far (strangers, malformed frames, wrong keys).
    pub fn refused_connections(&self) -> u64 {
        self.inner.peers.refused_connections()
    }

    /// Bytes sent and received on all links, frame headers included.
    pub fn bytes(&self) -> (u64, u64) {
        self.inner.peers.bytes()
    }
}

impl Transport for TcpTransport {
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

impl Drop for TcpTransport {
    fn drop(&mut self) {
        self.inner.stop();
    }
}

impl MeshSide for Inner {
    type Link = Link;

    fn peers(&self) -> &Peers<Link> {
        &self.peers
    }

    fn dial_bootstrap(
        self: &Arc<Self>,
        mut stream: TcpStream,
        peer: NodeId,
    ) -> Result<(), BootstrapError> {
        let cfg = &self.peers.cfg;
        let session = handshake::dial(&mut stream, &cfg.key, &Expect::for_node(cfg), peer)?;
        self.install(session, stream);
        Ok(())
    }

    fn accept_bootstrap(self: &Arc<Self>, mut stream: TcpStream) -> Result<(), BootstrapError> {
        let cfg = &self.peers.cfg;
        let session = handshake::accept(&mut stream, &cfg.key, &Expect::for_node(cfg))?;
        let peer = session.peer;
        if self.peers.linked(peer) {
            handshake::send_reject(&mut stream, &mesh::already_connected(peer));
            return Err(BootstrapError::AlreadyConnected(peer));
        }
        self.install(session, stream);
        Ok(())
    }

    fn heartbeat(&self, link: &Arc<Link>) {
        let _ = self.send(link.peer, channel::LINK, &[LINK_HEARTBEAT]);
    }

    fn abort(&self) {
        self.stop();
    }
}

impl Inner {
    fn send(&self, to: NodeId, ch: u8, payload: &[u8]) -> Result<(), TransportError> {
        let len = self.peers.frame_len(payload)? + self.peers.cfg.security.overhead();
        let link = self.peers.alive(to)?;
        let mut hdr = [0u8; 5];
        hdr[..4].copy_from_slice(&(len as u32).to_le_bytes());
        hdr[4] = ch;
        self.peers
            .bytes_sent
            .fetch_add(len as u64 + 4, Ordering::Relaxed);
        let mut guard = link.out.lock().expect("lock");
        let q = &mut *guard;
        if q.closed {
            return Err(TransportError::PeerDown(to));
        }
        let Some(sealer) = q.sealer.as_mut() else {
            return self.push(link, guard, &hdr, payload, None);
        };
        let mut frame = std::mem::take(&mut q.scratch);
        frame.clear();
        frame.extend_from_slice(&hdr);
        frame.extend_from_slice(payload);
        if let Err(e) = sealer.seal_frame(&mut frame) {
            drop(guard);
            self.link_failed(link, PeerDown::ProtocolError(e.to_string()));
            return Err(TransportError::PeerDown(to));
        }
        self.push(link, guard, &[], &[], Some(frame))
    }

    /// Puts one frame on the wire in order: written straight to the socket
    /// when nothing is queued, whatever it does not take queued for the
    /// writer thread. The frame is `hdr` then `payload`, or the sealed
    /// `frame` (whose allocation is kept for the next one when it all went).
    fn push(
        &self,
        link: &Link,
        mut q: std::sync::MutexGuard<'_, OutQueue>,
        hdr: &[u8],
        payload: &[u8],
        frame: Option<Vec<u8>>,
    ) -> Result<(), TransportError> {
        let (a, b) = match &frame {
            Some(f) => (&f[..], &[][..]),
            None => (hdr, payload),
        };
        let total = a.len() + b.len();
        let mut sent = 0;
        if q.bufs.is_empty() && !q.writer_busy {
            sent = match send_dontwait(&link.stream, a, b) {
                Ok(n) => n,
                Err(e) => {
                    drop(q);
                    self.link_failed(link, PeerDown::Disconnected(e.to_string()));
                    return Err(TransportError::Send {
                        peer: link.peer,
                        source: e,
                    });
                }
            };
        }
        match frame {
            Some(f) if sent == total => q.scratch = f,
            Some(mut f) => {
                f.drain(..sent);
                q.bufs.push_back(f);
            }
            None if sent == total => {}
            None => {
                let mut rest = Vec::with_capacity(total - sent);
                if sent < a.len() {
                    rest.extend_from_slice(&a[sent..]);
                    rest.extend_from_slice(b);
                } else {
                    rest.extend_from_slice(&b[sent - a.len()..]);
                }
                q.bufs.push_back(rest);
            }
        }
        if sent < total {
            link.out_cv.notify_one();
        }
        Ok(())
    }

    fn install(self: &Arc<Self>, session: Session, stream: TcpStream) {
        let me = self.peers.me();
        let peer = session.peer;
        let (sealer, opener) = match session.keys {
            Some(k) => (Some(k.seal), Some(k.open)),
            None => (None, None),
        };
        let _ = stream.set_nodelay(true);
        let _ = stream.set_write_timeout(None);
        let _ = stream.set_read_timeout(Some(self.peers.cfg.peer_timeout));
        let reader = match stream.try_clone() {
            Ok(r) => r,
            Err(e) => {
                warn!(node = me, peer, error = %e, "cannot clone socket");
                return;
            }
        };
        let link = Arc::new(Link {
            peer,
            stream,
            out: Mutex::new(OutQueue {
                sealer,
                ..OutQueue::default()
            }),
            out_cv: Condvar::new(),
            state: LinkState::default(),
        });
        if !self.peers.install(link.clone()) {
            return;
        }
        {
            let inner = self.clone();
            let link = link.clone();
            mesh::spawn(format!("fv-rx-{me}-{peer}"), move || {
                inner.receive_loop(&link, reader, opener)
            });
        }
        {
            let inner = self.clone();
            mesh::spawn(format!("fv-tx-{me}-{peer}"), move || {
                inner.writer_loop(&link)
            });
        }
        debug!(node = me, peer, "link up");
        self.peers.link_up();
    }

    fn receive_loop(&self, link: &Link, reader: TcpStream, mut opener: Option<Opener>) {
        let overhead = self.peers.cfg.security.overhead();
        let (min, max) = (1 + overhead, self.peers.cfg.max_frame + overhead);
        let mut r = BufReader::with_capacity(256 << 10, reader);
        let mut body = Vec::new();
        let why = loop {
            let hdr = match read_frame(&mut r, &mut body, min, max) {
                Ok(hdr) => hdr,
                Err(PeerDown::Silent(_)) => break PeerDown::Silent(self.peers.cfg.peer_timeout),
                Err(e) => break e,
            };
            self.peers
                .bytes_received
                .fetch_add(body.len() as u64 + 4, Ordering::Relaxed);
            let clear = match opener.as_mut() {
                None => body.len(),
                Some(o) => match o.open_frame(hdr, &mut body) {
                    Ok(n) => n,
                    Err(e) => break PeerDown::ProtocolError(e.to_string()),
                },
            };
            if let Err(e) = self.peers.deliver(link, &body[..clear]) {
                break e;
            }
        };
        self.link_failed(link, why);
    }

    fn link_failed(&self, link: &Link, why: PeerDown) {
        self.peers.report_down(link, why, || {
            {
                let mut q = link.out.lock().expect("lock");
                q.closed = true;
                q.bufs.clear();
            }
            link.out_cv.notify_all();
            let _ = link.stream.shutdown(Shutdown::Both);
        });
    }

    fn writer_loop(&self, link: &Link) {
        loop {
            let buf = {
                let mut q = link.out.lock().expect("lock");
                loop {
                    if q.closed {
                        return;
                    }
                    if let Some(b) = q.bufs.pop_front() {
                        q.writer_busy = true;
                        break b;
                    }
                    q.writer_busy = false;
                    q = link.out_cv.wait(q).expect("lock");
                }
            };
            if let Err(e) = write_all(&link.stream, &buf) {
                self.link_failed(link, PeerDown::Disconnected(e.to_string()));
                return;
            }
        }
    }

    /// Leaves cleanly: queues a goodbye for every live peer, then lets the
    /// writer threads drain what is queued (up to 2 s).
    fn stop(&self) {
        if !self.peers.begin_stop() {
            return;
        }
        for l in self.peers.installed() {
            if l.state.is_alive() {
                let _ = self.send(l.peer, channel::LINK, &[LINK_GOODBYE]);
            }
        }
        let deadline = Instant::now() + LEAVE_DRAIN;
        for l in self.peers.installed() {
            peers::wait_until(deadline, Duration::from_millis(2), || {
                let q = l.out.lock().expect("lock");
                q.closed || (q.bufs.is_empty() && !q.writer_busy)
            });
            let _ = l.stream.shutdown(Shutdown::Write);
        }
    }
}

/// Reads one frame into `body` (channel byte first, or the sealed bytes and
/// their tag); returns its length prefix.
fn read_frame(
    r: &mut impl Read,
    body: &mut Vec<u8>,
    min: usize,
    max: usize,
) -> Result<[u8; 4], PeerDown> {
    let mut hdr = [0u8; 4];
    read_exact(r, &mut hdr)?;
    let len = u32::from_le_bytes(hdr) as usize;
    peers::check_frame_len(len, min, max).map_err(PeerDown::ProtocolError)?;
    body.resize(len, 0);
    read_exact(r, body)?;
    Ok(hdr)
}

fn read_exact(r: &mut impl Read, buf: &mut [u8]) -> Result<(), PeerDown> {
    r.read_exact(buf).map_err(|e| match e.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => PeerDown::Silent(Duration::ZERO),
        io::ErrorKind::UnexpectedEof => PeerDown::Disconnected("connection closed".into()),
        _ => PeerDown::Disconnected(e.to_string()),
    })
}

/// One non-blocking `sendmsg` of header + payload; returns bytes taken
/// (0 when the socket buffer is full).
fn send_dontwait(s: &TcpStream, hdr: &[u8], payload: &[u8]) -> io::Result<usize> {
    let mut iov = [
        libc::iovec {
            iov_base: hdr.as_ptr() as *mut libc::c_void,
            iov_len: hdr.len(),
        },
        libc::iovec {
            iov_base: payload.as_ptr() as *mut libc::c_void,
            iov_len: payload.len(),
        },
    ];
    // SAFETY: a zeroed msghdr is valid; we set only the iovec fields.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = iov.as_mut_ptr();
    msg.msg_iovlen = iov.len();
    loop {
        // SAFETY: `msg` points at two iovecs over live buffers that the kernel
        // only reads.
        let r =
            unsafe { libc::sendmsg(s.as_raw_fd(), &msg, libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL) };
        if r >= 0 {
            return Ok(r as usize);
        }
        let e = io::Error::last_os_error();
        match e.kind() {
            io::ErrorKind::WouldBlock => return Ok(0),
            io::ErrorKind::Interrupted => continue,
            _ => return Err(e),
        }
    }
}

/// Blocking write of a whole buffer (the writer thread's path).
fn write_all(s: &TcpStream, mut buf: &[u8]) -> io::Result<()> {
    while !buf.is_empty() {
        // SAFETY: writing from a live buffer of `buf.len()` bytes.
        let r = unsafe {
            libc::send(
                s.as_raw_fd(),
                buf.as_ptr().cast(),
                buf.len(),
                libc::MSG_NOSIGNAL,
            )
        };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        buf = &buf[r as usize..];
    }
    Ok(())
}
