#!/usr/bin/env bash
# What auditing costs the read path: local-search throughput of a 3-region dev
# cluster with audit on, then the same cluster with audit off
# (`hie dev up --no-audit`), in one run, ROUNDS times, alternating which goes first.
# Usage: benches/audit-cost.sh [SECONDS] [CONNECTIONS] [ROUNDS]  (default 10 32 2)
# Last line: `audit cost: X% of search throughput`.
set -euo pipefail
cd "$(dirname "$0")/.."
. cluster/setup.sh
cargo build --workspace --all-targets
SECONDS_EACH="${1:-10}"
CONNECTIONS="${2:-32}"
ROUNDS="${3:-2}"
DIR="$(mktemp -d -t hie-audit-cost.XXXXXX)"
trap '"$HIE_BIN" dev down --dir "$DIR/on" >/dev/null 2>&1 || true; "$HIE_BIN" dev down --dir "$DIR/off" >/dev/null 2>&1 || true; rm -rf "$DIR"' EXIT

run() { # DIR FLAGS... -> throughput
  local d="$1"; shift
  "$HIE_BIN" dev up --dir "$d" --patients 2000 --rate-per-client-per-sec 1000000 --rate-burst 1000000 "$@" >/dev/null
  local out
  out=$("$HIE_BIN" bench --cluster "$d/cluster.json" --workload search --connections "$CONNECTIONS" \
    --seconds "$SECONDS_EACH" --warmup-seconds 2 --patients 2000 --json)
  grep -v '^{' <<<"$out" >&2
  tail -1 <<<"$out" | jq .throughput
  "$HIE_BIN" dev down --dir "$d" >/dev/null
  rm -rf "$d"
}

on_total=0; off_total=0
for r in $(seq "$ROUNDS"); do
  # Alternate which goes first, so neither always runs on a warmer machine.
  if [ $((r % 2)) -eq 1 ]; then
    on=$(run "$DIR/on"); off=$(run "$DIR/off" --no-audit)
  else
    off=$(run "$DIR/off" --no-audit); on=$(run "$DIR/on")
  fi
  echo "round $r: audit on $on ops/s, audit off $off ops/s"
  on_total=$(echo "$on_total + $on" | bc -l); off_total=$(echo "$off_total + $off" | bc -l)
done
printf 'search throughput, mean of %s rounds: audit on %.0f ops/s, audit off %.0f ops/s\n' \
  "$ROUNDS" "$(echo "$on_total / $ROUNDS" | bc -l)" "$(echo "$off_total / $ROUNDS" | bc -l)"
printf 'audit cost: %.1f%% of search throughput\n' "$(echo "(1 - $on_total / $off_total) * 100" | bc -l)"
