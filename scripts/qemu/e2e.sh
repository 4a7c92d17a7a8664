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
exec cargo test --release -p fragvisor-e2e "$@"
