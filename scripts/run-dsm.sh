#!/usr/bin/env bash
# The DSM service on its own: a multi-node DSM cluster, each
# node its own process over loopback, running coherence workloads, then the
# DSM benchmark. Extra arguments go to `fragvisor-dsm run`.
set -euo pipefail
. "$(dirname "$0")/lib/common.sh"
cd "$FV_ROOT"
fv_apt_install build-essential pkg-config iproute2
fv_need_cargo
cargo build --release -p dsm-service >&2
bin=./target/release/fragvisor-dsm
$bin run --nodes 3 --workload random --iters 5000 "$@"
$bin run --nodes 3 --workload counter --iters 20000
$bin bench --seq-mb 64
