//! `fragvisor-dsm bench`: DSM fault latency and bandwidth, each against its
//! floor measured in the same run.
//!
//! Two node processes: this process is node 1 (it measures) and a child is
//! node 0 (the origin, which wrote every page first and is every page's
//! home). Floors: a local userfaultfd fault resolved by a handler thread with
//! `UFFDIO_COPY`, and a 4 KiB request/response over the same TCP transport.

use std::process::{Command, ExitCode, Stdio};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use clap::Args;
use dsm_service::transport::channel;
use dsm_service::uffd::{Uffd, PAGE_SIZE};
use dsm_service::{DsmNode, TransportSecurity};
use serde_json::{json, Value};

use crate::workload::Mem;
use crate::{chain, cluster, start_node, NodeArgs};

/// Options of `bench`.
#[derive(Args, Debug)]
pub struct BenchArgs {
    /// Print the figures as one JSON object on the last line.
    #[arg(long)]
    json: bool,
    /// MiB read sequentially.
    #[arg(long, default_value_t = 256)]
    seq_mb: u64,
    /// Samples per latency figure.
    #[arg(long, default_value_t = 2000)]
    samples: u64,
    /// Round trips of the ping-pong.
    #[arg(long, default_value_t = 2000)]
    pingpong: u64,
    /// Clusters measured per transport security mode (aead, auth-only),
    /// alternating; the figures are their medians.
    #[arg(long, default_value_t = 5)]
    security_runs: usize,
}

const A_FIRST: u64 = 0;
const SAMPLES_MAX: u64 = 4000;
const B_FIRST: u64 = SAMPLES_MAX;
const C_PAGE: u64 = 2 * SAMPLES_MAX;
const D_FIRST: u64 = 2 * SAMPLES_MAX + 64;
const STREAM_FRAME: usize = 1 << 20;

const B_PING: u8 = 1;
const B_PONG: u8 = 2;
const B_STREAM_REQ: u8 = 3;
const B_STREAM_DATA: u8 = 4;

/// Sequential-read and stream rounds, alternating; the best of each is
/// reported, so a burst of load on this shared machine hits both alike.
const SEQ_ROUNDS: u64 = 3;

fn region_pages(seq_mb: u64) -> u64 {
    D_FIRST + SEQ_ROUNDS * seq_mb * 256
}

/// The origin writes every page before it joins (so it holds them all).
pub fn prefill(mem: &Mem) {
    for p in 0..mem.pages {
        mem.word(p, 0).store(p, Ordering::Relaxed);
        mem.word(p, 511).store(p, Ordering::Relaxed);
    }
}

fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 * q).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i]
}

fn sorted_us(mut v: Vec<Duration>) -> Vec<f64> {
    v.sort_unstable();
    v.into_iter().map(|d| d.as_secs_f64() * 1e6).collect()
}

fn touch(mem: &Mem, page: u64) -> Duration {
    let w = mem.word(page, 1);
    let t = Instant::now();
    std::hint::black_box(w.load(Ordering::Relaxed));
    t.elapsed()
}

/// A local fault resolved by a handler thread with UFFDIO_COPY.
fn uffd_floor(samples: u64) -> Result<Vec<f64>, String> {
    let uffd = Arc::new(Uffd::new().map_err(|e| chain(&e))?);
    let base = crate::map_region(samples)?;
    uffd.register(base, samples * PAGE_SIZE as u64)
        .map_err(|e| chain(&e))?;
    let u2 = uffd.clone();
    let handler = std::thread::spawn(move || {
        use std::os::fd::AsRawFd;
        let page = vec![7u8; PAGE_SIZE];
        let mut faults = Vec::new();
        let mut served = 0;
        while served < samples {
            let mut pfd = libc::pollfd {
                fd: u2.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd.
            unsafe { libc::poll(&mut pfd, 1, 1000) };
            if u2.read_faults(&mut faults).is_err() {
                return;
            }
            for f in &faults {
                // SAFETY: the address is in the range registered above.
                let _ = unsafe { u2.copy(f.addr, &page, false) };
                served += 1;
            }
        }
    });
    let mem = Mem {
        base,
        pages: samples,
    };
    let lat: Vec<Duration> = (0..samples).map(|p| touch(&mem, p)).collect();
    handler.join().map_err(|_| "uffd floor handler panicked")?;
    Ok(sorted_us(lat))
}

#[derive(Default)]
struct Signal {
    count: Mutex<u64>,
    cv: Condvar,
}

impl Signal {
    fn add(&self, n: u64) {
        *self.count.lock().expect("lock") += n;
        self.cv.notify_all();
    }
    fn wait_for(&self, at_least: u64) -> Result<(), String> {
        let mut c = self.count.lock().expect("lock");
        while *c < at_least {
            let (g, t) = self
                .cv
                .wait_timeout(c, Duration::from_secs(30))
                .expect("lock");
            c = g;
            if t.timed_out() && *c < at_least {
                return Err("the benchmark peer stopped answering".into());
            }
        }
        Ok(())
    }
}

/// Node 0's part: answers pings and stream requests, and mirrors the
/// client's barriers and ping-pong.
pub fn server(node: &Arc<DsmNode>, mem: &Arc<Mem>) -> Result<Value, String> {
    let n2 = node.clone();
    node.set_app_handler(Arc::new(move |from, ch, p: &[u8]| {
        if ch != channel::BENCH {
            return;
        }
        match p.first() {
            Some(&B_PING) => {
                let mut reply = vec![0u8; PAGE_SIZE];
                reply[0] = B_PONG;
                let _ = n2.send_app(from, channel::BENCH, &reply);
            }
            Some(&B_STREAM_REQ) if p.len() == 9 => {
                let total = u64::from_le_bytes(p[1..9].try_into().expect("8 bytes"));
                let n3 = n2.clone();
                std::thread::spawn(move || {
                    let mut frame = vec![0x5au8; STREAM_FRAME];
                    frame[0] = B_STREAM_DATA;
                    for _ in 0..total / STREAM_FRAME as u64 {
                        if n3.send_app(from, channel::BENCH, &frame).is_err() {
                            return;
                        }
                    }
                });
            }
            _ => {}
        }
    }));
    let b = |n: &DsmNode| n.barrier().map_err(|e| e.to_string());
    b(node)?; // handler installed
    b(node)?; // read faults
    b(node)?; // upgrades
    b(node)?; // ping-pong
    pingpong(mem, 0, u64::MAX)?;
    for _ in 0..SEQ_ROUNDS {
        b(node)?; // stream
        b(node)?; // sequential read
    }
    b(node)?; // done
    Ok(json!({"workload": "bench-server"}))
}

/// Alternating increments: node `k` adds when the count has parity `k`.
fn pingpong(mem: &Mem, k: u64, rounds: u64) -> Result<u64, String> {
    let c = mem.word(C_PAGE, 0);
    let mut done = 0;
    loop {
        let mut spins = 0u32;
        let mut v = c.load(Ordering::Acquire);
        while v % 2 != k {
            if v == u64::MAX {
                return Ok(done);
            }
            spins += 1;
            if spins.is_multiple_of(64) {
                std::thread::yield_now();
            }
            v = c.load(Ordering::Acquire);
        }
        if done >= rounds {
            // The client ends the game for both.
            c.store(u64::MAX, Ordering::Release);
            return Ok(done);
        }
        c.fetch_add(1, Ordering::AcqRel);
        done += 1;
    }
}

/// Runs the benchmark.
pub fn run(a: &BenchArgs) -> ExitCode {
    match run_inner(a) {
        Ok(v) => {
            if a.json {
                println!("{v}");
            } else {
                println!("{}", serde_json::to_string_pretty(&v).expect("json"));
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("fragvisor-dsm bench: error: {e}");
            ExitCode::from(1)
        }
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Measures `security_runs` clusters in each transport security mode,
/// alternating (so load on this shared machine hits both alike): the
/// figures of the aead run with the median fault latency, plus each mode's
/// median fault latency and sequential read, and what sealing costs.
fn run_inner(a: &BenchArgs) -> Result<Value, String> {
    let samples = a.samples.clamp(10, SAMPLES_MAX);
    let uffd = uffd_floor(samples)?;
    eprintln!("bench: uffd floor p50 {:.1} us", percentile(&uffd, 0.5));
    let modes = [TransportSecurity::Aead, TransportSecurity::AuthOnly];
    let mut runs: [Vec<Value>; 2] = [Vec::new(), Vec::new()];
    for _ in 0..a.security_runs.max(1) {
        for (m, mode) in modes.iter().enumerate() {
            eprintln!("bench: transport-security={mode}");
            runs[m].push(run_cluster(a, samples, &uffd, *mode)?);
        }
    }
    let figure = |m: usize, key: &str| {
        median(
            runs[m]
                .iter()
                .map(|v| v[key].as_f64().unwrap_or(0.0))
                .collect(),
        )
    };
    let r2 = |x: f64| (x * 100.0).round() / 100.0;
    let (fault_aead, fault_auth) = (
        figure(0, "read_fault_p50_us"),
        figure(1, "read_fault_p50_us"),
    );
    let (seq_aead, seq_auth) = (
        figure(0, "seq_read_mb_per_s"),
        figure(1, "seq_read_mb_per_s"),
    );
    let mut v = runs[0]
        .iter()
        .find(|v| v["read_fault_p50_us"].as_f64() == Some(fault_aead))
        .cloned()
        .expect("the median is one of the runs");
    let o = v.as_object_mut().expect("an object");
    o.insert("transport_security".into(), json!("aead"));
    o.insert("security_runs".into(), json!(runs[0].len()));
    o.insert("read_fault_p50_us".into(), json!(fault_aead));
    o.insert("seq_read_mb_per_s".into(), json!(seq_aead));
    o.insert("read_fault_p50_us_aead".into(), json!(fault_aead));
    o.insert("read_fault_p50_us_auth_only".into(), json!(fault_auth));
    o.insert("seq_read_mb_per_s_aead".into(), json!(seq_aead));
    o.insert("seq_read_mb_per_s_auth_only".into(), json!(seq_auth));
    o.insert(
        "aead_fault_cost".into(),
        json!(r2(fault_aead / fault_auth - 1.0)),
    );
    o.insert(
        "aead_seq_read_cost".into(),
        json!(r2(1.0 - seq_aead / seq_auth)),
    );
    eprintln!(
        "bench: medians of {} runs: read fault p50 {fault_aead:.1} us sealed, {fault_auth:.1} us auth-only; \
         sequential read {seq_aead:.0} MB/s sealed, {seq_auth:.0} MB/s auth-only",
        runs[0].len()
    );
    Ok(v)
}

/// One two-node cluster in `security` mode, measured.
fn run_cluster(
    a: &BenchArgs,
    samples: u64,
    uffd: &[f64],
    security: TransportSecurity,
) -> Result<Value, String> {
    let addrs = cluster::free_loopback_addrs(2)?;
    let key = cluster::write_key_file()?;
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let pages = region_pages(a.seq_mb);
    let addr_list = addrs
        .iter()
        .map(|a| a.to_string())
        .collect::<Vec<_>>()
        .join(",");
    let mut child = Command::new(exe)
        .arg("node")
        .args([
            "--node-id",
            "0",
            "--addrs",
            &addr_list,
            "--workload",
            "bench-server",
        ])
        .arg("--key-file")
        .arg(&key)
        .args([
            "--region-pages",
            &pages.to_string(),
            "--homes",
            "origin",
            "--prefill",
            "--transport-security",
            security.as_str(),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|e| format!("cannot start node 0: {e}"))?;
    let args = NodeArgs {
        node_id: 1,
        addrs: addrs.clone(),
        key_file: Some(key.clone()),
        cluster_id: 1,
        workload: "bench-client".into(),
        region_pages: pages,
        pages: 0,
        iters: 0,
        seed: 0,
        homes: "origin".into(),
        peer_timeout_ms: 10_000,
        connect_timeout_ms: 60_000,
        prefetch: 64,
        transport: "tcp".into(),
        transport_security: security,
        prefill: false,
        pause_ms: 0,
    };
    let r = start_node(&args).and_then(|(node, mem)| client(a, samples, uffd.to_vec(), node, mem));
    let _ = std::fs::remove_file(&key);
    let status = child.wait().map_err(|e| e.to_string())?;
    let v = r?;
    if !status.success() {
        return Err(format!("node 0 exited with {status}"));
    }
    Ok(v)
}

fn client(
    a: &BenchArgs,
    samples: u64,
    uffd: Vec<f64>,
    node: DsmNode,
    mem: Mem,
) -> Result<Value, String> {
    let node = Arc::new(node);
    let pongs = Arc::new(Signal::default());
    let streamed = Arc::new(Signal::default());
    {
        let (pongs, streamed) = (pongs.clone(), streamed.clone());
        node.set_app_handler(Arc::new(move |_from, ch, p: &[u8]| {
            if ch != channel::BENCH {
                return;
            }
            match p.first() {
                Some(&B_PONG) => pongs.add(1),
                Some(&B_STREAM_DATA) => streamed.add(p.len() as u64),
                _ => {}
            }
        }));
    }
    let b = |n: &DsmNode| n.barrier().map_err(|e| e.to_string());
    b(&node)?; // handler installed on both sides

    // Floor: a 4 KiB request/response over the transport.
    let mut ping = vec![0u8; 64];
    ping[0] = B_PING;
    let mut rtt = Vec::with_capacity(samples as usize);
    for i in 0..samples {
        let t = Instant::now();
        node.send_app(0, channel::BENCH, &ping)
            .map_err(|e| chain(&e))?;
        pongs.wait_for(i + 1)?;
        rtt.push(t.elapsed());
    }
    let rtt = sorted_us(rtt);
    eprintln!("bench: tcp rtt floor p50 {:.1} us", percentile(&rtt, 0.5));

    // Remote read faults on pages node 0 holds Exclusive, in a random order
    // so that no sequential prefetch kicks in.
    b(&node)?;
    let mut order: Vec<u64> = (A_FIRST..A_FIRST + samples).collect();
    let mut x = 0x2545_f491u64;
    for i in (1..order.len()).rev() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        order.swap(i, (x % (i as u64 + 1)) as usize);
    }
    let read = sorted_us(order.iter().map(|&p| touch(&mem, p)).collect());
    eprintln!("bench: read fault p50 {:.1} us", percentile(&read, 0.5));

    // Shared -> Exclusive with one other sharer (node 0) to invalidate.
    b(&node)?;
    for p in B_FIRST..B_FIRST + samples {
        touch(&mem, p);
    }
    let upgrade = sorted_us(
        order
            .iter()
            .map(|&p| {
                let w = mem.word(B_FIRST + p - A_FIRST, 2);
                let t = Instant::now();
                w.store(1, Ordering::Relaxed);
                t.elapsed()
            })
            .collect(),
    );
    eprintln!(
        "bench: write upgrade p50 {:.1} us",
        percentile(&upgrade, 0.5)
    );

    // Ping-pong on one page.
    b(&node)?;
    let t = Instant::now();
    let mine = pingpong(&mem, 1, a.pingpong)?;
    let pp_secs = t.elapsed().as_secs_f64();
    let pingpong_ops = (2 * mine) as f64 / pp_secs;
    eprintln!("bench: ping-pong {pingpong_ops:.0} writes/s");

    // Rounds of: a raw stream over the same transport, then a sequential
    // read of seq_mb MiB that node 0 wrote (a fresh range each round).
    let mut seq_mb_s: f64 = 0.0;
    let mut stream_mb_s: f64 = 0.0;
    let mut rounds = Vec::new();
    for round in 0..SEQ_ROUNDS {
        b(&node)?;
        let total = a.seq_mb << 20;
        let mut req = vec![B_STREAM_REQ];
        req.extend_from_slice(&total.to_le_bytes());
        let before = streamed.count.lock().expect("lock").to_owned();
        let t = Instant::now();
        node.send_app(0, channel::BENCH, &req)
            .map_err(|e| chain(&e))?;
        streamed.wait_for(before + total)?;
        let stream = a.seq_mb as f64 / t.elapsed().as_secs_f64();

        b(&node)?;
        let first = D_FIRST + round * a.seq_mb * 256;
        let last = first + a.seq_mb * 256;
        let st0 = node.stats();
        let t = Instant::now();
        let mut sum = 0u64;
        for p in first..last {
            for w in 0..(PAGE_SIZE / 8) as u64 {
                sum = sum.wrapping_add(mem.word(p, w).load(Ordering::Relaxed));
            }
        }
        let seq = a.seq_mb as f64 / t.elapsed().as_secs_f64();
        let expect: u64 = (first..last).map(|p| 2 * p).sum();
        if sum != expect {
            return Err(format!(
                "sequential read returned wrong data: sum {sum}, expected {expect}"
            ));
        }
        let st1 = node.stats();
        eprintln!(
            "bench: round {round}: tcp stream {stream:.0} MB/s, sequential read {seq:.0} MB/s ({} faults, {} prefetched)",
            st1.faults() - st0.faults(),
            st1.prefetched - st0.prefetched
        );
        rounds
            .push(json!({"tcp_stream_mb_per_s": stream.round(), "seq_read_mb_per_s": seq.round()}));
        seq_mb_s = seq_mb_s.max(seq);
        stream_mb_s = stream_mb_s.max(stream);
    }
    b(&node)?;

    let p50 = |v: &[f64]| percentile(v, 0.5);
    let r2 = |x: f64| (x * 100.0).round() / 100.0;
    let floor = p50(&uffd) + p50(&rtt);
    let v = json!({
        "samples": samples,
        "uffd_floor_p50_us": r2(p50(&uffd)),
        "uffd_floor_p99_us": r2(percentile(&uffd, 0.99)),
        "tcp_rtt_floor_p50_us": r2(p50(&rtt)),
        "tcp_rtt_floor_p99_us": r2(percentile(&rtt, 0.99)),
        "read_fault_p50_us": r2(p50(&read)),
        "read_fault_p99_us": r2(percentile(&read, 0.99)),
        "write_upgrade_p50_us": r2(p50(&upgrade)),
        "write_upgrade_p99_us": r2(percentile(&upgrade, 0.99)),
        "pingpong_ops_per_s": pingpong_ops.round(),
        "seq_read_mb_per_s": seq_mb_s.round(),
        "tcp_stream_mb_per_s": stream_mb_s.round(),
        "seq_read_vs_stream": r2(seq_mb_s / stream_mb_s),
        "seq_rounds": rounds,
        "read_fault_vs_floor": r2(p50(&read) / floor),
        "node1_stats": node.stats(),
    });
    node.shutdown();
    Ok(v)
}
