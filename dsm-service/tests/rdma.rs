//! RDMA transport tests (feature `rdma`). They need an RDMA device: a real
//! HCA or a SoftRoCE one (`rdma link add rxe0 type rxe netdev <interface>`).
//! Where there is none, each test prints why and skips; the no-device path is
//! checked by `transport::rdma::tests::rdma_connect_without_device_is_unavailable`.
#![cfg(feature = "rdma")]

use std::net::SocketAddr;
use std::sync::{Arc, Condvar, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use dsm_service::transport::rdma::RdmaTransport;
use dsm_service::transport::{FrameSink, PeerDown, Transport, TransportError};
use dsm_service::{ClusterConfig, NodeId};

const KEY: &[u8] = b"rdma-test-cluster-key";

#[derive(Default)]
struct Recorder {
    frames: Mutex<Vec<(NodeId, u8, Vec<u8>)>>,
    downs: Mutex<Vec<(NodeId, PeerDown)>>,
    cv: Condvar,
}

impl FrameSink for Recorder {
    fn on_frame(&self, from: NodeId, channel: u8, payload: &[u8]) {
        self.frames
            .lock()
            .unwrap()
            .push((from, channel, payload.to_vec()));
        self.cv.notify_all();
    }

    fn on_peer_down(&self, peer: NodeId, why: PeerDown) {
        self.downs.lock().unwrap().push((peer, why));
        self.cv.notify_all();
    }
}

impl Recorder {
    fn wait_frames(&self, n: usize, within: Duration) -> Vec<(NodeId, u8, Vec<u8>)> {
        let deadline = Instant::now() + within;
        let mut f = self.frames.lock().unwrap();
        while f.len() < n {
            let now = Instant::now();
            assert!(now < deadline, "only {} of {n} frames arrived", f.len());
            f = self.cv.wait_timeout(f, deadline - now).unwrap().0;
        }
        std::mem::take(&mut *f)
    }

    fn wait_down(&self, within: Duration) -> (NodeId, PeerDown) {
        let deadline = Instant::now() + within;
        let mut d = self.downs.lock().unwrap();
        while d.is_empty() {
            let now = Instant::now();
            assert!(now < deadline, "no peer-down event");
            d = self.cv.wait_timeout(d, deadline - now).unwrap().0;
        }
        d[0].clone()
    }
}

fn free_addrs(n: usize) -> Vec<SocketAddr> {
    dsm_service::transport::free_loopback_addrs(n).unwrap()
}

fn config(id: NodeId, addrs: &[SocketAddr], key: &[u8]) -> ClusterConfig {
    let mut c = ClusterConfig::new(0xfeed, id, addrs.to_vec(), key.to_vec());
    c.connect_timeout = Duration::from_secs(10);
    c.max_frame = 1 << 20;
    c
}

/// Connects node 1 in a thread and node 0 here; `None` (after printing the
/// reason) when this host has no usable RDMA device.
#[allow(clippy::type_complexity)]
fn pair(
    key1: &'static [u8],
) -> Option<(
    Result<Arc<RdmaTransport>, TransportError>,
    Result<Arc<RdmaTransport>, TransportError>,
    Arc<Recorder>,
    Arc<Recorder>,
)> {
    let addrs = free_addrs(2);
    let (r0, r1) = (Arc::new(Recorder::default()), Arc::new(Recorder::default()));
    let c1 = config(1, &addrs, key1);
    let s1 = r1.clone();
    let t1 = thread::spawn(move || RdmaTransport::connect(&c1, s1));
    let mut c0 = config(0, &addrs, KEY);
    c0.connect_timeout = Duration::from_secs(3);
    let n0 = RdmaTransport::connect(&c0, r0.clone());
    let n1 = t1.join().unwrap();
    for r in [&n0, &n1] {
        if let Err(TransportError::Unavailable(why)) = r {
            eprintln!("skipping: {why}");
            return None;
        }
    }
    Some((n0, n1, r0, r1))
}

fn payload(seq: u32, len: usize) -> Vec<u8> {
    let mut p = vec![0u8; len];
    p[..4].copy_from_slice(&seq.to_le_bytes());
    for (i, b) in p.iter_mut().enumerate().skip(4) {
        *b = (i as u32).wrapping_mul(seq | 1) as u8;
    }
    p
}

#[test]
fn rdma_two_node_loopback_exchange() {
    let Some((n0, n1, r0, r1)) = pair(KEY) else {
        return;
    };
    let (n0, n1) = (n0.unwrap(), n1.unwrap());
    eprintln!("RDMA device: {}", n0.device_name());

    // Both directions at once, more frames than the credit window, sizes from
    // one byte to several fragments to the frame limit.
    const SIZES: [usize; 5] = [4, 4096, 4100, 70_000, (1 << 20) - 1];
    let count = 600u32;
    let len = |seq: u32| SIZES[seq as usize % SIZES.len()];
    let sender = |from: Arc<RdmaTransport>, to: NodeId| {
        thread::spawn(move || {
            for seq in 0..count {
                from.send(to, 1, &payload(seq, len(seq))).unwrap();
            }
        })
    };
    let a = sender(n1.clone(), 0);
    let b = sender(n0.clone(), 1);
    a.join().unwrap();
    b.join().unwrap();
    for (r, from) in [(&r0, 1), (&r1, 0)] {
        let got = r.wait_frames(count as usize, Duration::from_secs(60));
        for (seq, (f, ch, p)) in got.iter().enumerate() {
            assert_eq!((*f, *ch), (from, 1));
            assert_eq!(
                p,
                &payload(seq as u32, len(seq as u32)),
                "frame {seq} differs"
            );
        }
    }

    assert!(matches!(
        n0.send(1, 1, &vec![0; 1 << 20]),
        Err(TransportError::FrameTooLarge { .. })
    ));
    let (sent, received) = n0.bytes();
    assert!(sent > 0 && received > 0);

    // A clean exit is reported as such.
    n1.shutdown();
    let (peer, why) = r0.wait_down(Duration::from_secs(10));
    assert_eq!((peer, why), (1, PeerDown::Left));
    assert!(matches!(
        n0.send(1, 1, b"x"),
        Err(TransportError::PeerDown(1))
    ));
}

#[test]
fn rdma_wrong_key_gets_no_queue_pair() {
    let Some((n0, n1, _, _)) = pair(b"some-other-cluster-key") else {
        return;
    };
    let e = n1.unwrap_err().to_string();
    assert!(e.contains("wrong cluster key"), "{e}");
    assert!(n0.is_err(), "node 0 came up with a stranger");
}
