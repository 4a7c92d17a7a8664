//! `-accel fragvisor,nodes=1` (KVM engine, QEMU's userspace APIC) runs the
//! tiny multi-vCPU test kernel from guest-kernel/ to completion: the BSP
//! starts the AP with INIT-SIPI-SIPI and they exchange IPIs, all through
//! the userspace APIC.

use std::path::Path;
use std::time::Duration;

use fragvisor_e2e::{base_args, run_qemu, run_qemu_with_input, test_kernel};

/// isa-debug-exit turns the kernel's PASS (0x10) into exit code 33.
const PASS_EXIT: i32 = (0x10 << 1) | 1;

fn require_kvm() {
    assert!(
        Path::new("/dev/kvm").exists(),
        "/dev/kvm is missing: the fragvisor (KVM engine) tests need it"
    );
}

fn run_test_kernel(extra: &[&str]) -> fragvisor_e2e::QemuRun {
    require_kvm();
    let kernel = test_kernel(Path::new(env!("CARGO_TARGET_TMPDIR")));
    let mut args = base_args("fragvisor,nodes=1", 2, 256);
    args.extend(["-kernel".into(), kernel.display().to_string()]);
    args.extend(extra.iter().map(|s| s.to_string()));
    run_qemu(&args, Duration::from_secs(90))
}

const PASS_MARKERS: &[&str] = &[
    "FVTEST: cpus=2 ",
    "FVTEST: cpu 1 online apic=1",
    "FVTEST: all 2 cpus online",
    "FVTEST: ipi bsp->1 ok count=8",
    "FVTEST: ipi 1->bsp ok count=8",
    "FVTEST: mem cpu 0 ok",
    "FVTEST: mem cpu 1 ok",
    "FVTEST: counter=40000 expected=40000",
    "FVTEST: PASS",
];

#[test]
fn test_kernel_passes_with_two_vcpus() {
    let run = run_test_kernel(&["-device", "isa-debug-exit,iobase=0xf4,iosize=0x04"]);
    assert_eq!(
        run.code(),
        PASS_EXIT,
        "test kernel did not pass\n{}",
        run.transcript()
    );
    run.assert_stdout_has(PASS_MARKERS);
    assert!(!run.stdout.contains("FVTEST: FAIL"), "{}", run.transcript());
    // Two vCPUs of one host read one TSC: the measured skew interval holds 0.
    let (lo, hi, _) = fragvisor_e2e::fvtest_tsc_skew(&run.stdout, "tsc", 1)
        .unwrap_or_else(|| panic!("no TSC skew line\n{}", run.transcript()));
    assert!(
        lo <= 0 && 0 <= hi,
        "skew [{lo}, {hi}]\n{}",
        run.transcript()
    );
    assert!(
        !run.stderr.contains("deprecated"),
        "userspace APIC warned under fragvisor\n{}",
        run.transcript()
    );
}

#[test]
fn test_kernel_powers_off_cleanly() {
    // Without isa-debug-exit the kernel powers off through ACPI: exit 0.
    let run = run_test_kernel(&[]);
    assert_eq!(run.code(), 0, "{}", run.transcript());
    run.assert_stdout_has(PASS_MARKERS);
}

#[test]
fn vcpus_get_qemu_userspace_apic() {
    require_kvm();
    let args = [
        "-machine",
        "q35",
        "-accel",
        "fragvisor,nodes=1",
        "-smp",
        "2",
        "-nodefaults",
        "-display",
        "none",
        "-S",
        "-monitor",
        "stdio",
    ];
    let run = run_qemu_with_input(
        &args,
        Some("info qom-tree\nquit\n"),
        Duration::from_secs(30),
    );
    assert_eq!(run.code(), 0, "{}", run.transcript());
    let lapics: Vec<&str> = run
        .stdout
        .lines()
        .map(str::trim)
        .filter(|l| l.starts_with("/lapic "))
        .collect();
    assert_eq!(
        lapics,
        ["/lapic (apic)", "/lapic (apic)"],
        "expected QEMU's userspace APIC on both vCPUs\n{}",
        run.transcript()
    );
    assert!(
        run.stdout.contains("/ioapic (ioapic)"),
        "expected the userspace IOAPIC\n{}",
        run.transcript()
    );
    assert!(
        !run.stdout.contains("kvmvapic"),
        "the vapic ROM should be off\n{}",
        run.transcript()
    );
}
