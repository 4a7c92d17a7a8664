//! The runtime's side of the one guest clock ([`crate::clock`]): the origin
//! answers `ClockPing`s at once on its receive thread; every other node
//! measures the origin's clocks after the start barrier and its `fv-clock`
//! thread keeps steering towards them against drift.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tracing::debug;

use super::wire::Message;
use super::{Runtime, RuntimeError};
use crate::clock::{
    ClockReading, ClockSync, MonoEstimate, Steer, Steering, SyncSample, RESYNC_PERIOD,
    RESYNC_SAMPLES, SYNC_SAMPLES,
};

/// The origin's answer to ping `seq`: its clocks now and its `base`
/// reading. Made on the receive thread, at once: the reading's delay is
/// what the estimate's error bound counts.
pub(super) fn answer_ping(seq: u32, base: ClockReading) -> Message {
    Message::ClockPong {
        seq,
        now: ClockReading::now(),
        base,
    }
}

/// How long [`Runtime::sleep_unless_stopping`] sleeps between looks at the
/// stop flag.
const STOP_POLL: Duration = Duration::from_millis(50);

impl Runtime {
    /// Sets this host's guest clock, after the start barrier. The origin
    /// defines the clock; every other node measures it and keeps steering
    /// towards it (its best exchange starts the drift).
    pub(super) fn align_clock(self: &Arc<Self>) -> Result<(), RuntimeError> {
        let (clock, first) = if self.node.id() == 0 {
            (ClockSync::origin(self.base), None)
        } else {
            let (samples, base) = self.clock_samples(SYNC_SAMPLES)?;
            let first = MonoEstimate::best(&samples)?;
            (ClockSync::estimate(&samples, base)?, Some(first))
        };
        self.steer.update(|_| Steer::fixed(clock.mono.offset));
        if self.clock.set(clock).is_err() {
            return Err(RuntimeError::Clock("the clock was aligned twice".into()));
        }
        if let Some(first) = first {
            let rt = self.clone();
            super::spawn("fv-clock".into(), move || rt.steer_clock(clock, first))
                .map_err(|e| RuntimeError::Clock(e.to_string()))?;
        }
        Ok(())
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
                .and_then(|(samples, _)| MonoEstimate::best(&samples).map_err(RuntimeError::from))
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
        let mut left = period;
        while !left.is_zero() {
            if self.is_stopping() {
                return false;
            }
            let d = left.min(STOP_POLL);
            std::thread::sleep(d);
            left -= d;
        }
        !self.is_stopping()
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
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pong_carries_the_ping_number_and_the_base() {
        let base = ClockReading { tsc: 5, mono_ns: 6 };
        let before = ClockReading::now();
        let Message::ClockPong { seq, now, base: b } = answer_ping(9, base) else {
            panic!("not a pong");
        };
        assert_eq!((seq, b), (9, base));
        assert!(now.mono_ns >= before.mono_ns);
    }
}
