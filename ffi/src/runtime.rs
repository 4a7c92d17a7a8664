//! C ABI of the per-host runtime (`qemu_accel::runtime`): the DSM over guest
//! RAM, forwarded I/O, routed interrupts, lifecycle and failure.
//!
//! The C side hands in a table of callbacks ([`FvHostOps`]) and an opaque
//! context; the runtime calls them from its own threads (each announced with
//! `thread_start` first, where QEMU registers the thread with RCU). Calls
//! into the runtime from vCPU threads block only in [`fv_forward_io`].

use std::ffi::{c_char, c_void};
use std::ptr;
use std::sync::Arc;
use std::time::Duration;

use dsm_service::home::HomeMap;
use dsm_service::uffd::PAGE_SIZE;
use qemu_accel::placement::numa_home;
use qemu_accel::runtime::{ApicState, IoAccess, Irq, Runtime, RuntimeConfig};

use crate::host::{CHost, FvApicState, FvHostOps, FvIoAccess};
use crate::kinds::FvIrqKind;
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
    /// The guest NUMA node whose memory the block is, or -1 for none. The
    /// runtime picks the block's home from it.
    pub numa_node: i32,
}

/// The runtime of one host. Opaque to C.
pub struct FvRuntime {
    pub(crate) rt: Arc<Runtime>,
}

fn set_err(err: *mut *mut c_char, msg: String) {
    if !err.is_null() {
        // SAFETY: the caller passes NULL or a valid place for one pointer.
        unsafe { *err = error_string(msg) };
    }
}

/// Joins the cluster described by `cfg` (after `fv_config_finish`) with the
/// guest RAM `regions`, and starts the runtime. Joining waits at most
/// `join_timeout_ms` for every peer to come up; once up, a peer silent for
/// the `peer-timeout-ms` option (default 5000) is declared failed. Returns
/// NULL and sets `*err` (free with `fv_string_free`) on failure.
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
    join_timeout_ms: u32,
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
            qemu_accel::logging::install(resolved.config.log.as_deref());
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
                let numa_node = u32::try_from(r.numa_node).ok();
                if let Some(home) = numa_home(numa_node, resolved.config.nodes) {
                    homes.assign(first_page, r.len / PAGE_SIZE as u64, home as u16);
                }
                first_page += r.len / PAGE_SIZE as u64;
                names.push((name, r.host_addr, r.len));
            }
            let list: Vec<(&str, u64, u64)> =
                names.iter().map(|(n, a, l)| (n.as_str(), *a, *l)).collect();
            // A frozen or cut-off host is named within the peer timeout
            // (5 s by default): the heartbeats come from a thread of their
            // own. Only the join may take long (every host starting QEMU).
            let ms = resolved
                .config
                .peer_timeout_ms
                .unwrap_or(qemu_accel::config::DEFAULT_PEER_TIMEOUT_MS);
            let timeout = Duration::from_millis(u64::from(ms.max(1)));
            let mut config =
                RuntimeConfig::new(&resolved.config, timeout).map_err(|e| e.to_string())?;
            config.dsm.connect_timeout = Duration::from_millis(u64::from(join_timeout_ms.max(1)));
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
    let access = IoAccess::from(a);
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

/// Sends an interrupt to the host that runs `cpu`. Returns 0, or -1 if
/// that host is gone.
///
/// # Safety
/// `rt` must be live; `kind` one of the header's constants.
#[no_mangle]
pub unsafe extern "C" fn fv_send_irq(
    rt: *const FvRuntime,
    cpu: u32,
    kind: FvIrqKind,
    vector: u8,
    level: bool,
) -> i32 {
    // SAFETY: per the contract.
    let Some(rt) = (unsafe { rt.as_ref() }) else {
        return -1;
    };
    status_of(rt.rt.send_irq(&Irq {
        cpu,
        kind: kind.into(),
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
    status_of(rt.rt.broadcast_apic_state(&ApicState::from(s)))
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
