//! Cluster-wide events and failure: power-off, reset and exit status go to
//! every host ([`Runtime::broadcast_lifecycle`]); the `fv-watch` thread
//! turns the DSM's peer events into [`super::Host::node_failed`] and fails
//! the calls that wait for a dead node, so no vCPU hangs. Once the VM is
//! ending (a power-off or exit was sent or seen), peers that leave have not
//! failed.

use std::sync::atomic::Ordering;
use std::sync::mpsc::Receiver;

use dsm_service::{DsmEvent, NodeId};
use tracing::warn;

use super::wire::Message;
use super::{Runtime, RuntimeError};

/// Events that concern every host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lifecycle {
    /// The guest powered off: every node exits 0.
    PowerOff,
    /// The guest reset: every node resets its vCPUs.
    Reset,
    /// The VM ended with this exit status on the sender (e.g. the guest
    /// wrote to `isa-debug-exit`): every node exits with it.
    Exit(i32),
}

impl Lifecycle {
    /// Wire code (also the C ABI's event number).
    pub fn code(self) -> u8 {
        match self {
            Lifecycle::PowerOff => 0,
            Lifecycle::Reset => 1,
            Lifecycle::Exit(_) => 2,
        }
    }

    /// The event of wire code `code` with exit status `status` (used by
    /// [`Lifecycle::Exit`] only), if there is one.
    pub fn from_code(code: u8, status: i32) -> Option<Lifecycle> {
        Some(match code {
            0 => Lifecycle::PowerOff,
            1 => Lifecycle::Reset,
            2 => Lifecycle::Exit(status),
            _ => return None,
        })
    }

    /// The exit status carried on the wire (0 but for [`Lifecycle::Exit`]).
    pub fn status(self) -> i32 {
        match self {
            Lifecycle::Exit(status) => status,
            Lifecycle::PowerOff | Lifecycle::Reset => 0,
        }
    }

    /// The VM ends: peers that leave afterwards have not failed.
    pub fn ends_vm(self) -> bool {
        !matches!(self, Lifecycle::Reset)
    }
}

/// What a DSM event means for the running VM.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Verdict {
    /// A peer left or failed while the VM ends: calls fail quietly.
    Ending,
    /// Nothing to do (the runtime is stopping, or a clean leave then).
    Ignore,
    /// A peer sent a frame that breaks the protocol: warn, go on.
    ProtocolError {
        /// Peer.
        node: NodeId,
        /// What was wrong.
        what: String,
    },
    /// A node failed: its calls fail and QEMU stops naming it.
    Failed {
        /// Node.
        node: NodeId,
        /// Why.
        reason: String,
    },
}

/// Judges `event` on node `me`: `ending` once the VM ends, `stopping` once
/// this runtime shuts down.
fn judge(event: DsmEvent, me: NodeId, ending: bool, stopping: bool) -> Verdict {
    if matches!(
        event,
        DsmEvent::PeerFailed { .. } | DsmEvent::PeerLeft { .. }
    ) && ending
    {
        // A power-off is under way: peers that exit first may close their
        // connections abruptly. Nobody waits for them.
        return Verdict::Ending;
    }
    let (node, reason) = match event {
        DsmEvent::PeerFailed { node, reason } => (node, reason),
        DsmEvent::PeerLeft { node } => (
            node,
            "left the cluster while the VM was running".to_string(),
        ),
        DsmEvent::Fatal(what) => (me, what),
        DsmEvent::ProtocolError { node, what } => return Verdict::ProtocolError { node, what },
    };
    if stopping {
        return Verdict::Ignore;
    }
    Verdict::Failed { node, reason }
}

impl Runtime {
    /// Tells every other host about a power-off, reset or exit.
    pub fn broadcast_lifecycle(&self, event: Lifecycle) -> Result<(), RuntimeError> {
        if event.ends_vm() {
            self.mark_ending();
        }
        self.broadcast(&Message::Lifecycle(event))
    }

    /// The VM ends: peers that leave from now on have not failed.
    pub(super) fn mark_ending(&self) {
        self.ending.store(true, Ordering::Release);
    }

    /// `fv-app` thread: another node's lifecycle event reaches QEMU.
    pub(super) fn deliver_lifecycle(&self, event: Lifecycle, from: NodeId) {
        if event.ends_vm() {
            self.mark_ending();
        }
        self.host.lifecycle(event, from);
    }

    /// The `fv-watch` thread: acts on the DSM's events until the DSM stops.
    pub(super) fn watch(&self, events: &Receiver<DsmEvent>) {
        while let Ok(event) = events.recv() {
            let ending = self.ending.load(Ordering::Acquire);
            let stopping = self.is_stopping();
            match judge(event, self.node.id(), ending, stopping) {
                Verdict::Ending => self.fail_calls(|| RuntimeError::Stopping),
                Verdict::Ignore => {}
                Verdict::ProtocolError { node, what } => {
                    warn!(peer = node, %what, "protocol error");
                }
                Verdict::Failed { node, reason } => {
                    self.fail_calls(|| RuntimeError::NodeFailed {
                        node,
                        reason: reason.clone(),
                    });
                    self.host.node_failed(node, &reason);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn failed(node: NodeId) -> DsmEvent {
        DsmEvent::PeerFailed {
            node,
            reason: "connection reset".into(),
        }
    }

    #[test]
    fn wire_codes_round_trip() {
        for e in [
            Lifecycle::PowerOff,
            Lifecycle::Reset,
            Lifecycle::Exit(33),
            Lifecycle::Exit(-1),
        ] {
            assert_eq!(Lifecycle::from_code(e.code(), e.status()), Some(e));
        }
        assert_eq!(Lifecycle::from_code(3, 0), None);
        assert_eq!(Lifecycle::Reset.status(), 0);
    }

    #[test]
    fn only_reset_keeps_the_vm_running() {
        assert!(Lifecycle::PowerOff.ends_vm());
        assert!(Lifecycle::Exit(0).ends_vm());
        assert!(!Lifecycle::Reset.ends_vm());
    }

    #[test]
    fn a_peer_failing_while_the_vm_runs_is_named() {
        assert_eq!(
            judge(failed(2), 0, false, false),
            Verdict::Failed {
                node: 2,
                reason: "connection reset".into()
            }
        );
        assert_eq!(
            judge(DsmEvent::PeerLeft { node: 1 }, 0, false, false),
            Verdict::Failed {
                node: 1,
                reason: "left the cluster while the VM was running".into()
            }
        );
    }

    #[test]
    fn a_fatal_dsm_error_names_this_node() {
        assert_eq!(
            judge(DsmEvent::Fatal("uffd gone".into()), 3, false, false),
            Verdict::Failed {
                node: 3,
                reason: "uffd gone".into()
            }
        );
    }

    #[test]
    fn peers_leaving_an_ending_vm_have_not_failed() {
        assert_eq!(judge(failed(1), 0, true, false), Verdict::Ending);
        assert_eq!(
            judge(DsmEvent::PeerLeft { node: 1 }, 0, true, true),
            Verdict::Ending
        );
    }

    #[test]
    fn nothing_fails_once_this_runtime_stops() {
        assert_eq!(judge(failed(1), 0, false, true), Verdict::Ignore);
        assert_eq!(
            judge(DsmEvent::PeerLeft { node: 1 }, 0, false, true),
            Verdict::Ignore
        );
        assert_eq!(
            judge(DsmEvent::Fatal("x".into()), 0, false, true),
            Verdict::Ignore
        );
    }

    #[test]
    fn protocol_errors_are_reported_not_fatal() {
        let e = DsmEvent::ProtocolError {
            node: 1,
            what: "bad frame".into(),
        };
        assert_eq!(
            judge(e, 0, false, true),
            Verdict::ProtocolError {
                node: 1,
                what: "bad frame".into()
            }
        );
    }
}
