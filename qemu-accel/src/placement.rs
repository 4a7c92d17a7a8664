//! Which cluster node runs which vCPU.
//!
//! Every host creates every vCPU (so APIC IDs and the ACPI tables are the
//! same everywhere); the placement says which host actually runs each one.
//! The others stay parked on that host. Rules:
//!
//! - vCPU 0, the bootstrap processor, runs on the origin (node 0);
//! - every node runs at least one vCPU;
//! - with guest NUMA nodes, guest node `g` is run by host `g % nodes`, so a
//!   guest node's vCPUs and its memory live on the same host;
//! - without NUMA, vCPUs are split into contiguous, near-equal blocks.

use thiserror::Error;

/// Why a placement cannot be made.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum PlacementError {
    /// Fewer vCPUs than nodes: some node would run nothing.
    #[error(
        "-smp {vcpus} is fewer vCPUs than nodes={nodes}: every node must run at least one vCPU"
    )]
    TooFewVcpus {
        /// vCPUs in the machine.
        vcpus: u32,
        /// Nodes in the cluster.
        nodes: u32,
    },
    /// No vCPUs at all.
    #[error("the machine has no vCPUs")]
    NoVcpus,
    /// The map gives a node count different from the vCPU count.
    #[error("vcpu-map lists {given} vCPU(s) but smp={vcpus}: give the node of every vCPU")]
    NumaMapLength {
        /// Entries in the map.
        given: usize,
        /// vCPUs in the machine.
        vcpus: u32,
    },
    /// The map puts vCPU 0 away from the origin.
    #[error("vcpu-map: vCPU 0 (the boot CPU) is placed on node {node}; it must run on the origin, node 0")]
    BootCpuNotOnOrigin {
        /// Guest NUMA node of vCPU 0.
        numa_node: u32,
        /// Host node it would run on.
        node: u32,
    },
    /// The map leaves a node without vCPUs.
    #[error("vcpu-map: node {0} runs no vCPU; every node must run at least one")]
    IdleNode(u32),
    /// A vCPU's guest NUMA node is not the host that runs it.
    #[error(
        "vCPU {vcpu} is in guest NUMA node {numa_node} but runs on node {node}; map the vCPUs of NUMA node k to host k (e.g. -smp sockets=<nodes> or -numa cpu)"
    )]
    NumaNotLocal {
        /// vCPU index.
        vcpu: u32,
        /// Its guest NUMA node.
        numa_node: u32,
        /// The host that runs it.
        node: u32,
    },
    /// An explicit map names a node outside the cluster.
    #[error("vcpu-map: vCPU {vcpu} is placed on node {node}, but nodes={nodes}")]
    MapNode {
        /// vCPU index.
        vcpu: usize,
        /// The node it names.
        node: u32,
        /// Nodes in the cluster.
        nodes: u32,
    },
}

/// The node that runs each vCPU, indexed by vCPU (`cpu_index`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VcpuPlacement {
    nodes: u32,
    owners: Vec<u32>,
}

impl VcpuPlacement {
    /// Contiguous blocks: vCPU `i` runs on node `i * nodes / vcpus`.
    pub fn contiguous(nodes: u32, vcpus: u32) -> Result<Self, PlacementError> {
        Self::check_counts(nodes, vcpus)?;
        let owners = (0..vcpus)
            .map(|i| (u64::from(i) * u64::from(nodes) / u64::from(vcpus)) as u32)
            .collect();
        Ok(VcpuPlacement { nodes, owners })
    }

    /// Follow the guest NUMA layout: `numa_nodes[i]` is vCPU `i`'s guest
    /// NUMA node, and guest node `g` runs on host `g % nodes`.
    pub fn from_numa(nodes: u32, numa_nodes: &[u32]) -> Result<Self, PlacementError> {
        let vcpus = u32::try_from(numa_nodes.len()).unwrap_or(u32::MAX);
        Self::check_counts(nodes, vcpus)?;
        let owners: Vec<u32> = numa_nodes.iter().map(|g| g % nodes).collect();
        if owners[0] != 0 {
            return Err(PlacementError::BootCpuNotOnOrigin {
                numa_node: numa_nodes[0],
                node: owners[0],
            });
        }
        if let Some(idle) = (0..nodes).find(|n| !owners.contains(n)) {
            return Err(PlacementError::IdleNode(idle));
        }
        Ok(VcpuPlacement { nodes, owners })
    }

    /// Build from an optional explicit map (`vcpu-map`): `map[i]` is the
    /// node that runs vCPU `i`; empty for contiguous blocks. Every entry must
    /// name a node of the cluster.
    pub fn new(nodes: u32, vcpus: u32, map: &[u32]) -> Result<Self, PlacementError> {
        if map.is_empty() {
            return Self::contiguous(nodes, vcpus);
        }
        Self::check_map_nodes(nodes, map)?;
        if map.len() != vcpus as usize {
            return Err(PlacementError::NumaMapLength {
                given: map.len(),
                vcpus,
            });
        }
        Self::from_numa(nodes, map)
    }

    /// Every entry of `map` names a node of an `nodes`-node cluster: the
    /// part of the check that needs no vCPU count, so option parsing can
    /// make it before `-smp` is known.
    pub fn check_map_nodes(nodes: u32, map: &[u32]) -> Result<(), PlacementError> {
        match map.iter().enumerate().find(|(_, &n)| n >= nodes) {
            Some((vcpu, &node)) => Err(PlacementError::MapNode { vcpu, node, nodes }),
            None => Ok(()),
        }
    }

    fn check_counts(nodes: u32, vcpus: u32) -> Result<(), PlacementError> {
        if vcpus == 0 {
            return Err(PlacementError::NoVcpus);
        }
        if vcpus < nodes {
            return Err(PlacementError::TooFewVcpus { vcpus, nodes });
        }
        Ok(())
    }

    /// The node running `cpu_index`, or `None` past the last vCPU.
    pub fn owner(&self, cpu_index: u32) -> Option<u32> {
        self.owners.get(cpu_index as usize).copied()
    }

    /// Whether `node` runs `cpu_index`.
    pub fn runs_on(&self, cpu_index: u32, node: u32) -> bool {
        self.owner(cpu_index) == Some(node)
    }

    /// vCPUs run by `node`, in index order.
    pub fn vcpus_of(&self, node: u32) -> impl Iterator<Item = u32> + '_ {
        self.owners
            .iter()
            .enumerate()
            .filter(move |(_, &owner)| owner == node)
            .map(|(i, _)| i as u32)
    }

    /// Nodes in the cluster.
    pub fn nodes(&self) -> u32 {
        self.nodes
    }

    /// vCPUs in the machine.
    pub fn vcpus(&self) -> u32 {
        self.owners.len() as u32
    }
}

/// Ascending CPU indices as inclusive ranges: `1, 2, 3, 5` → `(1, 3), (5, 5)`.
pub fn cpu_ranges(cpus: impl IntoIterator<Item = u32>) -> Vec<(u32, u32)> {
    let mut ranges: Vec<(u32, u32)> = Vec::new();
    for c in cpus {
        match ranges.last_mut() {
            Some((_, end)) if *end + 1 == c => *end = c,
            _ => ranges.push((c, c)),
        }
    }
    ranges
}

/// One range of [`cpu_ranges`] as CPU-list text: `3` or `1-3`.
pub fn cpu_range_text(&(first, last): &(u32, u32)) -> String {
    if first == last {
        first.to_string()
    } else {
        format!("{first}-{last}")
    }
}

/// The host that is home for the memory of guest NUMA node `numa_node` in a
/// cluster of `nodes`: one guest NUMA node per host, node `g` on host `g`;
/// memory of a NUMA node beyond the cluster, or of no NUMA node, is homed
/// on the origin (`None`).
pub fn numa_home(numa_node: Option<u32>, nodes: u32) -> Option<u32> {
    numa_node.filter(|&g| g < nodes)
}

impl VcpuPlacement {
    /// With a guest NUMA map (`numa_nodes[i]`: vCPU `i`'s guest NUMA node,
    /// `None` where the machine gives none), every vCPU must run on the
    /// host of its NUMA node, or the guest's idea of locality is wrong.
    pub fn check_numa(&self, numa_nodes: &[Option<u32>]) -> Result<(), PlacementError> {
        for (vcpu, g) in numa_nodes.iter().enumerate() {
            let vcpu = vcpu as u32;
            if let (Some(numa_node), Some(node)) = (*g, self.owner(vcpu)) {
                if numa_node != node {
                    return Err(PlacementError::NumaNotLocal {
                        vcpu,
                        numa_node,
                        node,
                    });
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn single_node_runs_everything() {
        let p = VcpuPlacement::contiguous(1, 4).unwrap();
        assert!((0..4).all(|i| p.runs_on(i, 0)));
        assert_eq!(p.owner(4), None);
    }

    #[test]
    fn contiguous_blocks_are_balanced_and_boot_cpu_is_on_origin() {
        let p = VcpuPlacement::contiguous(3, 8).unwrap();
        let per_node: Vec<Vec<u32>> = (0..3).map(|n| p.vcpus_of(n).collect()).collect();
        assert_eq!(per_node, vec![vec![0, 1, 2], vec![3, 4, 5], vec![6, 7]]);
        assert_eq!(p.owner(0), Some(0));
    }

    #[test]
    fn every_node_gets_one_when_counts_are_equal() {
        let p = VcpuPlacement::contiguous(4, 4).unwrap();
        assert_eq!(
            (0..4).map(|i| p.owner(i).unwrap()).collect::<Vec<_>>(),
            [0, 1, 2, 3]
        );
    }

    #[test]
    fn too_few_vcpus_is_refused() {
        let err = VcpuPlacement::contiguous(3, 2).unwrap_err();
        assert_eq!(err, PlacementError::TooFewVcpus { vcpus: 2, nodes: 3 });
        assert_eq!(
            VcpuPlacement::contiguous(1, 0).unwrap_err(),
            PlacementError::NoVcpus
        );
    }

    #[test]
    fn numa_nodes_map_to_hosts() {
        // -numa cpu,node-id=0,socket-id=0 -numa cpu,node-id=1,socket-id=1
        let p = VcpuPlacement::new(2, 4, &[0, 0, 1, 1]).unwrap();
        assert_eq!(p.vcpus_of(1).collect::<Vec<_>>(), [2, 3]);
        // QEMU's default pkg_id % nodes interleave.
        let p = VcpuPlacement::new(2, 4, &[0, 1, 0, 1]).unwrap();
        assert_eq!(p.vcpus_of(0).collect::<Vec<_>>(), [0, 2]);
    }

    #[test]
    fn numa_boot_cpu_must_be_on_origin() {
        let err = VcpuPlacement::new(2, 2, &[1, 0]).unwrap_err();
        assert_eq!(
            err,
            PlacementError::BootCpuNotOnOrigin {
                numa_node: 1,
                node: 1
            }
        );
    }

    #[test]
    fn numa_idle_node_is_refused() {
        let err = VcpuPlacement::new(2, 2, &[0, 0]).unwrap_err();
        assert_eq!(err, PlacementError::IdleNode(1));
    }

    #[test]
    fn map_node_outside_the_cluster_is_refused() {
        let err = VcpuPlacement::new(2, 3, &[0, 1, 2]).unwrap_err();
        assert_eq!(
            err,
            PlacementError::MapNode {
                vcpu: 2,
                node: 2,
                nodes: 2
            }
        );
    }

    #[test]
    fn numa_map_length_must_match() {
        let err = VcpuPlacement::new(1, 3, &[0, 0]).unwrap_err();
        assert_eq!(err, PlacementError::NumaMapLength { given: 2, vcpus: 3 });
    }

    #[test]
    fn numa_memory_is_homed_on_its_host() {
        assert_eq!(numa_home(Some(1), 2), Some(1));
        assert_eq!(numa_home(Some(0), 2), Some(0));
        assert_eq!(numa_home(Some(2), 2), None, "beyond the cluster: origin");
        assert_eq!(numa_home(None, 4), None);
    }

    #[test]
    fn a_vcpu_away_from_its_numa_node_is_refused() {
        let p = VcpuPlacement::contiguous(2, 4).unwrap();
        assert_eq!(p.check_numa(&[Some(0), Some(0), Some(1), Some(1)]), Ok(()));
        assert_eq!(p.check_numa(&[None, None, None, None]), Ok(()));
        assert_eq!(p.check_numa(&[]), Ok(()), "no NUMA map");
        let err = p
            .check_numa(&[Some(0), Some(1), Some(1), Some(1)])
            .unwrap_err();
        assert_eq!(
            err,
            PlacementError::NumaNotLocal {
                vcpu: 1,
                numa_node: 1,
                node: 0
            }
        );
        assert!(err.to_string().starts_with(
            "vCPU 1 is in guest NUMA node 1 but runs on node 0; map the vCPUs of NUMA node k to host k"
        ));
    }
}
