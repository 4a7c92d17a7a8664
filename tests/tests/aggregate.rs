//! Aggregate VMs: one guest across several QEMU processes ("hosts") on
//! loopback, each with `-accel fragvisor[-tcg],nodes=N,node-id=K,...`.
//!
//! - TCG engine, Debian kernel + busybox initramfs, q35, `-smp 4`, one
//!   guest NUMA node per host, 2 and 4 nodes: every CPU online with the
//!   NUMA node of its host, a workload pinned to each CPU, a shared
//!   atomic counter across hosts, power-off with every node exiting 0, and
//!   each node's summary naming its own vCPUs.
//! - `reboot -f` in a 2-node VM boots the guest again on the same nodes.
//! - `kill -9` of a non-origin node: the origin stops within 10 s with an
//!   error naming it.
//! - KVM engine: the tiny test kernel with 2 vCPUs on 2 nodes (AP started
//!   by SIPI across hosts, IPIs both ways, port I/O of the node-1 vCPU
//!   printed by the origin's serial port).
//!
//! The clusters (`fragvisor_e2e::qemu_cluster`) run one at a time: each
//! node process runs vCPU threads, and this machine has 2 cores.

use std::thread;
use std::time::{Duration, Instant};

use fragvisor_e2e::qemu_cluster::{serialize, transcript, Cluster, ClusterSpec, Guest, NodeResult};

/// The summary line of node `r`.
fn summary_line(r: &NodeResult) -> &str {
    let prefix = format!("fragvisor: node {} summary:", r.id);
    r.stderr
        .lines()
        .chain(r.stdout.lines())
        .find(|l| l.starts_with(&prefix))
        .unwrap_or_else(|| panic!("node {} printed no summary line", r.id))
}

/// The number `name=N` of node `r`'s summary line.
fn summary_number(r: &NodeResult, name: &str) -> i64 {
    let line = summary_line(r);
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(name)?.strip_prefix('='))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {name}=N in {line}"))
}

/// The count of each vCPU node `r` ran, from its summary line.
fn summary_counts(r: &NodeResult) -> Vec<(u32, u64)> {
    let line = summary_line(r);
    let list = line
        .split("vcpus=[")
        .nth(1)
        .and_then(|s| s.split(']').next())
        .unwrap_or_else(|| panic!("no vcpus=[...] in {line}"));
    list.split(',')
        .filter(|s| !s.is_empty())
        .map(|s| {
            let (cpu, count) = s
                .trim_start_matches("cpu")
                .split_once(':')
                .unwrap_or_else(|| panic!("bad vCPU entry {s} in {line}"));
            (cpu.parse().expect("cpu"), count.parse().expect("count"))
        })
        .collect()
}

/// Runs a test-kernel cluster to its end: every node exits with the
/// isa-debug-exit status (0x10 << 1) | 1 = 33, the test kernel's PASS and
/// the VM's status on every node, and the origin's console says
/// `FVTEST: PASS`. Returns the results and their transcript.
fn run_test_kernel_cluster(spec: &ClusterSpec, timeout: Duration) -> (Vec<NodeResult>, String) {
    let results = Cluster::start(spec).finish(timeout);
    let all = transcript(&results);
    for r in &results {
        assert_eq!(r.code(), Some(33), "node {} exit status\n{all}", r.id);
    }
    assert!(results[0].stdout.contains("FVTEST: PASS"), "{all}");
    (results, all)
}

fn linux_cluster_runs_workloads(nodes: usize, vcpu_map: Option<Vec<usize>>) {
    let _one = serialize();
    let spec = ClusterSpec {
        vcpu_map,
        ..ClusterSpec::linux(nodes, "fv.workload=all")
    };
    let results = Cluster::start(&spec).finish(Duration::from_secs(420));
    let all = transcript(&results);
    for r in &results {
        assert_eq!(r.code(), Some(0), "node {} did not exit 0\n{all}", r.id);
    }
    let console = &results[0].stdout;
    for needle in [
        "FV: cpus online=0-3 count=4",
        "FV: RESULT PASS",
        "FV: poweroff",
    ] {
        assert!(console.contains(needle), "console lacks {needle:?}\n{all}");
    }
    for cpu in 0..4 {
        let host = spec.host_of(cpu);
        let want = format!("FV: cpu {cpu} node {host}");
        assert!(console.lines().any(|l| l == want), "no {want:?}\n{all}");
        let line = console
            .lines()
            .find(|l| l.starts_with(&format!("FV: percpu cpu={cpu} ")))
            .unwrap_or_else(|| panic!("no percpu result for cpu {cpu}\n{all}"));
        assert!(line.ends_with(" ok"), "cpu {cpu}: {line}\n{all}");
    }
    let counter = console
        .lines()
        .find(|l| l.starts_with("FV: counter threads=4 "))
        .unwrap_or_else(|| panic!("no counter result\n{all}"));
    assert!(counter.ends_with(" ok"), "{counter}\n{all}");
    for r in &results {
        let counts = summary_counts(r);
        let mine: Vec<u32> = (0..4u32)
            .filter(|&c| spec.host_of(c as usize) == r.id)
            .collect();
        let ran: Vec<u32> = counts.iter().map(|(c, _)| *c).collect();
        assert_eq!(ran, mine, "node {} summary vCPUs\n{all}", r.id);
        for (cpu, n) in counts {
            assert!(n > 0, "node {} ran vCPU {cpu} zero times\n{all}", r.id);
        }
    }
}

#[test]
fn tcg_two_nodes_numa_workloads_and_poweroff() {
    linux_cluster_runs_workloads(2, None);
}

#[test]
fn tcg_four_nodes_numa_workloads_and_poweroff() {
    linux_cluster_runs_workloads(4, None);
}

#[test]
fn tcg_two_nodes_explicit_vcpu_map() {
    // vCPUs 0 and 2 on the origin, 1 and 3 on node 1 (not contiguous).
    linux_cluster_runs_workloads(2, Some(vec![0, 1, 0, 1]));
}

#[test]
fn tcg_two_nodes_reboot_boots_again() {
    let _one = serialize();
    let spec = ClusterSpec {
        no_reboot: false,
        ..ClusterSpec::linux(2, "fv.workload=reboot")
    };
    let results = Cluster::start(&spec).finish(Duration::from_secs(420));
    let all = transcript(&results);
    for r in &results {
        assert_eq!(r.code(), Some(0), "node {} did not exit 0\n{all}", r.id);
    }
    let console = &results[0].stdout;
    let boots = console
        .lines()
        .filter(|l| l.starts_with("FV: boot "))
        .count();
    assert_eq!(boots, 2, "expected two boots\n{all}");
    assert_eq!(
        console
            .lines()
            .filter(|l| l.starts_with("FV: cpus online=0-3 count=4"))
            .count(),
        2,
        "every CPU online in both boots\n{all}"
    );
    assert!(
        console.contains("FV: reboot-test done boots=2") && console.contains("FV: RESULT PASS"),
        "{all}"
    );
}

#[test]
fn tcg_killed_node_stops_the_origin_naming_it() {
    let _one = serialize();
    let spec = ClusterSpec::linux(2, "fv.workload=counter fv.iters=1000000000");
    let mut cluster = Cluster::start(&spec);
    let started = cluster.wait_origin_line("FV: workload counter start", Duration::from_secs(300));
    if !started {
        let all = transcript(&cluster.finish(Duration::from_secs(1)));
        panic!("the guest never started its workload\n{all}");
    }
    thread::sleep(Duration::from_secs(2));
    cluster.kill9(1);
    let killed = Instant::now();
    let stopped = cluster.wait_node(0, Duration::from_secs(10));
    let elapsed = killed.elapsed();
    let results = cluster.finish(Duration::from_secs(1));
    let all = transcript(&results);
    assert!(
        stopped,
        "the origin still ran 10 s after node 1 died\n{all}"
    );
    assert_ne!(results[0].code(), Some(0), "the origin exited 0\n{all}");
    assert!(
        results[0].stderr.contains("node 1 failed"),
        "the origin's error does not name node 1\n{all}"
    );
    eprintln!(
        "origin stopped {:.1} s after kill -9 of node 1",
        elapsed.as_secs_f64()
    );
}

#[test]
fn kvm_two_nodes_test_kernel_sipi_ipis_and_remote_port_io() {
    let _one = serialize();
    let spec = ClusterSpec::test_kernel("fragvisor", 2);
    let (results, all) = run_test_kernel_cluster(&spec, Duration::from_secs(240));
    let console = &results[0].stdout;
    for needle in [
        "FVTEST: cpu 0 online apic=0 (bsp)",
        // printed with port I/O by the vCPU that runs on node 1
        "FVTEST: cpu 1 online apic=1",
        "FVTEST: all 2 cpus online",
        "FVTEST: ipi bsp->1 ok",
        "FVTEST: ipi 1->bsp ok",
        "FVTEST: counter=",
    ] {
        assert!(console.contains(needle), "console lacks {needle:?}\n{all}");
    }
    assert!(!console.contains("FVTEST: FAIL"), "{all}");
    // One clock: the TSC skew between vCPU 0 (node 0) and vCPU 1 (node 1),
    // bounded by a ping-pong in the guest, contains 0.
    let (lo, hi, rtt) = fragvisor_e2e::fvtest_tsc_skew(console, "tsc", 1)
        .unwrap_or_else(|| panic!("no TSC skew line\n{all}"));
    assert!(
        lo <= 0 && 0 <= hi,
        "cross-host TSC skew [{lo}, {hi}] excludes 0\n{all}"
    );
    eprintln!("guest TSC skew cpu0 (node 0) vs cpu1 (node 1): [{lo}, {hi}] cycles, ping-pong {rtt} cycles");
    // Node 1 aligned its clock to node 0's and said how well.
    assert!(
        results[1]
            .stderr
            .contains("fragvisor: node 1 guest clock aligned to node 0"),
        "{all}"
    );
    let n1 = summary_counts(&results[1]);
    assert_eq!(n1.len(), 1, "node 1 runs vCPU 1 only\n{all}");
    assert_eq!(n1[0].0, 1, "{all}");
    assert!(n1[0].1 > 0, "node 1 never ran vCPU 1\n{all}");
}

/// `fragvisor-tcg`, the test kernel on 2 nodes whose clocks differ by 50 ms
/// (node 1's monotonic clock is shifted): node 1 measures the difference
/// against node 0 and the guest still sees one TSC across the hosts. The
/// AP on node 1 also makes 16-byte MMIO accesses (SSE) to the `edu` device,
/// which lives on the origin: its store and load must reach it there.
#[test]
fn tcg_two_nodes_one_clock_and_wide_mmio() {
    let _one = serialize();
    let skew_ns: i64 = 50_000_000;
    let spec = ClusterSpec {
        extra_args: vec!["-device".into(), "edu".into()],
        last_node_env: vec![("FRAGVISOR_TEST_CLOCK_SKEW_NS", skew_ns.to_string())],
        ..ClusterSpec::test_kernel("fragvisor-tcg", 2)
    };
    let (results, all) = run_test_kernel_cluster(&spec, Duration::from_secs(240));
    let console = &results[0].stdout;
    assert!(console.contains("FVTEST: mmio16 cpu 1 ok"), "{all}");
    // Node 1 found its clock 50 ms ahead of node 0's.
    let line = results[1]
        .stderr
        .lines()
        .find(|l| l.starts_with("fragvisor: node 1 guest clock aligned to node 0"))
        .unwrap_or_else(|| panic!("node 1 reported no clock alignment\n{all}"));
    let after = line.split("monotonic delta ").nth(1).expect("delta");
    let delta: i64 = after.split(' ').next().unwrap().parse().expect("delta ns");
    let bound: i64 = after
        .split("(±")
        .nth(1)
        .and_then(|b| b.split(' ').next())
        .and_then(|b| b.parse().ok())
        .expect("bound ns");
    assert!(
        (delta + skew_ns).abs() <= bound,
        "measured delta {delta} ns ± {bound}, real -{skew_ns}\n{all}"
    );
    // The guest's TSC (1 GHz under TCG) is one clock: the skew between
    // vCPU 0 on node 0 and vCPU 1 on node 1 contains 0, not 50 ms.
    let (lo, hi, rtt) = fragvisor_e2e::fvtest_tsc_skew(console, "tsc", 1)
        .unwrap_or_else(|| panic!("no TSC line\n{all}"));
    assert!(
        lo <= 0 && 0 <= hi,
        "cross-host TSC skew [{lo}, {hi}] ns excludes 0\n{all}"
    );
    eprintln!("TCG guest TSC skew node 0 vs node 1 (host clocks 50 ms apart): [{lo}, {hi}] ns, ping-pong {rtt} ns");
}

/// `fragvisor-tcg`, the test kernel on 2 nodes, node 1's monotonic clock
/// running 300 ppm fast (`FRAGVISOR_TEST_CLOCK_RATE_PPM`): left alone, the
/// hosts' clocks would be 2.4 ms apart after the 8 s the guest waits
/// (`tsclater=8`). Node 1 measures its drift against the origin every
/// second and steers its guest clock, so the guest's second skew
/// measurement still holds 0, and node 1 reports the drift it measured.
#[test]
fn tcg_two_nodes_clock_drift_is_steered_out() {
    let _one = serialize();
    let ppm: i64 = 300;
    let spec = ClusterSpec {
        guest: Guest::TestKernel("tsclater=8".into()),
        last_node_env: vec![("FRAGVISOR_TEST_CLOCK_RATE_PPM", ppm.to_string())],
        ..ClusterSpec::test_kernel("fragvisor-tcg", 2)
    };
    let (results, all) = run_test_kernel_cluster(&spec, Duration::from_secs(240));
    let console = &results[0].stdout;
    let (lo, hi, rtt) = fragvisor_e2e::fvtest_tsc_skew(console, "tsc later", 1)
        .unwrap_or_else(|| panic!("no later TSC line\n{all}"));
    assert!(
        lo <= 0 && 0 <= hi,
        "cross-host TSC skew [{lo}, {hi}] ns, 8 s on, excludes 0\n{all}"
    );
    // The origin's clock loses 300 µs a second against node 1's.
    let rate = summary_number(&results[1], "clock_rate_ppb");
    assert!(
        (rate + ppm * 1000).abs() <= 30_000,
        "node 1 measured a drift of {rate} ppb, real -{ppm} ppm\n{all}"
    );
    let resyncs = summary_number(&results[1], "clock_resyncs");
    assert!(
        resyncs >= 5,
        "node 1 steered its clock {resyncs} times\n{all}"
    );
    let first = fragvisor_e2e::fvtest_tsc_skew(console, "tsc", 1);
    eprintln!(
        "TCG guest TSC skew node 0 vs node 1 (node 1's clock {ppm} ppm fast): at start {first:?}, \
         8 s later [{lo}, {hi}] ns (ping-pong {rtt} ns); node 1 measured {rate} ppb in {resyncs} steps"
    );
}

/// `fragvisor-tcg`, the test kernel with 4 vCPUs on 2 nodes (CPUs 0 and 1
/// on node 0, 2 and 3 on node 1), `smc=2000`: the BSP rewrites a tiny
/// function 2000 times while CPU 1, on the same host, calls it without
/// pause and CPU 2, on the other host, keeps reading its page. Each
/// rewrite waits for the DSM to bring the page back; CPU 1 must never keep
/// running the old code after it serializes.
///
/// A known bug, reproduced here (docs/aggregate-vm.md, "Not done yet"):
/// CPU 1 translates the old bytes between QEMU dropping the page's code and
/// the BSP's store landing (a race of QEMU's multi-threaded TCG, which a
/// store waiting for the DSM widens), and that translation outlives the
/// store. It fails within the first few hundred rounds; run it with
/// `--ignored`.
#[test]
#[ignore = "known bug: stale translated code after a same-host rewrite (QEMU MTTCG race)"]
fn tcg_cross_modifying_code_is_never_stale() {
    let _one = serialize();
    let spec = ClusterSpec {
        smp: 4,
        guest: Guest::TestKernel("smc=2000".into()),
        ..ClusterSpec::test_kernel("fragvisor-tcg", 2)
    };
    let (results, all) = run_test_kernel_cluster(&spec, Duration::from_secs(300));
    assert!(
        results[0].stdout.contains("FVTEST: smc rounds=2000 ok"),
        "no smc line\n{all}"
    );
}
