#!/usr/bin/env bash
# What auditing costs the read path, measured A/B: two 3-region dev clusters
# run side by side, one with audit on and one with `--no-audit`, and short
# closed-loop search runs alternate between them (ABBA order), so drift in
# the machine (other load, page cache, a cluster slowing as its logs grow)
# falls on both alike. The idle cluster only exchanges Raft heartbeats.
# With `control` as the 4th argument both clusters have audit off: the
# answer is then this machine's noise floor for the same measurement.
# Usage: benches/audit-cost-ab.sh [SECONDS] [CONNECTIONS] [PAIRS] [control]  (default 5 32 8)
# Last line: `audit cost: X% of search throughput`.
set -euo pipefail
cd "$(dirname "$0")/.."
. cluster/setup.sh
cargo build --workspace --all-targets
SECONDS_EACH="${1:-5}"
CONNECTIONS="${2:-32}"
PAIRS="${3:-8}"
MODE="${4:-}"
DIR="$(mktemp -d -t hie-audit-ab.XXXXXX)"
trap '"$HIE_BIN" dev down --dir "$DIR/a" >/dev/null 2>&1 || true; "$HIE_BIN" dev down --dir "$DIR/b" >/dev/null 2>&1 || true; rm -rf "$DIR"' EXIT

up() { # DIR FLAGS...
  local d="$1"; shift
  "$HIE_BIN" dev up --dir "$d" --patients 2000 --rate-per-client-per-sec 1000000 --rate-burst 1000000 "$@" >/dev/null
}
a_flags=(); b_flags=(--no-audit)
if [ "$MODE" = control ]; then a_flags=(--no-audit); fi
up "$DIR/a" "${a_flags[@]}"
up "$DIR/b" "${b_flags[@]}"

run() { # DIR -> throughput
  "$HIE_BIN" bench --cluster "$1/cluster.json" --workload search --connections "$CONNECTIONS" \
    --seconds "$SECONDS_EACH" --warmup-seconds 1 --patients 2000 --json | tail -1 | jq .throughput
}

# Warm both up once, unmeasured.
run "$DIR/a" >/dev/null; run "$DIR/b" >/dev/null
a_total=0; b_total=0; ratios=()
for p in $(seq "$PAIRS"); do
  if [ $((p % 2)) -eq 1 ]; then a=$(run "$DIR/a"); b=$(run "$DIR/b"); else b=$(run "$DIR/b"); a=$(run "$DIR/a"); fi
  ratios+=("$(echo "$a / $b" | bc -l)")
  printf 'pair %s: A (%s) %.0f ops/s, B (audit off) %.0f ops/s, A/B %.3f\n' \
    "$p" "${MODE:-audit on}" "$a" "$b" "${ratios[-1]}"
  a_total=$(echo "$a_total + $a" | bc -l); b_total=$(echo "$b_total + $b" | bc -l)
done
# The median pair is less swayed than the means by one pair that ran while
# the machine was busy elsewhere.
printf 'median pair A/B: %.3f (pairs below 1: %s of %s)\n' \
  "$(printf '%s\n' "${ratios[@]}" | sort -g | awk '{v[NR]=$1} END{print (NR%2 ? v[(NR+1)/2] : (v[NR/2]+v[NR/2+1])/2)}')" \
  "$(printf '%s\n' "${ratios[@]}" | awk '$1<1' | wc -l)" "$PAIRS"
printf 'search throughput, mean of %s pairs: A (%s) %.0f ops/s, B (audit off) %.0f ops/s\n' \
  "$PAIRS" "${MODE:-audit on}" "$(echo "$a_total / $PAIRS" | bc -l)" "$(echo "$b_total / $PAIRS" | bc -l)"
printf 'audit cost: %.1f%% of search throughput\n' "$(echo "(1 - $a_total / $b_total) * 100" | bc -l)"
