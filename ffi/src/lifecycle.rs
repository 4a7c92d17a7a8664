//! C ABI of the cluster's lifecycle: QEMU's glue reports what happens here
//! (a shutdown, the process exiting, a system reset, a peer's reset being
//! done) and the runtime decides what follows — whom to tell, what to
//! print, the exit status, the exit watchdog. The glue keeps no lifecycle
//! state of its own.

use crate::kinds::FvResetOrigin;
use crate::runtime::FvRuntime;

/// Runs `f` on a live runtime; a NULL `rt` or a panic does nothing.
///
/// # Safety
/// `rt` NULL or live.
unsafe fn with_runtime<T>(rt: *const FvRuntime, f: impl FnOnce(&FvRuntime) -> T) -> Option<T> {
    // SAFETY: per the contract.
    let rt = unsafe { rt.as_ref() }?;
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(rt))).ok()
}

/// QEMU shuts down with exit `status` (a guest power-off, an exit device;
/// `host_error` for an error of QEMU's own): the other hosts are told once,
/// the exit summary is printed, and the process ends after a grace time if
/// it has not exited by then.
///
/// # Safety
/// `rt` NULL or live.
#[no_mangle]
pub unsafe extern "C" fn fv_runtime_vm_ends(rt: *const FvRuntime, status: i32, host_error: bool) {
    // SAFETY: per the contract.
    unsafe { with_runtime(rt, |rt| rt.rt.vm_ends(status, host_error)) };
}

/// The process exits with `status` (from anywhere in QEMU): the other hosts
/// stop too, with the same status.
///
/// # Safety
/// `rt` NULL or live.
#[no_mangle]
pub unsafe extern "C" fn fv_runtime_vm_exits(rt: *const FvRuntime, status: i32) {
    // SAFETY: per the contract.
    unsafe { with_runtime(rt, |rt| rt.rt.vm_exits(status)) };
}

/// A system reset runs on this host (from QEMU's reset handler). A local
/// one is sent to every other host; for `FV_RESET_ORIGIN_PEER` call
/// `fv_runtime_reset_done` once the machine runs again.
///
/// # Safety
/// `rt` NULL or live.
#[no_mangle]
pub unsafe extern "C" fn fv_runtime_system_reset(rt: *const FvRuntime) -> FvResetOrigin {
    // SAFETY: per the contract.
    unsafe { with_runtime(rt, |rt| rt.rt.system_reset().into()) }.unwrap_or(FvResetOrigin::Local)
}

/// The reset a peer asked for is done: the runtime delivers that peer's
/// next messages.
///
/// # Safety
/// `rt` NULL or live.
#[no_mangle]
pub unsafe extern "C" fn fv_runtime_reset_done(rt: *const FvRuntime) {
    // SAFETY: per the contract.
    unsafe { with_runtime(rt, |rt| rt.rt.reset_done()) };
}
