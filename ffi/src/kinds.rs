//! The kinds that cross the C ABI, as C enums (cbindgen writes them into
//! the header, so the C glue names them instead of passing bare numbers),
//! each with its one mapping to the runtime's own type.
//!
//! C must pass only the constants the header declares.

use qemu_accel::runtime::{IoSpace, IrqKind, Lifecycle, ResetOrigin};

/// The address space of a device access.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FvIoSpace {
    /// Port I/O.
    Pio,
    /// Memory-mapped I/O.
    Mmio,
}

impl From<FvIoSpace> for IoSpace {
    fn from(s: FvIoSpace) -> IoSpace {
        match s {
            FvIoSpace::Pio => IoSpace::Pio,
            FvIoSpace::Mmio => IoSpace::Mmio,
        }
    }
}

impl From<IoSpace> for FvIoSpace {
    fn from(s: IoSpace) -> FvIoSpace {
        match s {
            IoSpace::Pio => FvIoSpace::Pio,
            IoSpace::Mmio => FvIoSpace::Mmio,
        }
    }
}

/// An interrupt for a vCPU.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FvIrqKind {
    /// A fixed or lowest-priority vector (the APIC's IRR).
    Fixed,
    /// NMI.
    Nmi,
    /// SMI.
    Smi,
    /// INIT.
    Init,
    /// Startup IPI with a vector.
    Sipi,
}

impl From<FvIrqKind> for IrqKind {
    fn from(k: FvIrqKind) -> IrqKind {
        match k {
            FvIrqKind::Fixed => IrqKind::Fixed,
            FvIrqKind::Nmi => IrqKind::Nmi,
            FvIrqKind::Smi => IrqKind::Smi,
            FvIrqKind::Init => IrqKind::Init,
            FvIrqKind::Sipi => IrqKind::Sipi,
        }
    }
}

impl From<IrqKind> for FvIrqKind {
    fn from(k: IrqKind) -> FvIrqKind {
        match k {
            IrqKind::Fixed => FvIrqKind::Fixed,
            IrqKind::Nmi => FvIrqKind::Nmi,
            IrqKind::Smi => FvIrqKind::Smi,
            IrqKind::Init => FvIrqKind::Init,
            IrqKind::Sipi => FvIrqKind::Sipi,
        }
    }
}

/// What another node asks this host's QEMU to do.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FvLifecycleEvent {
    /// The guest powered off: shut down (exit 0).
    PowerOff,
    /// The guest reset: reset the machine, then call
    /// `fv_runtime_reset_done`.
    Reset,
}

impl FvLifecycleEvent {
    /// The request for QEMU of a lifecycle event; an exit status (which has
    /// its own callback) is a power-off for a host without that callback.
    pub fn of(event: Lifecycle) -> FvLifecycleEvent {
        match event {
            Lifecycle::Reset => FvLifecycleEvent::Reset,
            Lifecycle::PowerOff | Lifecycle::Exit(_) => FvLifecycleEvent::PowerOff,
        }
    }
}

/// Where a system reset came from (`fv_runtime_system_reset`).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FvResetOrigin {
    /// This host: the others were told.
    Local,
    /// A peer asked for it: call `fv_runtime_reset_done` once the machine
    /// runs again.
    Peer,
}

impl From<ResetOrigin> for FvResetOrigin {
    fn from(o: ResetOrigin) -> FvResetOrigin {
        match o {
            ResetOrigin::Local => FvResetOrigin::Local,
            ResetOrigin::Peer => FvResetOrigin::Peer,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_maps_both_ways() {
        for k in [
            FvIrqKind::Fixed,
            FvIrqKind::Nmi,
            FvIrqKind::Smi,
            FvIrqKind::Init,
            FvIrqKind::Sipi,
        ] {
            assert_eq!(FvIrqKind::from(IrqKind::from(k)), k);
        }
        for s in [FvIoSpace::Pio, FvIoSpace::Mmio] {
            assert_eq!(FvIoSpace::from(IoSpace::from(s)), s);
        }
        assert_eq!(
            FvLifecycleEvent::of(Lifecycle::Reset),
            FvLifecycleEvent::Reset
        );
        assert_eq!(
            FvLifecycleEvent::of(Lifecycle::Exit(3)),
            FvLifecycleEvent::PowerOff
        );
        assert_eq!(FvResetOrigin::from(ResetOrigin::Peer), FvResetOrigin::Peer);
    }
}
