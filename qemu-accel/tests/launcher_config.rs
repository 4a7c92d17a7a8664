//! The VM description: TOML parsing, flag overrides, defaults and errors.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use qemu_accel::launcher::spec::{parse_memory, FileConfig, NetMode, Overrides, VmSpec};
use qemu_accel::launcher::LaunchError;
use qemu_accel::Engine;

fn parse(text: &str) -> Result<FileConfig, LaunchError> {
    FileConfig::parse(text, Path::new("vm.toml"), Path::new("/cfg"))
}

fn resolve(text: &str, flags: Overrides) -> Result<VmSpec, LaunchError> {
    VmSpec::resolve(parse(text)?, flags)
}

fn usage(r: Result<VmSpec, LaunchError>) -> String {
    match r {
        Err(e @ LaunchError::Usage(_)) => {
            assert_eq!(e.exit_code(), 2);
            e.to_string()
        }
        other => panic!("expected a usage error, got {other:?}"),
    }
}

#[test]
fn example_file_parses() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/examples/vm-2node.toml");
    // The example leaves the kernel to a flag (its path depends on the cache).
    let flags = Overrides {
        kernel: Some("/k".into()),
        ..Overrides::default()
    };
    let spec = VmSpec::resolve(FileConfig::load(&path).unwrap(), flags).unwrap();
    assert_eq!(spec.nodes, 2);
    assert_eq!(spec.engine, Engine::Tcg);
    assert_eq!(spec.machine, "q35");
    assert_eq!(spec.smp, 4);
    assert_eq!(spec.memory_mib, 512);
    assert!(spec.numa);
    assert!(spec.append.as_deref().unwrap().contains("fv.workload="));
    assert_eq!(spec.network, NetMode::Loopback);
    assert_eq!(spec.stop_timeout, Duration::from_secs(10));
}

#[test]
fn full_file() {
    let spec = resolve(
        r#"
nodes = 4
engine = "fragvisor"
machine = "pc"
smp = 8
memory = "2G"
numa = false
cpu = "max"
kernel = "guest/vmlinuz"
initrd = "/abs/initrd"
append = "console=ttyS0"
qemu = "/opt/qemu"
qemu-args = ["-L", "/usr/share/seabios"]
network = "netns"
port = 7500
hosts = ["a", "b", "c", "d"]
peer-timeout-ms = 2000
key-file = "cluster.key"
stop-timeout = 3.5
timeout = 60
"#,
        Overrides::default(),
    )
    .unwrap();
    assert_eq!(spec.nodes, 4);
    assert_eq!(spec.engine, Engine::Kvm);
    assert_eq!(spec.machine, "pc");
    assert_eq!(spec.smp, 8);
    assert_eq!(spec.memory_mib, 2048);
    assert!(!spec.numa);
    assert_eq!(spec.cpu.as_deref(), Some("max"));
    assert_eq!(
        spec.kernel,
        Some(PathBuf::from("/cfg/guest/vmlinuz")),
        "relative to the file"
    );
    assert_eq!(spec.initrd, Some(PathBuf::from("/abs/initrd")));
    assert_eq!(spec.key_file, Some(PathBuf::from("/cfg/cluster.key")));
    assert_eq!(spec.qemu_args, ["-L", "/usr/share/seabios"]);
    assert_eq!(spec.network, NetMode::Netns);
    assert_eq!(spec.port, Some(7500));
    assert_eq!(spec.hosts.len(), 4);
    assert_eq!(spec.peer_timeout_ms, Some(2000));
    assert_eq!(spec.stop_timeout, Duration::from_millis(3500));
    assert_eq!(spec.timeout, Some(Duration::from_secs(60)));
}

#[test]
fn defaults() {
    let spec = resolve("", Overrides::default()).unwrap();
    assert_eq!(spec.nodes, 1);
    assert_eq!(spec.engine, Engine::Kvm);
    assert_eq!(spec.machine, "q35");
    assert_eq!(spec.smp, 1);
    assert_eq!(spec.memory_mib, 512);
    assert!(spec.numa);
    assert_eq!(spec.kernel, None);
    assert_eq!(spec.append, None);
    assert_eq!(spec.network, NetMode::Loopback);
    assert_eq!(spec.stop_timeout, Duration::from_secs(10));
    assert_eq!(spec.timeout, None);
}

#[test]
fn flags_override_the_file() {
    let spec = resolve(
        "nodes = 2\nsmp = 2\nengine = \"fragvisor\"\nqemu-args = [\"-a\"]\n",
        Overrides {
            smp: Some(4),
            engine: Some(Engine::Tcg),
            numa: Some(false),
            qemu_args: vec!["-b".into()],
            ..Overrides::default()
        },
    )
    .unwrap();
    assert_eq!(spec.nodes, 2);
    assert_eq!(spec.smp, 4);
    assert_eq!(spec.engine, Engine::Tcg);
    assert!(!spec.numa);
    assert_eq!(spec.qemu_args, ["-a", "-b"], "file args first, then flags");
}

#[test]
fn nodes_follow_hosts() {
    let spec = resolve(
        "hosts = [\"a\", \"b\", \"c\"]\nsmp = 3\n",
        Overrides::default(),
    )
    .unwrap();
    assert_eq!(spec.nodes, 3);
    let peers = spec.cluster_peers().unwrap();
    assert_eq!(peers[0].to_string(), "a:7400");
    let err = usage(resolve(
        "hosts = [\"a\"]\nnodes = 2\nsmp = 2\n",
        Overrides::default(),
    ));
    assert!(err.contains("hosts lists 1 host(s) but nodes=2"), "{err}");
}

#[test]
fn host_ports_and_ipv6() {
    let spec = resolve(
        "hosts = [\"a:7000\", \"fd00::2\", \"[fd00::3]:9\"]\nsmp = 3\nport = 7100\n",
        Overrides::default(),
    )
    .unwrap();
    let peers: Vec<String> = spec
        .cluster_peers()
        .unwrap()
        .iter()
        .map(|p| p.to_string())
        .collect();
    assert_eq!(peers, ["a:7000", "[fd00::2]:7100", "[fd00::3]:9"]);
}

#[test]
fn zero_nodes() {
    let err = usage(resolve("nodes = 0", Overrides::default()));
    assert!(err.starts_with("nodes=0"), "{err}");
}

#[test]
fn smp_below_nodes() {
    let err = usage(resolve("nodes = 4\nsmp = 3\n", Overrides::default()));
    assert!(err.contains("smp=3 is less than nodes=4"), "{err}");
}

#[test]
fn initrd_without_kernel() {
    let err = usage(resolve("initrd = \"/x\"", Overrides::default()));
    assert!(err.contains("need a kernel"), "{err}");
}

#[test]
fn bad_timeouts() {
    assert!(usage(resolve("stop-timeout = 0", Overrides::default())).contains("stop-timeout"));
    assert!(usage(resolve("timeout = -1.0", Overrides::default())).contains("timeout"));
    assert!(usage(resolve("peer-timeout-ms = 0", Overrides::default())).contains("peer-timeout-ms"));
}

fn toml_error(text: &str) -> String {
    match parse(text) {
        Err(e @ LaunchError::Toml { .. }) => {
            assert_eq!(e.exit_code(), 2);
            e.to_string()
        }
        other => panic!("expected a TOML error, got {other:?}"),
    }
}

#[test]
fn unknown_key_has_line_and_column() {
    let err = toml_error("nodes = 2\nsmpp = 4\n");
    assert!(err.starts_with("vm.toml: "), "{err}");
    assert!(err.contains("line 2, column 1"), "{err}");
    assert!(err.contains("smpp"), "{err}");
}

#[test]
fn unknown_engine_has_line_and_column() {
    let err = toml_error("nodes = 2\nengine = \"xen\"\n");
    assert!(err.contains("line 2, column 10"), "{err}");
    assert!(err.contains("unknown engine 'xen'"), "{err}");
}

#[test]
fn bad_memory_has_line_and_column() {
    let err = toml_error("memory = \"12Q\"\n");
    assert!(err.contains("line 1"), "{err}");
    assert!(err.contains("memory '12Q'"), "{err}");
}

#[test]
fn syntax_error_has_line_and_column() {
    let err = toml_error("nodes = 2\nsmp = \n");
    assert!(err.contains("line 2"), "{err}");
}

#[test]
fn wrong_type() {
    let err = toml_error("nodes = \"two\"\n");
    assert!(err.contains("line 1, column 9"), "{err}");
}

#[test]
fn memory_syntax() {
    assert_eq!(parse_memory("512").unwrap(), 512);
    assert_eq!(parse_memory("512M").unwrap(), 512);
    assert_eq!(parse_memory("2G").unwrap(), 2048);
    assert_eq!(parse_memory("1GiB").unwrap(), 1024);
    assert_eq!(parse_memory("2048k").unwrap(), 2);
    for bad in ["", "0", "1.5G", "G", "12Q", "1000k"] {
        assert!(parse_memory(bad).is_err(), "{bad}");
    }
    let spec = resolve("memory = 1024", Overrides::default()).unwrap();
    assert_eq!(spec.memory_mib, 1024);
}

/// The binary: bad input exits 2 with a clear message.
fn fragvisor(args: &[&str]) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_fragvisor"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn binary_bad_input_exits_2() {
    let dir = std::env::temp_dir().join(format!("fv-launcher-cfg-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let bad = dir.join("bad.toml");
    std::fs::write(&bad, "nodes = 2\nsmp = \"four\"\n").unwrap();
    let bad = bad.to_str().unwrap();
    let fake = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/fake-node.sh");
    let cases: &[(&[&str], &str)] = &[
        (&["run", "--nodes", "0"], "nodes=0"),
        (
            &["run", "--nodes", "2", "--smp", "1"],
            "smp=1 is less than nodes=2",
        ),
        (&["run", "--engine", "xen"], "unknown engine 'xen'"),
        (
            &["run", "--qemu", fake, "--kernel", "/nonexistent/vmlinuz"],
            "kernel /nonexistent/vmlinuz: no such file",
        ),
        (&["run", "--config", bad], "line 2, column 7"),
        (
            &["run", "--config", "/nonexistent/vm.toml"],
            "/nonexistent/vm.toml",
        ),
        (
            &["run", "--qemu", "/nonexistent/qemu"],
            "/nonexistent/qemu is not a file",
        ),
        (&["run", "--memory", "lots"], "memory 'lots'"),
        (&["print", "--nodes", "2", "--smp", "2"], "--hosts"),
        (
            &["run", "--nodes", "2", "--smp", "2", "--vcpu-map", "0,2"],
            "vcpu-map: vCPU 1 is placed on node 2, but nodes=2",
        ),
        (
            &["run", "--nodes", "2", "--smp", "2", "--vcpu-map", "0,x"],
            "invalid value 'x'",
        ),
        (&["frobnicate"], "unrecognized subcommand"),
    ];
    for (args, needle) in cases {
        let (code, err) = fragvisor(args);
        assert_eq!(code, 2, "{args:?}: {err}");
        assert!(
            err.contains(needle),
            "{args:?}: expected {needle:?} in {err}"
        );
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// `fragvisor print` for a 2-host TCG VM with 4 vCPUs, plus `extra`; its
/// stdout (the run must succeed).
fn fragvisor_print(extra: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_fragvisor"))
        .args([
            "print",
            "--engine",
            "fragvisor-tcg",
            "--smp",
            "4",
            "--hosts",
            "h0,h1",
            "--qemu",
            "/opt/q",
        ])
        .args(extra)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn binary_print() {
    let text = fragvisor_print(&["--port", "7600"]);
    let cmds: Vec<&str> = text.lines().filter(|l| l.starts_with("/opt/q ")).collect();
    assert_eq!(cmds.len(), 2, "{text}");
    assert!(cmds[1].contains("node-id=1,peers=h0:7600;h1:7600,key-file=/etc/fragvisor/cluster.key"));
}

#[test]
fn binary_keygen() {
    use std::os::unix::fs::PermissionsExt;
    let dir = std::env::temp_dir().join(format!("fv-launcher-keygen-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let key = dir.join("k");
    let (code, err) = fragvisor(&["keygen", key.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    let meta = std::fs::metadata(&key).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    assert_eq!(std::fs::read_to_string(&key).unwrap().trim().len(), 64);
    let (code, _) = fragvisor(&["keygen", key.to_str().unwrap()]);
    assert_eq!(code, 1, "keygen never overwrites");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn vcpu_map_from_file_and_flag() {
    let spec = resolve(
        "nodes = 2\nsmp = 4\nvcpu-map = [0, 1, 0, 1]\n",
        Overrides::default(),
    )
    .unwrap();
    assert_eq!(spec.vcpu_map, Some(vec![0, 1, 0, 1]));
    let spec = resolve(
        "nodes = 2\nsmp = 4\nvcpu-map = [0, 1, 0, 1]\n",
        Overrides {
            vcpu_map: Some(vec![0, 0, 1, 1]),
            ..Overrides::default()
        },
    )
    .unwrap();
    assert_eq!(spec.vcpu_map, Some(vec![0, 0, 1, 1]));
    assert!(usage(resolve(
        "nodes = 2\nsmp = 2\nvcpu-map = [0, 0]\n",
        Overrides::default()
    ))
    .contains("node 1 runs no vCPU"));
}

#[test]
fn binary_print_with_vcpu_map() {
    let text = fragvisor_print(&["--vcpu-map", "0,1,0,1"]);
    assert!(text.contains("vcpu-map=0;1;0;1"), "{text}");
    assert!(text.contains("cpus=0,cpus=2"), "{text}");
}
