//! Cluster-wide events and failure. QEMU reports what happens on its host
//! ([`Runtime::vm_ends`], [`Runtime::vm_exits`], [`Runtime::system_reset`],
//! [`Runtime::reset_done`]); the runtime decides, with `VmState`, whom to
//! tell, what this host exits with, when the summary is printed and when
//! the exit watchdog ends a process that cannot stop. The `fv-watch` thread
//! turns the DSM's peer events into [`super::Host::node_failed`] (once, while
//! the VM runs) and fails the calls that wait for a dead node, so no vCPU
//! hangs. Once the VM is ending, peers that leave have not failed.

use std::sync::mpsc::Receiver;
use std::sync::{Condvar, Mutex};
use std::time::Duration;

use dsm_service::{DsmEvent, NodeId};
use tracing::warn;

use super::vm_state::ResetOrigin;
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

/// After power-off or a failure, the longest an orderly exit may take
/// before the exit watchdog ends the process (vCPUs blocked on pages of a
/// node that is gone never stop on their own).
const EXIT_GRACE: Duration = Duration::from_secs(3);
/// The longest a peer's reset may hold back the interrupts sent after it.
const RESET_WAIT: Duration = Duration::from_secs(10);

/// A peer's reset in progress on this host: the `fv-app` thread waits for
/// it before it delivers that peer's next messages (the firmware's INIT and
/// SIPI must find this host reset).
#[derive(Debug, Default)]
pub(super) struct ResetGate {
    running: Mutex<bool>,
    done: Condvar,
}

impl ResetGate {
    fn begin(&self) {
        *self.running.lock().expect("lock") = true;
    }

    fn finish(&self) {
        *self.running.lock().expect("lock") = false;
        self.done.notify_all();
    }

    /// Waits until the reset is finished or `limit` passed; false on
    /// timeout.
    fn wait(&self, limit: Duration) -> bool {
        let running = self.running.lock().expect("lock");
        let (mut running, t) = self
            .done
            .wait_timeout_while(running, limit, |r| *r)
            .expect("lock");
        let finished = !t.timed_out();
        *running = false;
        finished
    }
}

impl Runtime {
    /// Tells every other host about a power-off, reset or exit.
    fn broadcast_lifecycle(&self, event: Lifecycle) -> Result<(), RuntimeError> {
        self.broadcast(&Message::Lifecycle(event))
    }

    /// The VM ends here with `status` (QEMU's shutdown: a guest power-off,
    /// an exit device, or `host_error` for an error of QEMU's own): the
    /// other hosts are told once, the summary is printed, and the exit
    /// watchdog ends the process if it does not exit within the grace time.
    pub fn vm_ends(&self, status: i32, host_error: bool) {
        let code = self.end_here(status, host_error);
        self.arm_exit_watchdog(code);
    }

    /// The process exits with `status` (QEMU's `exit()` from anywhere, e.g.
    /// a fatal error): the other hosts stop too, with the same status.
    pub fn vm_exits(&self, status: i32) {
        self.end_here(status, false);
    }

    /// Records this host's end, tells the others when it started here,
    /// prints the summary once; returns the status to exit with
    /// (`host_error`: QEMU stops for an error of its own).
    fn end_here(&self, status: i32, host_error: bool) -> i32 {
        let (tell, code) = {
            let mut s = self.state.lock().expect("lock");
            let tell = s.end_here(status);
            (tell, s.exit_code(host_error))
        };
        if let Some(event) = tell {
            if let Err(e) = self.broadcast_lifecycle(event) {
                warn!(error = %e, "telling the other nodes that the VM ends failed");
            }
        }
        self.print_summary_once();
        code
    }

    /// A system reset runs on this host (QEMU's reset handler, once the
    /// cluster runs). A local reset is sent to every other host; for one a
    /// peer asked for, QEMU calls [`Runtime::reset_done`] once the reset
    /// and the vCPUs' restart are finished.
    pub fn system_reset(&self) -> ResetOrigin {
        let origin = self.state.lock().expect("lock").system_reset();
        if origin == ResetOrigin::Local {
            if let Err(e) = self.broadcast_lifecycle(Lifecycle::Reset) {
                warn!(error = %e, "telling the other nodes about the reset failed");
            }
        }
        origin
    }

    /// A reset a peer asked for is finished here.
    pub fn reset_done(&self) {
        self.reset.finish();
    }

    /// The VM is ending: peers that leave from now on have not failed.
    pub(super) fn is_ending(&self) -> bool {
        self.state.lock().expect("lock").is_ending()
    }

    /// `fv-app` thread: another node's lifecycle event reaches QEMU. For a
    /// reset, waits until this host has reset (or [`RESET_WAIT`] passed).
    pub(super) fn deliver_lifecycle(&self, event: Lifecycle, from: NodeId) {
        self.state.lock().expect("lock").peer_event(event);
        if event != Lifecycle::Reset {
            self.host.lifecycle(event, from);
            return;
        }
        self.reset.begin();
        self.host.lifecycle(event, from);
        if !self.reset.wait(RESET_WAIT) {
            warn!(
                node = self.node.id(),
                peer = from,
                "the reset node {from} asked for did not finish in {} ms; delivering interrupts anyway",
                RESET_WAIT.as_millis()
            );
        }
    }

    /// The `fv-watch` thread: acts on the DSM's events until the DSM stops.
    pub(super) fn watch(&self, events: &Receiver<DsmEvent>) {
        while let Ok(event) = events.recv() {
            let ending = self.is_ending();
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
                    if self.state.lock().expect("lock").node_failed() {
                        self.host.node_failed(node, &reason);
                        self.print_summary_once();
                        self.arm_exit_watchdog(1);
                    }
                }
            }
        }
    }

    fn print_summary_once(&self) {
        if self.state.lock().expect("lock").take_summary() {
            let host = self.host.clone();
            eprintln!("{}", self.summary(&|cpu| host.vcpu_exits(cpu)));
        }
    }

    /// Once: ends the process with `code` after [`EXIT_GRACE`] unless it
    /// exits by itself first.
    fn arm_exit_watchdog(&self, code: i32) {
        if !self.state.lock().expect("lock").take_exit_watchdog() {
            return;
        }
        let spawned = std::thread::Builder::new()
            .name("fv-exit".into())
            .spawn(move || {
                std::thread::sleep(EXIT_GRACE);
                // SAFETY: fflush(NULL) flushes every C stdio stream and
                // _exit ends the process at once; neither touches Rust state.
                unsafe {
                    libc::fflush(std::ptr::null_mut());
                    libc::_exit(code)
                }
            });
        if let Err(e) = spawned {
            warn!(error = %e, "cannot start the exit watchdog");
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
