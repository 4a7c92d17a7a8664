#!/usr/bin/env bash
# Build the FragVisor host image: what one host VM of a virtual cluster boots
# (docs/virtual-cluster.md). A Debian cloud kernel (guest-kernel/fetch-kernel.sh,
# with its modules) and an initramfs holding busybox, the KVM and virtio-net
# modules, the patched QEMU with the libraries it links and its firmware, and
# scripts/virtual-cluster/host-init as /init. The node's command and guest
# files come at run time on a payload disk, so one image serves every VM.
#
# Cached under $FV_CACHE/host-image/<key>/ (vmlinuz, initramfs.cpio), keyed by
# everything that goes in. The LAST line of stdout is that directory.
#
# Env: FRAGVISOR_QEMU  the patched qemu-system-x86_64 (default: scripts/build-qemu.sh)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=../lib/common.sh
. "$here/../lib/common.sh"

fv_apt_install busybox-static binutils cpio seabios qemu-system-data

# Modules a host needs, in load order after dependency resolution.
wanted=(kvm-amd virtio_pci virtio_net virtio_blk)

qemu=${FRAGVISOR_QEMU:-$("$FV_ROOT/scripts/build-qemu.sh" | tail -n1)}
[ -x "$qemu" ] || fv_die "no QEMU binary at $qemu"
kernel=$("$FV_ROOT/guest-kernel/fetch-kernel.sh" | tail -n1)
kdir=$(dirname "$kernel")
moddir="$kdir/modules"
[ -f "$moddir/modules.dep" ] || fv_die "$moddir has no modules.dep"

# Firmware the node QEMU loads for -M q35 -kernel (its --firmwarepath).
firmware=(/usr/share/seabios/bios-256k.bin /usr/share/seabios/bios.bin
    /usr/share/qemu/linuxboot_dma.bin /usr/share/qemu/linuxboot.bin
    /usr/share/qemu/kvmvapic.bin /usr/share/qemu/multiboot_dma.bin /usr/share/qemu/pvh.bin)

mods=$(fv_module_closure "$moddir" "${wanted[@]}")
key=$( {
    sha256sum "$qemu" "$kernel" "$here/host-init" "$0" "$here/../lib/common.sh" /bin/busybox | awk '{print $1}'
    echo "$mods"
    sha256sum "${firmware[@]}" | awk '{print $1}'
} | fv_sha256 | cut -c1-16)
out="$FV_CACHE/host-image/$key"
if [ -f "$out/initramfs.cpio" ]; then
    echo "$out"
    exit 0
fi
mkdir -p "$FV_CACHE/host-image"
tmp=$(mktemp -d "$FV_CACHE/host-image/.build.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
root="$tmp/root"
mkdir -p "$root"/{bin,sbin,dev,proc,sys,tmp,run,etc,root,lib/modules,opt/fragvisor/bin}

fv_busybox_root "$root"
install -m 0755 "$here/host-init" "$root/init"

: > "$root/etc/fv-modules"
for m in $mods; do
    cp "$moddir/$m" "$root/lib/modules/"
    basename "$m" >> "$root/etc/fv-modules"
done

fv_log "packing $(basename "$qemu") with its libraries"
strip -o "$root/opt/fragvisor/bin/qemu-system-x86_64" "$qemu"
for lib in $(ldd "$qemu" | awk '/=> \// {print $3} /^\t\/.*ld-linux/ {print $1}'); do
    mkdir -p "$root$(dirname "$lib")"
    cp -L "$lib" "$root$lib"
done
for f in "${firmware[@]}"; do
    mkdir -p "$root$(dirname "$f")"
    cp -L "$f" "$root$f"
done

find "$root" -exec touch -h -d @0 {} +
(cd "$root" && find . -mindepth 1 | LC_ALL=C sort | cpio -o -H newc --quiet) > "$tmp/initramfs.cpio"
cp "$kernel" "$tmp/vmlinuz"
cp "$kdir/VERSION" "$tmp/KERNEL-VERSION"
mkdir -p "$out.new"
mv "$tmp/vmlinuz" "$tmp/initramfs.cpio" "$tmp/KERNEL-VERSION" "$out.new/"
rm -rf "$out"
mv "$out.new" "$out"
fv_log "host image $(du -sh "$out" | cut -f1) at $out"
echo "$out"
