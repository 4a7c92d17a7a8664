//! One guest clock for an aggregate VM.
//!
//! Every vCPU of the guest must read one time-stamp counter, whichever host
//! runs it. The origin (node 0) defines that clock: at cluster start it
//! records a base reading of its own clocks, and the guest TSC is "origin
//! host clock minus base". Every other node estimates how far its clocks are
//! from the origin's with a Cristian-style exchange (a ping; the origin
//! answers with its clock readings at once; the sample with the shortest
//! round trip wins) and turns that into an offset from its own host clock:
//!
//! ```text
//! guest = local + delta - base     where delta ≈ origin - local (same instant)
//! |error| <= round_trip_min / 2
//! ```
//!
//! Two clocks are aligned this way: the host TSC (the KVM engine sets it as
//! each vCPU's `KVM_VCPU_TSC_OFFSET`) and `CLOCK_MONOTONIC` in ns (the TCG
//! engine's guest TSC ticks at 1 GHz from it). Both assume the hosts' clocks
//! tick at one rate: TSCs of the same frequency (else give the guest a fixed
//! `tsc-frequency`), monotonic clocks kept in step by NTP or PTP.
//!
//! Hosts on one machine share their clocks. To test the alignment there,
//! `FRAGVISOR_TEST_CLOCK_SKEW_NS=N` shifts this process's monotonic clock by
//! N ns, as if it ran on a host whose clock is off by that much.

use std::sync::OnceLock;

use crate::runtime::RuntimeError;

/// Test knob: `FRAGVISOR_TEST_CLOCK_SKEW_NS`, read once.
pub const TEST_SKEW_ENV: &str = "FRAGVISOR_TEST_CLOCK_SKEW_NS";

fn test_skew_ns() -> i64 {
    static SKEW: OnceLock<i64> = OnceLock::new();
    *SKEW.get_or_init(|| {
        std::env::var(TEST_SKEW_ENV)
            .ok()
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    })
}

/// This host's `CLOCK_MONOTONIC` in ns (shifted by the test knob, if set).
pub fn mono_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec; CLOCK_MONOTONIC always exists.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    (ts.tv_sec as u64)
        .wrapping_mul(1_000_000_000)
        .wrapping_add(ts.tv_nsec as u64)
        .wrapping_add(test_skew_ns() as u64)
}

/// Exchanges a non-origin node makes with the origin at start.
pub const SYNC_SAMPLES: usize = 32;

/// One reading of a host's two clocks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ClockReading {
    /// Host time-stamp counter.
    pub tsc: u64,
    /// `CLOCK_MONOTONIC` in nanoseconds.
    pub mono_ns: u64,
}

impl ClockReading {
    /// Reads both clocks now (the TSC first, then the monotonic clock).
    pub fn now() -> ClockReading {
        let tsc = read_tsc();
        ClockReading {
            tsc,
            mono_ns: mono_ns(),
        }
    }
}

#[cfg(target_arch = "x86_64")]
fn read_tsc() -> u64 {
    // SAFETY: RDTSC exists on every x86-64 CPU and has no side effects.
    unsafe { core::arch::x86_64::_rdtsc() }
}

#[cfg(not(target_arch = "x86_64"))]
fn read_tsc() -> u64 {
    0
}

/// One exchange: local clocks before the ping, the origin's answer, local
/// clocks when the answer arrived.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SyncSample {
    /// Local reading before sending.
    pub sent: ClockReading,
    /// The origin's reading when it answered.
    pub origin: ClockReading,
    /// Local reading on receipt.
    pub received: ClockReading,
}

/// How one clock of this host maps to the guest clock.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ClockMap {
    /// Estimated origin clock minus local clock at the same instant.
    pub delta: i64,
    /// Bound on the error of `delta` (half the best round trip).
    pub bound: u64,
    /// Add to the local clock to get the guest clock (`delta - base`,
    /// wrapping).
    pub offset: i64,
}

impl ClockMap {
    /// The guest clock for a local reading.
    pub fn guest(&self, local: u64) -> u64 {
        local.wrapping_add(self.offset as u64)
    }
}

/// Result of the clock alignment of one node.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ClockSync {
    /// Host TSC to guest TSC (KVM engine).
    pub tsc: ClockMap,
    /// `CLOCK_MONOTONIC` ns to guest ns (TCG engine).
    pub mono: ClockMap,
    /// Exchanges the estimate took (0 on the origin).
    pub samples: u32,
}

fn half_way(a: u64, b: u64) -> u64 {
    a.wrapping_add(b.wrapping_sub(a) / 2)
}

fn map(delta: i64, bound: u64, base: u64) -> ClockMap {
    ClockMap {
        delta,
        bound,
        offset: delta.wrapping_sub(base as i64),
    }
}

impl ClockSync {
    /// The origin: its own clocks minus `base`, exact.
    pub fn origin(base: ClockReading) -> ClockSync {
        ClockSync {
            tsc: map(0, 0, base.tsc),
            mono: map(0, 0, base.mono_ns),
            samples: 0,
        }
    }

    /// A non-origin node: the estimate from `samples` against the origin's
    /// `base`. The sample with the shortest monotonic round trip is used for
    /// both clocks.
    pub fn estimate(samples: &[SyncSample], base: ClockReading) -> Result<ClockSync, RuntimeError> {
        let best = samples
            .iter()
            .filter(|s| s.received.mono_ns >= s.sent.mono_ns)
            .min_by_key(|s| s.received.mono_ns - s.sent.mono_ns)
            .ok_or_else(|| {
                RuntimeError::Clock(format!(
                    "no usable sample among {} clock exchanges",
                    samples.len()
                ))
            })?;
        let tsc_mid = half_way(best.sent.tsc, best.received.tsc);
        let ns_mid = half_way(best.sent.mono_ns, best.received.mono_ns);
        Ok(ClockSync {
            tsc: map(
                best.origin.tsc.wrapping_sub(tsc_mid) as i64,
                best.received.tsc.wrapping_sub(best.sent.tsc).div_ceil(2),
                base.tsc,
            ),
            mono: map(
                best.origin.mono_ns.wrapping_sub(ns_mid) as i64,
                (best.received.mono_ns - best.sent.mono_ns).div_ceil(2),
                base.mono_ns,
            ),
            samples: samples.len() as u32,
        })
    }

    /// One line for the log: how this node's clocks map to the origin's.
    pub fn describe(&self, node: u16) -> String {
        if node == 0 {
            return "fragvisor: node 0 defines the guest clock (origin)".to_string();
        }
        format!(
            "fragvisor: node {node} guest clock aligned to node 0: host TSC delta {} ticks \
             (±{}), monotonic delta {} ns (±{} ns), best of {} exchanges",
            self.tsc.delta, self.tsc.bound, self.mono.delta, self.mono.bound, self.samples
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(tsc: u64, mono_ns: u64) -> ClockReading {
        ClockReading { tsc, mono_ns }
    }

    #[test]
    fn origin_starts_the_guest_clock_at_zero() {
        let base = r(1_000_000, 5_000);
        let s = ClockSync::origin(base);
        assert_eq!(s.tsc.guest(base.tsc), 0);
        assert_eq!(s.mono.guest(base.mono_ns + 7), 7);
    }

    #[test]
    fn estimate_recovers_a_known_offset_from_the_best_sample() {
        // The origin's clocks run 1000 (TSC) / 400 ns ahead of ours.
        let (dt, dn) = (1000u64, 400u64);
        let sample = |t0: u64, rtt: u64, asym: u64| SyncSample {
            sent: r(t0, t0),
            // The origin answered `asym` after the midpoint.
            origin: r(t0 + rtt / 2 + asym + dt, t0 + rtt / 2 + asym + dn),
            received: r(t0 + rtt, t0 + rtt),
        };
        let samples = [
            sample(10_000, 900, 300),
            sample(20_000, 60, 10),
            sample(30_000, 400, 150),
        ];
        let base = r(50_000, 60_000);
        let s = ClockSync::estimate(&samples, base).unwrap();
        assert_eq!(s.samples, 3);
        // The best sample (rtt 60) is used: error 10, within its bound 30.
        assert_eq!(s.tsc.delta, 1010);
        assert_eq!(s.tsc.bound, 30);
        assert_eq!(s.mono.delta, 410);
        assert!(s.mono.delta.abs_diff(dn as i64) <= s.mono.bound);
        // A local reading maps to the origin's reading minus its base.
        let local = 70_000u64;
        assert_eq!(s.tsc.guest(local), local + 1010 - base.tsc);
        let origin_guest = ClockSync::origin(base).tsc.guest(local + dt);
        assert!(s.tsc.guest(local).abs_diff(origin_guest) <= s.tsc.bound);
    }

    #[test]
    fn estimate_handles_negative_deltas_and_wrapping() {
        let samples = [SyncSample {
            sent: r(u64::MAX - 10, 5_000),
            origin: r(100, 4_000),
            received: r(10, 5_020),
        }];
        let s = ClockSync::estimate(&samples, r(0, 0)).unwrap();
        // The local TSC wrapped during the exchange: round trip 21, midpoint
        // u64::MAX, so the origin is 101 ticks ahead.
        assert_eq!(s.tsc.delta, 101);
        assert_eq!(s.tsc.bound, 11);
        assert_eq!(s.mono.delta, -1010);
        assert_eq!(s.mono.bound, 10);
    }

    #[test]
    fn no_samples_is_an_error_naming_the_exchange() {
        let e = ClockSync::estimate(&[], r(0, 0)).unwrap_err();
        assert!(e.to_string().contains("clock"), "{e}");
    }

    #[test]
    fn now_moves_forward() {
        let a = ClockReading::now();
        let b = ClockReading::now();
        assert!(b.mono_ns >= a.mono_ns);
    }
}
