//! The runtime's log inside QEMU: a `tracing` subscriber on stderr, so the
//! library's events (with their node and peer fields) reach the user. By
//! default it shows warnings and errors only, so a healthy run stays as
//! quiet on stderr as QEMU's own; the `log` accelerator option (or
//! `FRAGVISOR_LOG`) asks for more.

use tracing_subscriber::EnvFilter;

/// The filter when none is given.
pub const DEFAULT_FILTER: &str = "warn";

/// Longest filter accepted.
const MAX_FILTER: usize = 1024;
const LEVELS: [&str; 6] = ["off", "error", "warn", "info", "debug", "trace"];

/// Checks a filter (`warn`, `info`, `dsm_service=debug,qemu_accel=info`):
/// comma-separated `LEVEL`, `TARGET` or `TARGET=LEVEL` directives only.
/// `tracing`'s span and field filters (`[span{field=value}]`) are refused:
/// their values compile to regular expressions, and a crafted one took
/// `EnvFilter` more than 10 s to build (found by the `accel_options` fuzz
/// target).
pub fn check_filter(filter: &str) -> Result<(), String> {
    if filter.len() > MAX_FILTER {
        return Err(format!("longer than {MAX_FILTER} bytes"));
    }
    // `EnvFilter` panics on some non-ASCII input (a U+2028 next to a
    // directive: found by the `accel_options` fuzz target).
    if let Some(c) = filter
        .chars()
        .find(|c| !(c.is_ascii_graphic() || *c == ' '))
    {
        return Err(format!(
            "character {c:?} is not allowed (ASCII letters, digits, '_', ':', '-', '=', ',' and spaces)"
        ));
    }
    let target_ok = |t: &str| {
        !t.is_empty()
            && t.len() <= 128
            && t.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | ':' | '-'))
    };
    for d in filter.split(',').map(str::trim).filter(|d| !d.is_empty()) {
        let level_ok = |l: &str| LEVELS.contains(&l.to_ascii_lowercase().as_str());
        let ok = match d.split_once('=') {
            Some((target, level)) => target_ok(target) && level_ok(level),
            None => level_ok(d) || target_ok(d),
        };
        if !ok {
            return Err(format!(
                "directive {d:?} is not LEVEL, TARGET or TARGET=LEVEL (levels: {}; \
                 span and field filters are not accepted)",
                LEVELS.join(", ")
            ));
        }
    }
    EnvFilter::try_new(filter)
        .map(drop)
        .map_err(|e| e.to_string())
}

/// Installs the process-wide subscriber with `filter` (the default when
/// `None`), unless one is installed already (the launcher's, a test's).
pub fn install(filter: Option<&str>) {
    let filter = filter
        .filter(|f| check_filter(f).is_ok())
        .and_then(|f| EnvFilter::try_new(f).ok())
        .unwrap_or_else(|| EnvFilter::new(DEFAULT_FILTER));
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
        assert!(check_filter("dsm_service::transport=DEBUG, info").is_ok());
    }

    #[test]
    fn span_and_field_filters_are_refused_at_once() {
        // The shape of the fuzz target's slow input: nested field filters
        // whose values compile to regular expressions.
        let slow = format!(
            "log[r00{{5h.eers{{u[r00{{5h.eers{{500{{5h.eers={}}}]}}]}}",
            ".".repeat(80)
        );
        let t = std::time::Instant::now();
        let e = check_filter(&slow).unwrap_err();
        assert!(e.contains("span and field filters are not accepted"), "{e}");
        assert!(t.elapsed() < std::time::Duration::from_millis(100));
        assert!(check_filter("[span{x=1}]=debug").is_err());
        assert!(check_filter(&"a".repeat(2000)).is_err());
    }

    #[test]
    fn non_ascii_filters_are_refused_before_envfilter_sees_them() {
        // EnvFilter panics on this (tracing-subscriber 0.3.23).
        let e = check_filter("warn,\u{2028}info").unwrap_err();
        assert!(e.starts_with("character '\\u{2028}' is not allowed"), "{e}");
        assert!(check_filter("d\u{e9}bug").is_err());
        assert!(check_filter("warn\t").is_err());
    }
}
