//! [`ConfigBuilder`]: collects option values as QEMU parses `-accel`, then
//! checks them together into an [`AccelConfig`].

use std::path::PathBuf;

use super::options::ENV_FALLBACKS;
use super::values::{parse_i64, parse_peers, parse_u32, read_key_file, semicolon_list};
use super::{AccelConfig, ClusterKey, ConfigError, Engine, PeerAddr, MAX_NODES};
use crate::placement::VcpuPlacement;
use dsm_service::TransportSecurity;

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
    transport_security: Option<TransportSecurity>,
    prefetch: Option<u32>,
    hot_pages: Option<u32>,
    log: Option<String>,
    test_clock_skew_ns: Option<i64>,
    test_clock_rate_ppm: Option<i64>,
}

/// Peer timeout when `peer-timeout-ms` is not given.
pub const DEFAULT_PEER_TIMEOUT_MS: u32 = 5000;

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
            "transport-security" => {
                self.transport_security =
                    Some(value.parse().map_err(ConfigError::TransportSecurity)?);
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
            "log" => {
                crate::logging::check_filter(value).map_err(|reason| {
                    ConfigError::BadLogFilter {
                        value: value.to_string(),
                        reason,
                    }
                })?;
                self.log = Some(value.to_string());
            }
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
            "transport-security" => self.transport_security.unwrap_or_default().to_string(),
            "vcpu-map" => semicolon_list(self.vcpu_map.as_deref().unwrap_or_default()),
            "prefetch" => self.prefetch.unwrap_or(0).to_string(),
            "hot-pages" => self.hot_pages.unwrap_or(0).to_string(),
            "log" => self
                .log
                .clone()
                .unwrap_or_else(|| crate::logging::DEFAULT_FILTER.to_string()),
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
            "log" => self.log.is_some(),
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
            transport_security: self.transport_security.unwrap_or_default(),
            prefetch: self.prefetch.unwrap_or(0),
            hot_pages: self.hot_pages.unwrap_or(0),
            log: self.log.clone(),
            test_clock_skew_ns: self.test_clock_skew_ns.unwrap_or(0),
            test_clock_rate_ppm: self.test_clock_rate_ppm.unwrap_or(0),
        })
    }
}
