//! `fv-link-shaper DELAY_MS LOSS_PERCENT`: holds every packet the kernel
//! queues to NFQUEUE 0 of this network namespace for `DELAY_MS`, and drops
//! `LOSS_PERCENT` of them at random — what `tc qdisc ... netem delay 2ms
//! loss 1%` does, for kernels built without netem (this machine's has no
//! `sch_netem`). The tests run it with `ip netns exec NS` and send a
//! namespace's outgoing TCP to it with `iptables -A OUTPUT -o eth0 -p tcp
//! -j NFQUEUE --queue-num 0`.
//!
//! Prints `fv-link-shaper: ready` once bound. A line `DELAY_MS LOSS_PERCENT`
//! on its stdin changes both from then on; when its stdin closes it prints
//! `fv-link-shaper: passed N dropped M` and exits.

use std::collections::VecDeque;
use std::io;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nfq::{Queue, Verdict};

fn main() {
    if let Err(e) = run() {
        eprintln!("fv-link-shaper: error: {e}");
        std::process::exit(1);
    }
}

fn arg(i: usize, what: &str) -> io::Result<f64> {
    std::env::args()
        .nth(i)
        .and_then(|a| a.parse().ok())
        .ok_or_else(|| {
            io::Error::other(format!(
                "usage: fv-link-shaper DELAY_MS LOSS_PERCENT ({what})"
            ))
        })
}

/// The delay and loss now in force.
#[derive(Default)]
struct Shape {
    delay_us: AtomicU64,
    loss_ppm: AtomicU64,
}

impl Shape {
    fn set(&self, delay_ms: f64, loss_percent: f64) {
        self.delay_us
            .store((delay_ms * 1000.0) as u64, Ordering::Relaxed);
        self.loss_ppm
            .store((loss_percent * 10_000.0) as u64, Ordering::Relaxed);
    }
}

fn run() -> io::Result<()> {
    let shape = Arc::new(Shape::default());
    shape.set(arg(1, "delay")?, arg(2, "loss")?);
    let mut queue = Queue::open()?;
    queue.bind(0)?;
    queue.set_queue_max_len(0, 1 << 16)?;
    queue.set_copy_range(0, 0)?;
    queue.set_nonblocking(true);
    queue.set_recv_enobufs(false)?;
    println!("fv-link-shaper: ready");
    let mut rng = 0x9e37_79b9_7f4a_7c15u64 ^ u64::from(std::process::id());
    let mut held: VecDeque<(Instant, nfq::Message)> = VecDeque::new();
    let (mut passed, mut dropped) = (0u64, 0u64);
    let stdin_closed = Arc::new(AtomicBool::new(false));
    {
        let closed = stdin_closed.clone();
        let shape = shape.clone();
        std::thread::spawn(move || {
            for line in io::stdin().lines().map_while(Result::ok) {
                let v: Vec<f64> = line
                    .split_whitespace()
                    .filter_map(|w| w.parse().ok())
                    .collect();
                if let [delay, loss] = v[..] {
                    shape.set(delay, loss);
                }
            }
            closed.store(true, Ordering::Release);
        });
    }
    // The crate exposes no descriptor to poll: look every 100 µs (a 2 ms
    // delay is kept to within that).
    while !stdin_closed.load(Ordering::Acquire) {
        let now = Instant::now();
        while held.front().is_some_and(|(due, _)| *due <= now) {
            let (_, mut m) = held.pop_front().expect("a held packet");
            m.set_verdict(Verdict::Accept);
            queue.verdict(m)?;
            passed += 1;
        }
        std::thread::sleep(Duration::from_micros(100));
        loop {
            let mut m = match queue.recv() {
                Ok(m) => m,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(e),
            };
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            if rng % 1_000_000 < shape.loss_ppm.load(Ordering::Relaxed) {
                m.set_verdict(Verdict::Drop);
                queue.verdict(m)?;
                dropped += 1;
            } else {
                let delay = Duration::from_micros(shape.delay_us.load(Ordering::Relaxed));
                held.push_back((Instant::now() + delay, m));
            }
        }
    }
    for (_, mut m) in held {
        m.set_verdict(Verdict::Accept);
        queue.verdict(m)?;
    }
    println!("fv-link-shaper: passed {passed} dropped {dropped}");
    Ok(())
}
