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
exec cargo test --release -p fragvisor-e2e "$@"
