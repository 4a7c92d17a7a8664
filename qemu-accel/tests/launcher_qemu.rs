//! `fragvisor run --nodes 1` with the real patched QEMU and the Debian guest.
//! Runs only when FRAGVISOR_QEMU, FRAGVISOR_GUEST_KERNEL and
//! FRAGVISOR_INITRAMFS name files (the end-to-end crate `tests/` is where
//! booting is required); otherwise it says why it did nothing.

use std::process::{Command, Stdio};

#[test]
fn one_node_debian_guest_boots_and_powers_off() {
    let vars = [
        "FRAGVISOR_QEMU",
        "FRAGVISOR_GUEST_KERNEL",
        "FRAGVISOR_INITRAMFS",
    ];
    let paths: Vec<String> = vars
        .iter()
        .filter_map(|v| std::env::var(v).ok())
        .filter(|p| std::path::Path::new(p).is_file())
        .collect();
    if paths.len() != vars.len() {
        eprintln!(
            "skipped: set {} to files to boot a real guest",
            vars.join(", ")
        );
        return;
    }
    let out = Command::new(env!("CARGO_BIN_EXE_fragvisor"))
        .args([
            "run",
            "--nodes",
            "1",
            "--engine",
            "fragvisor-tcg",
            "--smp",
            "2",
        ])
        .args(["--kernel", &paths[1], "--initrd", &paths[2]])
        .args([
            "--append",
            "console=ttyS0 clocksource=tsc tsc=reliable panic=-1 fv.workload=percpu",
        ])
        .args(["--timeout", "240"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let show = format!("--- stdout ---\n{stdout}\n--- stderr ---\n{stderr}");
    assert_eq!(out.status.code(), Some(0), "{show}");
    for needle in [
        "FV: cpus online=0-1 count=2",
        "FV: node 0 cpus=0-1 ",
        "FV: RESULT PASS workload=percpu",
        "FV: poweroff",
    ] {
        assert!(stdout.contains(needle), "no {needle:?}\n{show}");
    }
    assert!(stderr.contains("all 1 node(s) exited 0"), "{show}");
}
