//! FragVisor accelerator logic that is not QEMU glue.
//!
//! The patched QEMU (`qemu-patches/`) stays thin: it collects the `-accel
//! fragvisor,...` / `-accel fragvisor-tcg,...` options as strings and hands
//! them to this crate through the C ABI in `ffi/`. Everything that decides
//! something lives here, where it is unit-tested:
//!
//! - [`config`]: the accelerator options ([`AccelConfig`]: `nodes`,
//!   `node-id`, `peers`, `key`, `key-file`, ..., and the environment
//!   variables that stand in for some), their parsing and the cross-field
//!   validation;
//! - [`placement`]: which cluster node runs which vCPU;
//! - [`runtime`]: the per-host runtime of an aggregate VM (DSM, I/O and
//!   interrupt forwarding, lifecycle, failure);
//! - [`clock`]: one guest clock across hosts (each host's offset from the
//!   origin's clocks);
//! - [`logging`]: the runtime's `tracing` log on stderr inside QEMU.

pub mod clock;
pub mod config;
pub mod launcher;
pub mod logging;
pub mod placement;
pub mod runtime;

pub use config::{
    AccelConfig, ClusterKey, ConfigBuilder, ConfigError, Engine, OptionSpec, PeerAddr, OPTIONS,
};
pub use placement::{PlacementError, VcpuPlacement};
