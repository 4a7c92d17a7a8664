//! The description of one aggregate VM: read from a TOML file, overlaid with
//! command-line flags, checked, and turned into a [`VmSpec`].

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use super::devices::{self, DiskInfo, DiskSpec, NetArg, NetSpec, SystemImage};
use super::host_cpus::{self, HostCpus};
use super::LaunchError;
use crate::config::{ConfigError, Engine, PeerAddr, MAX_NODES};
use crate::placement::VcpuPlacement;
use dsm_service::transport::sealed::BadSecurity;
use dsm_service::TransportSecurity;

/// Kernel command line used when a kernel is given without `append`.
pub const DEFAULT_APPEND: &str = "console=ttyS0 clocksource=tsc tsc=reliable";
/// Default guest RAM, MiB.
pub const DEFAULT_MEMORY_MIB: u64 = 512;
/// Default TCP port of every node on a real cluster or in network namespaces.
pub const DEFAULT_PORT: u16 = 7400;
/// Default time the survivors get to stop after the first node exits.
pub const DEFAULT_STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// The same for host VMs, which also shut their own kernel down (emulated).
pub const DEFAULT_HOST_VM_STOP_TIMEOUT: Duration = Duration::from_secs(30);

/// How the nodes of a local run reach each other.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum NetMode {
    /// Every node on 127.0.0.1, one port each.
    Loopback,
    /// One network namespace per node, veth pairs joined by a bridge.
    Netns,
    /// One host VM per node (its own kernel and KVM), on one virtual
    /// Ethernet segment ([`super::virtual_hosts`]).
    VirtualHosts,
}

impl NetMode {
    /// How the launcher names it.
    pub fn describe(self) -> &'static str {
        match self {
            NetMode::Loopback => "loopback",
            NetMode::Netns => "one network namespace per node",
            NetMode::VirtualHosts => "one host VM per node",
        }
    }
}

/// Parse an engine name as typed after `-accel`.
pub fn parse_engine(text: &str) -> Result<Engine, String> {
    match text {
        "fragvisor" | "kvm" => Ok(Engine::Kvm),
        "fragvisor-tcg" | "tcg" => Ok(Engine::Tcg),
        other => Err(format!(
            "unknown engine '{other}' (valid: fragvisor, fragvisor-tcg)"
        )),
    }
}

/// Parse a guest RAM size in QEMU's `-m` syntax: a number of MiB, or a
/// number with a `M`/`G`/`T` suffix (`MiB`, `GiB` and `K` multiples of 1 MiB
/// are accepted too). Returns MiB.
pub fn parse_memory(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let bad = || {
        format!("memory '{text}': expected a size such as 512, 512M, 2G (whole MiB, at least 1)")
    };
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num.parse().map_err(|_| bad())?;
    let mib = match unit.to_ascii_lowercase().as_str() {
        "" | "m" | "mb" | "mib" => Some(n),
        "g" | "gb" | "gib" => n.checked_mul(1024),
        "t" | "tb" | "tib" => n.checked_mul(1024 * 1024),
        "k" | "kb" | "kib" if n & 1023 == 0 => Some(n / 1024),
        _ => None,
    }
    .ok_or_else(bad)?;
    if mib == 0 {
        return Err(bad());
    }
    Ok(mib)
}

/// A memory size in a TOML file: `memory = 512` (MiB) or `memory = "2G"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemSize(pub u64);

impl<'de> Deserialize<'de> for MemSize {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Int(u64),
            Text(String),
        }
        let text = match Raw::deserialize(d)
            .map_err(|_| serde::de::Error::custom("memory: expected 512 or \"512M\""))?
        {
            Raw::Int(n) => n.to_string(),
            Raw::Text(s) => s,
        };
        parse_memory(&text)
            .map(MemSize)
            .map_err(serde::de::Error::custom)
    }
}

/// An engine name in a TOML file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EngineName(pub Engine);

impl<'de> Deserialize<'de> for EngineName {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        parse_engine(&text)
            .map(EngineName)
            .map_err(serde::de::Error::custom)
    }
}

/// The TOML file, as written: every key optional, unknown keys refused.
/// Keys use the same names as the command-line flags.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct FileConfig {
    /// Hosts in the cluster.
    pub nodes: Option<u32>,
    /// `fragvisor` or `fragvisor-tcg`.
    pub engine: Option<EngineName>,
    /// QEMU machine type.
    pub machine: Option<String>,
    /// vCPUs in the guest.
    pub smp: Option<u32>,
    /// Guest RAM.
    pub memory: Option<MemSize>,
    /// One guest NUMA node per host.
    pub numa: Option<bool>,
    /// `-cpu` model and flags.
    pub cpu: Option<String>,
    /// Guest kernel.
    pub kernel: Option<PathBuf>,
    /// Guest initrd.
    pub initrd: Option<PathBuf>,
    /// Guest kernel command line.
    pub append: Option<String>,
    /// Extra QEMU arguments, given to every node.
    pub qemu_args: Option<Vec<String>>,
    /// The patched `qemu-system-x86_64`.
    pub qemu: Option<PathBuf>,
    /// `loopback`, `netns` or `virtual-hosts`.
    pub network: Option<NetMode>,
    /// Port: the first of consecutive loopback ports, or every node's port
    /// on a real cluster and in network namespaces.
    pub port: Option<u16>,
    /// Host names or addresses of a real cluster, in node-id order.
    pub hosts: Option<Vec<String>>,
    /// DSM peer timeout handed to the accelerator, ms.
    pub peer_timeout_ms: Option<u64>,
    /// `aead` (default) or `auth-only`: what protects the cluster links.
    pub transport_security: Option<String>,
    /// Node that runs each vCPU, in vCPU order (default: contiguous blocks).
    pub vcpu_map: Option<Vec<u32>>,
    /// Cluster key file (generated per run when absent).
    pub key_file: Option<PathBuf>,
    /// Seconds the other nodes get to stop after the first exits.
    pub stop_timeout: Option<f64>,
    /// Seconds the whole VM may run (no limit when absent).
    pub timeout: Option<f64>,
    /// Disks, each `PATH[,readonly][,format=raw|qcow2]`.
    pub disk: Option<Vec<String>>,
    /// Network links, each `user[,hostfwd=...]`, `tap,ifname=...` or `none`.
    pub net: Option<Vec<String>>,
    /// The VM's name (for `fragvisor ssh NAME`).
    pub name: Option<String>,
    /// Root's ssh key for `fragvisor ssh` (default: the system image's).
    pub ssh_key: Option<PathBuf>,
    /// Host CPUs of each local node's QEMU: `0-1` for all, `0/1` per node.
    pub host_cpus: Option<String>,
    /// Add the guest kernel arguments for a spread VM (default true).
    pub guest_tuning: Option<bool>,
}

impl FileConfig {
    /// Parse TOML text; `origin` names the file in error messages and
    /// relative paths in it are resolved against `base`.
    pub fn parse(text: &str, origin: &Path, base: &Path) -> Result<Self, LaunchError> {
        let mut cfg: FileConfig = toml::from_str(text).map_err(|e| LaunchError::Toml {
            path: origin.to_path_buf(),
            message: e.to_string().trim_end().to_string(),
        })?;
        for p in [
            &mut cfg.kernel,
            &mut cfg.initrd,
            &mut cfg.qemu,
            &mut cfg.key_file,
            &mut cfg.ssh_key,
        ]
        .into_iter()
        .flatten()
        {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        }
        for d in cfg.disk.iter_mut().flatten() {
            if !d.starts_with('/') {
                *d = base.join(&*d).display().to_string();
            }
        }
        Ok(cfg)
    }

    /// Read and parse a TOML file.
    pub fn load(path: &Path) -> Result<Self, LaunchError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| LaunchError::Usage(format!("--config {}: {e}", path.display())))?;
        let base = path.parent().unwrap_or(Path::new("."));
        Self::parse(&text, path, base)
    }
}

/// Values from the command line; `None` means "not given" so the file's
/// value (or the default) stays.
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    /// Fields mean what the [`FileConfig`] fields of the same name mean.
    pub nodes: Option<u32>,
    pub engine: Option<Engine>,
    pub machine: Option<String>,
    pub smp: Option<u32>,
    pub memory_mib: Option<u64>,
    pub numa: Option<bool>,
    pub cpu: Option<String>,
    pub kernel: Option<PathBuf>,
    pub initrd: Option<PathBuf>,
    pub append: Option<String>,
    /// Appended after the file's `qemu-args`.
    pub qemu_args: Vec<String>,
    pub qemu: Option<PathBuf>,
    pub network: Option<NetMode>,
    pub port: Option<u16>,
    pub hosts: Option<Vec<String>>,
    pub peer_timeout_ms: Option<u64>,
    pub transport_security: Option<TransportSecurity>,
    pub vcpu_map: Option<Vec<u32>>,
    pub key_file: Option<PathBuf>,
    pub stop_timeout: Option<f64>,
    pub timeout: Option<f64>,
    /// Replace the file's `disk` list when not empty.
    pub disks: Vec<DiskSpec>,
    /// Replace the file's `net` list when not empty.
    pub nets: Vec<NetArg>,
    pub name: Option<String>,
    pub ssh_key: Option<PathBuf>,
    pub host_cpus: Option<HostCpus>,
    pub guest_tuning: Option<bool>,
}

/// A complete, checked description of an aggregate VM.
#[derive(Debug, Clone, PartialEq)]
pub struct VmSpec {
    /// Hosts in the cluster, `1..=MAX_NODES`.
    pub nodes: u32,
    /// Engine on every node.
    pub engine: Engine,
    /// QEMU machine type (`q35`).
    pub machine: String,
    /// vCPUs, at least `nodes`.
    pub smp: u32,
    /// Guest RAM in MiB.
    pub memory_mib: u64,
    /// One guest NUMA node per host.
    pub numa: bool,
    /// `-cpu` value, if any.
    pub cpu: Option<String>,
    /// Guest kernel.
    pub kernel: Option<PathBuf>,
    /// Guest initrd.
    pub initrd: Option<PathBuf>,
    /// Guest kernel command line (defaulted when a kernel is given).
    pub append: Option<String>,
    /// Extra arguments for every node, after the generated ones.
    pub qemu_args: Vec<String>,
    /// QEMU binary, if given (otherwise resolved at launch).
    pub qemu: Option<PathBuf>,
    /// Local networking.
    pub network: NetMode,
    /// Port (see [`FileConfig::port`]).
    pub port: Option<u16>,
    /// Real-cluster hosts, for `print`.
    pub hosts: Vec<String>,
    /// DSM peer timeout for the accelerator, ms.
    pub peer_timeout_ms: Option<u64>,
    /// What protects the cluster links (`transport-security=`).
    pub transport_security: TransportSecurity,
    /// Explicit vCPU placement (`vcpu-map`): node of each vCPU.
    pub vcpu_map: Option<Vec<u32>>,
    /// Cluster key file, if given.
    pub key_file: Option<PathBuf>,
    /// Time the other nodes get to stop after the first exits.
    pub stop_timeout: Duration,
    /// Limit on the whole run.
    pub timeout: Option<Duration>,
    /// Disks; disk 0 boots when there is no kernel.
    pub disks: Vec<DiskSpec>,
    /// Network links: `None` when not given (`run` then adds user
    /// networking with an ssh forward to a VM with a disk), `Some(empty)`
    /// for `--net none`.
    pub nets: Option<Vec<NetSpec>>,
    /// What [`VmSpec::probe_disks`] found, one per disk.
    pub disk_info: Vec<DiskInfo>,
    /// The system image beside disk 0, when the kernel came from it.
    pub system_image: Option<SystemImage>,
    /// The VM's name on this machine.
    pub name: Option<String>,
    /// Root's ssh key for `fragvisor ssh`.
    pub ssh_key: Option<PathBuf>,
    /// Host CPUs each local node's QEMU is confined to, if any.
    pub host_cpus: Option<HostCpus>,
    /// Add `guest_tuning::extra_args` to the kernel command line.
    pub guest_tuning: bool,
}

fn seconds(name: &str, v: f64) -> Result<Duration, LaunchError> {
    Duration::try_from_secs_f64(v)
        .ok()
        .filter(|d| !d.is_zero())
        .ok_or_else(|| {
            LaunchError::Usage(format!("{name}={v}: expected a positive number of seconds"))
        })
}

impl VmSpec {
    /// Overlay `flags` on `file`, apply defaults and check the result.
    pub fn resolve(file: FileConfig, flags: Overrides) -> Result<VmSpec, LaunchError> {
        let usage = |m: String| Err(LaunchError::Usage(m));
        let hosts = flags.hosts.or(file.hosts).unwrap_or_default();
        let nodes = match flags.nodes.or(file.nodes) {
            Some(n) => n,
            None if !hosts.is_empty() => hosts.len() as u32,
            None => 1,
        };
        if nodes == 0 {
            return usage("nodes=0: an aggregate VM needs at least one node".into());
        }
        if nodes > MAX_NODES {
            return usage(ConfigError::TooManyNodes(nodes).to_string());
        }
        if !hosts.is_empty() && hosts.len() != nodes as usize {
            return usage(format!(
                "hosts lists {} host(s) but nodes={nodes}: give one host per node",
                hosts.len()
            ));
        }
        let smp = flags.smp.or(file.smp).unwrap_or(nodes);
        if smp < nodes {
            return usage(format!(
                "smp={smp} is less than nodes={nodes}: every node must run at least one vCPU"
            ));
        }
        let memory_mib = flags
            .memory_mib
            .or(file.memory.map(|m| m.0))
            .unwrap_or(DEFAULT_MEMORY_MIB);
        let numa = flags.numa.or(file.numa).unwrap_or(true);
        if numa && memory_mib < u64::from(nodes) {
            return usage(format!(
                "memory={memory_mib}M is too small for {nodes} NUMA nodes (at least 1M each)"
            ));
        }
        let disks = if !flags.disks.is_empty() {
            flags.disks
        } else {
            file.disk
                .unwrap_or_default()
                .iter()
                .map(|d| devices::parse_disk(d))
                .collect::<Result<_, _>>()
                .map_err(LaunchError::Usage)?
        };
        if disks.len() > devices::MAX_DISKS {
            return usage(format!(
                "{} disks: at most {}",
                disks.len(),
                devices::MAX_DISKS
            ));
        }
        let net_args = if !flags.nets.is_empty() {
            Some(flags.nets)
        } else {
            file.net
                .map(|ns| {
                    ns.iter()
                        .map(|n| devices::parse_net(n))
                        .collect::<Result<Vec<_>, _>>()
                })
                .transpose()
                .map_err(LaunchError::Usage)?
        };
        let nets = match net_args {
            None => None,
            Some(list) if list.contains(&NetArg::None) => {
                if list.len() > 1 {
                    return usage("--net none cannot be combined with other links".into());
                }
                Some(Vec::new())
            }
            Some(list) => Some(
                list.into_iter()
                    .filter_map(|n| match n {
                        NetArg::Link(l) => Some(l),
                        NetArg::None => None,
                    })
                    .collect(),
            ),
        };
        if nets.as_ref().is_some_and(|n| n.len() > devices::MAX_NETS) {
            return usage(format!("at most {} --net links", devices::MAX_NETS));
        }
        let mut kernel = flags.kernel.or(file.kernel);
        let mut initrd = flags.initrd.or(file.initrd);
        let mut append = flags.append.or(file.append);
        // A FragVisor system image boots its own kernel unless told otherwise.
        let system_image = disks.first().and_then(|d| SystemImage::beside(&d.path));
        if kernel.is_none() && initrd.is_none() && append.is_none() {
            if let Some(img) = &system_image {
                kernel = Some(img.kernel.clone());
                initrd = Some(img.initrd.clone());
                append = Some(img.append.clone());
            }
        }
        let system_image = system_image.filter(|img| kernel.as_ref() == Some(&img.kernel));
        let name = flags.name.or(file.name);
        if let Some(n) = &name {
            if n.is_empty()
                || !n
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
                || n.starts_with('.')
            {
                return usage(format!(
                    "name '{n}': use letters, digits, '-', '_' and '.' (not first)"
                ));
            }
        }
        if kernel.is_some() && append.is_none() {
            append = Some(DEFAULT_APPEND.to_string());
        }
        if kernel.is_none() && (initrd.is_some() || append.is_some()) {
            return usage("initrd and append need a kernel".into());
        }
        let machine = flags
            .machine
            .or(file.machine)
            .unwrap_or_else(|| "q35".into());
        if machine.is_empty() {
            return usage("machine: must not be empty".into());
        }
        let mut qemu_args = file.qemu_args.unwrap_or_default();
        qemu_args.extend(flags.qemu_args);
        let network = flags.network.or(file.network).unwrap_or(NetMode::Loopback);
        let stop_timeout = match flags.stop_timeout.or(file.stop_timeout) {
            Some(s) => seconds("stop-timeout", s)?,
            None if network == NetMode::VirtualHosts => DEFAULT_HOST_VM_STOP_TIMEOUT,
            None => DEFAULT_STOP_TIMEOUT,
        };
        let timeout = flags
            .timeout
            .or(file.timeout)
            .map(|s| seconds("timeout", s))
            .transpose()?;
        if flags.peer_timeout_ms.or(file.peer_timeout_ms) == Some(0) {
            return usage("peer-timeout-ms=0: expected a positive number of milliseconds".into());
        }
        let transport_security = match (flags.transport_security, &file.transport_security) {
            (Some(s), _) => s,
            (None, Some(text)) => text
                .parse()
                .map_err(|e: BadSecurity| LaunchError::Usage(e.to_string()))?,
            (None, None) => TransportSecurity::default(),
        };
        let port = flags.port.or(file.port);
        if port == Some(0) {
            return usage("port=0: expected a TCP port 1..65535".into());
        }
        let vcpu_map = flags.vcpu_map.or(file.vcpu_map);
        if let Some(map) = &vcpu_map {
            // The accelerator's own check, so both refuse alike.
            VcpuPlacement::new(nodes, smp, map).map_err(|e| LaunchError::Usage(e.to_string()))?;
        }
        let host_cpus = match (flags.host_cpus, &file.host_cpus) {
            (Some(h), _) => Some(h),
            (None, Some(text)) => Some(
                text.parse::<HostCpus>()
                    .map_err(|e| LaunchError::Usage(e.to_string()))?,
            ),
            (None, None) => None,
        };
        if let Some(h) = &host_cpus {
            if network == NetMode::VirtualHosts {
                return usage("host-cpus: not with virtual hosts (each host VM is one QEMU; confine the launcher with taskset instead)".into());
            }
            h.check(nodes, host_cpus::configured_cpus())
                .map_err(|e| LaunchError::Usage(e.to_string()))?;
        }
        Ok(VmSpec {
            nodes,
            engine: flags
                .engine
                .or(file.engine.map(|e| e.0))
                .unwrap_or(Engine::Kvm),
            machine,
            smp,
            memory_mib,
            numa,
            cpu: flags.cpu.or(file.cpu),
            kernel,
            initrd,
            append,
            qemu_args,
            qemu: flags.qemu.or(file.qemu),
            network,
            port,
            hosts,
            peer_timeout_ms: flags.peer_timeout_ms.or(file.peer_timeout_ms),
            transport_security,
            vcpu_map,
            key_file: flags.key_file.or(file.key_file),
            stop_timeout,
            timeout,
            disks,
            nets,
            disk_info: Vec::new(),
            system_image,
            name,
            ssh_key: flags.ssh_key.or(file.ssh_key),
            host_cpus,
            guest_tuning: flags.guest_tuning.or(file.guest_tuning).unwrap_or(true),
        })
    }

    /// Probe every disk ([`devices::probe_disk`]): the checks a run makes
    /// before any node starts, and the sizes the other nodes' copies need.
    pub fn probe_disks(&mut self) -> Result<(), LaunchError> {
        self.disk_info = self
            .disks
            .iter()
            .map(devices::probe_disk)
            .collect::<Result<_, _>>()?;
        Ok(())
    }

    /// A VM with a disk and no `net` given gets the default link: user
    /// networking with ssh forwarded from `port()`.
    pub fn default_net(
        &mut self,
        port: impl FnOnce() -> Result<u16, LaunchError>,
    ) -> Result<(), LaunchError> {
        if self.nets.is_none() && !self.disks.is_empty() {
            self.nets = Some(vec![devices::default_user_net(port()?)]);
        }
        Ok(())
    }

    /// The devices every node gets (the links as resolved for this run).
    pub fn devices(&self) -> devices::Devices {
        devices::Devices {
            disks: self.disks.clone(),
            nets: self.nets.clone().unwrap_or_default(),
            boot_from_disk: self.kernel.is_none(),
        }
    }

    /// Which node runs each vCPU: `vcpu-map`, else contiguous blocks.
    pub fn placement(&self) -> Result<VcpuPlacement, LaunchError> {
        VcpuPlacement::new(
            self.nodes,
            self.smp,
            self.vcpu_map.as_deref().unwrap_or(&[]),
        )
        .map_err(|e| LaunchError::Usage(format!("vcpu placement: {e}")))
    }

    /// The addresses of a real cluster: `hosts` (each `host` or
    /// `host:port`) with `port` (default 7400) where a host has none.
    pub fn cluster_peers(&self) -> Result<Vec<PeerAddr>, LaunchError> {
        let port = self.port.unwrap_or(DEFAULT_PORT);
        self.hosts
            .iter()
            .map(|h| {
                let h = h.trim();
                let with_port = if PeerAddr::parse(h).is_ok() {
                    h.to_string()
                } else if h.contains(':') && !h.starts_with('[') {
                    format!("[{h}]:{port}")
                } else {
                    format!("{h}:{port}")
                };
                PeerAddr::parse(&with_port).map_err(|e| LaunchError::Usage(format!("hosts: {e}")))
            })
            .collect()
    }

    /// Check that the files a local run reads exist.
    pub fn check_local_files(&self) -> Result<(), LaunchError> {
        for (name, path) in [
            ("kernel", &self.kernel),
            ("initrd", &self.initrd),
            ("key-file", &self.key_file),
            ("ssh-key", &self.ssh_key),
        ] {
            if let Some(p) = path {
                if !p.is_file() {
                    return Err(LaunchError::Usage(format!(
                        "{name} {}: no such file",
                        p.display()
                    )));
                }
            }
        }
        Ok(())
    }
}
