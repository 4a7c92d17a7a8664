//! `fragvisor`: start an aggregate VM on this machine, or print the
//! commands that start it on a real cluster.
//!
//! One description of the VM (flags, or a TOML file overlaid by flags) is
//! turned into a [`spec::VmSpec`], and from it every node's QEMU command
//! line ([`cmdline::node_args`]). `fragvisor run` starts one QEMU per node
//! here, over loopback or one network namespace per node
//! ([`netns::Netns`]), shows the origin's serial console and exits with
//! the VM's status ([`supervise::run_nodes`]). `fragvisor print` writes the
//! per-host commands for a real cluster. See `docs/launcher.md`.

pub mod cmdline;
pub mod devices;
pub mod guest_tuning;
pub mod host_cpus;
pub mod key;
pub mod netns;
pub mod spec;
pub mod supervise;
pub mod virtual_hosts;
pub mod vm_registry;

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use thiserror::Error;

use crate::config::{Engine, PeerAddr};
use cmdline::{cluster_script, node_args, ClusterAddrs};
use dsm_service::TransportSecurity;
use spec::{FileConfig, NetMode, Overrides, VmSpec, DEFAULT_PORT};
use supervise::{run_nodes, stdin_forwardable, NodeCommand, Supervision};
use virtual_hosts::{HostImage, HostVmOptions, Segment};

/// Why the launcher stopped before (or instead of) running the VM.
#[derive(Debug, Error)]
pub enum LaunchError {
    /// Bad input: flags, TOML values, missing files. Exit code 2.
    #[error("{0}")]
    Usage(String),
    /// A TOML file that does not parse; the message carries line and column.
    #[error("{}: {message}", path.display())]
    Toml {
        /// The file.
        path: PathBuf,
        /// The parser's message.
        message: String,
    },
    /// Something failed while setting up or running. Exit code 1.
    #[error("{0}")]
    Runtime(String),
}

impl LaunchError {
    /// The process exit code for this error.
    pub fn exit_code(&self) -> u8 {
        match self {
            LaunchError::Usage(_) | LaunchError::Toml { .. } => 2,
            LaunchError::Runtime(_) => 1,
        }
    }
}

/// The command line.
#[derive(Parser, Debug)]
#[command(
    name = "fragvisor",
    version,
    about = "Run one FragVisor aggregate VM across several QEMU processes (nodes)",
    long_about = "Run one FragVisor aggregate VM across several QEMU processes (nodes).\n\n\
                  `fragvisor run` starts every node on this machine and shows the origin's \
                  serial console; `fragvisor print --hosts ...` prints the command to run on \
                  each host of a real cluster. See docs/launcher.md."
)]
pub struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Start every node on this machine; exit with the VM's status.
    Run(RunArgs),
    /// Print the command to run on each host of a real cluster.
    Print(PrintArgs),
    /// Write a new random cluster key (mode 0600) to FILE.
    Keygen {
        /// Where to write the key; must not exist.
        file: PathBuf,
    },
    /// Log into a running VM as root over its ssh port forward and run
    /// CMD (a login shell without one); exits with ssh's status.
    Ssh {
        /// The VM's name (--name of `run`) [default: the only one running].
        vm: Option<String>,
        /// Keep trying for this many seconds while the guest's sshd does
        /// not answer yet.
        #[arg(long, value_name = "SECONDS", default_value_t = 0.0)]
        wait: f64,
        /// The command to run in the guest.
        #[arg(last = true, value_name = "CMD")]
        cmd: Vec<String>,
    },
}

/// The description of the VM, shared by `run` and `print`.
#[derive(Args, Debug, Default)]
pub struct VmArgs {
    /// TOML file describing the VM; flags override its values.
    #[arg(long, short = 'c', value_name = "FILE")]
    config: Option<PathBuf>,
    /// Number of nodes (hosts).
    #[arg(long, short = 'n')]
    nodes: Option<u32>,
    /// fragvisor (KVM) or fragvisor-tcg [default: fragvisor].
    #[arg(long, value_parser = spec::parse_engine)]
    engine: Option<Engine>,
    /// QEMU machine type [default: q35].
    #[arg(long, short = 'M')]
    machine: Option<String>,
    /// vCPUs (at least one per node) [default: nodes].
    #[arg(long)]
    smp: Option<u32>,
    /// Guest RAM, QEMU -m syntax: 512, 512M, 2G [default: 512M].
    #[arg(long, short = 'm', value_parser = spec::parse_memory)]
    memory: Option<u64>,
    /// One guest NUMA node per host (the default).
    #[arg(long, overrides_with = "no_numa")]
    numa: bool,
    /// No guest NUMA nodes.
    #[arg(long, overrides_with = "numa")]
    no_numa: bool,
    /// -cpu model and flags (default: QEMU's; the accelerator turns off the
    /// PV features that need an in-kernel APIC by itself).
    #[arg(long)]
    cpu: Option<String>,
    /// Guest kernel (-kernel).
    #[arg(long)]
    kernel: Option<PathBuf>,
    /// Guest initrd (-initrd).
    #[arg(long)]
    initrd: Option<PathBuf>,
    /// Guest kernel command line [default with a kernel: "console=ttyS0
    /// clocksource=tsc tsc=reliable"].
    #[arg(long)]
    append: Option<String>,
    /// The patched qemu-system-x86_64 [default: $FRAGVISOR_QEMU, else the
    /// newest build in scripts/build-qemu.sh's cache].
    #[arg(long)]
    qemu: Option<PathBuf>,
    /// One extra QEMU argument for every node (repeatable); or put them
    /// after `--`.
    #[arg(long = "qemu-arg", value_name = "ARG", allow_hyphen_values = true)]
    qemu_arg: Vec<String>,
    /// One network namespace per node (root), instead of loopback.
    #[arg(long, conflicts_with = "virtual_hosts")]
    netns: bool,
    /// Run the nodes in N host VMs of a virtual cluster on this machine
    /// (root): each its own kernel with KVM (nested SVM under TCG), one
    /// virtual Ethernet segment between them. Sets --nodes to N. See
    /// docs/virtual-cluster.md.
    #[arg(long, value_name = "N")]
    virtual_hosts: Option<u32>,
    /// Port: loopback nodes use PORT, PORT+1, ... [default: free ports];
    /// every node uses it in namespaces and on a real cluster [default: 7400].
    #[arg(long)]
    port: Option<u16>,
    /// DSM peer timeout in ms, passed to the accelerator as peer-timeout-ms=.
    #[arg(long)]
    peer_timeout_ms: Option<u64>,
    /// What protects the cluster links: aead (every frame encrypted and
    /// authenticated) or auth-only (peers authenticated, guest memory in
    /// clear) [default: aead].
    #[arg(long, value_name = "aead|auth-only")]
    transport_security: Option<TransportSecurity>,
    /// Node that runs each vCPU, in vCPU order, e.g. 0,1,0,1 (vCPU 0 on
    /// node 0, every node at least one) [default: contiguous blocks].
    #[arg(long, value_delimiter = ',', value_name = "NODE,NODE,...")]
    vcpu_map: Option<Vec<u32>>,
    /// Cluster key file [default: a fresh random key per run, 0600 temp file].
    #[arg(long)]
    key_file: Option<PathBuf>,
    /// A disk on the origin, as a virtio-blk device:
    /// PATH[,readonly][,format=raw|qcow2] (repeatable; the first boots
    /// when there is no kernel). A FragVisor system image
    /// (guest-kernel/build-system-image.sh) boots its own kernel.
    #[arg(long = "disk", value_name = "IMAGE[,OPTS]", value_parser = devices::parse_disk)]
    disks: Vec<devices::DiskSpec>,
    /// A network link on the origin, as a virtio-net device:
    /// user[,hostfwd=tcp::PORT-:22,...], tap,ifname=TAP[,queues=N], or
    /// none (repeatable) [default with a disk: user, ssh forwarded from a
    /// free port of 127.0.0.1].
    #[arg(long = "net", value_name = "LINK", value_parser = devices::parse_net)]
    nets: Vec<devices::NetArg>,
    /// The VM's name, for `fragvisor ssh NAME` [default: vm-<pid>].
    #[arg(long)]
    name: Option<String>,
    /// Root's ssh key in the guest [default: the system image's id_ed25519].
    #[arg(long, value_name = "FILE")]
    ssh_key: Option<PathBuf>,
    /// Host CPUs each local node's QEMU runs on: one list for every node
    /// (0-1) or one per node separated by '/' (0/1) [default: any].
    #[arg(long, value_name = "CPUS[/CPUS...]")]
    host_cpus: Option<host_cpus::HostCpus>,
    /// Leave the guest kernel command line as given: do not add nohz_full=
    /// for the other hosts' vCPUs (docs/performance.md).
    #[arg(long)]
    no_guest_tuning: bool,
    /// Extra QEMU arguments for every node.
    #[arg(last = true, value_name = "QEMU ARGS")]
    extra: Vec<String>,
}

/// `fragvisor run`.
#[derive(Args, Debug)]
pub struct RunArgs {
    #[command(flatten)]
    vm: VmArgs,
    /// Seconds the other nodes get to stop after the first one exits
    /// (SIGTERM at half of it, SIGKILL at the end) [default: 10].
    #[arg(long, value_name = "SECONDS")]
    stop_timeout: Option<f64>,
    /// Stop the VM after this many seconds (exit code 124).
    #[arg(long, value_name = "SECONDS")]
    timeout: Option<f64>,
    /// Print the commands instead of running them.
    #[arg(long)]
    print_commands: bool,
    /// With --print-commands: the cluster's hosts, in node-id order.
    #[arg(long, value_delimiter = ',')]
    hosts: Vec<String>,
    /// With --virtual-hosts: the host image directory (vmlinuz,
    /// initramfs.cpio) [default: $FRAGVISOR_HOST_IMAGE, else the newest
    /// scripts/virtual-cluster/build-host-image.sh built].
    #[arg(long, value_name = "DIR")]
    host_image: Option<PathBuf>,
    /// With --virtual-hosts: vCPUs of each host VM [default: 2].
    #[arg(long, value_name = "N")]
    host_smp: Option<u32>,
    /// With --virtual-hosts: RAM of each host VM [default: the guest's RAM
    /// + 768M].
    #[arg(long, value_parser = spec::parse_memory, value_name = "SIZE")]
    host_memory: Option<u64>,
    /// With --virtual-hosts or --netns: `tc netem` arguments for every
    /// host's link, e.g. "delay 2ms" or "delay 1ms loss 0.1%" (with
    /// --netns: on the host end of each node's veth, so a frame between two
    /// nodes passes it once).
    #[arg(long, value_name = "NETEM")]
    host_link: Option<String>,
}

/// `fragvisor print`.
#[derive(Args, Debug)]
pub struct PrintArgs {
    #[command(flatten)]
    vm: VmArgs,
    /// The cluster's hosts in node-id order: HOST or HOST:PORT, comma-separated.
    #[arg(long, value_delimiter = ',')]
    hosts: Vec<String>,
}

impl VmArgs {
    fn into_spec(
        self,
        hosts: Vec<String>,
        stop_timeout: Option<f64>,
        timeout: Option<f64>,
    ) -> Result<VmSpec, LaunchError> {
        let file = match &self.config {
            Some(path) => FileConfig::load(path)?,
            None => FileConfig::default(),
        };
        let mut qemu_args = self.qemu_arg;
        qemu_args.extend(self.extra);
        let nodes = match (self.virtual_hosts, self.nodes) {
            (Some(v), Some(n)) if v != n => {
                return Err(LaunchError::Usage(format!(
                    "--virtual-hosts {v} and --nodes {n} disagree: a virtual cluster runs one node per host VM"
                )))
            }
            (Some(v), _) => Some(v),
            (None, n) => n,
        };
        let network = if self.netns {
            Some(NetMode::Netns)
        } else if self.virtual_hosts.is_some() {
            Some(NetMode::VirtualHosts)
        } else {
            None
        };
        let flags = Overrides {
            nodes,
            engine: self.engine,
            machine: self.machine,
            smp: self.smp,
            memory_mib: self.memory,
            numa: if self.no_numa {
                Some(false)
            } else if self.numa {
                Some(true)
            } else {
                None
            },
            cpu: self.cpu,
            kernel: self.kernel,
            initrd: self.initrd,
            append: self.append,
            qemu_args,
            qemu: self.qemu,
            network,
            port: self.port,
            hosts: (!hosts.is_empty()).then_some(hosts),
            peer_timeout_ms: self.peer_timeout_ms,
            transport_security: self.transport_security,
            vcpu_map: self.vcpu_map,
            key_file: self.key_file,
            stop_timeout,
            timeout,
            disks: self.disks,
            nets: self.nets,
            name: self.name,
            ssh_key: self.ssh_key,
            host_cpus: self.host_cpus,
            guest_tuning: self.no_guest_tuning.then_some(false),
        };
        VmSpec::resolve(file, flags)
    }
}

/// Where scripts/build-qemu.sh caches its builds.
fn fv_cache() -> Option<PathBuf> {
    if let Some(c) = std::env::var_os("FRAGVISOR_CACHE") {
        return Some(PathBuf::from(c));
    }
    if let Some(x) = std::env::var_os("XDG_CACHE_HOME") {
        return Some(PathBuf::from(x).join("fragvisor"));
    }
    std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/fragvisor"))
}

/// The newest `qemu-system-x86_64` under `$FV_CACHE/qemu/bin/*/`.
fn cached_qemu() -> Option<PathBuf> {
    let bin = fv_cache()?.join("qemu/bin");
    std::fs::read_dir(bin)
        .ok()?
        .flatten()
        .map(|e| e.path().join("qemu-system-x86_64"))
        .filter(|p| p.is_file())
        .max_by_key(|p| p.metadata().and_then(|m| m.modified()).ok())
}

/// The QEMU binary for a local run: `--qemu`, `$FRAGVISOR_QEMU`, or the
/// newest cached build.
pub fn resolve_qemu(given: Option<&Path>) -> Result<PathBuf, LaunchError> {
    let (path, from) = if let Some(p) = given {
        (p.to_path_buf(), "--qemu")
    } else if let Some(p) = std::env::var_os("FRAGVISOR_QEMU") {
        (PathBuf::from(p), "FRAGVISOR_QEMU")
    } else if let Some(p) = cached_qemu() {
        return Ok(p);
    } else {
        return Err(LaunchError::Usage(
            "no QEMU binary: pass --qemu PATH, set FRAGVISOR_QEMU, or build one with \
             scripts/build-qemu.sh"
                .into(),
        ));
    };
    if !path.is_file() {
        return Err(LaunchError::Usage(format!(
            "{from}: {} is not a file",
            path.display()
        )));
    }
    Ok(path)
}

/// `count` free TCP addresses on a loopback address of this VM's own, so
/// that VMs launched side by side cannot take each other's ports.
fn free_loopback_addrs(count: u32) -> Result<Vec<PeerAddr>, LaunchError> {
    let addrs = dsm_service::transport::free_loopback_addrs(count as usize)
        .map_err(|e| LaunchError::Runtime(format!("cannot find free loopback ports: {e}")))?;
    Ok(addrs
        .into_iter()
        .map(|a| PeerAddr {
            host: a.ip().to_string(),
            port: a.port(),
        })
        .collect())
}

fn loopback_hosts(spec: &VmSpec) -> Vec<String> {
    let base = spec.port.unwrap_or(DEFAULT_PORT);
    (0..spec.nodes)
        .map(|k| format!("127.0.0.1:{}", u32::from(base) + k))
        .collect()
}

fn print_cmd(mut spec: VmSpec, local: bool) -> Result<ExitCode, LaunchError> {
    if spec.hosts.is_empty() && local {
        spec.hosts = loopback_hosts(&spec);
    }
    spec.probe_disks()?;
    spec.default_net(|| Ok(PRINTED_SSH_PORT))?;
    let qemu = match &spec.qemu {
        Some(q) => q.clone(),
        None if local => resolve_qemu(None).unwrap_or_else(|_| PathBuf::from("qemu-system-x86_64")),
        None => PathBuf::from("qemu-system-x86_64"),
    };
    print!("{}", cluster_script(&spec, &qemu)?);
    Ok(ExitCode::SUCCESS)
}

/// The ssh forward's host port in printed real-cluster commands.
const PRINTED_SSH_PORT: u16 = 2222;

/// The checks and choices of a run's devices, before any node starts:
/// every disk probed, the default link added, every forwarded port free.
/// Returns the ssh entry to register, if the VM has an ssh forward.
fn prepare_devices(spec: &mut VmSpec) -> Result<Option<vm_registry::VmEntry>, LaunchError> {
    if spec.network == NetMode::VirtualHosts
        && (!spec.disks.is_empty() || spec.nets.as_ref().is_some_and(|n| !n.is_empty()))
    {
        return Err(LaunchError::Usage(
            "--disk and --net are not supported with --virtual-hosts yet (the devices would be \
             inside host VM 0)"
                .into(),
        ));
    }
    spec.probe_disks()?;
    spec.default_net(devices::free_local_port)?;
    for n in spec.nets.iter().flatten() {
        devices::check_forwards(n)?;
    }
    let Some(fwd) = spec.nets.iter().flatten().find_map(|n| n.ssh_forward()) else {
        return Ok(None);
    };
    let image = spec.system_image.as_ref();
    let ssh_key = spec
        .ssh_key
        .clone()
        .or_else(|| image.and_then(|i| i.ssh_key.clone()));
    Ok(Some(vm_registry::VmEntry {
        name: spec
            .name
            .clone()
            .unwrap_or_else(|| format!("vm-{}", std::process::id())),
        pid: std::process::id(),
        ssh_port: fwd.host_port,
        ssh_host: fwd
            .host_addr
            .unwrap_or(std::net::Ipv4Addr::LOCALHOST)
            .to_string(),
        ssh_key,
        known_hosts: image.and_then(|i| i.known_hosts.clone()),
    }))
}

fn run_cmd(mut spec: VmSpec, hosts: &HostVmOptions) -> Result<ExitCode, LaunchError> {
    spec.check_local_files()?;
    let qemu = resolve_qemu(spec.qemu.as_deref())?;
    let ssh_entry = prepare_devices(&mut spec)?;
    let registration = ssh_entry.as_ref().map(vm_registry::register).transpose()?;

    let mut temp_key = None;
    let key_file = if spec.nodes > 1 {
        Some(match &spec.key_file {
            Some(k) => k.clone(),
            None => {
                let k = key::TempKey::create()?;
                let p = k.path().to_path_buf();
                temp_key = Some(k);
                p
            }
        })
    } else {
        None
    };

    // Dropped (namespaces and run files removed) after the nodes end.
    let mut netns = None;
    let mut segment = None;
    let mut commands = Vec::new();
    let peers: Vec<PeerAddr> = match spec.network {
        NetMode::VirtualHosts => {
            spec.peer_timeout_ms = spec
                .peer_timeout_ms
                .or(Some(virtual_hosts::HOST_VM_PEER_TIMEOUT_MS));
            let image = HostImage::resolve(hosts.image.as_deref())?;
            let seg = Segment::create(spec.nodes, hosts.link.as_deref())?;
            let peers = virtual_hosts::segment_peers(&spec);
            let (inner, addrs, files) =
                virtual_hosts::inside_view(&spec, &peers, key_file.as_deref());
            for k in 0..spec.nodes {
                let payload = seg.file(&format!("payload{k}.tar"));
                let report = seg.file(&format!("status{k}"));
                let script = virtual_hosts::node_script(&inner, k, &addrs)?;
                virtual_hosts::write_payload(&payload, &script, &files)?;
                let vm = virtual_hosts::host_vm_args(
                    &image,
                    hosts,
                    spec.memory_mib,
                    k,
                    &payload,
                    &report,
                );
                commands.push(NodeCommand {
                    node: k,
                    program: PathBuf::from("ip"),
                    args: in_netns(seg.ns(), &qemu, vm),
                    exit_report: Some(report),
                });
            }
            eprintln!(
                "fragvisor: virtual cluster in network namespace {ns}: host K is {subnet}.(K+1) on \
                 tap fvtapK (slow a link: ip netns exec {ns} tc qdisc add dev fvtapK root netem delay 2ms; \
                 cut it: ip -n {ns} link set fvtapK down)",
                ns = seg.ns(),
                subnet = virtual_hosts::SUBNET,
            );
            segment = Some(seg);
            peers
        }
        NetMode::Netns => {
            let (n, ips) = netns::Netns::create(spec.nodes, hosts.link.as_deref())?;
            let port = spec.port.unwrap_or(DEFAULT_PORT);
            let peers: Vec<PeerAddr> = ips
                .into_iter()
                .map(|host| PeerAddr { host, port })
                .collect();
            let addrs = ClusterAddrs::new(&spec, &peers, key_file.clone());
            for k in 0..spec.nodes {
                commands.push(NodeCommand {
                    node: k,
                    program: PathBuf::from("ip"),
                    args: in_netns(&n.ns(k), &qemu, node_args(&spec, k, &addrs)?),
                    exit_report: None,
                });
            }
            netns = Some(n);
            peers
        }
        NetMode::Loopback => {
            let peers: Vec<PeerAddr> = match spec.port {
                Some(base) => (0..spec.nodes)
                    .map(|k| {
                        u16::try_from(u32::from(base) + k)
                            .map(|port| PeerAddr {
                                host: "127.0.0.1".into(),
                                port,
                            })
                            .map_err(|_| {
                                LaunchError::Usage(format!(
                                    "port={base}: {} consecutive ports do not fit below 65536",
                                    spec.nodes
                                ))
                            })
                    })
                    .collect::<Result<_, _>>()?,
                None => free_loopback_addrs(spec.nodes)?,
            };
            let addrs = ClusterAddrs::new(&spec, &peers, key_file.clone());
            for k in 0..spec.nodes {
                commands.push(NodeCommand {
                    node: k,
                    program: qemu.clone(),
                    args: node_args(&spec, k, &addrs)?,
                    exit_report: None,
                });
            }
            peers
        }
    };

    eprintln!(
        "fragvisor: starting {} node(s): {}, machine {}, {} vCPUs, {} MiB{}, {} ({}); origin console follows",
        spec.nodes,
        spec.engine.accel_name(),
        spec.machine,
        spec.smp,
        spec.memory_mib,
        if spec.numa { ", NUMA node per host" } else { "" },
        spec.network.describe(),
        peers
            .iter()
            .map(PeerAddr::to_string)
            .collect::<Vec<_>>()
            .join(" "),
    );
    if let Some(d) = spec.disks.first() {
        eprintln!(
            "fragvisor: disk {} ({}{}){}",
            d.path.display(),
            spec.disk_info[0].format.name(),
            if d.readonly { ", read-only" } else { "" },
            match &spec.system_image {
                Some(_) => ", booting the kernel and initramfs beside it",
                None if spec.kernel.is_none() => ", booting from it",
                None => "",
            }
        );
    }
    if let Some(e) = &ssh_entry {
        eprintln!(
            "fragvisor: ssh into the guest: fragvisor ssh {} -- CMD   (or: {})",
            e.name,
            cmdline::shell_line(Path::new("ssh"), &{
                let mut a = vm_registry::login_args(e);
                a.push(format!("root@{}", e.ssh_host));
                a
            })
        );
    }
    let sup = Supervision {
        stop_timeout: spec.stop_timeout,
        timeout: spec.timeout,
        forward_stdin: stdin_forwardable(),
        host_cpus: spec.host_cpus.clone(),
    };
    let outcome = run_nodes(&commands, &sup);
    drop(registration);
    drop(netns);
    drop(segment);
    drop(temp_key);
    let outcome = outcome?;
    let (code, message) = outcome.verdict(spec.stop_timeout);
    match message {
        Some(m) => eprintln!("fragvisor: {m}"),
        None => eprintln!(
            "fragvisor: the guest powered off; all {} node(s) exited 0",
            spec.nodes
        ),
    }
    Ok(ExitCode::from(code))
}

/// `ip netns exec NS QEMU ARGS...`: the arguments of `ip` that run `qemu`
/// in namespace `ns`.
fn in_netns(ns: &str, qemu: &Path, args: Vec<String>) -> Vec<String> {
    let mut full = vec!["netns".to_string(), "exec".into(), ns.to_string()];
    full.push(qemu.display().to_string());
    full.extend(args);
    full
}

fn dispatch(cli: Cli) -> Result<ExitCode, LaunchError> {
    match cli.command {
        Cmd::Run(r) => {
            let local = r.hosts.is_empty();
            let print = r.print_commands;
            let host_flags =
                r.host_image.is_some() || r.host_smp.is_some() || r.host_memory.is_some();
            let link_flag = r.host_link.is_some();
            let host_vms = HostVmOptions {
                image: r.host_image,
                smp: r.host_smp.unwrap_or(virtual_hosts::DEFAULT_HOST_SMP),
                memory_mib: r.host_memory,
                link: r.host_link,
            };
            let spec = r.vm.into_spec(r.hosts, r.stop_timeout, r.timeout)?;
            if host_flags && spec.network != NetMode::VirtualHosts {
                return Err(LaunchError::Usage(
                    "--host-image, --host-smp and --host-memory need --virtual-hosts N".into(),
                ));
            }
            if link_flag && spec.network == NetMode::Loopback {
                return Err(LaunchError::Usage(
                    "--host-link needs --netns or --virtual-hosts N (loopback has no link to slow)"
                        .into(),
                ));
            }
            if print {
                print_cmd(spec, local)
            } else {
                if !local {
                    return Err(LaunchError::Usage(
                        "--hosts is for a real cluster: use it with `fragvisor print` or --print-commands"
                            .into(),
                    ));
                }
                run_cmd(spec, &host_vms)
            }
        }
        Cmd::Print(p) => {
            let spec = p.vm.into_spec(p.hosts, None, None)?;
            print_cmd(spec, false)
        }
        Cmd::Ssh { vm, wait, cmd } => {
            let wait = std::time::Duration::try_from_secs_f64(wait).map_err(|_| {
                LaunchError::Usage(format!("--wait {wait}: expected seconds, 0 or more"))
            })?;
            vm_registry::ssh(vm.as_deref(), wait, &cmd)
        }
        Cmd::Keygen { file } => {
            key::write_new_key(&file)?;
            eprintln!(
                "fragvisor: wrote a new cluster key to {} (mode 0600); copy it to every host",
                file.display()
            );
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Parse `args` (including the program name) and run the command.
pub fn main_from<I, T>(args: I) -> ExitCode
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    let cli = match Cli::try_parse_from(args) {
        Ok(cli) => cli,
        Err(e) => {
            let code = if e.use_stderr() { 2 } else { 0 };
            // Printing help or an error to a closed stream is not worth a panic.
            let _ = e.print();
            return ExitCode::from(code);
        }
    };
    match dispatch(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("fragvisor: error: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}
