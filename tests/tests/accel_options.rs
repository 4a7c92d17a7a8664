//! `-accel fragvisor` / `-accel fragvisor-tcg`: listed, and every bad
//! option stops QEMU with a message naming the problem.

use std::time::Duration;

use fragvisor_e2e::{base_args, run_qemu};

const ENGINES: [&str; 2] = ["fragvisor", "fragvisor-tcg"];
const KEY: &str = "0123456789abcdef";

/// Start a machine with `accel` and expect QEMU to refuse it with `message`.
fn assert_refused(accel: &str, message: &str) {
    let run = run_qemu(&base_args(accel, 2, 128), Duration::from_secs(30));
    let code = run.code();
    assert_ne!(
        code,
        0,
        "QEMU accepted -accel {accel}\n{}",
        run.transcript()
    );
    assert!(
        run.stderr.contains(message),
        "-accel {accel}: expected {message:?} on stderr\n{}",
        run.transcript()
    );
    assert!(
        !run.stdout.contains("FV"),
        "-accel {accel}: a guest ran\n{}",
        run.transcript()
    );
}

#[test]
fn accel_help_lists_both_accelerators() {
    let run = run_qemu(&["-accel", "help"], Duration::from_secs(30));
    assert_eq!(run.code(), 0, "{}", run.transcript());
    let names: Vec<&str> = run.stdout.lines().map(str::trim).collect();
    for engine in ENGINES {
        assert!(
            names.contains(&engine),
            "-accel help lacks {engine}\n{}",
            run.transcript()
        );
    }
}

#[test]
fn zero_nodes_is_refused() {
    for e in ENGINES {
        assert_refused(
            &format!("{e},nodes=0"),
            "nodes=0: a cluster needs at least one node",
        );
    }
}

#[test]
fn node_id_beyond_nodes_is_refused() {
    for e in ENGINES {
        assert_refused(
            &format!("{e},nodes=2,node-id=2,peers=10.0.0.1:7000;10.0.0.2:7000,key={KEY}"),
            "node-id=2 is out of range for nodes=2",
        );
        assert_refused(
            &format!("{e},nodes=1,node-id=1"),
            "node-id=1 is out of range for nodes=1",
        );
    }
}

#[test]
fn unknown_option_is_refused() {
    for e in ENGINES {
        assert_refused(
            &format!("{e},nodes=1,colour=blue"),
            &format!("Property '{e}-accel.colour' not found"),
        );
    }
}

#[test]
fn multi_node_without_key_is_refused() {
    for e in ENGINES {
        assert_refused(
            &format!("{e},nodes=2,peers=10.0.0.1:7000;10.0.0.2:7000"),
            "nodes=2 needs a cluster key: pass key=SECRET or key-file=PATH",
        );
    }
}

#[test]
fn non_numeric_and_short_key_values_are_refused() {
    for e in ENGINES {
        assert_refused(
            &format!("{e},nodes=two"),
            "nodes=two: not a non-negative integer",
        );
        assert_refused(
            &format!("{e},nodes=1,key=short"),
            "key: the cluster key is 5 bytes, at least 16 are required",
        );
        assert_refused(
            &format!("{e},nodes=2,peers=a:1,key={KEY}"),
            "peers lists 1 address(es) but nodes=2",
        );
    }
}

#[test]
fn kvm_engine_refuses_an_in_kernel_irqchip() {
    assert_refused(
        "fragvisor,nodes=1,kernel-irqchip=on",
        "kernel-irqchip must be off",
    );
    assert_refused(
        "fragvisor,nodes=1,kernel-irqchip=split",
        "kernel-irqchip must be off",
    );
}

#[test]
fn tcg_engine_refuses_single_threaded_tcg() {
    assert_refused(
        "fragvisor-tcg,nodes=1,thread=single",
        "fragvisor-tcg: needs multi-threaded TCG",
    );
}

#[test]
fn unknown_transport_security_is_refused() {
    for e in ENGINES {
        assert_refused(
            &format!(
                "{e},nodes=2,peers=127.0.0.1:7000;127.0.0.1:7001,key={KEY},transport-security=tls"
            ),
            "transport-security=tls: expected aead or auth-only",
        );
    }
}
