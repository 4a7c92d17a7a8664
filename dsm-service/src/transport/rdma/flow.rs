//! Credits and the send path: a SEND costs a credit and a registered send
//! slot; the peer returns credits as it reposts its receive buffers. Data
//! never takes the last credit, so credit-only messages can always flow: no
//! receiver runs out of posted buffers and two nodes streaming at each other
//! cannot deadlock. What cannot be posted at once waits per peer, in order,
//! until the poller [`pump`](Inner::pump)s it.

use std::collections::VecDeque;
use std::io;
use std::sync::atomic::Ordering;

use ibverbs::MemoryRegion;

use super::device::wr_id;
use super::wire::{fragments, write_body, MsgHeader, CHUNK, MSG_HEADER};
use super::{Inner, Link, RECV_DEPTH, SEND_SLOTS, SLOT_BYTES};
use crate::transport::{PeerDown, TransportError};

/// Owed credits that trigger a credit-only message.
const CREDIT_THRESHOLD: u32 = (RECV_DEPTH / 2) as u32;

/// Whether a data message may be posted: one credit always stays in reserve
/// for credit-only messages.
pub(super) fn can_send_data(credits: u32, free_slots: usize) -> bool {
    credits >= 2 && free_slots > 0
}

/// Whether a credit-only message should be posted now.
pub(super) fn credit_message_due(owed: u32, credits: u32, free_slots: usize) -> bool {
    owed >= CREDIT_THRESHOLD && credits >= 1 && free_slots > 0
}

/// The sender's credits after the peer returned `returned`: never more than
/// the receive buffers it was given.
pub(super) fn take_returned(credits: u32, returned: u16) -> Result<u32, String> {
    let credits = credits + u32::from(returned);
    if credits as usize > RECV_DEPTH {
        return Err(format!(
            "peer returned {returned} credits, more than it was given"
        ));
    }
    Ok(credits)
}

/// Splits the credits owed to the peer into what one header can carry and
/// what stays owed.
fn stamp(owed: u32) -> (u16, u32) {
    let stamped = owed.min(u32::from(u16::MAX));
    (stamped as u16, owed - stamped)
}

/// A link's send side.
pub(super) struct TxState {
    pub(super) mr: MemoryRegion<u8>,
    /// Send slots not owned by the device.
    pub(super) free: Vec<usize>,
    /// SENDs we may still post.
    pub(super) credits: u32,
    /// Whole messages (header included) waiting for a credit or a slot.
    pub(super) pending: VecDeque<Vec<u8>>,
    /// The link is down: nothing more goes out.
    pub(super) closed: bool,
}

impl TxState {
    /// Full credits, every slot free, over the registered send buffers `mr`.
    pub(super) fn new(mr: MemoryRegion<u8>) -> TxState {
        TxState {
            mr,
            free: (0..SEND_SLOTS).rev().collect(),
            credits: RECV_DEPTH as u32,
            pending: VecDeque::new(),
            closed: false,
        }
    }

    /// Nothing queued and every posted SEND completed.
    pub(super) fn drained(&self) -> bool {
        self.pending.is_empty() && self.free.len() == SEND_SLOTS
    }
}

impl Inner {
    /// Posts (or, with `may_queue`, queues) one frame; `Ok(false)` when it
    /// could not be posted at once and `may_queue` is off.
    pub(super) fn send_on(
        &self,
        link: &Link,
        ch: u8,
        payload: &[u8],
        may_queue: bool,
    ) -> Result<bool, TransportError> {
        let len = payload.len() + 1;
        let mut tx = link.tx.lock().expect("lock");
        if tx.closed {
            return Err(TransportError::PeerDown(link.peer));
        }
        let can_post_now = tx.pending.is_empty() && can_send_data(tx.credits, tx.free.len());
        if !may_queue && !can_post_now {
            return Ok(false);
        }
        for (off, n, flags) in fragments(len, CHUNK) {
            let h = MsgHeader::data(flags, len);
            if tx.pending.is_empty() && can_send_data(tx.credits, tx.free.len()) {
                let posted = self.post(link, &mut tx, |buf| {
                    h.write(buf);
                    write_body(&mut buf[MSG_HEADER..MSG_HEADER + n], ch, payload, off);
                    MSG_HEADER + n
                });
                if let Err(e) = posted {
                    drop(tx);
                    self.link_failed(
                        link,
                        PeerDown::Disconnected(format!("posting a send failed: {e}")),
                    );
                    return Err(TransportError::Send {
                        peer: link.peer,
                        source: e,
                    });
                }
            } else {
                let mut m = vec![0u8; MSG_HEADER + n];
                h.write(&mut m);
                write_body(&mut m[MSG_HEADER..], ch, payload, off);
                tx.pending.push_back(m);
            }
        }
        Ok(true)
    }

    /// Takes a free send slot and a credit, lets `fill` write the message
    /// (returning its length), stamps the credits we owe and posts the SEND.
    fn post(
        &self,
        link: &Link,
        tx: &mut TxState,
        fill: impl FnOnce(&mut [u8]) -> usize,
    ) -> io::Result<()> {
        let slot = tx.free.pop().expect("caller checked for a free slot");
        tx.credits -= 1;
        let start = slot * SLOT_BYTES;
        let len = fill(&mut tx.mr[start..start + SLOT_BYTES]);
        let (stamped, left) = stamp(link.owed.swap(0, Ordering::AcqRel));
        if left > 0 {
            link.owed.fetch_add(left, Ordering::AcqRel);
        }
        tx.mr[start + 2..start + 4].copy_from_slice(&stamped.to_le_bytes());
        let mut qp = link.qp.lock().expect("lock");
        // SAFETY: `slot` came off the free list, so the device does not own
        // it; it goes back on the list only when the poller takes this send's
        // completion, and nothing writes it before then. The memory region
        // lives in the same `Link` as the queue pair, which is destroyed
        // before the region is deregistered.
        let r = unsafe {
            qp.post_send(
                &mut tx.mr,
                start..start + len,
                wr_id(link.peer, false, slot),
            )
        };
        match r {
            Ok(()) => {
                self.peers
                    .bytes_sent
                    .fetch_add(len as u64, Ordering::Relaxed);
                Ok(())
            }
            Err(e) => {
                tx.free.push(slot);
                tx.credits += 1;
                link.owed.fetch_add(u32::from(stamped), Ordering::AcqRel);
                Err(e)
            }
        }
    }

    /// Posts what is queued as far as credits and slots allow, then a
    /// credit-only message if one is due.
    pub(super) fn pump(&self, link: &Link) {
        let mut tx = link.tx.lock().expect("lock");
        if tx.closed {
            return;
        }
        let mut failed = None;
        while !tx.pending.is_empty() && can_send_data(tx.credits, tx.free.len()) {
            let m = tx.pending.pop_front().expect("not empty");
            if let Err(e) = self.post(link, &mut tx, |buf| {
                buf[..m.len()].copy_from_slice(&m);
                m.len()
            }) {
                failed = Some(e);
                break;
            }
        }
        if failed.is_none()
            && credit_message_due(link.owed.load(Ordering::Acquire), tx.credits, tx.free.len())
        {
            let h = MsgHeader::credit();
            if let Err(e) = self.post(link, &mut tx, |buf| {
                h.write(buf);
                MSG_HEADER
            }) {
                failed = Some(e);
            }
        }
        drop(tx);
        if let Some(e) = failed {
            self.link_failed(
                link,
                PeerDown::Disconnected(format!("posting a send failed: {e}")),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rdma_data_keeps_a_credit_for_credit_messages() {
        assert!(can_send_data(2, 1));
        assert!(
            !can_send_data(1, 1),
            "the last credit is for credit messages"
        );
        assert!(!can_send_data(RECV_DEPTH as u32, 0), "no free send slot");
        assert!(credit_message_due(CREDIT_THRESHOLD, 1, 1));
        assert!(!credit_message_due(CREDIT_THRESHOLD - 1, 1, 1));
        assert!(!credit_message_due(CREDIT_THRESHOLD, 0, 1));
        assert!(!credit_message_due(CREDIT_THRESHOLD, 1, 0));
    }

    #[test]
    fn rdma_returned_credits_never_exceed_the_window() {
        assert_eq!(take_returned(1, 31), Ok(RECV_DEPTH as u32));
        let e = take_returned(2, 31).unwrap_err();
        assert_eq!(e, "peer returned 31 credits, more than it was given");
        assert_eq!(stamp(5), (5, 0));
        assert_eq!(stamp(70_000), (u16::MAX, 70_000 - u32::from(u16::MAX)));
    }

    /// Two endpoints under the credit rules with random interleavings: no
    /// SEND ever finds the peer without a posted receive buffer, and all
    /// traffic drains (no credit deadlock), even when both sides stream.
    #[test]
    fn rdma_credit_flow_control_never_overruns_or_deadlocks() {
        #[derive(Default)]
        struct Side {
            credits: u32,
            owed: u32,
            posted: usize,
            pending: usize,
            sent_data: usize,
            got_data: usize,
        }
        // (is_data, credits carried)
        type Wire = VecDeque<(bool, u32)>;
        fn pump(s: &mut Side, wire: &mut Wire) {
            while s.pending > 0 && can_send_data(s.credits, 1) {
                s.pending -= 1;
                s.credits -= 1;
                s.sent_data += 1;
                wire.push_back((true, std::mem::take(&mut s.owed)));
            }
            if credit_message_due(s.owed, s.credits, 1) {
                s.credits -= 1;
                wire.push_back((false, std::mem::take(&mut s.owed)));
            }
        }
        fn receive(s: &mut Side, (data, credits): (bool, u32)) {
            assert!(s.posted > 0, "a SEND arrived with no receive buffer posted");
            s.posted -= 1;
            s.credits += credits;
            assert!(s.credits as usize <= RECV_DEPTH);
            if data {
                s.got_data += 1;
            }
            s.posted += 1;
            s.owed += 1;
        }
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut rand = move |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        };
        for round in 0..200 {
            let new = || Side {
                credits: RECV_DEPTH as u32,
                posted: RECV_DEPTH,
                ..Side::default()
            };
            let mut sides = [new(), new()];
            let mut wires: [Wire; 2] = [VecDeque::new(), VecDeque::new()];
            let bursts = 1 + rand(400) as usize;
            let one_way = round % 3 == 0;
            let mut queued = [0usize; 2];
            for _ in 0..bursts * 4 {
                match rand(4) {
                    0 | 1 => {
                        let i = if one_way { 0 } else { rand(2) as usize };
                        let k = 1 + rand(3 * RECV_DEPTH as u64) as usize;
                        sides[i].pending += k;
                        queued[i] += k;
                        pump(&mut sides[i], &mut wires[i]);
                    }
                    _ => {
                        let i = rand(2) as usize;
                        if let Some(m) = wires[i].pop_front() {
                            let j = 1 - i;
                            receive(&mut sides[j], m);
                            pump(&mut sides[j], &mut wires[j]);
                        }
                    }
                }
            }
            // Drain: deliver until quiet.
            let mut steps = 0;
            while !wires[0].is_empty() || !wires[1].is_empty() {
                for i in 0..2 {
                    if let Some(m) = wires[i].pop_front() {
                        receive(&mut sides[1 - i], m);
                        pump(&mut sides[1 - i], &mut wires[1 - i]);
                    }
                }
                steps += 1;
                assert!(steps < 1_000_000, "no progress");
            }
            for i in 0..2 {
                assert_eq!(
                    sides[i].pending, 0,
                    "round {round}: side {i} stuck with queued data"
                );
                assert_eq!(sides[1 - i].got_data, queued[i]);
                assert_eq!(sides[i].sent_data, queued[i]);
            }
        }
    }
}
