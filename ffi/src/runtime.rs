//! C ABI of the per-host runtime (`qemu_accel::runtime`): the DSM over guest
//! RAM, forwarded I/O, routed interrupts, lifecycle and failure.
//!
//! The C side hands in a table of callbacks ([`FvHostOps`]) and an opaque
//! context; the runtime calls them from its own threads (each announced with
//! `thread_start` first, where QEMU registers the thread with RCU). Calls
//! into the runtime from vCPU threads block only in [`fv_forward_io`].

use std::ffi::{c_char, c_void, CString};
use std::ptr;
use std::sync::Arc;
use std::time::Duration;

use dsm_service::home::HomeMap;
use dsm_service::uffd::PAGE_SIZE;
use qemu_accel::runtime::{
    ApicState, Host, IoAccess, IoSpace, Irq, IrqKind, Lifecycle, Runtime, RuntimeConfig,
};

use crate::{error_string, FvConfig};

/// One guest RAM block registered with the DSM.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct FvRegion {
    /// Name identical on every host (QEMU's RAM block id).
    pub name: *const c_char,
    /// Host address of the block.
    pub host_addr: u64,
    /// Length in bytes (whole 4 KiB pages).
    pub len: u64,
    /// Node that is home for the block's pages (its guest NUMA node's host),
    /// or -1 for the origin.
    pub home: i32,
}

/// A device access forwarded to the origin.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct FvIoAccess {
    /// vCPU index.
    pub cpu: u32,
    /// 0: port I/O, 1: MMIO.
    pub space: u8,
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

/// Callbacks into QEMU. Every pointer must be set except `page_changed`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct FvHostOps {
    /// Origin: run an access on the device model; returns `MemTxResult`.
    pub exec_io:
        Option<unsafe extern "C" fn(ctx: *mut c_void, a: *const FvIoAccess, data: *mut u8) -> u32>,
    /// Deliver an interrupt to a local vCPU (kind: 0 fixed, 1 NMI, 2 SMI, 3 INIT, 4 SIPI).
    pub deliver_irq:
        Option<unsafe extern "C" fn(ctx: *mut c_void, cpu: u32, kind: u8, vector: u8, level: bool)>,
    /// Record a remote vCPU's APIC routing state.
    pub apic_state: Option<unsafe extern "C" fn(ctx: *mut c_void, s: *const FvApicState)>,
    /// Origin: an IOAPIC EOI from a remote vCPU.
    pub ioapic_eoi: Option<unsafe extern "C" fn(ctx: *mut c_void, vector: u8)>,
    /// Another node's power-off (0) or reset (1).
    pub lifecycle: Option<unsafe extern "C" fn(ctx: *mut c_void, event: u8, from: u32)>,
    /// A node failed; stop the VM with an error naming it.
    pub node_failed:
        Option<unsafe extern "C" fn(ctx: *mut c_void, node: u32, reason: *const c_char)>,
    /// First call in every runtime thread that uses the callbacks.
    pub thread_start: Option<unsafe extern "C" fn(ctx: *mut c_void, name: *const c_char)>,
    /// Local page contents dropped or replaced (TCG: drop translated code); may be NULL.
    pub page_changed: Option<unsafe extern "C" fn(ctx: *mut c_void, host_addr: u64, len: u64)>,
    /// Another node's VM ended with exit status `status` (e.g. the guest
    /// wrote to `isa-debug-exit` on the origin): exit with it. May be NULL,
    /// then `lifecycle` gets a power-off (0) instead.
    pub exit_status: Option<unsafe extern "C" fn(ctx: *mut c_void, status: i32, from: u32)>,
}

/// How this host's clocks map to the guest clock (see `qemu_accel::clock`):
/// guest = local + offset. `delta` is the estimated origin-minus-local
/// reading, `bound` the bound on its error. All zero on the origin except the
/// offsets (minus its base reading).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct FvClock {
    /// Add to the host TSC to get the guest TSC (KVM_VCPU_TSC_OFFSET).
    pub tsc_offset: i64,
    /// Origin host TSC minus this host's, estimated.
    pub tsc_delta: i64,
    /// Error bound of `tsc_delta`, in TSC ticks.
    pub tsc_bound: u64,
    /// Add to CLOCK_MONOTONIC (ns) to get the guest's 1 GHz clock (TCG).
    pub mono_offset_ns: i64,
    /// Origin CLOCK_MONOTONIC minus this host's, estimated, in ns.
    pub mono_delta_ns: i64,
    /// Error bound of `mono_delta_ns`, in ns.
    pub mono_bound_ns: u64,
    /// Clock exchanges the estimate took (0 on the origin).
    pub samples: u32,
}

/// The runtime of one host. Opaque to C.
pub struct FvRuntime {
    rt: Arc<Runtime>,
}

struct CHost {
    ops: FvHostOps,
    ctx: *mut c_void,
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
        let c = FvIoAccess {
            cpu: a.cpu,
            space: a.space as u8,
            is_write: a.is_write,
            size: a.size,
            count: a.count,
            addr: a.addr,
            attrs: a.attrs,
        };
        match self.ops.exec_io {
            // SAFETY: `c` and `data` (a.len() bytes) live for the call.
            Some(f) => unsafe { f(self.ctx, &c, data.as_mut_ptr()) },
            None => 1,
        }
    }
    fn deliver_irq(&self, irq: &Irq) {
        if let Some(f) = self.ops.deliver_irq {
            // SAFETY: plain values; the callback's contract is the C side's.
            unsafe { f(self.ctx, irq.cpu, irq.kind as u8, irq.vector, irq.level) }
        }
    }
    fn apic_state(&self, s: &ApicState) {
        let c = FvApicState {
            cpu: s.cpu,
            id: s.id,
            ldr: s.ldr,
            dfr: s.dfr,
            apicbase: s.apicbase,
        };
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
        let code = if let Lifecycle::Exit(_) = event {
            Lifecycle::PowerOff.code()
        } else {
            event.code()
        };
        if let Some(f) = self.ops.lifecycle {
            // SAFETY: plain values.
            unsafe { f(self.ctx, code, u32::from(from)) }
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
}

fn set_err(err: *mut *mut c_char, msg: String) {
    if !err.is_null() {
        // SAFETY: the caller passes NULL or a valid place for one pointer.
        unsafe { *err = error_string(msg) };
    }
}

/// Joins the cluster described by `cfg` (after `fv_config_finish`) with the
/// guest RAM `regions`, and starts the runtime. `peer_timeout_ms` applies
/// unless the `peer-timeout-ms` option was given. Returns NULL and sets `*err`
/// (free with `fv_string_free`) on failure.
///
/// # Safety
/// `cfg` must be a live, finished config; `regions` must point to `nregions`
/// entries whose names are NUL-terminated strings and whose ranges stay
/// mapped while the runtime lives; `ops` must point to a callback table whose
/// functions may be called from any thread with `ctx`; `err` NULL or valid.
#[no_mangle]
pub unsafe extern "C" fn fv_runtime_start(
    cfg: *const FvConfig,
    regions: *const FvRegion,
    nregions: usize,
    ops: *const FvHostOps,
    ctx: *mut c_void,
    peer_timeout_ms: u32,
    err: *mut *mut c_char,
) -> *mut FvRuntime {
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(
        || -> Result<FvRuntime, String> {
            // SAFETY: per the contract, `cfg` is NULL or live.
            let cfg = unsafe { cfg.as_ref() }.ok_or("no configuration")?;
            let resolved = cfg
                .resolved
                .as_ref()
                .ok_or("the configuration was not finished")?;
            // SAFETY: per the contract, `ops` is NULL or a valid table.
            let ops = *unsafe { ops.as_ref() }.ok_or("no callbacks")?;
            let regions: &[FvRegion] = if nregions == 0 {
                &[]
            } else {
                // SAFETY: per the contract, `regions` points to `nregions` entries.
                unsafe { std::slice::from_raw_parts(regions, nregions) }
            };
            let mut names = Vec::with_capacity(regions.len());
            let mut homes = HomeMap::all_on(0);
            let mut first_page = 0u64;
            for r in regions {
                // SAFETY: per the contract, names are NUL-terminated strings.
                let name = unsafe { crate::text(r.name, "region name") }?.to_string();
                if r.home > 0 {
                    homes.assign(first_page, r.len / PAGE_SIZE as u64, r.home as u16);
                }
                first_page += r.len / PAGE_SIZE as u64;
                names.push((name, r.host_addr, r.len));
            }
            let list: Vec<(&str, u64, u64)> =
                names.iter().map(|(n, a, l)| (n.as_str(), *a, *l)).collect();
            // The `peer-timeout-ms` option wins over the caller's default.
            let ms = resolved.config.peer_timeout_ms.unwrap_or(peer_timeout_ms);
            let timeout = Duration::from_millis(u64::from(ms.max(1)));
            let config =
                RuntimeConfig::new(&resolved.config, timeout).map_err(|e| e.to_string())?;
            let host = Arc::new(CHost { ops, ctx });
            let hook: Option<dsm_service::node::PageChangeHook> = ops.page_changed.map(|f| {
                let h = host.clone();
                Arc::new(move |addr: u64, len: u64| {
                    // SAFETY: plain values; the callback's contract is the C side's.
                    unsafe { f(h.ctx, addr, len) }
                }) as dsm_service::node::PageChangeHook
            });
            let rt = Runtime::start(
                &config,
                resolved.placement.clone(),
                &list,
                homes,
                hook,
                host,
            )
            .map_err(|e| e.to_string())?;
            Ok(FvRuntime { rt })
        },
    ));
    match result {
        Ok(Ok(rt)) => Box::into_raw(Box::new(rt)),
        Ok(Err(msg)) => {
            set_err(err, msg);
            ptr::null_mut()
        }
        Err(_) => {
            set_err(
                err,
                "internal error in the fragvisor runtime (panic)".into(),
            );
            ptr::null_mut()
        }
    }
}

/// Forwards a local vCPU's device access to the origin and waits for it.
/// `data` holds `size*count` bytes: written ones, or room for those read.
/// Returns 0 and sets `*result` (`MemTxResult`), or -1 when the origin is
/// gone (the failure was also reported through `node_failed`).
///
/// # Safety
/// `rt` live; `a` valid; `data` valid for `size*count` bytes; `result` valid.
#[no_mangle]
pub unsafe extern "C" fn fv_forward_io(
    rt: *const FvRuntime,
    a: *const FvIoAccess,
    data: *mut u8,
    result: *mut u32,
) -> i32 {
    // SAFETY: per the contract.
    let (Some(rt), Some(a)) = (unsafe { rt.as_ref() }, unsafe { a.as_ref() }) else {
        return -1;
    };
    let access = IoAccess {
        cpu: a.cpu,
        space: if a.space == 0 {
            IoSpace::Pio
        } else {
            IoSpace::Mmio
        },
        addr: a.addr,
        size: a.size,
        count: a.count.max(1),
        is_write: a.is_write,
        attrs: a.attrs,
    };
    let len = access.len();
    let buf: &mut [u8] = if len == 0 || data.is_null() {
        &mut []
    } else {
        // SAFETY: per the contract, `data` holds `len` bytes.
        unsafe { std::slice::from_raw_parts_mut(data, len) }
    };
    match rt.rt.forward_io(&access, buf) {
        Ok(r) => {
            if !result.is_null() {
                // SAFETY: per the contract.
                unsafe { *result = r };
            }
            0
        }
        Err(e) => {
            tracing::error!(error = %e, "forwarded access failed");
            -1
        }
    }
}

/// Sends an interrupt to the host that runs `cpu` (kind: 0 fixed, 1 NMI,
/// 2 SMI, 3 INIT, 4 SIPI). Returns 0, or -1 if that host is gone.
///
/// # Safety
/// `rt` must be live.
#[no_mangle]
pub unsafe extern "C" fn fv_send_irq(
    rt: *const FvRuntime,
    cpu: u32,
    kind: u8,
    vector: u8,
    level: bool,
) -> i32 {
    let kind = match kind {
        0 => IrqKind::Fixed,
        1 => IrqKind::Nmi,
        2 => IrqKind::Smi,
        3 => IrqKind::Init,
        4 => IrqKind::Sipi,
        _ => return -1,
    };
    // SAFETY: per the contract.
    let Some(rt) = (unsafe { rt.as_ref() }) else {
        return -1;
    };
    status_of(rt.rt.send_irq(&Irq {
        cpu,
        kind,
        vector,
        level,
    }))
}

/// Mirrors a local vCPU's APIC routing state to every other host.
///
/// # Safety
/// `rt` live; `s` valid.
#[no_mangle]
pub unsafe extern "C" fn fv_broadcast_apic_state(
    rt: *const FvRuntime,
    s: *const FvApicState,
) -> i32 {
    // SAFETY: per the contract.
    let (Some(rt), Some(s)) = (unsafe { rt.as_ref() }, unsafe { s.as_ref() }) else {
        return -1;
    };
    status_of(rt.rt.broadcast_apic_state(&ApicState {
        cpu: s.cpu,
        id: s.id,
        ldr: s.ldr,
        dfr: s.dfr,
        apicbase: s.apicbase,
    }))
}

/// Sends an IOAPIC EOI to the origin.
///
/// # Safety
/// `rt` must be live.
#[no_mangle]
pub unsafe extern "C" fn fv_send_ioapic_eoi(rt: *const FvRuntime, vector: u8) -> i32 {
    // SAFETY: per the contract.
    let Some(rt) = (unsafe { rt.as_ref() }) else {
        return -1;
    };
    status_of(rt.rt.send_ioapic_eoi(vector))
}

/// Tells every other host about a power-off (0) or a reset (1).
///
/// # Safety
/// `rt` must be live.
#[no_mangle]
pub unsafe extern "C" fn fv_broadcast_lifecycle(rt: *const FvRuntime, event: u8) -> i32 {
    // SAFETY: per the contract.
    let Some(rt) = (unsafe { rt.as_ref() }) else {
        return -1;
    };
    let event = match event {
        0 => Lifecycle::PowerOff,
        1 => Lifecycle::Reset,
        _ => return -1,
    };
    status_of(rt.rt.broadcast_lifecycle(event))
}

/// Tells every other host that the VM ended with exit `status`; they exit
/// with it too.
///
/// # Safety
/// `rt` must be live.
#[no_mangle]
pub unsafe extern "C" fn fv_broadcast_exit(rt: *const FvRuntime, status: i32) -> i32 {
    // SAFETY: per the contract.
    let Some(rt) = (unsafe { rt.as_ref() }) else {
        return -1;
    };
    status_of(rt.rt.broadcast_lifecycle(Lifecycle::Exit(status)))
}

/// Fills `*out` with how this host's clocks map to the guest clock. Returns
/// 0, or -1 on a NULL argument.
///
/// # Safety
/// `rt` live; `out` valid for one `FvClock`.
#[no_mangle]
pub unsafe extern "C" fn fv_runtime_clock(rt: *const FvRuntime, out: *mut FvClock) -> i32 {
    // SAFETY: per the contract.
    let (Some(rt), Some(out)) = (unsafe { rt.as_ref() }, unsafe { out.as_mut() }) else {
        return -1;
    };
    let c = rt.rt.clock();
    *out = FvClock {
        tsc_offset: c.tsc.offset,
        tsc_delta: c.tsc.delta,
        tsc_bound: c.tsc.bound,
        mono_offset_ns: c.mono.offset,
        mono_delta_ns: c.mono.delta,
        mono_bound_ns: c.mono.bound,
        samples: c.samples,
    };
    0
}

/// This host's `CLOCK_MONOTONIC` in ns, the clock `FvClock::mono_offset_ns`
/// applies to (the TCG engine's guest TSC started as this plus that offset;
/// `fv_runtime_guest_ns` is the steered one).
#[no_mangle]
pub extern "C" fn fv_clock_mono_ns() -> u64 {
    qemu_accel::clock::mono_ns()
}

/// The guest clock now: ns since the cluster started, on the origin's
/// monotonic clock as this host steers towards it against drift (the TCG
/// engine's 1 GHz guest TSC). 0 for a NULL `rt`.
///
/// # Safety
/// `rt` NULL or live.
#[no_mangle]
pub unsafe extern "C" fn fv_runtime_guest_ns(rt: *const FvRuntime) -> u64 {
    // SAFETY: per the contract.
    match unsafe { rt.as_ref() } {
        Some(rt) => rt.rt.guest_ns(),
        None => 0,
    }
}

/// One log line on how this host's clocks were aligned to the origin's.
/// Free it with `fv_string_free`; NULL for a NULL `rt`.
///
/// # Safety
/// `rt` NULL or live.
#[no_mangle]
pub unsafe extern "C" fn fv_runtime_clock_describe(rt: *const FvRuntime) -> *mut c_char {
    // SAFETY: per the contract.
    let Some(rt) = (unsafe { rt.as_ref() }) else {
        return ptr::null_mut();
    };
    error_string(rt.rt.clock().describe(rt.rt.node_id()))
}

/// The exit summary line (`fragvisor: node K summary: ...`); `counts[i]` is
/// the number of exits or translated blocks vCPU `i` ran (`ncounts` entries).
/// Free the string with `fv_string_free`.
///
/// # Safety
/// `rt` live; `counts` valid for `ncounts` entries (or NULL with 0).
#[no_mangle]
pub unsafe extern "C" fn fv_runtime_summary(
    rt: *const FvRuntime,
    counts: *const u64,
    ncounts: usize,
) -> *mut c_char {
    // SAFETY: per the contract.
    let Some(rt) = (unsafe { rt.as_ref() }) else {
        return ptr::null_mut();
    };
    let counts: &[u64] = if counts.is_null() || ncounts == 0 {
        &[]
    } else {
        // SAFETY: per the contract.
        unsafe { std::slice::from_raw_parts(counts, ncounts) }
    };
    error_string(
        rt.rt
            .summary(&|cpu| counts.get(cpu as usize).copied().unwrap_or(0)),
    )
}

/// Leaves the cluster cleanly and frees the runtime. NULL is ignored.
///
/// # Safety
/// `rt` NULL or from `fv_runtime_start`, not yet freed; no other thread may
/// use it during or after the call.
#[no_mangle]
pub unsafe extern "C" fn fv_runtime_stop(rt: *mut FvRuntime) {
    if rt.is_null() {
        return;
    }
    // SAFETY: per the contract, `rt` came from Box::into_raw and is freed once.
    let rt = unsafe { Box::from_raw(rt) };
    rt.rt.shutdown();
}

fn status_of<E>(r: Result<(), E>) -> i32 {
    if r.is_ok() {
        0
    } else {
        -1
    }
}
