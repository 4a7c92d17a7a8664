//! The line each host prints at exit: the vCPUs it ran and their exits,
//! DSM faults and traffic, the clock's error bound and steering, and (with
//! `hot-pages=N`) the guest pages that took the most faults, by name.

use std::sync::atomic::{AtomicU64, Ordering};

use super::Runtime;

/// Per-vCPU counts for the exit summary.
#[derive(Debug, Default)]
pub(super) struct VcpuCounts {
    /// Accesses this vCPU forwarded to the origin.
    pub(super) forwarded: AtomicU64,
}

/// What the summary line reports, gathered from the runtime.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Summary {
    node: u32,
    /// `(vCPU, exits)` of the vCPUs this host ran.
    vcpus: Vec<(u32, u64)>,
    faults: u64,
    /// Read faults, write faults on missing pages, upgrades, and the faults
    /// of all kinds resolved with no message.
    kinds: [u64; 4],
    /// Median fault latency, ns.
    fault_p50_ns: u64,
    served: u64,
    bytes_sent: u64,
    bytes_received: u64,
    clock_bound_ns: u64,
    clock_resyncs: u64,
    clock_rate_ppb: i64,
    /// `(page name, faults)`, most first.
    hot: Vec<(String, u32)>,
}

impl Summary {
    fn line(&self) -> String {
        let me = self.node;
        let vcpus: Vec<String> = self
            .vcpus
            .iter()
            .map(|(c, n)| format!("cpu{c}:{n}"))
            .collect();
        let mut line = format!(
            "fragvisor: node {me} summary: vcpus=[{}] dsm_faults={} (read={} write={} upgrade={} at_home={} p50_ns={}) dsm_served={} bytes_sent={} bytes_received={} clock_bound_ns={} clock_resyncs={} clock_rate_ppb={}",
            vcpus.join(","),
            self.faults,
            self.kinds[0],
            self.kinds[1],
            self.kinds[2],
            self.kinds[3],
            self.fault_p50_ns,
            self.served,
            self.bytes_sent,
            self.bytes_received,
            self.clock_bound_ns,
            self.clock_resyncs,
            self.clock_rate_ppb
        );
        if !self.hot.is_empty() {
            let listed: u64 = self.hot.iter().map(|&(_, n)| u64::from(n)).sum();
            let pages: Vec<String> = self
                .hot
                .iter()
                .map(|(name, n)| format!("{name}:{n}"))
                .collect();
            line.push_str(&format!(
                "\nfragvisor: node {me} hottest pages ({listed} of {} faults): {}",
                self.faults,
                pages.join(" ")
            ));
        }
        line
    }
}

/// `region+0xoffset`, or the bare address outside every region.
fn page_name(region: Option<(&str, u64)>, addr: u64) -> String {
    match region {
        Some((name, offset)) => format!("{name}+{offset:#x}"),
        None => format!("{addr:#x}"),
    }
}

impl Runtime {
    /// The line printed at exit: node id, the vCPUs it ran with their
    /// forwarded-exit counts plus `extra` per vCPU (exits or TCG blocks the
    /// C side counted), DSM faults taken and served, bytes moved.
    pub fn summary(&self, extra: &dyn Fn(u32) -> u64) -> String {
        let me = u32::from(self.node.id());
        let stats = self.node.stats();
        let vcpus = self
            .placement
            .vcpus_of(me)
            .map(|c| {
                let fwd = self
                    .counts
                    .get(c as usize)
                    .map_or(0, |k| k.forwarded.load(Ordering::Relaxed));
                (c, extra(c) + fwd)
            })
            .collect();
        let hot = self
            .node
            .hottest_pages(self.hot_pages)
            .into_iter()
            .map(|(addr, n)| (self.page_name(addr), n))
            .collect();
        Summary {
            node: me,
            vcpus,
            faults: stats.faults(),
            kinds: [
                stats.read_faults,
                stats.write_faults,
                stats.upgrades,
                stats.local_faults,
            ],
            fault_p50_ns: stats.latency_p50_ns,
            served: stats.served,
            bytes_sent: stats.bytes_sent,
            bytes_received: stats.bytes_received,
            clock_bound_ns: self.clock().mono.bound,
            clock_resyncs: self.resyncs.load(Ordering::Relaxed),
            clock_rate_ppb: self.steer.load().rate_ppb,
            hot,
        }
        .line()
    }

    /// `region+0xoffset` of a guest RAM host address.
    fn page_name(&self, addr: u64) -> String {
        let space = self.node.space();
        let region = space.region_of(addr);
        page_name(region.map(|(r, offset)| (r.name.as_str(), offset)), addr)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn summary() -> Summary {
        Summary {
            node: 1,
            vcpus: vec![(2, 10), (3, 0)],
            faults: 100,
            kinds: [50, 30, 20, 10],
            fault_p50_ns: 9000,
            served: 40,
            bytes_sent: 4096,
            bytes_received: 8192,
            clock_bound_ns: 25,
            clock_resyncs: 7,
            clock_rate_ppb: -300,
            hot: vec![],
        }
    }

    #[test]
    fn the_summary_is_one_line_of_fields() {
        assert_eq!(
            summary().line(),
            "fragvisor: node 1 summary: vcpus=[cpu2:10,cpu3:0] dsm_faults=100 (read=50 write=30 upgrade=20 at_home=10 p50_ns=9000) dsm_served=40 \
             bytes_sent=4096 bytes_received=8192 clock_bound_ns=25 clock_resyncs=7 clock_rate_ppb=-300"
        );
    }

    #[test]
    fn hot_pages_follow_on_a_second_line() {
        let s = Summary {
            hot: vec![("pc.ram+0x9000".into(), 30), ("0x7f00".into(), 5)],
            ..summary()
        };
        let line = s.line();
        let (_, hot) = line.split_once('\n').unwrap();
        assert_eq!(
            hot,
            "fragvisor: node 1 hottest pages (35 of 100 faults): pc.ram+0x9000:30 0x7f00:5"
        );
    }

    #[test]
    fn pages_are_named_by_region_and_offset() {
        assert_eq!(
            page_name(Some(("pc.ram", 0x1000)), 0x7f00_0000_1000),
            "pc.ram+0x1000"
        );
        assert_eq!(page_name(Some(("pc.bios", 0)), 0x7f00), "pc.bios+0x0");
        assert_eq!(page_name(None, 0xdead_0000), "0xdead0000");
    }
}
