#!/usr/bin/env bash
# Installs what `cargo build -p dsm-service --features rdma` needs on Debian 12.
#
# The `ibverbs` crate (0.9) depends on `ibverbs-sys` 0.3.2, whose build script
# always configures and builds the rdma-core copy vendored in the crate with
# cmake (it has no switch to use the system headers), then runs bindgen over
# its `verbs.h`. The final link is against the system `libibverbs.so`. So the
# build needs:
#   cmake, a C toolchain, pkg-config, python3   rdma-core's cmake configure + build
#   libnl-3-dev, libnl-route-3-dev               rdma-core requires libnl (ENABLE_RESOLVE_NEIGH
#                                                 defaults on and the crate cannot turn it off)
#   libclang-dev                                 bindgen loads libclang and needs clang's
#                                                 builtin headers (stddef.h, ...)
#   libibverbs-dev                               libibverbs.so to link against (the crate
#                                                 links the system library, not the vendored one)
#   librdmacm-dev, ibverbs-providers             rdmacm for the crate's optional feature; the
#                                                 user-space drivers (mlx5, rxe, ...) for run time
#   ibverbs-utils                                `ibv_devices` to list devices (SoftRoCE, where
#                                                 the kernel has rdma_rxe: rdma link add rxe0 type rxe netdev eth0)
#
# The first build compiles rdma-core (1 to 3 minutes on 2 cores); cargo caches
# it in the target directory afterwards.
#
# Usage: scripts/ci-rdma-deps.sh [--check]
#   --check  only verify that everything is installed; exit 1 when something is missing.
set -euo pipefail
. "$(dirname "$0")/lib/common.sh"

PKGS=(
    build-essential cmake pkg-config python3
    libnl-3-dev libnl-route-3-dev
    libclang-dev
    libibverbs-dev librdmacm-dev ibverbs-providers
    ibverbs-utils
)

if [ "${1:-}" = "--check" ]; then
    missing=()
    for p in "${PKGS[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
    done
    if [ ${#missing[@]} -ne 0 ]; then
        fv_log "missing for --features rdma: ${missing[*]}"
        exit 1
    fi
    fv_log "all RDMA build dependencies are installed"
    exit 0
fi

fv_apt_install "${PKGS[@]}"

if command -v ibv_devices >/dev/null 2>&1; then
    fv_log "RDMA devices on this host (the rdma tests skip when there is none):"
    ibv_devices >&2 || true
fi
fv_log "ready: cargo build -p dsm-service --features rdma"
