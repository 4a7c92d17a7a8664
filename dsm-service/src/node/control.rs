//! The DSM control protocol (channel `DSM_CONTROL`): the origin's start-up
//! state and cluster-wide barriers. The byte format is in
//! `transport/WIRE.md` ("DSM control messages").
//!
//! * Start-up: the origin sends every other node the runs of pages it holds
//!   ([`ControlMsg::Touched`], in chunks, the last one marked); a node is
//!   ready once the last chunk is in.
//! * Barriers: each node sends [`ControlMsg::BarrierEnter`] with its barrier
//!   generation to the origin; once every node has entered, the origin sends
//!   [`ControlMsg::BarrierRelease`] to all.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use crate::coherence::{bit, NodeSet};
use crate::transport::channel;
use crate::{NodeId, MAX_NODES};

use super::{DsmError, NodeCore};

/// Most page runs one `Touched` message carries.
const RUNS_PER_MESSAGE: usize = 32 * 1024;

const TAG_TOUCHED: u8 = 1;
const TAG_BARRIER_ENTER: u8 = 2;
const TAG_BARRIER_RELEASE: u8 = 3;

/// One control message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ControlMsg {
    /// Origin → node: runs `(first page, count)` the origin holds.
    Touched {
        /// The last chunk of the start-up state.
        last: bool,
        /// The runs.
        runs: Vec<(u64, u64)>,
    },
    /// Node → origin: entered barrier `gen`.
    BarrierEnter {
        /// Barrier generation (1, 2, ...).
        gen: u64,
    },
    /// Origin → node: every node has entered barrier `gen`.
    BarrierRelease {
        /// Barrier generation.
        gen: u64,
    },
}

/// A control message that cannot be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ControlDecodeError {
    /// No bytes at all.
    #[error("empty control message")]
    Empty,
    /// A tag nobody defined.
    #[error("unknown control message tag {0}")]
    UnknownTag(u8),
    /// The length does not fit the tag.
    #[error("control message {tag} of {len} bytes is malformed")]
    BadLength {
        /// Tag.
        tag: u8,
        /// Bytes received.
        len: usize,
    },
}

fn u64_at(b: &[u8], i: usize) -> u64 {
    u64::from_le_bytes(b[i..i + 8].try_into().expect("8 bytes"))
}

impl ControlMsg {
    /// The wire form.
    pub fn encode(&self) -> Vec<u8> {
        match self {
            ControlMsg::Touched { last, runs } => {
                let mut b = Vec::with_capacity(2 + 16 * runs.len());
                b.extend_from_slice(&[TAG_TOUCHED, u8::from(*last)]);
                for &(first, count) in runs {
                    b.extend_from_slice(&first.to_le_bytes());
                    b.extend_from_slice(&count.to_le_bytes());
                }
                b
            }
            ControlMsg::BarrierEnter { gen } => Self::tagged_u64(TAG_BARRIER_ENTER, *gen),
            ControlMsg::BarrierRelease { gen } => Self::tagged_u64(TAG_BARRIER_RELEASE, *gen),
        }
    }

    fn tagged_u64(tag: u8, v: u64) -> Vec<u8> {
        let mut b = vec![tag];
        b.extend_from_slice(&v.to_le_bytes());
        b
    }

    /// Parses one message; anything but an exact fit is refused.
    pub fn decode(b: &[u8]) -> Result<ControlMsg, ControlDecodeError> {
        let &tag = b.first().ok_or(ControlDecodeError::Empty)?;
        let bad = ControlDecodeError::BadLength { tag, len: b.len() };
        match tag {
            TAG_TOUCHED => {
                if b.len() < 2 || !(b.len() - 2).is_multiple_of(16) || b[1] > 1 {
                    return Err(bad);
                }
                let runs = b[2..]
                    .chunks_exact(16)
                    .map(|c| (u64_at(c, 0), u64_at(c, 8)))
                    .collect();
                Ok(ControlMsg::Touched {
                    last: b[1] == 1,
                    runs,
                })
            }
            TAG_BARRIER_ENTER | TAG_BARRIER_RELEASE => {
                if b.len() != 9 {
                    return Err(bad);
                }
                let gen = u64_at(b, 1);
                Ok(if tag == TAG_BARRIER_ENTER {
                    ControlMsg::BarrierEnter { gen }
                } else {
                    ControlMsg::BarrierRelease { gen }
                })
            }
            t => Err(ControlDecodeError::UnknownTag(t)),
        }
    }

    /// The start-up state for `runs`, cut into messages (at least one, the
    /// last marked).
    pub fn touched_chunks(runs: &[(u64, u64)]) -> Vec<ControlMsg> {
        if runs.is_empty() {
            return vec![ControlMsg::Touched {
                last: true,
                runs: Vec::new(),
            }];
        }
        let n = runs.len().div_ceil(RUNS_PER_MESSAGE);
        runs.chunks(RUNS_PER_MESSAGE)
            .enumerate()
            .map(|(k, c)| ControlMsg::Touched {
                last: k + 1 == n,
                runs: c.to_vec(),
            })
            .collect()
    }
}

/// Start-up and barrier progress, guarded by [`ControlState`]'s lock.
#[derive(Debug)]
pub(super) struct Progress {
    /// The origin's whole start-up state is in.
    pub touched_done: bool,
    /// Origin only: the nodes that entered each barrier generation.
    entered: HashMap<u64, NodeSet>,
    /// The highest barrier generation released.
    pub released: u64,
}

/// [`Progress`] and the condition variable its waiters sleep on.
#[derive(Debug)]
pub(super) struct ControlState {
    progress: Mutex<Progress>,
    changed: Condvar,
    /// Barriers this node has entered.
    generation: std::sync::atomic::AtomicU64,
}

impl ControlState {
    /// Before start-up; the origin has its own state already.
    pub fn new(origin: bool) -> ControlState {
        ControlState {
            progress: Mutex::new(Progress {
                touched_done: origin,
                entered: HashMap::new(),
                released: 0,
            }),
            changed: Condvar::new(),
            generation: Default::default(),
        }
    }

    /// Wakes every waiter (something changed: progress, or a peer went down).
    pub fn notify(&self) {
        self.changed.notify_all();
    }

    /// Origin: `from` entered barrier `gen`; true once every one of `nodes`
    /// nodes has (the barrier is then released here).
    fn enter(&self, from: NodeId, gen: u64, nodes: usize) -> bool {
        let all: NodeSet = if nodes == MAX_NODES {
            u64::MAX
        } else {
            (1u64 << nodes) - 1
        };
        let mut p = self.progress.lock().expect("lock");
        let m = p.entered.entry(gen).or_insert(0);
        *m |= bit(from);
        if *m != all {
            return false;
        }
        p.entered.remove(&gen);
        p.released = p.released.max(gen);
        drop(p);
        self.notify();
        true
    }

    fn release(&self, gen: u64) {
        let mut p = self.progress.lock().expect("lock");
        p.released = p.released.max(gen);
        drop(p);
        self.notify();
    }

    fn finish_start_up(&self) {
        self.progress.lock().expect("lock").touched_done = true;
        self.notify();
    }
}

impl NodeCore {
    /// Origin: sends the start-up state to every other node.
    pub(super) fn send_touched(&self, runs: &[(u64, u64)]) -> Result<(), DsmError> {
        let msgs: Vec<Vec<u8>> = ControlMsg::touched_chunks(runs)
            .iter()
            .map(ControlMsg::encode)
            .collect();
        for peer in 1..self.nodes as NodeId {
            for m in &msgs {
                self.transport().send(peer, channel::DSM_CONTROL, m)?;
            }
        }
        Ok(())
    }

    /// Waits for the origin's start-up state.
    pub(super) fn wait_touched(&self, timeout: Duration) -> Result<(), DsmError> {
        self.wait_control(
            |p| p.touched_done,
            Some((Instant::now() + timeout, timeout)),
        )
    }

    /// Waits until `done` holds for the control progress, failing as soon
    /// as a peer is gone or at the deadline (with the timeout it came from).
    fn wait_control(
        &self,
        done: impl Fn(&Progress) -> bool,
        deadline: Option<(Instant, Duration)>,
    ) -> Result<(), DsmError> {
        let c = &self.control;
        let mut p = c.progress.lock().expect("lock");
        while !done(&p) {
            self.peers.check()?;
            if let Some((at, timeout)) = deadline {
                if Instant::now() >= at {
                    return Err(DsmError::StartTimeout(timeout));
                }
            }
            p = c
                .changed
                .wait_timeout(p, Duration::from_millis(50))
                .expect("lock")
                .0;
        }
        Ok(())
    }

    /// Waits until every node has entered as many barriers as this one.
    pub(super) fn barrier(&self) -> Result<(), DsmError> {
        let gen = self.control.generation.fetch_add(1, Ordering::AcqRel) + 1;
        if self.me == 0 {
            self.barrier_enter(0, gen);
        } else {
            let m = ControlMsg::BarrierEnter { gen }.encode();
            self.transport().send(0, channel::DSM_CONTROL, &m)?;
        }
        self.wait_control(|p| p.released >= gen, None)
    }

    fn barrier_enter(&self, from: NodeId, gen: u64) {
        if self.control.enter(from, gen, self.nodes) {
            let m = ControlMsg::BarrierRelease { gen }.encode();
            for peer in 1..self.nodes as NodeId {
                let _ = self.transport().send(peer, channel::DSM_CONTROL, &m);
            }
        }
    }

    /// Handles one control frame from `from`.
    pub(super) fn on_control(&self, from: NodeId, frame: &[u8]) -> Result<(), String> {
        let msg = ControlMsg::decode(frame).map_err(|e| e.to_string())?;
        match msg {
            ControlMsg::Touched { last, runs } if from == 0 => {
                let pages = self.space.pages();
                if runs
                    .iter()
                    .any(|&(f, c)| f.checked_add(c).is_none_or(|e| e > pages))
                {
                    return Err("start-up state names pages outside the registered regions".into());
                }
                self.apply_touched(&runs, false);
                if last {
                    self.control.finish_start_up();
                }
            }
            ControlMsg::BarrierEnter { gen } if self.me == 0 => self.barrier_enter(from, gen),
            ControlMsg::BarrierRelease { gen } if from == 0 => self.control.release(gen),
            other => {
                return Err(format!(
                    "unexpected control message {other:?} from node {from}"
                ))
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_control_message_round_trips() {
        let msgs = [
            ControlMsg::Touched {
                last: true,
                runs: vec![(0, 3), (u64::MAX - 1, 1)],
            },
            ControlMsg::Touched {
                last: false,
                runs: vec![],
            },
            ControlMsg::BarrierEnter { gen: 7 },
            ControlMsg::BarrierRelease { gen: u64::MAX },
        ];
        for m in msgs {
            assert_eq!(ControlMsg::decode(&m.encode()), Ok(m));
        }
    }

    #[test]
    fn malformed_control_messages_are_named() {
        let cases: &[(&[u8], ControlDecodeError)] = &[
            (&[], ControlDecodeError::Empty),
            (&[9], ControlDecodeError::UnknownTag(9)),
            (&[1], ControlDecodeError::BadLength { tag: 1, len: 1 }),
            (
                &[1, 1, 0, 0],
                ControlDecodeError::BadLength { tag: 1, len: 4 },
            ),
            (&[1, 2], ControlDecodeError::BadLength { tag: 1, len: 2 }),
            (
                &[2, 0, 0, 0],
                ControlDecodeError::BadLength { tag: 2, len: 4 },
            ),
            (&[3; 10], ControlDecodeError::BadLength { tag: 3, len: 10 }),
        ];
        for (bytes, want) in cases {
            assert_eq!(ControlMsg::decode(bytes).as_ref(), Err(want), "{bytes:?}");
        }
    }

    #[test]
    fn the_start_up_state_is_chunked_with_the_last_marked() {
        assert_eq!(
            ControlMsg::touched_chunks(&[]),
            vec![ControlMsg::Touched {
                last: true,
                runs: vec![]
            }]
        );
        let runs: Vec<(u64, u64)> = (0..RUNS_PER_MESSAGE as u64 + 1)
            .map(|i| (2 * i, 1))
            .collect();
        let chunks = ControlMsg::touched_chunks(&runs);
        assert_eq!(chunks.len(), 2);
        let ControlMsg::Touched { last, runs: r } = &chunks[0] else {
            panic!()
        };
        assert!(!last);
        assert_eq!(r.len(), RUNS_PER_MESSAGE);
        assert_eq!(
            chunks[1],
            ControlMsg::Touched {
                last: true,
                runs: vec![(2 * RUNS_PER_MESSAGE as u64, 1)]
            }
        );
    }

    #[test]
    fn a_barrier_is_released_once_every_node_entered() {
        let c = ControlState::new(true);
        assert!(!c.enter(0, 1, 3));
        assert!(!c.enter(2, 1, 3));
        assert!(!c.enter(2, 1, 3), "entering twice counts once");
        assert!(!c.enter(0, 2, 3), "the next generation is separate");
        assert!(c.enter(1, 1, 3));
        assert_eq!(c.progress.lock().unwrap().released, 1);
        let full = ControlState::new(true);
        for n in 0..MAX_NODES as NodeId - 1 {
            assert!(!full.enter(n, 1, MAX_NODES));
        }
        assert!(full.enter(MAX_NODES as NodeId - 1, 1, MAX_NODES));
    }
}
