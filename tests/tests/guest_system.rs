//! The Debian system image as users run it: `fragvisor run --disk` on 2
//! and 4 nodes (TCG engine, `-smp 4`), logged into over ssh through the
//! user-net port forward, with the disk, the network and interrupts used
//! from vCPUs on every host. See docs/guest-image.md and the I/O path in
//! docs/aggregate-vm.md.
//!
//! Needs `FRAGVISOR_QEMU`, `FRAGVISOR_LAUNCHER` and `FRAGVISOR_SYSTEM_IMAGE`
//! (guest-kernel/build-system-image.sh), set by scripts/qemu/e2e.sh, and
//! curl, iperf3, e2fsck and debugfs on the host. Without them the tests
//! fail; they never skip.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use fragvisor_e2e::launcher_run::{env_path, launcher, Finished, LauncherRun};
use fragvisor_e2e::qemu_binary;
// Each VM takes both cores: one at a time.
use fragvisor_e2e::qemu_cluster::serialize;

/// The console line the image's fragvisor-ready.service prints.
const READY: &str = "fragvisor-guest: multi-user.target reached";
/// What the guest kernel prints when a CPU is stuck.
const SOFT_LOCKUP: &str = "watchdog: BUG: soft lockup";

fn scratch(name: &str) -> PathBuf {
    let d = Path::new(env!("CARGO_TARGET_TMPDIR")).join(name);
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("scratch dir");
    d
}

/// A private copy of the system image (with the kernel, initramfs and
/// keys beside it, as the launcher expects), so each test starts from the
/// image as built.
fn image_copy(dir: &Path) -> PathBuf {
    let img = env_path(
        "FRAGVISOR_SYSTEM_IMAGE",
        "guest-kernel/build-system-image.sh's image",
    );
    let src = img.parent().expect("image dir");
    for f in [
        "vmlinuz",
        "initrd.cpio.gz",
        "cmdline",
        "id_ed25519",
        "known_hosts",
    ] {
        std::fs::copy(src.join(f), dir.join(f)).unwrap_or_else(|e| panic!("copy {f}: {e}"));
    }
    let mut perm = std::fs::metadata(dir.join("id_ed25519"))
        .unwrap()
        .permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut perm, 0o600);
    std::fs::set_permissions(dir.join("id_ed25519"), perm).unwrap();
    let copy = dir.join("debian.img");
    let st = Command::new("cp")
        .arg("--sparse=always")
        .arg(&img)
        .arg(&copy)
        .status()
        .expect("cp");
    assert!(st.success(), "cp {}", img.display());
    copy
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// A running aggregate VM of the system image.
struct SystemVm {
    run: LauncherRun,
    name: String,
    image: PathBuf,
    /// Host port forwarded to the guest's port 80.
    http_port: u16,
}

impl SystemVm {
    /// Boot `nodes` nodes, 4 vCPUs, 1 GiB, waiting for the ready line.
    ///
    /// A boot whose guest reports a soft lockup is tried once more, saying
    /// so: cross-host code patching (`text_poke_bp` waiting in
    /// `smp_call_function_many_cond` for a CPU of the other host) hangs a
    /// few boots in a hundred, an open bug of the TCG engine tracked with
    /// the stale-code race (docs/aggregate-vm.md, "Not done yet"). A second
    /// hang fails the test.
    fn boot(nodes: u32, name: &str, dir: &Path, boot_timeout: Duration) -> SystemVm {
        for attempt in 1..=2 {
            match SystemVm::try_boot(nodes, name, dir, boot_timeout) {
                Ok(vm) => return vm,
                Err(why) if attempt == 1 && why.contains(SOFT_LOCKUP) => eprintln!(
                    "{name}: boot attempt 1 hung ({}); known TCG cross-host patching hang, \
                     booting once more",
                    why.lines()
                        .find(|l| l.contains(SOFT_LOCKUP))
                        .unwrap_or_default()
                ),
                Err(why) => {
                    panic!("{nodes}-node guest did not come up (attempt {attempt}):\n{why}")
                }
            }
        }
        unreachable!("the second attempt returns or panics")
    }

    fn try_boot(
        nodes: u32,
        name: &str,
        dir: &Path,
        boot_timeout: Duration,
    ) -> Result<SystemVm, String> {
        let image = image_copy(dir);
        let (ssh_port, http_port) = (free_port(), free_port());
        let args: Vec<String> = [
            "run",
            "--engine",
            "fragvisor-tcg",
            "--nodes",
            &nodes.to_string(),
            "--smp",
            "4",
            "--memory",
            "1G",
            "--qemu",
            &qemu_binary().display().to_string(),
            "--disk",
            &image.display().to_string(),
            "--net",
            &format!(
                "user,hostfwd=tcp:127.0.0.1:{ssh_port}-:22,hostfwd=tcp:127.0.0.1:{http_port}-:80"
            ),
            "--name",
            name,
            "--stop-timeout",
            "30",
            "--timeout",
            "2400",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let mut run = LauncherRun::start(&args);
        let t0 = Instant::now();
        match run.wait_any(&[READY, SOFT_LOCKUP], boot_timeout) {
            Some((0, _)) => {}
            Some(_) => {
                // Let the lockup report finish, then stop this VM.
                std::thread::sleep(Duration::from_secs(2));
                return Err(run.finish(Duration::from_secs(1)).transcript());
            }
            None => {
                return Err(format!(
                    "not ready in {boot_timeout:?}\n{}",
                    run.finish(Duration::from_secs(1)).transcript()
                ))
            }
        }
        eprintln!(
            "{name}: {nodes} nodes ready in {:.1} s",
            t0.elapsed().as_secs_f64()
        );
        Ok(SystemVm {
            run,
            name: name.to_string(),
            image,
            http_port,
        })
    }

    /// `fragvisor ssh NAME -- script`: (exit code, stdout).
    fn ssh(&self, script: &str) -> (i32, String) {
        let out: Output = Command::new(launcher())
            .args(["ssh", &self.name, "--wait", "120", "--", script])
            .stdin(Stdio::null())
            .output()
            .expect("run fragvisor ssh");
        let stdout = String::from_utf8_lossy(&out.stdout).to_string();
        if !out.status.success() {
            eprintln!(
                "ssh {script:?}: {:?}\n{stdout}\n{}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        (out.status.code().unwrap_or(-1), stdout)
    }

    /// [`SystemVm::ssh`] that must succeed; returns stdout.
    fn must(&self, script: &str) -> String {
        let (code, out) = self.ssh(script);
        assert_eq!(code, 0, "guest command failed: {script}\n{out}");
        out
    }

    /// Power off from inside and wait for the launcher.
    fn poweroff(self) -> (Finished, PathBuf) {
        // ssh may lose the connection as sshd stops: its status is moot.
        let _ = self.ssh("systemctl poweroff");
        (self.run.finish(Duration::from_secs(2400)), self.image)
    }
}

/// `taskset -c K` runs on CPU K for every vCPU, whichever host runs it.
fn check_every_cpu(vm: &SystemVm, cpus: u32) {
    for c in 0..cpus {
        let out = vm.must(&format!("taskset -c {c} cut -d' ' -f39 /proc/self/stat"));
        assert_eq!(out.trim(), c.to_string(), "taskset -c {c} ran on CPU {out}");
    }
}

/// `e2fsck -n -f` passes on `image`. With `replay`, on a copy whose journal
/// was replayed first (`e2fsck -E journal_only`), as the kernel replays it
/// at mount: after a crash the file system is consistent only with its
/// journal, and `e2fsck -n` skips the replay. Returns the image checked.
fn e2fsck_clean(image: &Path, replay: bool) -> PathBuf {
    let checked = if replay {
        let copy = image.with_extension("replayed.img");
        let st = Command::new("cp")
            .arg("--sparse=always")
            .arg(image)
            .arg(&copy)
            .status()
            .expect("cp");
        assert!(st.success());
        let out = Command::new("e2fsck")
            .args(["-E", "journal_only", "-p"])
            .arg(&copy)
            .output()
            .expect("run e2fsck");
        assert!(
            out.status.success(),
            "journal replay of {}: {:?}\n{}",
            image.display(),
            out.status,
            String::from_utf8_lossy(&out.stdout)
        );
        copy
    } else {
        image.to_path_buf()
    };
    let out = Command::new("e2fsck")
        .args(["-n", "-f"])
        .arg(&checked)
        .output()
        .expect("run e2fsck");
    assert!(
        out.status.success(),
        "e2fsck -n {}: {:?}\n{}\n{}",
        checked.display(),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    checked
}

/// sha256 of a file inside the (stopped VM's) image, read with debugfs.
fn sha256_in_image(image: &Path, path: &str) -> String {
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "debugfs -R 'cat {path}' '{}' 2>/dev/null | sha256sum",
            image.display()
        ))
        .output()
        .expect("debugfs");
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string()
}

fn first_word(s: &str) -> String {
    s.split_whitespace().next().unwrap_or_default().to_string()
}

/// The per-CPU counts of the IRQ line named `name` in /proc/interrupts.
fn irq_counts(vm: &SystemVm, irq: u32, cpus: usize) -> Vec<u64> {
    let line = vm.must(&format!("grep '^ *{irq}:' /proc/interrupts"));
    line.split_whitespace()
        .skip(1)
        .take(cpus)
        .map(|n| n.parse().expect("a count"))
        .collect()
}

#[test]
fn tcg_two_nodes_debian_ssh_disk_network_irq_affinity_reboot_and_poweroff() {
    let _one = serialize();
    let dir = scratch("system-2");
    let mut vm = SystemVm::boot(2, "fv-e2e-sys2", &dir, Duration::from_secs(900));
    check_every_cpu(&vm, 4);
    // Each vCPU's NUMA node is its host.
    let nodes = vm.must(
        "for c in 0 1 2 3; do ls -d /sys/devices/system/cpu/cpu$c/node* | sed 's/.*node//'; done",
    );
    assert_eq!(
        nodes.split_whitespace().collect::<Vec<_>>(),
        ["0", "0", "1", "1"]
    );

    // Disk: written and fsynced on a node-1 vCPU.
    let sum = first_word(&vm.must(
        "taskset -c 2 dd if=/dev/urandom of=/root/fv-disk bs=1M count=4 conv=fsync status=none && \
         taskset -c 3 sha256sum /root/fv-disk",
    ));
    assert_eq!(sum.len(), 64, "{sum}");

    // Network: nginx's workers on the node-1 vCPUs serve 1 MiB to the host.
    vm.must(
        "sed -i 's/^worker_processes.*/worker_processes 2;\\nworker_cpu_affinity 0100 1000;/' \
         /etc/nginx/nginx.conf && \
         taskset -c 2 head -c 1048576 /dev/urandom > /var/www/html/fv-1m && \
         systemctl restart nginx",
    );
    let workers =
        vm.must("for p in $(ps -C nginx -o pid=,args= | awk '/worker process/ {print $1}'); do taskset -cp $p | sed 's/.*: //'; done");
    let mut w: Vec<&str> = workers.split_whitespace().collect();
    w.sort_unstable();
    assert_eq!(w, ["2", "3"], "nginx workers' CPUs: {workers}");
    let guest_sum = first_word(&vm.must("sha256sum /var/www/html/fv-1m"));
    let fetched = dir.join("fv-1m");
    let st = Command::new("curl")
        .args(["-sf", "--max-time", "300", "-o"])
        .arg(&fetched)
        .arg(format!("http://127.0.0.1:{}/fv-1m", vm.http_port))
        .status()
        .expect("curl");
    assert!(st.success(), "curl of the guest's nginx: {st:?}");
    let host_sum = first_word(&String::from_utf8_lossy(
        &Command::new("sha256sum")
            .arg(&fetched)
            .output()
            .expect("sha256sum")
            .stdout,
    ));
    assert_eq!(host_sum, guest_sum, "the 1 MiB file arrived changed");

    // iperf3 from a node-1 vCPU to the host (the slirp gateway is the host).
    let iperf_port = free_port();
    let mut server = Command::new("iperf3")
        .args(["-s", "-1", "-B", "127.0.0.1", "-p", &iperf_port.to_string()])
        .stdout(Stdio::null())
        .spawn()
        .expect("iperf3 -s (install iperf3)");
    std::thread::sleep(Duration::from_millis(300));
    let report = vm.must(&format!(
        "taskset -c 3 iperf3 -c 10.0.2.2 -p {iperf_port} -t 3 -f m | grep -E 'sender|receiver'"
    ));
    let _ = server.wait();
    assert!(report.contains("receiver"), "iperf3 report: {report}");

    // Interrupt affinity: the NIC's receive queue moved to a node-1 CPU.
    let dev = vm.must("basename $(readlink /sys/class/net/eth0/device)");
    let irq: u32 = vm
        .must(&format!(
            "grep '{}-input.0' /proc/interrupts | cut -d: -f1",
            dev.trim()
        ))
        .trim()
        .parse()
        .expect("the virtio-net input IRQ");
    let now = vm.must(&format!("cat /proc/irq/{irq}/effective_affinity_list"));
    let target: usize = if now.trim() == "3" { 2 } else { 3 };
    vm.must(&format!(
        "echo {target} > /proc/irq/{irq}/smp_affinity_list"
    ));
    let before = irq_counts(&vm, irq, 4);
    let st = Command::new("curl")
        .args(["-sf", "--max-time", "300", "-o", "/dev/null"])
        .arg(format!("http://127.0.0.1:{}/fv-1m", vm.http_port))
        .status()
        .expect("curl");
    assert!(st.success(), "traffic after moving IRQ {irq}: {st:?}");
    let after = irq_counts(&vm, irq, 4);
    assert!(
        after[target] > before[target],
        "IRQ {irq} moved to CPU {target}: counts {before:?} -> {after:?}"
    );
    for c in 0..4 {
        if c != target {
            // The line's own pending interrupts may still land once.
            assert!(
                after[c] <= before[c] + 1,
                "IRQ {irq} still on CPU {c}: {before:?} -> {after:?}"
            );
        }
    }

    // Reboot across the same nodes: the file is still there.
    let _ = vm.ssh("systemctl reboot");
    assert!(
        vm.run.wait_count(READY, 2, Duration::from_secs(900)),
        "no second boot"
    );
    let again = first_word(&vm.must("sha256sum /root/fv-disk"));
    assert_eq!(again, sum, "the fsynced file changed across the reboot");

    let (done, image) = vm.poweroff();
    assert_eq!(done.code(), Some(0), "{}", done.transcript());
    assert!(
        done.stderr.contains("all 2 node(s) exited 0"),
        "{}",
        done.transcript()
    );
    e2fsck_clean(&image, false);
    assert_eq!(sha256_in_image(&image, "/root/fv-disk"), sum);
}

#[test]
fn tcg_four_nodes_debian_ssh_on_every_host_and_poweroff() {
    let _one = serialize();
    let dir = scratch("system-4");
    let vm = SystemVm::boot(4, "fv-e2e-sys4", &dir, Duration::from_secs(1500));
    check_every_cpu(&vm, 4);
    let (done, image) = vm.poweroff();
    assert_eq!(done.code(), Some(0), "{}", done.transcript());
    assert!(
        done.stderr.contains("all 4 node(s) exited 0"),
        "{}",
        done.transcript()
    );
    e2fsck_clean(&image, false);
}

#[test]
fn tcg_two_nodes_debian_killed_node_leaves_a_consistent_disk() {
    let _one = serialize();
    let dir = scratch("system-crash");
    let mut vm = SystemVm::boot(2, "fv-e2e-crash", &dir, Duration::from_secs(900));
    let sum = first_word(&vm.must(
        "taskset -c 2 dd if=/dev/urandom of=/root/fv-synced bs=1M count=2 status=none && sync && \
         sha256sum /root/fv-synced",
    ));
    let node1 = vm.run.announced_pid("node", 1);
    let killed = Instant::now();
    let st = Command::new("kill")
        .args(["-9", &node1.to_string()])
        .status()
        .expect("kill");
    assert!(st.success());
    let named = vm
        .run
        .wait_line("node 1 failed", Duration::from_secs(10))
        .map(|t| t.saturating_duration_since(killed));
    let image = vm.image.clone();
    let done = vm.run.finish(Duration::from_secs(120));
    let named = named.unwrap_or_else(|| {
        panic!(
            "the origin did not name node 1 within 10 s\n{}",
            done.transcript()
        )
    });
    eprintln!("origin named node 1 after {:.1} s", named.as_secs_f64());
    assert_ne!(done.code(), Some(0), "{}", done.transcript());
    let replayed = e2fsck_clean(&image, true);
    assert_eq!(sha256_in_image(&replayed, "/root/fv-synced"), sum);
}
