//! The TCP transport against a misbehaving authenticated peer: a node that
//! sends a malformed frame is cut off with an error naming it, and the other
//! links keep working.

use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dsm_service::transport::handshake::{self, Expect};
use dsm_service::transport::tcp::TcpTransport;
use dsm_service::transport::{FrameSink, PeerDown, Transport};
use dsm_service::{ClusterConfig, NodeId};

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

/// Plays node 2 by hand: dials `to` and authenticates.
fn rogue(addr: SocketAddr, to: NodeId) -> TcpStream {
    let mut s = TcpStream::connect(addr).unwrap();
    let exp = Expect {
        cluster_id: 9,
        local: 2,
        nodes: 3,
    };
    handshake::dial(&mut s, KEY, &exp, to).unwrap();
    s
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
