//! `-accel fragvisor-tcg,nodes=1` boots the stock Debian kernel with the
//! busybox initramfs from guest-kernel/: 2 CPUs online, a workload pinned
//! to each CPU, power-off, QEMU exits 0.

use std::time::Duration;

use fragvisor_e2e::{artifact_from_script, base_args, run_qemu};

#[test]
fn debian_kernel_boots_on_two_vcpus_and_powers_off() {
    let kernel = artifact_from_script("FRAGVISOR_GUEST_KERNEL", "guest-kernel/fetch-kernel.sh");
    let initrd = artifact_from_script("FRAGVISOR_INITRAMFS", "guest-kernel/build-initramfs.sh");

    let mut args = base_args("fragvisor-tcg,nodes=1", 2, 512);
    args.extend(
        [
            "-kernel",
            &kernel.display().to_string(),
            "-initrd",
            &initrd.display().to_string(),
            "-append",
            "console=ttyS0 panic=-1 fv.workload=percpu",
        ]
        .map(String::from),
    );
    let run = run_qemu(&args, Duration::from_secs(240));

    assert_eq!(run.code(), 0, "QEMU did not exit 0\n{}", run.transcript());
    run.assert_stdout_has(&[
        "FV: cpus online=0-1 count=2",
        "FV: workload percpu start",
        "FV: RESULT PASS workload=percpu",
        "FV: poweroff",
    ]);
    for cpu in 0..2 {
        let line = run
            .stdout
            .lines()
            .find(|l| l.starts_with(&format!("FV: percpu cpu={cpu} ")))
            .unwrap_or_else(|| panic!("no percpu result for cpu {cpu}\n{}", run.transcript()));
        assert!(
            line.ends_with(" ok"),
            "cpu {cpu}: {line}\n{}",
            run.transcript()
        );
    }
}
