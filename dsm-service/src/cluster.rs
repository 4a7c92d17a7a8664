//! Cluster membership: who the nodes are, where they listen, and the secret
//! they share.

use std::net::SocketAddr;
use std::time::Duration;

pub use crate::transport::sealed::TransportSecurity;
use crate::{NodeId, MAX_NODES};

/// Everything a node needs to join a cluster.
#[derive(Debug, Clone)]
pub struct ClusterConfig {
    /// Identifies this cluster; peers of another cluster are refused.
    pub cluster_id: u64,
    /// This node's id.
    pub node_id: NodeId,
    /// Listen/connect address of every node, indexed by node id.
    pub addrs: Vec<SocketAddr>,
    /// The pre-shared cluster key that authenticates peers.
    pub key: Vec<u8>,
    /// A peer silent for this long is declared failed.
    pub peer_timeout: Duration,
    /// How long to wait for every peer to come up at start.
    pub connect_timeout: Duration,
    /// Largest frame accepted from a peer, in bytes.
    pub max_frame: usize,
    /// What protects each link after the handshake (sealed by default).
    pub security: TransportSecurity,
    /// What every node must agree on besides membership, as text: the
    /// embedding application's part (QEMU: the vCPUs and their placement).
    /// [`crate::DsmNode::start`] adds the guest RAM layout; two nodes whose
    /// layouts differ refuse each other at the handshake, naming both.
    pub layout: String,
}

/// A cluster description that cannot work.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    /// No nodes.
    #[error("a cluster needs at least one node")]
    NoNodes,
    /// Too many nodes.
    #[error("{0} nodes requested; at most {MAX_NODES} are supported")]
    TooManyNodes(usize),
    /// This node's id is out of range.
    #[error("node id {id} is out of range for a cluster of {nodes} nodes (ids are 0..{nodes})")]
    NodeIdOutOfRange {
        /// The id.
        id: NodeId,
        /// Node count.
        nodes: usize,
    },
    /// No key for a multi-node cluster.
    #[error("a cluster of {0} nodes needs a cluster key")]
    MissingKey(usize),
    /// A key too short to be a secret.
    #[error("the cluster key is {0} bytes; use at least 16")]
    ShortKey(usize),
    /// Two nodes share an address.
    #[error("nodes {a} and {b} have the same address {addr}")]
    DuplicateAddr {
        /// First node.
        a: usize,
        /// Second node.
        b: usize,
        /// The address.
        addr: SocketAddr,
    },
    /// A timeout of zero.
    #[error("the peer timeout must be greater than zero")]
    ZeroTimeout,
}

impl ClusterConfig {
    /// A config with the default timeouts (peer 5 s, connect 30 s), frame
    /// limit (4 MiB) and sealed links.
    pub fn new(cluster_id: u64, node_id: NodeId, addrs: Vec<SocketAddr>, key: Vec<u8>) -> Self {
        ClusterConfig {
            cluster_id,
            node_id,
            addrs,
            key,
            peer_timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(30),
            max_frame: 4 << 20,
            security: TransportSecurity::Aead,
            layout: String::new(),
        }
    }

    /// Number of nodes.
    pub fn nodes(&self) -> usize {
        self.addrs.len()
    }

    /// Checks that the description can work.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let n = self.addrs.len();
        if n == 0 {
            return Err(ConfigError::NoNodes);
        }
        if n > MAX_NODES {
            return Err(ConfigError::TooManyNodes(n));
        }
        if usize::from(self.node_id) >= n {
            return Err(ConfigError::NodeIdOutOfRange {
                id: self.node_id,
                nodes: n,
            });
        }
        if n > 1 && self.key.is_empty() {
            return Err(ConfigError::MissingKey(n));
        }
        if n > 1 && self.key.len() < 16 {
            return Err(ConfigError::ShortKey(self.key.len()));
        }
        for a in 0..n {
            for b in a + 1..n {
                if self.addrs[a] == self.addrs[b] {
                    return Err(ConfigError::DuplicateAddr {
                        a,
                        b,
                        addr: self.addrs[a],
                    });
                }
            }
        }
        if self.peer_timeout.is_zero() {
            return Err(ConfigError::ZeroTimeout);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addrs(n: u16) -> Vec<SocketAddr> {
        (0..n)
            .map(|i| SocketAddr::from(([127, 0, 0, 1], 7000 + i)))
            .collect()
    }

    #[test]
    fn validate_rejects_bad_descriptions() {
        let key = b"0123456789abcdef".to_vec();
        assert_eq!(
            ClusterConfig::new(1, 0, vec![], key.clone()).validate(),
            Err(ConfigError::NoNodes)
        );
        assert_eq!(
            ClusterConfig::new(1, 2, addrs(2), key.clone()).validate(),
            Err(ConfigError::NodeIdOutOfRange { id: 2, nodes: 2 })
        );
        assert_eq!(
            ClusterConfig::new(1, 0, addrs(2), vec![]).validate(),
            Err(ConfigError::MissingKey(2))
        );
        assert_eq!(
            ClusterConfig::new(1, 0, addrs(2), b"short".to_vec()).validate(),
            Err(ConfigError::ShortKey(5))
        );
        let mut dup = addrs(3);
        dup[2] = dup[0];
        assert!(matches!(
            ClusterConfig::new(1, 0, dup, key.clone()).validate(),
            Err(ConfigError::DuplicateAddr { a: 0, b: 2, .. })
        ));
        assert_eq!(
            ClusterConfig::new(1, 0, addrs(1), vec![]).validate(),
            Ok(())
        );
        assert_eq!(ClusterConfig::new(1, 1, addrs(4), key).validate(), Ok(()));
    }
}
