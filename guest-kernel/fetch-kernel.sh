#!/usr/bin/env bash
# Fetch a stock Debian 12 x86_64 kernel for FragVisor guests WITHOUT installing
# it on the host: `apt-get download` the package into the cache, extract it with
# `dpkg-deb -x`, check its config for what the guest needs, and print the path
# of vmlinuz as the LAST line of stdout. Beside vmlinuz: config, System.map,
# VERSION and modules/ (the package's lib/modules/<version> tree: the KVM and
# virtio modules that host images and system images load).
#
# Env:
#   FV_GUEST_KERNEL_FLAVOUR  cloud-amd64 (default) or amd64 — the Debian flavour;
#                            resolved through the meta package linux-image-<flavour>
#   FV_GUEST_KERNEL_PKG      exact package name (e.g. linux-image-6.1.0-56-cloud-amd64);
#                            overrides the flavour lookup
#   FRAGVISOR_CACHE          cache root (see scripts/lib/common.sh)
# Offline: if apt cannot resolve the package, the newest cached kernel is used.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=../scripts/lib/common.sh
. "$here/../scripts/lib/common.sh"

fv_apt_install kmod
flavour=${FV_GUEST_KERNEL_FLAVOUR:-cloud-amd64}
kcache="$FV_CACHE/guest-kernel"
mkdir -p "$kcache"

# Options the guest relies on (q35 + SMP + NUMA via ACPI SRAT + ttyS0 + initramfs).
required_config=(
    CONFIG_SMP CONFIG_NUMA CONFIG_ACPI CONFIG_ACPI_NUMA CONFIG_X86_64_ACPI_NUMA
    CONFIG_SERIAL_8250 CONFIG_SERIAL_8250_CONSOLE CONFIG_BLK_DEV_INITRD CONFIG_RD_GZIP
    CONFIG_DEVTMPFS CONFIG_PROC_FS CONFIG_SYSFS CONFIG_X86_LOCAL_APIC CONFIG_X86_IO_APIC
    CONFIG_X86_TSC CONFIG_HIGH_RES_TIMERS
)

check_config() { # $1 = config file
    local opt missing=()
    for opt in "${required_config[@]}"; do
        grep -q "^${opt}=y" "$1" || missing+=("$opt")
    done
    [ ${#missing[@]} -eq 0 ] || fv_die "kernel config $1 lacks: ${missing[*]}"
}

pkg=${FV_GUEST_KERNEL_PKG:-}
if [ -z "$pkg" ]; then
    pkg=$(apt-cache depends "linux-image-$flavour" 2>/dev/null \
          | awk '/Depends: linux-image-[0-9]/ {print $2; exit}') || true
fi

if [ -z "$pkg" ]; then
    # Offline fallback: newest cached kernel of this flavour.
    cached=$(ls -1d "$kcache"/linux-image-*-"$flavour"_* 2>/dev/null | sort -V | tail -n1 || true)
    [ -n "$cached" ] && [ -f "$cached/vmlinuz" ] \
        || fv_die "cannot resolve linux-image-$flavour with apt-cache and nothing cached in $kcache"
    fv_log "apt could not resolve the kernel; using cached $cached"
    echo "$cached/vmlinuz"
    exit 0
fi

ver=$(apt-cache policy "$pkg" 2>/dev/null | awk '/Candidate:/ {print $2; exit}')
{ [ -n "$ver" ] && [ "$ver" != "(none)" ]; } || fv_die "package $pkg has no install candidate"
dest="$kcache/${pkg}_${ver}"

if [ ! -f "$dest/vmlinuz" ] || [ ! -f "$dest/modules/modules.dep" ]; then
    fv_log "downloading $pkg $ver"
    tmp=$(mktemp -d "$kcache/.dl.XXXXXX")
    trap 'rm -rf "$tmp"' EXIT
    sandbox=()
    # The cache usually lives under root's home, which apt's _apt user cannot write.
    [ "$(id -u)" -eq 0 ] && sandbox=(-o APT::Sandbox::User=root)
    (cd "$tmp" && apt-get download -qq "${sandbox[@]}" "$pkg=$ver" >&2) || fv_die "apt-get download $pkg=$ver failed"
    deb=$(ls "$tmp"/*.deb)
    mkdir -p "$tmp/x"
    dpkg-deb -x "$deb" "$tmp/x"
    kver=${pkg#linux-image-}
    mkdir -p "$tmp/out"
    cp "$tmp/x/boot/vmlinuz-$kver" "$tmp/out/vmlinuz"
    cp "$tmp/x/boot/config-$kver" "$tmp/out/config"
    cp "$tmp/x/boot/System.map-$kver" "$tmp/out/System.map" 2>/dev/null || true
    # The package ships no modules.dep: depmod makes it at install time.
    depmod -b "$tmp/x" "$kver" || fv_die "depmod failed for $kver"
    mv "$tmp/x/lib/modules/$kver" "$tmp/out/modules"
    printf '%s\n' "$pkg" "$ver" "$kver" > "$tmp/out/VERSION"
    check_config "$tmp/out/config"
    rm -rf "$dest"
    mv "$tmp/out" "$dest"
    fv_log "kernel cached in $dest"
fi
check_config "$dest/config"
echo "$dest/vmlinuz"
