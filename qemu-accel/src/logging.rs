//! The runtime's log inside QEMU: a `tracing` subscriber on stderr, so the
//! library's events (with their node and peer fields) reach the user. By
//! default it shows warnings and errors only, so a healthy run stays as
//! quiet on stderr as QEMU's own; the `log` accelerator option (or
//! `FRAGVISOR_LOG`) asks for more.

use tracing_subscriber::EnvFilter;

/// The filter when none is given.
pub const DEFAULT_FILTER: &str = "warn";

/// Checks a filter (`warn`, `info`, `dsm_service=debug,qemu_accel=info`).
pub fn check_filter(filter: &str) -> Result<(), String> {
    EnvFilter::try_new(filter)
        .map(drop)
        .map_err(|e| e.to_string())
}

/// Installs the process-wide subscriber with `filter` (the default when
/// `None`), unless one is installed already (the launcher's, a test's).
pub fn install(filter: Option<&str>) {
    let filter = EnvFilter::try_new(filter.unwrap_or(DEFAULT_FILTER))
        .unwrap_or_else(|_| EnvFilter::new(DEFAULT_FILTER));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .try_init();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_are_checked() {
        assert!(check_filter("warn").is_ok());
        assert!(check_filter("dsm_service=debug,qemu_accel=info").is_ok());
        assert!(check_filter(DEFAULT_FILTER).is_ok());
        assert!(check_filter("dsm_service=loud").is_err());
    }
}
