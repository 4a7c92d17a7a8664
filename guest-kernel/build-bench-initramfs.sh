#!/usr/bin/env bash
# Build the benchmark initramfs: the guest initramfs (build-initramfs.sh) plus
# Debian's sysbench, stress-ng and 7-Zip (7zz) with the shared libraries they
# load, as a second cpio archive appended to the first (the kernel unpacks
# both). The guest's `fv.workload=scale fv.scale=NAME` runs them
# (docs/performance.md, scripts/bench-scale.sh).
# Cached under $FV_CACHE/initramfs keyed by the base archive, the programs and
# this script. Prints the path of the combined archive as the LAST line.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=../scripts/lib/common.sh
. "$here/../scripts/lib/common.sh"

fv_apt_install sysbench stress-ng 7zip cpio gzip
programs=(/usr/bin/sysbench /usr/bin/stress-ng /usr/bin/7zz)
for p in "${programs[@]}"; do
    [ -x "$p" ] || fv_die "$p is missing after installing its package"
done

base=$("$here/build-initramfs.sh" | tail -n1)
[ -f "$base" ] || fv_die "no base initramfs at '$base'"

# Every file that goes in: the programs, their libraries (ldd) and the loader.
files() {
    local p
    for p in "${programs[@]}"; do
        echo "$p"
        ldd "$p" | awk '/=> \//{print $3} /^\t\/[^ ]+ \(/{print $1}'
    done | LC_ALL=C sort -u
}
mapfile -t bundle < <(files)

key=$( {
    sha256sum "$base" "$0" | awk '{print $1}'
    for f in "${bundle[@]}"; do echo "$f $(sha256sum < "$(readlink -f "$f")" | cut -c1-64)"; done
} | fv_sha256 | cut -c1-16)
out="$FV_CACHE/initramfs/bench-$key.cpio.gz"
if [ -f "$out" ]; then
    echo "$out"
    exit 0
fi
tmp=$(mktemp -d "$FV_CACHE/initramfs/.bench.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
root="$tmp/root"
for f in "${bundle[@]}"; do
    mkdir -p "$root$(dirname "$f")"
    cp -L "$f" "$root$f"
done
# Debian's loader path for x86_64 binaries, whatever ldd printed.
if [ ! -e "$root/lib64/ld-linux-x86-64.so.2" ]; then
    mkdir -p "$root/lib64"
    cp -L /lib64/ld-linux-x86-64.so.2 "$root/lib64/"
fi
find "$root" -exec touch -h -d @0 {} +
(cd "$root" && find . -mindepth 1 | LC_ALL=C sort | cpio -o -H newc --quiet) | gzip -9 -n > "$tmp/bundle.cpio.gz"
cat "$base" "$tmp/bundle.cpio.gz" > "$tmp/bench.cpio.gz"
mv "$tmp/bench.cpio.gz" "$out"
fv_log "bench initramfs $(du -h "$out" | cut -f1) at $out (${#bundle[@]} files over the base)"
echo "$out"
