//! The TCP transport against a misbehaving authenticated peer: a node that
//! sends a malformed frame is cut off with an error naming it, and the other
//! links keep working.

use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dsm_service::transport::handshake::{self, Expect, Session};
use dsm_service::transport::sealed::TAG_LEN;
use dsm_service::transport::tcp::TcpTransport;
use dsm_service::transport::{FrameSink, PeerDown, Transport};
use dsm_service::{ClusterConfig, NodeId, TransportSecurity};

const KEY: &[u8] = b"transport-test-key-0123456789";

#[derive(Default)]
struct Sink {
    frames: Mutex<Vec<(NodeId, u8, Vec<u8>)>>,
    down: Mutex<Vec<(NodeId, PeerDown)>>,
}

impl FrameSink for Sink {
    fn on_frame(&self, from: NodeId, channel: u8, payload: &[u8]) {
        self.frames
            .lock()
            .unwrap()
            .push((from, channel, payload.to_vec()));
    }
    fn on_peer_down(&self, peer: NodeId, why: PeerDown) {
        self.down.lock().unwrap().push((peer, why));
    }
}

fn wait_until(what: &str, f: impl Fn() -> bool) {
    let t0 = Instant::now();
    while !f() {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "timed out waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Plays node `me` of `nodes` by hand: dials `to` and authenticates, with
/// sealed links; returns the connection and its session.
fn rogue_sealed(addr: SocketAddr, me: NodeId, nodes: usize, to: NodeId) -> (TcpStream, Session) {
    let mut s = TcpStream::connect(addr).unwrap();
    let exp = Expect {
        cluster_id: 9,
        local: me,
        nodes,
        security: TransportSecurity::Aead,
        layout: String::new(),
    };
    let session = handshake::dial(&mut s, KEY, &exp, to).unwrap();
    (s, session)
}

/// Plays node 2 by hand: dials `to` and authenticates.
fn rogue(addr: SocketAddr, to: NodeId) -> TcpStream {
    rogue_sealed(addr, 2, 3, to).0
}

/// One frame on `channel`, sealed by `session`.
fn sealed_frame(session: &mut Session, channel: u8, payload: &[u8]) -> Vec<u8> {
    let mut f = ((1 + payload.len() + TAG_LEN) as u32)
        .to_le_bytes()
        .to_vec();
    f.push(channel);
    f.extend_from_slice(payload);
    session
        .keys
        .as_mut()
        .unwrap()
        .seal
        .seal_frame(&mut f)
        .unwrap();
    f
}

#[test]
fn malformed_frames_cut_off_only_the_sender() {
    let addrs: Vec<SocketAddr> = dsm_service::transport::free_loopback_addrs(3).unwrap();
    let sinks: Vec<Arc<Sink>> = (0..2).map(|_| Arc::new(Sink::default())).collect();
    let start = |id: NodeId| {
        let cfg = ClusterConfig::new(9, id, addrs.clone(), KEY.to_vec());
        let sink: Arc<dyn FrameSink> = sinks[usize::from(id)].clone();
        std::thread::spawn(move || TcpTransport::connect(&cfg, sink).unwrap())
    };
    let t0 = start(0);
    let t1 = start(1);
    std::thread::sleep(Duration::from_millis(200));
    let mut to0 = rogue(addrs[0], 0);
    let mut to1 = rogue(addrs[1], 1);
    let (t0, t1) = (t0.join().unwrap(), t1.join().unwrap());

    // An oversized length prefix to node 0, a zero-length frame to node 1.
    to0.write_all(&u32::MAX.to_le_bytes()).unwrap();
    to1.write_all(&0u32.to_le_bytes()).unwrap();
    for (k, sink) in sinks.iter().enumerate() {
        wait_until("the rogue to be cut off", || {
            !sink.down.lock().unwrap().is_empty()
        });
        let down = sink.down.lock().unwrap().clone();
        assert_eq!(
            down.len(),
            1,
            "node {k}: only the rogue goes down: {down:?}"
        );
        let (peer, why) = &down[0];
        assert_eq!(*peer, 2);
        let text = why.to_string();
        assert!(
            text.starts_with("protocol error: frame length"),
            "node {k}: {text}"
        );
    }
    assert!(t0.send(2, 20, b"x").is_err(), "the rogue's link is closed");

    // Nodes 0 and 1 still talk to each other.
    t0.send(1, 20, b"still here").unwrap();
    t1.send(0, 20, b"me too").unwrap();
    wait_until("frames between the good nodes", || {
        sinks[1]
            .frames
            .lock()
            .unwrap()
            .iter()
            .any(|f| f.2 == b"still here")
            && sinks[0]
                .frames
                .lock()
                .unwrap()
                .iter()
                .any(|f| f.2 == b"me too")
    });
}

/// Node 0 against four authenticated peers that attack the sealed link
/// after a good frame each: one modifies a frame in flight, one replays
/// the good frame, one drops a frame (sends the one after it), one sends a
/// frame in clear. Node 0 delivers each good frame, then cuts that peer off
/// naming it and the failed frame, and keeps its other links.
#[test]
fn tampered_sealed_frames_cut_off_the_sender_by_name() {
    let addrs: Vec<SocketAddr> = dsm_service::transport::free_loopback_addrs(5).unwrap();
    let sink = Arc::new(Sink::default());
    let t0 = {
        let cfg = ClusterConfig::new(9, 0, addrs.clone(), KEY.to_vec());
        let sink: Arc<dyn FrameSink> = sink.clone();
        std::thread::spawn(move || TcpTransport::connect(&cfg, sink).unwrap())
    };
    std::thread::sleep(Duration::from_millis(200));
    let mut rogues: Vec<(TcpStream, Session)> =
        (1..5).map(|id| rogue_sealed(addrs[0], id, 5, 0)).collect();
    let t0 = t0.join().unwrap();
    for (i, (s, session)) in rogues.iter_mut().enumerate() {
        let good = sealed_frame(session, 20, format!("good {}", i + 1).as_bytes());
        let next = sealed_frame(session, 20, b"next");
        let attack = match i + 1 {
            1 => {
                let mut bad = next.clone();
                bad[6] ^= 0x40;
                bad
            }
            2 => good.clone(),
            3 => sealed_frame(session, 20, b"after the dropped one"),
            _ => {
                let clear = b"a frame in clear, longer than a tag";
                let len = (1 + clear.len()) as u32;
                [&len.to_le_bytes()[..], &[20], clear].concat()
            }
        };
        s.write_all(&good).unwrap();
        s.write_all(&attack).unwrap();
    }
    wait_until("all four rogues to be cut off", || {
        sink.down.lock().unwrap().len() == 4
    });
    let mut down = sink.down.lock().unwrap().clone();
    down.sort_by_key(|d| d.0);
    for (i, (peer, why)) in down.iter().enumerate() {
        assert_eq!(usize::from(*peer), i + 1);
        let want = "protocol error: frame 1 failed authentication: it was modified, forged, \
                    replayed, reordered, or a frame before it was lost";
        assert_eq!(why.to_string(), want, "peer {peer}");
    }
    let frames = sink.frames.lock().unwrap().clone();
    let mut got: Vec<(NodeId, Vec<u8>)> = frames.into_iter().map(|f| (f.0, f.2)).collect();
    got.sort();
    let want: Vec<(NodeId, Vec<u8>)> = (1..5)
        .map(|k| (k, format!("good {k}").into_bytes()))
        .collect();
    assert_eq!(
        got, want,
        "each good frame, and nothing after it, is delivered"
    );
    assert!(
        t0.send(1, 20, b"x").is_err(),
        "the link to a rogue is closed"
    );
}

/// A peer configured `auth-only` cannot join a sealed cluster: the
/// handshake refuses it naming both modes, on both sides.
#[test]
fn a_peer_without_sealing_is_refused_at_the_handshake() {
    let addrs: Vec<SocketAddr> = dsm_service::transport::free_loopback_addrs(2).unwrap();
    let sink = Arc::new(Sink::default());
    let cfg0 = ClusterConfig::new(9, 0, addrs.clone(), KEY.to_vec());
    let mut cfg1 = cfg0.clone();
    cfg1.node_id = 1;
    cfg1.security = TransportSecurity::AuthOnly;
    cfg1.connect_timeout = Duration::from_secs(3);
    let s0: Arc<dyn FrameSink> = sink.clone();
    let _t0 = std::thread::spawn(move || TcpTransport::connect(&cfg0, s0));
    std::thread::sleep(Duration::from_millis(200));
    let s1: Arc<dyn FrameSink> = Arc::new(Sink::default());
    let e = TcpTransport::connect(&cfg1, s1).unwrap_err().to_string();
    assert!(
        e.contains("transport security auth-only does not match this node's aead"),
        "{e}"
    );
}
