//! Completion polling: one poller thread per transport drains the shared
//! completion queue, reassembles and delivers received frames, reposts
//! receive buffers, takes back send slots and credits, and pumps what waits
//! behind them. A failed completion takes its link down.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use ibverbs::MemoryRegion;
use tracing::{error, warn};

use super::device::{split_wr_id, wc_status_name, wr_id};
use super::flow::take_returned;
use super::wire::{MsgHeader, Reassembler, KIND_CREDIT, KIND_DATA, MSG_HEADER};
use super::{Inner, Link, RECV_DEPTH, SLOT_BYTES};
use crate::transport::PeerDown;
use crate::NodeId;

/// How long the poller spins on an empty completion queue before yielding.
const SPIN: Duration = Duration::from_micros(200);
/// How long it yields before sleeping between polls.
const YIELD: Duration = Duration::from_millis(2);
/// Its sleep when idle for longer.
const IDLE_SLEEP: Duration = Duration::from_micros(50);

/// What the poller does after an empty poll, idle for how long.
#[derive(Debug, PartialEq, Eq)]
enum Idle {
    Spin,
    Yield,
    Sleep(Duration),
}

fn idle_action(idle: Duration) -> Idle {
    if idle < SPIN {
        Idle::Spin
    } else if idle < YIELD {
        Idle::Yield
    } else {
        Idle::Sleep(IDLE_SLEEP)
    }
}

/// A link's receive side.
pub(super) struct RxState {
    /// The registered receive buffers, [`RECV_DEPTH`] slots.
    pub(super) mr: MemoryRegion<u8>,
    /// The frame being put back together.
    pub(super) asm: Reassembler,
}

impl RxState {
    /// Over the registered receive buffers `mr`, no frame begun.
    pub(super) fn new(mr: MemoryRegion<u8>) -> RxState {
        RxState {
            mr,
            asm: Reassembler::default(),
        }
    }
}

impl Inner {
    /// The poller thread: runs until the transport stops.
    pub(super) fn poll_loop(self: Arc<Self>) {
        let mut wcs = vec![ibverbs::ibv_wc::default(); 64];
        let mut touched = vec![false; self.peers.cfg.nodes()];
        let mut idle_since: Option<Instant> = None;
        while !self.poller_exit.load(Ordering::Acquire) {
            let done = match self.verbs.cq().poll(&mut wcs) {
                Ok(done) => done,
                Err(e) => {
                    error!(node = self.peers.me(), error = %e, "polling the completion queue failed");
                    for l in self.peers.installed() {
                        self.link_failed(
                            l,
                            PeerDown::Disconnected(format!("completion queue failed: {e}")),
                        );
                    }
                    return;
                }
            };
            self.epoch.fetch_add(1, Ordering::AcqRel);
            if done.is_empty() {
                let since = *idle_since.get_or_insert_with(Instant::now);
                match idle_action(since.elapsed()) {
                    Idle::Spin => std::hint::spin_loop(),
                    Idle::Yield => thread::yield_now(),
                    Idle::Sleep(d) => thread::sleep(d),
                }
                continue;
            }
            idle_since = None;
            for wc in done.iter() {
                self.completion(wc, &mut touched);
            }
            for (peer, t) in touched.iter_mut().enumerate() {
                if std::mem::take(t) {
                    if let Some(l) = self.peers.get(peer as NodeId) {
                        self.pump(l);
                    }
                }
            }
        }
    }

    fn completion(&self, wc: &ibverbs::ibv_wc, touched: &mut [bool]) {
        let (peer, recv, slot) = split_wr_id(wc.wr_id());
        let Some(link) = self.peers.get(peer) else {
            warn!(
                node = self.peers.me(),
                peer, "completion for an unknown peer"
            );
            return;
        };
        if let Some((status, vendor)) = wc.error() {
            // Flushes after a link went down are expected.
            if !link.state.is_down() {
                let what = if recv { "receive" } else { "send" };
                self.link_failed(
                    link,
                    PeerDown::Disconnected(format!(
                        "RDMA {what} failed: {} (status {status}, vendor error {vendor:#x})",
                        wc_status_name(status)
                    )),
                );
            }
            return;
        }
        if recv {
            if link.state.is_down() {
                // Not reposted: a peer we dropped gets no more buffers.
                return;
            }
            link.last_rx_ns.store(self.now_ns(), Ordering::Release);
            self.peers
                .bytes_received
                .fetch_add(wc.len() as u64, Ordering::Relaxed);
            if let Err(why) = self.on_message(link, slot, wc.len()) {
                self.link_failed(link, why);
                return;
            }
        } else {
            link.tx.lock().expect("lock").free.push(slot);
        }
        touched[usize::from(peer)] = true;
    }

    /// Handles one received message in receive buffer `slot` and reposts it.
    fn on_message(&self, link: &Link, slot: usize, len: usize) -> Result<(), PeerDown> {
        if slot >= RECV_DEPTH || len > SLOT_BYTES {
            return Err(PeerDown::ProtocolError(format!(
                "receive completion for slot {slot} of {len} bytes"
            )));
        }
        let mut rx = link.rx.lock().expect("lock");
        let RxState { mr, asm } = &mut *rx;
        let start = slot * SLOT_BYTES;
        let msg = &mr[start..start + len];
        let h = MsgHeader::read(msg).map_err(PeerDown::ProtocolError)?;
        if h.credits > 0 {
            let mut tx = link.tx.lock().expect("lock");
            tx.credits = take_returned(tx.credits, h.credits).map_err(PeerDown::ProtocolError)?;
        }
        match h.kind {
            KIND_CREDIT => {}
            KIND_DATA => {
                let frame = asm
                    .push(&h, &msg[MSG_HEADER..], self.peers.cfg.max_frame)
                    .map_err(PeerDown::ProtocolError)?;
                if let Some(body) = frame {
                    self.deliver(link, body)?;
                }
            }
            k => return Err(PeerDown::ProtocolError(format!("unknown message kind {k}"))),
        }
        let mut qp = link.qp.lock().expect("lock");
        // SAFETY: the device handed this buffer back with the completion just
        // polled, and the frame read from it has been delivered (`msg` is no
        // longer used). The region outlives the queue pair (field order of
        // `Link`).
        unsafe { qp.post_receive(mr, start..start + SLOT_BYTES, wr_id(link.peer, true, slot)) }
            .map_err(|e| {
                PeerDown::Disconnected(format!("reposting a receive buffer failed: {e}"))
            })?;
        link.owed.fetch_add(1, Ordering::AcqRel);
        Ok(())
    }

    fn deliver(&self, link: &Link, body: &[u8]) -> Result<(), PeerDown> {
        if link.state.is_down() {
            return Ok(());
        }
        self.peers.deliver(link, body)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rdma_poller_spins_then_yields_then_sleeps() {
        assert_eq!(idle_action(Duration::ZERO), Idle::Spin);
        assert_eq!(idle_action(SPIN - Duration::from_nanos(1)), Idle::Spin);
        assert_eq!(idle_action(SPIN), Idle::Yield);
        assert_eq!(idle_action(YIELD), Idle::Sleep(IDLE_SLEEP));
        assert_eq!(idle_action(Duration::from_secs(5)), Idle::Sleep(IDLE_SLEEP));
    }
}
