//! Workloads one node process runs on DSM memory; each checks its own result
//! exactly and returns a one-line summary (JSON) for the cluster runner.
//!
//! Memory layout is in pages of the single region `ram` (all offsets are
//! fixed so every node agrees without talking).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use dsm_service::uffd::PAGE_SIZE;
use dsm_service::DsmNode;
use serde_json::{json, Value};

/// The region a workload runs on.
pub struct Mem {
    /// Host address.
    pub base: u64,
    /// Pages.
    pub pages: u64,
}

impl Mem {
    /// The 8-byte word `word` of page `page` as an atomic.
    pub fn word(&self, page: u64, word: u64) -> &AtomicU64 {
        assert!(page < self.pages && word < (PAGE_SIZE / 8) as u64);
        let addr = self.base + page * PAGE_SIZE as u64 + word * 8;
        // SAFETY: the address is inside the mapping (checked above), 8-byte
        // aligned, and the mapping lives as long as the process; all access
        // to DSM memory goes through atomics, as the workloads share it.
        unsafe { &*(addr as *const AtomicU64) }
    }
}

/// Workload parameters.
pub struct Params {
    /// Iterations (increments, rounds or operations).
    pub iters: u64,
    /// Pages the random workload spreads over.
    pub pages: u64,
    /// Seed of the random workload.
    pub seed: u64,
}

/// Runs `name`; `Err` is a violated check or a DSM failure.
pub fn run(name: &str, node: &DsmNode, mem: &Mem, p: &Params) -> Result<Value, String> {
    match name {
        "counter" => counter(node, mem, p),
        "mp" => message_passing(node, mem, p),
        "random" => random(node, mem, p),
        "soak" => soak(node, mem, p),
        "idle" => {
            node.barrier().map_err(|e| e.to_string())?;
            Ok(json!({"workload": "idle"}))
        }
        w => Err(format!(
            "unknown workload {w:?} (counter, mp, random, soak, idle)"
        )),
    }
}

fn barrier(node: &DsmNode) -> Result<(), String> {
    node.barrier().map_err(|e| format!("barrier: {e}"))
}

fn spin_pause(spins: &mut u32) {
    *spins += 1;
    if spins.is_multiple_of(64) {
        std::thread::yield_now();
    } else {
        std::hint::spin_loop();
    }
}

/// Every node adds 1 to the same word `iters` times with `lock xadd`; the
/// total must be exactly nodes × iters.
fn counter(node: &DsmNode, mem: &Mem, p: &Params) -> Result<Value, String> {
    barrier(node)?;
    let c = mem.word(0, 0);
    let t0 = Instant::now();
    for i in 0..p.iters {
        c.fetch_add(1, Ordering::SeqCst);
        if i % 8 == 7 {
            // Let the other nodes in, so the word really moves between them.
            std::thread::yield_now();
        }
    }
    let secs = t0.elapsed().as_secs_f64();
    barrier(node)?;
    let got = c.load(Ordering::SeqCst);
    let want = node.nodes() as u64 * p.iters;
    let r = json!({"workload": "counter", "counter": got, "expected": want, "secs": secs});
    barrier(node)?;
    if got != want {
        return Err(format!("counter is {got}, expected exactly {want}"));
    }
    Ok(r)
}

/// Node 0 writes data (page 1) then a flag (page 2) each round; every other
/// node waits for the flag, checks the data is that round's (never stale),
/// and acknowledges on its own page (3 + id) before the writer goes on.
fn message_passing(node: &DsmNode, mem: &Mem, p: &Params) -> Result<Value, String> {
    const DATA_WORDS: u64 = 8;
    let me = u64::from(node.id());
    let n = node.nodes() as u64;
    barrier(node)?;
    let flag = mem.word(2, 0);
    let t0 = Instant::now();
    let mut checked = 0u64;
    if me == 0 {
        for round in 1..=p.iters {
            for w in 0..DATA_WORDS {
                mem.word(1, w).store(round, Ordering::Relaxed);
            }
            flag.store(round, Ordering::Release);
            for k in 1..n {
                let mut spins = 0;
                while mem.word(3 + k, 0).load(Ordering::Acquire) < round {
                    spin_pause(&mut spins);
                }
            }
        }
    } else {
        for round in 1..=p.iters {
            let mut spins = 0;
            let mut f = flag.load(Ordering::Acquire);
            while f < round {
                spin_pause(&mut spins);
                f = flag.load(Ordering::Acquire);
            }
            if f != round {
                return Err(format!(
                    "flag jumped to {f} in round {round}: the writer did not wait for our ack"
                ));
            }
            for w in 0..DATA_WORDS {
                let d = mem.word(1, w).load(Ordering::Relaxed);
                if d != round {
                    return Err(format!(
                        "stale data: word {w} is {d} after flag {f} (round {round})"
                    ));
                }
                checked += 1;
            }
            mem.word(3 + me, 0).store(round, Ordering::Release);
        }
    }
    let secs = t0.elapsed().as_secs_f64();
    barrier(node)?;
    Ok(json!({"workload": "mp", "rounds": p.iters, "words_checked": checked, "secs": secs}))
}

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        // xorshift64*
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

/// Random reads and writes over `pages` pages. Word `w` of every page is
/// node `w`'s sequence number for that page: a node only ever increments its
/// own word, so no observer may ever see any word go backwards. At the end
/// every node checks its own words hold its exact write counts, and all nodes
/// hash the whole region: the runner checks the hashes are equal.
fn random(node: &DsmNode, mem: &Mem, p: &Params) -> Result<Value, String> {
    let me = u64::from(node.id());
    let n = node.nodes() as u64;
    let pages = p.pages.min(mem.pages);
    let mut rng = Rng(p.seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ (me + 1));
    let mut seen = vec![0u64; (pages * n) as usize];
    let mut writes = vec![0u64; pages as usize];
    let (mut reads, mut nwrites) = (0u64, 0u64);
    barrier(node)?;
    let t0 = Instant::now();
    for _ in 0..p.iters {
        let r = rng.next();
        let page = (r >> 8) % pages;
        if r & 1 == 0 {
            writes[page as usize] += 1;
            mem.word(page, me)
                .store(writes[page as usize], Ordering::SeqCst);
            nwrites += 1;
        } else {
            for w in 0..n {
                let v = mem.word(page, w).load(Ordering::SeqCst);
                let s = &mut seen[(page * n + w) as usize];
                if v < *s {
                    return Err(format!(
                        "page {page} word {w} went backwards: saw {s} then {v}",
                        s = *s
                    ));
                }
                *s = v;
            }
            reads += 1;
        }
    }
    let secs = t0.elapsed().as_secs_f64();
    barrier(node)?;
    for page in 0..pages {
        let v = mem.word(page, me).load(Ordering::SeqCst);
        if v != writes[page as usize] {
            return Err(format!(
                "lost write: page {page} word {me} holds {v}, this node wrote {}",
                writes[page as usize]
            ));
        }
    }
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for page in 0..pages {
        for w in 0..(PAGE_SIZE / 8) as u64 {
            hash ^= mem.word(page, w).load(Ordering::SeqCst);
            hash = hash.wrapping_mul(0x100_0000_01b3);
        }
    }
    barrier(node)?;
    Ok(json!({
        "workload": "random", "reads": reads, "writes": nwrites,
        "checksum": format!("{hash:016x}"), "secs": secs
    }))
}

/// Runs the random workload until the process is killed or a peer fails
/// (for failure tests): never returns Ok on its own.
fn soak(node: &DsmNode, mem: &Mem, p: &Params) -> Result<Value, String> {
    let me = u64::from(node.id());
    let pages = p.pages.min(mem.pages);
    let mut rng = Rng(p.seed ^ (me + 7));
    barrier(node)?;
    println!("SOAK-RUNNING node={me}");
    let mut i = 0u64;
    loop {
        let r = rng.next();
        let page = (r >> 8) % pages;
        if r & 1 == 0 {
            mem.word(page, me).fetch_add(1, Ordering::SeqCst);
        } else {
            mem.word(page, (r >> 4) % node.nodes() as u64)
                .load(Ordering::SeqCst);
        }
        i += 1;
        if i.is_multiple_of(256) {
            std::thread::sleep(Duration::from_micros(200));
        }
    }
}
