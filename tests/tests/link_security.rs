//! The cluster link on the wire. A 2-node Linux guest (TCG, busybox
//! initramfs) writes a marker text over and over into 16 pages from a vCPU
//! on node 1 and reads it back on the origin's vCPU 0, so the pages cross
//! the link each round; `tcpdump` captures the nodes' loopback traffic
//! meanwhile. With `transport-security=aead` (the default) the marker is
//! nowhere in the capture; with `auth-only` it is (and each node warns at
//! start).

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use fragvisor_e2e::qemu_cluster::{scratch, serialize, transcript, Cluster, ClusterSpec};

const ROUNDS: u64 = 8;
const PAGES: u64 = 16;

/// A seed no earlier run used: the marker is "FVMARK" + the seed reversed.
fn seed() -> String {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock after 1970")
        .as_nanos() as u64;
    format!("{:016x}", t ^ (u64::from(std::process::id()) << 40))
}

/// `tcpdump` on loopback, writing `file`, once it says it is listening.
fn start_capture(file: &Path, ports: &[u16]) -> Child {
    let filter = ports
        .iter()
        .map(|p| format!("tcp port {p}"))
        .collect::<Vec<_>>()
        .join(" or ");
    let mut c = Command::new("tcpdump")
        .args(["-i", "lo", "-s", "0", "-U", "-n", "-w"])
        .arg(file)
        .arg(&filter)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("tcpdump must be installed (scripts/qemu/e2e.sh installs it)");
    let err = c.stderr.take().expect("piped stderr");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for l in BufReader::new(err).lines().map_while(Result::ok) {
            let _ = tx.send(l);
        }
    });
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(l) if l.contains("listening on lo") => return c,
            Ok(_) => {}
            Err(_) => panic!("tcpdump did not start listening on lo within 20 s"),
        }
    }
}

fn count(hay: &[u8], needle: &[u8]) -> usize {
    hay.windows(needle.len()).filter(|w| *w == needle).count()
}

/// Boots the marker guest with `accel_extra`, capturing the link; returns
/// the capture, the marker and the run's transcript.
fn run_marker(accel_extra: &str, tag: &str) -> (Vec<u8>, Vec<u8>, String) {
    let _one = serialize();
    let seed = seed();
    let marker: Vec<u8> = b"FVMARK"
        .iter()
        .copied()
        .chain(seed.bytes().rev())
        .collect();
    let spec = ClusterSpec {
        accel_extra: accel_extra.into(),
        ..ClusterSpec::linux(
            2,
            &format!("fv.workload=marker fv.seed={seed} fv.rounds={ROUNDS} fv.pause=5"),
        )
    };
    let pcap = scratch("link").join(format!("{tag}.pcap"));
    let mut cluster = Cluster::start(&spec);
    let started = cluster.wait_origin_line("FV: pausing", Duration::from_secs(400));
    let mut capture = started.then(|| start_capture(&pcap, &cluster.ports));
    let too_late = cluster.wait_origin_line("FV: workload marker start", Duration::ZERO);
    let results = cluster.finish(Duration::from_secs(300));
    let all = transcript(&results);
    if let Some(c) = capture.as_mut() {
        // SAFETY: a signal to our own child; SIGINT makes tcpdump flush and exit.
        unsafe { libc::kill(c.id() as libc::pid_t, libc::SIGINT) };
        let _ = c.wait();
    }
    assert!(started, "the guest never started its workload\n{all}");
    assert!(
        !too_late,
        "the marker began before tcpdump listened (fv.pause too short)\n{all}"
    );
    for r in &results {
        assert_eq!(r.code(), Some(0), "node {} did not exit 0\n{all}", r.id);
    }
    let want = format!("FV: marker pages={PAGES} rounds={ROUNDS} wcpu=3 rcpu=0 mismatches=0 ok");
    assert!(results[0].stdout.contains(&want), "no {want:?}\n{all}");
    let bytes = std::fs::read(&pcap).expect("read the capture");
    let _ = std::fs::remove_file(&pcap);
    // The marker pages crossed the link once a round at least: the capture
    // holds that much traffic, sealed or not.
    let least = (ROUNDS * PAGES * 4096) as usize;
    assert!(
        bytes.len() >= least,
        "the capture holds {} bytes, less than the {least} the marker pages alone take: \
         it missed the cluster's traffic",
        bytes.len()
    );
    (bytes, marker, all)
}

#[test]
fn aead_link_carries_no_guest_page_in_clear() {
    let (bytes, marker, all) = run_marker("", "aead");
    let seen = count(&bytes, &marker);
    assert_eq!(
        seen,
        0,
        "the marker {} is in the capture {seen} times under aead\n{all}",
        String::from_utf8_lossy(&marker)
    );
    assert!(!all.contains("auth-only"), "no warning under aead\n{all}");
    eprintln!("aead: {} bytes captured, marker absent", bytes.len());
}

#[test]
fn auth_only_link_shows_the_marker_and_warns() {
    let (bytes, marker, all) = run_marker(",transport-security=auth-only", "auth-only");
    let seen = count(&bytes, &marker);
    assert!(
        seen > 0,
        "the marker {} is not in the capture under auth-only: the control proves nothing\n{all}",
        String::from_utf8_lossy(&marker)
    );
    assert_eq!(
        all.matches(
            "transport-security=auth-only: guest memory crosses the cluster network in clear"
        )
        .count(),
        2,
        "each node warns once at start\n{all}"
    );
    eprintln!(
        "auth-only: {} bytes captured, marker seen {seen} times",
        bytes.len()
    );
}
