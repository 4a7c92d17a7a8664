//! The accelerator's option table ([`OPTIONS`], which QEMU registers as
//! properties) and the environment variables that stand in for some
//! options ([`ENV_FALLBACKS`]).

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
        name: "transport-security",
        help: "aead (default): every cluster frame encrypted and authenticated; auth-only: peers authenticated, guest memory sent in clear",
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
        name: "log",
        help: "what the runtime logs on stderr, as a tracing filter: warn, info, debug, dsm_service=debug,... (default warn; env FRAGVISOR_LOG)",
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

/// Every option name, as the unknown-option error lists them.
pub(super) fn option_names() -> String {
    OPTIONS
        .iter()
        .map(|o| o.name)
        .collect::<Vec<_>>()
        .join(", ")
}

/// The environment variables that stand in for options not given on the
/// command line: `(option, variable)`. The only place the accelerator reads
/// its settings from the environment.
pub const ENV_FALLBACKS: &[(&str, &str)] = &[
    ("prefetch", "FRAGVISOR_DSM_PREFETCH"),
    ("hot-pages", "FRAGVISOR_DSM_HOT_PAGES"),
    ("log", "FRAGVISOR_LOG"),
    ("test-clock-skew-ns", "FRAGVISOR_TEST_CLOCK_SKEW_NS"),
    ("test-clock-rate-ppm", "FRAGVISOR_TEST_CLOCK_RATE_PPM"),
];
