#!/usr/bin/env bash
# Build the FragVisor guest initramfs (busybox-static + /init + static workloads),
# cached under $FV_CACHE/initramfs keyed by a hash of everything that goes in.
# Prints the path of the gzip'd newc cpio as the LAST line of stdout.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=../scripts/lib/common.sh
. "$here/../scripts/lib/common.sh"

fv_apt_install busybox-static gcc libc6-dev

busybox=/bin/busybox
[ -x "$busybox" ] || fv_die "busybox-static did not install /bin/busybox"

key=$( {
    sha256sum "$busybox" "$here/initramfs/init" "$here/workloads/fvwork.c" "$here/build-initramfs.sh" "$here/../scripts/lib/common.sh" | awk '{print $1}'
    gcc --version | head -n1
} | sha256sum | cut -c1-16)
out_dir="$FV_CACHE/initramfs"
out="$out_dir/initramfs-$key.cpio.gz"
if [ -f "$out" ]; then
    echo "$out"
    exit 0
fi
mkdir -p "$out_dir"
tmp=$(mktemp -d "$out_dir/.build.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
root="$tmp/root"
mkdir -p "$root"/{bin,sbin,dev,proc,sys,tmp,etc,root}

fv_log "compiling workloads"
gcc -O2 -static -pthread -Wall -Wextra -o "$root/bin/fvwork" "$here/workloads/fvwork.c"
# The checksum constant must match what this compiler produces.
"$root/bin/fvwork" cksum >/dev/null || fv_die "fvwork cksum self-check failed on the host"

fv_busybox_root "$root"
install -m 0755 "$here/initramfs/init" "$root/init"

# A few device nodes in case devtmpfs is unavailable (needs root; optional).
mknod -m 600 "$root/dev/console" c 5 1 2>/dev/null || true
mknod -m 666 "$root/dev/null" c 1 3 2>/dev/null || true

# Sorted names and fixed mtimes (inode numbers still vary between builds).
find "$root" -exec touch -h -d @0 {} +
(cd "$root" && find . -mindepth 1 | LC_ALL=C sort | "$busybox" cpio -o -H newc 2>/dev/null) \
    | gzip -9 -n > "$tmp/initramfs.cpio.gz"
mv "$tmp/initramfs.cpio.gz" "$out"
fv_log "initramfs $(du -h "$out" | cut -f1) at $out"
echo "$out"
