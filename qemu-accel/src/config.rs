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
//! | `peer-timeout-ms` | a peer silent this long is declared failed (default 5000) |
//! | `vcpu-map` | node of each vCPU, in vCPU order (default: contiguous blocks) |
//! | `prefetch` | DSM read-ahead for guest RAM, in pages (default 0: off); fallback `FRAGVISOR_DSM_PREFETCH` |
//! | `hot-pages` | list the N guest pages with the most DSM faults under the exit summary (default 0: off); fallback `FRAGVISOR_DSM_HOT_PAGES` |
//! | `test-clock-skew-ns` | test knob: shift this host's monotonic clock by N ns (default 0); fallback `FRAGVISOR_TEST_CLOCK_SKEW_NS` |
//! | `test-clock-rate-ppm` | test knob: run this host's monotonic clock R ppm fast, or slow if negative (default 0); fallback `FRAGVISOR_TEST_CLOCK_RATE_PPM` |
//!
//! **Environment fallbacks.** The last four options can also come from the
//! environment variables named above (scripts such as
//! `scripts/bench-boot.sh` and the end-to-end tests set them for every
//! node). An option given on the command line wins; an unset or empty
//! variable counts as not given. [`ConfigBuilder::build`] reads them, here
//! and nowhere else ([`ENV_FALLBACKS`]), and checks a variable's value as it
//! checks the option's, with an error that names the variable.

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

/// Largest cluster we accept: the DSM's own limit
/// ([`dsm_service::MAX_NODES`]; it keeps each page's sharers in a 64-bit
/// set). Checked once, when `nodes` is set, so that a cluster the DSM would
/// refuse fails at option parse time; the launcher uses the same constant.
pub const MAX_NODES: u32 = dsm_service::MAX_NODES as u32;

// Every host creates every vCPU and guests run xAPIC (at most 255 APIC IDs),
// so more hosts than that could not each own a vCPU.
const _: () = assert!(MAX_NODES <= 255 && MAX_NODES as usize == dsm_service::MAX_NODES);

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
    OptionSpec {
        name: "prefetch",
        help: "DSM read-ahead for guest RAM, in pages (default 0: off; env FRAGVISOR_DSM_PREFETCH)",
    },
    OptionSpec {
        name: "hot-pages",
        help: "list the N guest pages with the most DSM faults under the exit summary (default 0: off; env FRAGVISOR_DSM_HOT_PAGES)",
    },
    OptionSpec {
        name: "test-clock-skew-ns",
        help: "test knob: shift this host's monotonic clock by N ns (default 0; env FRAGVISOR_TEST_CLOCK_SKEW_NS)",
    },
    OptionSpec {
        name: "test-clock-rate-ppm",
        help: "test knob: run this host's monotonic clock R ppm fast, slow if negative (default 0; env FRAGVISOR_TEST_CLOCK_RATE_PPM)",
    },
];

/// The environment variables that stand in for options not given on the
/// command line: `(option, variable)`. The only place the accelerator reads
/// its settings from the environment.
pub const ENV_FALLBACKS: &[(&str, &str)] = &[
    ("prefetch", "FRAGVISOR_DSM_PREFETCH"),
    ("hot-pages", "FRAGVISOR_DSM_HOT_PAGES"),
    ("test-clock-skew-ns", "FRAGVISOR_TEST_CLOCK_SKEW_NS"),
    ("test-clock-rate-ppm", "FRAGVISOR_TEST_CLOCK_RATE_PPM"),
];

/// Why an option value or a whole configuration was refused. The messages
/// are shown to the user verbatim by QEMU, so each names the option at fault.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum ConfigError {
    /// An option name this accelerator does not know.
    #[error(
        "unknown option '{0}' (valid options: nodes, node-id, peers, key, key-file, peer-timeout-ms, vcpu-map, prefetch, hot-pages, test-clock-skew-ns, test-clock-rate-ppm)"
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

/// The validated accelerator options of one host (not the DSM's membership,
/// which is `dsm_service::ClusterConfig`, derived from this one by the
/// runtime).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccelConfig {
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
    /// `prefetch`: DSM read-ahead for guest RAM, in pages; 0 is off.
    ///
    /// Off by default. A 2-node Linux boot first livelocked with read-ahead
    /// on; the cause was a lost wake-up in the DSM (a write fault absorbed
    /// by an outstanding prefetch, fixed since), and 2- and 4-node boots
    /// pass with `prefetch=64`, but they are not faster and take no fewer
    /// faults (docs/aggregate-vm.md, "Benchmark"), so it stays off: a
    /// booting kernel spins next to data that other hosts write, and pages
    /// fetched ahead take those pages away from their writers.
    pub prefetch: u32,
    /// `hot-pages`: count each guest page's DSM faults and list this many
    /// with the most under the exit summary (a diagnostic for guests whose
    /// pages move back and forth between hosts); 0 is off.
    pub hot_pages: u32,
    /// `test-clock-skew-ns`: test knob, shifts this host's monotonic clock.
    pub test_clock_skew_ns: i64,
    /// `test-clock-rate-ppm`: test knob, makes this host's monotonic clock
    /// run fast (slow if negative).
    pub test_clock_rate_ppm: i64,
}

impl AccelConfig {
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
    prefetch: Option<u32>,
    hot_pages: Option<u32>,
    test_clock_skew_ns: Option<i64>,
    test_clock_rate_ppm: Option<i64>,
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

fn parse_i64(option: &'static str, value: &str) -> Result<i64, ConfigError> {
    value
        .trim()
        .parse::<i64>()
        .map_err(|_| ConfigError::NotAnInteger {
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
            "prefetch" => self.prefetch = Some(parse_u32("prefetch", value)?),
            "hot-pages" => self.hot_pages = Some(parse_u32("hot-pages", value)?),
            "test-clock-skew-ns" => {
                self.test_clock_skew_ns = Some(parse_i64("test-clock-skew-ns", value)?);
            }
            "test-clock-rate-ppm" => {
                self.test_clock_rate_ppm = Some(parse_i64("test-clock-rate-ppm", value)?);
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
            "prefetch" => self.prefetch.unwrap_or(0).to_string(),
            "hot-pages" => self.hot_pages.unwrap_or(0).to_string(),
            "test-clock-skew-ns" => self.test_clock_skew_ns.unwrap_or(0).to_string(),
            "test-clock-rate-ppm" => self.test_clock_rate_ppm.unwrap_or(0).to_string(),
            _ => return Err(ConfigError::UnknownOption(name.to_string())),
        })
    }

    /// Check the options together and produce the configuration. Reads
    /// `key-file` if one was given, and the [`ENV_FALLBACKS`] of the process
    /// environment for options not given.
    pub fn build(&self, engine: Engine) -> Result<AccelConfig, ConfigError> {
        self.build_with_env(engine, |var| std::env::var_os(var))
    }

    /// [`ConfigBuilder::build`] with `env` as the environment.
    pub fn build_with_env(
        &self,
        engine: Engine,
        env: impl Fn(&str) -> Option<std::ffi::OsString>,
    ) -> Result<AccelConfig, ConfigError> {
        let mut with_env = self.clone();
        with_env.apply_env(env)?;
        with_env.build_given(engine)
    }

    /// Takes each option of [`ENV_FALLBACKS`] that was not given from its
    /// variable, checked as [`ConfigBuilder::set`] checks the option.
    fn apply_env(
        &mut self,
        env: impl Fn(&str) -> Option<std::ffi::OsString>,
    ) -> Result<(), ConfigError> {
        for &(option, var) in ENV_FALLBACKS {
            if self.is_given(option) {
                continue;
            }
            let Some(raw) = env(var) else { continue };
            let value = raw.to_str().ok_or_else(|| ConfigError::Environment {
                var,
                source: Box::new(ConfigError::BadText(option.to_string())),
            })?;
            if value.trim().is_empty() {
                continue;
            }
            self.set(option, value)
                .map_err(|e| ConfigError::Environment {
                    var,
                    source: Box::new(e),
                })?;
        }
        Ok(())
    }

    /// Whether an option of [`ENV_FALLBACKS`] was given.
    fn is_given(&self, option: &str) -> bool {
        match option {
            "prefetch" => self.prefetch.is_some(),
            "hot-pages" => self.hot_pages.is_some(),
            "test-clock-skew-ns" => self.test_clock_skew_ns.is_some(),
            "test-clock-rate-ppm" => self.test_clock_rate_ppm.is_some(),
            _ => false,
        }
    }

    /// [`ConfigBuilder::build`] from the options given, without the
    /// environment.
    fn build_given(&self, engine: Engine) -> Result<AccelConfig, ConfigError> {
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

        Ok(AccelConfig {
            engine,
            nodes,
            node_id,
            peers,
            key,
            vcpu_map,
            peer_timeout_ms: self.peer_timeout_ms,
            prefetch: self.prefetch.unwrap_or(0),
            hot_pages: self.hot_pages.unwrap_or(0),
            test_clock_skew_ns: self.test_clock_skew_ns.unwrap_or(0),
            test_clock_rate_ppm: self.test_clock_rate_ppm.unwrap_or(0),
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
        assert_eq!(OPTIONS.len(), 11);
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

    #[test]
    fn the_dsm_limit_is_checked_when_nodes_is_set() {
        assert_eq!(MAX_NODES, 64);
        assert!(ConfigBuilder::new().set("nodes", "64").is_ok());
        let err = ConfigBuilder::new().set("nodes", "65").unwrap_err();
        assert_eq!(err, ConfigError::TooManyNodes(65));
        assert_eq!(
            err.to_string(),
            "nodes=65: at most 64 nodes are supported (the DSM keeps each page's sharers in a 64-bit set)"
        );
    }

    fn env_of(
        pairs: &'static [(&'static str, &'static str)],
    ) -> impl Fn(&str) -> Option<std::ffi::OsString> {
        move |var| {
            pairs
                .iter()
                .find(|(k, _)| *k == var)
                .map(|(_, v)| std::ffi::OsString::from(v))
        }
    }

    #[test]
    fn tuning_options_default_to_off() {
        let cfg = ConfigBuilder::new()
            .build_with_env(Engine::Tcg, env_of(&[]))
            .unwrap();
        assert_eq!(
            (
                cfg.prefetch,
                cfg.hot_pages,
                cfg.test_clock_skew_ns,
                cfg.test_clock_rate_ppm
            ),
            (0, 0, 0, 0)
        );
        for name in [
            "prefetch",
            "hot-pages",
            "test-clock-skew-ns",
            "test-clock-rate-ppm",
        ] {
            assert_eq!(ConfigBuilder::new().get(name).unwrap(), "0", "{name}");
        }
    }

    #[test]
    fn tuning_options_are_parsed() {
        let b = builder(&[
            ("prefetch", "64"),
            ("hot-pages", "30"),
            ("test-clock-skew-ns", "-50000000"),
            ("test-clock-rate-ppm", "300"),
        ]);
        assert_eq!(b.get("test-clock-skew-ns").unwrap(), "-50000000");
        let cfg = b.build_with_env(Engine::Tcg, env_of(&[])).unwrap();
        assert_eq!(cfg.prefetch, 64);
        assert_eq!(cfg.hot_pages, 30);
        assert_eq!(cfg.test_clock_skew_ns, -50_000_000);
        assert_eq!(cfg.test_clock_rate_ppm, 300);
        assert_eq!(
            ConfigBuilder::new()
                .set("prefetch", "-1")
                .unwrap_err()
                .to_string(),
            "prefetch=-1: not a non-negative integer"
        );
        assert_eq!(
            ConfigBuilder::new()
                .set("test-clock-rate-ppm", "fast")
                .unwrap_err()
                .to_string(),
            "test-clock-rate-ppm=fast: not an integer"
        );
    }

    #[test]
    fn environment_stands_in_for_options_not_given() {
        let env = env_of(&[
            ("FRAGVISOR_DSM_PREFETCH", "64"),
            ("FRAGVISOR_DSM_HOT_PAGES", " 30 "),
            ("FRAGVISOR_TEST_CLOCK_SKEW_NS", "-7"),
            ("FRAGVISOR_TEST_CLOCK_RATE_PPM", "300"),
        ]);
        let cfg = builder(&[("prefetch", "8")])
            .build_with_env(Engine::Tcg, env)
            .unwrap();
        assert_eq!(cfg.prefetch, 8, "the option wins over the variable");
        assert_eq!(cfg.hot_pages, 30);
        assert_eq!(cfg.test_clock_skew_ns, -7);
        assert_eq!(cfg.test_clock_rate_ppm, 300);
        let cfg = ConfigBuilder::new()
            .build_with_env(Engine::Tcg, env_of(&[("FRAGVISOR_DSM_PREFETCH", "")]))
            .unwrap();
        assert_eq!(cfg.prefetch, 0, "an empty variable is not given");
    }

    #[test]
    fn a_bad_environment_value_names_the_variable() {
        let err = ConfigBuilder::new()
            .build_with_env(Engine::Tcg, env_of(&[("FRAGVISOR_DSM_HOT_PAGES", "lots")]))
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "environment variable FRAGVISOR_DSM_HOT_PAGES: hot-pages=lots: not a non-negative integer"
        );
        let given = builder(&[("test-clock-rate-ppm", "1")]).build_with_env(
            Engine::Tcg,
            env_of(&[("FRAGVISOR_TEST_CLOCK_RATE_PPM", "x")]),
        );
        assert!(
            given.is_ok(),
            "a variable is not read when the option is given"
        );
    }

    #[test]
    fn every_fallback_names_a_listed_option() {
        for (option, var) in ENV_FALLBACKS {
            assert!(OPTIONS.iter().any(|o| o.name == *option), "{option}");
            assert!(var.starts_with("FRAGVISOR_"), "{var}");
            let help = OPTIONS.iter().find(|o| o.name == *option).unwrap().help;
            assert!(help.contains(var), "{option}'s help names {var}");
        }
    }
}
