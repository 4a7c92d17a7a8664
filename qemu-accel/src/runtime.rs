//! The per-host runtime of an aggregate VM: the DSM node plus the messages
//! that make one machine out of several QEMU processes — I/O forwarded to the
//! origin, interrupts routed to the owner of the target vCPU, APIC routing
//! state mirrored everywhere, IOAPIC EOIs sent to the origin, and
//! cluster-wide power-off and reset.
//!
//! QEMU talks to it through [`Host`] (implemented by the C glue in `ffi/`)
//! and the blocking calls on [`Runtime`]. Threads:
//!
//! * the DSM's receive threads decode runtime frames; an I/O reply only wakes
//!   the waiting vCPU thread, everything else is queued, so those threads
//!   never call into QEMU (a vCPU blocked in a fault may hold QEMU's locks);
//! * `fv-app` calls [`Host`] for interrupts, APIC state, EOIs and lifecycle
//!   events (the C side takes QEMU's big lock there);
//! * `fv-exec-N` (origin only) run forwarded I/O on the device model;
//! * `fv-watch` turns DSM events into [`Host::node_failed`] and fails the
//!   forwarded calls that wait for a dead node, so no vCPU hangs.
//!
//! Wire format: one frame per message on channel [`RUNTIME_CHANNEL`], see
//! [`Message`] and `RUNTIME.md` next to this file (messages, calls, the clock
//! exchange, lifecycle).

use std::collections::HashMap;
use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::Duration;

use dsm_service::node::{DsmOptions, PageChangeHook};
use dsm_service::transport::channel;
use dsm_service::{error_chain, DsmEvent, DsmNode, NodeId};
use thiserror::Error;
use tracing::{debug, warn};

use crate::clock::{
    ClockReading, ClockSync, MonoEstimate, SharedSteer, Steer, Steering, SyncSample, RESYNC_PERIOD,
    RESYNC_SAMPLES, SYNC_SAMPLES,
};
use crate::config::ClusterConfig;
use crate::placement::VcpuPlacement;

/// The transport channel of runtime messages.
pub const RUNTIME_CHANNEL: u8 = channel::APP_BASE;
/// Largest data of one forwarded access (string I/O moves up to a page).
pub const MAX_IO_DATA: usize = 4096;
/// Executor threads on the origin.
const EXECUTORS: usize = 2;

/// Address space of a forwarded access.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum IoSpace {
    /// Port I/O.
    Pio = 0,
    /// Memory-mapped I/O.
    Mmio = 1,
}

/// One forwarded device access.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IoAccess {
    /// vCPU that made it.
    pub cpu: u32,
    /// Port or memory space.
    pub space: IoSpace,
    /// Port number or guest-physical address.
    pub addr: u64,
    /// Bytes per element (1, 2, 4, 8).
    pub size: u8,
    /// Elements (string I/O), at least 1.
    pub count: u32,
    /// A write (data goes to the device) or a read.
    pub is_write: bool,
    /// QEMU's `MemTxAttrs`, as bits.
    pub attrs: u32,
}

impl IoAccess {
    /// Bytes of data the access moves.
    pub fn len(&self) -> usize {
        usize::from(self.size) * self.count as usize
    }

    /// Whether it moves no data.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// How an interrupt is delivered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum IrqKind {
    /// Fixed or lowest-priority vector (APIC IRR).
    Fixed = 0,
    /// NMI.
    Nmi = 1,
    /// SMI.
    Smi = 2,
    /// INIT.
    Init = 3,
    /// Startup IPI with a vector.
    Sipi = 4,
}

/// An interrupt for a vCPU that another host runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Irq {
    /// Target vCPU.
    pub cpu: u32,
    /// Kind.
    pub kind: IrqKind,
    /// Vector (Fixed, SIPI).
    pub vector: u8,
    /// Level-triggered (Fixed).
    pub level: bool,
}

/// The routing state of a vCPU's local APIC, mirrored on every host because
/// the sender of an interrupt computes its destinations.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ApicState {
    /// vCPU.
    pub cpu: u32,
    /// APIC ID register.
    pub id: u32,
    /// Logical destination register.
    pub ldr: u32,
    /// Destination format register.
    pub dfr: u32,
    /// IA32_APIC_BASE.
    pub apicbase: u64,
}

/// Events that concern every host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lifecycle {
    /// The guest powered off: every node exits 0.
    PowerOff,
    /// The guest reset: every node resets its vCPUs.
    Reset,
    /// The VM ended with this exit status on the sender (e.g. the guest
    /// wrote to `isa-debug-exit`): every node exits with it.
    Exit(i32),
}

impl Lifecycle {
    /// Wire code (also the C ABI's event number).
    pub fn code(self) -> u8 {
        match self {
            Lifecycle::PowerOff => 0,
            Lifecycle::Reset => 1,
            Lifecycle::Exit(_) => 2,
        }
    }

    /// The VM ends: peers that leave afterwards have not failed.
    pub fn ends_vm(self) -> bool {
        !matches!(self, Lifecycle::Reset)
    }
}

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
}

/// Wire messages (little endian), one per frame, first byte the tag.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// 1: `seq u32, cpu u32, space u8, write u8, size u8, count u32, addr u64, attrs u32, data`.
    IoRequest {
        /// Matches the reply.
        seq: u32,
        /// The access.
        access: IoAccess,
        /// Data of a write.
        data: Vec<u8>,
    },
    /// 2: `seq u32, result u32, data`.
    IoReply {
        /// Of the request.
        seq: u32,
        /// `MemTxResult`.
        result: u32,
        /// Data of a read.
        data: Vec<u8>,
    },
    /// 3: `cpu u32, kind u8, vector u8, level u8`.
    Irq(Irq),
    /// 4: `cpu u32, id u32, ldr u32, dfr u32, apicbase u64`.
    Apic(ApicState),
    /// 5: `vector u8`.
    IoapicEoi(u8),
    /// 6: `event u8, status i32` (event 0 power-off, 1 reset, 2 exit with
    /// `status`; the status is 0 for the others).
    Lifecycle(Lifecycle),
    /// 7: `seq u32`. A non-origin node asks for the origin's clocks.
    ClockPing {
        /// Matches the answer.
        seq: u32,
    },
    /// 8: `seq u32, tsc u64, mono_ns u64, base_tsc u64, base_mono_ns u64`.
    /// The origin's clocks when it answered, and its base reading (the
    /// guest clock's zero).
    ClockPong {
        /// Of the ping.
        seq: u32,
        /// The origin's clocks now.
        now: ClockReading,
        /// The origin's base reading.
        base: ClockReading,
    },
}

/// A frame that is not a runtime message.
#[derive(Debug, Error, PartialEq, Eq)]
#[error("malformed runtime message: {0}")]
pub struct DecodeError(String);

struct Rd<'a>(&'a [u8]);

impl Rd<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8], DecodeError> {
        if self.0.len() < n {
            return Err(DecodeError(format!(
                "truncated: need {n} bytes, {} left",
                self.0.len()
            )));
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Ok(a)
    }
    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1)?[0])
    }
    fn u32(&mut self) -> Result<u32, DecodeError> {
        Ok(u32::from_le_bytes(
            self.take(4)?.try_into().expect("4 bytes"),
        ))
    }
    fn u64(&mut self) -> Result<u64, DecodeError> {
        Ok(u64::from_le_bytes(
            self.take(8)?.try_into().expect("8 bytes"),
        ))
    }
}

impl Message {
    /// Wire form.
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(32);
        match self {
            Message::IoRequest {
                seq,
                access: a,
                data,
            } => {
                b.push(1);
                b.extend_from_slice(&seq.to_le_bytes());
                b.extend_from_slice(&a.cpu.to_le_bytes());
                b.push(a.space as u8);
                b.push(u8::from(a.is_write));
                b.push(a.size);
                b.extend_from_slice(&a.count.to_le_bytes());
                b.extend_from_slice(&a.addr.to_le_bytes());
                b.extend_from_slice(&a.attrs.to_le_bytes());
                b.extend_from_slice(data);
            }
            Message::IoReply { seq, result, data } => {
                b.push(2);
                b.extend_from_slice(&seq.to_le_bytes());
                b.extend_from_slice(&result.to_le_bytes());
                b.extend_from_slice(data);
            }
            Message::Irq(i) => {
                b.push(3);
                b.extend_from_slice(&i.cpu.to_le_bytes());
                b.extend_from_slice(&[i.kind as u8, i.vector, u8::from(i.level)]);
            }
            Message::Apic(s) => {
                b.push(4);
                for v in [s.cpu, s.id, s.ldr, s.dfr] {
                    b.extend_from_slice(&v.to_le_bytes());
                }
                b.extend_from_slice(&s.apicbase.to_le_bytes());
            }
            Message::IoapicEoi(v) => b.extend_from_slice(&[5, *v]),
            Message::Lifecycle(e) => {
                b.extend_from_slice(&[6, e.code()]);
                let status = if let Lifecycle::Exit(c) = e { *c } else { 0 };
                b.extend_from_slice(&status.to_le_bytes());
            }
            Message::ClockPing { seq } => {
                b.push(7);
                b.extend_from_slice(&seq.to_le_bytes());
            }
            Message::ClockPong { seq, now, base } => {
                b.push(8);
                b.extend_from_slice(&seq.to_le_bytes());
                for v in [now.tsc, now.mono_ns, base.tsc, base.mono_ns] {
                    b.extend_from_slice(&v.to_le_bytes());
                }
            }
        }
        b
    }

    /// The request number a reply answers (`None` for other messages).
    pub fn reply_seq(&self) -> Option<u32> {
        match self {
            Message::IoReply { seq, .. } | Message::ClockPong { seq, .. } => Some(*seq),
            _ => None,
        }
    }

    /// Parses one message.
    pub fn decode(buf: &[u8]) -> Result<Message, DecodeError> {
        let mut r = Rd(buf);
        let m = match r.u8()? {
            1 => {
                let seq = r.u32()?;
                let cpu = r.u32()?;
                let space = match r.u8()? {
                    0 => IoSpace::Pio,
                    1 => IoSpace::Mmio,
                    s => return Err(DecodeError(format!("address space {s}"))),
                };
                let is_write = r.u8()? != 0;
                let size = r.u8()?;
                let count = r.u32()?;
                let addr = r.u64()?;
                let attrs = r.u32()?;
                let access = IoAccess {
                    cpu,
                    space,
                    addr,
                    size,
                    count,
                    is_write,
                    attrs,
                };
                if !matches!(size, 1 | 2 | 4 | 8) || count == 0 || access.len() > MAX_IO_DATA {
                    return Err(DecodeError(format!("access of {count} x {size} bytes")));
                }
                let data = r.take(if is_write { access.len() } else { 0 })?.to_vec();
                Message::IoRequest { seq, access, data }
            }
            2 => Message::IoReply {
                seq: r.u32()?,
                result: r.u32()?,
                data: r.take(r.0.len())?.to_vec(),
            },
            3 => {
                let cpu = r.u32()?;
                let kind = match r.u8()? {
                    0 => IrqKind::Fixed,
                    1 => IrqKind::Nmi,
                    2 => IrqKind::Smi,
                    3 => IrqKind::Init,
                    4 => IrqKind::Sipi,
                    k => return Err(DecodeError(format!("interrupt kind {k}"))),
                };
                Message::Irq(Irq {
                    cpu,
                    kind,
                    vector: r.u8()?,
                    level: r.u8()? != 0,
                })
            }
            4 => Message::Apic(ApicState {
                cpu: r.u32()?,
                id: r.u32()?,
                ldr: r.u32()?,
                dfr: r.u32()?,
                apicbase: r.u64()?,
            }),
            5 => Message::IoapicEoi(r.u8()?),
            6 => {
                let event = r.u8()?;
                let status = r.u32()? as i32;
                Message::Lifecycle(match event {
                    0 => Lifecycle::PowerOff,
                    1 => Lifecycle::Reset,
                    2 => Lifecycle::Exit(status),
                    e => return Err(DecodeError(format!("lifecycle event {e}"))),
                })
            }
            7 => Message::ClockPing { seq: r.u32()? },
            8 => Message::ClockPong {
                seq: r.u32()?,
                now: ClockReading {
                    tsc: r.u64()?,
                    mono_ns: r.u64()?,
                },
                base: ClockReading {
                    tsc: r.u64()?,
                    mono_ns: r.u64()?,
                },
            },
            t => return Err(DecodeError(format!("unknown tag {t}"))),
        };
        if !r.0.is_empty() {
            return Err(DecodeError(format!("{} trailing bytes", r.0.len())));
        }
        Ok(m)
    }
}

/// A call to another node waiting for its reply.
enum Slot {
    Waiting,
    Done(Message),
    Failed(RuntimeError),
}

struct Calls {
    slots: Mutex<HashMap<u32, Slot>>,
    cv: Condvar,
}

/// Per-vCPU counts for the exit summary.
#[derive(Debug, Default)]
struct VcpuCounts {
    forwarded: AtomicU64,
}

/// One host's runtime.
pub struct Runtime {
    node: Arc<DsmNode>,
    host: Arc<dyn Host>,
    placement: VcpuPlacement,
    calls: Arc<Calls>,
    seq: AtomicU32,
    stopping: Arc<AtomicBool>,
    /// A power-off was seen: peers leaving afterwards is no failure.
    ending: Arc<AtomicBool>,
    counts: Vec<VcpuCounts>,
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

/// A forwarded access waiting for an executor: requester, sequence number,
/// the access and the data of a write.
type IoJob = (NodeId, u32, IoAccess, Vec<u8>);

enum AppJob {
    Message(NodeId, Message),
}

/// A cluster id every node derives alike from the peer list.
fn cluster_id(cfg: &ClusterConfig) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for p in &cfg.peers {
        for b in p.to_string().bytes().chain([0]) {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x100_0000_01b3);
        }
    }
    h
}

/// The DSM's view of a cluster configuration.
pub fn dsm_config(
    cfg: &ClusterConfig,
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
    Ok(d)
}

/// Read-ahead of the DSM for guest RAM: none unless
/// `FRAGVISOR_DSM_PREFETCH=N` asks for it. A 2-node Linux boot first
/// livelocked with read-ahead on; the cause was a lost wake-up in the DSM (a
/// write fault absorbed by an outstanding prefetch, fixed since), and 2- and
/// 4-node boots pass with `FRAGVISOR_DSM_PREFETCH=64`, but they are not
/// faster and take no fewer faults (docs/aggregate-vm.md, "Benchmark"), so
/// it stays off: a booting kernel spins next to data that other hosts write,
/// and pages fetched ahead take those pages away from their writers.
pub fn guest_prefetch_max() -> u32 {
    env_u32("FRAGVISOR_DSM_PREFETCH")
}

/// `FRAGVISOR_DSM_HOT_PAGES=N`: count each guest page's DSM faults and list
/// the `N` with the most under the exit summary (a diagnostic for guests
/// whose pages move back and forth between hosts); 0 (the default): off.
pub fn hot_pages_listed() -> usize {
    env_u32("FRAGVISOR_DSM_HOT_PAGES") as usize
}

fn env_u32(name: &str) -> u32 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

impl Runtime {
    /// Joins the cluster with guest RAM `regions` (`(name, host address,
    /// length)`, identical on every host) and starts the runtime threads.
    pub fn start(
        dsm: &dsm_service::ClusterConfig,
        placement: VcpuPlacement,
        regions: &[(&str, u64, u64)],
        homes: dsm_service::home::HomeMap,
        on_page_change: Option<PageChangeHook>,
        host: Arc<dyn Host>,
    ) -> Result<Arc<Runtime>, RuntimeError> {
        let opts = DsmOptions {
            homes,
            on_page_change,
            prefetch_max: guest_prefetch_max(),
            count_page_faults: hot_pages_listed() > 0,
            ..DsmOptions::default()
        };
        let node =
            DsmNode::start(dsm, regions, opts).map_err(|e| RuntimeError::Dsm(error_chain(&e)))?;
        let node = Arc::new(node);
        let events = node.take_events().expect("first take");
        let vcpus = placement.vcpus() as usize;
        let rt = Arc::new(Runtime {
            node: node.clone(),
            host,
            placement,
            calls: Arc::new(Calls {
                slots: Mutex::new(HashMap::new()),
                cv: Condvar::new(),
            }),
            seq: AtomicU32::new(1),
            stopping: Arc::new(AtomicBool::new(false)),
            ending: Arc::new(AtomicBool::new(false)),
            counts: (0..vcpus).map(|_| VcpuCounts::default()).collect(),
            base: ClockReading::now(),
            clock: OnceLock::new(),
            steer: SharedSteer::default(),
            resyncs: AtomicU64::new(0),
        });
        let (app_tx, app_rx) = mpsc::channel::<AppJob>();
        let (exec_tx, exec_rx) = mpsc::channel::<IoJob>();
        let exec_rx = Arc::new(Mutex::new(exec_rx));
        if node.id() == 0 {
            for k in 0..EXECUTORS {
                let rt2 = rt.clone();
                let rx = exec_rx.clone();
                std::thread::Builder::new()
                    .name(format!("fv-exec-{k}"))
                    .spawn(move || rt2.executor(&format!("fv-exec-{k}"), &rx))
                    .map_err(|e| RuntimeError::Dsm(e.to_string()))?;
            }
        }
        {
            let rt2 = rt.clone();
            std::thread::Builder::new()
                .name("fv-app".into())
                .spawn(move || rt2.app_loop(&app_rx))
                .map_err(|e| RuntimeError::Dsm(e.to_string()))?;
        }
        {
            let rt2 = rt.clone();
            std::thread::Builder::new()
                .name("fv-watch".into())
                .spawn(move || rt2.watch(&events))
                .map_err(|e| RuntimeError::Dsm(e.to_string()))?;
        }
        let calls = rt.calls.clone();
        let ending = rt.ending.clone();
        let me = node.id();
        let base = rt.base;
        let weak_node = Arc::downgrade(&node);
        node.set_app_handler(Arc::new(move |from, ch, payload: &[u8]| {
            if ch != RUNTIME_CHANNEL {
                return;
            }
            match Message::decode(payload) {
                Ok(Message::ClockPing { seq }) if me == 0 => {
                    // Answered here, at once: the reading's delay is what the
                    // estimate's error bound counts.
                    let pong = Message::ClockPong {
                        seq,
                        now: ClockReading::now(),
                        base,
                    };
                    if let Some(n) = weak_node.upgrade() {
                        if let Err(e) = n.send_app(from, RUNTIME_CHANNEL, &pong.encode()) {
                            debug!(error = %e, peer = from, "clock answer dropped");
                        }
                    }
                }
                Ok(m @ (Message::IoReply { .. } | Message::ClockPong { .. })) => {
                    let seq = m.reply_seq().expect("a reply");
                    let mut s = calls.slots.lock().expect("lock");
                    if let Some(slot) = s.get_mut(&seq) {
                        *slot = Slot::Done(m);
                        calls.cv.notify_all();
                    }
                }
                Ok(Message::IoRequest { seq, access, data }) if me == 0 => {
                    let _ = exec_tx.send((from, seq, access, data));
                }
                Ok(m) => {
                    if matches!(m, Message::Lifecycle(e) if e.ends_vm()) {
                        // Before the sender's connection closes: its exit is
                        // no failure.
                        ending.store(true, Ordering::Release);
                    }
                    let _ = app_tx.send(AppJob::Message(from, m));
                }
                Err(e) => warn!(node = me, peer = from, error = %e, "dropped runtime frame"),
            }
        }));
        // Everyone has its handler installed before anyone forwards.
        node.barrier()
            .map_err(|e| RuntimeError::Dsm(error_chain(&e)))?;
        // The origin defines the clock; every other node measures it and
        // keeps steering towards it (its best exchange starts the drift).
        let (clock, first) = if me == 0 {
            (ClockSync::origin(rt.base), None)
        } else {
            let (samples, base) = rt.clock_samples(SYNC_SAMPLES)?;
            let first = MonoEstimate::best(&samples)?;
            (ClockSync::estimate(&samples, base)?, Some(first))
        };
        rt.steer.update(|_| Steer::fixed(clock.mono.offset));
        rt.clock.set(clock).expect("clock set once");
        if let Some(first) = first {
            let rt2 = rt.clone();
            std::thread::Builder::new()
                .name("fv-clock".into())
                .spawn(move || rt2.steer_clock(clock, first))
                .map_err(|e| RuntimeError::Clock(e.to_string()))?;
        }
        Ok(rt)
    }

    /// `n` clock exchanges with the origin, and the origin's base reading.
    fn clock_samples(&self, n: usize) -> Result<(Vec<SyncSample>, ClockReading), RuntimeError> {
        let mut samples = Vec::with_capacity(n);
        let mut base = ClockReading::default();
        for _ in 0..n {
            let sent = ClockReading::now();
            let reply = self.call(0, |seq| Message::ClockPing { seq })?;
            let received = ClockReading::now();
            let Message::ClockPong { now, base: b, .. } = reply else {
                return Err(RuntimeError::Clock(format!(
                    "node 0 answered a clock ping with {reply:?}"
                )));
            };
            base = b;
            samples.push(SyncSample {
                sent,
                origin: now,
                received,
            });
        }
        Ok((samples, base))
    }

    /// The `fv-clock` thread of a non-origin node: every [`RESYNC_PERIOD`]
    /// a few exchanges with the origin; the best one, if its round trip is
    /// short enough to trust, updates the drift rate and retargets the
    /// guest clock ([`crate::clock`]). Ends when the runtime stops.
    fn steer_clock(&self, initial: ClockSync, first: MonoEstimate) {
        let mut steering = Steering::new(&initial, first);
        while self.sleep_unless_stopping(RESYNC_PERIOD) {
            let est = match self
                .clock_samples(RESYNC_SAMPLES)
                .and_then(|(samples, _)| MonoEstimate::best(&samples))
            {
                Ok(e) => e,
                Err(e) => {
                    debug!(error = %e, "clock exchange failed");
                    continue;
                }
            };
            let now = crate::clock::mono_ns();
            let mut steered = false;
            self.steer
                .update(|current| match steering.step(est, now, current) {
                    Some(next) => {
                        steered = true;
                        next
                    }
                    None => current,
                });
            if steered {
                self.resyncs.fetch_add(1, Ordering::Relaxed);
            } else {
                debug!(bound = est.bound, "clock exchange too slow to use");
            }
        }
    }

    /// Sleeps `period` in short steps; false once the runtime is stopping.
    fn sleep_unless_stopping(&self, period: Duration) -> bool {
        let step = Duration::from_millis(50);
        let mut left = period;
        while !left.is_zero() {
            if self.stopping.load(Ordering::Acquire) {
                return false;
            }
            let d = left.min(step);
            std::thread::sleep(d);
            left -= d;
        }
        !self.stopping.load(Ordering::Acquire)
    }

    /// The guest clock now, in ns since the cluster started (the TCG
    /// engine's 1 GHz guest TSC): the origin's monotonic clock, as this
    /// host steers towards it.
    pub fn guest_ns(&self) -> u64 {
        self.steer.guest_now()
    }

    /// How this host's clocks map to the guest clock.
    pub fn clock(&self) -> ClockSync {
        self.clock.get().copied().unwrap_or_default()
    }

    /// Sends the request `request(seq)` (numbered by this node) to `to` and
    /// waits for the reply with the same number, or for `to`'s failure.
    fn call(
        &self,
        to: NodeId,
        request: impl FnOnce(u32) -> Message,
    ) -> Result<Message, RuntimeError> {
        if self.stopping.load(Ordering::Acquire) {
            return Err(RuntimeError::Stopping);
        }
        let seq = self.seq.fetch_add(1, Ordering::Relaxed);
        let msg = request(seq);
        self.calls
            .slots
            .lock()
            .expect("lock")
            .insert(seq, Slot::Waiting);
        if let Err(e) = self.node.send_app(to, RUNTIME_CHANNEL, &msg.encode()) {
            self.calls.slots.lock().expect("lock").remove(&seq);
            return Err(RuntimeError::NodeFailed {
                node: to,
                reason: e.to_string(),
            });
        }
        let mut slots = self.calls.slots.lock().expect("lock");
        loop {
            match slots.remove(&seq) {
                Some(Slot::Waiting) | None => {
                    slots.insert(seq, Slot::Waiting);
                    slots = self.calls.cv.wait(slots).expect("lock");
                }
                Some(Slot::Done(reply)) => return Ok(reply),
                Some(Slot::Failed(e)) => return Err(e),
            }
        }
    }

    /// This host's node id.
    pub fn node_id(&self) -> NodeId {
        self.node.id()
    }

    /// The DSM node.
    pub fn dsm(&self) -> &DsmNode {
        &self.node
    }

    /// Forwards an access by a local vCPU to the origin and waits for the
    /// result; `data` carries the bytes written or receives those read.
    pub fn forward_io(&self, access: &IoAccess, data: &mut [u8]) -> Result<u32, RuntimeError> {
        if access.len() > MAX_IO_DATA || data.len() < access.len() {
            return Err(RuntimeError::TooLarge(access.len()));
        }
        if let Some(c) = self.counts.get(access.cpu as usize) {
            c.forwarded.fetch_add(1, Ordering::Relaxed);
        }
        let payload = if access.is_write {
            data[..access.len()].to_vec()
        } else {
            Vec::new()
        };
        let request = |seq| Message::IoRequest {
            seq,
            access: *access,
            data: payload,
        };
        match self.call(0, request)? {
            Message::IoReply {
                result,
                data: reply,
                ..
            } => {
                if !access.is_write {
                    let n = reply.len().min(access.len());
                    data[..n].copy_from_slice(&reply[..n]);
                }
                Ok(result)
            }
            other => Err(RuntimeError::NodeFailed {
                node: 0,
                reason: format!("answered an I/O request with {other:?}"),
            }),
        }
    }

    /// Sends an interrupt to the host that runs `irq.cpu`.
    pub fn send_irq(&self, irq: &Irq) -> Result<(), RuntimeError> {
        let owner = self
            .placement
            .owner(irq.cpu)
            .ok_or(RuntimeError::TooLarge(0))? as NodeId;
        self.send(owner, &Message::Irq(*irq))
    }

    /// Mirrors a local vCPU's APIC routing state to every other host.
    pub fn broadcast_apic_state(&self, state: &ApicState) -> Result<(), RuntimeError> {
        self.broadcast(&Message::Apic(*state))
    }

    /// Sends an IOAPIC EOI to the origin.
    pub fn send_ioapic_eoi(&self, vector: u8) -> Result<(), RuntimeError> {
        self.send(0, &Message::IoapicEoi(vector))
    }

    /// Tells every other host about a power-off, reset or exit.
    pub fn broadcast_lifecycle(&self, event: Lifecycle) -> Result<(), RuntimeError> {
        if event.ends_vm() {
            self.ending.store(true, Ordering::Release);
        }
        self.broadcast(&Message::Lifecycle(event))
    }

    /// Whether `cpu` runs on this host.
    pub fn is_local(&self, cpu: u32) -> bool {
        self.placement.runs_on(cpu, u32::from(self.node.id()))
    }

    /// The line printed at exit: node id, the vCPUs it ran with their
    /// forwarded-exit counts plus `extra` per vCPU (exits or TCG blocks the
    /// C side counted), DSM faults taken and served, bytes moved.
    pub fn summary(&self, extra: &dyn Fn(u32) -> u64) -> String {
        let me = u32::from(self.node.id());
        let s = self.node.stats();
        let vcpus: Vec<String> = self
            .placement
            .vcpus_of(me)
            .map(|c| {
                let fwd = self
                    .counts
                    .get(c as usize)
                    .map_or(0, |k| k.forwarded.load(Ordering::Relaxed));
                format!("cpu{c}:{}", extra(c) + fwd)
            })
            .collect();
        let mut line = format!(
            "fragvisor: node {me} summary: vcpus=[{}] dsm_faults={} dsm_served={} bytes_sent={} bytes_received={} clock_bound_ns={} clock_resyncs={} clock_rate_ppb={}",
            vcpus.join(","),
            s.faults(),
            s.served,
            s.bytes_sent,
            s.bytes_received,
            self.clock().mono.bound,
            self.resyncs.load(Ordering::Relaxed),
            self.steer.load().rate_ppb
        );
        let hot = self.node.hottest_pages(hot_pages_listed());
        if !hot.is_empty() {
            let total: u64 = s.faults();
            let listed: u64 = hot.iter().map(|&(_, n)| u64::from(n)).sum();
            let pages: Vec<String> = hot
                .iter()
                .map(|&(addr, n)| format!("{}:{n}", self.page_name(addr)))
                .collect();
            line.push_str(&format!(
                "\nfragvisor: node {me} hottest pages ({listed} of {total} faults): {}",
                pages.join(" ")
            ));
        }
        line
    }

    /// `region+0xoffset` of a guest RAM host address.
    fn page_name(&self, addr: u64) -> String {
        match self.node.space().region_of(addr) {
            Some((r, offset)) => format!("{}+{offset:#x}", r.name),
            None => format!("{addr:#x}"),
        }
    }

    /// Leaves the cluster: pending calls fail, peers see a clean exit.
    pub fn shutdown(&self) {
        self.stopping.store(true, Ordering::Release);
        self.fail_calls(|| RuntimeError::Stopping);
        self.node.shutdown();
    }

    fn send(&self, to: NodeId, m: &Message) -> Result<(), RuntimeError> {
        self.node
            .send_app(to, RUNTIME_CHANNEL, &m.encode())
            .map_err(|e| RuntimeError::NodeFailed {
                node: to,
                reason: e.to_string(),
            })
    }

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

    fn fail_calls(&self, err: impl Fn() -> RuntimeError) {
        let mut slots = self.calls.slots.lock().expect("lock");
        for s in slots.values_mut() {
            if matches!(s, Slot::Waiting) {
                *s = Slot::Failed(err());
            }
        }
        self.calls.cv.notify_all();
    }

    fn executor(&self, name: &str, rx: &Mutex<Receiver<IoJob>>) {
        self.host.thread_start(name);
        loop {
            let job = rx.lock().expect("lock").recv();
            let Ok((from, seq, access, mut data)) = job else {
                return;
            };
            data.resize(access.len(), 0);
            let result = self.host.exec_io(&access, &mut data);
            let reply = Message::IoReply {
                seq,
                result,
                data: if access.is_write { Vec::new() } else { data },
            };
            if let Err(e) = self.send(from, &reply) {
                debug!(error = %e, "reply to a failed node dropped");
            }
        }
    }

    fn app_loop(&self, rx: &Receiver<AppJob>) {
        self.host.thread_start("fv-app");
        while let Ok(AppJob::Message(from, m)) = rx.recv() {
            match m {
                Message::Irq(irq) => self.host.deliver_irq(&irq),
                Message::Apic(s) => self.host.apic_state(&s),
                Message::IoapicEoi(v) => self.host.ioapic_eoi(v),
                Message::Lifecycle(e) => {
                    if e.ends_vm() {
                        self.ending.store(true, Ordering::Release);
                    }
                    self.host.lifecycle(e, from);
                }
                Message::IoRequest { .. }
                | Message::IoReply { .. }
                | Message::ClockPing { .. }
                | Message::ClockPong { .. } => {}
            }
        }
    }

    fn watch(&self, events: &Receiver<DsmEvent>) {
        while let Ok(ev) = events.recv() {
            if matches!(ev, DsmEvent::PeerFailed { .. } | DsmEvent::PeerLeft { .. })
                && self.ending.load(Ordering::Acquire)
            {
                // A power-off is under way: peers that exit first may close
                // their connections abruptly. Nobody waits for them.
                self.fail_calls(|| RuntimeError::Stopping);
                continue;
            }
            let (node, reason) = match ev {
                DsmEvent::PeerFailed { node, reason } => (node, reason),
                DsmEvent::PeerLeft { node } => {
                    if self.stopping.load(Ordering::Acquire) {
                        continue;
                    }
                    (
                        node,
                        "left the cluster while the VM was running".to_string(),
                    )
                }
                DsmEvent::Fatal(what) => (self.node.id(), what),
                DsmEvent::ProtocolError { node, what } => {
                    warn!(peer = node, %what, "protocol error");
                    continue;
                }
            };
            if self.stopping.load(Ordering::Acquire) {
                continue;
            }
            self.fail_calls(|| RuntimeError::NodeFailed {
                node,
                reason: reason.clone(),
            });
            self.host.node_failed(node, &reason);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_message_round_trips() {
        let access = IoAccess {
            cpu: 3,
            space: IoSpace::Pio,
            addr: 0x3f8,
            size: 1,
            count: 4,
            is_write: true,
            attrs: 1,
        };
        let msgs = vec![
            Message::IoRequest {
                seq: 9,
                access,
                data: vec![1, 2, 3, 4],
            },
            Message::IoRequest {
                seq: 10,
                access: IoAccess {
                    is_write: false,
                    space: IoSpace::Mmio,
                    size: 8,
                    count: 1,
                    ..access
                },
                data: vec![],
            },
            Message::IoReply {
                seq: 10,
                result: 0,
                data: vec![9; 8],
            },
            Message::Irq(Irq {
                cpu: 2,
                kind: IrqKind::Sipi,
                vector: 0x9a,
                level: false,
            }),
            Message::Apic(ApicState {
                cpu: 1,
                id: 1 << 24,
                ldr: 2 << 24,
                dfr: u32::MAX,
                apicbase: 0xfee0_0900,
            }),
            Message::IoapicEoi(0x31),
            Message::Lifecycle(Lifecycle::Reset),
            Message::Lifecycle(Lifecycle::PowerOff),
            Message::Lifecycle(Lifecycle::Exit(33)),
            Message::Lifecycle(Lifecycle::Exit(-1)),
            Message::ClockPing { seq: 77 },
            Message::ClockPong {
                seq: 77,
                now: ClockReading {
                    tsc: u64::MAX,
                    mono_ns: 12,
                },
                base: ClockReading { tsc: 3, mono_ns: 4 },
            },
        ];
        for m in msgs {
            assert_eq!(Message::decode(&m.encode()), Ok(m));
        }
    }

    #[test]
    fn malformed_messages_are_named() {
        assert!(Message::decode(&[]).unwrap_err().0.contains("truncated"));
        assert_eq!(Message::decode(&[42]).unwrap_err().0, "unknown tag 42");
        assert!(Message::decode(&[6, 7, 0, 0, 0, 0])
            .unwrap_err()
            .0
            .contains("lifecycle event 7"));
        assert!(Message::decode(&[5, 1, 2])
            .unwrap_err()
            .0
            .contains("trailing"));
        let mut big = Message::IoRequest {
            seq: 1,
            access: IoAccess {
                cpu: 0,
                space: IoSpace::Pio,
                addr: 0,
                size: 4,
                count: 2000,
                is_write: false,
                attrs: 0,
            },
            data: vec![],
        }
        .encode();
        assert!(Message::decode(&big).unwrap_err().0.contains("2000 x 4"));
        big[10] = 3;
        assert!(Message::decode(&big).is_err());
    }
}
