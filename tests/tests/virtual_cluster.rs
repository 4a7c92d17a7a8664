//! The KVM engine on a virtual cluster: `fragvisor run --virtual-hosts N`
//! boots N host VMs (TCG with `-cpu max`: emulated AMD SVM, so each host
//! kernel loads kvm-amd and offers its own `/dev/kvm`), and node K of the
//! aggregate VM runs in host VM K with `-accel fragvisor` (KVM). The host
//! VMs are separate kernels with their own TSC, userfaultfd and network
//! stack, joined by one virtual Ethernet segment. See
//! docs/virtual-cluster.md.
//!
//! Needs `FRAGVISOR_QEMU`, `FRAGVISOR_LAUNCHER` (the `fragvisor` binary)
//! and `FRAGVISOR_HOST_IMAGE` (scripts/virtual-cluster/build-host-image.sh),
//! all set by scripts/qemu/e2e.sh, and root (network namespaces, taps).
//! Without them the tests fail; they never skip.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use fragvisor_e2e::launcher_run::{env_path, LauncherRun};
use fragvisor_e2e::{artifact_from_script, fvtest_tsc_skew, qemu_binary, test_kernel};

/// Host VMs take both cores: one virtual cluster at a time.
fn serialize() -> MutexGuard<'static, ()> {
    static ONE: Mutex<()> = Mutex::new(());
    ONE.lock().unwrap_or_else(|p| p.into_inner())
}

fn host_image() -> PathBuf {
    env_path(
        "FRAGVISOR_HOST_IMAGE",
        "the host image directory of scripts/virtual-cluster/build-host-image.sh",
    )
}

/// A running `fragvisor run --virtual-hosts`.
struct VirtualCluster;

impl VirtualCluster {
    /// `fragvisor run --virtual-hosts hosts` with `args` after it.
    fn start(hosts: u32, args: &[String]) -> LauncherRun {
        let mut all = vec![
            "run".to_string(),
            "--virtual-hosts".into(),
            hosts.to_string(),
            "--qemu".into(),
            qemu_binary().display().to_string(),
            "--host-image".into(),
            host_image().display().to_string(),
        ];
        all.extend(args.iter().cloned());
        LauncherRun::start(&all)
    }
}

fn scratch(name: &str) -> PathBuf {
    let d = Path::new(env!("CARGO_TARGET_TMPDIR")).join(name);
    std::fs::create_dir_all(&d).expect("scratch dir");
    d
}

/// `run` flags for the Debian kernel + busybox guest with `smp` vCPUs,
/// running every workload and powering off.
fn linux_args(smp: u32) -> Vec<String> {
    let kernel = artifact_from_script("FRAGVISOR_GUEST_KERNEL", "guest-kernel/fetch-kernel.sh");
    let initrd = artifact_from_script("FRAGVISOR_INITRAMFS", "guest-kernel/build-initramfs.sh");
    vec![
        "--smp".into(),
        smp.to_string(),
        "--kernel".into(),
        kernel.display().to_string(),
        "--initrd".into(),
        initrd.display().to_string(),
        "--append".into(),
        "console=ttyS0 clocksource=tsc tsc=reliable panic=-1 fv.workload=all".into(),
    ]
}

fn strings(xs: &[&str]) -> Vec<String> {
    xs.iter().map(|s| s.to_string()).collect()
}

/// isa-debug-exit turns the test kernel's PASS (0x10) into exit code 33.
const PASS_EXIT: i32 = (0x10 << 1) | 1;

#[test]
fn kvm_two_host_vms_test_kernel_sipi_ipis_and_remote_port_io() {
    let _one = serialize();
    let kernel = test_kernel(&scratch("vc-testkernel"));
    let mut args = strings(&["--smp", "4", "--no-numa", "--kernel"]);
    args.push(kernel.display().to_string());
    args.extend(strings(&[
        "--",
        "-device",
        "isa-debug-exit,iobase=0xf4,iosize=0x04",
    ]));
    let run = VirtualCluster::start(2, &args).finish(Duration::from_secs(300));
    let all = run.transcript();
    assert_eq!(run.code(), Some(PASS_EXIT), "{all}");
    for needle in [
        "FVTEST: cpus=4 ",
        // Started by the origin's INIT-SIPI-SIPI, on host VM 1.
        "FVTEST: cpu 2 online apic=2",
        "FVTEST: cpu 3 online apic=3",
        "FVTEST: ipi bsp->2 ok count=8",
        "FVTEST: ipi 3->bsp ok count=8",
        "FVTEST: ipi 2->3 ok",
        "FVTEST: ipi 3->1 ok",
        "FVTEST: mem cpu 3 ok",
        "FVTEST: counter=80000 expected=80000",
        "FVTEST: PASS",
    ] {
        assert!(run.stdout.contains(needle), "no {needle:?}\n{all}");
    }
    // "cpu 2 online" is printed by a vCPU of host VM 1: its port I/O went to
    // the origin's serial port. Node 1's summary counts its own vCPUs.
    assert!(
        run.stderr
            .contains("[node 1] fragvisor: node 1 summary: vcpus=[cpu2:"),
        "{all}"
    );
    // Host VM 1's TSC is its own (it booted later): the node measured it.
    assert!(
        run.stderr
            .contains("fragvisor: node 1 guest clock aligned to node 0: host TSC delta "),
        "{all}"
    );
    for cpu in 1..4 {
        let (lo, hi, _) = fvtest_tsc_skew(&run.stdout, "tsc", cpu)
            .unwrap_or_else(|| panic!("no TSC skew line for cpu {cpu}\n{all}"));
        assert!(lo <= 0 && 0 <= hi, "cpu {cpu}: skew [{lo}, {hi}]\n{all}");
    }
}

#[test]
#[ignore = "flaky below us: TCG's emulated SVM reset the guest and took the host VM's kernel \
            down in 3 of 9 runs (an oops in __svm_vcpu_run); run it with --ignored \
            (docs/virtual-cluster.md)"]
fn kvm_one_host_vm_linux_workloads_and_poweroff() {
    let _one = serialize();
    let args = linux_args(2);
    let run = VirtualCluster::start(1, &args).finish(Duration::from_secs(300));
    let all = run.transcript();
    assert_eq!(run.code(), Some(0), "{all}");
    for needle in [
        "Hypervisor detected: KVM",
        "FV: cpus online=0-1 count=2",
        "FV: percpu cpu=0 ",
        "FV: percpu cpu=1 ",
        "FV: counter threads=2 cpus=0-1 k=200000 final=400000 expected=400000 ok",
        "FV: RESULT PASS",
        "FV: poweroff",
    ] {
        assert!(run.stdout.contains(needle), "no {needle:?}\n{all}");
    }
}

#[test]
#[ignore = "fails: after kill -9 of host VM 1 the origin on the KVM engine does not report node 1 \
            within 15 s (its DSM threads stall; docs/virtual-cluster.md, 'Open')"]
fn kvm_killed_host_vm_stops_the_origin_naming_it() {
    let _one = serialize();
    let args = linux_args(2);
    let mut vc = VirtualCluster::start(2, &args);
    let pid = vc.announced_pid("host VM", 1);
    // Both nodes joined and the guest runs on the KVM engine.
    let joined = vc.wait_line(
        "Booting paravirtualized kernel on KVM",
        Duration::from_secs(240),
    );
    assert!(joined.is_some(), "the guest never started");
    let killed = Instant::now();
    let st = Command::new("kill")
        .args(["-KILL", &pid.to_string()])
        .status()
        .expect("kill");
    assert!(st.success());
    let named = vc.wait_line("[node 0] fragvisor: node 1 failed", Duration::from_secs(30));
    let run = vc.finish(Duration::from_secs(400));
    let all = run.transcript();
    let named = named.unwrap_or_else(|| panic!("the origin never named node 1\n{all}"));
    let after = named.duration_since(killed);
    assert!(
        after <= Duration::from_secs(10),
        "the origin named node 1 {:.1} s after its host VM was killed\n{all}",
        after.as_secs_f64()
    );
    assert_ne!(run.code(), Some(0), "{all}");
    assert!(
        run.stderr
            .contains("fragvisor: node 1 failed first: killed by signal 9"),
        "{all}"
    );
    eprintln!(
        "origin named node 1 {:.1} s after its host VM was killed",
        after.as_secs_f64()
    );
}
