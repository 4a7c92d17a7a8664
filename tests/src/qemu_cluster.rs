//! A cluster of patched-QEMU node processes on loopback, each with
//! `-accel fragvisor[-tcg],nodes=N,node-id=K,...`, started and watched by
//! the end-to-end tests ([`Cluster`], described by a [`ClusterSpec`]).
//!
//! The clusters run one at a time ([`serialize`]): each node process runs
//! vCPU threads, and this machine has 2 cores.

use std::io::{BufRead, BufReader, Read};
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{channel, Receiver};
use std::sync::{Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

use crate::{artifact_from_script, qemu_binary, test_kernel};

static ONE_CLUSTER_AT_A_TIME: Mutex<()> = Mutex::new(());

pub fn serialize() -> MutexGuard<'static, ()> {
    ONE_CLUSTER_AT_A_TIME
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A scratch directory for this test process.
pub fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("fv-cluster-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("create scratch dir");
    dir
}

/// `count` loopback ports that are free right now.
pub fn free_ports(count: usize) -> Vec<u16> {
    let listeners: Vec<TcpListener> = (0..count)
        .map(|_| TcpListener::bind("127.0.0.1:0").expect("bind a free port"))
        .collect();
    listeners
        .iter()
        .map(|l| l.local_addr().expect("local addr").port())
        .collect()
}

/// One node process, its output streamed line by line.
pub struct Node {
    pub id: usize,
    pub child: Child,
    pub stdout_rx: Receiver<String>,
    pub stdout: Vec<String>,
    pub stderr: thread::JoinHandle<String>,
    pub status: Option<ExitStatus>,
}

/// The outcome of one node.
#[derive(Debug)]
pub struct NodeResult {
    pub id: usize,
    pub status: Option<ExitStatus>,
    pub stdout: String,
    pub stderr: String,
}

impl NodeResult {
    pub fn code(&self) -> Option<i32> {
        self.status.and_then(|s| s.code())
    }
}

pub fn transcript(results: &[NodeResult]) -> String {
    let mut s = String::new();
    for r in results {
        s.push_str(&format!(
            "===== node {} ({:?})\n--- stdout ---\n{}\n--- stderr ---\n{}\n",
            r.id, r.status, r.stdout, r.stderr
        ));
    }
    s
}

/// How the guest of a cluster is booted.
pub enum Guest {
    /// Debian kernel + initramfs, `-append` text.
    Linux(String),
    /// The tiny test kernel, `-append` text.
    TestKernel(String),
}

pub struct ClusterSpec {
    pub engine: &'static str,
    pub nodes: usize,
    pub smp: usize,
    pub mem_mib: usize,
    pub guest: Guest,
    pub no_reboot: bool,
    /// `vcpu-map=`: the host of each vCPU; `None` for contiguous blocks.
    pub vcpu_map: Option<Vec<usize>>,
    /// More QEMU arguments for every node (e.g. `-device edu`).
    pub extra_args: Vec<String>,
    /// Environment of the last node only: the clock test knobs
    /// (`FRAGVISOR_TEST_CLOCK_SKEW_NS`, `FRAGVISOR_TEST_CLOCK_RATE_PPM`)
    /// give it a clock of its own, as on another host.
    pub last_node_env: Vec<(&'static str, String)>,
    /// Appended to every node's `-accel` options (e.g.
    /// `,transport-security=auth-only`).
    pub accel_extra: String,
    /// More QEMU arguments for the last node only (a node started unlike
    /// the others).
    pub last_node_args: Vec<String>,
}

impl ClusterSpec {
    /// The Debian guest under `fragvisor-tcg`, `-smp 4`, 512 MiB, its
    /// command line ending in `workload` (e.g. `fv.workload=all`); the
    /// guest's power-off ends it.
    pub fn linux(nodes: usize, workload: &str) -> ClusterSpec {
        ClusterSpec {
            engine: "fragvisor-tcg",
            nodes,
            smp: 4,
            mem_mib: 512,
            guest: Guest::Linux(linux_append(workload)),
            no_reboot: true,
            vcpu_map: None,
            extra_args: Vec::new(),
            last_node_env: Vec::new(),
            accel_extra: String::new(),
            last_node_args: Vec::new(),
        }
    }

    /// The tiny test kernel under `engine`, one vCPU per node, 128 MiB.
    pub fn test_kernel(engine: &'static str, nodes: usize) -> ClusterSpec {
        ClusterSpec {
            engine,
            smp: nodes,
            mem_mib: 128,
            guest: Guest::TestKernel(String::new()),
            ..ClusterSpec::linux(nodes, "")
        }
    }

    /// The host that runs `cpu`.
    pub fn host_of(&self, cpu: usize) -> usize {
        match &self.vcpu_map {
            Some(map) => map[cpu],
            None => cpu / (self.smp / self.nodes),
        }
    }
}

pub struct Cluster {
    pub nodes: Vec<Node>,
    /// The loopback port of each node, by node id.
    pub ports: Vec<u16>,
    _dir: PathBuf,
}

impl Cluster {
    pub fn start(spec: &ClusterSpec) -> Cluster {
        let dir = scratch(&format!("{}-{}", spec.engine, spec.nodes));
        let key = dir.join("key");
        std::fs::write(&key, "aggregate-e2e-test-cluster-key-0123456789\n").expect("write key");
        let ports = free_ports(spec.nodes);
        let peers: Vec<String> = ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
        let peers = peers.join(";");
        let qemu = qemu_binary();

        let mut guest_args: Vec<String> = Vec::new();
        match &spec.guest {
            Guest::Linux(append) => {
                let kernel =
                    artifact_from_script("FRAGVISOR_GUEST_KERNEL", "guest-kernel/fetch-kernel.sh");
                let initrd =
                    artifact_from_script("FRAGVISOR_INITRAMFS", "guest-kernel/build-initramfs.sh");
                guest_args.extend([
                    "-kernel".into(),
                    kernel.display().to_string(),
                    "-initrd".into(),
                    initrd.display().to_string(),
                    "-append".into(),
                    append.clone(),
                ]);
            }
            Guest::TestKernel(append) => {
                let elf = test_kernel(&dir);
                guest_args.extend([
                    "-kernel".into(),
                    elf.display().to_string(),
                    "-append".into(),
                    append.clone(),
                    "-device".into(),
                    "isa-debug-exit,iobase=0xf4,iosize=0x04".into(),
                ]);
            }
        }

        // One guest NUMA node per host: node k's vCPUs and memory on host k.
        let node_mem = spec.mem_mib / spec.nodes;
        let mut numa: Vec<String> = Vec::new();
        if matches!(spec.guest, Guest::Linux(_)) {
            for k in 0..spec.nodes {
                let cpus: String = (0..spec.smp)
                    .filter(|&c| spec.host_of(c) == k)
                    .map(|c| format!(",cpus={c}"))
                    .collect();
                numa.extend([
                    "-object".into(),
                    format!("memory-backend-ram,id=m{k},size={node_mem}M"),
                    "-numa".into(),
                    format!("node,nodeid={k}{cpus},memdev=m{k}"),
                ]);
            }
        }
        let map_opt = spec.vcpu_map.as_ref().map_or(String::new(), |m| {
            let m: Vec<String> = m.iter().map(usize::to_string).collect();
            format!(",vcpu-map={}", m.join(";"))
        });

        let mut nodes = Vec::new();
        // Start the non-origin nodes first; all of them wait for each other.
        for k in (0..spec.nodes).rev() {
            let accel = format!(
                "{},nodes={},node-id={k},peers={peers},key-file={}{map_opt}{}",
                spec.engine,
                spec.nodes,
                key.display(),
                spec.accel_extra
            );
            let mut cmd = Command::new(&qemu);
            cmd.args([
                "-machine",
                "q35,smm=off",
                "-accel",
                &accel,
                "-smp",
                &format!("{},sockets={}", spec.smp, spec.nodes),
                "-m",
                &spec.mem_mib.to_string(),
                "-nodefaults",
                "-display",
                "none",
                // Only the origin's serial port is live; the others are idle copies.
                "-serial",
                if k == 0 { "stdio" } else { "null" },
            ]);
            if spec.no_reboot {
                cmd.arg("-no-reboot");
            }
            cmd.args(&numa).args(&guest_args).args(&spec.extra_args);
            if k == spec.nodes - 1 {
                cmd.envs(spec.last_node_env.iter().map(|(k, v)| (k, v)));
                cmd.args(&spec.last_node_args);
            }
            cmd.stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped());
            let mut child = cmd
                .spawn()
                .unwrap_or_else(|e| panic!("cannot start {}: {e}", qemu.display()));
            let (tx, rx) = channel();
            let out = child.stdout.take().expect("piped stdout");
            thread::spawn(move || {
                for line in BufReader::new(out).lines() {
                    let Ok(line) = line else { break };
                    if tx.send(line.trim_end_matches('\r').to_string()).is_err() {
                        break;
                    }
                }
            });
            let mut err = child.stderr.take().expect("piped stderr");
            let stderr = thread::spawn(move || {
                let mut buf = Vec::new();
                let _ = err.read_to_end(&mut buf);
                String::from_utf8_lossy(&buf).into_owned()
            });
            nodes.push(Node {
                id: k,
                child,
                stdout_rx: rx,
                stdout: Vec::new(),
                stderr,
                status: None,
            });
        }
        nodes.sort_by_key(|n| n.id);
        Cluster {
            nodes,
            ports,
            _dir: dir,
        }
    }

    pub fn pump(&mut self) {
        for n in &mut self.nodes {
            while let Ok(line) = n.stdout_rx.try_recv() {
                n.stdout.push(line);
            }
            if n.status.is_none() {
                n.status = n.child.try_wait().expect("wait for a node");
            }
        }
    }

    /// Waits until the origin printed a line containing `needle` (checks
    /// at least once, so a zero timeout asks whether it has already).
    pub fn wait_origin_line(&mut self, needle: &str, timeout: Duration) -> bool {
        let start = Instant::now();
        loop {
            self.pump();
            if self.nodes[0].stdout.iter().any(|l| l.contains(needle)) {
                return true;
            }
            if self.nodes.iter().all(|n| n.status.is_some()) || start.elapsed() >= timeout {
                return false;
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits for `node` to exit (true) or the timeout (false).
    pub fn wait_node(&mut self, node: usize, timeout: Duration) -> bool {
        let start = Instant::now();
        while start.elapsed() < timeout {
            self.pump();
            if self.nodes[node].status.is_some() {
                return true;
            }
            thread::sleep(Duration::from_millis(50));
        }
        false
    }

    /// Sends `sig` to `node` (`SIGSTOP`, `SIGCONT`, ...).
    pub fn signal(&self, node: usize, sig: i32) {
        let pid = self.nodes[node].child.id() as libc::pid_t;
        // SAFETY: a signal to our own child, which has not been reaped.
        assert_eq!(unsafe { libc::kill(pid, sig) }, 0, "signal node {node}");
    }

    /// The process id of `node`.
    pub fn pid(&self, node: usize) -> u32 {
        self.nodes[node].child.id()
    }

    pub fn kill9(&mut self, node: usize) {
        let _ = self.nodes[node].child.kill();
        let _ = self.nodes[node].child.wait();
    }

    /// Waits for every node (killing those still running at the timeout)
    /// and returns what each printed.
    pub fn finish(mut self, timeout: Duration) -> Vec<NodeResult> {
        let start = Instant::now();
        loop {
            self.pump();
            if self.nodes.iter().all(|n| n.status.is_some()) || start.elapsed() >= timeout {
                break;
            }
            thread::sleep(Duration::from_millis(100));
        }
        let mut results = Vec::new();
        for mut n in self.nodes.drain(..) {
            if n.status.is_none() {
                let _ = n.child.kill();
                let _ = n.child.wait();
            }
            while let Ok(line) = n.stdout_rx.recv_timeout(Duration::from_millis(200)) {
                n.stdout.push(line);
            }
            results.push(NodeResult {
                id: n.id,
                status: n.status,
                stdout: n.stdout.join("\n"),
                stderr: n.stderr.join().unwrap_or_default(),
            });
        }
        results
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for n in &mut self.nodes {
            let _ = n.child.kill();
            let _ = n.child.wait();
        }
    }
}

pub fn linux_append(workload: &str) -> String {
    format!("console=ttyS0 clocksource=tsc tsc=reliable panic=-1 {workload}")
}
