//! [`ConfigError`]: why an option value or a configuration was refused.

use thiserror::Error;

use super::options::option_names;
use super::{MAX_NODES, MIN_KEY_LEN};
use crate::placement::PlacementError;

/// Why an option value or a whole configuration was refused. The messages
/// are shown to the user verbatim by QEMU, so each names the option at fault.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum ConfigError {
    /// An option name this accelerator does not know.
    #[error("unknown option '{0}' (valid options: {valid})", valid = option_names())]
    UnknownOption(String),
    /// A `log` filter that does not parse.
    #[error("log={value}: {reason}")]
    BadLogFilter {
        /// Value as given.
        value: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A numeric option whose value is not a number.
    #[error("{option}={value}: not a non-negative integer")]
    NotANumber {
        /// Option name.
        option: &'static str,
        /// Value as given.
        value: String,
    },
    /// A signed numeric option whose value is not an integer.
    #[error("{option}={value}: not an integer")]
    NotAnInteger {
        /// Option name.
        option: &'static str,
        /// Value as given.
        value: String,
    },
    /// An environment variable standing in for an option, with a value the
    /// option would refuse.
    #[error("environment variable {var}: {source}")]
    Environment {
        /// The variable.
        var: &'static str,
        /// Why the option's check refused the value.
        source: Box<ConfigError>,
    },
    /// `nodes=0`.
    #[error("nodes=0: a cluster needs at least one node")]
    ZeroNodes,
    /// `nodes` beyond [`MAX_NODES`].
    #[error(
        "nodes={0}: at most {MAX_NODES} nodes are supported (the DSM keeps each page's sharers in a {MAX_NODES}-bit set)"
    )]
    TooManyNodes(u32),
    /// `node-id` outside `0..nodes`.
    #[error("node-id={node_id} is out of range for nodes={nodes} (valid: 0..={max})", max = .nodes - 1)]
    NodeIdOutOfRange {
        /// The given node id.
        node_id: u32,
        /// The cluster size.
        nodes: u32,
    },
    /// A `peers` entry that is not `host:port`.
    #[error("peers: '{0}' is not host:port (IPv6 hosts go in brackets: [::1]:7000)")]
    BadPeer(String),
    /// `peers` given with a count different from `nodes`.
    #[error("peers lists {given} address(es) but nodes={nodes}: give one host:port per node")]
    PeerCount {
        /// Addresses given.
        given: usize,
        /// The cluster size.
        nodes: u32,
    },
    /// The same address appears twice in `peers`.
    #[error("peers: {0} appears more than once")]
    DuplicatePeer(String),
    /// A multi-node cluster without `peers`.
    #[error(
        "nodes={0} needs cluster addresses: pass peers=HOST:PORT;HOST:PORT;... (one per node)"
    )]
    MissingPeers(u32),
    /// A multi-node cluster without `key` or `key-file`.
    #[error("nodes={0} needs a cluster key: pass key=SECRET or key-file=PATH")]
    MissingKey(u32),
    /// Both `key` and `key-file`.
    #[error("key and key-file are mutually exclusive: pass only one")]
    KeyTwice,
    /// A key shorter than [`MIN_KEY_LEN`].
    #[error("{source_name}: the cluster key is {len} bytes, at least {MIN_KEY_LEN} are required")]
    KeyTooShort {
        /// `key` or `key-file=PATH`.
        source_name: String,
        /// Length found.
        len: usize,
    },
    /// `key-file` that cannot be read.
    #[error("key-file={path}: {reason}")]
    KeyFile {
        /// Path as given.
        path: String,
        /// The I/O error, as text.
        reason: String,
    },
    /// A `transport-security` value that is not one.
    #[error(transparent)]
    TransportSecurity(dsm_service::transport::sealed::BadSecurity),
    /// `peer-timeout-ms=0`.
    #[error("peer-timeout-ms=0: the peer timeout must be at least 1 ms")]
    ZeroPeerTimeout,
    /// A `vcpu-map` entry naming a node outside the cluster.
    #[error(transparent)]
    VcpuMap(#[from] PlacementError),
    /// An option value containing a NUL byte or invalid UTF-8 (C callers).
    #[error("{0}: value is not valid UTF-8 text")]
    BadText(String),
}
