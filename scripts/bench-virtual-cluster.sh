#!/usr/bin/env bash
# Boot benchmark of the virtual cluster (docs/virtual-cluster.md): the tiny
# test kernel (-smp 2 per host) on 1 and 2 host VMs, under the KVM engine
# (fragvisor) and the TCG engine (fragvisor-tcg) inside the host VMs. For
# each it reports the median over FV_BENCH_RUNS runs of the wall time from
# the launch to `FVTEST: PASS` (host VM boot included), the ratio to one host
# VM under the same engine, each node's DSM faults, the host TSC delta node 1
# measured against node 0, and the widest TSC skew interval the guest saw.
# Everything here is emulated end to end: ratios only, not speed.
# The Debian guest is not used: on 2 nodes it stops at AP bring-up under the
# KVM engine (docs/virtual-cluster.md, "Open").
#
# Prints a table, then as its LAST line one JSON object. Needs root.
# Env: FV_BENCH_RUNS (default 3), FV_BENCH_HOSTS (default "1 2"),
#      FV_BENCH_ENGINES (default "fragvisor fragvisor-tcg"), FRAGVISOR_QEMU.
set -euo pipefail
. "$(dirname "$0")/lib/common.sh"
cd "$FV_ROOT"
[ -n "${EPOCHREALTIME:-}" ] || fv_die "needs bash >= 5 (EPOCHREALTIME)"
[ "$(id -u)" -eq 0 ] || fv_die "a virtual cluster needs root"

RUNS=${FV_BENCH_RUNS:-3}
HOSTS_LIST=${FV_BENCH_HOSTS:-"1 2"}
ENGINES=${FV_BENCH_ENGINES:-"fragvisor fragvisor-tcg"}
fv_need_cargo
QEMU=${FRAGVISOR_QEMU:-$(scripts/build-qemu.sh | tail -n1)}
IMAGE=$(FRAGVISOR_QEMU="$QEMU" scripts/virtual-cluster/build-host-image.sh | tail -n1)
cargo build --release -p qemu-accel --bin fragvisor >&2
WORK=$(mktemp -d "${TMPDIR:-/tmp}/fv-bench-vc.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
make -s -C guest-kernel "O=$WORK/tk" >&2
KERNEL=$WORK/tk/fvtest.elf

median() { tr ' ' '\n' | { grep -v '^$' || true; } | sort -g | awk '{ a[NR] = $1 } END { if (NR == 0) print "null"; else print a[int((NR + 1) / 2)] }'; }

json="{\"guest\":\"testkernel\",\"runs\":$RUNS,\"host_cpus\":$(nproc)"
table=()
declare -A base
for engine in $ENGINES; do
    for h in $HOSTS_LIST; do
        times="" faults="" deltas="" skews="" ok=0
        for ((r = 1; r <= RUNS; r++)); do
            out=$WORK/$engine-$h-$r
            t0=$EPOCHREALTIME
            set +e
            ./target/release/fragvisor run --virtual-hosts "$h" --engine "$engine" --smp $((2 * h)) --no-numa \
                --qemu "$QEMU" --host-image "$IMAGE" --kernel "$KERNEL" --timeout 300 \
                -- -device isa-debug-exit,iobase=0xf4,iosize=0x04 </dev/null 2>"$out.err" |
                while IFS= read -r line; do printf '%s %s\n' "$EPOCHREALTIME" "${line//$'\r'/}"; done >"$out.con"
            rc=${PIPESTATUS[0]}
            set -e
            pass=$(awk '$2 == "FVTEST:" && $3 == "PASS" { print $1; exit }' "$out.con")
            if [ "$rc" -eq 33 ] && [ -n "$pass" ]; then
                ok=$((ok + 1))
                times+=" $(awk -v a="$t0" -v b="$pass" 'BEGIN { printf "%.2f", b - a }')"
            else
                fv_log "$engine, $h host VM(s), run $r: exit $rc, no PASS"
            fi
            f=$(sed -nE 's/.*fragvisor: node ([0-9]+) summary:.* dsm_faults=([0-9]+).*/\1:\2/p' "$out.err" | sort | tr '\n' ' ')
            faults+="${f:-} / "
            d=$(sed -nE 's/.*host TSC delta (-?[0-9]+) ticks \(±([0-9]+)\).*/\1±\2/p' "$out.err" | head -n1)
            deltas+="${d:-} "
            s=$(awk '$2 == "FVTEST:" && $3 == "tsc" { for (i = 1; i <= NF; i++) { if ($i ~ /^lo=/) lo = substr($i, 4); if ($i ~ /^hi=/) hi = substr($i, 4) } w = hi - lo; if (w > m) m = w } END { print m + 0 }' "$out.con")
            skews+=" $s"
        done
        t=$(echo "$times" | median)
        [ "$h" = "$(echo $HOSTS_LIST | cut -d' ' -f1)" ] && base[$engine]=$t
        ratio=$(awk -v a="$t" -v b="${base[$engine]}" 'BEGIN { if (a == "null" || b == "null" || b == 0) print "null"; else printf "%.2f", a / b }')
        sk=$(echo "$skews" | median)
        json+=",\"${engine}_${h}_hosts\":{\"passed\":$ok,\"pass_s_median\":$t,\"vs_first_hosts\":$ratio,\"pass_s\":[$(echo $times | tr ' ' ',')],\"tsc_skew_width_cycles_median\":$sk,\"dsm_faults\":\"${faults% / }\",\"host_tsc_delta_ticks\":\"$(echo $deltas)\"}"
        table+=("$(printf '%-15s %5s %6s %8s %7s %14s  %s' "$engine" "$h" "$ok/$RUNS" "$t" "$ratio" "$sk" "${faults% / }")")
    done
done
json+="}"
echo
echo "FragVisor virtual-cluster benchmark: test kernel, -smp 2 per host, $(nproc) host CPUs; median of $RUNS runs"
printf '%-15s %5s %6s %8s %7s %14s  %s\n' engine hosts passed pass_s ratio skew_width dsm_faults
for l in "${table[@]}"; do echo "$l"; done
echo "$json"
