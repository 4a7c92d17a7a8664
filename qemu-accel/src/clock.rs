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
//! engine's guest TSC ticks at 1 GHz from it).
//!
//! Host clocks drift apart: two crystals differ by tens of ppm, more
//! without NTP. The monotonic clock is therefore steered while the guest
//! runs ([`Steer`]): each non-origin node repeats a short exchange every
//! second, estimates its drift rate against the origin from exchanges up
//! to a minute apart ([`DriftTracker`]), runs its guest clock at that rate,
//! and slews any phase error out at no more than [`SLEW_PPB`] (500 ppm, the
//! limit of `adjtime(3)`), so the guest clock never steps and never runs
//! backwards. The KVM TSC offset is set at start and at reset only: a KVM
//! guest whose hosts' TSCs tick at different rates needs a fixed
//! `tsc-frequency`.
//!
//! Hosts on one machine share their clocks. To test the alignment there,
//! the accelerator options `test-clock-skew-ns=N` (shift this process's
//! monotonic clock by N ns) and `test-clock-rate-ppm=R` (make it run R ppm
//! fast, or slow if negative) make it read as if it ran on a host whose
//! clock is off by that much ([`set_test_clock`]; `crate::config` also
//! takes them from `FRAGVISOR_TEST_CLOCK_SKEW_NS` and
//! `FRAGVISOR_TEST_CLOCK_RATE_PPM`).

use std::collections::VecDeque;
use std::sync::atomic::{fence, AtomicI64, AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};

use thiserror::Error;
use tracing::warn;

/// Why the clocks could not be estimated.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum ClockError {
    /// Every exchange had its reply before its request (or there were none).
    #[error("no usable sample among {0} clock exchanges")]
    NoUsableSample(usize),
}

/// The test knobs of this process's monotonic clock.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TestClock {
    /// Shift, in ns.
    pub skew_ns: i64,
    /// Rate error, in ppm (fast if positive).
    pub rate_ppm: i64,
}

/// The knobs in force and the raw clock they count the rate error from.
static TEST_CLOCK: OnceLock<(TestClock, u64)> = OnceLock::new();

/// Puts the test knobs in force for this process from now on (the runtime
/// does at start, from its configuration). Knobs that are all zero change
/// nothing; the first knobs set stay, a later different set is refused with
/// a warning (one process, one clock).
pub fn set_test_clock(knobs: TestClock) {
    if knobs == TestClock::default() {
        return;
    }
    let (kept, _) = *TEST_CLOCK.get_or_init(|| (knobs, raw_mono_ns()));
    if kept != knobs {
        warn!(?kept, refused = ?knobs, "the test clock is already set");
    }
}

/// The knobs in force: (shift in ns, rate error in ppm, the raw clock they
/// count the rate error from).
fn test_knobs() -> (i64, i64, u64) {
    TEST_CLOCK
        .get()
        .map_or((0, 0, 0), |&(k, start)| (k.skew_ns, k.rate_ppm, start))
}

fn raw_mono_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec; CLOCK_MONOTONIC always exists.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    (ts.tv_sec as u64)
        .wrapping_mul(1_000_000_000)
        .wrapping_add(ts.tv_nsec as u64)
}

/// This host's `CLOCK_MONOTONIC` in ns (shifted and sped up by the test
/// knobs, if set: [`set_test_clock`]).
pub fn mono_ns() -> u64 {
    let raw = raw_mono_ns();
    let (skew, ppm, start) = test_knobs();
    let fast = if ppm == 0 {
        0
    } else {
        (i128::from(raw.wrapping_sub(start)) * i128::from(ppm) / 1_000_000) as i64
    };
    raw.wrapping_add(skew.wrapping_add(fast) as u64)
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
    pub fn estimate(samples: &[SyncSample], base: ClockReading) -> Result<ClockSync, ClockError> {
        let best = best_sample(samples)?;
        let tsc_mid = half_way(best.sent.tsc, best.received.tsc);
        let mono = MonoEstimate::of(best);
        Ok(ClockSync {
            tsc: map(
                best.origin.tsc.wrapping_sub(tsc_mid) as i64,
                best.received.tsc.wrapping_sub(best.sent.tsc).div_ceil(2),
                base.tsc,
            ),
            mono: map(mono.delta, mono.bound, base.mono_ns),
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

/// The sample with the shortest monotonic round trip.
fn best_sample(samples: &[SyncSample]) -> Result<&SyncSample, ClockError> {
    samples
        .iter()
        .filter(|s| s.received.mono_ns >= s.sent.mono_ns)
        .min_by_key(|s| s.received.mono_ns - s.sent.mono_ns)
        .ok_or(ClockError::NoUsableSample(samples.len()))
}

/// One estimate of the monotonic clocks' distance, from one exchange.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MonoEstimate {
    /// Local monotonic clock half way through the exchange.
    pub at: u64,
    /// Origin minus local, ns.
    pub delta: i64,
    /// Error bound of `delta`: half the round trip.
    pub bound: u64,
}

impl MonoEstimate {
    fn of(s: &SyncSample) -> MonoEstimate {
        let at = half_way(s.sent.mono_ns, s.received.mono_ns);
        MonoEstimate {
            at,
            delta: s.origin.mono_ns.wrapping_sub(at) as i64,
            bound: s.received.mono_ns.wrapping_sub(s.sent.mono_ns).div_ceil(2),
        }
    }

    /// The best estimate among `samples` (shortest round trip).
    pub fn best(samples: &[SyncSample]) -> Result<MonoEstimate, ClockError> {
        best_sample(samples).map(MonoEstimate::of)
    }
}

/// Largest rate at which a phase error of the guest clock is slewed out:
/// 500 ppm, in parts per billion.
pub const SLEW_PPB: i64 = 500_000;
/// Largest drift rate believed: two hosts' clocks 1000 ppm apart are broken,
/// not drifting.
pub const MAX_RATE_PPB: i64 = 1_000_000;

/// How often a non-origin node measures its clock against the origin's
/// again while the guest runs.
pub const RESYNC_PERIOD: std::time::Duration = std::time::Duration::from_secs(1);
/// Exchanges per measurement (the shortest round trip wins).
pub const RESYNC_SAMPLES: usize = 8;

/// `ppb` parts per billion of `dt`.
pub fn scale_ppb(ppb: i64, dt: u64) -> i64 {
    (i128::from(ppb) * i128::from(dt) / 1_000_000_000) as i64
}

/// The monotonic guest clock of one host: `guest = local + offset(local)`,
/// where the offset follows a line from `anchor` (drift `rate_ppb`) plus a
/// phase correction that shrinks to zero at [`SLEW_PPB`]. The guest clock
/// so runs at `1 + rate ± 500 ppm` of the local clock: it never steps.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Steer {
    /// Local monotonic ns where this line starts.
    pub anchor: u64,
    /// Target offset at `anchor`.
    pub offset: i64,
    /// Offset gained per local second, in parts per billion.
    pub rate_ppb: i64,
    /// Phase still to slew out at `anchor` (current minus target).
    pub correction: i64,
}

impl Steer {
    /// A clock that runs at the local rate with a fixed `offset`.
    pub fn fixed(offset: i64) -> Steer {
        Steer {
            offset,
            ..Steer::default()
        }
    }

    /// The offset at local time `local` (at `anchor` for earlier times).
    pub fn offset_at(&self, local: u64) -> i64 {
        let dt = local.saturating_sub(self.anchor);
        let slewed = scale_ppb(SLEW_PPB, dt);
        let left = if self.correction > 0 {
            (self.correction - slewed).max(0)
        } else {
            (self.correction + slewed).min(0)
        };
        self.offset
            .wrapping_add(scale_ppb(self.rate_ppb, dt))
            .wrapping_add(left)
    }

    /// The guest clock at local time `local`.
    pub fn guest(&self, local: u64) -> u64 {
        local.wrapping_add(self.offset_at(local) as u64)
    }

    /// Goes on from `now` towards offset `target` (at `now`), at drift
    /// `rate_ppb`. A phase error within `deadband` (the estimate's own
    /// error) is left alone; a larger one is slewed out.
    pub fn retarget(&self, now: u64, target: i64, rate_ppb: i64, deadband: u64) -> Steer {
        let current = self.offset_at(now);
        let error = current.wrapping_sub(target);
        let rate_ppb = rate_ppb.clamp(-MAX_RATE_PPB, MAX_RATE_PPB);
        if error.unsigned_abs() <= deadband {
            Steer {
                anchor: now,
                offset: current,
                rate_ppb,
                correction: 0,
            }
        } else {
            Steer {
                anchor: now,
                offset: target,
                rate_ppb,
                correction: error,
            }
        }
    }
}

/// A [`Steer`] that vCPU threads read on every guest TSC read while one
/// thread retargets it: a sequence lock, so readers never wait on a lock
/// and never see half of an update.
#[derive(Debug, Default)]
pub struct SharedSteer {
    seq: AtomicU64,
    anchor: AtomicU64,
    offset: AtomicI64,
    rate_ppb: AtomicI64,
    correction: AtomicI64,
    writer: Mutex<()>,
}

impl SharedSteer {
    /// The current line.
    pub fn load(&self) -> Steer {
        loop {
            let before = self.seq.load(Ordering::Acquire);
            if before & 1 == 0 {
                let s = Steer {
                    anchor: self.anchor.load(Ordering::Relaxed),
                    offset: self.offset.load(Ordering::Relaxed),
                    rate_ppb: self.rate_ppb.load(Ordering::Relaxed),
                    correction: self.correction.load(Ordering::Relaxed),
                };
                fence(Ordering::Acquire);
                if self.seq.load(Ordering::Relaxed) == before {
                    return s;
                }
            }
            std::hint::spin_loop();
        }
    }

    /// Replaces the line with `update(current)`; returns the new one.
    pub fn update(&self, update: impl FnOnce(Steer) -> Steer) -> Steer {
        let _one_writer = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        let s = update(self.load());
        let seq = self.seq.load(Ordering::Relaxed);
        self.seq.store(seq.wrapping_add(1), Ordering::Relaxed);
        fence(Ordering::Release);
        self.anchor.store(s.anchor, Ordering::Relaxed);
        self.offset.store(s.offset, Ordering::Relaxed);
        self.rate_ppb.store(s.rate_ppb, Ordering::Relaxed);
        self.correction.store(s.correction, Ordering::Relaxed);
        self.seq.store(seq.wrapping_add(2), Ordering::Release);
        s
    }

    /// The guest clock now.
    pub fn guest_now(&self) -> u64 {
        let local = mono_ns();
        self.load().guest(local)
    }
}

/// Drift rates need estimates at least this far apart (ns).
pub const MIN_RATE_SPAN_NS: u64 = 2_000_000_000;
/// Estimates older than this (ns) no longer count: the rate may change.
pub const MAX_RATE_SPAN_NS: u64 = 64_000_000_000;

/// The drift of this host's monotonic clock against the origin's, from
/// estimates up to [`MAX_RATE_SPAN_NS`] apart: the rate from the oldest
/// kept estimate to the newest, whose error is the two bounds over the
/// span.
#[derive(Debug, Default)]
pub struct DriftTracker {
    kept: VecDeque<MonoEstimate>,
}

impl DriftTracker {
    /// Records one estimate; returns the drift rate (ppb) and its error
    /// bound (ppb), once estimates [`MIN_RATE_SPAN_NS`] apart exist.
    pub fn add(&mut self, e: MonoEstimate) -> Option<(i64, i64)> {
        while self
            .kept
            .front()
            .is_some_and(|old| e.at.saturating_sub(old.at) > MAX_RATE_SPAN_NS)
        {
            self.kept.pop_front();
        }
        self.kept.push_back(e);
        let first = self.kept.front()?;
        let span = e.at.saturating_sub(first.at);
        if span < MIN_RATE_SPAN_NS {
            return None;
        }
        let gained = i128::from(e.delta.wrapping_sub(first.delta));
        let rate = gained * 1_000_000_000 / i128::from(span);
        let bound = i128::from(first.bound + e.bound) * 1_000_000_000 / i128::from(span);
        Some((rate as i64, bound as i64))
    }
}

/// The controller of a non-origin node's guest clock: each trusted
/// measurement updates the drift rate and gives the line to steer by.
#[derive(Debug)]
pub struct Steering {
    initial: ClockMap,
    drift: DriftTracker,
    /// Measurements with a larger error bound (slowed down by load) are
    /// not used.
    trusted: u64,
    rate_ppb: i64,
}

impl Steering {
    /// Starts from the alignment at join time and its best exchange.
    pub fn new(initial: &ClockSync, first: MonoEstimate) -> Steering {
        let mut drift = DriftTracker::default();
        drift.add(first);
        Steering {
            initial: initial.mono,
            drift,
            trusted: first.bound.saturating_mul(4).max(50_000),
            rate_ppb: 0,
        }
    }

    /// One measurement taken at local time about `now`: the guest clock's
    /// next line from `current`, or `None` for a measurement too slow to
    /// trust.
    pub fn step(&mut self, est: MonoEstimate, now: u64, current: Steer) -> Option<Steer> {
        if est.bound > self.trusted {
            return None;
        }
        if let Some((rate, _bound)) = self.drift.add(est) {
            self.rate_ppb = rate;
        }
        // The origin's clock minus ours, projected to now; the guest offset
        // is that minus the origin's base, as at the start.
        let delta_now = est
            .delta
            .wrapping_add(scale_ppb(self.rate_ppb, now.saturating_sub(est.at)));
        let target = self
            .initial
            .offset
            .wrapping_add(delta_now.wrapping_sub(self.initial.delta));
        Some(current.retarget(now, target, self.rate_ppb, est.bound))
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

    const SEC: u64 = 1_000_000_000;

    #[test]
    fn a_fixed_steer_is_a_plain_offset() {
        let s = Steer::fixed(-500);
        assert_eq!(s.guest(10_000), 9_500);
        assert_eq!(s.guest(10 * SEC), 10 * SEC - 500);
    }

    #[test]
    fn retarget_never_steps_and_slews_at_500_ppm() {
        let s = Steer::fixed(0);
        let now = 5 * SEC;
        // The clock is 1 ms ahead of where it should be.
        let next = s.retarget(now, -1_000_000, 0, 10_000);
        assert_eq!(next.guest(now), s.guest(now), "no step at the retarget");
        // Half a second later 250 µs of it are gone, 750 µs left.
        assert_eq!(next.offset_at(now + SEC / 2), -1_000_000 + 750_000);
        // After 2 s it runs on the target line.
        assert_eq!(next.offset_at(now + 2 * SEC), -1_000_000);
        assert_eq!(next.offset_at(now + 9 * SEC), -1_000_000);
        // Never backwards, even while slowing down.
        let mut last = next.guest(now);
        for ms in 1..3000 {
            let g = next.guest(now + ms * 1_000_000);
            assert!(g > last, "guest clock went back at {ms} ms");
            last = g;
        }
        // Readings before the anchor (a racing reader) count as the anchor.
        assert_eq!(next.offset_at(now - 1_000), next.offset_at(now));
    }

    #[test]
    fn retarget_within_the_deadband_keeps_the_phase_and_takes_the_rate() {
        let s = Steer::fixed(100);
        let next = s.retarget(SEC, 104, -300_000, 10);
        assert_eq!(next.correction, 0);
        assert_eq!(next.offset_at(SEC), 100);
        assert_eq!(next.offset_at(2 * SEC), 100 - 300_000);
    }

    fn est(at: u64, delta: i64, bound: u64) -> MonoEstimate {
        MonoEstimate { at, delta, bound }
    }

    #[test]
    fn drift_rate_needs_two_seconds_and_forgets_after_a_minute() {
        let mut d = DriftTracker::default();
        // Our clock runs 300 ppm fast: the origin minus ours falls 300 µs/s.
        let delta = |t: u64| 1_000_000 - (t as i64 * 300 / 1_000_000);
        assert_eq!(d.add(est(SEC, delta(SEC), 5_000)), None);
        assert_eq!(d.add(est(2 * SEC, delta(2 * SEC), 5_000)), None);
        let (rate, bound) = d.add(est(3 * SEC, delta(3 * SEC), 5_000)).unwrap();
        assert_eq!(rate, -300_000);
        assert_eq!(bound, 5_000, "10 µs over 2 s");
        // A minute and more later the first estimates no longer count.
        for t in 4..=70 {
            d.add(est(t * SEC, delta(t * SEC), 5_000));
        }
        assert!(d.kept.front().unwrap().at >= 6 * SEC);
        assert_eq!(
            d.add(est(71 * SEC, delta(71 * SEC), 5_000)).unwrap().0,
            -300_000
        );
    }

    /// A host whose clock runs `ppm` fast, steered once a second with
    /// estimates that are off by up to `noise` ns (alternating sign): after
    /// `settle` seconds its guest clock stays within `within` ns of the
    /// origin's, and it never runs backwards.
    fn closed_loop(ppm: i64, noise: i64, settle: u64, within: u64) {
        // True local clock as a function of origin time o: o + 7 ms + drift.
        let local_at = |o: u64| (o as i64 + 7_000_000 + o as i64 * ppm / 1_000_000) as u64;
        let origin_base = 1_000u64;
        let first_at = local_at(origin_base);
        let initial = ClockSync {
            mono: map(origin_base as i64 - first_at as i64, 5_000, origin_base),
            ..ClockSync::default()
        };
        let mut steering = Steering::new(&initial, est(first_at, initial.mono.delta, 5_000));
        let mut steer = Steer::fixed(initial.mono.offset);
        let mut last = 0;
        for t in 1..=120u64 {
            let o = origin_base + t * SEC;
            let l = local_at(o);
            // Every 10 ms of the second before: the guest clock against the
            // origin's (origin time minus base).
            for k in 0..100 {
                let ok = o - SEC + k * 10_000_000;
                let g = steer.guest(local_at(ok));
                assert!(g >= last, "went back at {t} s");
                last = g;
                if t > settle {
                    let err = g.abs_diff(ok - origin_base);
                    assert!(err <= within, "{ppm} ppm: off by {err} ns at {t} s");
                }
            }
            let e = if t % 2 == 0 { noise } else { -noise };
            let m = est(l, o as i64 - l as i64 + e, 5_000);
            steer = steering.step(m, l, steer).expect("trusted");
        }
    }

    #[test]
    fn drifting_clocks_are_steered_back_together() {
        closed_loop(300, 4_000, 6, 25_000);
        closed_loop(-300, 4_000, 6, 25_000);
        closed_loop(50, 2_000, 4, 15_000);
        closed_loop(0, 4_000, 0, 10_000);
    }

    #[test]
    fn slow_exchanges_are_not_trusted() {
        let initial = ClockSync::default();
        let mut steering = Steering::new(&initial, est(0, 0, 5_000));
        assert!(steering
            .step(est(SEC, 0, 500_000), SEC, Steer::default())
            .is_none());
        assert!(steering
            .step(est(SEC, 0, 15_000), SEC, Steer::default())
            .is_some());
    }

    #[test]
    fn shared_steer_reads_whole_updates() {
        let shared = std::sync::Arc::new(SharedSteer::default());
        let writer = {
            let shared = shared.clone();
            std::thread::spawn(move || {
                for i in 1..20_000i64 {
                    shared.update(|_| Steer {
                        anchor: i as u64,
                        offset: i,
                        rate_ppb: -i,
                        correction: 2 * i,
                    });
                }
            })
        };
        while !writer.is_finished() {
            let s = shared.load();
            assert_eq!(
                (s.anchor as i64, s.rate_ppb, s.correction),
                (s.offset, -s.offset, 2 * s.offset),
                "a torn read"
            );
        }
        writer.join().unwrap();
        assert_eq!(shared.load().offset, 19_999);
    }

    #[test]
    fn now_moves_forward() {
        let a = ClockReading::now();
        let b = ClockReading::now();
        assert!(b.mono_ns >= a.mono_ns);
    }
}
