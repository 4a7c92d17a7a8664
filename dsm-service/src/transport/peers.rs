//! What every transport keeps about its peers, whatever carries the bytes:
//! the table of links, each link's life (alive → left → down), the frame
//! size limit, the transport-internal [`channel::LINK`] frames (heartbeat,
//! goodbye), the one place a peer is reported down, and the counters.
//!
//! [`super::tcp`] and [`super::rdma`] each add their own link type (a socket
//! with its writer queue; a queue pair with its credits) behind [`PeerLink`].

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

use tracing::{info, warn};

use super::{channel, FrameSink, PeerDown, TransportError};
use crate::{ClusterConfig, NodeId};

/// [`channel::LINK`] payload: "still here".
pub(crate) const LINK_HEARTBEAT: u8 = 0;
/// [`channel::LINK`] payload: a clean exit.
pub(crate) const LINK_GOODBYE: u8 = 1;
/// How long a node that leaves waits for its queued frames to go out.
pub(crate) const LEAVE_DRAIN: Duration = Duration::from_secs(2);

const ALIVE: u8 = 0;
const LEFT: u8 = 1;
const DOWN: u8 = 2;

/// Checks a received frame's length (channel byte, and tag if sealed,
/// included) against `min..=max`.
pub(crate) fn check_frame_len(len: usize, min: usize, max: usize) -> Result<(), String> {
    if len < min || len > max {
        return Err(format!("frame length {len} outside {min}..={max}"));
    }
    Ok(())
}

/// Where a link is in its life: alive, left (its goodbye arrived) or down
/// (reported, or never reported up).
#[derive(Debug)]
pub(crate) struct LinkState(AtomicU8);

impl Default for LinkState {
    fn default() -> Self {
        LinkState(AtomicU8::new(ALIVE))
    }
}

impl LinkState {
    /// Neither left nor down: frames may go out.
    pub(crate) fn is_alive(&self) -> bool {
        self.0.load(Ordering::Acquire) == ALIVE
    }

    /// Taken down already.
    #[cfg_attr(not(feature = "rdma"), allow(dead_code))]
    pub(crate) fn is_down(&self) -> bool {
        self.0.load(Ordering::Acquire) == DOWN
    }

    /// The peer said goodbye (a link already down stays down).
    pub(crate) fn mark_left(&self) {
        let _ = self
            .0
            .compare_exchange(ALIVE, LEFT, Ordering::AcqRel, Ordering::Acquire);
    }

    /// Down without a report: for a link that was never reported up.
    #[cfg_attr(not(feature = "rdma"), allow(dead_code))]
    pub(crate) fn set_down(&self) {
        self.0.store(DOWN, Ordering::Release);
    }

    /// Takes the link down, once: `None` when it already was, otherwise the
    /// reason to report (a clean [`PeerDown::Left`] after a goodbye).
    fn take_down(&self, why: PeerDown) -> Option<PeerDown> {
        match self.0.swap(DOWN, Ordering::AcqRel) {
            DOWN => None,
            LEFT => Some(PeerDown::Left),
            _ => Some(why),
        }
    }
}

/// What [`Peers`] needs from a transport's link.
pub(crate) trait PeerLink: Send + Sync + 'static {
    /// The node at the other end.
    fn peer(&self) -> NodeId;
    /// Its life.
    fn state(&self) -> &LinkState;
}

/// One transport's view of the cluster: configuration, links, sink, the
/// stop flag, the start-up count and the counters.
pub(crate) struct Peers<L> {
    /// The cluster.
    pub(crate) cfg: ClusterConfig,
    links: Vec<OnceLock<Arc<L>>>,
    /// Where frames and peer-down events go.
    pub(crate) sink: Arc<dyn FrameSink>,
    stopping: AtomicBool,
    up: Mutex<usize>,
    up_cv: Condvar,
    /// Connections refused since start (strangers, bad frames, wrong keys).
    refused: AtomicU64,
    /// Why start-up cannot succeed, found by the acceptor: an authenticated
    /// member that runs another VM.
    fatal: Mutex<Option<TransportError>>,
    /// Bytes sent on all links, headers included.
    pub(crate) bytes_sent: AtomicU64,
    /// Bytes received on all links, headers included.
    pub(crate) bytes_received: AtomicU64,
}

impl<L: PeerLink> Peers<L> {
    /// No links yet.
    pub(crate) fn new(cfg: &ClusterConfig, sink: Arc<dyn FrameSink>) -> Peers<L> {
        Peers {
            cfg: cfg.clone(),
            links: (0..cfg.nodes()).map(|_| OnceLock::new()).collect(),
            sink,
            stopping: AtomicBool::new(false),
            up: Mutex::new(0),
            up_cv: Condvar::new(),
            refused: AtomicU64::new(0),
            fatal: Mutex::new(None),
            bytes_sent: AtomicU64::new(0),
            bytes_received: AtomicU64::new(0),
        }
    }

    /// This node's id.
    pub(crate) fn me(&self) -> NodeId {
        self.cfg.node_id
    }

    /// The link to `peer`, in whatever state, once installed.
    pub(crate) fn get(&self, peer: NodeId) -> Option<&Arc<L>> {
        self.links.get(usize::from(peer)).and_then(|l| l.get())
    }

    /// Whether a link to `peer` was installed.
    pub(crate) fn linked(&self, peer: NodeId) -> bool {
        self.get(peer).is_some()
    }

    /// Every installed link, by peer id.
    pub(crate) fn installed(&self) -> impl Iterator<Item = &Arc<L>> {
        self.links.iter().filter_map(|l| l.get())
    }

    /// The link to `to` if it is alive.
    pub(crate) fn alive(&self, to: NodeId) -> Result<&Arc<L>, TransportError> {
        match self.get(to) {
            Some(link) if link.state().is_alive() => Ok(link),
            _ => Err(TransportError::PeerDown(to)),
        }
    }

    /// The length of the frame `[channel] ++ payload`, if within the limit.
    pub(crate) fn frame_len(&self, payload: &[u8]) -> Result<usize, TransportError> {
        let len = payload.len() + 1;
        if len > self.cfg.max_frame {
            return Err(TransportError::FrameTooLarge {
                len,
                max: self.cfg.max_frame,
            });
        }
        Ok(len)
    }

    /// Installs `link`; `false` when its peer already has one.
    pub(crate) fn install(&self, link: Arc<L>) -> bool {
        self.links[usize::from(link.peer())].set(link).is_ok()
    }

    /// Counts one more link up and wakes the start-up wait.
    pub(crate) fn link_up(&self) {
        *self.up.lock().expect("lock") += 1;
        self.up_cv.notify_all();
    }

    /// Links up so far, and the condition signalled when that changes.
    pub(crate) fn up(&self) -> (&Mutex<usize>, &Condvar) {
        (&self.up, &self.up_cv)
    }

    /// Whether this node is leaving.
    pub(crate) fn stopping(&self) -> bool {
        self.stopping.load(Ordering::Acquire)
    }

    /// The stop flag, for loops that watch it.
    pub(crate) fn stop_flag(&self) -> &AtomicBool {
        &self.stopping
    }

    /// Starts leaving; `false` when that had begun already.
    pub(crate) fn begin_stop(&self) -> bool {
        !self.stopping.swap(true, Ordering::AcqRel)
    }

    /// Handles one received frame (channel byte first): [`channel::LINK`]
    /// frames here, everything else to the sink.
    pub(crate) fn deliver(&self, link: &L, body: &[u8]) -> Result<(), PeerDown> {
        let ch = body[0];
        if ch == channel::LINK {
            return match body.get(1) {
                Some(&LINK_HEARTBEAT) => Ok(()),
                Some(&LINK_GOODBYE) => {
                    link.state().mark_left();
                    Ok(())
                }
                _ => Err(PeerDown::ProtocolError("malformed link frame".into())),
            };
        }
        self.sink.on_frame(link.peer(), ch, &body[1..]);
        Ok(())
    }

    /// Takes `link` down once: runs `close` (the transport's own teardown),
    /// then, unless this node is leaving, logs and reports the peer down.
    pub(crate) fn report_down(&self, link: &L, why: PeerDown, close: impl FnOnce()) {
        let Some(why) = link.state().take_down(why) else {
            return;
        };
        close();
        if self.stopping() {
            return;
        }
        let (node, peer) = (self.me(), link.peer());
        if why == PeerDown::Left {
            info!(node, peer, "peer left");
        } else {
            warn!(node, peer, %why, "peer failed");
        }
        self.sink.on_peer_down(peer, why);
    }

    /// Counts and logs a refused connection (a warning: the processes that
    /// embed the DSM log warnings on stderr by default, where a user running
    /// nodes by hand sees it).
    pub(crate) fn refuse(&self, from: SocketAddr, why: &str) {
        self.refused.fetch_add(1, Ordering::Relaxed);
        let node = self.me();
        warn!(node, %from, "refused connection from {from}: {why}");
    }

    /// Start-up fails with `e` (the first such error is kept) and the
    /// start-up wait wakes.
    pub(crate) fn fail_start(&self, e: TransportError) {
        self.fatal.lock().expect("lock").get_or_insert(e);
        self.up_cv.notify_all();
    }

    /// Why start-up failed, if the acceptor found out.
    pub(crate) fn start_failure(&self) -> Option<TransportError> {
        self.fatal.lock().expect("lock").take()
    }

    /// Connections refused so far.
    pub(crate) fn refused_connections(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }

    /// Bytes sent and received on all links.
    pub(crate) fn bytes(&self) -> (u64, u64) {
        (
            self.bytes_sent.load(Ordering::Relaxed),
            self.bytes_received.load(Ordering::Relaxed),
        )
    }
}

/// Polls `done` every `every` until it holds or `deadline` passes.
pub(crate) fn wait_until(deadline: Instant, every: Duration, mut done: impl FnMut() -> bool) {
    while Instant::now() < deadline && !done() {
        thread::sleep(every);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Rec {
        frames: Mutex<Vec<(NodeId, u8, Vec<u8>)>>,
        downs: Mutex<Vec<(NodeId, PeerDown)>>,
    }

    impl FrameSink for Rec {
        fn on_frame(&self, from: NodeId, channel: u8, payload: &[u8]) {
            self.frames
                .lock()
                .unwrap()
                .push((from, channel, payload.to_vec()));
        }
        fn on_peer_down(&self, peer: NodeId, why: PeerDown) {
            self.downs.lock().unwrap().push((peer, why));
        }
    }

    #[derive(Default)]
    struct TestLink(LinkState);

    impl PeerLink for TestLink {
        fn peer(&self) -> NodeId {
            1
        }
        fn state(&self) -> &LinkState {
            &self.0
        }
    }

    fn peers() -> (Arc<Rec>, Peers<TestLink>) {
        let rec = Arc::new(Rec::default());
        let cfg = ClusterConfig::new(
            1,
            0,
            vec![
                "127.0.0.1:1".parse().unwrap(),
                "127.0.0.1:2".parse().unwrap(),
            ],
            b"0123456789abcdef".to_vec(),
        );
        (rec.clone(), Peers::new(&cfg, rec))
    }

    #[test]
    fn frame_lengths_outside_the_limit_are_named() {
        assert!(check_frame_len(1, 1, 10).is_ok());
        assert!(check_frame_len(10, 1, 10).is_ok());
        assert_eq!(
            check_frame_len(0, 1, 10).unwrap_err(),
            "frame length 0 outside 1..=10"
        );
        assert_eq!(
            check_frame_len(11, 1, 10).unwrap_err(),
            "frame length 11 outside 1..=10"
        );
        assert_eq!(
            check_frame_len(16, 17, 26).unwrap_err(),
            "frame length 16 outside 17..=26"
        );
    }

    #[test]
    fn oversized_sends_are_refused_before_any_link_is_needed() {
        let (_, p) = peers();
        let max = p.cfg.max_frame;
        assert_eq!(p.frame_len(&vec![0; max - 1]).unwrap(), max);
        let e = p.frame_len(&vec![0; max]).unwrap_err();
        assert!(matches!(e, TransportError::FrameTooLarge { len, .. } if len == max + 1));
        assert!(matches!(p.alive(1), Err(TransportError::PeerDown(1))));
    }

    #[test]
    fn link_frames_stay_inside_and_others_reach_the_sink() {
        let (rec, p) = peers();
        let link = TestLink::default();
        p.deliver(&link, &[channel::LINK, LINK_HEARTBEAT]).unwrap();
        p.deliver(&link, &[channel::COHERENCE, 7, 8]).unwrap();
        let e = p.deliver(&link, &[channel::LINK]).unwrap_err();
        assert_eq!(e, PeerDown::ProtocolError("malformed link frame".into()));
        assert!(link.0.is_alive());
        p.deliver(&link, &[channel::LINK, LINK_GOODBYE]).unwrap();
        assert!(!link.0.is_alive() && !link.0.is_down());
        assert_eq!(
            *rec.frames.lock().unwrap(),
            vec![(1, channel::COHERENCE, vec![7, 8])]
        );
    }

    #[test]
    fn a_peer_is_reported_down_once_and_left_after_its_goodbye() {
        let (rec, p) = peers();
        let link = TestLink::default();
        link.0.mark_left();
        let mut closed = 0;
        p.report_down(&link, PeerDown::Disconnected("x".into()), || closed += 1);
        p.report_down(&link, PeerDown::Silent(Duration::ZERO), || closed += 1);
        link.0.mark_left();
        assert!(link.0.is_down(), "a goodbye after the fact revives nothing");
        assert_eq!(closed, 1);
        assert_eq!(*rec.downs.lock().unwrap(), vec![(1, PeerDown::Left)]);
    }

    #[test]
    fn nothing_is_reported_while_leaving() {
        let (rec, p) = peers();
        let link = TestLink::default();
        assert!(p.begin_stop());
        assert!(!p.begin_stop());
        let mut closed = false;
        p.report_down(&link, PeerDown::Disconnected("x".into()), || closed = true);
        assert!(closed && link.0.is_down());
        assert!(rec.downs.lock().unwrap().is_empty());
    }
}
