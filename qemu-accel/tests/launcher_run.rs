//! `fragvisor run` process management, for real, with a stand-in for QEMU
//! (tests/fixtures/fake-node.sh): console streaming, exit status, naming the
//! node that failed first, stopping the others within the stop timeout,
//! signal forwarding, the per-run key file, network namespaces.

use std::io::{BufRead, BufReader, Read};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

const FAKE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/fake-node.sh");

fn launcher(nodes: u32, append: &str, extra: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_fragvisor"));
    c.args([
        "run",
        "--qemu",
        FAKE,
        "--kernel",
        FAKE,
        "--engine",
        "fragvisor-tcg",
    ])
    .args(["--nodes", &nodes.to_string(), "--append", append])
    .args(extra)
    .env_remove("FRAGVISOR_QEMU")
    .stdin(Stdio::null())
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    c
}

struct Run {
    code: i32,
    stdout: String,
    stderr: String,
    elapsed: Duration,
}

impl Run {
    fn show(&self) -> String {
        format!(
            "exit {} after {:.2} s\n--- stdout ---\n{}--- stderr ---\n{}",
            self.code,
            self.elapsed.as_secs_f64(),
            self.stdout,
            self.stderr
        )
    }
}

fn drain(mut r: impl Read + Send + 'static) -> thread::JoinHandle<String> {
    thread::spawn(move || {
        let mut s = String::new();
        let _ = r.read_to_string(&mut s);
        s
    })
}

/// Wait for the launcher with a hard limit, so a broken launcher fails the
/// test instead of hanging it.
fn finish(mut child: Child, start: Instant) -> Run {
    let out = child.stdout.take().map(drain);
    let err = child.stderr.take().map(drain);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if start.elapsed() > Duration::from_secs(30) {
            let _ = child.kill();
            panic!("the launcher did not finish in 30 s");
        }
        thread::sleep(Duration::from_millis(10));
    };
    let elapsed = start.elapsed();
    Run {
        code: status.code().unwrap_or(-1),
        stdout: out.map(|h| h.join().unwrap()).unwrap_or_default(),
        stderr: err.map(|h| h.join().unwrap()).unwrap_or_default(),
        elapsed,
    }
}

fn run(nodes: u32, append: &str, extra: &[&str]) -> Run {
    let start = Instant::now();
    finish(launcher(nodes, append, extra).spawn().unwrap(), start)
}

#[test]
fn clean_exit_streams_the_origin_console_and_exits_0() {
    let r = run(2, "fake0=exit:0 fake1=exit:0", &[]);
    assert_eq!(r.code, 0, "{}", r.show());
    assert_eq!(
        r.stdout,
        "FAKE: console line 1\nFAKE: console line 2\nFAKE: node 0 exiting 0\n",
        "stdout is exactly the origin's console\n{}",
        r.show()
    );
    assert!(
        r.stderr.contains("[node 1] fake node 1: started"),
        "{}",
        r.show()
    );
    assert!(
        r.stderr.contains("[node 0] fake node 0: exiting 0"),
        "{}",
        r.show()
    );
    assert!(r.stderr.contains("all 2 node(s) exited 0"), "{}", r.show());
    assert!(
        !r.stdout.contains("node 1"),
        "only the origin's console on stdout"
    );
}

#[test]
fn generated_key_is_private_shared_and_removed() {
    let r = run(3, "", &["--smp", "3"]);
    assert_eq!(r.code, 0, "{}", r.show());
    let keys: Vec<&str> = r
        .stderr
        .lines()
        .filter_map(|l| l.split_once(": key-file=").map(|(_, k)| k))
        .collect();
    assert_eq!(keys.len(), 3, "{}", r.show());
    assert!(keys.iter().all(|k| *k == keys[0]), "one key for all nodes");
    let (path, mode) = keys[0].split_once(" mode=").unwrap();
    assert_eq!(mode, "600");
    assert!(
        !std::path::Path::new(path).exists(),
        "{path} must be removed"
    );
}

#[test]
fn single_node_gets_no_key() {
    let r = run(1, "", &[]);
    assert_eq!(r.code, 0, "{}", r.show());
    assert!(!r.stderr.contains("key-file="), "{}", r.show());
}

#[test]
fn failing_node_is_named_and_the_others_are_stopped() {
    let r = run(
        3,
        "fake0=sleep fake1=sleep fake2=after:0.5:exit:3",
        &["--smp", "3", "--stop-timeout", "2"],
    );
    assert_eq!(r.code, 3, "the failed node's status\n{}", r.show());
    assert!(
        r.stderr
            .contains("fragvisor: node 2 failed first: exit status 3"),
        "{}",
        r.show()
    );
    for k in 0..2 {
        assert!(
            r.stderr
                .contains(&format!("[node {k}] fake node {k}: terminating on signal")),
            "node {k} stopped by SIGTERM\n{}",
            r.show()
        );
    }
    assert!(r.elapsed < Duration::from_secs(4), "{}", r.show());
}

#[test]
fn node_killed_by_a_signal_is_named() {
    let r = run(
        2,
        "fake0=sleep fake1=after:0.3:kill",
        &["--stop-timeout", "2"],
    );
    assert_eq!(r.code, 128 + 9, "{}", r.show());
    assert!(
        r.stderr
            .contains("fragvisor: node 1 failed first: killed by signal 9 (SIGKILL)"),
        "{}",
        r.show()
    );
    assert!(r.elapsed < Duration::from_secs(4), "{}", r.show());
}

#[test]
fn origin_exit_status_is_the_vm_status() {
    let r = run(2, "fake0=exit:33 fake1=sleep", &["--stop-timeout", "2"]);
    assert_eq!(r.code, 33, "{}", r.show());
    assert!(
        r.stderr
            .contains("fragvisor: node 0 (origin) failed first: exit status 33"),
        "{}",
        r.show()
    );
}

#[test]
fn stubborn_node_is_killed_at_the_stop_timeout() {
    let r = run(
        2,
        "fake0=stubborn fake1=after:0.3:exit:4",
        &["--stop-timeout", "2"],
    );
    assert_eq!(r.code, 4, "{}", r.show());
    assert!(
        r.stderr.contains(
            "node 1 failed first: exit status 4; node(s) 0 did not stop within 2.0 s and were killed"
        ),
        "{}",
        r.show()
    );
    assert!(
        r.elapsed >= Duration::from_secs(2) && r.elapsed < Duration::from_millis(4500),
        "{}",
        r.show()
    );
}

#[test]
fn clean_exit_with_a_node_that_does_not_follow_is_a_failure() {
    let r = run(2, "fake0=exit:0 fake1=stubborn", &["--stop-timeout", "1"]);
    assert_eq!(r.code, 1, "{}", r.show());
    assert!(
        r.stderr.contains(
            "node 0 (origin) exited 0 but the others did not follow; node(s) 1 did not stop within 1.0 s"
        ),
        "{}",
        r.show()
    );
}

#[test]
fn overall_timeout_stops_the_vm() {
    let r = run(2, "fake0=sleep fake1=sleep", &["--timeout", "1"]);
    assert_eq!(r.code, 124, "{}", r.show());
    assert!(r.stderr.contains("ran past its timeout"), "{}", r.show());
    assert!(r.elapsed < Duration::from_secs(4), "{}", r.show());
}

/// Console output arrives while the VM runs; SIGINT/SIGTERM to the
/// launcher reach every node and the launcher exits 128+signal.
fn interrupt(sig: i32, name: &str) {
    let start = Instant::now();
    let mut child = launcher(2, "fake0=sleep fake1=sleep", &[]).spawn().unwrap();
    let out = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    let reader = thread::spawn(move || {
        let mut rest = String::new();
        for line in BufReader::new(out).lines() {
            let line = line.unwrap();
            let _ = tx.send(line.clone());
            rest.push_str(&line);
            rest.push('\n');
        }
        rest
    });
    let first = rx
        .recv_timeout(Duration::from_secs(10))
        .expect("console line while the VM runs");
    assert_eq!(first, "FAKE: console line 1");
    assert_eq!(
        rx.recv_timeout(Duration::from_secs(10)).unwrap(),
        "FAKE: console line 2"
    );
    assert!(child.try_wait().unwrap().is_none(), "still running");
    let pid = libc::pid_t::try_from(child.id()).unwrap();
    // SAFETY: kill has no memory-safety preconditions; `child` is not yet
    // reaped, so the pid is still the launcher's.
    assert_eq!(unsafe { libc::kill(pid, sig) }, 0);
    let mut r = finish(child, start);
    r.stdout = reader.join().unwrap();
    assert_eq!(r.code, 128 + sig, "{}", r.show());
    assert!(
        r.stderr.contains(&format!(
            "fragvisor: interrupted by {name}; stopped all nodes"
        )),
        "{}",
        r.show()
    );
    for k in 0..2 {
        assert!(
            r.stderr
                .contains(&format!("[node {k}] fake node {k}: terminating on signal")),
            "{}",
            r.show()
        );
    }
}

#[test]
fn sigint_is_forwarded_to_every_node() {
    interrupt(libc::SIGINT, "SIGINT");
}

#[test]
fn sigterm_is_forwarded_to_every_node() {
    interrupt(libc::SIGTERM, "SIGTERM");
}

#[test]
fn host_cpus_confine_each_node() {
    let cpus = |r: &Run, k: u32| -> String {
        let tag = format!("[node {k}] fake node {k}: cpus=");
        let line = r.stderr.lines().find(|l| l.starts_with(&tag));
        line.map(|l| l[tag.len()..].to_string())
            .unwrap_or_else(|| panic!("no cpus line for node {k}\n{}", r.show()))
    };
    let r = run(2, "", &["--host-cpus", "0"]);
    assert_eq!(r.code, 0, "{}", r.show());
    assert_eq!((cpus(&r, 0), cpus(&r, 1)), ("0".into(), "0".into()));
    let last = std::thread::available_parallelism().map_or(1, |n| n.get()) - 1;
    if last > 0 {
        let r = run(2, "", &["--host-cpus", &format!("0/{last}")]);
        assert_eq!(r.code, 0, "{}", r.show());
        assert_eq!((cpus(&r, 0), cpus(&r, 1)), ("0".into(), last.to_string()));
    }
    let r = run(2, "", &["--host-cpus", "0/1/0"]);
    assert_eq!(r.code, 2, "{}", r.show());
    assert!(
        r.stderr.contains("host-cpus=0/1/0: 3 lists for 2 nodes"),
        "{}",
        r.show()
    );
    let r = run(2, "", &["--host-cpus", "4096"]);
    assert_ne!(r.code, 0, "{}", r.show());
    assert!(r.stderr.contains("host-cpus=4096"), "{}", r.show());
}

#[test]
fn one_network_namespace_per_node() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: network namespaces need root");
        return;
    }
    if Command::new("ip").arg("-V").output().is_err() {
        eprintln!("skipped: no ip (iproute2)");
        return;
    }
    let r = run(2, "", &["--netns"]);
    assert_eq!(r.code, 0, "{}", r.show());
    assert!(
        r.stderr.contains("one network namespace per node"),
        "{}",
        r.show()
    );
    let ns: Vec<String> = (0..2)
        .map(|k| {
            let tag = format!("[node {k}] fake node {k}: netns=");
            let line = r.stderr.lines().find(|l| l.starts_with(&tag));
            let name = line.map(|l| l[tag.len()..].to_string());
            name.unwrap_or_else(|| panic!("no namespace for node {k}\n{}", r.show()))
        })
        .collect();
    assert!(
        ns[0].starts_with("fvl") && ns[0].ends_with("n0"),
        "{}",
        r.show()
    );
    assert!(
        ns[1].starts_with("fvl") && ns[1].ends_with("n1"),
        "{}",
        r.show()
    );
    let left = Command::new("ip").args(["netns", "list"]).output().unwrap();
    let left = String::from_utf8_lossy(&left.stdout);
    assert!(!left.contains(&ns[0]), "namespaces removed: {left}");
}
