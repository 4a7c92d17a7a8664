#!/usr/bin/env bash
# Fetch QEMU's upstream tarball from Debian's source package and verify it.
#
# The machine's apt configuration is not changed: a deb-src entry is derived
# at run time from the machine's own Debian source (same URI and keyring,
# suite <codename>-backports), written into a private Dir::Etc::SourceParts,
# and used with private lists and cache directories under $FV_CACHE.
#
# Prints the path of the verified qemu_<version>+ds.orig.tar.xz as the LAST
# line of stdout.
#
# Env:
#   FRAGVISOR_QEMU_TARBALL  use this local tarball instead (still verified)
#   FRAGVISOR_CACHE         cache root (see scripts/lib/common.sh)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=../lib/common.sh
. "$here/../lib/common.sh"

QEMU_VERSION=10.0.2
QEMU_ORIG="qemu_${QEMU_VERSION}+ds.orig.tar.xz"
QEMU_ORIG_SHA256=0901da33844a331bf8b3602b9c1fbd178e60b737c8e3ade678255bd090c9b9f1
SOURCE_SUITE_SUFFIX=-backports

src_dir="$FV_CACHE/qemu/src"
tarball="$src_dir/$QEMU_ORIG"

verified() { # verified FILE
    [ -f "$1" ] && [ "$(fv_sha256 < "$1")" = "$QEMU_ORIG_SHA256" ]
}

if [ -n "${FRAGVISOR_QEMU_TARBALL:-}" ]; then
    verified "$FRAGVISOR_QEMU_TARBALL" \
        || fv_die "FRAGVISOR_QEMU_TARBALL=$FRAGVISOR_QEMU_TARBALL does not have sha256 $QEMU_ORIG_SHA256"
    echo "$FRAGVISOR_QEMU_TARBALL"
    exit 0
fi
if verified "$tarball"; then
    echo "$tarball"
    exit 0
fi

# The Debian release this machine runs, e.g. bookworm.
codename=$(. /etc/os-release 2>/dev/null && echo "${VERSION_CODENAME:-}")
[ -n "$codename" ] || codename=bookworm

# Find "URI<TAB>keyring" of the machine's Debian archive entry for $codename,
# in deb822 (*.sources) or one-line (*.list) format.
debian_archive() {
    local f
    for f in /etc/apt/sources.list.d/*.sources; do
        [ -f "$f" ] || continue
        awk -v want="$codename" '
            function flush() {
                if (deb && suite && uri != "") { print uri "\t" key; found = 1; exit }
                deb = 0; suite = 0; uri = ""; key = ""
            }
            /^[[:space:]]*$/ { flush(); next }
            /^Types:/   { for (i = 2; i <= NF; i++) if ($i == "deb") deb = 1 }
            /^Suites:/  { for (i = 2; i <= NF; i++) if ($i == want) suite = 1 }
            /^URIs:/    { uri = $2 }
            /^Signed-By:/ { key = $2 }
            END { if (!found) flush() }
        ' "$f"
    done
    for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
        [ -f "$f" ] || continue
        awk -v want="$codename" '
            $1 == "deb" {
                i = 2
                if ($i ~ /^\[/) { while ($i !~ /\]$/) i++; i++ }
                if ($(i + 1) == want) { print $i "\t"; exit }
            }
        ' "$f"
    done
}

archive=$(debian_archive | head -n1)
[ -n "$archive" ] || fv_die "no Debian '$codename' archive found in /etc/apt sources; set FRAGVISOR_QEMU_TARBALL to a local $QEMU_ORIG"
uri=${archive%%$'\t'*}
keyring=${archive#*$'\t'}
[ -n "$keyring" ] || keyring=/usr/share/keyrings/debian-archive-keyring.gpg
suite="$codename$SOURCE_SUITE_SUFFIX"

fv_apt_install_retry dpkg-dev xz-utils

apt_dir="$FV_CACHE/qemu/apt"
rm -rf "$apt_dir"
mkdir -p "$apt_dir/sources.list.d" "$apt_dir/lists/partial" "$apt_dir/cache/archives/partial" "$src_dir"
cat > "$apt_dir/sources.list.d/fragvisor-qemu-src.sources" <<EOF
Types: deb-src
URIs: $uri
Suites: $suite
Components: main
Signed-By: $keyring
EOF
apt_opts=(
    -o "Dir::Etc::SourceList=/dev/null"
    -o "Dir::Etc::SourceParts=$apt_dir/sources.list.d"
    -o "Dir::State::Lists=$apt_dir/lists"
    -o "Dir::Cache=$apt_dir/cache"
    -o "APT::Sandbox::User=root"
)

fv_log "fetching the qemu source index for $suite (private apt state in $apt_dir)"
apt-get "${apt_opts[@]}" -qq update >&2 || fv_die "apt-get update of the deb-src index failed"
version=$(apt-cache "${apt_opts[@]}" showsrc qemu 2>/dev/null \
    | awk '/^Version: /{print $2}' | grep -E "^([0-9]+:)?${QEMU_VERSION//./\\.}\+ds-" | sort -V | tail -n1 || true)
[ -n "$version" ] || fv_die "no qemu ${QEMU_VERSION}+ds source package in $suite"

dl=$(mktemp -d "$src_dir/.dl.XXXXXX")
trap 'rm -rf "$dl"' EXIT
fv_log "downloading qemu $version (orig tarball only)"
(cd "$dl" && apt-get "${apt_opts[@]}" -qq source --download-only --tar-only "qemu=$version" >&2) \
    || fv_die "apt-get source qemu=$version failed"
verified "$dl/$QEMU_ORIG" || fv_die "$QEMU_ORIG: sha256 mismatch (want $QEMU_ORIG_SHA256)"
mv "$dl/$QEMU_ORIG" "$tarball"
rm -rf "$apt_dir"
fv_log "verified $tarball"
echo "$tarball"
