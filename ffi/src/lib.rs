//! C ABI for the patched QEMU.
//!
//! QEMU's `accel/fragvisor/` glue includes the generated header
//! `ffi/include/fragvisor_ffi.h` and links `libfragvisor_ffi.a`. The C side
//! only moves strings and numbers; every decision is made in `qemu-accel`.
//!
//! Conventions:
//! - functions that can fail return a heap string with the error message
//!   (NULL on success); the caller frees it with [`fv_string_free`];
//! - every pointer argument must be valid for the duration of the call;
//!   `FvConfig` pointers come from [`fv_config_new`] and are freed once with
//!   [`fv_config_free`];
//! - no function unwinds into C: panics are caught and reported as errors.

use std::ffi::{c_char, CStr, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::ptr;

pub mod clock;
pub mod host;
pub mod kinds;
pub mod lifecycle;
pub mod runtime;

use qemu_accel::{AccelConfig, ConfigBuilder, ConfigError, Engine, VcpuPlacement, OPTIONS};

/// The vCPU engine of the accelerator calling in.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FvEngine {
    /// `-accel fragvisor` (KVM with QEMU's userspace APIC).
    Kvm = 0,
    /// `-accel fragvisor-tcg` (multi-threaded TCG).
    Tcg = 1,
}

impl From<FvEngine> for Engine {
    fn from(e: FvEngine) -> Self {
        match e {
            FvEngine::Kvm => Engine::Kvm,
            FvEngine::Tcg => Engine::Tcg,
        }
    }
}

/// Accelerator options of one QEMU accelerator object. Opaque to C.
pub struct FvConfig {
    builder: ConfigBuilder,
    resolved: Option<Resolved>,
}

struct Resolved {
    config: AccelConfig,
    placement: VcpuPlacement,
}

/// Turn a message into a heap C string for the caller to free.
fn error_string(msg: impl Into<String>) -> *mut c_char {
    let mut bytes: Vec<u8> = msg.into().into_bytes();
    bytes.retain(|&b| b != 0);
    CString::new(bytes).map_or(ptr::null_mut(), CString::into_raw)
}

/// Run `f`, turning a panic into an error message instead of unwinding.
fn guarded(f: impl FnOnce() -> Result<(), String>) -> *mut c_char {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(())) => ptr::null_mut(),
        Ok(Err(msg)) => error_string(msg),
        Err(_) => error_string("internal error in the fragvisor library (panic)"),
    }
}

/// Borrow a C string argument as UTF-8.
///
/// # Safety
/// `s` must be NULL or point to a NUL-terminated string valid for `'a`.
unsafe fn text<'a>(s: *const c_char, what: &str) -> Result<&'a str, String> {
    if s.is_null() {
        return Err(format!("{what}: missing value"));
    }
    // SAFETY: the caller guarantees `s` is a valid NUL-terminated string.
    let c = unsafe { CStr::from_ptr(s) };
    c.to_str()
        .map_err(|_| ConfigError::BadText(what.to_string()).to_string())
}

/// A new, empty option set (every option at its default).
#[no_mangle]
pub extern "C" fn fv_config_new() -> *mut FvConfig {
    Box::into_raw(Box::new(FvConfig {
        builder: ConfigBuilder::new(),
        resolved: None,
    }))
}

/// Free an option set. NULL is ignored.
///
/// # Safety
/// `cfg` must be NULL or a pointer from [`fv_config_new`] not yet freed.
#[no_mangle]
pub unsafe extern "C" fn fv_config_free(cfg: *mut FvConfig) {
    if !cfg.is_null() {
        // SAFETY: `cfg` came from `Box::into_raw` in `fv_config_new` and is
        // freed only once, per the contract above.
        drop(unsafe { Box::from_raw(cfg) });
    }
}

/// Free a string returned by this library. NULL is ignored.
///
/// # Safety
/// `s` must be NULL or a string returned by this library, not yet freed.
#[no_mangle]
pub unsafe extern "C" fn fv_string_free(s: *mut c_char) {
    if !s.is_null() {
        // SAFETY: `s` came from `CString::into_raw` in this library and is
        // freed only once, per the contract above.
        drop(unsafe { CString::from_raw(s) });
    }
}

/// Number of accelerator options; QEMU registers one property for each.
#[no_mangle]
pub extern "C" fn fv_option_count() -> usize {
    OPTIONS.len()
}

// The option table as static C strings, built once.
fn option_cstrings() -> &'static [(CString, CString)] {
    static TABLE: std::sync::OnceLock<Vec<(CString, CString)>> = std::sync::OnceLock::new();
    TABLE.get_or_init(|| {
        OPTIONS
            .iter()
            .map(|o| {
                (
                    CString::new(o.name).unwrap_or_default(),
                    CString::new(o.help).unwrap_or_default(),
                )
            })
            .collect()
    })
}

/// Name of option `index` (static string), or NULL past the end.
#[no_mangle]
pub extern "C" fn fv_option_name(index: usize) -> *const c_char {
    option_cstrings()
        .get(index)
        .map_or(ptr::null(), |(name, _)| name.as_ptr())
}

/// One-line description of option `index` (static string), or NULL.
#[no_mangle]
pub extern "C" fn fv_option_help(index: usize) -> *const c_char {
    option_cstrings()
        .get(index)
        .map_or(ptr::null(), |(_, help)| help.as_ptr())
}

/// Set option `name` to `value`. Returns NULL, or an error message naming
/// the option (free with [`fv_string_free`]).
///
/// # Safety
/// `cfg` must be a live pointer from [`fv_config_new`]; `name` and `value`
/// NUL-terminated strings.
#[no_mangle]
pub unsafe extern "C" fn fv_config_set(
    cfg: *mut FvConfig,
    name: *const c_char,
    value: *const c_char,
) -> *mut c_char {
    guarded(|| {
        // SAFETY: per the contract, `cfg` is live and not aliased during the call.
        let cfg = unsafe { cfg.as_mut() }.ok_or("fv_config_set: no config")?;
        // SAFETY: per the contract, `name` is a valid C string.
        let name = unsafe { text(name, "option name") }?;
        // SAFETY: per the contract, `value` is a valid C string.
        let value = unsafe { text(value, name) }?;
        cfg.resolved = None;
        cfg.builder.set(name, value).map_err(|e| e.to_string())
    })
}

/// Current value of option `name` as a string to free with
/// [`fv_string_free`], or NULL for an unknown option. The key is shown as
/// `<set>`.
///
/// # Safety
/// `cfg` must be a live pointer from [`fv_config_new`]; `name` a valid
/// NUL-terminated string.
#[no_mangle]
pub unsafe extern "C" fn fv_config_get(cfg: *const FvConfig, name: *const c_char) -> *mut c_char {
    // SAFETY: per the contract, `cfg` is live.
    let Some(cfg) = (unsafe { cfg.as_ref() }) else {
        return ptr::null_mut();
    };
    // SAFETY: per the contract, `name` is a valid C string.
    let Ok(name) = (unsafe { text(name, "option name") }) else {
        return ptr::null_mut();
    };
    match cfg.builder.get(name) {
        Ok(v) => error_string(v),
        Err(_) => ptr::null_mut(),
    }
}

/// Validate the options together for a machine with `vcpus` vCPUs (no guest
/// NUMA map yet), and compute the vCPU placement. Returns NULL, or an error
/// message (free with [`fv_string_free`]).
///
/// # Safety
/// `cfg` must be a live pointer from [`fv_config_new`].
#[no_mangle]
pub unsafe extern "C" fn fv_config_finish(
    cfg: *mut FvConfig,
    engine: FvEngine,
    vcpus: u32,
) -> *mut c_char {
    guarded(|| {
        // SAFETY: per the contract, `cfg` is live and not aliased during the call.
        let cfg = unsafe { cfg.as_mut() }.ok_or("fv_config_finish: no config")?;
        let config = cfg
            .builder
            .build(engine.into())
            .map_err(|e| e.to_string())?;
        // The map's errors name `vcpu-map` themselves.
        let placement =
            VcpuPlacement::new(config.nodes, vcpus, &config.vcpu_map).map_err(|e| e.to_string())?;
        tracing::info!(
            node_id = config.node_id,
            nodes = config.nodes,
            vcpus,
            engine = Engine::from(engine).accel_name(),
            "fragvisor configuration accepted"
        );
        cfg.resolved = Some(Resolved { config, placement });
        Ok(())
    })
}

/// The resolved configuration behind `cfg`, if finished.
///
/// # Safety
/// `cfg` must be NULL or a live pointer from [`fv_config_new`] that stays
/// valid and unmodified for `'a`.
unsafe fn resolved<'a>(cfg: *const FvConfig) -> Option<&'a Resolved> {
    // SAFETY: guaranteed by the caller, see above.
    unsafe { cfg.as_ref() }.and_then(|c| c.resolved.as_ref())
}

/// Cluster size after [`fv_config_finish`] succeeded, else 0.
///
/// # Safety
/// `cfg` must be NULL or a live pointer from [`fv_config_new`].
#[no_mangle]
pub unsafe extern "C" fn fv_config_nodes(cfg: *const FvConfig) -> u32 {
    // SAFETY: per the contract, `cfg` is NULL or live for this call.
    unsafe { resolved(cfg) }.map_or(0, |r| r.config.nodes)
}

/// This host's node id after [`fv_config_finish`] succeeded, else 0.
///
/// # Safety
/// `cfg` must be NULL or a live pointer from [`fv_config_new`].
#[no_mangle]
pub unsafe extern "C" fn fv_config_node_id(cfg: *const FvConfig) -> u32 {
    // SAFETY: per the contract, `cfg` is NULL or live for this call.
    unsafe { resolved(cfg) }.map_or(0, |r| r.config.node_id)
}

/// Whether vCPU `cpu_index` runs on this host. False before
/// [`fv_config_finish`] succeeded and for unknown vCPUs.
///
/// # Safety
/// `cfg` must be NULL or a live pointer from [`fv_config_new`].
#[no_mangle]
pub unsafe extern "C" fn fv_vcpu_is_local(cfg: *const FvConfig, cpu_index: u32) -> bool {
    // SAFETY: per the contract, `cfg` is NULL or live for this call.
    unsafe { resolved(cfg) }.is_some_and(|r| r.placement.runs_on(cpu_index, r.config.node_id))
}

/// Checks the machine's guest NUMA map against the vCPU placement:
/// `numa_nodes[i]` is vCPU `i`'s guest NUMA node (-1 where it has none;
/// `n` entries). Returns NULL when every vCPU runs on the host of its NUMA
/// node, else the error message (free it with [`fv_string_free`]).
///
/// # Safety
/// `cfg` NULL or live; `numa_nodes` valid for `n` entries (or NULL with 0).
#[no_mangle]
pub unsafe extern "C" fn fv_config_check_numa(
    cfg: *const FvConfig,
    numa_nodes: *const i64,
    n: usize,
) -> *mut c_char {
    // SAFETY: per the contract, `cfg` is NULL or live for this call.
    let Some(r) = (unsafe { resolved(cfg) }) else {
        return error_string("the configuration was not finished");
    };
    let nodes: &[i64] = if numa_nodes.is_null() || n == 0 {
        &[]
    } else {
        // SAFETY: per the contract, `numa_nodes` holds `n` entries.
        unsafe { std::slice::from_raw_parts(numa_nodes, n) }
    };
    guarded(|| {
        let map: Vec<Option<u32>> = nodes.iter().map(|&g| u32::try_from(g).ok()).collect();
        r.placement.check_numa(&map).map_err(|e| e.to_string())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(s: &str) -> CString {
        CString::new(s).unwrap()
    }

    /// Take ownership of a returned error string.
    fn take(s: *mut c_char) -> Option<String> {
        if s.is_null() {
            return None;
        }
        // SAFETY: `s` is a live string returned by this library.
        let out = unsafe { CStr::from_ptr(s) }.to_str().unwrap().to_string();
        // SAFETY: freed once, here.
        unsafe { fv_string_free(s) };
        Some(out)
    }

    fn set(cfg: *mut FvConfig, k: &str, v: &str) -> Option<String> {
        // SAFETY: `cfg` is live; the strings outlive the call.
        take(unsafe { fv_config_set(cfg, c(k).as_ptr(), c(v).as_ptr()) })
    }

    #[test]
    fn option_table_is_exported() {
        assert_eq!(fv_option_count(), 13);
        let names: Vec<String> = (0..fv_option_count())
            .map(|i| {
                // SAFETY: the table holds static NUL-terminated strings.
                unsafe { CStr::from_ptr(fv_option_name(i)) }
                    .to_str()
                    .unwrap()
                    .to_string()
            })
            .collect();
        assert_eq!(
            names,
            [
                "nodes",
                "node-id",
                "peers",
                "key",
                "key-file",
                "peer-timeout-ms",
                "transport-security",
                "vcpu-map",
                "prefetch",
                "hot-pages",
                "log",
                "test-clock-skew-ns",
                "test-clock-rate-ppm"
            ]
        );
        assert!(fv_option_name(13).is_null());
        assert!(!fv_option_help(0).is_null());
    }

    #[test]
    fn single_node_config_round_trip() {
        let cfg = fv_config_new();
        assert_eq!(set(cfg, "nodes", "1"), None);
        // SAFETY: `cfg` is live.
        let err = take(unsafe { fv_config_finish(cfg, FvEngine::Tcg, 2) });
        assert_eq!(err, None);
        // SAFETY: `cfg` is live.
        unsafe {
            assert_eq!(fv_config_nodes(cfg), 1);
            assert_eq!(fv_config_node_id(cfg), 0);
            assert!(fv_vcpu_is_local(cfg, 0));
            assert!(fv_vcpu_is_local(cfg, 1));
            assert!(!fv_vcpu_is_local(cfg, 2));
            assert_eq!(
                take(fv_config_get(cfg, c("nodes").as_ptr())).as_deref(),
                Some("1")
            );
            fv_config_free(cfg);
        }
    }

    #[test]
    fn the_numa_map_is_checked_against_the_placement() {
        let cfg = fv_config_new();
        assert_eq!(set(cfg, "nodes", "2"), None);
        assert_eq!(set(cfg, "peers", "127.0.0.1:7000;127.0.0.1:7001"), None);
        assert_eq!(set(cfg, "key", "a-cluster-key-of-16+"), None);
        // SAFETY: `cfg` is live; the maps live for each call.
        unsafe {
            assert_eq!(take(fv_config_finish(cfg, FvEngine::Tcg, 2)), None);
            let local = [0i64, 1];
            assert_eq!(take(fv_config_check_numa(cfg, local.as_ptr(), 2)), None);
            let none = [-1i64, -1];
            assert_eq!(take(fv_config_check_numa(cfg, none.as_ptr(), 2)), None);
            assert_eq!(take(fv_config_check_numa(cfg, ptr::null(), 0)), None);
            let away = [0i64, 0];
            let err = take(fv_config_check_numa(cfg, away.as_ptr(), 2)).unwrap();
            assert!(
                err.starts_with("vCPU 1 is in guest NUMA node 0 but runs on node 1"),
                "{err}"
            );
            fv_config_free(cfg);
        }
    }

    #[test]
    fn errors_come_back_as_messages() {
        let cfg = fv_config_new();
        assert_eq!(
            set(cfg, "nodes", "0").as_deref(),
            Some("nodes=0: a cluster needs at least one node")
        );
        assert!(set(cfg, "bogus", "1")
            .unwrap()
            .contains("unknown option 'bogus'"));
        assert_eq!(set(cfg, "nodes", "2"), None);
        assert_eq!(set(cfg, "node-id", "5"), None);
        // SAFETY: `cfg` is live.
        let err = take(unsafe { fv_config_finish(cfg, FvEngine::Kvm, 2) }).unwrap();
        assert!(
            err.contains("node-id=5 is out of range for nodes=2"),
            "{err}"
        );
        // SAFETY: `cfg` is live; not finished, so no placement.
        unsafe {
            assert!(!fv_vcpu_is_local(cfg, 0));
            fv_config_free(cfg);
        }
    }

    #[test]
    fn null_arguments_are_errors_not_crashes() {
        // SAFETY: NULL is allowed and reported.
        unsafe {
            assert!(take(fv_config_set(ptr::null_mut(), ptr::null(), ptr::null())).is_some());
            let cfg = fv_config_new();
            assert!(take(fv_config_set(cfg, c("nodes").as_ptr(), ptr::null())).is_some());
            assert!(fv_config_get(cfg, c("nope").as_ptr()).is_null());
            fv_config_free(cfg);
            fv_config_free(ptr::null_mut());
            fv_string_free(ptr::null_mut());
            assert_eq!(fv_config_nodes(ptr::null()), 0);
        }
    }
}
