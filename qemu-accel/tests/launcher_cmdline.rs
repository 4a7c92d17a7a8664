//! The per-node QEMU command lines the launcher generates.

use std::path::PathBuf;

use qemu_accel::launcher::cmdline::{
    accel_value, cluster_script, node_args, numa_cpus, numa_mem_mib, shell_quote, ClusterAddrs,
};
use qemu_accel::launcher::spec::{FileConfig, Overrides, VmSpec};
use qemu_accel::{Engine, PeerAddr};

fn args(xs: &[&str]) -> Vec<String> {
    xs.iter().map(|s| s.to_string()).collect()
}

fn loopback(ports: &[u16]) -> Vec<PeerAddr> {
    ports
        .iter()
        .map(|&port| PeerAddr {
            host: "127.0.0.1".into(),
            port,
        })
        .collect()
}

fn two_node_tcg() -> VmSpec {
    VmSpec::resolve(
        FileConfig::default(),
        Overrides {
            nodes: Some(2),
            engine: Some(Engine::Tcg),
            smp: Some(4),
            memory_mib: Some(512),
            kernel: Some("/g/vmlinuz".into()),
            initrd: Some("/g/initrd.gz".into()),
            append: Some("console=ttyS0 fv.workload=idle".into()),
            ..Overrides::default()
        },
    )
    .unwrap()
}

#[test]
fn two_node_tcg_exact_args() {
    let spec = two_node_tcg();
    let addrs = ClusterAddrs {
        peers: loopback(&[7400, 7401]),
        key_file: Some(PathBuf::from("/tmp/fv/cluster.key")),
    };
    let machine_tail = |serial: &str| {
        args(&[
            "-smp",
            "4,sockets=2",
            "-m",
            "512M",
            "-object",
            "memory-backend-ram,id=fv-mem0,size=256M",
            "-numa",
            "node,nodeid=0,cpus=0-1,memdev=fv-mem0",
            "-object",
            "memory-backend-ram,id=fv-mem1,size=256M",
            "-numa",
            "node,nodeid=1,cpus=2-3,memdev=fv-mem1",
            "-nodefaults",
            "-nographic",
            "-serial",
            serial,
            "-kernel",
            "/g/vmlinuz",
            "-initrd",
            "/g/initrd.gz",
            "-append",
            "console=ttyS0 fv.workload=idle nohz_full=2-3",
        ])
    };
    let mut want0 = args(&[
        "-machine",
        "q35,smm=off",
        "-accel",
        "fragvisor-tcg,nodes=2,node-id=0,peers=127.0.0.1:7400;127.0.0.1:7401,key-file=/tmp/fv/cluster.key",
    ]);
    want0.extend(machine_tail("stdio"));
    let mut want1 = args(&[
        "-machine",
        "q35,smm=off",
        "-accel",
        "fragvisor-tcg,nodes=2,node-id=1,peers=127.0.0.1:7400;127.0.0.1:7401,key-file=/tmp/fv/cluster.key",
    ]);
    want1.extend(machine_tail("null"));
    assert_eq!(node_args(&spec, 0, &addrs).unwrap(), want0);
    assert_eq!(node_args(&spec, 1, &addrs).unwrap(), want1);
}

/// The -append value node `node` of `spec` gets.
fn append_of(spec: &VmSpec) -> String {
    let addrs = ClusterAddrs::new(
        spec,
        &loopback(&[7400, 7401, 7402, 7403][..spec.nodes as usize]),
        None,
    );
    let a = node_args(spec, 0, &addrs).unwrap();
    let i = a.iter().position(|x| x == "-append").expect("-append");
    a[i + 1].clone()
}

#[test]
fn the_guest_keeps_its_housekeeping_on_the_origin_unless_told_otherwise() {
    let spec = |o: Overrides| {
        VmSpec::resolve(
            FileConfig::default(),
            Overrides {
                engine: Some(Engine::Tcg),
                smp: Some(4),
                kernel: Some("/g/vmlinuz".into()),
                append: o.append.clone().or(Some("console=ttyS0".into())),
                ..o
            },
        )
        .unwrap()
    };
    let two = |o: Overrides| {
        spec(Overrides {
            nodes: Some(2),
            ..o
        })
    };
    assert_eq!(
        append_of(&two(Overrides::default())),
        "console=ttyS0 nohz_full=2-3"
    );
    // Every vCPU not on the origin, wherever the map puts it.
    let mapped = two(Overrides {
        vcpu_map: Some(vec![0, 1, 0, 1]),
        ..Overrides::default()
    });
    assert_eq!(append_of(&mapped), "console=ttyS0 nohz_full=1,3");
    let four = spec(Overrides {
        nodes: Some(4),
        ..Overrides::default()
    });
    assert_eq!(append_of(&four), "console=ttyS0 nohz_full=1-3");
    // One node has nothing to spread; --no-guest-tuning and a user's own
    // choice leave the line alone.
    let one = spec(Overrides {
        nodes: Some(1),
        ..Overrides::default()
    });
    assert_eq!(append_of(&one), "console=ttyS0");
    let off = two(Overrides {
        guest_tuning: Some(false),
        ..Overrides::default()
    });
    assert_eq!(append_of(&off), "console=ttyS0");
    for own in ["nohz_full=3", "nohz=off", "isolcpus=2", "rcu_nocbs=1-3"] {
        let s = two(Overrides {
            append: Some(format!("console=ttyS0 {own}")),
            ..Overrides::default()
        });
        assert_eq!(append_of(&s), format!("console=ttyS0 {own}"));
    }
}

#[test]
fn four_node_kvm_exact_args() {
    let spec = VmSpec::resolve(
        FileConfig::default(),
        Overrides {
            nodes: Some(4),
            smp: Some(6),
            memory_mib: Some(1026),
            cpu: Some("max".into()),
            peer_timeout_ms: Some(3000),
            qemu_args: args(&["-L", "/usr/share/seabios"]),
            ..Overrides::default()
        },
    )
    .unwrap();
    assert_eq!(
        spec.engine,
        Engine::Kvm,
        "fragvisor (KVM) is the default engine"
    );
    let addrs = ClusterAddrs {
        peers: ["10.0.0.1", "10.0.0.2", "10.0.0.3", "10.0.0.4"]
            .iter()
            .map(|h| PeerAddr {
                host: h.to_string(),
                port: 7400,
            })
            .collect(),
        key_file: Some(PathBuf::from("/etc/fragvisor/cluster.key")),
    };
    for k in 0..4u32 {
        let want = args(&[
            "-machine",
            "q35,smm=off",
            "-accel",
            &format!(
                "fragvisor,nodes=4,node-id={k},peers=10.0.0.1:7400;10.0.0.2:7400;10.0.0.3:7400;10.0.0.4:7400,key-file=/etc/fragvisor/cluster.key,peer-timeout-ms=3000"
            ),
            "-cpu",
            "max",
            "-smp",
            "6",
            "-m",
            "1026M",
            // 6 vCPUs on 4 nodes: vCPU i on node i*4/6 -> 0,0,1,2,2,3.
            // 1026 MiB: 257 + 257 + 256 + 256.
            "-object",
            "memory-backend-ram,id=fv-mem0,size=257M",
            "-numa",
            "node,nodeid=0,cpus=0-1,memdev=fv-mem0",
            "-object",
            "memory-backend-ram,id=fv-mem1,size=257M",
            "-numa",
            "node,nodeid=1,cpus=2,memdev=fv-mem1",
            "-object",
            "memory-backend-ram,id=fv-mem2,size=256M",
            "-numa",
            "node,nodeid=2,cpus=3-4,memdev=fv-mem2",
            "-object",
            "memory-backend-ram,id=fv-mem3,size=256M",
            "-numa",
            "node,nodeid=3,cpus=5,memdev=fv-mem3",
            "-nodefaults",
            "-nographic",
            "-serial",
            if k == 0 { "stdio" } else { "null" },
            "-L",
            "/usr/share/seabios",
        ]);
        assert_eq!(node_args(&spec, k, &addrs).unwrap(), want, "node {k}");
    }
}

#[test]
fn nodes_differ_only_in_node_id_and_serial() {
    let spec = two_node_tcg();
    let addrs = ClusterAddrs {
        peers: loopback(&[1, 2]),
        key_file: Some("/k".into()),
    };
    let a = node_args(&spec, 0, &addrs).unwrap();
    let b = node_args(&spec, 1, &addrs).unwrap();
    let diffs: Vec<(&String, &String)> = a.iter().zip(&b).filter(|(x, y)| x != y).collect();
    assert_eq!(a.len(), b.len());
    assert_eq!(diffs.len(), 2, "{diffs:?}");
    assert!(diffs[0].0.contains("node-id=0") && diffs[0].1.contains("node-id=1"));
    assert_eq!(
        (diffs[1].0.as_str(), diffs[1].1.as_str()),
        ("stdio", "null")
    );
}

#[test]
fn never_sets_no_reboot() {
    let spec = two_node_tcg();
    let addrs = ClusterAddrs {
        peers: loopback(&[1, 2]),
        key_file: Some("/k".into()),
    };
    for k in 0..2 {
        assert!(!node_args(&spec, k, &addrs)
            .unwrap()
            .contains(&"-no-reboot".to_string()));
    }
}

#[test]
fn single_node_has_no_peers_or_key() {
    let spec = VmSpec::resolve(
        FileConfig::default(),
        Overrides {
            engine: Some(Engine::Tcg),
            smp: Some(2),
            numa: Some(false),
            ..Overrides::default()
        },
    )
    .unwrap();
    let addrs = ClusterAddrs {
        peers: vec![],
        key_file: None,
    };
    assert_eq!(
        node_args(&spec, 0, &addrs).unwrap(),
        args(&[
            "-machine",
            "q35",
            "-accel",
            "fragvisor-tcg,nodes=1,node-id=0",
            "-smp",
            "2",
            "-m",
            "512M",
            "-nodefaults",
            "-nographic",
            "-serial",
            "stdio",
        ])
    );
}

#[test]
fn kernel_gets_the_default_command_line() {
    let spec = VmSpec::resolve(
        FileConfig::default(),
        Overrides {
            kernel: Some("/k".into()),
            ..Overrides::default()
        },
    )
    .unwrap();
    assert_eq!(
        spec.append.as_deref(),
        Some("console=ttyS0 clocksource=tsc tsc=reliable")
    );
}

#[test]
fn commas_in_the_key_path_are_escaped() {
    let spec = two_node_tcg();
    let addrs = ClusterAddrs {
        peers: loopback(&[1, 2]),
        key_file: Some("/tmp/a,b/key".into()),
    };
    assert!(accel_value(&spec, 0, &addrs).ends_with(",key-file=/tmp/a,,b/key"));
}

#[test]
fn numa_layout_matches_placement() {
    let mut spec = two_node_tcg();
    spec.smp = 5;
    assert_eq!(numa_cpus(&spec, 0).unwrap(), "cpus=0-2");
    assert_eq!(numa_cpus(&spec, 1).unwrap(), "cpus=3-4");
    spec.memory_mib = 513;
    assert_eq!(numa_mem_mib(&spec, 0), 257);
    assert_eq!(numa_mem_mib(&spec, 1), 256);
}

#[test]
fn shell_quoting() {
    assert_eq!(shell_quote("-smp"), "-smp");
    assert_eq!(shell_quote("a;b"), "'a;b'");
    assert_eq!(shell_quote("it's"), r"'it'\''s'");
    assert_eq!(shell_quote(""), "''");
}

#[test]
fn cluster_script_has_one_command_per_host() {
    let mut spec = two_node_tcg();
    spec.hosts = vec!["node-a".into(), "node-b:7500".into()];
    let text = cluster_script(&spec, "/opt/qemu/qemu-system-x86_64".as_ref()).unwrap();
    let commands: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("/opt/qemu/"))
        .collect();
    assert_eq!(commands.len(), 2, "{text}");
    for (k, c) in commands.iter().enumerate() {
        assert!(
            c.contains(&format!(
                "'fragvisor-tcg,nodes=2,node-id={k},peers=node-a:7400;node-b:7500,key-file=/etc/fragvisor/cluster.key'"
            )),
            "{c}"
        );
    }
    assert!(commands[0].contains("-serial stdio"));
    assert!(commands[1].contains("-serial null"));
    assert!(text.contains("# node 0 (origin) on node-a"));
    assert!(text.contains("scp -p /etc/fragvisor/cluster.key node-b:/etc/fragvisor/cluster.key"));
    assert!(text.contains("-append 'console=ttyS0 fv.workload=idle nohz_full=2-3'"));
}

#[test]
fn cluster_script_needs_hosts() {
    let spec = two_node_tcg();
    let err = cluster_script(&spec, "q".as_ref()).unwrap_err();
    assert!(err.to_string().contains("--hosts"), "{err}");
    assert_eq!(err.exit_code(), 2);
}

fn vcpu_map_spec(map: Vec<u32>) -> Result<VmSpec, String> {
    VmSpec::resolve(
        FileConfig::default(),
        Overrides {
            nodes: Some(2),
            engine: Some(Engine::Tcg),
            smp: Some(map.len() as u32),
            memory_mib: Some(512),
            vcpu_map: Some(map),
            ..Overrides::default()
        },
    )
    .map_err(|e| e.to_string())
}

#[test]
fn vcpu_map_reaches_the_accelerator_numa_and_smp() {
    let spec = vcpu_map_spec(vec![0, 1, 1, 0]).unwrap();
    let addrs = ClusterAddrs {
        peers: loopback(&[7400, 7401]),
        key_file: Some(PathBuf::from("/k")),
    };
    assert!(
        accel_value(&spec, 1, &addrs).ends_with(",vcpu-map=0;1;1;0"),
        "{}",
        accel_value(&spec, 1, &addrs)
    );
    // Each guest NUMA node lists the vCPUs of its host, in runs.
    assert_eq!(numa_cpus(&spec, 0).unwrap(), "cpus=0,cpus=3");
    assert_eq!(numa_cpus(&spec, 1).unwrap(), "cpus=1-2");
    let a = node_args(&spec, 0, &addrs).unwrap();
    let smp = a.iter().position(|x| x == "-smp").unwrap();
    // Not one socket per host: the hosts' vCPUs are not contiguous.
    assert_eq!(a[smp + 1], "4");
    assert!(a.contains(&"node,nodeid=0,cpus=0,cpus=3,memdev=fv-mem0".to_string()));
}

#[test]
fn bad_vcpu_maps_are_refused_with_the_reason() {
    for (map, want) in [
        (vec![0, 1, 2], "vCPU 2 is placed on node 2, but nodes=2"),
        (vec![1, 0], "vCPU 0 (the boot CPU) is placed on node 1"),
        (vec![0, 0, 0], "node 1 runs no vCPU"),
    ] {
        let e = vcpu_map_spec(map.clone()).unwrap_err();
        assert!(e.contains(want), "{map:?}: {e}");
    }
    let e = VmSpec::resolve(
        FileConfig::default(),
        Overrides {
            nodes: Some(2),
            smp: Some(4),
            vcpu_map: Some(vec![0, 1]),
            ..Overrides::default()
        },
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("vcpu-map lists 2 vCPU(s) but smp=4"), "{e}");
}

#[test]
fn transport_security_reaches_the_accelerator_only_when_not_the_default() {
    let addrs = ClusterAddrs {
        peers: loopback(&[1, 2]),
        key_file: Some("/k".into()),
    };
    let accel = |spec: &VmSpec| {
        let a = node_args(spec, 1, &addrs).unwrap();
        let i = a.iter().position(|x| x == "-accel").unwrap();
        a[i + 1].clone()
    };
    assert!(!accel(&two_node_tcg()).contains("transport-security"));
    let from_flag = VmSpec {
        transport_security: dsm_service::TransportSecurity::AuthOnly,
        ..two_node_tcg()
    };
    assert!(
        accel(&from_flag).ends_with(",transport-security=auth-only"),
        "{}",
        accel(&from_flag)
    );
    let file: FileConfig = toml::from_str("nodes = 2\ntransport-security = \"auth-only\"").unwrap();
    let spec = VmSpec::resolve(file, Overrides::default()).unwrap();
    assert_eq!(
        spec.transport_security,
        dsm_service::TransportSecurity::AuthOnly
    );
    let file: FileConfig = toml::from_str("transport-security = \"none\"").unwrap();
    let e = VmSpec::resolve(file, Overrides::default()).unwrap_err();
    assert_eq!(
        e.to_string(),
        "transport-security=none: expected aead or auth-only"
    );
}
