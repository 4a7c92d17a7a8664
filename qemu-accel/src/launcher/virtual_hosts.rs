//! A virtual cluster on this machine: one host VM per node
//! (`fragvisor run --virtual-hosts N`, `docs/virtual-cluster.md`).
//!
//! Each host VM is a QEMU under TCG with `-cpu max`, whose emulated AMD SVM
//! lets the host kernel load `kvm-amd`: a separate kernel, with its own
//! `/dev/kvm`, userfaultfd, TSC and network stack. It boots the host image
//! of `scripts/virtual-cluster/build-host-image.sh`, whose `/init`
//! (`scripts/virtual-cluster/host-init`) runs one node of the aggregate VM
//! and reports its exit status. The host VMs share one Ethernet segment: a
//! bridge in a network namespace of this run, one tap per host, so each
//! host's link can be slowed (`tc netem`) or cut (`ip link set ... down`).
//!
//! What a host VM gets:
//! - kernel command line `fv.host=K fv.addr=10.77.0.(K+1)/24`;
//! - a read-only payload disk (`/dev/vda`), a tar archive with `node.sh`
//!   (the node's QEMU command) and the files it reads: the guest kernel,
//!   initrd and cluster key, under [`PAYLOAD_DIR`];
//! - serial ports: the console on this QEMU's stdout (the origin's is the
//!   guest's console), `FVHOST-EXIT rc` on the second port (a file here),
//!   the node's stderr on the third (this QEMU's stderr).

use std::fs::{DirBuilder, File};
use std::os::unix::fs::DirBuilderExt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;

use super::cmdline::{node_args, shell_line, ClusterAddrs};
use super::spec::{VmSpec, DEFAULT_PORT};
use super::LaunchError;
use crate::config::PeerAddr;

/// Where a host VM unpacks its payload.
pub const PAYLOAD_DIR: &str = "/run/fv";
/// The patched QEMU inside the host image.
pub const HOST_QEMU: &str = "/opt/fragvisor/bin/qemu-system-x86_64";
/// The segment's /24: host `k` is `.k+1`. It lives only in this run's
/// network namespace, so it cannot clash with this machine's addresses.
pub const SUBNET: &str = "10.77.0";
/// The status line of a host VM's init.
const EXIT_REPORT: &str = "FVHOST-EXIT ";

/// The accelerator's peer timeout inside host VMs unless one is given: the
/// host VMs run under TCG here (nested SVM), where a host VM's vCPUs stall
/// for seconds, far longer than the 5 s that suit real hosts.
pub const HOST_VM_PEER_TIMEOUT_MS: u64 = 30_000;

/// How to build the host VMs (flags of `fragvisor run`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HostVmOptions {
    /// Directory with `vmlinuz` and `initramfs.cpio` (default:
    /// `$FRAGVISOR_HOST_IMAGE`, else the newest in the build cache).
    pub image: Option<PathBuf>,
    /// vCPUs of each host VM.
    pub smp: u32,
    /// RAM of each host VM, MiB (default: the guest's RAM plus
    /// [`HOST_OVERHEAD_MIB`]).
    pub memory_mib: Option<u64>,
    /// `tc netem` arguments applied to every host's link, e.g. `delay 2ms`.
    pub link: Option<String>,
}

/// The host VMs' CPU: the smallest model with SVM and nested paging.
/// (`-cpu max` also works, but TCG's SVM emulation crashed the host
/// kernel in `__svm_vcpu_run` in 2 of 5 Linux boots with it.)
pub const HOST_CPU: &str = "qemu64,+svm,+npt";
/// Default vCPUs of a host VM.
pub const DEFAULT_HOST_SMP: u32 = 2;
/// Host VM RAM beyond the guest's: the host kernel, its initramfs (QEMU and
/// libraries, about 60 MiB), the payload and the node's QEMU.
pub const HOST_OVERHEAD_MIB: u64 = 768;

/// A host image: the kernel and initramfs every host VM boots.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostImage {
    /// The host kernel.
    pub kernel: PathBuf,
    /// The host initramfs (uncompressed newc cpio).
    pub initramfs: PathBuf,
}

impl HostImage {
    /// The image in `dir`, if it holds one.
    fn in_dir(dir: &Path) -> Option<HostImage> {
        let img = HostImage {
            kernel: dir.join("vmlinuz"),
            initramfs: dir.join("initramfs.cpio"),
        };
        (img.kernel.is_file() && img.initramfs.is_file()).then_some(img)
    }

    /// `given`, `$FRAGVISOR_HOST_IMAGE`, or the newest image that
    /// `build-host-image.sh` cached.
    pub fn resolve(given: Option<&Path>) -> Result<HostImage, LaunchError> {
        let (dir, from) = match given {
            Some(d) => (d.to_path_buf(), "--host-image"),
            None => match std::env::var_os("FRAGVISOR_HOST_IMAGE") {
                Some(d) => (PathBuf::from(d), "FRAGVISOR_HOST_IMAGE"),
                None => {
                    return cached_image().ok_or_else(|| {
                        LaunchError::Usage(
                            "no host image: build one with scripts/virtual-cluster/build-host-image.sh \
                             (or pass --host-image DIR)"
                                .into(),
                        )
                    })
                }
            },
        };
        HostImage::in_dir(&dir).ok_or_else(|| {
            LaunchError::Usage(format!(
                "{from}: {} holds no host image (vmlinuz and initramfs.cpio)",
                dir.display()
            ))
        })
    }
}

fn cached_image() -> Option<HostImage> {
    let root = super::fv_cache()?.join("host-image");
    std::fs::read_dir(root)
        .ok()?
        .flatten()
        .filter_map(|e| {
            let img = HostImage::in_dir(&e.path())?;
            let t = img.initramfs.metadata().and_then(|m| m.modified()).ok()?;
            Some((t, img))
        })
        .max_by_key(|(t, _)| *t)
        .map(|(_, img)| img)
}

/// The address of host `k` on the segment.
pub fn host_addr(k: u32) -> String {
    format!("{SUBNET}.{}", k + 1)
}

/// Every node's address on the segment, in node-id order.
pub fn segment_peers(spec: &VmSpec) -> Vec<PeerAddr> {
    let port = spec.port.unwrap_or(DEFAULT_PORT);
    (0..spec.nodes)
        .map(|k| PeerAddr {
            host: host_addr(k),
            port,
        })
        .collect()
}

/// The node's view of `spec` inside its host VM: its guest files and key
/// in [`PAYLOAD_DIR`], the peers on the segment (`peers`). Returns that
/// spec, the cluster addresses and the files to pack (name in the payload,
/// path here).
pub fn inside_view(
    spec: &VmSpec,
    peers: &[PeerAddr],
    key_file: Option<&Path>,
) -> (VmSpec, ClusterAddrs, Vec<(String, PathBuf)>) {
    let mut inner = spec.clone();
    let mut files = Vec::new();
    let mut carry = |name: &str, path: &Option<PathBuf>| {
        path.as_ref().map(|p| {
            files.push((name.to_string(), p.clone()));
            PathBuf::from(format!("{PAYLOAD_DIR}/{name}"))
        })
    };
    inner.kernel = carry("kernel", &spec.kernel);
    inner.initrd = carry("initrd", &spec.initrd);
    inner.key_file = carry("key", &key_file.map(Path::to_path_buf));
    let addrs = ClusterAddrs::new(spec, peers, inner.key_file.clone());
    (inner, addrs, files)
}

/// The shell script a host VM runs for `node`.
pub fn node_script(inner: &VmSpec, node: u32, addrs: &ClusterAddrs) -> Result<String, LaunchError> {
    let args = node_args(inner, node, addrs)?;
    Ok(format!(
        "# node {node} of a FragVisor virtual cluster\nexec {}\n",
        shell_line(Path::new(HOST_QEMU), &args)
    ))
}

/// Write host `node`'s payload archive to `out`.
pub fn write_payload(
    out: &Path,
    script: &str,
    files: &[(String, PathBuf)],
) -> Result<(), LaunchError> {
    let err = |e: std::io::Error| {
        LaunchError::Runtime(format!("cannot write payload {}: {e}", out.display()))
    };
    let f = File::create(out).map_err(err)?;
    let mut tar = tar::Builder::new(f);
    let mut header = tar::Header::new_gnu();
    header.set_size(script.len() as u64);
    header.set_mode(0o700);
    header.set_cksum();
    tar.append_data(&mut header, "node.sh", script.as_bytes())
        .map_err(err)?;
    for (name, path) in files {
        tar.append_path_with_name(path, name).map_err(|e| {
            LaunchError::Runtime(format!("cannot pack {} ({name}): {e}", path.display()))
        })?;
    }
    tar.into_inner().and_then(|f| f.sync_all()).map_err(err)
}

/// The host VM command of node `k`, to run in the cluster's namespace.
pub fn host_vm_args(
    image: &HostImage,
    opts: &HostVmOptions,
    guest_mib: u64,
    k: u32,
    payload: &Path,
    status: &Path,
) -> Vec<String> {
    let mem = opts.memory_mib.unwrap_or(guest_mib + HOST_OVERHEAD_MIB);
    let append = format!(
        "console=ttyS0 quiet tsc=reliable panic=-1 fv.host={k} fv.addr={}/24",
        host_addr(k)
    );
    [
        "-accel",
        "tcg,thread=multi",
        "-machine",
        "q35",
        "-cpu",
        HOST_CPU,
        "-smp",
        &opts.smp.to_string(),
        "-m",
        &format!("{mem}M"),
        "-nodefaults",
        "-display",
        "none",
        "-no-reboot",
        "-kernel",
        &image.kernel.display().to_string(),
        "-initrd",
        &image.initramfs.display().to_string(),
        "-append",
        &append,
        "-serial",
        "stdio",
        "-serial",
        &format!("file:{}", status.display()),
        "-serial",
        "file:/dev/stderr",
        "-netdev",
        &format!(
            "tap,id=fvnet,ifname={},script=no,downscript=no",
            tap_name(k)
        ),
        "-device",
        &format!(
            "virtio-net-pci,netdev=fvnet,romfile=,mac=52:54:00:77:{:02x}:{:02x}",
            k >> 8,
            k & 0xff
        ),
        "-drive",
        &format!(
            "file={},format=raw,if=none,id=fvpayload,readonly=on",
            payload.display()
        ),
        "-device",
        "virtio-blk-pci,drive=fvpayload",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// The tap of host `k` in the cluster's namespace.
pub fn tap_name(k: u32) -> String {
    format!("fvtap{k}")
}

/// The node's exit status from its host VM's status report: what the
/// host's init wrote (`FVHOST-EXIT rc`) when the host VM powered off by
/// itself, else the host VM's own status (killed, crashed). A host VM that
/// ended without a report (its kernel panicked, or QEMU took a SIGTERM)
/// failed: exit status 1.
pub fn node_status(host_vm: ExitStatus, report: &Path) -> (ExitStatus, Option<String>) {
    if !host_vm.success() {
        return (host_vm, None);
    }
    let text = std::fs::read_to_string(report).unwrap_or_default();
    match parse_report(&text) {
        Some(rc) => (ExitStatus::from_raw((rc & 0xff) << 8), None),
        None => (
            ExitStatus::from_raw(1 << 8),
            Some("the host VM ended without reporting its node's exit status (see its console above)".into()),
        ),
    }
}

/// The node's exit code in a host VM's status text.
pub fn parse_report(text: &str) -> Option<i32> {
    text.lines()
        .rev()
        .find_map(|l| l.trim().strip_prefix(EXIT_REPORT)?.trim().parse().ok())
}

fn ip(args: &[&str]) -> Result<(), LaunchError> {
    run("ip", args)
}

fn run(program: &str, args: &[&str]) -> Result<(), LaunchError> {
    super::netns::run_tool(program, args, "a virtual cluster needs root")
}

/// The run's private state: a 0700 directory (payloads, status reports)
/// and the network namespace with the segment. Both removed on drop.
#[derive(Debug)]
pub struct Segment {
    ns: String,
    dir: PathBuf,
    made_ns: bool,
}

impl Segment {
    /// Make the directory, the namespace, its bridge and `hosts` taps, with
    /// `link` (netem arguments) on every tap.
    pub fn create(hosts: u32, link: Option<&str>) -> Result<Segment, LaunchError> {
        let pid = std::process::id();
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let dir = std::env::temp_dir().join(format!("fragvisor-vc-{pid}-{nanos:08x}"));
        DirBuilder::new()
            .mode(0o700)
            .create(&dir)
            .map_err(|e| LaunchError::Runtime(format!("cannot create {}: {e}", dir.display())))?;
        let mut seg = Segment {
            ns: format!("fvvc{pid}"),
            dir,
            made_ns: false,
        };
        ip(&["netns", "add", &seg.ns])?;
        seg.made_ns = true;
        let ns = seg.ns.clone();
        ip(&["-n", &ns, "link", "set", "lo", "up"])?;
        ip(&["-n", &ns, "link", "add", "fvbr", "type", "bridge"])?;
        ip(&["-n", &ns, "link", "set", "fvbr", "up"])?;
        for k in 0..hosts {
            let tap = tap_name(k);
            ip(&["-n", &ns, "tuntap", "add", "dev", &tap, "mode", "tap"])?;
            ip(&["-n", &ns, "link", "set", &tap, "master", "fvbr", "up"])?;
            if let Some(netem) = link {
                let mut args = vec!["-n", &ns, "qdisc", "add", "dev", &tap, "root", "netem"];
                args.extend(netem.split_whitespace());
                run("tc", &args)?;
            }
        }
        tracing::debug!(ns = %seg.ns, hosts, "virtual cluster segment ready");
        Ok(seg)
    }

    /// The network namespace of the segment.
    pub fn ns(&self) -> &str {
        &self.ns
    }

    /// A path in the run's private directory.
    pub fn file(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
}

impl Drop for Segment {
    fn drop(&mut self) {
        if self.made_ns {
            // Deleting the namespace deletes its bridge and taps.
            let _ = ip(&["netns", "del", &self.ns]);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn report_is_the_last_exit_line() {
        assert_eq!(parse_report("FVHOST: up 1\nFVHOST-EXIT 33\n"), Some(33));
        assert_eq!(parse_report("FVHOST-EXIT 1\r\nFVHOST-EXIT 0\r\n"), Some(0));
        assert_eq!(parse_report("FVHOST: up 0\n"), None);
        assert_eq!(parse_report("FVHOST-EXIT x\n"), None);
    }

    fn spec(nodes: u32) -> VmSpec {
        use super::super::spec::{FileConfig, NetMode, Overrides};
        VmSpec::resolve(
            FileConfig::default(),
            Overrides {
                nodes: Some(nodes),
                smp: Some(2 * nodes),
                kernel: Some("/srv/guest/vmlinuz".into()),
                initrd: Some("/srv/guest/initrd.gz".into()),
                network: Some(NetMode::VirtualHosts),
                ..Overrides::default()
            },
        )
        .expect("a valid spec")
    }

    #[test]
    fn the_node_sees_its_files_in_the_payload_and_peers_on_the_segment() {
        let two = spec(2);
        let (inner, addrs, files) = inside_view(
            &two,
            &segment_peers(&two),
            Some(Path::new("/tmp/k/cluster.key")),
        );
        assert_eq!(inner.kernel.as_deref(), Some(Path::new("/run/fv/kernel")));
        assert_eq!(inner.initrd.as_deref(), Some(Path::new("/run/fv/initrd")));
        assert_eq!(addrs.key_file.as_deref(), Some(Path::new("/run/fv/key")));
        let names: Vec<&str> = files.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["kernel", "initrd", "key"]);
        assert_eq!(files[0].1, PathBuf::from("/srv/guest/vmlinuz"));
        let peers: Vec<String> = addrs.peers.iter().map(|p| p.to_string()).collect();
        assert_eq!(peers, ["10.77.0.1:7400", "10.77.0.2:7400"]);
        let script = node_script(&inner, 1, &addrs).unwrap();
        assert!(
            script.contains("exec /opt/fragvisor/bin/qemu-system-x86_64 "),
            "{script}"
        );
        assert!(
            script.contains("node-id=1,peers=10.77.0.1:7400;10.77.0.2:7400,key-file=/run/fv/key"),
            "{script}"
        );
        assert!(
            script.contains("-kernel /run/fv/kernel -initrd /run/fv/initrd"),
            "{script}"
        );
        // One node: no peers and no key.
        let one_node = spec(1);
        let (_, one, files) = inside_view(&one_node, &segment_peers(&one_node), None);
        assert!(one.peers.is_empty() && one.key_file.is_none());
        assert_eq!(files.len(), 2);
    }

    #[test]
    fn a_host_vm_is_an_svm_capable_tcg_vm_on_its_tap() {
        let img = HostImage {
            kernel: "/c/vmlinuz".into(),
            initramfs: "/c/initramfs.cpio".into(),
        };
        let opts = HostVmOptions {
            smp: 2,
            ..HostVmOptions::default()
        };
        let a = host_vm_args(
            &img,
            &opts,
            512,
            1,
            Path::new("/r/p1.tar"),
            Path::new("/r/s1"),
        )
        .join(" ");
        for want in [
            "-accel tcg,thread=multi",
            "-cpu qemu64,+svm,+npt",
            "-smp 2",
            "-m 1280M",
            "tsc=reliable panic=-1 fv.host=1 fv.addr=10.77.0.2/24",
            "-serial stdio -serial file:/r/s1 -serial file:/dev/stderr",
            "tap,id=fvnet,ifname=fvtap1,script=no,downscript=no",
            "mac=52:54:00:77:00:01",
            "file=/r/p1.tar,format=raw,if=none,id=fvpayload,readonly=on",
        ] {
            assert!(a.contains(want), "{want:?} not in {a}");
        }
    }

    #[test]
    fn a_payload_holds_the_script_and_files() {
        let dir = std::env::temp_dir().join(format!("fv-vh-pay-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("kernel-here");
        std::fs::write(&f, b"KERNEL").unwrap();
        let out = dir.join("p.tar");
        write_payload(&out, "exec true\n", &[("kernel".into(), f)]).unwrap();
        let mut ar = tar::Archive::new(File::open(&out).unwrap());
        let mut got = Vec::new();
        for e in ar.entries().unwrap() {
            let mut e = e.unwrap();
            let mut body = String::new();
            std::io::Read::read_to_string(&mut e, &mut body).unwrap();
            got.push((e.path().unwrap().display().to_string(), body));
        }
        assert_eq!(
            got,
            [
                ("node.sh".to_string(), "exec true\n".to_string()),
                ("kernel".to_string(), "KERNEL".to_string())
            ]
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_host_vm_without_a_report_failed() {
        let dir = std::env::temp_dir().join(format!("fv-vh-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let report = dir.join("status");
        std::fs::write(&report, "FVHOST: up 1\n").unwrap();
        let (s, why) = node_status(ExitStatus::from_raw(0), &report);
        assert_eq!(s.code(), Some(1));
        assert!(why.unwrap().contains("without reporting"));
        std::fs::write(&report, "FVHOST: up 1\nFVHOST-EXIT 33\n").unwrap();
        assert_eq!(
            node_status(ExitStatus::from_raw(0), &report).0.code(),
            Some(33)
        );
        // A killed host VM is the node's status, whatever the file says.
        let killed = ExitStatus::from_raw(libc::SIGKILL);
        assert_eq!(node_status(killed, &report).0.signal(), Some(libc::SIGKILL));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
