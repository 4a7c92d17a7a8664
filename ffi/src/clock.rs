//! C ABI of the guest clock: how this host's clocks map to the guest
//! clock (`qemu_accel::clock`), and the steered TCG guest clock.

use std::ffi::c_char;
use std::ptr;

use crate::error_string;
use crate::runtime::FvRuntime;

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
