#!/usr/bin/env bash
# Build (or reuse) the patched QEMU, then run the end-to-end tests against it.
#   scripts/qemu/e2e.sh                 # all of fragvisor-e2e
#   scripts/qemu/e2e.sh --test kvm_engine
# Extra arguments go to `cargo test -p fragvisor-e2e`.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=../lib/common.sh
. "$here/../lib/common.sh"
cd "$FV_ROOT"
fv_need_cargo

FRAGVISOR_QEMU=$("$FV_ROOT/scripts/build-qemu.sh" | tail -n1)
export FRAGVISOR_QEMU
fv_log "FRAGVISOR_QEMU=$FRAGVISOR_QEMU"
# The virtual-cluster tests run the launcher, which boots host VMs of this image.
cargo build --release -p qemu-accel --bin fragvisor >&2
FRAGVISOR_LAUNCHER="${CARGO_TARGET_DIR:-$FV_ROOT/target}/release/fragvisor"
FRAGVISOR_HOST_IMAGE=$(FRAGVISOR_QEMU="$FRAGVISOR_QEMU" "$FV_ROOT/scripts/virtual-cluster/build-host-image.sh" | tail -n1)
export FRAGVISOR_LAUNCHER FRAGVISOR_HOST_IMAGE
fv_log "FRAGVISOR_HOST_IMAGE=$FRAGVISOR_HOST_IMAGE"
# The system-image tests boot the Debian image and reach it with ssh, curl
# and iperf3; they check the disk with e2fsck and debugfs. The link-security
# test captures the cluster link with tcpdump; the fault tests load the host
# with stress-ng and slow a link with iptables (NFQUEUE to fv-link-shaper).
fv_apt_install_retry openssh-client curl iperf3 e2fsprogs tcpdump stress-ng iptables
FRAGVISOR_SYSTEM_IMAGE=$("$FV_ROOT/guest-kernel/build-system-image.sh" | tail -n1)
export FRAGVISOR_SYSTEM_IMAGE
fv_log "FRAGVISOR_SYSTEM_IMAGE=$FRAGVISOR_SYSTEM_IMAGE"
exec cargo test --release -p fragvisor-e2e "$@"
