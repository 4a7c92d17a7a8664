#!/usr/bin/env bash
# Fetch, patch and build FragVisor's QEMU (qemu-system-x86_64 with the
# fragvisor and fragvisor-tcg accelerators). See docs/qemu.md.
#
# Steps, each cached under $FV_CACHE/qemu (outside the checkout):
#   1. build dependencies: Debian packages, and meson + pycotap from PyPI in a
#      private venv;
#   2. QEMU 10.0.2 from Debian's source package (scripts/qemu/fetch-source.sh);
#   3. a build tree per patch series: the tarball unpacked, qemu-patches/*.patch
#      applied, configured; keyed by a hash of the tarball, the patches and the
#      configure flags;
#   4. the Rust library (cargo build --release -p fragvisor-ffi) copied into the
#      build tree and linked in through the fragvisor_ffi meson option;
#   5. the binary copied to bin/<series key>-<library key>/, so a finished build
#      for the same patches and library is reused without running ninja.
#
# The LAST line of stdout is the absolute path of qemu-system-x86_64; all
# progress goes to stderr, the compiler output to <build tree>/build.log.
#
# With --configure-flags it only prints the configure flags, one a line.
#
# Env:
#   FRAGVISOR_CACHE   cache root (default ~/.cache/fragvisor)
#   CARGO_TARGET_DIR  honoured for the Rust library (default <repo>/target)
#   FV_JOBS           parallel compile jobs (default: nproc)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=lib/common.sh
. "$here/lib/common.sh"

# Bump when a change to this script must invalidate existing build trees.
RECIPE=1
QEMU_VERSION=10.0.2
FIRMWARE_PATH=/usr/share/qemu:/usr/share/seabios
jobs=${FV_JOBS:-$(nproc)}

# The flags of every configure run (the fragvisor_ffi paths are added when
# the build tree is configured). scripts/qemu/check-series.sh reads them
# with --configure-flags, so that both build the same configuration.
configure_flags=(
    --target-list=x86_64-softmmu
    --without-default-features
    --enable-kvm --enable-tcg --enable-slirp
    --disable-docs --disable-werror --disable-rust
    --disable-install-blobs --disable-download
    "--firmwarepath=$FIRMWARE_PATH"
)
if [ "${1:-}" = --configure-flags ]; then
    printf '%s\n' "${configure_flags[@]}"
    exit 0
fi

qcache="$FV_CACHE/qemu"
mkdir -p "$qcache"

# One build at a time per cache (tests may call this script concurrently).
exec 9>"$qcache/.lock"
if ! flock -n 9; then
    fv_log "waiting for another QEMU build in $qcache"
    flock 9
fi

t0=$(date +%s)

# --- 1. build dependencies ---------------------------------------------------
fv_apt_install_retry gcc make ninja-build pkg-config libglib2.0-dev libpixman-1-dev \
    zlib1g-dev flex bison python3-venv xz-utils patch libslirp-dev \
    seabios qemu-system-data
fv_need_cargo

venv="$qcache/venv"
if ! "$venv/bin/python3" -c 'import pycotap, mesonbuild' 2>/dev/null; then
    fv_log "creating the python venv $venv (meson>=1.5, pycotap)"
    rm -rf "$venv"
    python3 -m venv "$venv" >&2
    "$venv/bin/pip" install -q --disable-pip-version-check 'meson>=1.5' 'pycotap>=1.1' >&2 \
        || fv_die "pip install meson pycotap failed"
fi

# --- 2. source ---------------------------------------------------------------
tarball=$("$here/qemu/fetch-source.sh" | tail -n1)
[ -f "$tarball" ] || fv_die "fetch-source.sh gave no tarball"

# --- 3. build tree, keyed by the patch series --------------------------------
mapfile -t patches < <(find "$FV_ROOT/qemu-patches" -maxdepth 1 -name '[0-9][0-9][0-9][0-9]-*.patch' | LC_ALL=C sort)
[ ${#patches[@]} -gt 0 ] || fv_die "no patches in $FV_ROOT/qemu-patches"

series_key=$( {
    echo "recipe $RECIPE qemu $QEMU_VERSION"
    fv_sha256 < "$tarball"
    printf '%s\n' "${configure_flags[@]}"
    for p in "${patches[@]}"; do
        basename "$p"
        fv_sha256 < "$p"
    done
} | fv_sha256 | cut -c1-16)
tree="$qcache/build-$series_key"
src="$tree/qemu-$QEMU_VERSION"
bld="$src/build"

if [ ! -f "$tree/.configured" ]; then
    fv_log "new build tree $tree (patch series $series_key)"
    rm -rf "$tree"
    mkdir -p "$tree/ffi/include"
    tar -C "$tree" --no-same-owner -xJf "$tarball"
    [ -d "$src" ] || fv_die "tarball did not unpack to qemu-$QEMU_VERSION"
    for p in "${patches[@]}"; do
        fv_log "applying $(basename "$p")"
        patch -d "$src" -p1 -s --forward < "$p" >&2 || fv_die "patch $(basename "$p") does not apply"
    done
fi

# --- 4. the Rust library -------------------------------------------------------
fv_log "building the Rust library (cargo build --release -p fragvisor-ffi)"
(cd "$FV_ROOT" && cargo build --release -p fragvisor-ffi >&2) || fv_die "cargo build -p fragvisor-ffi failed"
target_dir=${CARGO_TARGET_DIR:-$FV_ROOT/target}
case "$target_dir" in /*) ;; *) target_dir="$FV_ROOT/$target_dir" ;; esac
lib="$target_dir/release/libfragvisor_ffi.a"
header="$FV_ROOT/ffi/include/fragvisor_ffi.h"
[ -f "$lib" ] || fv_die "no $lib after cargo build"
lib_key=$(cat "$lib" "$header" | fv_sha256 | cut -c1-16)

final_dir="$qcache/bin/$series_key-$lib_key"
final="$final_dir/qemu-system-x86_64"
if [ -x "$final" ]; then
    fv_log "cached: patch series $series_key, library $lib_key"
    echo "$final"
    exit 0
fi

# The build tree links copies, so its configured paths never change. Each is
# replaced only when it differs: a new header recompiles its users, a new
# archive needs a relink, which meson does not track for link_args.
if ! cmp -s "$header" "$tree/ffi/include/fragvisor_ffi.h"; then
    cp "$header" "$tree/ffi/include/fragvisor_ffi.h"
fi
if ! cmp -s "$lib" "$tree/ffi/libfragvisor_ffi.a"; then
    cp "$lib" "$tree/ffi/libfragvisor_ffi.a.tmp"
    mv "$tree/ffi/libfragvisor_ffi.a.tmp" "$tree/ffi/libfragvisor_ffi.a"
    rm -f "$bld/qemu-system-x86_64"
fi

if [ ! -f "$tree/.configured" ]; then
    fv_log "configuring"
    mkdir -p "$bld"
    (cd "$bld" && ../configure --python="$venv/bin/python3" "${configure_flags[@]}" \
        "-Dfragvisor_ffi=$tree/ffi/libfragvisor_ffi.a" \
        "-Dfragvisor_ffi_include=$tree/ffi/include" > "$tree/configure.log" 2>&1) \
        || { tail -n 30 "$tree/configure.log" >&2; fv_die "configure failed (log: $tree/configure.log)"; }
    touch "$tree/.configured"
fi

# --- 5. compile and publish -------------------------------------------------------
fv_log "compiling qemu-system-x86_64 with $jobs jobs (log: $tree/build.log)"
if ! ninja -C "$bld" -j "$jobs" qemu-system-x86_64 > "$tree/build.log" 2>&1; then
    grep -E 'error|FAILED' "$tree/build.log" | head -n 20 >&2 || true
    tail -n 20 "$tree/build.log" >&2
    fv_die "ninja failed (log: $tree/build.log)"
fi

mkdir -p "$final_dir"
cp "$bld/qemu-system-x86_64" "$final.tmp"
mv "$final.tmp" "$final"
"$final" -accel help 2>/dev/null | grep -qx fragvisor || fv_die "$final does not list the fragvisor accelerator"
fv_log "built in $(($(date +%s) - t0)) s: $final"
echo "$final"
