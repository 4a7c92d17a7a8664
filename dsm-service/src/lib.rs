//! FragVisor's distributed shared memory service.
//!
//! It keeps a set of memory regions — a VM's guest RAM — coherent across the
//! nodes of an aggregate VM, on stock Linux kernels:
//!
//! * [`uffd`]: the userfaultfd engine (trap faults, install, protect, drop);
//! * [`coherence`]: the home-based single-writer/multiple-reader protocol
//!   (see `coherence/PROTOCOL.md`);
//! * [`transport`]: how nodes talk: the [`transport::Transport`] trait, TCP,
//!   and RDMA behind the `rdma` feature;
//! * [`node`]: [`node::DsmNode`], which ties them together for one process;
//! * [`stats`]: counters and the fault-latency histogram.

pub mod cluster;
pub mod coherence;
pub mod home;
pub mod node;
pub mod space;
pub mod stats;
pub mod transport;
pub mod uffd;

/// A node's index in the cluster (0 is the origin).
pub type NodeId = u16;

/// The most nodes a cluster may have (sharer sets are 64-bit masks).
pub const MAX_NODES: usize = 64;

pub use cluster::{ClusterConfig, TransportSecurity};
pub use node::{DsmEvent, DsmNode};

/// An error and its chain of causes on one line (`a: b: c`), for messages
/// shown to users.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        s.push_str(": ");
        s.push_str(&c.to_string());
        src = c.source();
    }
    s
}
