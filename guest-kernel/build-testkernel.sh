#!/usr/bin/env bash
# Build the tiny multi-vCPU test kernel (fvtest) and print the path of the
# multiboot ELF as the LAST line of stdout.
#   guest-kernel/build-testkernel.sh [OUT_DIR]     (default: guest-kernel/build)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=../scripts/lib/common.sh
. "$here/../scripts/lib/common.sh"
out=${1:-$here/build}
command -v make >/dev/null 2>&1 && command -v gcc >/dev/null 2>&1 && command -v ld >/dev/null 2>&1 \
    || fv_apt_install make gcc binutils
mkdir -p "$out"
out=$(cd "$out" && pwd)
make -s -C "$here" O="$out" >&2
echo "$out/fvtest.elf"
