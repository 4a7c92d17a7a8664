#!/usr/bin/env bash
# The main FragVisor job on this machine: a 2-node aggregate VM running the
# Debian 12 system image (guest-kernel/build-system-image.sh). Two patched
# QEMU processes (one per "host", over loopback) run one guest with 4 vCPUs,
# 1 GiB and one guest NUMA node per host; its disk, network and console are
# on the origin. The launcher prints how to log in (`fragvisor ssh NAME --
# CMD`); `systemctl poweroff` in the guest (or Ctrl-C here) ends it, and the
# command exits with the VM's status.
#
# Extra arguments go to `fragvisor run` (e.g. --nodes 4, --netns,
# --net user,hostfwd=tcp::8080-:80). The guest's disk is a working copy of
# the image (run.img beside it), kept between runs; --fresh-disk (first)
# makes it anew.
# `scripts/run.sh --initramfs [ARGS]` runs the small busybox guest instead
# (docs/examples/vm-2node.toml: every workload, then power-off).
set -euo pipefail
. "$(dirname "$0")/lib/common.sh"
cd "$FV_ROOT"
fv_apt_install build-essential pkg-config iproute2 openssh-client
fv_need_cargo
qemu=$(scripts/build-qemu.sh | tail -n1)
cargo build --release -p qemu-accel --bin fragvisor >&2

if [ "${1:-}" = --initramfs ]; then
    shift
    kernel=$(guest-kernel/fetch-kernel.sh | tail -n1)
    initrd=$(guest-kernel/build-initramfs.sh | tail -n1)
    exec ./target/release/fragvisor run --config docs/examples/vm-2node.toml \
        --qemu "$qemu" --kernel "$kernel" --initrd "$initrd" "$@"
fi

fresh=
if [ "${1:-}" = --fresh-disk ]; then
    fresh=1
    shift
fi
image=$(guest-kernel/build-system-image.sh | tail -n1)
# A working copy beside the image's kernel and keys: the built image stays
# as it was built, and the copy keeps what the guest wrote between runs.
work="$(dirname "$image")/run.img"
if [ -n "$fresh" ] || [ ! -f "$work" ]; then
    fv_log "a fresh copy of the system image: $work"
    cp --sparse=always "$image" "$work.tmp"
    mv "$work.tmp" "$work"
fi
exec ./target/release/fragvisor run --config docs/examples/debian-2node.toml \
    --qemu "$qemu" --disk "$work" "$@"
