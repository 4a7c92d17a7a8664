#!/usr/bin/env bash
# Runs every cargo-fuzz target (fuzz/fuzz_targets/*.rs) for a given time each
# and prints, per target, the executions and what it found.
#
#   scripts/fuzz.sh [SECONDS_PER_TARGET] [TARGET...]    (default: 60 s, every target)
#
# Needs the nightly toolchain (cargo fuzz builds with AddressSanitizer) and
# cargo-fuzz; installs cargo-fuzz when missing. Each target's corpus grows
# under $FV_CACHE/fuzz/corpus/TARGET (seeded from fuzz/seeds/TARGET); a
# crash or hang is written to $FV_CACHE/fuzz/artifacts/TARGET/ and fails
# the run. Exit 0 only when no target found anything.
set -euo pipefail
. "$(dirname "$0")/lib/common.sh"
cd "$FV_ROOT"
fv_need_cargo

secs=${1:-60}
shift || true
rustup run nightly rustc --version >/dev/null 2>&1 \
    || rustup toolchain install nightly --profile minimal >&2 \
    || fv_die "cargo fuzz needs the nightly toolchain (rustup toolchain install nightly)"
if ! command -v cargo-fuzz >/dev/null 2>&1; then
    fv_log "installing cargo-fuzz"
    cargo install cargo-fuzz --locked >&2 || fv_die "cargo install cargo-fuzz failed"
fi

targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
    mapfile -t targets < <(cargo +nightly fuzz list)
fi
fv_log "building ${#targets[@]} fuzz targets"
cargo +nightly fuzz build -O >&2

failed=0
for t in "${targets[@]}"; do
    corpus="$FV_CACHE/fuzz/corpus/$t"
    artifacts="$FV_CACHE/fuzz/artifacts/$t/"
    mkdir -p "$corpus" "$artifacts"
    seeds=()
    [ -d "fuzz/seeds/$t" ] && seeds=("fuzz/seeds/$t")
    log=$(mktemp)
    rc=0
    cargo +nightly fuzz run -O "$t" "$corpus" "${seeds[@]}" -- \
        -max_total_time="$secs" -timeout=10 -rss_limit_mb=2048 \
        -artifact_prefix="$artifacts" -print_final_stats=1 >"$log" 2>&1 || rc=$?
    runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n1)
    if [ "$rc" -eq 0 ]; then
        printf 'fuzz %-20s %12s executions in %s s, nothing found\n' "$t" "${runs:-?}" "$secs"
    else
        failed=1
        printf 'fuzz %-20s FOUND A PROBLEM after %s executions (exit %s):\n' "$t" "${runs:-?}" "$rc"
        grep -E 'panicked|ERROR|SUMMARY|Test unit written|deadly signal|timeout' "$log" | head -n 20
    fi
    rm -f "$log"
done
exit "$failed"
