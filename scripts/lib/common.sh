# Shared helpers for FragVisor scripts. Source it: . "$(dirname "$0")/lib/common.sh"
# shellcheck shell=bash

FV_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
FV_CACHE=${FRAGVISOR_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/fragvisor}
export FV_ROOT FV_CACHE

fv_log() { printf '[fragvisor] %s\n' "$*" >&2; }
fv_die() { printf '[fragvisor] error: %s\n' "$*" >&2; exit 1; }

# Install Debian packages that are missing; runs `apt-get update` at most once per run.
fv_apt_install() {
    local missing=() p
    for p in "$@"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    local sudo=""
    [ "$(id -u)" -ne 0 ] && sudo="sudo"
    if [ -z "${FV_APT_UPDATED:-}" ]; then
        fv_log "apt-get update"
        $sudo apt-get update -qq >&2 || fv_die "apt-get update failed"
        export FV_APT_UPDATED=1
    fi
    fv_log "installing: ${missing[*]}"
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2 \
        || fv_die "apt-get install ${missing[*]} failed"
}

# Make sure cargo is on PATH (rustup installs into ~/.cargo/bin).
fv_need_cargo() {
    if ! command -v cargo >/dev/null 2>&1 && [ -x "$HOME/.cargo/bin/cargo" ]; then
        export PATH="$HOME/.cargo/bin:$PATH"
    fi
    command -v cargo >/dev/null 2>&1 || fv_die "cargo not found: install a Rust toolchain (rustup) first"
}

# fv_apt_install, retried while another apt/dpkg run holds the lock.
fv_apt_install_retry() {
    local i
    for i in 1 2 3 4 5 6 7 8 9 10 11 12; do
        (fv_apt_install "$@") && return 0
        fv_log "apt-get failed (dpkg lock busy?); retry $i in 10 s"
        sleep 10
    done
    fv_die "could not install: $*"
}

# Print the sha256 of stdin.
fv_sha256() { sha256sum | cut -d' ' -f1; }

# Print the modules (paths relative to MODDIR) that loading the named modules
# needs, dependencies first, each once: fv_module_closure MODDIR NAME...
# Names as modprobe takes them (dashes and underscores alike).
fv_module_closure() {
    local moddir=$1
    shift
    awk -v want="$*" '
        function norm(s) { gsub(/-/, "_", s); return s }
        function base(p,   b) { b = p; sub(/.*\//, "", b); sub(/\.ko(\.[a-z]+)?$/, "", b); return norm(b) }
        function visit(p,   n, i, d) {
            if (p in seen) return
            seen[p] = 1
            n = split(deps[p], d, " ")
            # modules.dep lists the full closure, nearest first: load in reverse.
            for (i = n; i >= 1; i--) visit(d[i])
            print p
        }
        {
            p = $1; sub(/:$/, "", p)
            deps[p] = ""
            for (i = 2; i <= NF; i++) deps[p] = deps[p] " " $i
            byname[base(p)] = p
        }
        END {
            n = split(want, w, " ")
            for (i = 1; i <= n; i++) {
                k = norm(w[i])
                if (!(k in byname)) { print "missing module " w[i] > "/dev/stderr"; exit 1 }
                visit(byname[k])
            }
        }' "$moddir/modules.dep"
}

# Put the static busybox and its applets (as links) into the initramfs tree
# ROOT, with a root entry in /etc/passwd: fv_busybox_root ROOT
fv_busybox_root() {
    local root=$1 a
    file -L /bin/busybox 2>/dev/null | grep -q 'dynamically linked' && fv_die "/bin/busybox is not static"
    mkdir -p "$root/bin" "$root/etc"
    cp /bin/busybox "$root/bin/busybox"
    for a in $(/bin/busybox --list); do
        [ "$a" = busybox ] || ln -s busybox "$root/bin/$a"
    done
    echo 'root:x:0:0:root:/root:/bin/sh' > "$root/etc/passwd"
}

# fv_bench_setup INITRD_VAR INITRD_SCRIPT LOGS_DIR NAME: what a guest
# benchmark needs, built or fetched unless given by FRAGVISOR_QEMU,
# FRAGVISOR_GUEST_KERNEL and the variable named INITRD_VAR. Sets QEMU,
# KERNEL, INITRD, LAUNCHER, and WORK (LOGS_DIR when set, else a temporary
# directory removed at exit).
fv_bench_setup() {
    local initrd_var=$1 initrd_script=$2 logs=$3 name=$4
    QEMU=${FRAGVISOR_QEMU:-$("$FV_ROOT/scripts/build-qemu.sh" | tail -n1)}
    KERNEL=${FRAGVISOR_GUEST_KERNEL:-$("$FV_ROOT/guest-kernel/fetch-kernel.sh" | tail -n1)}
    INITRD=${!initrd_var:-$("$FV_ROOT/$initrd_script" | tail -n1)}
    [ -x "$QEMU" ] || fv_die "no patched QEMU at '$QEMU'"
    [ -f "$KERNEL" ] || fv_die "no guest kernel at '$KERNEL'"
    [ -f "$INITRD" ] || fv_die "no initramfs at '$INITRD'"
    cargo build --release -p qemu-accel --bin fragvisor >&2
    LAUNCHER=${CARGO_TARGET_DIR:-$FV_ROOT/target}/release/fragvisor
    if [ -n "$logs" ]; then
        mkdir -p "$logs"; WORK=$(cd "$logs" && pwd)
    else
        WORK=$(mktemp -d "${TMPDIR:-/tmp}/fv-$name.XXXXXX")
        # shellcheck disable=SC2064 # expand WORK now
        trap "rm -rf '$WORK'" EXIT
    fi
}

# fv_stamp: copy stdin to stdout, each line prefixed with the wall clock
# ($EPOCHREALTIME, bash >= 5) at its arrival and stripped of a trailing CR.
fv_stamp() {
    local line
    while IFS= read -r line || [ -n "$line" ]; do
        printf '%s %s\n' "$EPOCHREALTIME" "${line%$'\r'}"
    done
}
