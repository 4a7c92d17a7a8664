//! Multi-process coherence tests: real node processes over TCP on this
//! machine, exact results checked. Each test is bounded in time.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use dsm_service::transport::handshake::{self, Expect, Hello, CH_AUTH, CH_HELLO, CH_REJECT};
use dsm_service::TransportSecurity;

const EXE: &str = env!("CARGO_BIN_EXE_fragvisor-dsm");

fn run_cluster(args: &[&str]) -> String {
    let out = Command::new(EXE)
        .arg("run")
        .args(args)
        .output()
        .expect("run fragvisor-dsm");
    let text = format!(
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "fragvisor-dsm run {args:?} failed:\n{text}"
    );
    text
}

#[test]
fn counter_is_exact_with_2_3_and_4_processes() {
    for n in [2u64, 3, 4] {
        let iters = 5000;
        let text = run_cluster(&[
            "--nodes",
            &n.to_string(),
            "--workload",
            "counter",
            "--iters",
            &iters.to_string(),
        ]);
        let want = format!("\"counter\":{},\"expected\":{}", n * iters, n * iters);
        assert_eq!(
            text.matches(&want).count(),
            n as usize,
            "every node must see exactly {}:\n{text}",
            n * iters
        );
    }
}

#[test]
fn message_passing_never_shows_stale_data() {
    for n in [2u64, 3, 4] {
        let rounds = 10_000u64;
        let text = run_cluster(&[
            "--nodes",
            &n.to_string(),
            "--workload",
            "mp",
            "--iters",
            &rounds.to_string(),
        ]);
        // Every reader checked 8 data words in each of the rounds.
        let want = format!("\"words_checked\":{}", rounds * 8);
        assert_eq!(text.matches(&want).count(), (n - 1) as usize, "{text}");
    }
}

#[test]
fn random_reads_and_writes_stay_coherent() {
    for (n, homes) in [
        (2u64, "spread"),
        (3, "spread"),
        (4, "spread"),
        (3, "origin"),
    ] {
        let text = run_cluster(&[
            "--nodes",
            &n.to_string(),
            "--workload",
            "random",
            "--iters",
            "6000",
            "--pages",
            "48",
            "--homes",
            homes,
        ]);
        assert!(
            text.contains(&format!("all {n} nodes agree on the region checksum")),
            "{text}"
        );
    }
}

#[test]
fn cluster_runs_with_one_network_namespace_per_node() {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "this test creates network namespaces and must run as root"
    );
    let text = run_cluster(&[
        "--nodes",
        "3",
        "--workload",
        "random",
        "--iters",
        "3000",
        "--netns",
    ]);
    assert!(text.contains("one network namespace each"), "{text}");
    assert!(
        text.contains("all 3 nodes agree on the region checksum"),
        "{text}"
    );
}

// ----- processes started one by one ------------------------------------------

fn free_addrs(n: usize) -> Vec<SocketAddr> {
    dsm_service::transport::free_loopback_addrs(n).unwrap()
}

struct Cluster {
    addrs: Vec<SocketAddr>,
    key: std::path::PathBuf,
    children: Vec<Child>,
    stdout: Vec<mpsc::Receiver<String>>,
}

impl Cluster {
    fn start(n: usize, key: &[u8], extra: &[&str]) -> Cluster {
        let addrs = free_addrs(n);
        let key_path = std::env::temp_dir().join(format!(
            "fv-test-key-{}-{}",
            std::process::id(),
            addrs[0].port()
        ));
        std::fs::write(&key_path, key).unwrap();
        let list = addrs
            .iter()
            .map(|a| a.to_string())
            .collect::<Vec<_>>()
            .join(",");
        let mut children = Vec::new();
        let mut stdout = Vec::new();
        for k in 0..n {
            let mut c = Command::new(EXE)
                .arg("node")
                .args(["--node-id", &k.to_string(), "--addrs", &list])
                .arg("--key-file")
                .arg(&key_path)
                .args(extra)
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap();
            let out = c.stdout.take().unwrap();
            let (tx, rx) = mpsc::channel();
            std::thread::spawn(move || {
                for l in BufReader::new(out).lines().map_while(Result::ok) {
                    let _ = tx.send(l);
                }
            });
            stdout.push(rx);
            children.push(c);
        }
        Cluster {
            addrs,
            key: key_path,
            children,
            stdout,
        }
    }

    fn wait_line(&self, k: usize, prefix: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.stdout[k].recv_timeout(left) {
                Ok(l) if l.starts_with(prefix) => return,
                Ok(_) => {}
                Err(_) => panic!("node {k} did not print {prefix:?} within {timeout:?}"),
            }
        }
    }

    /// Waits for node `k` to exit, at most `timeout`; returns its output and
    /// how long it took.
    fn wait(&mut self, k: usize, timeout: Duration) -> (Output, Duration) {
        let t0 = Instant::now();
        loop {
            if let Some(status) = self.children[k].try_wait().unwrap() {
                let mut stderr = Vec::new();
                self.children[k]
                    .stderr
                    .take()
                    .unwrap()
                    .read_to_end(&mut stderr)
                    .unwrap();
                let stdout: Vec<u8> = self.stdout[k]
                    .try_iter()
                    .flat_map(|l| (l + "\n").into_bytes())
                    .collect();
                return (
                    Output {
                        status,
                        stdout,
                        stderr,
                    },
                    t0.elapsed(),
                );
            }
            if t0.elapsed() > timeout {
                let _ = self.children[k].kill();
                panic!("node {k} still running after {timeout:?}: it hangs");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn signal(&self, k: usize, sig: i32) {
        // SAFETY: sending a signal to our own child process.
        assert_eq!(unsafe { libc::kill(self.children[k].id() as i32, sig) }, 0);
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::fs::remove_file(&self.key);
    }
}

const KEY: &[u8] = b"test-cluster-key-0123456789abcdef";

fn failure_is_reported(sig: i32, what: &str) {
    let timeout_ms = 2000u64;
    let mut c = Cluster::start(
        3,
        KEY,
        &[
            "--workload",
            "soak",
            "--pages",
            "32",
            "--peer-timeout-ms",
            &timeout_ms.to_string(),
        ],
    );
    for k in 0..3 {
        c.wait_line(k, "SOAK-RUNNING", Duration::from_secs(30));
    }
    std::thread::sleep(Duration::from_millis(300));
    c.signal(2, sig);
    // Detection within the peer timeout, plus slack for a loaded 2-core machine.
    let limit = Duration::from_millis(timeout_ms) + Duration::from_secs(3);
    for k in 0..2 {
        let (out, took) = c.wait(k, limit + Duration::from_secs(5));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success(),
            "node {k} must fail after node 2 {what}: {err}"
        );
        assert!(
            err.contains(&format!("node {k}: error: node 2 failed")),
            "node {k} must name node 2 ({what}): {err}"
        );
        assert!(
            took <= limit,
            "node {k} took {took:?} to notice node 2 {what} (limit {limit:?})"
        );
    }
}

#[test]
fn killed_node_is_named_by_every_survivor() {
    failure_is_reported(libc::SIGKILL, "was killed");
}

#[test]
fn silent_node_is_detected_by_heartbeat_timeout() {
    failure_is_reported(libc::SIGSTOP, "stopped answering");
}

fn raw_frame(s: &mut TcpStream, bytes: &[u8]) -> String {
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let _ = s.write_all(bytes);
    let _ = s.shutdown(std::net::Shutdown::Write);
    let mut reply = Vec::new();
    let _ = s.read_to_end(&mut reply);
    // A Reject frame: len, CH_REJECT, reason.
    if reply.len() > 5 && reply[4] == CH_REJECT {
        return String::from_utf8_lossy(&reply[5..]).into_owned();
    }
    String::new()
}

#[test]
fn bad_input_is_refused_and_the_node_keeps_serving() {
    let mut c = Cluster::start(
        2,
        KEY,
        &[
            "--workload",
            "random",
            "--iters",
            "3000",
            "--pages",
            "32",
            "--pause-ms",
            "4000",
        ],
    );
    let target = c.addrs[0];
    let connect = || TcpStream::connect(target).unwrap();
    // Wait until node 0 listens (the cluster is forming).
    std::thread::sleep(Duration::from_millis(500));

    // Garbage: an HTTP request read as a frame length is far beyond the limit.
    let r = raw_frame(&mut connect(), b"GET / HTTP/1.1\r\nHost: x\r\n\r\n");
    assert!(r.contains("oversized handshake frame"), "garbage: {r:?}");
    // A well-framed hello with the wrong magic.
    let mut junk = vec![56, 0, 0, 0, CH_HELLO];
    junk.extend_from_slice(&[0x42; 55]);
    let r = raw_frame(&mut connect(), &junk);
    assert!(r.contains("not a FragVisor peer"), "bad magic: {r:?}");
    // Oversized length prefix.
    let r = raw_frame(&mut connect(), &[0xff, 0xff, 0xff, 0x7f, CH_HELLO]);
    assert!(
        r.contains("oversized handshake frame: 2147483647 bytes"),
        "oversized: {r:?}"
    );
    // Truncated hello.
    let hello = Hello::new(1, 1, 2, TransportSecurity::Aead).encode();
    let mut cut = ((hello.len() + 1) as u32).to_le_bytes().to_vec();
    cut.push(CH_HELLO);
    cut.extend_from_slice(&hello[..10]);
    let r = raw_frame(&mut connect(), &cut);
    assert!(r.contains("truncated frame"), "truncated: {r:?}");
    // Wrong protocol version.
    let mut v = hello.clone();
    v[8] = 99;
    let mut f = ((v.len() + 1) as u32).to_le_bytes().to_vec();
    f.push(CH_HELLO);
    f.extend_from_slice(&v);
    let r = raw_frame(&mut connect(), &f);
    assert!(
        r.contains("protocol version 99 is not supported"),
        "version: {r:?}"
    );
    // Wrong cluster id.
    let exp = |cluster_id| Expect {
        cluster_id,
        local: 1,
        nodes: 2,
        security: TransportSecurity::Aead,
        // What `fragvisor-dsm node` joins with: its one region of the
        // default 256 pages.
        layout: "ram: ram 1 MiB".into(),
    };
    let e = handshake::dial(&mut connect(), KEY, &exp(77), 0)
        .unwrap_err()
        .to_string();
    assert!(e.contains("cluster id 0x4d does not match"), "cluster: {e}");
    // Wrong key.
    let e = handshake::dial(&mut connect(), b"not-the-cluster-key-at-all!!", &exp(1), 0)
        .unwrap_err()
        .to_string();
    assert!(e.contains("wrong cluster key"), "key: {e}");
    // The right key, but frames in clear against a sealed cluster.
    let clear = Expect {
        security: TransportSecurity::AuthOnly,
        ..exp(1)
    };
    let e = handshake::dial(&mut connect(), KEY, &clear, 0)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("transport security auth-only does not match this node's aead"),
        "security: {e}"
    );
    // The right key but node 1 is already connected.
    let mut s = connect();
    handshake::dial(&mut s, KEY, &exp(1), 0).unwrap();
    let mut rest = Vec::new();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let _ = s.read_to_end(&mut rest);
    assert!(
        rest.len() > 5 && rest[4] == CH_REJECT,
        "duplicate node must be refused"
    );
    assert!(String::from_utf8_lossy(&rest[5..]).contains("node 1 is already connected"));
    let _ = CH_AUTH;
    // The right key and node id, but another VM: refused naming both.
    let other = Expect {
        layout: "ram: ram 2 MiB".into(),
        ..exp(1)
    };
    let e = handshake::dial(&mut connect(), KEY, &other, 0)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains(
            "the nodes' VMs differ: node 1 has \"ram: ram 2 MiB\", node 0 has \"ram: ram 1 MiB\""
        ),
        "layout: {e}"
    );

    // The cluster still runs its workload to a coherent end.
    let (o0, _) = c.wait(0, Duration::from_secs(120));
    let (o1, _) = c.wait(1, Duration::from_secs(120));
    let err0 = String::from_utf8_lossy(&o0.stderr);
    assert!(
        o0.status.success() && o1.status.success(),
        "nodes must finish: {err0}"
    );
    for needle in [
        "oversized handshake frame",
        "not a FragVisor peer",
        "truncated frame",
        "protocol version 99",
        "cluster id 0x4d",
        "wrong cluster key",
        "transport security auth-only does not match",
        "already connected",
    ] {
        assert!(
            err0.contains(needle),
            "node 0 must log the refusal {needle:?}: {err0}"
        );
    }
    let sum = |o: &Output| {
        let s = String::from_utf8_lossy(&o.stdout).into_owned();
        let i = s.find("\"checksum\":\"").expect("checksum") + 12;
        s[i..i + 16].to_string()
    };
    assert_eq!(sum(&o0), sum(&o1), "both nodes must agree on the memory");
}

#[test]
fn wrong_key_node_cannot_join() {
    let addrs = free_addrs(2);
    let list = addrs
        .iter()
        .map(|a| a.to_string())
        .collect::<Vec<_>>()
        .join(",");
    let dir = std::env::temp_dir();
    let k0 = dir.join(format!("fv-k0-{}", std::process::id()));
    let k1 = dir.join(format!("fv-k1-{}", std::process::id()));
    std::fs::write(&k0, "first-cluster-key-000000").unwrap();
    std::fs::write(&k1, "second-cluster-key-11111").unwrap();
    let spawn = |id: &str, key: &std::path::Path| {
        Command::new(EXE)
            .args([
                "node",
                "--node-id",
                id,
                "--addrs",
                &list,
                "--workload",
                "idle",
                "--connect-timeout-ms",
                "8000",
            ])
            .arg("--key-file")
            .arg(key)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let n0 = spawn("0", &k0);
    let n1 = spawn("1", &k1);
    let o1 = n1.wait_with_output().unwrap();
    let e1 = String::from_utf8_lossy(&o1.stderr);
    assert!(!o1.status.success());
    assert!(
        e1.contains("node 1: error") && e1.contains("wrong cluster key"),
        "{e1}"
    );
    let o0 = n0.wait_with_output().unwrap();
    let e0 = String::from_utf8_lossy(&o0.stderr);
    assert!(
        !o0.status.success(),
        "node 0 must not start without its peer"
    );
    assert!(e0.contains("wrong cluster key"), "{e0}");
    assert!(e0.contains("timed out") && e0.contains("[1]"), "{e0}");
    let _ = std::fs::remove_file(k0);
    let _ = std::fs::remove_file(k1);
}

#[test]
fn three_clusters_at_once_stay_coherent_under_load() {
    // Twelve node processes on two cores: threads are descheduled at every
    // awkward moment, which is how lost wake-ups show up.
    let runs: Vec<_> = (0..3)
        .map(|k| {
            std::thread::spawn(move || {
                run_cluster(&[
                    "--nodes",
                    "4",
                    "--workload",
                    "random",
                    "--iters",
                    "15000",
                    "--pages",
                    "32",
                    "--seed",
                    &(k + 11).to_string(),
                    "--timeout-s",
                    "120",
                ])
            })
        })
        .collect();
    for r in runs {
        let text = r.join().expect("cluster thread");
        assert!(
            text.contains("all 4 nodes agree on the region checksum"),
            "{text}"
        );
    }
}
