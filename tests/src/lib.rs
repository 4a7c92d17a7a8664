//! Helpers for FragVisor's end-to-end tests: find the patched QEMU and the
//! guest artifacts, run QEMU with a hard timeout, and check its output.
//!
//! The QEMU binary comes from `FRAGVISOR_QEMU` (the last line printed by
//! `scripts/build-qemu.sh`). When it is unset the tests fail, they never
//! skip: a green run must mean the guests really booted.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::thread;
use std::time::{Duration, Instant};

/// Root of the repository (the parent of this crate).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// The patched `qemu-system-x86_64`, from `FRAGVISOR_QEMU`.
///
/// # Panics
/// When `FRAGVISOR_QEMU` is unset or does not name an executable file.
pub fn qemu_binary() -> PathBuf {
    let Some(path) = std::env::var_os("FRAGVISOR_QEMU") else {
        panic!(
            "FRAGVISOR_QEMU is not set. Build the patched QEMU and point the tests at it:\n  \
             export FRAGVISOR_QEMU=$(scripts/build-qemu.sh | tail -n1)"
        );
    };
    let path = PathBuf::from(path);
    assert!(
        path.is_file(),
        "FRAGVISOR_QEMU={} is not a file; rebuild with scripts/build-qemu.sh",
        path.display()
    );
    path
}

/// Run a repository script that prints a path as its last line, or take
/// the path from `env_override` when that variable is set.
pub fn artifact_from_script(env_override: &str, script: &str) -> PathBuf {
    if let Some(path) = std::env::var_os(env_override) {
        let path = PathBuf::from(path);
        assert!(
            path.is_file(),
            "{env_override}={} is not a file",
            path.display()
        );
        return path;
    }
    let out = Command::new(repo_root().join(script))
        .stderr(Stdio::inherit())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {script}: {e}"));
    assert!(out.status.success(), "{script} failed: {}", out.status);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let last = stdout.lines().last().unwrap_or_default().trim();
    let path = PathBuf::from(last);
    assert!(
        path.is_file(),
        "{script} printed '{last}' as its last line, which is not a file"
    );
    path
}

/// The tiny multi-vCPU test kernel, built from `guest-kernel/` into this
/// crate's scratch directory (or `FRAGVISOR_TESTKERNEL`).
pub fn test_kernel(scratch: &Path) -> PathBuf {
    if let Some(path) = std::env::var_os("FRAGVISOR_TESTKERNEL") {
        return PathBuf::from(path);
    }
    // Tests of one binary run in parallel and share this directory: one
    // `make` at a time, or one links an object another is still writing.
    static BUILD: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one_build = BUILD
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    let out_dir = scratch.join("fvtest");
    let status = Command::new("make")
        .arg("-s")
        .arg("-C")
        .arg(repo_root().join("guest-kernel"))
        .arg(format!("O={}", out_dir.display()))
        .status()
        .expect("run make -C guest-kernel");
    assert!(status.success(), "make -C guest-kernel failed: {status}");
    let elf = out_dir.join("fvtest.elf");
    assert!(elf.is_file(), "no {} after make", elf.display());
    elf
}

/// What a QEMU run produced.
#[derive(Debug)]
pub struct QemuRun {
    /// Exit status; `None` when the run was killed at the timeout.
    pub status: Option<ExitStatus>,
    /// Standard output (the guest's serial console with `-serial stdio`).
    pub stdout: String,
    /// Standard error (QEMU's own messages).
    pub stderr: String,
    /// Wall time of the run.
    pub elapsed: Duration,
}

impl QemuRun {
    /// Exit code, panicking with the output if QEMU timed out or was killed
    /// by a signal.
    pub fn code(&self) -> i32 {
        match self.status {
            None => panic!(
                "QEMU did not finish in time (killed)\n{}",
                self.transcript()
            ),
            Some(s) => s
                .code()
                .unwrap_or_else(|| panic!("QEMU died by a signal: {s}\n{}", self.transcript())),
        }
    }

    /// Both output streams, for failure messages.
    pub fn transcript(&self) -> String {
        format!(
            "--- stdout ---\n{}\n--- stderr ---\n{}\n--- ({:.1} s)",
            self.stdout,
            self.stderr,
            self.elapsed.as_secs_f64()
        )
    }

    /// Assert that stdout contains every one of `needles`.
    pub fn assert_stdout_has(&self, needles: &[&str]) {
        for n in needles {
            assert!(
                self.stdout.contains(n),
                "guest output lacks {n:?}\n{}",
                self.transcript()
            );
        }
    }
}

fn drain(mut r: impl Read + Send + 'static) -> thread::JoinHandle<String> {
    thread::spawn(move || {
        let mut buf = Vec::new();
        // A read error just ends the capture; what was read is kept.
        let _ = r.read_to_end(&mut buf);
        String::from_utf8_lossy(&buf).into_owned()
    })
}

/// Run the patched QEMU with `args`, killing it after `timeout`.
pub fn run_qemu<S: AsRef<std::ffi::OsStr>>(args: &[S], timeout: Duration) -> QemuRun {
    run_qemu_with_input(args, None, timeout)
}

/// Like [`run_qemu`], writing `input` to QEMU's stdin (e.g. monitor
/// commands with `-monitor stdio`).
pub fn run_qemu_with_input<S: AsRef<std::ffi::OsStr>>(
    args: &[S],
    input: Option<&str>,
    timeout: Duration,
) -> QemuRun {
    let qemu = qemu_binary();
    let start = Instant::now();
    let mut child = Command::new(&qemu)
        .args(args)
        .stdin(if input.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {}: {e}", qemu.display()));
    if let (Some(text), Some(mut stdin)) = (input, child.stdin.take()) {
        let text = text.to_string();
        // QEMU may exit before reading everything; a write error is fine.
        thread::spawn(move || {
            use std::io::Write;
            let _ = stdin.write_all(text.as_bytes());
        });
    }
    let out = drain(child.stdout.take().expect("piped stdout"));
    let err = drain(child.stderr.take().expect("piped stderr"));

    let status = loop {
        match child.try_wait().expect("wait for QEMU") {
            Some(status) => break Some(status),
            None if start.elapsed() >= timeout => {
                // Already exited or killed: either way it is gone.
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            None => thread::sleep(Duration::from_millis(50)),
        }
    };
    QemuRun {
        status,
        stdout: out.join().unwrap_or_default(),
        stderr: err.join().unwrap_or_default(),
        elapsed: start.elapsed(),
    }
}

/// The arguments every test machine shares: q35, no default devices, no
/// display, serial console on stdout.
pub fn base_args(accel: &str, smp: u32, mem_mib: u32) -> Vec<String> {
    [
        "-machine",
        "q35",
        "-accel",
        accel,
        "-smp",
        &smp.to_string(),
        "-m",
        &mem_mib.to_string(),
        "-nodefaults",
        "-display",
        "none",
        "-serial",
        "stdio",
        "-no-reboot",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// `(lo, hi, rtt_min)` of the test kernel's `FVTEST: <label> cpu N skew`
/// line (`label` "tsc" at start, "tsc later" after `tsclater=S`): the
/// interval (in guest TSC cycles) that holds the skew between the BSP's TSC
/// and CPU `cpu`'s, and the shortest ping-pong round trip.
pub fn fvtest_tsc_skew(console: &str, label: &str, cpu: u32) -> Option<(i64, i64, i64)> {
    let prefix = format!("FVTEST: {label} cpu {cpu} skew ");
    let line = console
        .lines()
        .find_map(|l| l.trim_end().strip_prefix(prefix.as_str()))?;
    let field = |name: &str| -> Option<i64> {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(name))?
            .parse()
            .ok()
    };
    Some((field("lo=")?, field("hi=")?, field("rtt_min=")?))
}
pub mod launcher_run;
pub mod qemu_cluster;
