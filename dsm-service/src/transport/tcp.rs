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

use std::collections::VecDeque;
use std::io::{self, BufReader, Read};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

use tracing::{debug, info, warn};

use super::handshake::{self, Expect, HandshakeError};
use super::mesh::{self, MeshSide};
use super::{channel, FrameSink, PeerDown, Transport, TransportError};
use crate::{ClusterConfig, NodeId};

use super::handshake::HANDSHAKE_TIMEOUT;

const LINK_HEARTBEAT: u8 = 0;
const LINK_GOODBYE: u8 = 1;

const ALIVE: u8 = 0;
const LEFT: u8 = 1;
const DOWN: u8 = 2;

/// A full-mesh TCP transport.
pub struct TcpTransport {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for TcpTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TcpTransport")
            .field("node", &self.inner.cfg.node_id)
            .finish()
    }
}

struct Inner {
    cfg: ClusterConfig,
    links: Vec<OnceLock<Arc<Link>>>,
    sink: Arc<dyn FrameSink>,
    stopping: AtomicBool,
    up: Mutex<usize>,
    up_cv: Condvar,
    /// Connections refused since start (strangers, bad frames, wrong keys).
    refused: AtomicU64,
    bytes_sent: AtomicU64,
    bytes_received: AtomicU64,
}

struct Link {
    peer: NodeId,
    stream: TcpStream,
    out: Mutex<OutQueue>,
    out_cv: Condvar,
    state: AtomicU8,
}

#[derive(Default)]
struct OutQueue {
    bufs: VecDeque<Vec<u8>>,
    writer_busy: bool,
    closed: bool,
}

impl TcpTransport {
    /// Listens on this node's address, connects to every peer and waits until
    /// the whole mesh is up (or `connect_timeout` passes, or a peer refuses us).
    pub fn connect(
        cfg: &ClusterConfig,
        sink: Arc<dyn FrameSink>,
    ) -> Result<Arc<TcpTransport>, TransportError> {
        let me = cfg.node_id;
        let n = cfg.nodes();
        let listener = TcpListener::bind(cfg.addrs[usize::from(me)]).map_err(|source| {
            TransportError::Listen {
                addr: cfg.addrs[usize::from(me)],
                source,
            }
        })?;
        let inner = Arc::new(Inner {
            cfg: cfg.clone(),
            links: (0..n).map(|_| OnceLock::new()).collect(),
            sink,
            stopping: AtomicBool::new(false),
            up: Mutex::new(0),
            up_cv: Condvar::new(),
            refused: AtomicU64::new(0),
            bytes_sent: AtomicU64::new(0),
            bytes_received: AtomicU64::new(0),
        });
        {
            let inner = inner.clone();
            thread::Builder::new()
                .name(format!("fv-accept-{me}"))
                .spawn(move || inner.accept_loop(listener))
                .expect("spawn acceptor");
        }
        {
            let inner2 = inner.clone();
            thread::Builder::new()
                .name(format!("fv-heartbeat-{me}"))
                .spawn(move || inner2.heartbeat_loop())
                .expect("spawn heartbeat");
        }
        mesh::establish(&inner, cfg, "")?;
        info!(node = me, peers = n - 1, "cluster mesh is up");
        Ok(Arc::new(TcpTransport { inner }))
    }

    /// Connections refused so far (strangers, malformed frames, wrong keys).
    pub fn refused_connections(&self) -> u64 {
        self.inner.refused.load(Ordering::Relaxed)
    }

    /// Bytes sent and received on all links, frame headers included.
    pub fn bytes(&self) -> (u64, u64) {
        (
            self.inner.bytes_sent.load(Ordering::Relaxed),
            self.inner.bytes_received.load(Ordering::Relaxed),
        )
    }
}

impl Transport for TcpTransport {
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

impl Drop for TcpTransport {
    fn drop(&mut self) {
        self.inner.stop();
    }
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
    }
}

impl Inner {
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
        let mut hdr = [0u8; 5];
        hdr[..4].copy_from_slice(&(len as u32).to_le_bytes());
        hdr[4] = ch;
        self.bytes_sent.fetch_add(len as u64 + 4, Ordering::Relaxed);
        let mut q = link.out.lock().expect("lock");
        if q.closed {
            return Err(TransportError::PeerDown(to));
        }
        let mut sent = 0;
        if q.bufs.is_empty() && !q.writer_busy {
            sent = match send_dontwait(&link.stream, &hdr, payload) {
                Ok(n) => n,
                Err(e) => {
                    drop(q);
                    self.link_failed(link, PeerDown::Disconnected(e.to_string()));
                    return Err(TransportError::Send {
                        peer: to,
                        source: e,
                    });
                }
            };
            if sent == len + 4 {
                return Ok(());
            }
        }
        let mut rest = Vec::with_capacity(len + 4 - sent);
        if sent < 5 {
            rest.extend_from_slice(&hdr[sent..]);
            rest.extend_from_slice(payload);
        } else {
            rest.extend_from_slice(&payload[sent - 5..]);
        }
        q.bufs.push_back(rest);
        link.out_cv.notify_one();
        Ok(())
    }

    fn accept_loop(self: Arc<Self>, listener: TcpListener) {
        let node = self.cfg.node_id;
        let inner = self.clone();
        mesh::accept_loop(
            listener,
            &self.stopping,
            node,
            "fv-handshake",
            move |stream, from| inner.clone().accept_one(stream, from),
        );
    }

    fn accept_one(self: Arc<Self>, mut stream: TcpStream, from: SocketAddr) {
        let _ = stream.set_nonblocking(false);
        let _ = stream.set_read_timeout(Some(HANDSHAKE_TIMEOUT));
        let _ = stream.set_write_timeout(Some(HANDSHAKE_TIMEOUT));
        let exp = Expect::for_node(&self.cfg);
        let result = handshake::accept(&mut stream, &self.cfg.key, &exp);
        match result {
            Ok(peer) => {
                if self.links[usize::from(peer)].get().is_some() {
                    mesh::refuse(
                        &self.refused,
                        self.cfg.node_id,
                        from,
                        &format!("node {peer} is already connected"),
                    );
                    handshake::send_reject(
                        &mut stream,
                        &format!("node {peer} is already connected"),
                    );
                    return;
                }
                self.install(peer, stream);
            }
            Err(e) => mesh::refuse(
                &self.refused,
                self.cfg.node_id,
                from,
                &handshake::refusal_reason(&e),
            ),
        }
    }

    fn dial(self: &Arc<Self>, peer: NodeId, deadline: Instant) -> Result<(), TransportError> {
        let addr = self.cfg.addrs[usize::from(peer)];
        loop {
            if self.stopping.load(Ordering::Acquire) {
                return Ok(());
            }
            let attempt = TcpStream::connect_timeout(&addr, Duration::from_millis(500));
            let mut stream = match attempt {
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
            match handshake::dial(
                &mut stream,
                &self.cfg.key,
                &Expect::for_node(&self.cfg),
                peer,
            ) {
                Ok(()) => {
                    self.install(peer, stream);
                    return Ok(());
                }
                Err(HandshakeError::Rejected(reason)) => {
                    return Err(TransportError::Refused { peer, reason })
                }
                Err(source @ (HandshakeError::Io(_) | HandshakeError::Truncated { .. })) => {
                    // The peer restarted or closed early: retry until the deadline.
                    if Instant::now() >= deadline {
                        return Err(TransportError::Handshake { peer, source });
                    }
                    thread::sleep(Duration::from_millis(50));
                }
                Err(source) => return Err(TransportError::Handshake { peer, source }),
            }
        }
    }

    fn install(self: &Arc<Self>, peer: NodeId, stream: TcpStream) {
        let _ = stream.set_nodelay(true);
        let _ = stream.set_write_timeout(None);
        let _ = stream.set_read_timeout(Some(self.cfg.peer_timeout));
        let reader = match stream.try_clone() {
            Ok(r) => r,
            Err(e) => {
                warn!(node = self.cfg.node_id, peer, error = %e, "cannot clone socket");
                return;
            }
        };
        let link = Arc::new(Link {
            peer,
            stream,
            out: Mutex::new(OutQueue::default()),
            out_cv: Condvar::new(),
            state: AtomicU8::new(ALIVE),
        });
        if self.links[usize::from(peer)].set(link.clone()).is_err() {
            return;
        }
        let me = self.cfg.node_id;
        {
            let inner = self.clone();
            let link = link.clone();
            thread::Builder::new()
                .name(format!("fv-rx-{me}-{peer}"))
                .spawn(move || inner.receive_loop(&link, reader))
                .expect("spawn receiver");
        }
        {
            let inner = self.clone();
            thread::Builder::new()
                .name(format!("fv-tx-{me}-{peer}"))
                .spawn(move || inner.writer_loop(&link))
                .expect("spawn writer");
        }
        debug!(node = me, peer, "link up");
        *self.up.lock().expect("lock") += 1;
        self.up_cv.notify_all();
    }

    fn receive_loop(&self, link: &Link, reader: TcpStream) {
        let mut r = BufReader::with_capacity(256 << 10, reader);
        let mut body = Vec::new();
        let why = loop {
            match read_frame(&mut r, &mut body, self.cfg.max_frame) {
                Ok(()) => {}
                Err(PeerDown::Silent(_)) => break PeerDown::Silent(self.cfg.peer_timeout),
                Err(e) => break e,
            }
            self.bytes_received
                .fetch_add(body.len() as u64 + 4, Ordering::Relaxed);
            let ch = body[0];
            if ch == channel::LINK {
                match body.get(1) {
                    Some(&LINK_HEARTBEAT) => {}
                    Some(&LINK_GOODBYE) => {
                        link.state.store(LEFT, Ordering::Release);
                    }
                    _ => break PeerDown::ProtocolError("malformed link frame".into()),
                }
                continue;
            }
            self.sink.on_frame(link.peer, ch, &body[1..]);
        };
        let why = if link.state.load(Ordering::Acquire) == LEFT {
            PeerDown::Left
        } else {
            why
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
            let mut q = link.out.lock().expect("lock");
            q.closed = true;
            q.bufs.clear();
        }
        link.out_cv.notify_all();
        let _ = link.stream.shutdown(Shutdown::Both);
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

    fn heartbeat_loop(&self) {
        let period = (self.cfg.peer_timeout / 4).max(Duration::from_millis(20));
        while !self.stopping.load(Ordering::Acquire) {
            thread::sleep(period);
            for peer in 0..self.cfg.nodes() as NodeId {
                if peer != self.cfg.node_id && self.link(peer).is_ok() {
                    let _ = self.send(peer, channel::LINK, &[LINK_HEARTBEAT]);
                }
            }
        }
    }

    fn stop(&self) {
        if self.stopping.swap(true, Ordering::AcqRel) {
            return;
        }
        for l in self.links.iter().filter_map(|l| l.get()) {
            if l.state.load(Ordering::Acquire) == ALIVE {
                let _ = self.send(l.peer, channel::LINK, &[LINK_GOODBYE]);
            }
        }
        // Let the writer threads drain what is queued (goodbyes included).
        let deadline = Instant::now() + Duration::from_secs(2);
        for l in self.links.iter().filter_map(|l| l.get()) {
            while Instant::now() < deadline {
                let q = l.out.lock().expect("lock");
                if q.closed || (q.bufs.is_empty() && !q.writer_busy) {
                    break;
                }
                drop(q);
                thread::sleep(Duration::from_millis(2));
            }
            let _ = l.stream.shutdown(Shutdown::Write);
        }
    }
}

/// Reads one frame into `body` (channel byte first).
fn read_frame(r: &mut impl Read, body: &mut Vec<u8>, max: usize) -> Result<(), PeerDown> {
    let mut hdr = [0u8; 4];
    read_exact(r, &mut hdr)?;
    let len = u32::from_le_bytes(hdr) as usize;
    if len == 0 || len > max {
        return Err(PeerDown::ProtocolError(format!(
            "frame length {len} outside 1..={max}"
        )));
    }
    body.resize(len, 0);
    read_exact(r, body)
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
