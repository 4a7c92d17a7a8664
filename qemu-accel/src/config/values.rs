//! The option values with a type of their own: node addresses
//! ([`PeerAddr`]), the cluster key ([`ClusterKey`]), and the parsers of
//! numbers and lists.

use std::fmt;

use super::{ConfigError, MIN_KEY_LEN};

/// `a;b;c`: how list options are written (`peers`, `vcpu-map`).
pub(super) fn semicolon_list<T: fmt::Display>(items: &[T]) -> String {
    items.iter().map(T::to_string).collect::<Vec<_>>().join(";")
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

pub(super) fn parse_u32(option: &'static str, value: &str) -> Result<u32, ConfigError> {
    value
        .trim()
        .parse::<u32>()
        .map_err(|_| ConfigError::NotANumber {
            option,
            value: value.to_string(),
        })
}

pub(super) fn parse_i64(option: &'static str, value: &str) -> Result<i64, ConfigError> {
    value
        .trim()
        .parse::<i64>()
        .map_err(|_| ConfigError::NotAnInteger {
            option,
            value: value.to_string(),
        })
}

pub(super) fn parse_peers(value: &str) -> Result<Vec<PeerAddr>, ConfigError> {
    value
        .split([';', ','])
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(PeerAddr::parse)
        .collect()
}

/// Largest key file read: a key is a few dozen bytes.
const MAX_KEY_FILE: u64 = 4096;

/// Read a key file; one trailing newline (as editors write) is not part of
/// the key.
pub(super) fn read_key_file(path: &std::path::Path) -> Result<ClusterKey, ConfigError> {
    use std::io::Read;
    let shown = path.display().to_string();
    let fail = |reason: String| ConfigError::KeyFile {
        path: shown.clone(),
        reason,
    };
    let file = std::fs::File::open(path).map_err(|e| fail(e.to_string()))?;
    let meta = file.metadata().map_err(|e| fail(e.to_string()))?;
    if !meta.is_file() {
        return Err(fail("not a regular file".into()));
    }
    // Read one byte past the limit, so that a file that grows (or lies
    // about its size) is still refused, never read whole.
    let mut bytes = Vec::new();
    file.take(MAX_KEY_FILE + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| fail(e.to_string()))?;
    if bytes.len() as u64 > MAX_KEY_FILE {
        return Err(fail(format!(
            "larger than {MAX_KEY_FILE} bytes: not a key file"
        )));
    }
    if bytes.ends_with(b"\n") {
        bytes.pop();
        if bytes.ends_with(b"\r") {
            bytes.pop();
        }
    }
    ClusterKey::new(bytes, &format!("key-file={shown}"))
}
