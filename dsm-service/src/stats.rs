//! Run-time statistics of one node: counters and a fault-latency histogram,
//! all lock-free so the fault path pays a few relaxed atomic adds.

use std::sync::atomic::{AtomicU64, Ordering};

use serde::Serialize;

const SUB: usize = 8;
const BUCKETS: usize = 8 + 40 * SUB;

/// A log-linear latency histogram (8 buckets per power of two: about 12%
/// resolution) over nanoseconds.
#[derive(Debug)]
pub struct Histogram {
    buckets: Vec<AtomicU64>,
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram {
            buckets: (0..BUCKETS).map(|_| AtomicU64::new(0)).collect(),
        }
    }
}

fn bucket_of(ns: u64) -> usize {
    if ns < SUB as u64 {
        return ns as usize;
    }
    let msb = 63 - ns.leading_zeros() as usize;
    let sub = ((ns >> (msb - 3)) & (SUB as u64 - 1)) as usize;
    (SUB + (msb - 3) * SUB + sub).min(BUCKETS - 1)
}

fn bucket_upper(i: usize) -> u64 {
    if i < SUB {
        return i as u64;
    }
    let octave = (i - SUB) / SUB;
    let sub = (i - SUB) % SUB;
    (((SUB + sub + 1) as u64) << octave) - 1
}

impl Histogram {
    /// Records one sample.
    pub fn record(&self, ns: u64) {
        self.buckets[bucket_of(ns)].fetch_add(1, Ordering::Relaxed);
    }

    /// Number of samples.
    pub fn count(&self) -> u64 {
        self.buckets.iter().map(|b| b.load(Ordering::Relaxed)).sum()
    }

    /// The value below which a fraction `q` of the samples fall (bucket upper
    /// bound), or 0 with no samples.
    pub fn quantile(&self, q: f64) -> u64 {
        let counts: Vec<u64> = self
            .buckets
            .iter()
            .map(|b| b.load(Ordering::Relaxed))
            .collect();
        let total: u64 = counts.iter().sum();
        if total == 0 {
            return 0;
        }
        let target = ((total as f64) * q).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (i, c) in counts.iter().enumerate() {
            seen += c;
            if seen >= target {
                return bucket_upper(i);
            }
        }
        bucket_upper(BUCKETS - 1)
    }
}

/// Counters of one node.
#[derive(Debug, Default)]
pub struct Stats {
    /// Read faults taken by this node's threads.
    pub read_faults: AtomicU64,
    /// Write faults on missing pages.
    pub write_faults: AtomicU64,
    /// Write faults on Shared pages (upgrades).
    pub upgrades: AtomicU64,
    /// Faults on pages homed on this node: their requests need no message,
    /// though the home may still fetch or invalidate elsewhere.
    pub local_faults: AtomicU64,
    /// Pages fetched ahead of a fault.
    pub prefetched: AtomicU64,
    /// Requests this node served as home.
    pub served: AtomicU64,
    /// Invalidations sent (as home).
    pub invalidations_sent: AtomicU64,
    /// Invalidations received (copies dropped on request).
    pub invalidations_received: AtomicU64,
    /// Page contents sent.
    pub pages_sent: AtomicU64,
    /// Page contents received.
    pub pages_received: AtomicU64,
    /// Protocol bytes sent (messages, page data included).
    pub bytes_sent: AtomicU64,
    /// Protocol bytes received.
    pub bytes_received: AtomicU64,
    /// Fault latency: from reading the fault event to the page installed.
    pub fault_latency: Histogram,
}

/// A point-in-time copy of [`Stats`].
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct StatsSnapshot {
    /// See [`Stats::read_faults`].
    pub read_faults: u64,
    /// See [`Stats::write_faults`].
    pub write_faults: u64,
    /// See [`Stats::upgrades`].
    pub upgrades: u64,
    /// See [`Stats::local_faults`].
    pub local_faults: u64,
    /// See [`Stats::prefetched`].
    pub prefetched: u64,
    /// See [`Stats::served`].
    pub served: u64,
    /// See [`Stats::invalidations_sent`].
    pub invalidations_sent: u64,
    /// See [`Stats::invalidations_received`].
    pub invalidations_received: u64,
    /// See [`Stats::pages_sent`].
    pub pages_sent: u64,
    /// See [`Stats::pages_received`].
    pub pages_received: u64,
    /// See [`Stats::bytes_sent`].
    pub bytes_sent: u64,
    /// See [`Stats::bytes_received`].
    pub bytes_received: u64,
    /// Faults in the latency histogram.
    pub latency_samples: u64,
    /// Median fault latency, ns.
    pub latency_p50_ns: u64,
    /// 99th percentile fault latency, ns.
    pub latency_p99_ns: u64,
}

impl Stats {
    /// Adds one to a counter.
    pub fn bump(c: &AtomicU64) {
        c.fetch_add(1, Ordering::Relaxed);
    }

    /// Adds `n` to a counter.
    pub fn add(c: &AtomicU64, n: u64) {
        c.fetch_add(n, Ordering::Relaxed);
    }

    /// Copies the counters.
    pub fn snapshot(&self) -> StatsSnapshot {
        let l = |c: &AtomicU64| c.load(Ordering::Relaxed);
        StatsSnapshot {
            read_faults: l(&self.read_faults),
            write_faults: l(&self.write_faults),
            upgrades: l(&self.upgrades),
            local_faults: l(&self.local_faults),
            prefetched: l(&self.prefetched),
            served: l(&self.served),
            invalidations_sent: l(&self.invalidations_sent),
            invalidations_received: l(&self.invalidations_received),
            pages_sent: l(&self.pages_sent),
            pages_received: l(&self.pages_received),
            bytes_sent: l(&self.bytes_sent),
            bytes_received: l(&self.bytes_received),
            latency_samples: self.fault_latency.count(),
            latency_p50_ns: self.fault_latency.quantile(0.5),
            latency_p99_ns: self.fault_latency.quantile(0.99),
        }
    }
}

impl StatsSnapshot {
    /// Faults of every kind.
    pub fn faults(&self) -> u64 {
        self.read_faults + self.write_faults + self.upgrades
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_monotonic_and_tight() {
        let mut last = 0;
        for i in 0..BUCKETS {
            let u = bucket_upper(i);
            assert!(i == 0 || u > last, "bucket {i}");
            last = u;
        }
        for v in [0u64, 7, 8, 9, 15, 16, 1000, 12_345, 1 << 30] {
            let b = bucket_of(v);
            assert!(bucket_upper(b) >= v, "{v}");
            assert!(b == 0 || bucket_upper(b - 1) < v, "{v}");
        }
    }

    #[test]
    fn quantiles_come_from_the_samples() {
        let h = Histogram::default();
        for v in 1..=100u64 {
            h.record(v * 1000);
        }
        assert_eq!(h.count(), 100);
        let p50 = h.quantile(0.5);
        assert!((50_000..=57_000).contains(&p50), "{p50}");
        let p99 = h.quantile(0.99);
        assert!((99_000..=115_000).contains(&p99), "{p99}");
    }
}
