#!/usr/bin/env bash
# The main FragVisor job on this machine: a 2-node aggregate VM. Two patched
# QEMU processes (one per "host", over loopback) run one Debian guest with 4
# vCPUs and one guest NUMA node per host; the origin's serial console is shown
# here and the command exits with the VM's status. Extra arguments go to
# `fragvisor run` (e.g. --nodes 4, --netns, --append '... fv.workload=counter').
set -euo pipefail
. "$(dirname "$0")/lib/common.sh"
cd "$FV_ROOT"
fv_apt_install build-essential pkg-config iproute2
fv_need_cargo
qemu=$(scripts/build-qemu.sh | tail -n1)
kernel=$(guest-kernel/fetch-kernel.sh | tail -n1)
initrd=$(guest-kernel/build-initramfs.sh | tail -n1)
cargo build --release -p qemu-accel --bin fragvisor >&2
exec ./target/release/fragvisor run --config docs/examples/vm-2node.toml \
    --qemu "$qemu" --kernel "$kernel" --initrd "$initrd" "$@"
