#!/usr/bin/env bash
# shellcheck disable=SC2054 # commas inside QEMU option values, not array separators
# Self-check for guest-kernel/: builds the tiny test kernel, fetches the Debian
# kernel, builds the initramfs, boots each under a QEMU binary and checks markers.
#
#   guest-kernel/selftest.sh [QEMU_BINARY]
#
# Env:
#   FRAGVISOR_QEMU          QEMU binary (default: the argument, else qemu-system-x86_64 on PATH)
#   FRAGVISOR_QEMU_ARGS     extra QEMU args for every boot (e.g. "-L /usr/share/seabios -L /usr/share/qemu")
#   FV_SELFTEST_ACCEL       accelerator for the TCG boots   (default tcg,thread=multi;
#                           e.g. fragvisor-tcg,nodes=1 with the patched QEMU)
#   FV_SELFTEST_KVM         auto (default: if /dev/kvm is usable) | 1 | 0 — boot fvtest under KVM too
#   FV_SELFTEST_KVM_ACCEL   accelerator for that boot (default kvm; e.g. fragvisor,nodes=1)
#   FV_SELFTEST_ONLY        testkernel | linux — run one half only
#   FV_SELFTEST_TIMEOUT     per-boot timeout in seconds (default 240)
#   FV_SELFTEST_LOGS        keep logs here (default: a temp dir, removed on success)
# Exit status: 0 when every check passed, 1 otherwise.
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=../scripts/lib/common.sh
. "$here/../scripts/lib/common.sh"

qemu=${1:-${FRAGVISOR_QEMU:-qemu-system-x86_64}}
if ! command -v "$qemu" >/dev/null 2>&1; then
    [ "$qemu" = qemu-system-x86_64 ] && fv_apt_install qemu-system-x86
    command -v "$qemu" >/dev/null 2>&1 || fv_die "QEMU binary not found: $qemu"
fi
read -r -a extra <<< "${FRAGVISOR_QEMU_ARGS:-}"
accel=${FV_SELFTEST_ACCEL:-tcg,thread=multi}
kvm_mode=${FV_SELFTEST_KVM:-auto}
kvm_accel=${FV_SELFTEST_KVM_ACCEL:-kvm}
only=${FV_SELFTEST_ONLY:-}
tmo=${FV_SELFTEST_TIMEOUT:-240}
logs=${FV_SELFTEST_LOGS:-$(mktemp -d /tmp/fv-guest-selftest.XXXXXX)}
mkdir -p "$logs"

failures=0
passes=0
say() { printf 'selftest: %s\n' "$*"; }

# boot NAME EXPECTED_RC QEMU-ARGS... ; leaves the log in $logs/NAME.log
boot() {
    local name=$1 want=$2 log="$logs/$1.log" t0 t1 rc
    shift 2
    t0=$(date +%s.%N)
    # -nodefaults: no default NIC (its option ROM may be missing from a
    # --disable-install-blobs build), no CD-ROM (SeaBIOS's AHCI probe of it
    # can stall ~30 s), no VGA; -serial stdio is the only console.
    timeout -k 10 "$tmo" "$qemu" -nodefaults -display none -serial stdio -monitor none "${extra[@]}" "$@" \
        < /dev/null > "$log" 2>&1
    rc=$?
    t1=$(date +%s.%N)
    last_secs=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.1f", b - a }')
    if [ "$rc" -ne "$want" ]; then
        [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ] && say "$name: timed out after ${tmo}s"
        fail "$name" "qemu exit status $rc, expected $want (log: $log)"
        return 1
    fi
    return 0
}
fail() { failures=$((failures + 1)); say "FAIL $1: $2"; }
ok() { passes=$((passes + 1)); say "ok   $1 (${last_secs}s)"; }
# need NAME REGEX [COUNT] — the log must contain REGEX (at least COUNT times)
need() {
    local n
    n=$(tr -d '\r' < "$logs/$1.log" | grep -a -c -E "$2")
    if [ "$n" -lt "${3:-1}" ]; then
        fail "$1" "marker /$2/ seen $n time(s), want ${3:-1} (log: $logs/$1.log)"
        return 1
    fi
}

debug_exit=(-device isa-debug-exit,iobase=0xf4,iosize=0x04)

# ---------------- tiny test kernel ----------------
if [ -z "$only" ] || [ "$only" = testkernel ]; then
    fv_apt_install gcc binutils make libc6-dev
    make -s -C "$here" O="$logs/build" >/dev/null || fv_die "fvtest build failed"
    fvtest="$logs/build/fvtest.elf"
    for smp in 1 2 4; do
        name="fvtest-smp$smp"
        if boot "$name" 33 -machine q35 -accel "$accel" -smp "$smp" -m 128 -kernel "$fvtest" "${debug_exit[@]}"; then
            r=0
            need "$name" '^FVTEST: PASS' || r=1
            for ((c = 1; c < smp; c++)); do
                need "$name" "^FVTEST: cpu $c online" || r=1
                need "$name" "^FVTEST: ipi bsp->$c ok" || r=1
                need "$name" "^FVTEST: ipi $c->bsp ok" || r=1
            done
            for ((c = 1; c < smp; c++)); do
                need "$name" "^FVTEST: ipi logical bsp->$c ok" || r=1
                need "$name" "^FVTEST: ipi lowest bsp->$c ok" || r=1
                need "$name" "^FVTEST: nmi bsp->$c ok" || r=1
            done
            [ "$smp" -gt 1 ] && { need "$name" "^FVTEST: ipi broadcast bsp->all ok cpus=$((smp - 1))" || r=1; }
            need "$name" "^FVTEST: counter=$((smp * 20000)) expected=$((smp * 20000))" || r=1
            [ $r -eq 0 ] && ok "$name"
        fi
    done
    # Without isa-debug-exit the kernel powers off through ACPI: exit 0.
    name="fvtest-acpi-off"
    if boot "$name" 0 -machine q35 -accel "$accel" -smp 2 -m 128 -kernel "$fvtest" -append "iters=1000"; then
        need "$name" '^FVTEST: PASS' && ok "$name"
    fi
    # FAIL path: too little RAM for the test regions -> FAIL marker, exit 35.
    name="fvtest-fail-path"
    if boot "$name" 35 -machine q35 -accel "$accel" -smp 4 -m 16 -kernel "$fvtest" "${debug_exit[@]}"; then
        need "$name" '^FVTEST: FAIL ' && ok "$name"
    fi
    if [ "$kvm_mode" = 1 ] || { [ "$kvm_mode" = auto ] && [ -r /dev/kvm ] && [ -w /dev/kvm ]; }; then
        name="fvtest-kvm-smp2"
        if boot "$name" 33 -machine q35 -accel "$kvm_accel" -smp 2 -m 128 -kernel "$fvtest" "${debug_exit[@]}"; then
            need "$name" '^FVTEST: PASS' && need "$name" '^FVTEST: ipi 1->bsp ok' && ok "$name"
        fi
    else
        say "skip fvtest-kvm-smp2 (FV_SELFTEST_KVM=$kvm_mode, /dev/kvm not usable or disabled)"
    fi
fi

# ---------------- Debian kernel + initramfs ----------------
if [ -z "$only" ] || [ "$only" = linux ]; then
    vmlinuz=$("$here/fetch-kernel.sh" | tail -n1) || fv_die "fetch-kernel.sh failed"
    initrd=$("$here/build-initramfs.sh" | tail -n1) || fv_die "build-initramfs.sh failed"
    say "kernel $vmlinuz"
    say "initramfs $initrd"
    append='console=ttyS0 clocksource=tsc tsc=reliable panic=-1'
    linux=(-machine q35 -accel "$accel" -m 512 -kernel "$vmlinuz" -initrd "$initrd")

    name="linux-idle-smp2"
    if boot "$name" 0 "${linux[@]}" -smp 2 -no-reboot -append "$append fv.workload=idle"; then
        need "$name" '^FV: cpus online=0-1 count=2' && need "$name" '^FV: clocksource=tsc' \
            && need "$name" '^FV: RESULT PASS' && ok "$name"
    fi

    name="linux-all-smp4-numa2"
    numa=(-object memory-backend-ram,id=m0,size=256M -object memory-backend-ram,id=m1,size=256M
          -numa node,nodeid=0,cpus=0-1,memdev=m0 -numa node,nodeid=1,cpus=2-3,memdev=m1)
    if boot "$name" 0 "${linux[@]}" -smp 4 "${numa[@]}" -no-reboot \
        -append "$append fv.workload=all fv.iters=100000"; then
        r=0
        need "$name" '^FV: cpus online=0-3 count=4' || r=1
        need "$name" '^FV: node 0 cpus=0-1 ' || r=1
        need "$name" '^FV: node 1 cpus=2-3 ' || r=1
        for c in 0 1 2 3; do
            need "$name" "^FV: cpu $c node $((c / 2))\$" || r=1
            need "$name" "^FV: percpu cpu=$c result=(0x[0-9a-f]+) expected=\\1 ok" || r=1
        done
        need "$name" '^FV: counter threads=4 .* final=400000 expected=400000 ok' || r=1
        need "$name" '^FV: tscskew max_bound=[0-9]+ cycles' || r=1
        need "$name" '^FV: RESULT PASS workload=all' || r=1
        [ $r -eq 0 ] && ok "$name"
        grep -a '^FV: tscskew max_bound' "$logs/$name.log" | sed 's/^/selftest:      /'
    fi

    # Reboot: no -no-reboot; the guest reboots once (CMOS marker) and powers off.
    name="linux-reboot-smp2"
    if boot "$name" 0 "${linux[@]}" -smp 2 -append "$append fv.workload=reboot"; then
        need "$name" '^FV: boot ' 2 && need "$name" '^FV: reboot-test done boots=2' \
            && need "$name" '^FV: RESULT PASS workload=reboot' && ok "$name"
    fi
fi

say "$passes passed, $failures failed (qemu: $qemu, accel: $accel, logs: $logs)"
if [ "$failures" -eq 0 ] && [ -z "${FV_SELFTEST_LOGS:-}" ]; then
    rm -rf "$logs"
fi
[ "$failures" -eq 0 ]
