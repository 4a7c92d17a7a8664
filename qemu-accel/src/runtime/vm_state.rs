//! [`VmState`]: how this host's part of the VM is going — running, ending
//! (this node ended it), following a peer's end, or stopped by a failure —
//! and whether a reset a peer asked for is under way here.
//!
//! These are the cluster's lifecycle decisions. QEMU's glue reports what
//! happens (a guest power-off or exit, a system reset, the process exiting)
//! and does what the runtime decides; it keeps no state of its own. The
//! decisions are pure functions of the state, tested here.

use super::lifecycle::Lifecycle;

/// The lifecycle decisions of one host.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct VmState {
    /// A peer ended the VM (power-off or exit status): this host follows
    /// and sends nothing back.
    peer_ended: bool,
    /// This host ended the VM (it told the others, or followed a peer).
    ending: bool,
    /// A node failed; the VM stops with an error.
    failed: bool,
    /// The VM's exit status (a peer's, once it told us).
    exit_status: i32,
    /// The exit summary was printed.
    summary_printed: bool,
    /// The exit watchdog was started.
    exit_armed: bool,
    /// A peer's reset was requested here and the reset handler has not run
    /// yet: that reset is not sent back.
    peer_reset_pending: bool,
}

/// Where a system reset on this host came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResetOrigin {
    /// The guest (or the monitor) here: every other host resets too.
    Local,
    /// A peer asked for it: tell the runtime when it is done.
    Peer,
}

impl VmState {
    /// The VM ends (or is ending) one way or another: peers that leave now
    /// have not failed.
    pub fn is_ending(&self) -> bool {
        self.ending || self.peer_ended || self.failed
    }

    /// This host ends the VM with `status` (guest power-off, an exit
    /// device, a fatal error): what to tell the other hosts, once and only
    /// when the end started here.
    pub fn end_here(&mut self, status: i32) -> Option<Lifecycle> {
        let tell = !self.peer_ended && !self.ending && !self.failed;
        self.ending = true;
        if !tell {
            return None;
        }
        self.exit_status = status;
        Some(if status == 0 {
            Lifecycle::PowerOff
        } else {
            Lifecycle::Exit(status)
        })
    }

    /// A peer's lifecycle event arrives: records what it means here.
    pub fn peer_event(&mut self, event: Lifecycle) {
        match event {
            Lifecycle::PowerOff | Lifecycle::Exit(_) => {
                self.peer_ended = true;
                self.exit_status = event.status();
            }
            Lifecycle::Reset => self.peer_reset_pending = true,
        }
    }

    /// A node failed: true when this host must stop the VM for it (the
    /// first failure while the VM runs).
    pub fn node_failed(&mut self) -> bool {
        if self.is_ending() {
            return false;
        }
        self.failed = true;
        true
    }

    /// A system reset runs here.
    pub fn system_reset(&mut self) -> ResetOrigin {
        if std::mem::take(&mut self.peer_reset_pending) {
            ResetOrigin::Peer
        } else {
            ResetOrigin::Local
        }
    }

    /// The status this host exits with; `host_error` when QEMU stops for an
    /// error of its own (a failed node, a fatal device error).
    pub fn exit_code(&self, host_error: bool) -> i32 {
        if host_error || self.failed {
            1
        } else {
            self.exit_status
        }
    }

    /// True the first time: print the exit summary now.
    pub fn take_summary(&mut self) -> bool {
        !std::mem::replace(&mut self.summary_printed, true)
    }

    /// True the first time: start the exit watchdog now.
    pub fn take_exit_watchdog(&mut self) -> bool {
        !std::mem::replace(&mut self.exit_armed, true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_local_power_off_is_told_once() {
        let mut s = VmState::default();
        assert!(!s.is_ending());
        assert_eq!(s.end_here(0), Some(Lifecycle::PowerOff));
        assert!(s.is_ending());
        assert_eq!(s.end_here(0), None, "the exit handler after the shutdown");
        assert_eq!(s.exit_code(false), 0);
    }

    #[test]
    fn a_local_exit_status_is_told_and_kept() {
        let mut s = VmState::default();
        assert_eq!(s.end_here(33), Some(Lifecycle::Exit(33)));
        assert_eq!(s.end_here(1), None);
        assert_eq!(s.exit_code(false), 33);
        assert_eq!(s.exit_code(true), 1, "a host error wins");
    }

    #[test]
    fn a_peers_end_is_followed_not_echoed() {
        let mut s = VmState::default();
        s.peer_event(Lifecycle::Exit(7));
        assert!(s.is_ending());
        assert_eq!(s.end_here(7), None);
        assert_eq!(s.exit_code(false), 7);
        let mut s = VmState::default();
        s.peer_event(Lifecycle::PowerOff);
        assert_eq!(s.end_here(0), None);
        assert_eq!(s.exit_code(false), 0);
    }

    #[test]
    fn only_the_first_failure_of_a_running_vm_stops_it() {
        let mut s = VmState::default();
        assert!(s.node_failed());
        assert!(!s.node_failed());
        assert_eq!(
            s.end_here(0),
            None,
            "a failed VM tells nobody it powered off"
        );
        assert_eq!(s.exit_code(false), 1);
        let mut s = VmState::default();
        s.end_here(0);
        assert!(
            !s.node_failed(),
            "peers leaving an ending VM have not failed"
        );
        let mut s = VmState::default();
        s.peer_event(Lifecycle::PowerOff);
        assert!(!s.node_failed());
    }

    #[test]
    fn a_reset_a_peer_asked_for_is_not_sent_back() {
        let mut s = VmState::default();
        assert_eq!(s.system_reset(), ResetOrigin::Local);
        s.peer_event(Lifecycle::Reset);
        assert!(!s.is_ending(), "a reset keeps the VM running");
        assert_eq!(s.system_reset(), ResetOrigin::Peer);
        assert_eq!(
            s.system_reset(),
            ResetOrigin::Local,
            "the next one is local"
        );
    }

    #[test]
    fn the_summary_and_the_watchdog_happen_once() {
        let mut s = VmState::default();
        assert!(s.take_summary());
        assert!(!s.take_summary());
        assert!(s.take_exit_watchdog());
        assert!(!s.take_exit_watchdog());
    }
}
