#!/usr/bin/env bash
# Check that every prefix of the QEMU patch series builds: in one scratch
# tree, apply qemu-patches/0001, build qemu-system-x86_64, apply 0002,
# build again (incrementally), and so on. Reports one line per patch.
#
# It reuses what scripts/build-qemu.sh leaves in $FV_CACHE/qemu (the python
# venv and the verified tarball), so run that once first, and configures
# with the flags build-qemu.sh prints with --configure-flags:
#   - configure runs once, right after 0001 is applied (the pristine tree
#     does not configure on a machine with bzip2; 0001 fixes that);
#   - the fragvisor_ffi/fragvisor_ffi_include paths are set (meson
#     configure, in the same build directory) after the patch that adds
#     those options, as build-qemu.sh passes them to configure.
# The Rust library and its header are this checkout's (cargo build
# --release -p fragvisor-ffi); a prefix may use fewer of its functions but
# must declare every one it calls, so an implicit declaration fails a step.
#
# Per patch: whether it applies (patch -p1 --forward, as build-qemu.sh does;
# an offset or fuzz is reported), whether it removes a line that an earlier
# patch added (the series must only build on itself, not rewrite itself),
# the ninja result and time, the compiler warnings of the step, and the
# accelerators the binary lists.
#
# Usage: scripts/qemu/check-series.sh [LAST]   check patches 1..LAST (default: all)
# Env:
#   FV_JOBS          ninja jobs (default: nproc)
#   FV_CHECK_TREE    scratch directory (default $FV_CACHE/qemu/check-series);
#                    emptied at the start, kept afterwards for inspection
# The last line of stdout says how many prefixes built. Exit status 0 only
# if every checked patch applied, rewrote nothing of an earlier patch and
# built without an error or an implicit function declaration.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=../lib/common.sh
. "$here/../lib/common.sh"

QEMU_VERSION=10.0.2
jobs=${FV_JOBS:-$(nproc)}
qcache="$FV_CACHE/qemu"
venv="$qcache/venv"
scratch=${FV_CHECK_TREE:-$qcache/check-series}

"$venv/bin/python3" -c 'import pycotap, mesonbuild' 2>/dev/null \
    || fv_die "no python venv in $venv: run scripts/build-qemu.sh once first"
tarball=$("$here/fetch-source.sh" | tail -n1)
[ -f "$tarball" ] || fv_die "fetch-source.sh gave no tarball"
mapfile -t flags < <("$FV_ROOT/scripts/build-qemu.sh" --configure-flags)
[ ${#flags[@]} -gt 0 ] || fv_die "build-qemu.sh --configure-flags printed nothing"

mapfile -t patches < <(find "$FV_ROOT/qemu-patches" -maxdepth 1 -name '[0-9][0-9][0-9][0-9]-*.patch' | LC_ALL=C sort)
[ ${#patches[@]} -gt 0 ] || fv_die "no patches in $FV_ROOT/qemu-patches"
last=${1:-${#patches[@]}}
[ "$last" -ge 1 ] && [ "$last" -le ${#patches[@]} ] || fv_die "LAST must be 1..${#patches[@]}"

fv_log "building the Rust library (cargo build --release -p fragvisor-ffi)"
(cd "$FV_ROOT" && cargo build --release -p fragvisor-ffi >&2) || fv_die "cargo build -p fragvisor-ffi failed"
target_dir=${CARGO_TARGET_DIR:-$FV_ROOT/target}
case "$target_dir" in /*) ;; *) target_dir="$FV_ROOT/$target_dir" ;; esac
[ -f "$target_dir/release/libfragvisor_ffi.a" ] || fv_die "no libfragvisor_ffi.a after cargo build"

# Lines that a patch removes although an earlier patch of the series added
# them (same file, same text; blank lines and lone braces are not counted):
# "NAME COUNT" for every patch.
rewrites() {
    awk '
        FNR == 1 {
            if (NR > 1) flush()
            in_diff = 0; n = 0; hits = 0
            name = FILENAME; sub(".*/", "", name); sub("\\.patch$", "", name)
        }
        /^diff --git / { in_diff = 1; next }
        !in_diff { next }
        /^\+\+\+ / { file = substr($0, 7); next }
        /^--- / || /^-- $/ { next }
        /^[+-]/ {
            text = substr($0, 2)
            if (text ~ /^[[:space:]{}();]*$/) next
            if (substr($0, 1, 1) == "+") { mine[n++] = file SUBSEP text }
            else if ((file SUBSEP text) in added) hits++
        }
        function flush(  i) {
            printf "%s %d\n", name, hits
            for (i = 0; i < n; i++) added[mine[i]] = 1
        }
        END { if (NR > 0) flush() }
    ' "$@"
}
declare -A rewritten
while read -r name count; do
    rewritten[$name]=$count
done < <(rewrites "${patches[@]:0:$last}")

rm -rf "$scratch"
mkdir -p "$scratch/ffi/include" "$scratch/logs"
cp "$target_dir/release/libfragvisor_ffi.a" "$scratch/ffi/"
cp "$FV_ROOT/ffi/include/fragvisor_ffi.h" "$scratch/ffi/include/"
fv_log "unpacking $(basename "$tarball") into $scratch"
tar -C "$scratch" --no-same-owner -xJf "$tarball"
src="$scratch/qemu-$QEMU_VERSION"
bld="$src/build"
[ -d "$src" ] || fv_die "tarball did not unpack to qemu-$QEMU_VERSION"

configured=false
ffi_set=false
built=0
failed=""
results=()

for ((i = 0; i < last; i++)); do
    p=${patches[$i]}
    name=$(basename "$p" .patch)
    log="$scratch/logs/$name.log"
    note=""

    if ! out=$(patch -d "$src" -p1 --forward < "$p" 2>&1); then
        printf '%s\n' "$out" > "$log"
        results+=("FAIL  $name: does not apply (log: $log)")
        failed=$name
        break
    fi
    printf '%s\n' "$out" > "$log"
    if grep -qE 'offset|fuzz' <<<"$out"; then
        note+=", applied with offset/fuzz"
    fi
    if [ "${rewritten[$name]:-0}" -gt 0 ]; then
        results+=("FAIL  $name: removes ${rewritten[$name]} line(s) that an earlier patch added")
        failed=$name
        break
    fi

    if ! $configured; then
        fv_log "$name: configuring (log: $scratch/configure.log)"
        mkdir -p "$bld"
        (cd "$bld" && ../configure --python="$venv/bin/python3" "${flags[@]}" \
            > "$scratch/configure.log" 2>&1) \
            || { tail -n 20 "$scratch/configure.log" >&2; fv_die "configure failed after $name"; }
        configured=true
        note+=", configured"
    fi
    if ! $ffi_set && grep -q "option('fragvisor_ffi'" "$src/meson_options.txt"; then
        "$bld/pyvenv/bin/meson" configure "$bld" \
            "-Dfragvisor_ffi=$scratch/ffi/libfragvisor_ffi.a" \
            "-Dfragvisor_ffi_include=$scratch/ffi/include" >> "$log" 2>&1 \
            || fv_die "meson configure -Dfragvisor_ffi failed after $name (log: $log)"
        ffi_set=true
        note+=", fragvisor_ffi set"
    fi

    fv_log "$name: ninja -j$jobs qemu-system-x86_64"
    t0=$(date +%s)
    if ninja -C "$bld" -j "$jobs" qemu-system-x86_64 >> "$log" 2>&1; then
        rc=0
    else
        rc=$?
    fi
    secs=$(($(date +%s) - t0))
    warnings=$(grep -c 'warning:' "$log" || true)
    if grep -q 'implicit declaration of function\|implicit-function-declaration' "$log"; then
        results+=("FAIL  $name: calls an undeclared function (log: $log)")
        failed=$name
        break
    fi
    if [ "$rc" -ne 0 ]; then
        grep -E 'error|FAILED' "$log" | head -n 10 >&2 || true
        results+=("FAIL  $name: ninja failed after ${secs} s (log: $log)")
        failed=$name
        break
    fi
    accels=$("$bld/qemu-system-x86_64" -accel help 2>/dev/null | tail -n +2 | tr '\n' ' ')
    results+=("ok    $name: built in ${secs} s, $warnings warning(s)$note; -accel help: ${accels% }")
    built=$((built + 1))
    printf '%s\n' "${results[-1]}" >&2
done

echo "patch series check in $src ($jobs jobs):"
printf '  %s\n' "${results[@]}"
if [ -n "$failed" ]; then
    echo "$built of $last prefixes built; stopped at $failed"
    exit 1
fi
echo "$built of $last prefixes built"
