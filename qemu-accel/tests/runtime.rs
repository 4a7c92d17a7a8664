//! Two hosts' runtimes in one process, over loopback TCP: forwarded I/O,
//! interrupts, APIC state, EOIs, lifecycle and failure reach the right side.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dsm_service::home::HomeMap;
use qemu_accel::runtime::{
    ApicState, Host, IoAccess, IoSpace, Irq, IrqKind, Lifecycle, ResetOrigin, Runtime,
    RuntimeConfig,
};
use qemu_accel::{AccelConfig, ClusterKey, Engine, PeerAddr, VcpuPlacement};

#[derive(Default)]
struct Recorder {
    log: Mutex<Vec<String>>,
}

impl Recorder {
    fn push(&self, s: String) {
        self.log.lock().unwrap().push(s);
    }
    fn wait_for(&self, needle: &str) {
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(10) {
            if self.has(needle) {
                return;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        panic!("never saw {needle:?}; log: {:?}", self.log.lock().unwrap());
    }
    fn has(&self, needle: &str) -> bool {
        self.log.lock().unwrap().iter().any(|l| l.contains(needle))
    }
}

impl Host for Recorder {
    fn exec_io(&self, a: &IoAccess, data: &mut [u8]) -> u32 {
        if a.is_write {
            self.push(format!(
                "io write cpu{} {:?} {:#x} {:?}",
                a.cpu, a.space, a.addr, data
            ));
        } else {
            for (i, b) in data.iter_mut().enumerate() {
                *b = 0xa0 + i as u8;
            }
            self.push(format!(
                "io read cpu{} {:?} {:#x} len{}",
                a.cpu,
                a.space,
                a.addr,
                data.len()
            ));
        }
        0
    }
    fn deliver_irq(&self, irq: &Irq) {
        self.push(format!(
            "irq cpu{} {:?} {:#x}",
            irq.cpu, irq.kind, irq.vector
        ));
    }
    fn apic_state(&self, s: &ApicState) {
        self.push(format!("apic cpu{} id{:#x}", s.cpu, s.id));
    }
    fn ioapic_eoi(&self, v: u8) {
        self.push(format!("eoi {v:#x}"));
    }
    fn lifecycle(&self, e: Lifecycle, from: u16) {
        self.push(format!("lifecycle {e:?} from {from}"));
    }
    fn node_failed(&self, node: u16, reason: &str) {
        self.push(format!("failed node {node}: {reason}"));
    }
    fn thread_start(&self, _name: &str) {}
}

fn region(pages: usize) -> u64 {
    // SAFETY: a fresh anonymous mapping, checked.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            pages * 4096,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    assert_ne!(p, libc::MAP_FAILED);
    p as u64
}

type Side = (Arc<Runtime>, Arc<Recorder>);

fn pair() -> (Side, Side) {
    let addrs = dsm_service::transport::free_loopback_addrs(2).unwrap();
    let peers: Vec<PeerAddr> = addrs
        .iter()
        .map(|a| PeerAddr {
            host: a.ip().to_string(),
            port: a.port(),
        })
        .collect();
    let start = |id: u32| {
        let cfg = AccelConfig {
            engine: Engine::Tcg,
            nodes: 2,
            node_id: id,
            peers: peers.clone(),
            key: Some(ClusterKey::new(b"runtime-test-key-0123".to_vec(), "key").unwrap()),
            vcpu_map: vec![],
            peer_timeout_ms: None,
            transport_security: Default::default(),
            prefetch: 0,
            hot_pages: 0,
            log: None,
            test_clock_skew_ns: 0,
            test_clock_rate_ppm: 0,
        };
        let host = Arc::new(Recorder::default());
        let h2: Arc<dyn Host> = host.clone();
        std::thread::spawn(move || {
            let config = RuntimeConfig::new(&cfg, Duration::from_secs(5)).unwrap();
            let placement = VcpuPlacement::contiguous(2, 2).unwrap();
            let base = region(16);
            let rt = Runtime::start(
                &config,
                placement,
                &[("ram", base, 16 * 4096)],
                HomeMap::all_on(0),
                None,
                h2,
            )
            .unwrap();
            (rt, host)
        })
    };
    let a = start(0);
    let b = start(1);
    (a.join().unwrap(), b.join().unwrap())
}

#[test]
fn forwarding_interrupts_and_failure_reach_the_right_host() {
    let ((r0, h0), (r1, h1)) = pair();
    assert!(r0.is_local(0) && !r0.is_local(1));
    assert!(r1.is_local(1) && !r1.is_local(0));

    // String port I/O written by vCPU 1 runs on the origin's devices.
    let out = IoAccess {
        cpu: 1,
        space: IoSpace::Pio,
        addr: 0x3f8,
        size: 1,
        count: 2,
        is_write: true,
        attrs: 0,
    };
    let mut data = *b"hi";
    assert_eq!(r1.forward_io(&out, &mut data).unwrap(), 0);
    assert!(h0.has("io write cpu1 Pio 0x3f8 [104, 105]"));
    // An MMIO read returns the origin's bytes.
    let read = IoAccess {
        space: IoSpace::Mmio,
        addr: 0xfed0_0000,
        size: 4,
        count: 1,
        is_write: false,
        ..out
    };
    let mut buf = [0u8; 4];
    r1.forward_io(&read, &mut buf).unwrap();
    assert_eq!(buf, [0xa0, 0xa1, 0xa2, 0xa3]);

    // Interrupts go to the owner of the target vCPU.
    let sipi = Irq {
        cpu: 1,
        kind: IrqKind::Sipi,
        vector: 0x9a,
        level: false,
    };
    r0.send_irq(&sipi).unwrap();
    h1.wait_for("irq cpu1 Sipi 0x9a");
    let fixed = Irq {
        cpu: 0,
        kind: IrqKind::Fixed,
        vector: 0xf0,
        level: false,
    };
    r1.send_irq(&fixed).unwrap();
    h0.wait_for("irq cpu0 Fixed 0xf0");
    let apic = ApicState {
        cpu: 1,
        id: 0x0100_0000,
        ldr: 0,
        dfr: u32::MAX,
        apicbase: 0xfee0_0800,
    };
    r1.broadcast_apic_state(&apic).unwrap();
    h0.wait_for("apic cpu1 id0x1000000");
    r1.send_ioapic_eoi(0x31).unwrap();
    h0.wait_for("eoi 0x31");
    assert_eq!(r0.system_reset(), ResetOrigin::Local);
    h1.wait_for("lifecycle Reset from 0");
    // The reset that node 1's QEMU now runs is node 0's: not sent back.
    assert_eq!(r1.system_reset(), ResetOrigin::Peer);
    r1.reset_done();
    assert_eq!(
        r1.system_reset(),
        ResetOrigin::Local,
        "the next one is its own"
    );
    h0.wait_for("lifecycle Reset from 1");

    // A host that leaves while the VM runs is a failure the origin names.
    r1.shutdown();
    h0.wait_for("failed node 1: left the cluster while the VM was running");
    let summary = r0.summary(&|_| 5);
    assert!(
        summary.starts_with("fragvisor: node 0 summary: vcpus=[cpu0:5]"),
        "{summary}"
    );
    r0.shutdown();
}

#[test]
fn power_off_then_exit_is_no_failure() {
    let ((r0, h0), (r1, h1)) = pair();
    r1.vm_exits(0);
    h0.wait_for("lifecycle PowerOff from 1");
    r1.shutdown();
    r0.shutdown();
    std::thread::sleep(Duration::from_millis(300));
    assert!(!h0.has("failed"), "{:?}", h0.log.lock().unwrap());
    assert!(!h1.has("failed"));
}

#[test]
fn exit_status_reaches_every_node_and_is_no_failure() {
    let ((r0, h0), (r1, h1)) = pair();
    r0.vm_exits(33);
    h1.wait_for("lifecycle Exit(33) from 0");
    r0.vm_exits(33);
    std::thread::sleep(Duration::from_millis(200));
    let told = |h: &Recorder| {
        let log = h.log.lock().unwrap();
        log.iter()
            .filter(|l| *l == "lifecycle Exit(33) from 0")
            .count()
    };
    assert_eq!(told(&h1), 1, "an end is told once");
    r0.shutdown();
    r1.shutdown();
    std::thread::sleep(Duration::from_millis(300));
    assert!(!h0.has("failed"), "{:?}", h0.log.lock().unwrap());
    assert!(!h1.has("failed"), "{:?}", h1.log.lock().unwrap());
}

#[test]
fn clocks_are_aligned_to_the_origin() {
    let ((r0, _h0), (r1, _h1)) = pair();
    let (c0, c1) = (r0.clock(), r1.clock());
    // The origin defines the clock; the other node estimated it.
    assert_eq!((c0.samples, c0.tsc.delta, c0.tsc.bound), (0, 0, 0));
    assert_eq!(c1.samples as usize, qemu_accel::clock::SYNC_SAMPLES);
    assert!(c1.mono.bound > 0 && c1.tsc.bound > 0, "{c1:?}");
    // Both nodes run on this machine: their clocks are one clock, so the
    // true delta is 0 and must lie within the estimate's error bound.
    assert!(c1.mono.delta.unsigned_abs() <= c1.mono.bound, "{c1:?}");
    assert!(c1.tsc.delta.unsigned_abs() <= c1.tsc.bound, "{c1:?}");
    // One reading maps to the same guest time on both nodes, within the bound.
    let now = qemu_accel::clock::ClockReading::now();
    let g0 = c0.mono.guest(now.mono_ns);
    let g1 = c1.mono.guest(now.mono_ns);
    assert!(g0.abs_diff(g1) <= c1.mono.bound, "{g0} vs {g1}");
    let t0 = c0.tsc.guest(now.tsc);
    assert!(t0.abs_diff(c1.tsc.guest(now.tsc)) <= c1.tsc.bound);
    // The guest clock started at the origin's join: small, not host uptime.
    assert!(g0 < 60_000_000_000, "{g0}");
    // Node 1 keeps measuring and steering; its guest clock stays on the
    // origin's (one host clock here, so only estimation noise is left).
    std::thread::sleep(std::time::Duration::from_millis(3500));
    let before = r0.guest_ns();
    let g1 = r1.guest_ns();
    let after = r0.guest_ns();
    let slack = 200_000;
    assert!(
        before.saturating_sub(slack) <= g1 && g1 <= after + slack,
        "node 1 reads {g1} between the origin's {before} and {after}"
    );
    let summary = r1.summary(&|_| 0);
    let resyncs: u64 = summary
        .split("clock_resyncs=")
        .nth(1)
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no clock_resyncs in {summary}"));
    assert!(resyncs >= 1, "{summary}");
    r1.shutdown();
    r0.shutdown();
}
