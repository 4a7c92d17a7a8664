//! `fragvisor-dsm run`: a whole cluster on this machine, one OS process per
//! node, over loopback or with one network namespace per node (veth into a
//! bridge), and a check of the combined result.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use clap::Args;
use serde_json::Value;

/// Options of `run`.
#[derive(Args, Debug)]
pub struct RunArgs {
    /// Number of nodes.
    #[arg(long, default_value_t = 3)]
    nodes: u16,
    /// Workload: counter, mp, random, idle.
    #[arg(long, default_value = "random")]
    workload: String,
    /// Iterations per node.
    #[arg(long, default_value_t = 2000)]
    iters: u64,
    /// Pages the random workload uses.
    #[arg(long, default_value_t = 64)]
    pages: u64,
    /// Page homes: origin or spread.
    #[arg(long, default_value = "spread")]
    homes: String,
    /// One network namespace per node, joined by veth to a bridge (root only).
    #[arg(long)]
    netns: bool,
    /// Peer timeout (ms).
    #[arg(long, default_value_t = 5000)]
    peer_timeout_ms: u64,
    /// Seed of the random workload.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Give up after this many seconds.
    #[arg(long, default_value_t = 300)]
    timeout_s: u64,
}

/// Free loopback addresses, one per node, on an address of this cluster's
/// own ([`dsm_service::transport::free_loopback_addrs`]).
pub fn free_loopback_addrs(n: u16) -> Result<Vec<SocketAddr>, String> {
    dsm_service::transport::free_loopback_addrs(usize::from(n))
        .map_err(|e| format!("cannot find free loopback ports: {e}"))
}

/// Writes a fresh random cluster key to a private temporary file.
pub fn write_key_file() -> Result<std::path::PathBuf, String> {
    use std::os::unix::fs::OpenOptionsExt;
    let key = dsm_service::transport::handshake::random_nonce();
    let hex: String = key.iter().map(|b| format!("{b:02x}")).collect();
    let path = std::env::temp_dir().join(format!("fragvisor-key-{}", std::process::id()));
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&path)
        .map_err(|e| format!("cannot write key file {}: {e}", path.display()))?;
    std::io::Write::write_all(&mut f, hex.as_bytes()).map_err(|e| e.to_string())?;
    Ok(path)
}

/// Network namespaces for a local cluster; removed on drop.
struct Netns {
    tag: String,
    nodes: u16,
}

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("cannot run ip: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "ip {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(())
}

impl Netns {
    fn create(nodes: u16) -> Result<(Netns, Vec<SocketAddr>), String> {
        let tag = format!("fv{}", std::process::id() % 100_000);
        let net = Netns {
            tag: tag.clone(),
            nodes,
        };
        let br = format!("{tag}br");
        let subnet = 10 + std::process::id() % 200;
        ip(&["link", "add", &br, "type", "bridge"])?;
        ip(&["link", "set", &br, "up"])?;
        let mut addrs = Vec::new();
        for k in 0..nodes {
            let ns = format!("{tag}n{k}");
            let host = format!("{tag}h{k}");
            ip(&["netns", "add", &ns])?;
            ip(&[
                "link", "add", &host, "type", "veth", "peer", "name", "eth0", "netns", &ns,
            ])?;
            ip(&["link", "set", &host, "master", &br, "up"])?;
            let a = format!("10.213.{subnet}.{}", k + 1);
            ip(&["-n", &ns, "addr", "add", &format!("{a}/24"), "dev", "eth0"])?;
            ip(&["-n", &ns, "link", "set", "eth0", "up"])?;
            ip(&["-n", &ns, "link", "set", "lo", "up"])?;
            addrs.push(format!("{a}:7400").parse().expect("valid address"));
        }
        Ok((net, addrs))
    }

    fn ns(&self, k: u16) -> String {
        format!("{}n{k}", self.tag)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        for k in 0..self.nodes {
            let _ = ip(&["netns", "del", &self.ns(k)]);
        }
        let _ = ip(&["link", "del", &format!("{}br", self.tag)]);
    }
}

struct NodeProc {
    child: Child,
    lines: mpsc::Receiver<String>,
}

/// Runs the cluster and checks it.
pub fn run(a: &RunArgs) -> ExitCode {
    match run_inner(a) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("fragvisor-dsm run: error: {e}");
            ExitCode::from(1)
        }
    }
}

fn run_inner(a: &RunArgs) -> Result<(), String> {
    if a.nodes == 0 {
        return Err("--nodes must be at least 1".into());
    }
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let key = write_key_file()?;
    let (netns, addrs) = if a.netns {
        let (n, addrs) = Netns::create(a.nodes)?;
        (Some(n), addrs)
    } else {
        (None, free_loopback_addrs(a.nodes)?)
    };
    let addr_list = addrs
        .iter()
        .map(|a| a.to_string())
        .collect::<Vec<_>>()
        .join(",");
    println!(
        "fragvisor-dsm run: {} nodes ({}), workload {}, {} iterations each, homes {}",
        a.nodes,
        if a.netns {
            "one network namespace each"
        } else {
            "loopback"
        },
        a.workload,
        a.iters,
        a.homes
    );
    let mut procs = Vec::new();
    for k in 0..a.nodes {
        let mut cmd = match &netns {
            Some(n) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", &n.ns(k)]).arg(&exe);
                c
            }
            None => Command::new(&exe),
        };
        cmd.arg("node")
            .args(["--node-id", &k.to_string(), "--addrs", &addr_list])
            .arg("--key-file")
            .arg(&key)
            .args(["--workload", &a.workload, "--iters", &a.iters.to_string()])
            .args(["--pages", &a.pages.to_string(), "--homes", &a.homes])
            .args(["--peer-timeout-ms", &a.peer_timeout_ms.to_string()])
            .args(["--seed", &a.seed.to_string()])
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        let mut child = cmd
            .spawn()
            .map_err(|e| format!("cannot start node {k}: {e}"))?;
        let out = child.stdout.take().expect("piped");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for l in BufReader::new(out).lines().map_while(Result::ok) {
                let _ = tx.send(l);
            }
        });
        procs.push(NodeProc { child, lines: rx });
    }
    let deadline = Instant::now() + Duration::from_secs(a.timeout_s);
    let mut results: Vec<Option<Value>> = vec![None; procs.len()];
    let mut failed = Vec::new();
    for (k, p) in procs.iter_mut().enumerate() {
        let status = loop {
            if let Some(s) = p.child.try_wait().map_err(|e| e.to_string())? {
                break Some(s);
            }
            if Instant::now() > deadline {
                let _ = p.child.kill();
                break None;
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        for l in p.lines.try_iter().chain(std::iter::from_fn(|| {
            p.lines.recv_timeout(Duration::from_millis(200)).ok()
        })) {
            if let Some(j) = l.strip_prefix("RESULT ") {
                results[k] = serde_json::from_str(j).ok();
            } else {
                println!("node {k}: {l}");
            }
        }
        match status {
            Some(s) if s.success() => {}
            Some(s) => failed.push(format!("node {k} exited with {s}")),
            None => failed.push(format!("node {k} did not finish in {} s", a.timeout_s)),
        }
    }
    let _ = std::fs::remove_file(&key);
    drop(netns);
    if !failed.is_empty() {
        return Err(failed.join("; "));
    }
    for (k, r) in results.iter().enumerate() {
        let r = r.as_ref().ok_or(format!("node {k} printed no result"))?;
        println!("node {k}: {}", r["result"]);
        let s = &r["stats"];
        println!(
            "node {k}: faults read={} write={} upgrade={} local={} served={} inval sent={} recv={} pages sent={} recv={} bytes sent={} p50={}us p99={}us",
            s["read_faults"], s["write_faults"], s["upgrades"], s["local_faults"], s["served"],
            s["invalidations_sent"], s["invalidations_received"], s["pages_sent"], s["pages_received"],
            s["bytes_sent"], s["latency_p50_ns"].as_u64().unwrap_or(0) / 1000, s["latency_p99_ns"].as_u64().unwrap_or(0) / 1000
        );
    }
    if a.workload == "random" {
        let sums: Vec<&Value> = results
            .iter()
            .flatten()
            .map(|r| &r["result"]["checksum"])
            .collect();
        if sums.windows(2).any(|w| w[0] != w[1]) {
            return Err(format!(
                "nodes disagree on the region's contents: checksums {sums:?}"
            ));
        }
        println!(
            "all {} nodes agree on the region checksum {}",
            a.nodes, sums[0]
        );
    }
    println!("fragvisor-dsm run: OK");
    Ok(())
}
