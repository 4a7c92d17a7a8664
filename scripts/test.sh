#!/usr/bin/env bash
# The whole FragVisor test suite, from a fresh Debian 12 machine: installs what
# it needs, builds everything, runs every test. Exit 0 only if all pass.
set -euo pipefail
. "$(dirname "$0")/lib/common.sh"
cd "$FV_ROOT"

fv_apt_install build-essential pkg-config iproute2 ca-certificates
fv_need_cargo

step() { printf '\n===== %s =====\n' "$*"; }

step "format and lints"
cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings

step "unit, model-checking and multi-process tests"
cargo test --release --no-fail-fast

step "RDMA transport (feature rdma): build, lints, tests (skip with a reason without a device)"
scripts/ci-rdma-deps.sh
cargo clippy -p dsm-service --features rdma --all-targets -- -D warnings
cargo test --release -p dsm-service --features rdma rdma

step "fuzz targets: a short smoke run each (scripts/fuzz.sh for long runs)"
scripts/fuzz.sh 5

step "patched QEMU: fetch, patch, build (cached), end-to-end tests"
scripts/qemu/e2e.sh --no-fail-fast

step "scaling benchmark, short: sysbench cpu on 1 and 2 nodes (figures printed, not asserted)"
FV_SCALE_WORKLOADS=sysbench-cpu FV_SCALE_NODES="1 2" FV_SCALE_OVERCOMMIT=0 FV_SCALE_RUNS=1 \
    scripts/bench-scale.sh | tail -n 1

step "DSM benchmark (figures printed, not asserted)"
./target/release/fragvisor-dsm bench --json --seq-mb 64 --samples 1000 | tail -n 1

echo
echo "fragvisor test suite: all passed"
