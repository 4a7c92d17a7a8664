//! The per-host runtime of an aggregate VM: the DSM node plus the messages
//! that make one machine out of several QEMU processes — I/O forwarded to the
//! origin, interrupts routed to the owner of the target vCPU, APIC routing
//! state mirrored everywhere, IOAPIC EOIs sent to the origin, and
//! cluster-wide power-off and reset.
//!
//! QEMU talks to it through [`Host`] (implemented by the C glue in `ffi/`)
//! and the blocking calls on [`Runtime`]. Threads:
//!
//! * the DSM's receive threads decode runtime frames (`dispatch.rs`); an I/O
//!   reply only wakes the waiting vCPU thread, everything else is queued, so
//!   those threads never call into QEMU (a vCPU blocked in a fault may hold
//!   QEMU's locks);
//! * `fv-app` calls [`Host`] for interrupts, APIC state, EOIs and lifecycle
//!   events (the C side takes QEMU's big lock there);
//! * `fv-exec-N` (origin only) run forwarded I/O on the device model
//!   (`io.rs`);
//! * `fv-watch` turns DSM events into [`Host::node_failed`] and fails the
//!   forwarded calls that wait for a dead node, so no vCPU hangs
//!   (`lifecycle.rs`);
//! * `fv-clock` (non-origin only) keeps the guest clock steered towards the
//!   origin's (`clock_sync.rs`).
//!
//! Wire format: one frame per message on channel [`RUNTIME_CHANNEL`], see
//! [`Message`] and `RUNTIME.md` next to this file (messages, calls, the clock
//! exchange, lifecycle).

mod calls;
mod clock_sync;
mod dispatch;
mod io;
mod irq;
mod lifecycle;
mod summary;
mod vm_state;
pub mod wire;

use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use dsm_service::node::{DsmOptions, PageChangeHook};
use dsm_service::{error_chain, DsmEvent, DsmNode, NodeId};
use thiserror::Error;

pub use self::io::{IoAccess, IoSpace, MAX_IO_DATA};
pub use self::irq::{ApicState, Irq, IrqKind};
pub use self::lifecycle::Lifecycle;
pub use self::vm_state::ResetOrigin;
pub use self::wire::{DecodeError, Message, RUNTIME_CHANNEL};

use self::calls::Calls;
use self::dispatch::{AppJob, Dispatcher};
use self::io::IoJob;
use self::lifecycle::ResetGate;
use self::summary::VcpuCounts;
use self::vm_state::VmState;
use crate::clock::{ClockError, ClockReading, ClockSync, SharedSteer, TestClock};
use crate::config::AccelConfig;
use crate::placement::VcpuPlacement;

/// What the runtime needs from QEMU.
pub trait Host: Send + Sync {
    /// Origin: performs a forwarded access on the device model. `data` holds
    /// the bytes to write, or receives the bytes read. Returns QEMU's
    /// `MemTxResult` (0 is OK).
    fn exec_io(&self, access: &IoAccess, data: &mut [u8]) -> u32;
    /// Delivers an interrupt to a vCPU of this host.
    fn deliver_irq(&self, irq: &Irq);
    /// Records another host's vCPU APIC routing state.
    fn apic_state(&self, state: &ApicState);
    /// Origin: an IOAPIC EOI broadcast from a remote vCPU.
    fn ioapic_eoi(&self, vector: u8);
    /// Another node reported a lifecycle event.
    fn lifecycle(&self, event: Lifecycle, from: NodeId);
    /// A node failed or left while the VM ran; stop with an error naming it.
    fn node_failed(&self, node: NodeId, reason: &str);
    /// Called first in each thread the runtime creates that calls the
    /// methods above (QEMU registers the thread with RCU there).
    fn thread_start(&self, name: &str);
    /// Exits (returns to QEMU's device code) of local vCPU `cpu` so far,
    /// for the exit summary.
    fn vcpu_exits(&self, _cpu: u32) -> u64 {
        0
    }
}

/// Errors of the runtime.
#[derive(Debug, Error)]
pub enum RuntimeError {
    /// A peer address does not resolve.
    #[error("cannot resolve peer {0}")]
    Resolve(String),
    /// The DSM did not start.
    #[error("the DSM service did not start: {0}")]
    Dsm(String),
    /// A node is gone.
    #[error("node {node} failed: {reason}")]
    NodeFailed {
        /// Node.
        node: NodeId,
        /// Why.
        reason: String,
    },
    /// An access too large to forward.
    #[error("forwarded access of {0} bytes exceeds {MAX_IO_DATA}")]
    TooLarge(usize),
    /// The runtime is stopping.
    #[error("the cluster is shutting down")]
    Stopping,
    /// The guest clock could not be aligned with the origin's.
    #[error("clock alignment with node 0 failed: {0}")]
    Clock(String),
    /// The clock exchanges with the origin gave no estimate.
    #[error("clock alignment with node 0 failed: {0}")]
    ClockEstimate(#[from] ClockError),
}

/// Everything [`Runtime::start`] needs from the configuration: the DSM's
/// membership and the runtime's settings from the accelerator options.
#[derive(Debug, Clone)]
pub struct RuntimeConfig {
    /// The DSM's view of the cluster.
    pub dsm: dsm_service::ClusterConfig,
    /// DSM read-ahead for guest RAM, pages (`prefetch`; 0 is off).
    pub prefetch_max: u32,
    /// Hottest guest pages listed under the exit summary (`hot-pages`; 0
    /// is off and counts no faults per page).
    pub hot_pages: usize,
    /// This process's clock test knobs (`test-clock-skew-ns`,
    /// `test-clock-rate-ppm`).
    pub test_clock: TestClock,
}

impl RuntimeConfig {
    /// The runtime's configuration from the accelerator's, with peers
    /// declared failed after `peer_timeout` of silence.
    pub fn new(cfg: &AccelConfig, peer_timeout: Duration) -> Result<RuntimeConfig, RuntimeError> {
        Ok(RuntimeConfig {
            dsm: dsm_config(cfg, peer_timeout)?,
            prefetch_max: cfg.prefetch,
            hot_pages: cfg.hot_pages as usize,
            test_clock: TestClock {
                skew_ns: cfg.test_clock_skew_ns,
                rate_ppm: cfg.test_clock_rate_ppm,
            },
        })
    }
}

/// A cluster id every node derives alike from the peer list.
fn cluster_id(cfg: &AccelConfig) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for p in &cfg.peers {
        for b in p.to_string().bytes().chain([0]) {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x100_0000_01b3);
        }
    }
    h
}

/// The DSM's view of an accelerator configuration.
pub fn dsm_config(
    cfg: &AccelConfig,
    peer_timeout: Duration,
) -> Result<dsm_service::ClusterConfig, RuntimeError> {
    let addrs: Vec<SocketAddr> = cfg
        .peers
        .iter()
        .map(|p| {
            (p.host.as_str(), p.port)
                .to_socket_addrs()
                .ok()
                .and_then(|mut a| a.next())
                .ok_or_else(|| RuntimeError::Resolve(p.to_string()))
        })
        .collect::<Result<_, _>>()?;
    let key = cfg
        .key
        .as_ref()
        .map(|k| k.as_bytes().to_vec())
        .unwrap_or_default();
    let mut d = dsm_service::ClusterConfig::new(cluster_id(cfg), cfg.node_id as NodeId, addrs, key);
    d.peer_timeout = peer_timeout;
    d.security = cfg.transport_security;
    Ok(d)
}

/// Starts a runtime thread named `name`.
fn spawn(name: String, f: impl FnOnce() + Send + 'static) -> std::io::Result<()> {
    std::thread::Builder::new().name(name).spawn(f).map(drop)
}

/// One host's runtime.
pub struct Runtime {
    node: Arc<DsmNode>,
    host: Arc<dyn Host>,
    placement: VcpuPlacement,
    /// Forwarded calls waiting for their replies (shared with the
    /// dispatcher).
    calls: Arc<Calls>,
    stopping: AtomicBool,
    /// The lifecycle decisions (shared with the dispatcher, which records a
    /// peer's end as soon as it arrives).
    state: Arc<Mutex<VmState>>,
    /// A peer's reset in progress here.
    reset: ResetGate,
    counts: Vec<VcpuCounts>,
    /// Hottest pages the exit summary lists.
    hot_pages: usize,
    /// Origin: its clocks at start, the guest clock's zero.
    base: ClockReading,
    /// How this host's clocks map to the guest clock (set during start).
    clock: OnceLock<ClockSync>,
    /// The TCG guest clock, steered against drift (`fv-clock` thread).
    steer: SharedSteer,
    /// Clock exchanges since the start that steered it.
    resyncs: AtomicU64,
}

impl std::fmt::Debug for Runtime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Runtime")
            .field("node", &self.node.id())
            .finish()
    }
}

impl Runtime {
    /// Joins the cluster with guest RAM `regions` (`(name, host address,
    /// length)`, identical on every host) and starts the runtime threads.
    pub fn start(
        config: &RuntimeConfig,
        placement: VcpuPlacement,
        regions: &[(&str, u64, u64)],
        homes: dsm_service::home::HomeMap,
        on_page_change: Option<PageChangeHook>,
        host: Arc<dyn Host>,
    ) -> Result<Arc<Runtime>, RuntimeError> {
        crate::clock::set_test_clock(config.test_clock);
        if let Some(w) = config.dsm.security.start_warning() {
            tracing::warn!(node = config.dsm.node_id, "{w}");
        }
        let node = Self::join_dsm(config, &placement, regions, homes, on_page_change)?;
        let events = node
            .take_events()
            .ok_or_else(|| RuntimeError::Dsm("the DSM's events were already taken".into()))?;
        let rt = Arc::new(Runtime::new(node, host, placement, config.hot_pages));
        let (exec_tx, app_tx) = rt.spawn_threads(events)?;
        rt.node
            .set_app_handler(Dispatcher::new(&rt, exec_tx, app_tx).into_handler());
        // Everyone has its handler installed before anyone forwards.
        rt.node
            .barrier()
            .map_err(|e| RuntimeError::Dsm(error_chain(&e)))?;
        rt.align_clock()?;
        Ok(rt)
    }

    /// Starts this host's DSM node over guest RAM.
    fn join_dsm(
        config: &RuntimeConfig,
        placement: &VcpuPlacement,
        regions: &[(&str, u64, u64)],
        homes: dsm_service::home::HomeMap,
        on_page_change: Option<PageChangeHook>,
    ) -> Result<Arc<DsmNode>, RuntimeError> {
        let opts = DsmOptions {
            homes,
            on_page_change,
            prefetch_max: config.prefetch_max,
            count_page_faults: config.hot_pages > 0,
            ..DsmOptions::default()
        };
        // Every host must run the same VM: the DSM checks the RAM layout and
        // this, the vCPUs and where each runs, at the handshake.
        let mut dsm = config.dsm.clone();
        let owners: Vec<String> = (0..placement.vcpus())
            .map(|c| placement.owner(c).map_or("?".into(), |n| n.to_string()))
            .collect();
        dsm.layout = format!("vcpus {} on nodes {}", placement.vcpus(), owners.join(","));
        DsmNode::start(&dsm, regions, opts)
            .map(Arc::new)
            .map_err(|e| RuntimeError::Dsm(error_chain(&e)))
    }

    fn new(
        node: Arc<DsmNode>,
        host: Arc<dyn Host>,
        placement: VcpuPlacement,
        hot_pages: usize,
    ) -> Runtime {
        let vcpus = placement.vcpus() as usize;
        Runtime {
            node,
            host,
            placement,
            calls: Arc::default(),
            stopping: AtomicBool::new(false),
            state: Arc::default(),
            reset: ResetGate::default(),
            counts: (0..vcpus).map(|_| VcpuCounts::default()).collect(),
            hot_pages,
            base: ClockReading::now(),
            clock: OnceLock::new(),
            steer: SharedSteer::default(),
            resyncs: AtomicU64::new(0),
        }
    }

    /// Starts the executors (origin), `fv-app` and `fv-watch`; returns the
    /// queues the dispatcher feeds.
    fn spawn_threads(
        self: &Arc<Self>,
        events: Receiver<DsmEvent>,
    ) -> Result<(mpsc::Sender<IoJob>, mpsc::Sender<AppJob>), RuntimeError> {
        let thread_err = |e: std::io::Error| RuntimeError::Dsm(e.to_string());
        let (app_tx, app_rx) = mpsc::channel::<AppJob>();
        let (exec_tx, exec_rx) = mpsc::channel::<IoJob>();
        if self.node.id() == 0 {
            self.spawn_executors(&Arc::new(Mutex::new(exec_rx)))?;
        }
        let rt = self.clone();
        spawn("fv-app".into(), move || rt.app_loop(&app_rx)).map_err(thread_err)?;
        let rt = self.clone();
        spawn("fv-watch".into(), move || rt.watch(&events)).map_err(thread_err)?;
        Ok((exec_tx, app_tx))
    }

    /// This host's node id.
    pub fn node_id(&self) -> NodeId {
        self.node.id()
    }

    /// The DSM node.
    pub fn dsm(&self) -> &DsmNode {
        &self.node
    }

    /// Whether `cpu` runs on this host.
    pub fn is_local(&self, cpu: u32) -> bool {
        self.placement.runs_on(cpu, u32::from(self.node.id()))
    }

    /// Leaves the cluster: pending calls fail, peers see a clean exit.
    pub fn shutdown(&self) {
        self.stopping.store(true, Ordering::Release);
        self.fail_calls(|| RuntimeError::Stopping);
        self.node.shutdown();
    }

    /// Whether [`Runtime::shutdown`] was called.
    fn is_stopping(&self) -> bool {
        self.stopping.load(Ordering::Acquire)
    }

    fn send(&self, to: NodeId, m: &Message) -> Result<(), RuntimeError> {
        self.node
            .send_app(to, RUNTIME_CHANNEL, &m.encode())
            .map_err(|e| RuntimeError::NodeFailed {
                node: to,
                reason: e.to_string(),
            })
    }

    /// Sends `m` to every other node; the first failure is returned, after
    /// trying them all.
    fn broadcast(&self, m: &Message) -> Result<(), RuntimeError> {
        let bytes = m.encode();
        let me = self.node.id();
        let mut first_err = Ok(());
        for to in (0..self.node.nodes() as NodeId).filter(|&n| n != me) {
            if let Err(e) = self.node.send_app(to, RUNTIME_CHANNEL, &bytes) {
                if first_err.is_ok() {
                    first_err = Err(RuntimeError::NodeFailed {
                        node: to,
                        reason: e.to_string(),
                    });
                }
            }
        }
        first_err
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{ConfigBuilder, Engine};

    fn accel(pairs: &[(&str, &str)]) -> AccelConfig {
        let mut b = ConfigBuilder::new();
        for (k, v) in pairs {
            b.set(k, v).unwrap();
        }
        b.build_with_env(Engine::Tcg, |_| None).unwrap()
    }

    const TWO: &[(&str, &str)] = &[
        ("nodes", "2"),
        ("peers", "127.0.0.1:7000;127.0.0.1:7001"),
        ("key", "0123456789abcdef"),
    ];

    #[test]
    fn every_node_derives_the_same_cluster_id() {
        let a = accel(TWO);
        let b = accel(&[TWO, &[("node-id", "1")]].concat());
        assert_eq!(cluster_id(&a), cluster_id(&b));
        let other = accel(&[
            ("nodes", "2"),
            ("peers", "127.0.0.1:7000;127.0.0.1:7002"),
            ("key", "0123456789abcdef"),
        ]);
        assert_ne!(cluster_id(&a), cluster_id(&other));
    }

    #[test]
    fn the_runtime_config_carries_the_options() {
        let cfg = accel(
            &[
                TWO,
                &[
                    ("node-id", "1"),
                    ("prefetch", "64"),
                    ("hot-pages", "30"),
                    ("test-clock-skew-ns", "-5"),
                    ("test-clock-rate-ppm", "300"),
                ],
            ]
            .concat(),
        );
        let rc = RuntimeConfig::new(&cfg, Duration::from_millis(1500)).unwrap();
        assert_eq!(rc.prefetch_max, 64);
        assert_eq!(rc.hot_pages, 30);
        assert_eq!(
            rc.test_clock,
            TestClock {
                skew_ns: -5,
                rate_ppm: 300
            }
        );
        assert_eq!(rc.dsm.node_id, 1);
        assert_eq!(rc.dsm.peer_timeout, Duration::from_millis(1500));
    }

    #[test]
    fn clock_errors_keep_their_message() {
        let err = RuntimeError::from(ClockError::NoUsableSample(0));
        assert_eq!(
            err.to_string(),
            "clock alignment with node 0 failed: no usable sample among 0 clock exchanges"
        );
    }
}
