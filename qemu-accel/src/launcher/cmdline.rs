//! Per-node QEMU command lines, and their shell form for `fragvisor print`.

use std::path::{Path, PathBuf};

use super::devices::device_args;
use super::guest_tuning;
use super::spec::VmSpec;
use super::LaunchError;
use crate::config::PeerAddr;
use crate::placement::{cpu_range_text, cpu_ranges};
use dsm_service::TransportSecurity;

/// What every node needs to know about the cluster besides the [`VmSpec`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterAddrs {
    /// Address of every node, in node-id order (empty for one node).
    pub peers: Vec<PeerAddr>,
    /// Key file path as every node sees it (`None` for one node).
    pub key_file: Option<PathBuf>,
}

impl ClusterAddrs {
    /// What every node of `spec` is given: `peers` and `key_file`, or
    /// nothing for a one-node VM (it has no DSM).
    pub fn new(spec: &VmSpec, peers: &[PeerAddr], key_file: Option<PathBuf>) -> ClusterAddrs {
        if spec.nodes > 1 {
            ClusterAddrs {
                peers: peers.to_vec(),
                key_file,
            }
        } else {
            ClusterAddrs {
                peers: Vec::new(),
                key_file: None,
            }
        }
    }
}

/// QEMU's option syntax: a `,` inside a value is written `,,`.
pub fn escape_opt_value(value: &str) -> String {
    value.replace(',', ",,")
}

/// The vCPUs of guest NUMA node `k` (= host `k`): those the accelerator
/// places on host `k`, as QEMU `-numa node` options (`cpus=0-1` or, for a
/// `vcpu-map` that is not contiguous, `cpus=0,cpus=2`).
pub fn numa_cpus(spec: &VmSpec, node: u32) -> Result<String, LaunchError> {
    let ranges = cpu_ranges(spec.placement()?.vcpus_of(node));
    if ranges.is_empty() {
        return Err(LaunchError::Usage(format!("node {node} runs no vCPU")));
    }
    let parts: Vec<String> = ranges
        .iter()
        .map(|r| format!("cpus={}", cpu_range_text(r)))
        .collect();
    Ok(parts.join(","))
}

/// Guest RAM of NUMA node `k`, MiB: an even split, the first nodes taking
/// one more MiB each when it does not divide.
pub fn numa_mem_mib(spec: &VmSpec, node: u32) -> u64 {
    let n = u64::from(spec.nodes);
    spec.memory_mib / n + u64::from(u64::from(node) < spec.memory_mib % n)
}

/// The `-accel` value of `node`.
pub fn accel_value(spec: &VmSpec, node: u32, addrs: &ClusterAddrs) -> String {
    let mut v = format!(
        "{},nodes={},node-id={node}",
        spec.engine.accel_name(),
        spec.nodes
    );
    if !addrs.peers.is_empty() {
        let peers: Vec<String> = addrs.peers.iter().map(PeerAddr::to_string).collect();
        v.push_str(&format!(",peers={}", peers.join(";")));
    }
    if let Some(k) = &addrs.key_file {
        v.push_str(&format!(
            ",key-file={}",
            escape_opt_value(&k.display().to_string())
        ));
    }
    if let Some(ms) = spec.peer_timeout_ms {
        v.push_str(&format!(",peer-timeout-ms={ms}"));
    }
    if spec.transport_security != TransportSecurity::default() {
        v.push_str(&format!(",transport-security={}", spec.transport_security));
    }
    if let Some(map) = &spec.vcpu_map {
        let m: Vec<String> = map.iter().map(u32::to_string).collect();
        v.push_str(&format!(",vcpu-map={}", m.join(";")));
    }
    v
}

/// `-machine`: across hosts SMM is off, because SMRAM is chipset state that
/// exists only on the origin (docs/aggregate-vm.md).
fn machine_value(spec: &VmSpec) -> String {
    if spec.nodes > 1 && !spec.machine.contains("smm=") {
        format!("{},smm=off", spec.machine)
    } else {
        spec.machine.clone()
    }
}

/// `-smp`: one socket per host when the vCPUs divide evenly into contiguous
/// blocks, so the guest does not believe CPUs on different hosts share a
/// cache. With a `vcpu-map`, QEMU's default (one socket per vCPU).
fn smp_value(spec: &VmSpec) -> String {
    if spec.nodes > 1 && spec.smp.is_multiple_of(spec.nodes) && spec.vcpu_map.is_none() {
        format!("{},sockets={}", spec.smp, spec.nodes)
    } else {
        spec.smp.to_string()
    }
}

/// The full argument list (without the program) of `node`. Every node gets
/// the same machine; only the `-accel` `node-id` and the serial backend
/// differ (the origin's serial console is on stdio, the others' on null).
pub fn node_args(
    spec: &VmSpec,
    node: u32,
    addrs: &ClusterAddrs,
) -> Result<Vec<String>, LaunchError> {
    let mut a: Vec<String> = Vec::new();
    let mut push = |xs: &[&str]| a.extend(xs.iter().map(|s| s.to_string()));
    push(&["-machine", &machine_value(spec)]);
    push(&["-accel", &accel_value(spec, node, addrs)]);
    if let Some(cpu) = &spec.cpu {
        push(&["-cpu", cpu]);
    }
    push(&["-smp", &smp_value(spec)]);
    push(&["-m", &format!("{}M", spec.memory_mib)]);
    if spec.numa {
        for k in 0..spec.nodes {
            push(&[
                "-object",
                &format!(
                    "memory-backend-ram,id=fv-mem{k},size={}M",
                    numa_mem_mib(spec, k)
                ),
            ]);
            push(&[
                "-numa",
                &format!("node,nodeid={k},{},memdev=fv-mem{k}", numa_cpus(spec, k)?),
            ]);
        }
    }
    push(&["-nodefaults", "-nographic"]);
    push(&["-serial", if node == 0 { "stdio" } else { "null" }]);
    if let Some(k) = &spec.kernel {
        push(&["-kernel", &k.display().to_string()]);
    }
    if let Some(i) = &spec.initrd {
        push(&["-initrd", &i.display().to_string()]);
    }
    if let Some(ap) = &spec.append {
        match guest_tuning::extra_args(spec, ap)? {
            Some(extra) => push(&["-append", &format!("{ap} {extra}")]),
            None => push(&["-append", ap]),
        }
    }
    if spec.disk_info.len() != spec.disks.len() {
        return Err(LaunchError::Runtime(
            "internal: the disks were not probed before the command lines were made".into(),
        ));
    }
    a.extend(device_args(&spec.devices(), &spec.disk_info, node));
    a.extend(spec.qemu_args.iter().cloned());
    Ok(a)
}

/// Quote one word for a POSIX shell.
pub fn shell_quote(word: &str) -> String {
    let safe = !word.is_empty()
        && word
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./=:,+@%".contains(c));
    if safe {
        word.to_string()
    } else {
        format!("'{}'", word.replace('\'', r"'\''"))
    }
}

/// A command as one shell line.
pub fn shell_line(program: &Path, args: &[String]) -> String {
    std::iter::once(shell_quote(&program.display().to_string()))
        .chain(args.iter().map(|a| shell_quote(a)))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Default key location in printed real-cluster instructions.
pub const CLUSTER_KEY_PATH: &str = "/etc/fragvisor/cluster.key";

/// The text of `fragvisor print`: for each host of a real cluster, the
/// command to run there, with instructions for the key and guest files.
pub fn cluster_script(spec: &VmSpec, qemu: &Path) -> Result<String, LaunchError> {
    let peers = if spec.hosts.is_empty() {
        return Err(LaunchError::Usage(
            "print needs the cluster's hosts: --hosts HOST0,HOST1,... (node-id order; HOST or HOST:PORT)"
                .into(),
        ));
    } else {
        spec.cluster_peers()?
    };
    let key = spec
        .key_file
        .clone()
        .unwrap_or_else(|| PathBuf::from(CLUSTER_KEY_PATH));
    let addrs = ClusterAddrs::new(spec, &peers, Some(key.clone()));
    let mut out = String::new();
    out.push_str(&format!(
        "# FragVisor aggregate VM: {} node(s), {}, machine {}, {} vCPUs, {} MiB{}\n",
        spec.nodes,
        spec.engine.accel_name(),
        spec.machine,
        spec.smp,
        spec.memory_mib,
        if spec.numa {
            ", one guest NUMA node per host"
        } else {
            ""
        }
    ));
    if spec.nodes > 1 {
        let k = shell_quote(&key.display().to_string());
        out.push_str(&format!(
            "#\n# 1. Cluster key: the same secret file on every host, mode 0600, readable only by\n\
             #    the user running QEMU. Make it once (e.g. `fragvisor keygen {k}` or\n\
             #    `head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \\n' > {k}; chmod 600 {k}`) and copy it\n\
             #    over a trusted channel, e.g.:\n"
        ));
        for (i, p) in peers.iter().enumerate().skip(1) {
            out.push_str(&format!(
                "#      scp -p {k} {}:{k}    # node {i}\n",
                shell_quote(&p.host)
            ));
        }
        out.push_str(&format!(
            "#    Anyone with the key can read and write guest memory; TCP port(s) {} must be\n\
             #    reachable between the hosts.\n",
            {
                let mut ports: Vec<u16> = peers.iter().map(|p| p.port).collect();
                ports.dedup();
                ports
                    .iter()
                    .map(u16::to_string)
                    .collect::<Vec<_>>()
                    .join(",")
            }
        ));
    }
    if spec.kernel.is_some() || spec.initrd.is_some() {
        out.push_str(
            "#\n# 2. The guest kernel/initrd must exist at the same paths on every host (every\n\
             #    node loads them; the origin's copy is the one the guest runs).\n",
        );
    }
    out.push_str(
        "#\n# 3. Start one command per host, in any order. Node 0 (the origin) owns the devices\n\
         #    and shows the guest's serial console; the VM ends when the guest powers off.\n",
    );
    for (k, p) in peers.iter().enumerate() {
        let k = k as u32;
        let args = node_args(spec, k, &addrs)?;
        out.push_str(&format!(
            "\n# node {k}{} on {}\n{}\n",
            if k == 0 { " (origin)" } else { "" },
            p.host,
            shell_line(qemu, &args)
        ));
    }
    Ok(out)
}
