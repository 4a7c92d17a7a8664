//! Per-page fault counts (`DsmOptions::count_page_faults`): two nodes in one
//! process pass one page back and forth a known number of times, and each
//! node's `hottest_pages` names that page with exactly that many faults.

use std::time::Duration;

use dsm_service::node::DsmOptions;
use dsm_service::{ClusterConfig, DsmNode};

const PAGES: usize = 8;
const PAGE: usize = 4096;

fn region() -> u64 {
    // SAFETY: a fresh anonymous mapping, checked; it is handed to the DSM
    // and never unmapped while the node lives.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            PAGES * PAGE,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    assert_ne!(p, libc::MAP_FAILED);
    p as u64
}

fn start(counted: bool) -> ((DsmNode, u64), (DsmNode, u64)) {
    let addrs = dsm_service::transport::free_loopback_addrs(2).unwrap();
    let node = |id: u16| {
        let addrs = addrs.clone();
        std::thread::spawn(move || {
            let mut cfg = ClusterConfig::new(0x407, id, addrs, b"hot-pages-test-key-0123".to_vec());
            cfg.connect_timeout = Duration::from_secs(10);
            let base = region();
            let opts = DsmOptions {
                prefetch_max: 0,
                count_page_faults: counted,
                ..DsmOptions::default()
            };
            let n = DsmNode::start(&cfg, &[("ram", base, (PAGES * PAGE) as u64)], opts)
                .unwrap_or_else(|e| panic!("node {id}: {e}"));
            (n, base)
        })
    };
    let (t0, t1) = (node(0), node(1));
    (t0.join().unwrap(), t1.join().unwrap())
}

fn write(base: u64, page: usize, v: u64) {
    // SAFETY: inside this node's DSM region; the DSM maps the page in on
    // the fault.
    unsafe { std::ptr::write_volatile((base as usize + page * PAGE) as *mut u64, v) }
}

fn read(base: u64, page: usize) -> u64 {
    // SAFETY: as for `write`.
    unsafe { std::ptr::read_volatile((base as usize + page * PAGE) as *const u64) }
}

#[test]
fn hottest_pages_counts_each_pages_faults_exactly() {
    let ((n0, b0), (n1, b1)) = start(true);
    let rounds = 25u64;
    for r in 1..=rounds {
        // Node 0 writes (first a fault on an untouched page, then an
        // upgrade of its shared copy); node 1 reads the new value (a fault:
        // its copy was invalidated by the write).
        write(b0, 3, r);
        assert_eq!(read(b1, 3), r, "round {r}");
    }
    assert_eq!(read(b1, 5), 0);
    let page = |base: u64, p: usize| base + (p * PAGE) as u64;
    assert_eq!(n0.hottest_pages(4), vec![(page(b0, 3), rounds as u32)]);
    assert_eq!(
        n1.hottest_pages(4),
        vec![(page(b1, 3), rounds as u32), (page(b1, 5), 1)]
    );
    assert_eq!(n1.hottest_pages(1), vec![(page(b1, 3), rounds as u32)]);
    n1.shutdown();
    n0.shutdown();
}

#[test]
fn no_counts_unless_asked() {
    let ((n0, b0), (n1, b1)) = start(false);
    write(b0, 2, 7);
    assert_eq!(read(b1, 2), 7);
    assert!(n0.hottest_pages(4).is_empty());
    assert!(n1.hottest_pages(4).is_empty());
    n1.shutdown();
    n0.shutdown();
}
