//! Interrupts across hosts: an interrupt for a vCPU another host runs goes
//! to its owner ([`Runtime::send_irq`]); each vCPU's APIC routing state is
//! mirrored on every host, because the sender of an interrupt computes its
//! destinations ([`Runtime::broadcast_apic_state`]); IOAPIC EOIs go to the
//! origin, where the IOAPIC lives ([`Runtime::send_ioapic_eoi`]).

use dsm_service::NodeId;

use super::wire::Message;
use super::{Runtime, RuntimeError};

/// How an interrupt is delivered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum IrqKind {
    /// Fixed or lowest-priority vector (APIC IRR).
    Fixed = 0,
    /// NMI.
    Nmi = 1,
    /// SMI.
    Smi = 2,
    /// INIT.
    Init = 3,
    /// Startup IPI with a vector.
    Sipi = 4,
}

impl IrqKind {
    /// The kind of wire code `code`, if there is one.
    pub fn from_code(code: u8) -> Option<IrqKind> {
        Some(match code {
            0 => IrqKind::Fixed,
            1 => IrqKind::Nmi,
            2 => IrqKind::Smi,
            3 => IrqKind::Init,
            4 => IrqKind::Sipi,
            _ => return None,
        })
    }
}

/// An interrupt for a vCPU that another host runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Irq {
    /// Target vCPU.
    pub cpu: u32,
    /// Kind.
    pub kind: IrqKind,
    /// Vector (Fixed, SIPI).
    pub vector: u8,
    /// Level-triggered (Fixed).
    pub level: bool,
}

/// The routing state of a vCPU's local APIC, mirrored on every host because
/// the sender of an interrupt computes its destinations.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ApicState {
    /// vCPU.
    pub cpu: u32,
    /// APIC ID register.
    pub id: u32,
    /// Logical destination register.
    pub ldr: u32,
    /// Destination format register.
    pub dfr: u32,
    /// IA32_APIC_BASE.
    pub apicbase: u64,
}

impl Runtime {
    /// Sends an interrupt to the host that runs `irq.cpu`.
    pub fn send_irq(&self, irq: &Irq) -> Result<(), RuntimeError> {
        let owner = self
            .placement
            .owner(irq.cpu)
            .ok_or(RuntimeError::TooLarge(0))? as NodeId;
        self.send(owner, &Message::Irq(*irq))
    }

    /// Mirrors a local vCPU's APIC routing state to every other host.
    pub fn broadcast_apic_state(&self, state: &ApicState) -> Result<(), RuntimeError> {
        self.broadcast(&Message::Apic(*state))
    }

    /// Sends an IOAPIC EOI to the origin.
    pub fn send_ioapic_eoi(&self, vector: u8) -> Result<(), RuntimeError> {
        self.send(0, &Message::IoapicEoi(vector))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_has_its_wire_code() {
        for kind in [
            IrqKind::Fixed,
            IrqKind::Nmi,
            IrqKind::Smi,
            IrqKind::Init,
            IrqKind::Sipi,
        ] {
            assert_eq!(IrqKind::from_code(kind as u8), Some(kind));
        }
        assert_eq!(IrqKind::from_code(5), None);
    }
}
