//! Cluster configuration carried by the accelerator options.
//!
//! QEMU hands every `-accel fragvisor,<name>=<value>` pair to
//! [`ConfigBuilder::set`] as it parses the command line, then calls
//! [`ConfigBuilder::build`] once from the accelerator's `init_machine`, when
//! the machine (and so the vCPU count) is known. `set` checks one value in
//! isolation; `build` checks how the values fit together.
//!
//! | option     | meaning                                                   |
//! |------------|-----------------------------------------------------------|
//! | `nodes`    | hosts in the cluster (default 1)                          |
//! | `node-id`  | this host's index, `0..nodes`; node 0 is the origin       |
//! | `peers`    | `host:port` of every node, in node-id order, separated by `;` (or `,,` on the QEMU command line) |
//! | `key`      | pre-shared cluster key (at least 16 bytes)                |
//! | `key-file` | file holding the pre-shared cluster key                   |

use std::fmt;
use std::path::PathBuf;

use thiserror::Error;

use crate::placement::{PlacementError, VcpuPlacement};

/// `a;b;c`: how list options are written (`peers`, `vcpu-map`).
fn semicolon_list<T: fmt::Display>(items: &[T]) -> String {
    items.iter().map(T::to_string).collect::<Vec<_>>().join(";")
}

/// Smallest accepted pre-shared key, in bytes.
pub const MIN_KEY_LEN: usize = 16;

/// Largest cluster we accept. Every host creates every vCPU and guests run
/// xAPIC (at most 255 APIC IDs), so more hosts than that cannot each own a
/// vCPU.
pub const MAX_NODES: u32 = 255;

/// The vCPU engine the accelerator runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Engine {
    /// `-accel fragvisor`: QEMU's KVM code with the userspace APIC.
    Kvm,
    /// `-accel fragvisor-tcg`: multi-threaded TCG.
    Tcg,
}

impl Engine {
    /// The name users type after `-accel`.
    pub fn accel_name(self) -> &'static str {
        match self {
            Engine::Kvm => "fragvisor",
            Engine::Tcg => "fragvisor-tcg",
        }
    }
}

/// One accelerator option, as QEMU registers it (`-accel fragvisor,help`).
#[derive(Debug, Clone, Copy)]
pub struct OptionSpec {
    /// Option name, e.g. `node-id`.
    pub name: &'static str,
    /// One-line description shown by QEMU's help.
    pub help: &'static str,
}

/// Every option the accelerators accept, in the order QEMU lists them.
pub const OPTIONS: &[OptionSpec] = &[
    OptionSpec {
        name: "nodes",
        help: "number of hosts in the cluster (default 1)",
    },
    OptionSpec {
        name: "node-id",
        help: "index of this host in the cluster, 0..nodes-1; 0 is the origin (default 0)",
    },
    OptionSpec {
        name: "peers",
        help: "host:port of every node in node-id order, separated by ';' (or ',,')",
    },
    OptionSpec {
        name: "key",
        help: "pre-shared cluster key (at least 16 bytes); required when nodes > 1",
    },
    OptionSpec {
        name: "key-file",
        help: "file holding the pre-shared cluster key",
    },
    OptionSpec {
        name: "peer-timeout-ms",
        help: "a peer silent this many ms is declared failed and the VM stops naming it (default 5000)",
    },
    OptionSpec {
        name: "vcpu-map",
        help: "node that runs each vCPU, in vCPU order, separated by ';' or ':' (default: contiguous blocks)",
    },
];

/// Why an option value or a whole configuration was refused. The messages
/// are shown to the user verbatim by QEMU, so each names the option at fault.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum ConfigError {
    /// An option name this accelerator does not know.
    #[error(
        "unknown option '{0}' (valid options: nodes, node-id, peers, key, key-file, peer-timeout-ms, vcpu-map)"
    )]
    UnknownOption(String),
    /// A numeric option whose value is not a number.
    #[error("{option}={value}: not a non-negative integer")]
    NotANumber {
        /// Option name.
        option: &'static str,
        /// Value as given.
        value: String,
    },
    /// `nodes=0`.
    #[error("nodes=0: a cluster needs at least one node")]
    ZeroNodes,
    /// `nodes` beyond [`MAX_NODES`].
    #[error("nodes={0}: at most {MAX_NODES} nodes are supported (xAPIC guests)")]
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

/// The network address of one node: a host name or literal IP and a port.
/// Resolution happens when the cluster connects, not at parse time.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PeerAddr {
    /// Host name, IPv4 literal, or IPv6 literal without brackets.
    pub host: String,
    /// TCP port.
    pub port: u16,
}

impl PeerAddr {
    /// Parse `host:port` or `[ipv6]:port`.
    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        let bad = || ConfigError::BadPeer(text.to_string());
        let (host, port) = if let Some(rest) = text.strip_prefix('[') {
            let (host, port) = rest.split_once("]:").ok_or_else(bad)?;
            if !host.contains(':') {
                return Err(bad());
            }
            (host, port)
        } else {
            let (host, port) = text.rsplit_once(':').ok_or_else(bad)?;
            if host.contains(':') {
                return Err(bad());
            }
            (host, port)
        };
        let host_ok = !host.is_empty()
            && host
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | ':' | '%'));
        let port: u16 = port.parse().map_err(|_| bad())?;
        if !host_ok || port == 0 {
            return Err(bad());
        }
        Ok(PeerAddr {
            host: host.to_string(),
            port,
        })
    }
}

impl fmt::Display for PeerAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

/// The pre-shared cluster key. Its bytes never appear in `Debug` output.
#[derive(Clone, PartialEq, Eq)]
pub struct ClusterKey(Vec<u8>);

impl ClusterKey {
    /// Wrap key bytes, checking the minimum length.
    pub fn new(bytes: Vec<u8>, source_name: &str) -> Result<Self, ConfigError> {
        if bytes.len() < MIN_KEY_LEN {
            return Err(ConfigError::KeyTooShort {
                source_name: source_name.to_string(),
                len: bytes.len(),
            });
        }
        Ok(ClusterKey(bytes))
    }

    /// The key bytes, for the transport handshake.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }
}

impl fmt::Debug for ClusterKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ClusterKey({} bytes)", self.0.len())
    }
}

/// A validated cluster configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterConfig {
    /// Engine the options were given to.
    pub engine: Engine,
    /// Hosts in the cluster, `1..=MAX_NODES`.
    pub nodes: u32,
    /// This host, `0..nodes`.
    pub node_id: u32,
    /// Address of every node, indexed by node id; empty for a 1-node cluster
    /// that gave none.
    pub peers: Vec<PeerAddr>,
    /// The cluster key; always present when `nodes > 1`.
    pub key: Option<ClusterKey>,
    /// Node of each vCPU from `vcpu-map`; empty for the default placement.
    pub vcpu_map: Vec<u32>,
    /// `peer-timeout-ms`, if given.
    pub peer_timeout_ms: Option<u32>,
}

impl ClusterConfig {
    /// Whether this host is the origin (node 0: devices and the BSP live here).
    pub fn is_origin(&self) -> bool {
        self.node_id == 0
    }

    /// Whether the cluster has a single host, so no DSM or forwarding is needed.
    pub fn is_single_node(&self) -> bool {
        self.nodes == 1
    }

    /// The address this host listens on, if addresses were given.
    pub fn listen_addr(&self) -> Option<&PeerAddr> {
        self.peers.get(self.node_id as usize)
    }
}

/// Collects option values as QEMU parses `-accel`, then validates them.
#[derive(Debug, Clone, Default)]
pub struct ConfigBuilder {
    nodes: Option<u32>,
    node_id: Option<u32>,
    peers: Option<Vec<PeerAddr>>,
    key: Option<String>,
    key_file: Option<PathBuf>,
    vcpu_map: Option<Vec<u32>>,
    peer_timeout_ms: Option<u32>,
}

/// Peer timeout when `peer-timeout-ms` is not given.
pub const DEFAULT_PEER_TIMEOUT_MS: u32 = 5000;

fn parse_u32(option: &'static str, value: &str) -> Result<u32, ConfigError> {
    value
        .trim()
        .parse::<u32>()
        .map_err(|_| ConfigError::NotANumber {
            option,
            value: value.to_string(),
        })
}

fn parse_peers(value: &str) -> Result<Vec<PeerAddr>, ConfigError> {
    value
        .split([';', ','])
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(PeerAddr::parse)
        .collect()
}

impl ConfigBuilder {
    /// An empty builder: all options at their defaults.
    pub fn new() -> Self {
        Self::default()
    }

    /// Set one option. Values are checked on their own here; how they fit
    /// together is checked by [`ConfigBuilder::build`]. Setting an option
    /// twice keeps the last value, as QEMU does for repeated properties.
    pub fn set(&mut self, name: &str, value: &str) -> Result<(), ConfigError> {
        match name {
            "nodes" => {
                let nodes = parse_u32("nodes", value)?;
                if nodes == 0 {
                    return Err(ConfigError::ZeroNodes);
                }
                if nodes > MAX_NODES {
                    return Err(ConfigError::TooManyNodes(nodes));
                }
                self.nodes = Some(nodes);
            }
            "node-id" => self.node_id = Some(parse_u32("node-id", value)?),
            "peers" => self.peers = Some(parse_peers(value)?),
            "key" => self.key = Some(value.to_string()),
            "key-file" => self.key_file = Some(PathBuf::from(value)),
            "peer-timeout-ms" => {
                let ms = parse_u32("peer-timeout-ms", value)?;
                if ms == 0 {
                    return Err(ConfigError::ZeroPeerTimeout);
                }
                self.peer_timeout_ms = Some(ms);
            }
            "vcpu-map" => {
                let map = value
                    .split([';', ':'])
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .map(|v| parse_u32("vcpu-map", v))
                    .collect::<Result<Vec<_>, _>>()?;
                self.vcpu_map = Some(map);
            }
            _ => return Err(ConfigError::UnknownOption(name.to_string())),
        }
        Ok(())
    }

    /// The current value of an option as text, the way QEMU shows properties.
    /// The key is never shown.
    pub fn get(&self, name: &str) -> Result<String, ConfigError> {
        Ok(match name {
            "nodes" => self.nodes.unwrap_or(1).to_string(),
            "node-id" => self.node_id.unwrap_or(0).to_string(),
            "peers" => semicolon_list(self.peers.as_deref().unwrap_or_default()),
            "key" => match self.key {
                Some(_) => "<set>".to_string(),
                None => String::new(),
            },
            "key-file" => self
                .key_file
                .as_ref()
                .map(|p| p.display().to_string())
                .unwrap_or_default(),
            "peer-timeout-ms" => self
                .peer_timeout_ms
                .unwrap_or(DEFAULT_PEER_TIMEOUT_MS)
                .to_string(),
            "vcpu-map" => semicolon_list(self.vcpu_map.as_deref().unwrap_or_default()),
            _ => return Err(ConfigError::UnknownOption(name.to_string())),
        })
    }

    /// Check the options together and produce the configuration. Reads
    /// `key-file` if one was given.
    pub fn build(&self, engine: Engine) -> Result<ClusterConfig, ConfigError> {
        let nodes = self.nodes.unwrap_or(1);
        let node_id = self.node_id.unwrap_or(0);
        if node_id >= nodes {
            return Err(ConfigError::NodeIdOutOfRange { node_id, nodes });
        }

        let peers = self.peers.clone().unwrap_or_default();
        if nodes > 1 && peers.is_empty() {
            return Err(ConfigError::MissingPeers(nodes));
        }
        if !peers.is_empty() && peers.len() != nodes as usize {
            return Err(ConfigError::PeerCount {
                given: peers.len(),
                nodes,
            });
        }
        for (i, peer) in peers.iter().enumerate() {
            if peers[..i].contains(peer) {
                return Err(ConfigError::DuplicatePeer(peer.to_string()));
            }
        }

        let key = match (&self.key, &self.key_file) {
            (Some(_), Some(_)) => return Err(ConfigError::KeyTwice),
            (Some(text), None) => Some(ClusterKey::new(text.as_bytes().to_vec(), "key")?),
            (None, Some(path)) => Some(read_key_file(path)?),
            (None, None) if nodes > 1 => return Err(ConfigError::MissingKey(nodes)),
            (None, None) => None,
        };

        let vcpu_map = self.vcpu_map.clone().unwrap_or_default();
        VcpuPlacement::check_map_nodes(nodes, &vcpu_map)?;

        Ok(ClusterConfig {
            engine,
            nodes,
            node_id,
            peers,
            key,
            vcpu_map,
            peer_timeout_ms: self.peer_timeout_ms,
        })
    }
}

/// Read a key file; one trailing newline (as editors write) is not part of
/// the key.
fn read_key_file(path: &std::path::Path) -> Result<ClusterKey, ConfigError> {
    let shown = path.display().to_string();
    let mut bytes = std::fs::read(path).map_err(|e| ConfigError::KeyFile {
        path: shown.clone(),
        reason: e.to_string(),
    })?;
    if bytes.ends_with(b"\n") {
        bytes.pop();
        if bytes.ends_with(b"\r") {
            bytes.pop();
        }
    }
    ClusterKey::new(bytes, &format!("key-file={shown}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "0123456789abcdef";

    fn builder(pairs: &[(&str, &str)]) -> ConfigBuilder {
        let mut b = ConfigBuilder::new();
        for (k, v) in pairs {
            b.set(k, v).expect("valid option");
        }
        b
    }

    #[test]
    fn defaults_are_a_single_node_origin() {
        let cfg = ConfigBuilder::new().build(Engine::Kvm).unwrap();
        assert_eq!(cfg.nodes, 1);
        assert_eq!(cfg.node_id, 0);
        assert!(cfg.is_origin());
        assert!(cfg.is_single_node());
        assert!(cfg.key.is_none());
        assert!(cfg.listen_addr().is_none());
    }

    #[test]
    fn single_node_needs_no_key_or_peers() {
        let cfg = builder(&[("nodes", "1")]).build(Engine::Tcg).unwrap();
        assert_eq!(cfg.engine, Engine::Tcg);
        assert!(cfg.is_single_node());
    }

    #[test]
    fn zero_nodes_is_refused_when_set() {
        let err = ConfigBuilder::new().set("nodes", "0").unwrap_err();
        assert_eq!(err, ConfigError::ZeroNodes);
        assert!(err.to_string().contains("nodes=0"));
    }

    #[test]
    fn too_many_nodes_is_refused() {
        let err = ConfigBuilder::new().set("nodes", "256").unwrap_err();
        assert_eq!(err, ConfigError::TooManyNodes(256));
    }

    #[test]
    fn non_numeric_values_name_the_option() {
        let err = ConfigBuilder::new().set("node-id", "two").unwrap_err();
        assert_eq!(err.to_string(), "node-id=two: not a non-negative integer");
        assert!(ConfigBuilder::new().set("nodes", "-1").is_err());
    }

    #[test]
    fn node_id_must_be_below_nodes() {
        let err = builder(&[("nodes", "2"), ("node-id", "2")])
            .build(Engine::Kvm)
            .unwrap_err();
        assert_eq!(
            err,
            ConfigError::NodeIdOutOfRange {
                node_id: 2,
                nodes: 2
            }
        );
        assert_eq!(
            err.to_string(),
            "node-id=2 is out of range for nodes=2 (valid: 0..=1)"
        );
        let err = builder(&[("node-id", "1")]).build(Engine::Kvm).unwrap_err();
        assert!(err.to_string().contains("node-id=1"));
    }

    #[test]
    fn unknown_option_is_named() {
        let err = ConfigBuilder::new().set("colour", "blue").unwrap_err();
        assert_eq!(err, ConfigError::UnknownOption("colour".into()));
        assert!(err.to_string().starts_with("unknown option 'colour'"));
        assert!(ConfigBuilder::new().get("colour").is_err());
    }

    #[test]
    fn multi_node_without_key_is_refused() {
        let err = builder(&[("nodes", "2"), ("peers", "a:1;b:1")])
            .build(Engine::Kvm)
            .unwrap_err();
        assert_eq!(err, ConfigError::MissingKey(2));
        assert!(err.to_string().contains("key=SECRET or key-file=PATH"));
    }

    #[test]
    fn multi_node_without_peers_is_refused() {
        let err = builder(&[("nodes", "3"), ("key", KEY)])
            .build(Engine::Kvm)
            .unwrap_err();
        assert_eq!(err, ConfigError::MissingPeers(3));
    }

    #[test]
    fn multi_node_full_config() {
        let cfg = builder(&[
            ("nodes", "2"),
            ("node-id", "1"),
            ("peers", "10.0.0.1:7000;[fd00::2]:7000"),
            ("key", KEY),
        ])
        .build(Engine::Kvm)
        .unwrap();
        assert_eq!(cfg.nodes, 2);
        assert!(!cfg.is_origin());
        assert_eq!(cfg.listen_addr().unwrap().to_string(), "[fd00::2]:7000");
        assert_eq!(cfg.key.as_ref().unwrap().as_bytes(), KEY.as_bytes());
    }

    #[test]
    fn peers_accept_qemu_unescaped_commas() {
        let b = builder(&[("peers", "h0:1,h1:2")]);
        assert_eq!(b.get("peers").unwrap(), "h0:1;h1:2");
    }

    #[test]
    fn peer_count_must_match_nodes() {
        let err = builder(&[("nodes", "2"), ("peers", "a:1;b:1;c:1"), ("key", KEY)])
            .build(Engine::Kvm)
            .unwrap_err();
        assert_eq!(err, ConfigError::PeerCount { given: 3, nodes: 2 });
    }

    #[test]
    fn duplicate_peer_is_refused() {
        let err = builder(&[("nodes", "2"), ("peers", "a:1;a:1"), ("key", KEY)])
            .build(Engine::Kvm)
            .unwrap_err();
        assert_eq!(err, ConfigError::DuplicatePeer("a:1".into()));
    }

    #[test]
    fn peer_syntax() {
        assert_eq!(
            PeerAddr::parse("node-a.local:7000").unwrap(),
            PeerAddr {
                host: "node-a.local".into(),
                port: 7000
            }
        );
        assert_eq!(PeerAddr::parse("[::1]:9").unwrap().host, "::1");
        for bad in [
            "nohost", ":7000", "h:0", "h:70000", "::1:7000", "[h]:1", "a b:1", "h:",
        ] {
            assert!(PeerAddr::parse(bad).is_err(), "{bad} should be refused");
        }
    }

    #[test]
    fn short_key_is_refused() {
        let err = builder(&[("key", "short")]).build(Engine::Kvm).unwrap_err();
        assert_eq!(
            err,
            ConfigError::KeyTooShort {
                source_name: "key".into(),
                len: 5
            }
        );
    }

    #[test]
    fn key_and_key_file_are_exclusive() {
        let err = builder(&[("key", KEY), ("key-file", "/nonexistent")])
            .build(Engine::Kvm)
            .unwrap_err();
        assert_eq!(err, ConfigError::KeyTwice);
    }

    #[test]
    fn key_file_is_read_without_trailing_newline() {
        let dir = std::env::temp_dir().join(format!("fv-keyfile-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("key");
        std::fs::write(&path, format!("{KEY}\n")).unwrap();
        let cfg = builder(&[
            ("nodes", "2"),
            ("peers", "a:1;b:1"),
            ("key-file", path.to_str().unwrap()),
        ])
        .build(Engine::Tcg)
        .unwrap();
        assert_eq!(cfg.key.unwrap().as_bytes(), KEY.as_bytes());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn missing_key_file_names_the_path() {
        let err = builder(&[("key-file", "/nonexistent/fv.key")])
            .build(Engine::Kvm)
            .unwrap_err();
        assert!(err
            .to_string()
            .starts_with("key-file=/nonexistent/fv.key: "));
    }

    #[test]
    fn key_is_never_shown() {
        let b = builder(&[("key", KEY)]);
        assert_eq!(b.get("key").unwrap(), "<set>");
        let cfg = b.build(Engine::Kvm).unwrap();
        assert!(!format!("{cfg:?}").contains(KEY));
    }

    #[test]
    fn every_listed_option_is_settable_and_gettable() {
        for opt in OPTIONS {
            assert!(ConfigBuilder::new().get(opt.name).is_ok(), "{}", opt.name);
        }
        assert_eq!(OPTIONS.len(), 7);
    }

    #[test]
    fn vcpu_map_is_parsed_and_checked_against_nodes() {
        let mut b = ConfigBuilder::new();
        b.set("nodes", "2").unwrap();
        b.set("peers", "127.0.0.1:7000;127.0.0.1:7001").unwrap();
        b.set("key", KEY).unwrap();
        b.set("vcpu-map", "0;1:1;0").unwrap();
        assert_eq!(b.get("vcpu-map").unwrap(), "0;1;1;0");
        assert_eq!(b.build(Engine::Tcg).unwrap().vcpu_map, vec![0, 1, 1, 0]);
        b.set("vcpu-map", "0;2").unwrap();
        assert_eq!(
            b.build(Engine::Tcg).unwrap_err().to_string(),
            "vcpu-map: vCPU 1 is placed on node 2, but nodes=2"
        );
        assert!(matches!(
            b.set("vcpu-map", "0;x"),
            Err(ConfigError::NotANumber {
                option: "vcpu-map",
                ..
            })
        ));
    }

    #[test]
    fn peer_timeout_is_a_positive_number_of_ms() {
        let mut b = ConfigBuilder::new();
        assert_eq!(b.get("peer-timeout-ms").unwrap(), "5000");
        b.set("peer-timeout-ms", "1500").unwrap();
        assert_eq!(b.build(Engine::Kvm).unwrap().peer_timeout_ms, Some(1500));
        assert_eq!(
            b.set("peer-timeout-ms", "0").unwrap_err().to_string(),
            "peer-timeout-ms=0: the peer timeout must be at least 1 ms"
        );
    }
}
