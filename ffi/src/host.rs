//! The callbacks into QEMU ([`FvHostOps`]) and the runtime's view of them
//! ([`CHost`], its `Host`). The runtime calls them from its own threads,
//! each announced with `thread_start` first (QEMU registers the thread with
//! RCU there).

use std::ffi::{c_char, c_void, CString};

use qemu_accel::runtime::{ApicState, Host, IoAccess, Irq, Lifecycle};

use crate::kinds::{FvIoSpace, FvIrqKind, FvLifecycleEvent};

/// A device access forwarded to the origin.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct FvIoAccess {
    /// vCPU index.
    pub cpu: u32,
    /// Port I/O or MMIO.
    pub space: FvIoSpace,
    /// A write.
    pub is_write: bool,
    /// Bytes per element.
    pub size: u8,
    /// Elements (string I/O), at least 1.
    pub count: u32,
    /// Port or guest-physical address.
    pub addr: u64,
    /// `MemTxAttrs` bits.
    pub attrs: u32,
}

impl From<&FvIoAccess> for IoAccess {
    fn from(a: &FvIoAccess) -> IoAccess {
        IoAccess {
            cpu: a.cpu,
            space: a.space.into(),
            addr: a.addr,
            size: a.size,
            count: a.count.max(1),
            is_write: a.is_write,
            attrs: a.attrs,
        }
    }
}

impl From<&IoAccess> for FvIoAccess {
    fn from(a: &IoAccess) -> FvIoAccess {
        FvIoAccess {
            cpu: a.cpu,
            space: a.space.into(),
            is_write: a.is_write,
            size: a.size,
            count: a.count,
            addr: a.addr,
            attrs: a.attrs,
        }
    }
}

/// APIC routing state of one vCPU.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct FvApicState {
    /// vCPU index.
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

impl From<&FvApicState> for ApicState {
    fn from(s: &FvApicState) -> ApicState {
        ApicState {
            cpu: s.cpu,
            id: s.id,
            ldr: s.ldr,
            dfr: s.dfr,
            apicbase: s.apicbase,
        }
    }
}

impl From<&ApicState> for FvApicState {
    fn from(s: &ApicState) -> FvApicState {
        FvApicState {
            cpu: s.cpu,
            id: s.id,
            ldr: s.ldr,
            dfr: s.dfr,
            apicbase: s.apicbase,
        }
    }
}

/// Callbacks into QEMU. Every pointer must be set except `page_changed`,
/// `exit_status` and `vcpu_exits`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct FvHostOps {
    /// Origin: run an access on the device model; returns `MemTxResult`.
    pub exec_io:
        Option<unsafe extern "C" fn(ctx: *mut c_void, a: *const FvIoAccess, data: *mut u8) -> u32>,
    /// Deliver an interrupt to a local vCPU.
    pub deliver_irq: Option<
        unsafe extern "C" fn(ctx: *mut c_void, cpu: u32, kind: FvIrqKind, vector: u8, level: bool),
    >,
    /// Record a remote vCPU's APIC routing state.
    pub apic_state: Option<unsafe extern "C" fn(ctx: *mut c_void, s: *const FvApicState)>,
    /// Origin: an IOAPIC EOI from a remote vCPU.
    pub ioapic_eoi: Option<unsafe extern "C" fn(ctx: *mut c_void, vector: u8)>,
    /// Another node powered the guest off or reset it: request the same
    /// here (for a reset, `fv_runtime_system_reset` then says it is the
    /// peer's).
    pub lifecycle:
        Option<unsafe extern "C" fn(ctx: *mut c_void, event: FvLifecycleEvent, from: u32)>,
    /// A node failed while the VM ran (the runtime calls this once): report
    /// it and stop the VM with an error.
    pub node_failed:
        Option<unsafe extern "C" fn(ctx: *mut c_void, node: u32, reason: *const c_char)>,
    /// First call in every runtime thread that uses the callbacks.
    pub thread_start: Option<unsafe extern "C" fn(ctx: *mut c_void, name: *const c_char)>,
    /// Local page contents dropped or replaced (TCG: drop translated code); may be NULL.
    pub page_changed: Option<unsafe extern "C" fn(ctx: *mut c_void, host_addr: u64, len: u64)>,
    /// Another node's VM ended with exit status `status` (e.g. the guest
    /// wrote to `isa-debug-exit` on the origin): exit with it. May be NULL,
    /// then `lifecycle` gets a power-off instead.
    pub exit_status: Option<unsafe extern "C" fn(ctx: *mut c_void, status: i32, from: u32)>,
    /// Exits (or translated blocks) local vCPU `cpu` ran, for the exit
    /// summary; may be NULL.
    pub vcpu_exits: Option<unsafe extern "C" fn(ctx: *mut c_void, cpu: u32) -> u64>,
}

/// The runtime's [`Host`]: QEMU's callbacks with their context.
pub(crate) struct CHost {
    pub(crate) ops: FvHostOps,
    pub(crate) ctx: *mut c_void,
}

// SAFETY: the C side promises (fv_runtime_start's contract) that its
// callbacks may be called from any thread with this context.
unsafe impl Send for CHost {}
// SAFETY: as above; the callbacks synchronise internally (QEMU's big lock).
unsafe impl Sync for CHost {}

fn cstring(s: &str) -> CString {
    CString::new(s.replace('\0', " ")).unwrap_or_default()
}

impl Host for CHost {
    fn exec_io(&self, a: &IoAccess, data: &mut [u8]) -> u32 {
        let c = FvIoAccess::from(a);
        match self.ops.exec_io {
            // SAFETY: `c` and `data` (a.len() bytes) live for the call.
            Some(f) => unsafe { f(self.ctx, &c, data.as_mut_ptr()) },
            None => 1,
        }
    }
    fn deliver_irq(&self, irq: &Irq) {
        if let Some(f) = self.ops.deliver_irq {
            // SAFETY: plain values; the callback's contract is the C side's.
            unsafe { f(self.ctx, irq.cpu, irq.kind.into(), irq.vector, irq.level) }
        }
    }
    fn apic_state(&self, s: &ApicState) {
        let c = FvApicState::from(s);
        if let Some(f) = self.ops.apic_state {
            // SAFETY: `c` lives for the call.
            unsafe { f(self.ctx, &c) }
        }
    }
    fn ioapic_eoi(&self, vector: u8) {
        if let Some(f) = self.ops.ioapic_eoi {
            // SAFETY: plain values.
            unsafe { f(self.ctx, vector) }
        }
    }
    fn lifecycle(&self, event: Lifecycle, from: u16) {
        if let (Lifecycle::Exit(status), Some(f)) = (event, self.ops.exit_status) {
            // SAFETY: plain values.
            unsafe { f(self.ctx, status, u32::from(from)) };
            return;
        }
        if let Some(f) = self.ops.lifecycle {
            // SAFETY: plain values.
            unsafe { f(self.ctx, FvLifecycleEvent::of(event), u32::from(from)) }
        }
    }
    fn node_failed(&self, node: u16, reason: &str) {
        let r = cstring(reason);
        if let Some(f) = self.ops.node_failed {
            // SAFETY: `r` is a NUL-terminated string that lives for the call.
            unsafe { f(self.ctx, u32::from(node), r.as_ptr()) }
        }
    }
    fn thread_start(&self, name: &str) {
        let n = cstring(name);
        if let Some(f) = self.ops.thread_start {
            // SAFETY: `n` lives for the call.
            unsafe { f(self.ctx, n.as_ptr()) }
        }
    }
    fn vcpu_exits(&self, cpu: u32) -> u64 {
        match self.ops.vcpu_exits {
            // SAFETY: plain values.
            Some(f) => unsafe { f(self.ctx, cpu) },
            None => 0,
        }
    }
}
