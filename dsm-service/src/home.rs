//! Which node is the home of each page.
//!
//! A default home plus ranges that override it. Ranges are in DSM page
//! numbers; [`crate::space::AddressSpace`] maps regions and guest-physical
//! ranges to page numbers, so a guest NUMA node's memory can be homed on the
//! host that runs that node's vCPUs.

use crate::NodeId;

/// Page → home node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HomeMap {
    default: NodeId,
    /// `(first_page, end_page, home)`, sorted, non-overlapping.
    ranges: Vec<(u64, u64, NodeId)>,
}

impl HomeMap {
    /// Every page homed on `node`.
    pub fn all_on(node: NodeId) -> HomeMap {
        HomeMap {
            default: node,
            ranges: Vec::new(),
        }
    }

    /// Homes `pages` pages from `first` on `node`, overriding what was there.
    pub fn assign(&mut self, first: u64, pages: u64, node: NodeId) {
        if pages == 0 {
            return;
        }
        let end = first + pages;
        let mut out = Vec::with_capacity(self.ranges.len() + 2);
        for &(s, e, h) in &self.ranges {
            if e <= first || s >= end {
                out.push((s, e, h));
                continue;
            }
            if s < first {
                out.push((s, first, h));
            }
            if e > end {
                out.push((end, e, h));
            }
        }
        out.push((first, end, node));
        out.sort_unstable();
        self.ranges = out;
    }

    /// Splits `[first, first+pages)` into `nodes.len()` equal contiguous
    /// blocks homed in order on `nodes` (the last block takes the remainder).
    pub fn split_evenly(&mut self, first: u64, pages: u64, nodes: &[NodeId]) {
        if nodes.is_empty() {
            return;
        }
        let per = pages / nodes.len() as u64;
        for (i, &n) in nodes.iter().enumerate() {
            let start = first + per * i as u64;
            let len = if i + 1 == nodes.len() {
                first + pages - start
            } else {
                per
            };
            self.assign(start, len, n);
        }
    }

    /// The home of `page`.
    pub fn home(&self, page: u64) -> NodeId {
        let i = self.ranges.partition_point(|&(s, _, _)| s <= page);
        if i > 0 {
            let (_, e, h) = self.ranges[i - 1];
            if page < e {
                return h;
            }
        }
        self.default
    }

    /// The highest node id named.
    pub fn max_node(&self) -> NodeId {
        self.ranges
            .iter()
            .map(|r| r.2)
            .fold(self.default, NodeId::max)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_override_the_default_and_each_other() {
        let mut m = HomeMap::all_on(0);
        m.assign(10, 10, 1);
        m.assign(15, 10, 2);
        assert_eq!(m.home(9), 0);
        assert_eq!(m.home(10), 1);
        assert_eq!(m.home(14), 1);
        assert_eq!(m.home(15), 2);
        assert_eq!(m.home(24), 2);
        assert_eq!(m.home(25), 0);
        m.assign(12, 1, 3);
        assert_eq!((m.home(11), m.home(12), m.home(13)), (1, 3, 1));
        assert_eq!(m.max_node(), 3);
    }

    #[test]
    fn split_evenly_gives_each_node_a_block() {
        let mut m = HomeMap::all_on(0);
        m.split_evenly(0, 10, &[0, 1, 2]);
        let homes: Vec<_> = (0..10).map(|p| m.home(p)).collect();
        assert_eq!(homes, vec![0, 0, 0, 1, 1, 1, 2, 2, 2, 2]);
    }
}
