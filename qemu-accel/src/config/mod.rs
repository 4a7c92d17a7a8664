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
//! | `transport-security` | `aead` (default: every frame after the handshake encrypted and authenticated) or `auth-only` (peers authenticated, frames in clear; a warning at start) |
//! | `vcpu-map` | node of each vCPU, in vCPU order (default: contiguous blocks) |
//! | `prefetch` | DSM read-ahead for guest RAM, in pages (default 0: off); fallback `FRAGVISOR_DSM_PREFETCH` |
//! | `hot-pages` | list the N guest pages with the most DSM faults under the exit summary (default 0: off); fallback `FRAGVISOR_DSM_HOT_PAGES` |
//! | `log` | what the runtime logs on stderr, as a `tracing` filter (`warn`, `info`, `dsm_service=debug`, ...; default `warn`); fallback `FRAGVISOR_LOG` |
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

mod builder;
mod error;
mod options;
mod values;

pub use builder::{ConfigBuilder, DEFAULT_PEER_TIMEOUT_MS};
pub use error::ConfigError;
pub use options::{OptionSpec, ENV_FALLBACKS, OPTIONS};
pub use values::{ClusterKey, PeerAddr};

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
    /// `transport-security`: what protects the cluster links (default
    /// `aead`: every frame sealed).
    pub transport_security: dsm_service::TransportSecurity,
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
    /// `log`: the tracing filter for the runtime's log on stderr; `None`
    /// for [`crate::logging::DEFAULT_FILTER`].
    pub log: Option<String>,
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
    fn key_files_that_are_no_key_are_refused_without_reading_them_whole() {
        for (path, why) in [
            ("/dev/zero", "not a regular file"),
            ("/proc", "not a regular file"),
        ] {
            let err = builder(&[("key-file", path)])
                .build(Engine::Kvm)
                .unwrap_err()
                .to_string();
            assert_eq!(err, format!("key-file={path}: {why}"));
        }
        let dir = std::env::temp_dir().join(format!("fv-bigkey-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let big = dir.join("big.key");
        std::fs::write(&big, vec![b'k'; 5000]).unwrap();
        let err = builder(&[("key-file", big.to_str().unwrap())])
            .build(Engine::Kvm)
            .unwrap_err()
            .to_string();
        assert!(
            err.ends_with(": larger than 4096 bytes: not a key file"),
            "{err}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn key_is_never_shown() {
        let b = builder(&[("key", KEY)]);
        assert_eq!(b.get("key").unwrap(), "<set>");
        let cfg = b.build(Engine::Kvm).unwrap();
        assert!(!format!("{cfg:?}").contains(KEY));
    }

    #[test]
    fn the_log_filter_is_checked_and_read_from_the_environment() {
        let mut b = ConfigBuilder::new();
        assert_eq!(b.get("log").unwrap(), "warn");
        let err = b.set("log", "dsm_service=loud").unwrap_err();
        assert!(
            err.to_string().starts_with("log=dsm_service=loud: "),
            "{err}"
        );
        b.set("log", "info").unwrap();
        assert_eq!(b.build(Engine::Tcg).unwrap().log.as_deref(), Some("info"));
        let env = |var: &str| (var == "FRAGVISOR_LOG").then(|| "debug".into());
        let cfg = ConfigBuilder::new()
            .build_with_env(Engine::Tcg, env)
            .unwrap();
        assert_eq!(cfg.log.as_deref(), Some("debug"));
        assert_eq!(
            ConfigBuilder::new()
                .build_with_env(Engine::Tcg, |_| None)
                .unwrap()
                .log,
            None
        );
    }

    #[test]
    fn an_unknown_option_lists_every_option() {
        let err = ConfigBuilder::new()
            .set("colour", "red")
            .unwrap_err()
            .to_string();
        for opt in OPTIONS {
            assert!(err.contains(opt.name), "{err}");
        }
    }

    #[test]
    fn every_listed_option_is_settable_and_gettable() {
        for opt in OPTIONS {
            assert!(ConfigBuilder::new().get(opt.name).is_ok(), "{}", opt.name);
        }
        assert_eq!(OPTIONS.len(), 13);
    }

    #[test]
    fn transport_security_defaults_to_aead_and_names_bad_values() {
        let mut b = ConfigBuilder::new();
        assert_eq!(b.get("transport-security").unwrap(), "aead");
        let cfg = b.build(Engine::Tcg).unwrap();
        assert_eq!(cfg.transport_security, dsm_service::TransportSecurity::Aead);
        b.set("transport-security", "auth-only").unwrap();
        assert_eq!(b.get("transport-security").unwrap(), "auth-only");
        assert_eq!(
            b.build(Engine::Tcg).unwrap().transport_security,
            dsm_service::TransportSecurity::AuthOnly
        );
        assert_eq!(
            b.set("transport-security", "tls").unwrap_err().to_string(),
            "transport-security=tls: expected aead or auth-only"
        );
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
