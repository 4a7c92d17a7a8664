#!/usr/bin/env bash
# Build the FragVisor guest system image: Debian 12 (bookworm) made with
# mmdebstrap from this machine's own apt sources, as an ext4 disk for
# virtio-blk, with the Debian cloud kernel (guest-kernel/fetch-kernel.sh) and a
# small initramfs that loads the virtio modules and mounts the disk
# (guest-kernel/system-image/init). Root logs in over ssh with a key this build
# generates; there is no password. See docs/guest-image.md.
#
# Cached under $FV_CACHE/system-image/<key>/, keyed by the recipe (this script,
# the package list, the files under system-image/, the kernel, the workloads):
#   debian.img       the ext4 root file system (raw, sparse)
#   vmlinuz          the kernel
#   initrd.cpio.gz   the initramfs that mounts root=LABEL=fvroot
#   id_ed25519       root's ssh key (and .pub); known_hosts for the guest's host key
#   cmdline          the kernel command line the image expects
# The LAST line of stdout is the path of debian.img.
#
# Env:
#   FV_SYSTEM_IMAGE_SIZE   ext4 size (default 3G; the file is sparse)
#   FV_SYSTEM_IMAGE_EXTRA  more packages, comma separated (part of the key)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=../scripts/lib/common.sh
. "$here/../scripts/lib/common.sh"

fv_apt_install mmdebstrap e2fsprogs busybox-static cpio gzip openssh-client gcc libc6-dev

size=${FV_SYSTEM_IMAGE_SIZE:-3G}
packages=(
    systemd systemd-sysv udev dbus systemd-timesyncd- openssh-server
    iproute2 iputils-ping procps util-linux kmod less ca-certificates
    nginx-light php-fpm sysbench stress-ng fio iperf3 e2fsprogs
)
extra=${FV_SYSTEM_IMAGE_EXTRA:-}
include=$(IFS=,; echo "${packages[*]}")
[ -n "$extra" ] && include="$include,$extra"

# The machine's own apt sources: deb822 first, then the one-line list.
sources=()
for f in /etc/apt/sources.list.d/*.sources /etc/apt/sources.list; do
    [ -s "$f" ] || continue
    grep -qE '^(deb |Types:.*deb)' "$f" || continue
    grep -qE 'debian' "$f" || continue
    sources+=("$f")
done
[ ${#sources[@]} -gt 0 ] || fv_die "no Debian apt sources under /etc/apt to build the image from"

kernel=$("$FV_ROOT/guest-kernel/fetch-kernel.sh" | tail -n1)
kdir=$(dirname "$kernel")
kver=$(tail -n1 "$kdir/VERSION")
moddir="$kdir/modules"
[ -f "$moddir/modules.dep" ] || fv_die "$moddir has no modules.dep"
# What the initramfs loads to reach the root disk (ext4 is built in).
initrd_modules=(virtio_pci virtio_blk)
mods=$(fv_module_closure "$moddir" "${initrd_modules[@]}")

key=$( {
    echo "size $size include $include"
    sha256sum "$0" "$here/../scripts/lib/common.sh" "$kernel" "$here/workloads/fvwork.c" /bin/busybox | awk '{print $1}'
    find "$here/system-image" -type f | LC_ALL=C sort | xargs sha256sum | awk '{print $1}'
    echo "$mods"
} | fv_sha256 | cut -c1-16)
out="$FV_CACHE/system-image/$key"
if [ -f "$out/debian.img" ]; then
    echo "$out/debian.img"
    exit 0
fi
mkdir -p "$FV_CACHE/system-image"
exec 9>"$FV_CACHE/system-image/.lock"
flock 9
if [ -f "$out/debian.img" ]; then
    echo "$out/debian.img"
    exit 0
fi
tmp=$(mktemp -d "$FV_CACHE/system-image/.build.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
t0=$(date +%s)

fv_log "ssh keys for root and the guest's host"
ssh-keygen -q -t ed25519 -N '' -C 'fragvisor-guest-root' -f "$tmp/id_ed25519"
ssh-keygen -q -t ed25519 -N '' -C 'fragvisor-guest-host' -f "$tmp/ssh_host_ed25519_key"

fv_log "compiling the guest workloads"
gcc -O2 -static -pthread -Wall -Wextra -o "$tmp/fvwork" "$here/workloads/fvwork.c"

root="$tmp/root"
fv_log "mmdebstrap bookworm into $root (sources: ${sources[*]})"
mmdebstrap --variant=minbase --mode=root --format=directory \
    --include="$include" \
    --aptopt='Acquire::Check-Valid-Until "false"' \
    --dpkgopt='path-exclude=/usr/share/man/*' \
    --dpkgopt='path-exclude=/usr/share/doc/*' \
    --dpkgopt='path-exclude=/usr/share/locale/*' \
    --dpkgopt='path-include=/usr/share/locale/locale.alias' \
    --customize-hook="\"$here/system-image/customize\" \"\$1\" \"$tmp\" \"$moddir\" \"$kver\"" \
    bookworm "$root" "${sources[@]}" >&2 \
    || fv_die "mmdebstrap failed"

fv_log "making the ext4 image ($size)"
truncate -s "$size" "$tmp/debian.img"
mkfs.ext4 -q -F -L fvroot -E root_owner=0:0 -d "$root" "$tmp/debian.img" >&2 || fv_die "mkfs.ext4 -d failed"
e2fsck -n -f "$tmp/debian.img" >&2 || fv_die "the new image fails e2fsck"

fv_log "the initramfs"
iroot="$tmp/initrd"
mkdir -p "$iroot"/{dev,proc,sys,newroot,lib/modules}
fv_busybox_root "$iroot"
install -m 0755 "$here/system-image/init" "$iroot/init"
: > "$iroot/etc/fv-modules"
for m in $mods; do
    cp "$moddir/$m" "$iroot/lib/modules/"
    basename "$m" >> "$iroot/etc/fv-modules"
done
(cd "$iroot" && find . -mindepth 1 | LC_ALL=C sort | cpio -o -H newc --quiet) | gzip -9 > "$tmp/initrd.cpio.gz"

cp "$kernel" "$tmp/vmlinuz"
echo "root=LABEL=fvroot rw console=ttyS0 tsc=reliable panic=-1 net.ifnames=0" > "$tmp/cmdline"
echo "fragvisor-guest $(cut -d' ' -f1-2 "$tmp/ssh_host_ed25519_key.pub")" > "$tmp/known_hosts"
mkdir -p "$out.new"
mv "$tmp/vmlinuz" "$tmp/initrd.cpio.gz" "$tmp/cmdline" "$tmp/id_ed25519" "$tmp/id_ed25519.pub" \
    "$tmp/known_hosts" "$out.new/"
mv "$tmp/debian.img" "$out.new/debian.img"
rm -rf "$out"
mv "$out.new" "$out"
fv_log "system image built in $(($(date +%s) - t0)) s: $(du -sh --apparent-size "$out/debian.img" | cut -f1) apparent, $(du -sh "$out/debian.img" | cut -f1) used"
echo "$out/debian.img"
