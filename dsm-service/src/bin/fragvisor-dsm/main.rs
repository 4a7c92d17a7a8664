//! `fragvisor-dsm`: standalone DSM nodes, local multi-node runs and the DSM
//! benchmark.
//!
//! * `fragvisor-dsm node ...` — one node process running a workload;
//! * `fragvisor-dsm run --nodes N --workload W` — N node processes on this
//!   machine (loopback, or one network namespace per node with `--netns`),
//!   results checked;
//! * `fragvisor-dsm bench [--json]` — fault latency and bandwidth against
//!   their floors.

mod bench;
mod cluster;
mod workload;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::mpsc;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use dsm_service::home::HomeMap;
use dsm_service::node::{DsmOptions, TransportKind};
use dsm_service::uffd::PAGE_SIZE;
use dsm_service::{ClusterConfig, DsmEvent, DsmNode, NodeId, TransportSecurity};
use serde_json::json;

#[derive(Parser, Debug)]
#[command(
    name = "fragvisor-dsm",
    version,
    about = "FragVisor DSM: standalone nodes, local clusters, benchmark"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Run one node of a cluster with a workload.
    Node(NodeArgs),
    /// Run a whole cluster on this machine, one process per node, and check it.
    Run(cluster::RunArgs),
    /// Measure fault latency and bandwidth against their floors.
    Bench(bench::BenchArgs),
}

/// How a node joins its cluster and what it runs.
#[derive(Args, Debug, Clone)]
pub struct NodeArgs {
    /// This node's id (0 is the origin).
    #[arg(long)]
    node_id: NodeId,
    /// Addresses of all nodes, in id order: host:port,host:port,...
    #[arg(long, value_delimiter = ',', required = true)]
    addrs: Vec<SocketAddr>,
    /// File holding the pre-shared cluster key.
    #[arg(long)]
    key_file: Option<PathBuf>,
    /// Cluster id; nodes of another cluster are refused.
    #[arg(long, default_value_t = 1)]
    cluster_id: u64,
    /// Workload: counter, mp, random, soak, idle, bench-server.
    #[arg(long, default_value = "random")]
    workload: String,
    /// Size of the shared region in pages.
    #[arg(long, default_value_t = 256)]
    region_pages: u64,
    /// Pages the random workload uses.
    #[arg(long, default_value_t = 64)]
    pages: u64,
    /// Iterations of the workload.
    #[arg(long, default_value_t = 1000)]
    iters: u64,
    /// Seed of the random workload.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Page homes: `origin` (all on node 0) or `spread` (equal blocks).
    #[arg(long, default_value = "spread")]
    homes: String,
    /// A peer silent this long is declared failed (ms).
    #[arg(long, default_value_t = 5000)]
    peer_timeout_ms: u64,
    /// How long to wait for all peers at start (ms).
    #[arg(long, default_value_t = 30000)]
    connect_timeout_ms: u64,
    /// Most pages prefetched on a sequential read stream.
    #[arg(long, default_value_t = 64)]
    prefetch: u32,
    /// Transport: tcp or rdma.
    #[arg(long, default_value = "tcp")]
    transport: String,
    /// What protects each link: aead (sealed, the default) or auth-only.
    #[arg(long, default_value = "aead")]
    transport_security: TransportSecurity,
    /// Origin only: write a pattern into the whole region before joining.
    #[arg(long)]
    prefill: bool,
    /// Wait this long after joining before the workload starts (ms).
    #[arg(long, default_value_t = 0)]
    pause_ms: u64,
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            // Plain ASCII only: EnvFilter panics on some other input
            // (found by fuzzing the accelerator's `log=`).
            std::env::var("FRAGVISOR_LOG")
                .ok()
                .filter(|f| f.chars().all(|c| c.is_ascii_graphic() || c == ' '))
                .and_then(|f| tracing_subscriber::EnvFilter::try_new(f).ok())
                .unwrap_or_else(|| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Node(a) => node_main(&a),
        Cmd::Run(a) => cluster::run(&a),
        Cmd::Bench(a) => bench::run(&a),
    }
}

pub use dsm_service::error_chain as chain;

/// An anonymous private mapping for the DSM region (memmap2), kept for
/// the life of the process: the DSM node uses it until the process exits.
pub fn map_region(pages: u64) -> Result<u64, String> {
    let len = pages as usize * PAGE_SIZE;
    let mut map = memmap2::MmapOptions::new()
        .len(len)
        .no_reserve_swap()
        .map_anon()
        .map_err(|e| format!("mmap of {len} bytes failed: {e}"))?;
    let base = map.as_mut_ptr() as u64;
    std::mem::forget(map);
    Ok(base)
}

impl NodeArgs {
    fn config(&self) -> Result<ClusterConfig, String> {
        let key = match &self.key_file {
            Some(p) => {
                let k = std::fs::read(p)
                    .map_err(|e| format!("cannot read key file {}: {e}", p.display()))?;
                let t = k.trim_ascii_end().len();
                k[..t].to_vec()
            }
            None => Vec::new(),
        };
        let mut cfg = ClusterConfig::new(self.cluster_id, self.node_id, self.addrs.clone(), key);
        cfg.peer_timeout = Duration::from_millis(self.peer_timeout_ms);
        cfg.connect_timeout = Duration::from_millis(self.connect_timeout_ms);
        cfg.security = self.transport_security;
        cfg.validate().map_err(|e| e.to_string())?;
        Ok(cfg)
    }

    fn options(&self, pages: u64) -> Result<DsmOptions, String> {
        let n = self.addrs.len() as NodeId;
        let mut homes = HomeMap::all_on(0);
        match self.homes.as_str() {
            "origin" => {}
            "spread" => homes.split_evenly(0, pages, &(0..n).collect::<Vec<_>>()),
            h => return Err(format!("unknown --homes {h:?} (origin, spread)")),
        }
        let transport = match self.transport.as_str() {
            "tcp" => TransportKind::Tcp,
            "rdma" => TransportKind::Rdma,
            t => return Err(format!("unknown --transport {t:?} (tcp, rdma)")),
        };
        Ok(DsmOptions {
            homes,
            prefetch_max: self.prefetch,
            on_page_change: None,
            transport,
            ..DsmOptions::default()
        })
    }
}

/// Joins the cluster; errors are printed with the node id.
pub fn start_node(a: &NodeArgs) -> Result<(DsmNode, workload::Mem), String> {
    let cfg = a.config()?;
    let opts = a.options(a.region_pages)?;
    let base = map_region(a.region_pages)?;
    let mem = workload::Mem {
        base,
        pages: a.region_pages,
    };
    if a.prefill && a.node_id == 0 {
        bench::prefill(&mem);
    }
    let node = DsmNode::start(
        &cfg,
        &[("ram", base, a.region_pages * PAGE_SIZE as u64)],
        opts,
    )
    .map_err(|e| chain(&e))?;
    Ok((node, mem))
}

static DUMP_REQUESTED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

extern "C" fn on_sigusr1(_: libc::c_int) {
    DUMP_REQUESTED.store(true, std::sync::atomic::Ordering::Relaxed);
}

fn node_main(a: &NodeArgs) -> ExitCode {
    // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
    unsafe { libc::signal(libc::SIGUSR1, on_sigusr1 as *const () as libc::sighandler_t) };
    let me = a.node_id;
    if let Some(w) = a.transport_security.start_warning() {
        if a.workload != "bench-server" {
            eprintln!("fragvisor-dsm: node {me}: warning: {w}");
        }
    }
    let (node, mem) = match start_node(a) {
        Ok(x) => x,
        Err(e) => {
            eprintln!("fragvisor-dsm: node {me}: error: {e}");
            return ExitCode::from(2);
        }
    };
    let events = node.take_events().expect("first take");
    let (tx, rx) = mpsc::channel();
    let params = workload::Params {
        iters: a.iters,
        pages: a.pages,
        seed: a.seed,
    };
    let name = a.workload.clone();
    let pause = Duration::from_millis(a.pause_ms);
    let node = std::sync::Arc::new(node);
    let mem = std::sync::Arc::new(mem);
    let (node_ref, mem_ref) = (node.clone(), mem.clone());
    std::thread::spawn(move || {
        std::thread::sleep(pause);
        let r = if name == "bench-server" {
            bench::server(&node_ref, &mem_ref)
        } else {
            workload::run(&name, &node_ref, &mem_ref, &params)
        };
        let _ = tx.send(r);
    });
    loop {
        if let Ok(r) = rx.recv_timeout(Duration::from_millis(20)) {
            return match r {
                Ok(v) => {
                    let out = json!({"node": me, "result": v, "stats": node.stats()});
                    println!("RESULT {out}");
                    node.shutdown();
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("fragvisor-dsm: node {me}: error: {e}");
                    ExitCode::from(1)
                }
            };
        }
        if DUMP_REQUESTED.swap(false, std::sync::atomic::Ordering::Relaxed) {
            eprint!("{}", node.dump_state());
        }
        while let Ok(ev) = events.try_recv() {
            match ev {
                DsmEvent::PeerFailed { node: peer, reason } => {
                    eprintln!("fragvisor-dsm: node {me}: error: node {peer} failed: {reason}");
                    node.leave_peers();
                    std::process::exit(3);
                }
                DsmEvent::Fatal(what) => {
                    eprintln!("fragvisor-dsm: node {me}: fatal: {what}");
                    std::process::exit(4);
                }
                DsmEvent::ProtocolError { node, what } => {
                    eprintln!("fragvisor-dsm: node {me}: warning: protocol error from node {node}: {what}");
                }
                DsmEvent::PeerLeft { node } => {
                    tracing::debug!(node = me, peer = node, "peer left");
                }
            }
        }
    }
}
