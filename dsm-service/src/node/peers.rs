//! Which peers are still in the cluster: each is [`PeerState::Alive`] until
//! it leaves cleanly or fails, and never comes back.

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Mutex;

use crate::transport::PeerDown;
use crate::NodeId;

use super::DsmError;

/// A peer's membership.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub(super) enum PeerState {
    /// In the cluster.
    Alive = 0,
    /// Left cleanly.
    Left = 1,
    /// Failed (disconnected, silent, or broke the protocol).
    Failed = 2,
}

impl PeerState {
    fn from_repr(v: u8) -> PeerState {
        match v {
            0 => PeerState::Alive,
            1 => PeerState::Left,
            // Only this module stores into the atomics, and only the three
            // discriminants.
            _ => PeerState::Failed,
        }
    }
}

/// Membership of every node of the cluster, as this node sees it.
#[derive(Debug)]
pub(super) struct Peers {
    state: Vec<AtomicU8>,
    reason: Mutex<Vec<String>>,
}

impl Peers {
    /// `nodes` nodes, all alive.
    pub fn new(nodes: usize) -> Peers {
        Peers {
            state: (0..nodes)
                .map(|_| AtomicU8::new(PeerState::Alive as u8))
                .collect(),
            reason: Mutex::new(vec![String::new(); nodes]),
        }
    }

    /// The membership of `peer`.
    pub fn state(&self, peer: NodeId) -> PeerState {
        PeerState::from_repr(self.state[usize::from(peer)].load(Ordering::Acquire))
    }

    /// Records that `peer` went down; returns its new state the first time,
    /// `None` when it was already down (the first word stands).
    pub fn mark_down(&self, peer: NodeId, why: &PeerDown) -> Option<PeerState> {
        let new = if *why == PeerDown::Left {
            PeerState::Left
        } else {
            PeerState::Failed
        };
        // One lock orders the reason before the state, so whoever sees
        // Failed finds the reason, and the first word stands.
        let mut reasons = self.reason.lock().expect("lock");
        if self.state(peer) != PeerState::Alive {
            return None;
        }
        if new == PeerState::Failed {
            reasons[usize::from(peer)] = why.to_string();
        }
        self.state[usize::from(peer)].store(new as u8, Ordering::Release);
        Some(new)
    }

    /// Fails with the first peer that is gone, naming why.
    pub fn check(&self) -> Result<(), DsmError> {
        for n in 0..self.state.len() {
            let node = n as NodeId;
            let reason = match self.state(node) {
                PeerState::Alive => continue,
                PeerState::Left => "left the cluster".to_string(),
                PeerState::Failed => self.reason.lock().expect("lock")[n].clone(),
            };
            return Err(DsmError::PeerFailed { node, reason });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_peer_goes_down_once_and_is_named() {
        let p = Peers::new(3);
        assert!(p.check().is_ok());
        let why = PeerDown::Disconnected("connection reset".into());
        assert_eq!(p.mark_down(2, &why), Some(PeerState::Failed));
        assert_eq!(p.mark_down(2, &PeerDown::Left), None, "already down");
        assert_eq!(p.state(2), PeerState::Failed);
        assert_eq!(p.state(1), PeerState::Alive);
        match p.check() {
            Err(DsmError::PeerFailed { node: 2, reason }) => {
                assert_eq!(reason, why.to_string())
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_peer_that_left_is_reported_as_leaving() {
        let p = Peers::new(2);
        assert_eq!(p.mark_down(1, &PeerDown::Left), Some(PeerState::Left));
        match p.check() {
            Err(DsmError::PeerFailed { node: 1, reason }) => {
                assert_eq!(reason, "left the cluster")
            }
            other => panic!("{other:?}"),
        }
    }
}
