//! `fragvisor run --disk/--net` bad input, for real: each case gets one
//! line naming the problem and exit status 2 before any node starts (the
//! stand-in node, tests/fixtures/fake-node.sh, would print "fake node").
//! And `fragvisor ssh` with nothing to log into.

use std::fs::File;
use std::net::TcpListener;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};

const FAKE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/fake-node.sh");

fn scratch(name: &str) -> PathBuf {
    let d = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("devices-{name}"));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn fragvisor(dir: &PathBuf, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_fragvisor"))
        .args(args)
        .env("XDG_RUNTIME_DIR", dir)
        .env_remove("FRAGVISOR_QEMU")
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

/// `fragvisor run` of 2 fake nodes with `extra`; asserts status 2, one
/// error line containing `want`, and that no node started.
fn refused(name: &str, extra: &[&str], want: &str) {
    let dir = scratch(&format!("run-{name}"));
    let mut args = vec![
        "run",
        "--qemu",
        FAKE,
        "--kernel",
        FAKE,
        "--engine",
        "fragvisor-tcg",
        "--nodes",
        "2",
    ];
    args.extend_from_slice(extra);
    let out = fragvisor(&dir, &args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{name}: {stderr}");
    assert!(
        stderr.contains(want),
        "{name}: wanted '{want}' in:\n{stderr}"
    );
    assert!(
        !stderr.contains("fake node"),
        "{name}: a node started:\n{stderr}"
    );
    let errors = stderr.lines().filter(|l| l.contains("error")).count();
    assert_eq!(errors, 1, "{name}: one error line:\n{stderr}");
}

fn image(dir: &std::path::Path, name: &str, bytes: &[u8]) -> String {
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    p.display().to_string()
}

#[test]
fn missing_image() {
    refused(
        "missing",
        &["--disk", "/nonexistent/fv.img"],
        "disk /nonexistent/fv.img: No such file or directory",
    );
}

#[test]
fn unreadable_image() {
    // Root reads anything: a directory stands in for an image that cannot
    // be opened as one.
    let d = scratch("dir-image");
    refused(
        "unreadable",
        &["--disk", d.to_str().unwrap()],
        "not a regular file or block device",
    );
}

#[test]
fn format_qemu_cannot_open() {
    let d = scratch("format");
    let raw = image(&d, "raw.img", &[0u8; 4096]);
    refused(
        "qcow2-not",
        &["--disk", &format!("{raw},format=qcow2")],
        "format=qcow2, but it is not a qcow2 image",
    );
    refused(
        "vmdk",
        &["--disk", &format!("{raw},format=vmdk")],
        "this QEMU opens raw and qcow2 images",
    );
    let mut q = b"QFI\xfb\0\0\0\x07".to_vec();
    q.resize(64, 0);
    let bad = image(&d, "v7.qcow2", &q);
    refused("qcow2-v7", &["--disk", &bad], "qcow2 version 7");
}

#[test]
fn image_locked_by_another_vm() {
    let d = scratch("locked");
    let img = image(&d, "busy.img", &[0u8; 4096]);
    // What a QEMU writing the image holds: shared locks on its permission
    // bytes (100 + bit: read, write) and on "not shared: write" (201).
    let holder = File::open(&img).unwrap();
    for byte in [100, 101, 201] {
        // SAFETY: an all-zero flock is valid; the fields are set below.
        let mut fl: libc::flock = unsafe { std::mem::zeroed() };
        fl.l_type = libc::F_RDLCK as libc::c_short;
        fl.l_whence = libc::SEEK_SET as libc::c_short;
        fl.l_start = byte;
        fl.l_len = 1;
        // SAFETY: `holder` is open and `fl` is a valid flock.
        let r = unsafe { libc::fcntl(holder.as_raw_fd(), libc::F_OFD_SETLK, &fl) };
        assert_eq!(r, 0, "lock byte {byte}");
    }
    refused("locked", &["--disk", &img], "already in use by another VM");
    refused(
        "locked-ro",
        &["--disk", &format!("{img},readonly")],
        "already in use by another VM",
    );
    drop(holder);
}

#[test]
fn hostfwd_port_in_use() {
    let d = scratch("port");
    let img = image(&d, "ok.img", &[0u8; 4096]);
    let busy = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = busy.local_addr().unwrap().port();
    refused(
        "port",
        &[
            "--disk",
            &img,
            "--net",
            &format!("user,hostfwd=tcp:127.0.0.1:{port}-:22"),
        ],
        &format!("host port {port} cannot be taken: Address already in use"),
    );
}

#[test]
fn bad_link_and_virtual_hosts() {
    refused("tap", &["--net", "tap"], "a tap link needs ifname=TAP");
    refused(
        "vde",
        &["--net", "vde,sock=/x"],
        "expected user[,hostfwd=tcp::PORT-:22]",
    );
    refused(
        "none-plus",
        &["--net", "none", "--net", "user"],
        "--net none cannot be combined",
    );
    let d = scratch("vh");
    let img = image(&d, "ok.img", &[0u8; 4096]);
    refused(
        "virtual-hosts",
        &["--virtual-hosts", "2", "--disk", &img],
        "not supported with --virtual-hosts yet",
    );
}

#[test]
fn ssh_without_a_running_vm() {
    let d = scratch("ssh");
    let out = fragvisor(&d, &["ssh", "--", "true"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no VM with an ssh forward is running"));
    let out = fragvisor(&d, &["ssh", "nosuch", "--", "true"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no VM named nosuch is running"));
}
