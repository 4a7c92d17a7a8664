#!/usr/bin/env bash
# Scaling benchmark of the aggregate VM (docs/performance.md).
#
# Guest workloads from Debian packages (sysbench, stress-ng, 7-Zip; the
# benchmark initramfs of guest-kernel/build-bench-initramfs.sh), each with one
# thread per vCPU, every thread pinned to its own vCPU, a fixed amount of
# work (`fv.workload=scale fv.scale=NAME`). The figure is the time between
# the guest's `FV: scale NAME start` and `done` lines, stamped on the host as
# they arrive (for 7z, whose benchmark sizes its own passes: 1000 / its
# total MIPS rating). Two comparisons per workload:
#
#   distribution overhead  the same -smp 4 guest on 1, 2 and 4 nodes, all on
#                          the same host cores: time(N nodes) / time(1 node)
#   scale-out vs overcommit  one node confined to host CPU 0 running -smp 2,
#                          against 2 nodes, node K confined to host CPU K,
#                          running the same -smp 2 guest (one vCPU each):
#                          time(overcommitted) / time(2 nodes)
#
# Runs alternate between the configurations; each figure is the median of
# FV_SCALE_RUNS runs. Prints a table, then as its LAST line one JSON object.
# Exit status: 0 when every run's workload finished with status 0.
#
# Environment:
#   FV_SCALE_WORKLOADS  default "sysbench-cpu sysbench-threads sysbench-mutex
#                       sysbench-memory stress-matrix stress-stream 7z"
#   FV_SCALE_NODES      node counts for the overhead (default "1 2 4"; must
#                       start with 1)
#   FV_SCALE_OVERCOMMIT 1 (default) to run the scale-out comparison, 0 not
#   FV_SCALE_RUNS       runs per figure (default 3)
#   FV_SCALE_SIZE       work multiplier (fv.size=, default 1)
#   FV_SCALE_MEM        guest RAM (default 1G)
#   FV_SCALE_APPEND     extra guest kernel arguments
#   FV_SCALE_TIMEOUT    seconds per run (default 600)
#   FV_SCALE_LOGS       keep every run's console and stderr in this directory
#   FRAGVISOR_QEMU, FRAGVISOR_GUEST_KERNEL, FRAGVISOR_BENCH_INITRAMFS: skip builds
set -euo pipefail
. "$(dirname "$0")/lib/common.sh"
cd "$FV_ROOT"

WORKLOADS=${FV_SCALE_WORKLOADS:-"sysbench-cpu sysbench-threads sysbench-mutex sysbench-memory stress-matrix stress-stream 7z"}
NODES_LIST=${FV_SCALE_NODES:-"1 2 4"}
OVERCOMMIT=${FV_SCALE_OVERCOMMIT:-1}
RUNS=${FV_SCALE_RUNS:-3}
SIZE=${FV_SCALE_SIZE:-1}
MEM=${FV_SCALE_MEM:-1G}
RUN_TIMEOUT=${FV_SCALE_TIMEOUT:-600}
[ "${NODES_LIST%% *}" = 1 ] || fv_die "FV_SCALE_NODES must start with 1 (the ratios are against it)"
[ -n "${EPOCHREALTIME:-}" ] || fv_die "bench-scale.sh needs bash >= 5 (EPOCHREALTIME)"
[ "$(nproc)" -ge 2 ] || [ "$OVERCOMMIT" = 0 ] || fv_die "the scale-out comparison needs 2 host CPUs (FV_SCALE_OVERCOMMIT=0 skips it)"

fv_need_cargo
fv_bench_setup FRAGVISOR_BENCH_INITRAMFS guest-kernel/build-bench-initramfs.sh "${FV_SCALE_LOGS:-}" bench-scale
APPEND_BASE="console=ttyS0 clocksource=tsc tsc=reliable panic=-1 ${FV_SCALE_APPEND:-}"

# run_one NAME TAG NODES SMP [HOST_CPUS]: one boot running workload NAME;
# sets R_TIME (host seconds from start to done, or "") and R_OK.
run_one() {
    local name=$1 tag=$2 n=$3 smp=$4 cpus=${5:-} rc start done_t
    local con="$WORK/$name.$tag.$RUN_NO.console" err="$WORK/$name.$tag.$RUN_NO.stderr"
    local pin=()
    [ -n "$cpus" ] && pin=(--host-cpus "$cpus")
    set +e
    timeout -k 15 $((RUN_TIMEOUT + 30)) \
        "$LAUNCHER" run --nodes "$n" --engine fragvisor-tcg --smp "$smp" -m "$MEM" "${pin[@]}" \
            --qemu "$QEMU" --kernel "$KERNEL" --initrd "$INITRD" --timeout "$RUN_TIMEOUT" \
            --append "$APPEND_BASE fv.workload=scale fv.scale=$name fv.size=$SIZE" \
            -- -smp "$smp,sockets=$n" \
        </dev/null 2>"$err" |
    fv_stamp >"$con"
    rc=${PIPESTATUS[0]}
    set -e
    start=$(awk -v w="$name" '$2 == "FV:" && $3 == "scale" && $4 == w && $5 == "start" { print $1; exit }' "$con")
    done_t=$(awk -v w="$name" '$2 == "FV:" && $3 == "scale" && $4 == w && $5 == "done" && $6 == "rc=0" { print $1; exit }' "$con")
    R_TIME="" R_OK=false
    if [ "$rc" -eq 0 ] && [ -n "$start" ] && [ -n "$done_t" ]; then
        if [ "$name" = 7z ]; then
            # 7-Zip times its own passes: the figure is 1000 / its total
            # MIPS rating ("Tot:" line, last field), lower is better.
            R_TIME=$(awk '$2 == "FV:" && $3 == "scale-out" && $4 == "Tot:" { r = $NF } END { if (r > 0) printf "%.3f", 1000 / r }' "$con")
        else
            R_TIME=$(awk -v a="$start" -v b="$done_t" 'BEGIN { printf "%.3f", b - a }')
        fi
        [ -n "$R_TIME" ] && R_OK=true
    fi
    if ! $R_OK; then
        fv_log "$name $tag: FAILED (launcher exit $rc); console: $con"
        grep -E 'FV: (scale|error|unknown)|RESULT' "$con" | tail -n 5 | cut -d' ' -f2- | sed 's/^/    /' >&2 || true
    fi
    fv_log "$name $tag run $RUN_NO: ${R_TIME:-failed} s"
}

median() { tr ' ' '\n' | grep -v '^$' | sort -g | awk '{ v[NR] = $1 } END { if (NR == 0) print "null"; else if (NR % 2) print v[(NR + 1) / 2]; else printf "%.3f\n", (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (a == "null" || b == "null" || b == 0) print "null"; else printf "%.3f\n", a / b }'; }

configs=()
for n in $NODES_LIST; do configs+=("nodes$n:$n:4:"); done
[ "$OVERCOMMIT" = 1 ] && configs+=("overcommit:1:2:0" "scaleout:2:2:0/1")

all_ok=true
declare -A times
for name in $WORKLOADS; do
    for ((RUN_NO = 1; RUN_NO <= RUNS; RUN_NO++)); do
        for c in "${configs[@]}"; do
            IFS=: read -r tag n smp cpus <<<"$c"
            run_one "$name" "$tag" "$n" "$smp" "$cpus"
            $R_OK || all_ok=false
            times[$name.$tag]+=" $R_TIME"
        done
    done
done

echo
echo "FragVisor scaling benchmark: fragvisor-tcg, -m $MEM, $(nproc) host CPUs, loopback, medians of $RUNS runs (seconds of the workload)"
header=$(printf '%-17s' workload)
for c in "${configs[@]}"; do header+=$(printf ' %11s' "${c%%:*}"); done
for n in $NODES_LIST; do [ "$n" = 1 ] || header+=$(printf ' %9s' "ovh_$n"); done
[ "$OVERCOMMIT" = 1 ] && header+=$(printf ' %9s' speedup)
echo "$header"
json="{\"engine\":\"fragvisor-tcg\",\"memory\":\"$MEM\",\"size\":$SIZE,\"runs\":$RUNS,\"host_cpus\":$(nproc),\"workloads\":{"
sep=""
for name in $WORKLOADS; do
    row=$(printf '%-17s' "$name")
    json+="$sep\"$name\":{"; sep=","
    jsep=""
    for c in "${configs[@]}"; do
        tag=${c%%:*}
        m=$(median <<<"${times[$name.$tag]}")
        declare "med_$tag=$m"
        row+=$(printf ' %11s' "$m")
        json+="$jsep\"${tag}_s\":$m,\"${tag}_runs_s\":[$(tr ' ' '\n' <<<"${times[$name.$tag]}" | grep -v '^$' | paste -sd, -)]"; jsep=","
    done
    for n in $NODES_LIST; do
        [ "$n" = 1 ] && continue
        v="med_nodes$n"; o=$(ratio "${!v}" "$med_nodes1")
        row+=$(printf ' %9s' "$o")
        json+=",\"overhead_${n}_nodes\":$o"
    done
    if [ "$OVERCOMMIT" = 1 ]; then
        s=$(ratio "$med_overcommit" "$med_scaleout")
        row+=$(printf ' %9s' "$s")
        json+=",\"scaleout_speedup\":$s"
    fi
    json+="}"
    echo "$row"
done
json+="},\"ok\":$all_ok}"
echo "(ovh_N: time on N nodes / time on 1 node, same -smp 4 on the same host cores; speedup: 1 node on host CPU 0 with -smp 2 / 2 nodes on host CPUs 0 and 1)"
echo "$json"
$all_ok
