#!/usr/bin/env bash
# An aggregate VM on a virtual cluster of this machine: one host VM per node,
# each with its own kernel and KVM (nested SVM under TCG), on one virtual
# Ethernet segment; the KVM engine (-accel fragvisor) by default. Builds what
# it needs (the patched QEMU, the host image, the guest kernel and initramfs)
# and runs `fragvisor run --virtual-hosts N`; the exit status is the guest's.
#   scripts/virtual-cluster.sh                 # 2 host VMs, Debian kernel + busybox guest
#   scripts/virtual-cluster.sh --hosts 4 -- --engine fragvisor-tcg
# Everything after `--` goes to `fragvisor run`. See docs/virtual-cluster.md.
set -euo pipefail
. "$(dirname "$0")/lib/common.sh"
cd "$FV_ROOT"

hosts=2
while [ $# -gt 0 ]; do
    case "$1" in
        --hosts) hosts=$2; shift 2 ;;
        --) shift; break ;;
        *) fv_die "unknown option $1 (use --hosts N, then -- and fragvisor run flags)" ;;
    esac
done
[ "$(id -u)" -eq 0 ] || fv_die "a virtual cluster needs root (network namespace, taps)"

fv_apt_install build-essential pkg-config iproute2
fv_need_cargo
qemu=$(scripts/build-qemu.sh | tail -n1)
image=$(FRAGVISOR_QEMU="$qemu" scripts/virtual-cluster/build-host-image.sh | tail -n1)
kernel=$(guest-kernel/fetch-kernel.sh | tail -n1)
initrd=$(guest-kernel/build-initramfs.sh | tail -n1)
cargo build --release -p qemu-accel --bin fragvisor >&2
exec ./target/release/fragvisor run --virtual-hosts "$hosts" --qemu "$qemu" --host-image "$image" \
    --smp $((2 * hosts)) --kernel "$kernel" --initrd "$initrd" "$@"
