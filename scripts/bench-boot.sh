#!/usr/bin/env bash
# Boot benchmark of the aggregate VM (docs/aggregate-vm.md, "Benchmark").
#
# For each node count (default 1 2 4) it boots the same Debian guest with the
# same `-smp 4,sockets=N` and one guest NUMA node per host under fragvisor-tcg
# through the launcher on this machine, and measures the wall time from the
# launch to the `FV: boot` marker, to `FV: RESULT PASS` and to the launcher's
# exit. It collects each node's `fragvisor: node K summary:` line (DSM faults,
# served, bytes sent/received, the clock alignment bound) and the guest's `FV: tscskew max_bound=`
# (with fragvisor-tcg and nodes > 1 the guest TSC runs at 1 GHz: cycles = ns).
#
# Prints a table, then as its LAST line one JSON object with every figure.
# Exit status: 0 when every run reached `FV: RESULT PASS` and exited 0.
#
# Environment:
#   FV_BENCH_NODES     node counts (default "1 2 4")
#   FV_BENCH_SMP       vCPUs (default 4; must be a multiple of every node count)
#   FV_BENCH_MEM       guest RAM (default 512M)
#   FV_BENCH_WORKLOAD  fv.workload= (default tscskew; the same for every N)
#   FV_BENCH_TIMEOUT   seconds per run before the launcher stops it (default 300)
#   FV_BENCH_LOGS      keep the per-run console/stderr logs in this directory
#   FV_BENCH_APPEND    extra guest kernel arguments, ending in a space (the
#                      guest always boots with nokaslr, so hot pages can be
#                      named by symbol: docs/performance.md)
#   FRAGVISOR_QEMU, FRAGVISOR_GUEST_KERNEL, FRAGVISOR_INITRAMFS: skip the builds
#   FRAGVISOR_DSM_PREFETCH  DSM read-ahead for guest RAM, pages (passed to every node)
set -euo pipefail
. "$(dirname "$0")/lib/common.sh"
cd "$FV_ROOT"

NODES_LIST=${FV_BENCH_NODES:-"1 2 4"}
SMP=${FV_BENCH_SMP:-4}
MEM=${FV_BENCH_MEM:-512M}
WORKLOAD=${FV_BENCH_WORKLOAD:-tscskew}
RUN_TIMEOUT=${FV_BENCH_TIMEOUT:-300}

# bash >= 5 for $EPOCHREALTIME (microsecond wall clock without forking `date`).
[ -n "${EPOCHREALTIME:-}" ] || fv_die "bench-boot.sh needs bash >= 5 (EPOCHREALTIME)"

# --- build / fetch what the runs need -------------------------------------
fv_need_cargo
fv_bench_setup FRAGVISOR_INITRAMFS guest-kernel/build-initramfs.sh "${FV_BENCH_LOGS:-}" bench-boot

APPEND="console=ttyS0 clocksource=tsc tsc=reliable panic=-1 nokaslr ${FV_BENCH_APPEND:-}fv.workload=$WORKLOAD"
fv_log "qemu:   $QEMU"
fv_log "kernel: $KERNEL"
fv_log "initrd: $INITRD"
fv_log "guest:  -smp $SMP,sockets=N, -m $MEM, one NUMA node per host, append '$APPEND'"

# seconds (3 decimals) between two $EPOCHREALTIME values
elapsed() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.3f", b - a }'; }

# --- one run -----------------------------------------------------------------
# Sets R_* globals for node count $1.
bench_one() {
    local n=$1 con=$WORK/nodes$1.console err=$WORK/nodes$1.stderr
    local t0 t line boot_t="" pass_t="" fail_line="" rc
    R_BOOT=null R_PASS=null R_EXIT=null R_UPTIME=null R_SKEW=null R_PAIRS="" R_RC=-1 R_OK=false
    R_FAULTS=() R_SERVED=() R_SENT=() R_RECV=() R_CLOCK=() R_RATE=()

    fv_log "nodes=$n: starting (timeout ${RUN_TIMEOUT}s)"
    t0=$EPOCHREALTIME
    # The launcher stops its own nodes at --timeout (exit 124); the outer
    # `timeout` only backs that up and signals the launcher alone, which
    # forwards the signal to the nodes it started.
    set +e
    timeout -k 15 $((RUN_TIMEOUT + 30)) \
        "$LAUNCHER" run --nodes "$n" --engine fragvisor-tcg --smp "$SMP" -m "$MEM" \
            --qemu "$QEMU" --kernel "$KERNEL" --initrd "$INITRD" --append "$APPEND" \
            --timeout "$RUN_TIMEOUT" \
            -- -smp "$SMP,sockets=$n" \
        </dev/null 2>"$err" |
    fv_stamp >"$con"
    rc=${PIPESTATUS[0]}
    set -e
    t=$EPOCHREALTIME
    R_RC=$rc
    R_EXIT=$(elapsed "$t0" "$t")

    # console: "<epoch> <line>"
    boot_t=$(awk '$2 == "FV:" && $3 == "boot" { print $1; exit }' "$con")
    pass_t=$(awk '$2 == "FV:" && $3 == "RESULT" && $4 == "PASS" { print $1; exit }' "$con")
    fail_line=$(grep -m1 -E '^[0-9.]+ FV: RESULT FAIL' "$con" | cut -d' ' -f2- || true)
    [ -n "$boot_t" ] && R_BOOT=$(elapsed "$t0" "$boot_t")
    [ -n "$pass_t" ] && R_PASS=$(elapsed "$t0" "$pass_t")
    R_UPTIME=$(awk '$2 == "FV:" && $3 == "boot" { for (i = 4; i <= NF; i++) if ($i ~ /^uptime=/) { sub(/^uptime=/, "", $i); print $i } exit }' "$con")
    [ -n "$R_UPTIME" ] || R_UPTIME=null
    R_SKEW=$(awk '$2 == "FV:" && $3 == "tscskew" && $4 ~ /^max_bound=/ { v = $4; sub(/^max_bound=/, "", v); print v; exit }' "$con")
    [ -n "$R_SKEW" ] || R_SKEW=null
    # per CPU pair: "cpu0->cpu2":260,...
    R_PAIRS=$(awk '$2 == "FV:" && $3 == "tscskew" && $4 ~ /->/ { for (i = 5; i <= NF; i++) if ($i ~ /^bound=/) { v = $i; sub(/^bound=/, "", v) }
                   printf "%s\"%s\":%s", sep, $4, v; sep = "," }' "$con")

    # summaries (stderr, "[node K] fragvisor: node K summary: ...")
    local k s
    for ((k = 0; k < n; k++)); do
        s=$(grep -m1 -E "fragvisor: node $k summary:" "$err" || true)
        R_FAULTS+=("$(sed -nE 's/.* dsm_faults=([0-9]+).*/\1/p' <<<"$s")")
        R_SERVED+=("$(sed -nE 's/.* dsm_served=([0-9]+).*/\1/p' <<<"$s")")
        R_SENT+=("$(sed -nE 's/.* bytes_sent=([0-9]+).*/\1/p' <<<"$s")")
        R_RECV+=("$(sed -nE 's/.* bytes_received=([0-9]+).*/\1/p' <<<"$s")")
        R_CLOCK+=("$(sed -nE 's/.* clock_bound_ns=([0-9]+).*/\1/p' <<<"$s")")
        R_RATE+=("$(sed -nE 's/.* clock_rate_ppb=(-?[0-9]+).*/\1/p' <<<"$s")")
    done

    if [ "$rc" -eq 0 ] && [ -n "$pass_t" ]; then
        R_OK=true
    else
        fv_log "nodes=$n: FAILED (launcher exit $rc${fail_line:+, $fail_line}${pass_t:-, no RESULT PASS})"
        grep -E '^\[node|^fragvisor:' "$err" | tail -n 5 | sed 's/^/    /' >&2 || true
        tail -n 5 "$con" | cut -d' ' -f2- | sed 's/^/    console: /' >&2 || true
    fi
    fv_log "nodes=$n: boot ${R_BOOT}s pass ${R_PASS}s exit ${R_EXIT}s rc=$rc skew=${R_SKEW} faults=${R_FAULTS[*]}"
}

# JSON array of numbers (empty -> null)
json_arr() {
    local out="[" v sep=""
    for v in "$@"; do out+="$sep${v:-null}"; sep=","; done
    printf '%s]' "$out"
}
# human list "a, b, c" ("-" for empty)
human_list() {
    local out="" v sep=""
    for v in "$@"; do out+="$sep${v:--}"; sep=" "; done
    printf '%s' "${out:--}"
}

# --- all runs ------------------------------------------------------------------
all_ok=true
json="{\"engine\":\"fragvisor-tcg\",\"smp\":$SMP,\"memory\":\"$MEM\",\"workload\":\"$WORKLOAD\",\"host_cpus\":$(nproc)"
table=()
for n in $NODES_LIST; do
    [ $((SMP % n)) -eq 0 ] || fv_die "-smp $SMP is not a multiple of $n nodes"
    bench_one "$n"
    $R_OK || all_ok=false
    json+=",\"nodes_$n\":{\"ok\":$R_OK,\"launcher_rc\":$R_RC,\"boot_s\":$R_BOOT,\"pass_s\":$R_PASS,\"exit_s\":$R_EXIT"
    # nodes > 1: the fragvisor-tcg guest TSC is the origin-aligned monotonic clock at
    # 1 GHz, so cycles = ns;
    # nodes = 1 keeps QEMU's own TSC rate: cycles only.
    skew_ns=null; [ "$n" -gt 1 ] && skew_ns=$R_SKEW
    json+=",\"boot_uptime_s\":$R_UPTIME,\"tsc_skew_ns\":$skew_ns,\"tsc_skew_cycles\":$R_SKEW,\"tsc_pair_bounds\":{$R_PAIRS}"
    json+=",\"dsm_faults\":$(json_arr "${R_FAULTS[@]}"),\"dsm_served\":$(json_arr "${R_SERVED[@]}")"
    json+=",\"bytes_sent\":$(json_arr "${R_SENT[@]}"),\"bytes_received\":$(json_arr "${R_RECV[@]}")"
    json+=",\"clock_align_bound_ns\":$(json_arr "${R_CLOCK[@]}"),\"clock_drift_ppb\":$(json_arr "${R_RATE[@]}")}"
    table+=("$(printf '%-5s %-4s %8s %8s %8s %9s %12s  %s' "$n" "$R_OK" "$R_BOOT" "$R_PASS" "$R_EXIT" \
        "$R_UPTIME" "$R_SKEW" "$(human_list "${R_FAULTS[@]}")")")
done
json+="}"

echo
echo "FragVisor boot benchmark: fragvisor-tcg, -smp $SMP,sockets=N, -m $MEM, fv.workload=$WORKLOAD, $(nproc) host CPUs, loopback"
echo "(times: wall seconds from the launch; uptime_s: the guest's at 'FV: boot'; tsc_skew: 'tscskew max_bound' in cycles, = ns for nodes > 1)"
printf '%-5s %-4s %8s %8s %8s %9s %12s  %s\n' nodes ok boot_s pass_s exit_s uptime_s tsc_skew "dsm_faults per node"
for line in "${table[@]}"; do echo "$line"; done
echo "$json"
$all_ok
