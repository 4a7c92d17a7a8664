//! The guest's disks and network links (`--disk`, `--net`), and the checks
//! they get before any node starts.
//!
//! Every node is given the same device models at the same PCI addresses,
//! so every host's copy of the machine agrees on what the guest sees. Only
//! the origin's copies have real backends: the guest's accesses to a
//! device from a vCPU on another host are forwarded to the origin
//! (`docs/aggregate-vm.md`, "The I/O path"), so the other hosts' copies
//! are never driven. They get backends that touch nothing on the host: a
//! `null-co` block node of the same size for a disk (the image need not
//! exist there), and a restricted user network with no forwards for a
//! link (so no host port is taken twice).

use std::fs::{File, OpenOptions};
use std::io::Read;
use std::net::{Ipv4Addr, TcpListener, UdpSocket};
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};

use super::cmdline::escape_opt_value;
use super::LaunchError;

/// Guest port of the ssh forward `run` adds by default.
pub const SSH_GUEST_PORT: u16 = 22;
/// Most disks and links a VM takes (their PCI slots are fixed).
pub const MAX_DISKS: usize = 16;
/// See [`MAX_DISKS`].
pub const MAX_NETS: usize = 4;
/// PCI slot of the random-number device.
const RNG_SLOT: usize = 0x2;
/// PCI slot of link 0; link `j` is at `NET_SLOT + j`.
const NET_SLOT: usize = 0x3;
/// PCI slot of disk 0; disk `i` is at `DISK_SLOT + i`.
const DISK_SLOT: usize = 0x8;

/// A disk image format this QEMU opens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiskFormat {
    /// A plain image.
    Raw,
    /// QEMU's copy-on-write format.
    Qcow2,
}

impl DiskFormat {
    /// QEMU's name.
    pub fn name(self) -> &'static str {
        match self {
            DiskFormat::Raw => "raw",
            DiskFormat::Qcow2 => "qcow2",
        }
    }
}

/// One `--disk PATH[,readonly][,format=F]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskSpec {
    /// The image on the origin.
    pub path: PathBuf,
    /// The guest may not write it.
    pub readonly: bool,
    /// As given; probed from the image when absent.
    pub format: Option<DiskFormat>,
}

/// Parse `PATH[,readonly][,format=raw|qcow2]`.
pub fn parse_disk(text: &str) -> Result<DiskSpec, String> {
    let mut parts = text.split(',');
    let path = parts.next().unwrap_or_default();
    if path.is_empty() {
        return Err(format!(
            "--disk '{text}': expected PATH[,readonly][,format=raw|qcow2]"
        ));
    }
    let mut disk = DiskSpec {
        path: PathBuf::from(path),
        readonly: false,
        format: None,
    };
    for opt in parts {
        match opt.split_once('=') {
            None if opt == "readonly" || opt == "ro" => disk.readonly = true,
            Some(("readonly", v)) => {
                disk.readonly = match v {
                    "on" | "yes" | "true" => true,
                    "off" | "no" | "false" => false,
                    _ => return Err(format!("--disk {text}: readonly={v}: expected on or off")),
                }
            }
            Some(("format", "raw")) => disk.format = Some(DiskFormat::Raw),
            Some(("format", "qcow2")) => disk.format = Some(DiskFormat::Qcow2),
            Some(("format", f)) => {
                return Err(format!(
                    "--disk {text}: format={f}: this QEMU opens raw and qcow2 images"
                ))
            }
            _ => {
                return Err(format!(
                    "--disk {text}: unknown option '{opt}' (valid: readonly, format=raw|qcow2)"
                ))
            }
        }
    }
    Ok(disk)
}

/// The transport of a forwarded port.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FwdProto {
    /// TCP.
    Tcp,
    /// UDP.
    Udp,
}

/// One `hostfwd=[tcp|udp]:[HOSTADDR]:HOSTPORT-[GUESTADDR]:GUESTPORT`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostFwd {
    /// TCP or UDP.
    pub proto: FwdProto,
    /// The host address it listens on (QEMU's default: every address).
    pub host_addr: Option<Ipv4Addr>,
    /// The host port.
    pub host_port: u16,
    /// The guest port.
    pub guest_port: u16,
    /// The text as written.
    pub text: String,
}

fn parse_hostfwd(v: &str) -> Result<HostFwd, String> {
    let bad = || {
        format!("hostfwd={v}: expected [tcp|udp]:[HOSTADDR]:HOSTPORT-[GUESTADDR]:GUESTPORT, e.g. tcp::2222-:22")
    };
    let (host, guest) = v.split_once('-').ok_or_else(bad)?;
    let mut h: Vec<&str> = host.split(':').collect();
    let proto = match h.len() {
        3 => match h.remove(0) {
            "" | "tcp" => FwdProto::Tcp,
            "udp" => FwdProto::Udp,
            _ => return Err(bad()),
        },
        2 => FwdProto::Tcp,
        _ => return Err(bad()),
    };
    let host_addr = match h[0] {
        "" => None,
        a => Some(a.parse::<Ipv4Addr>().map_err(|_| bad())?),
    };
    let host_port: u16 = h[1].parse().map_err(|_| bad())?;
    let guest_port: u16 = guest
        .rsplit(':')
        .next()
        .unwrap_or("")
        .parse()
        .map_err(|_| bad())?;
    if host_port == 0 || guest_port == 0 {
        return Err(bad());
    }
    Ok(HostFwd {
        proto,
        host_addr,
        host_port,
        guest_port,
        text: v.to_string(),
    })
}

/// One `--net`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NetSpec {
    /// QEMU's user networking (libslirp): NAT to the host, port forwards.
    User {
        /// `hostfwd=` options, checked.
        forwards: Vec<HostFwd>,
        /// The other options, passed on as written.
        options: Vec<String>,
    },
    /// A tap device of the origin host (`ifname=...`; in a network
    /// namespace when the launcher runs in one).
    Tap {
        /// The options, as written (`script=no,downscript=no` added when
        /// absent).
        options: Vec<String>,
        /// `queues=N`: the virtio-net device gets `mq=on` and its vectors.
        queues: u32,
    },
}

impl NetSpec {
    /// The ssh forward, if this link has one.
    pub fn ssh_forward(&self) -> Option<&HostFwd> {
        match self {
            NetSpec::User { forwards, .. } => forwards
                .iter()
                .find(|f| f.proto == FwdProto::Tcp && f.guest_port == SSH_GUEST_PORT),
            NetSpec::Tap { .. } => None,
        }
    }
}

/// What `--net` was given: links, or `none`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NetArg {
    /// `--net none`: no link, and no default one.
    None,
    /// A link.
    Link(NetSpec),
}

/// Parse `user[,hostfwd=...]...`, `tap,ifname=...[,queues=N]` or `none`.
pub fn parse_net(text: &str) -> Result<NetArg, String> {
    let mut parts = text.split(',');
    let kind = parts.next().unwrap_or_default();
    let rest: Vec<&str> = parts.collect();
    for opt in &rest {
        if let Some(k) = opt.split('=').next() {
            if k == "id" {
                return Err(format!("--net {text}: id= is set by the launcher"));
            }
        }
    }
    match kind {
        "none" if rest.is_empty() => Ok(NetArg::None),
        "user" => {
            let mut forwards = Vec::new();
            let mut options = Vec::new();
            for opt in rest {
                match opt.split_once('=') {
                    Some(("hostfwd", v)) => forwards.push(parse_hostfwd(v)?),
                    _ => options.push(opt.to_string()),
                }
            }
            Ok(NetArg::Link(NetSpec::User { forwards, options }))
        }
        "tap" => {
            let mut options: Vec<String> = rest.iter().map(|s| s.to_string()).collect();
            let mut queues = 1;
            for opt in &rest {
                if let Some(v) = opt.strip_prefix("queues=") {
                    queues = v
                        .parse::<u32>()
                        .ok()
                        .filter(|q| (1..=8).contains(q))
                        .ok_or_else(|| format!("--net {text}: queues={v}: expected 1 to 8"))?;
                }
            }
            if !rest.iter().any(|o| o.starts_with("ifname=") || o.starts_with("fd=")) {
                return Err(format!(
                    "--net {text}: a tap link needs ifname=TAP (a tap device of the origin host)"
                ));
            }
            for (k, v) in [("script", "no"), ("downscript", "no")] {
                if !rest.iter().any(|o| o.starts_with(&format!("{k}="))) {
                    options.push(format!("{k}={v}"));
                }
            }
            Ok(NetArg::Link(NetSpec::Tap { options, queues }))
        }
        _ => Err(format!(
            "--net '{text}': expected user[,hostfwd=tcp::PORT-:22], tap,ifname=TAP[,queues=N] or none"
        )),
    }
}

/// The disks and links of a VM, checked.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Devices {
    /// Disks, in the order given (disk 0 boots when there is no kernel).
    pub disks: Vec<DiskSpec>,
    /// Network links.
    pub nets: Vec<NetSpec>,
    /// Whether the guest boots from disk 0 (no `-kernel`).
    pub boot_from_disk: bool,
}

/// What [`probe_disk`] learned about an image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DiskInfo {
    /// Its format.
    pub format: DiskFormat,
    /// The size the guest sees, bytes.
    pub virtual_size: u64,
}

const QCOW2_MAGIC: [u8; 4] = *b"QFI\xfb";
/// QEMU's lock bytes (block/file-posix.c): byte 100 + bit for each
/// permission an opener uses, 200 + bit for each it does not share.
const LOCK_PERM_BASE: i64 = 100;
const LOCK_SHARED_BASE: i64 = 200;
/// `BLK_PERM_WRITE` is permission bit 1.
const PERM_WRITE_BIT: i64 = 1;
/// Lock bytes span the permission bits QEMU defines (5 today).
const LOCK_SPAN: i64 = 100;

/// Whether another process holds an OFD lock on `len` bytes of `file` from
/// `start` that conflicts with a lock of type `kind`.
fn lock_conflict(file: &File, start: i64, len: i64, kind: libc::c_int) -> std::io::Result<bool> {
    use std::os::fd::AsRawFd;
    // SAFETY: an all-zero `flock` is a valid value (plain integers).
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = kind as libc::c_short;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl.l_start = start;
    fl.l_len = len;
    // SAFETY: the descriptor is open for the whole call and `fl` is a valid
    // flock that F_OFD_GETLK reads and fills in.
    let r = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_GETLK, &mut fl) };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(fl.l_type != libc::F_UNLCK as libc::c_short)
}

/// Check that QEMU can open `disk` as asked, as far as the launcher can
/// tell before starting it: the file exists and can be opened for reading
/// (and writing), its format is the one given (or is probed), and no other
/// VM holds it in a way QEMU would refuse.
pub fn probe_disk(disk: &DiskSpec) -> Result<DiskInfo, LaunchError> {
    let name = disk.path.display();
    let usage = |m: String| LaunchError::Usage(format!("disk {name}: {m}"));
    let meta = std::fs::metadata(&disk.path).map_err(|e| usage(io_text(&e)))?;
    let ft = meta.file_type();
    if !(ft.is_file() || ft.is_block_device()) {
        return Err(usage("not a regular file or block device".into()));
    }
    let mut file = OpenOptions::new()
        .read(true)
        .write(!disk.readonly)
        .open(&disk.path)
        .map_err(|e| {
            usage(if disk.readonly {
                format!("cannot open it for reading: {}", io_text(&e))
            } else {
                format!(
                    "cannot open it for reading and writing: {} (add ,readonly for a read-only disk)",
                    io_text(&e)
                )
            })
        })?;
    let mut head = [0u8; 32];
    let got =
        read_up_to(&mut file, &mut head).map_err(|e| usage(format!("cannot read it: {e}")))?;
    let is_qcow2 = got >= 32 && head[..4] == QCOW2_MAGIC;
    let format = match (disk.format, is_qcow2) {
        (Some(DiskFormat::Qcow2), false) => {
            return Err(usage(
                "format=qcow2, but it is not a qcow2 image (no QFI\\xfb magic)".into(),
            ))
        }
        (Some(f), _) => f,
        (None, true) => DiskFormat::Qcow2,
        (None, false) => DiskFormat::Raw,
    };
    let virtual_size = match format {
        DiskFormat::Raw => {
            if ft.is_block_device() {
                use std::io::{Seek, SeekFrom};
                file.seek(SeekFrom::End(0))
                    .map_err(|e| usage(format!("cannot size it: {e}")))?
            } else {
                meta.len()
            }
        }
        DiskFormat::Qcow2 => {
            let version = u32::from_be_bytes([head[4], head[5], head[6], head[7]]);
            if !(2..=3).contains(&version) {
                return Err(usage(format!(
                    "qcow2 version {version}: QEMU opens versions 2 and 3"
                )));
            }
            u64::from_be_bytes(head[24..32].try_into().unwrap_or_default())
        }
    };
    if virtual_size == 0 {
        return Err(usage("the image is empty".into()));
    }
    // QEMU takes shared locks on its lock bytes and refuses an image whose
    // bytes another opener holds against it: any lock at all when this VM
    // writes; a writer's when it only reads.
    let busy = if disk.readonly {
        lock_conflict(&file, LOCK_PERM_BASE + PERM_WRITE_BIT, 1, libc::F_WRLCK)
    } else {
        lock_conflict(
            &file,
            LOCK_PERM_BASE,
            LOCK_SHARED_BASE + LOCK_SPAN - LOCK_PERM_BASE,
            libc::F_WRLCK,
        )
    }
    .map_err(|e| usage(format!("cannot check its locks: {e}")))?;
    if busy {
        return Err(usage(
            "already in use by another VM (a QEMU holds its lock); stop that VM, or give \
             both ,readonly"
                .into(),
        ));
    }
    Ok(DiskInfo {
        format,
        virtual_size,
    })
}

/// An I/O error as a person reads it: "No such file or directory",
/// without Rust's "(os error 2)".
fn io_text(e: &std::io::Error) -> String {
    let t = e.to_string();
    match t.find(" (os error") {
        Some(i) => t[..i].to_string(),
        None => t,
    }
}

fn read_up_to(file: &mut File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match file.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

/// Check that every forwarded host port of `net` is free now.
pub fn check_forwards(net: &NetSpec) -> Result<(), LaunchError> {
    let NetSpec::User { forwards, .. } = net else {
        return Ok(());
    };
    for f in forwards {
        let addr = (f.host_addr.unwrap_or(Ipv4Addr::UNSPECIFIED), f.host_port);
        let r = match f.proto {
            FwdProto::Tcp => TcpListener::bind(addr).map(drop),
            FwdProto::Udp => UdpSocket::bind(addr).map(drop),
        };
        if let Err(e) = r {
            return Err(LaunchError::Usage(format!(
                "--net user,hostfwd={}: host port {} cannot be taken: {e}",
                f.text, f.host_port
            )));
        }
    }
    Ok(())
}

/// A free TCP port on 127.0.0.1, for the default ssh forward.
pub fn free_local_port() -> Result<u16, LaunchError> {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| LaunchError::Runtime(format!("cannot find a free port for ssh: {e}")))
}

/// The default link of `run`: user networking, ssh forwarded from
/// `127.0.0.1:port`.
pub fn default_user_net(port: u16) -> NetSpec {
    let text = format!("tcp:127.0.0.1:{port}-:{SSH_GUEST_PORT}");
    NetSpec::User {
        forwards: vec![HostFwd {
            proto: FwdProto::Tcp,
            host_addr: Some(Ipv4Addr::LOCALHOST),
            host_port: port,
            guest_port: SSH_GUEST_PORT,
            text,
        }],
        options: Vec::new(),
    }
}

/// The QEMU arguments of the devices of `node`. `infos` holds
/// [`probe_disk`]'s answer for each disk (in order).
pub fn device_args(dev: &Devices, infos: &[DiskInfo], node: u32) -> Vec<String> {
    let mut a = Vec::new();
    let origin = node == 0;
    if dev.disks.is_empty() && dev.nets.is_empty() {
        return a;
    }
    if !origin {
        // Under KVM an ioeventfd would let this host's kernel take a
        // virtqueue kick for the idle local copy: the write must exit and be
        // forwarded. The origin keeps its ioeventfds.
        a.push("-global".into());
        a.push("virtio-pci.ioeventfd=off".into());
    }
    a.push("-device".into());
    a.push(format!("virtio-rng-pci,addr={RNG_SLOT:#x}"));
    for (j, net) in dev.nets.iter().enumerate() {
        let id = format!("fv-net{j}");
        let backend = match (origin, net) {
            (true, NetSpec::User { forwards, options }) => {
                let mut v = format!("user,id={id}");
                for o in options {
                    v.push(',');
                    v.push_str(o);
                }
                for f in forwards {
                    v.push_str(&format!(",hostfwd={}", f.text));
                }
                v
            }
            (true, NetSpec::Tap { options, .. }) => format!("tap,id={id},{}", options.join(",")),
            // Never driven (see the module text): no host state at all.
            (false, _) => format!("user,id={id},restrict=on"),
        };
        a.push("-netdev".into());
        a.push(backend);
        let mut device = format!(
            "virtio-net-pci,netdev={id},mac=52:54:00:fa:00:{j:02x},romfile=,addr={:#x}",
            NET_SLOT + j
        );
        if let NetSpec::Tap { queues, .. } = net {
            if *queues > 1 {
                device.push_str(&format!(",mq=on,vectors={}", 2 * queues + 2));
            }
        }
        a.push("-device".into());
        a.push(device);
    }
    for (i, (disk, info)) in dev.disks.iter().zip(infos).enumerate() {
        let id = format!("fv-disk{i}");
        let ro = if disk.readonly { ",read-only=on" } else { "" };
        if origin {
            a.push("-blockdev".into());
            a.push(format!(
                "driver={},node-name={id},file.driver=file,file.filename={}{ro},\
                 file.locking=on,cache.direct=off,discard=unmap",
                info.format.name(),
                escape_opt_value(&disk.path.display().to_string())
            ));
        } else {
            a.push("-blockdev".into());
            a.push(format!(
                "driver=null-co,node-name={id},size={}{ro}",
                info.virtual_size
            ));
        }
        let boot = if dev.boot_from_disk && i == 0 {
            ",bootindex=0"
        } else {
            ""
        };
        a.push("-device".into());
        a.push(format!(
            "virtio-blk-pci,drive={id},addr={:#x}{boot}",
            DISK_SLOT + i
        ));
    }
    a
}

/// The files a FragVisor system image keeps beside its disk
/// (`guest-kernel/build-system-image.sh`): kernel, initramfs, the kernel
/// command line, root's ssh key and the guest's host key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SystemImage {
    /// `vmlinuz`.
    pub kernel: PathBuf,
    /// `initrd.cpio.gz`.
    pub initrd: PathBuf,
    /// The text of `cmdline`.
    pub append: String,
    /// `id_ed25519`, if present.
    pub ssh_key: Option<PathBuf>,
    /// `known_hosts` (alias `fragvisor-guest`), if present.
    pub known_hosts: Option<PathBuf>,
}

/// Host key alias of the system image's `known_hosts`.
pub const GUEST_HOST_KEY_ALIAS: &str = "fragvisor-guest";

impl SystemImage {
    /// The system image files beside `disk`, if it is one.
    pub fn beside(disk: &Path) -> Option<SystemImage> {
        let dir = disk.parent()?;
        let kernel = dir.join("vmlinuz");
        let initrd = dir.join("initrd.cpio.gz");
        let append = std::fs::read_to_string(dir.join("cmdline")).ok()?;
        if !kernel.is_file() || !initrd.is_file() {
            return None;
        }
        let opt = |n: &str| Some(dir.join(n)).filter(|p| p.is_file());
        Some(SystemImage {
            kernel,
            initrd,
            append: append.trim().to_string(),
            ssh_key: opt("id_ed25519"),
            known_hosts: opt("known_hosts"),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disk_options() {
        assert_eq!(
            parse_disk("/a/b.img,readonly,format=qcow2").unwrap(),
            DiskSpec {
                path: "/a/b.img".into(),
                readonly: true,
                format: Some(DiskFormat::Qcow2)
            }
        );
        assert!(!parse_disk("x.img").unwrap().readonly);
        assert!(parse_disk("x.img,format=vmdk")
            .unwrap_err()
            .contains("raw and qcow2"));
        assert!(parse_disk("x.img,cache=none")
            .unwrap_err()
            .contains("unknown option"));
        assert!(parse_disk(",readonly").is_err());
    }

    #[test]
    fn net_options() {
        let NetArg::Link(n) =
            parse_net("user,hostfwd=tcp::2222-:22,hostfwd=udp:127.0.0.1:5000-10.0.2.15:53")
                .unwrap()
        else {
            panic!("not a link")
        };
        let NetSpec::User { forwards, options } = &n else {
            panic!("not user")
        };
        assert!(options.is_empty());
        assert_eq!(forwards[0].host_port, 2222);
        assert_eq!(forwards[0].host_addr, None);
        assert_eq!(forwards[1].proto, FwdProto::Udp);
        assert_eq!(forwards[1].host_addr, Some(Ipv4Addr::LOCALHOST));
        assert_eq!(forwards[1].guest_port, 53);
        assert_eq!(n.ssh_forward().unwrap().host_port, 2222);
        assert!(parse_net("user,hostfwd=tcp::x-:22")
            .unwrap_err()
            .contains("hostfwd"));
        assert!(parse_net("tap").unwrap_err().contains("ifname"));
        let NetArg::Link(NetSpec::Tap { options, queues }) =
            parse_net("tap,ifname=fv0,queues=4").unwrap()
        else {
            panic!("not tap")
        };
        assert_eq!(queues, 4);
        assert!(options.contains(&"script=no".to_string()));
        assert_eq!(parse_net("none").unwrap(), NetArg::None);
        assert!(parse_net("vde").is_err());
        assert!(parse_net("user,id=x").unwrap_err().contains("id="));
    }

    #[test]
    fn only_the_origin_has_real_backends() {
        let dev = Devices {
            disks: vec![DiskSpec {
                path: "/img/d,1.img".into(),
                readonly: false,
                format: None,
            }],
            nets: vec![default_user_net(2222)],
            boot_from_disk: false,
        };
        let infos = [DiskInfo {
            format: DiskFormat::Raw,
            virtual_size: 1 << 30,
        }];
        let o = device_args(&dev, &infos, 0).join(" ");
        let r = device_args(&dev, &infos, 1).join(" ");
        assert!(
            o.contains("user,id=fv-net0,hostfwd=tcp:127.0.0.1:2222-:22"),
            "{o}"
        );
        assert!(o.contains("file.filename=/img/d,,1.img"), "{o}");
        assert!(r.contains("user,id=fv-net0,restrict=on"), "{r}");
        assert!(
            r.contains("driver=null-co,node-name=fv-disk0,size=1073741824"),
            "{r}"
        );
        assert!(!r.contains("/img/"), "{r}");
        assert!(r.contains("virtio-pci.ioeventfd=off") && !o.contains("ioeventfd"));
        // The same models at the same addresses on every node.
        let devs = |s: &str| -> Vec<String> {
            format!(" {s}")
                .split(" -device ")
                .skip(1)
                .map(|d| d.split(' ').next().unwrap().to_string())
                .collect()
        };
        assert_eq!(devs(&o), devs(&r));
    }

    #[test]
    fn probe_finds_format_size_and_locks() {
        let dir = std::env::temp_dir().join(format!("fv-probe-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let raw = dir.join("raw.img");
        std::fs::write(&raw, vec![0u8; 4096]).unwrap();
        let d = parse_disk(raw.to_str().unwrap()).unwrap();
        assert_eq!(
            probe_disk(&d).unwrap(),
            DiskInfo {
                format: DiskFormat::Raw,
                virtual_size: 4096
            }
        );
        let mut q = b"QFI\xfb\0\0\0\x03".to_vec();
        q.resize(24, 0);
        q.extend_from_slice(&(1u64 << 33).to_be_bytes());
        let qc = dir.join("q.qcow2");
        std::fs::write(&qc, &q).unwrap();
        let info = probe_disk(&parse_disk(qc.to_str().unwrap()).unwrap()).unwrap();
        assert_eq!(info.format, DiskFormat::Qcow2);
        assert_eq!(info.virtual_size, 1 << 33);
        let e = probe_disk(&parse_disk(&format!("{},format=qcow2", raw.display())).unwrap());
        assert!(e.unwrap_err().to_string().contains("not a qcow2 image"));
        let e = probe_disk(&parse_disk(dir.join("none.img").to_str().unwrap()).unwrap());
        assert!(e.unwrap_err().to_string().contains("No such file"));

        // Locks as QEMU takes them, from another open file description.
        let hold = |bytes: &[i64]| {
            use std::os::fd::AsRawFd;
            let f = File::open(&raw).unwrap();
            for &b in bytes {
                // SAFETY: all-zero flock is valid; filled in below.
                let mut fl: libc::flock = unsafe { std::mem::zeroed() };
                fl.l_type = libc::F_RDLCK as libc::c_short;
                fl.l_whence = libc::SEEK_SET as libc::c_short;
                fl.l_start = b;
                fl.l_len = 1;
                // SAFETY: `f` is open and `fl` is a valid flock.
                let r = unsafe { libc::fcntl(f.as_raw_fd(), libc::F_OFD_SETLK, &fl) };
                assert_eq!(r, 0);
            }
            f
        };
        let rw = parse_disk(raw.to_str().unwrap()).unwrap();
        let ro = parse_disk(&format!("{},readonly", raw.display())).unwrap();
        // A VM that writes: uses read (100) and write (101), shares no write (201).
        let writer = hold(&[100, 101, 201]);
        assert!(probe_disk(&rw)
            .unwrap_err()
            .to_string()
            .contains("in use by another VM"));
        assert!(probe_disk(&ro)
            .unwrap_err()
            .to_string()
            .contains("in use by another VM"));
        drop(writer);
        // A read-only VM: read (100), shares no write (201).
        let reader = hold(&[100, 201]);
        assert!(probe_disk(&ro).is_ok());
        assert!(probe_disk(&rw)
            .unwrap_err()
            .to_string()
            .contains("in use by another VM"));
        drop(reader);
        assert!(probe_disk(&rw).is_ok());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
