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

# CPU seconds (user + system) the cluster's node processes have used.
node_cpu() { # DIR
  local pid
  for pid in $(jq -r '.nodes[].pid' "$1/cluster.json"); do
    cat "/proc/$pid/stat"
  done | awk -v hz="$(getconf CLK_TCK)" '{ t += ($14 + $15) / hz } END { print t }'
}

run() { # DIR FLAGS... -> "throughput cpu-microseconds-per-search"
  local d="$1"; shift
  "$HIE_BIN" dev up --dir "$d" --patients 2000 --rate-per-client-per-sec 1000000 --rate-burst 1000000 "$@" >/dev/null
  local out before after
  before=$(node_cpu "$d")
  out=$("$HIE_BIN" bench --cluster "$d/cluster.json" --workload search --connections "$CONNECTIONS" \
    --seconds "$SECONDS_EACH" --warmup-seconds 2 --patients 2000 --json)
  after=$(node_cpu "$d")
  grep -v '^{' <<<"$out" >&2
  local tput
  tput=$(tail -1 <<<"$out" | jq .throughput)
  # Node CPU over warm-up and measurement, per search at the measured rate.
  echo "$tput $(echo "($after - $before) * 1000000 / ($tput * ($SECONDS_EACH + 2))" | bc -l)"
  "$HIE_BIN" dev down --dir "$d" >/dev/null
  rm -rf "$d"
}

on_total=0; off_total=0; on_cpu=0; off_cpu=0
for r in $(seq "$ROUNDS"); do
  # Alternate which goes first, so neither always runs on a warmer machine.
  # (Command substitution, which waits for each cluster to be stopped and
  # removed before the next starts.)
  if [ $((r % 2)) -eq 1 ]; then
    a=$(run "$DIR/on"); b=$(run "$DIR/off" --no-audit)
  else
    b=$(run "$DIR/off" --no-audit); a=$(run "$DIR/on")
  fi
  read -r on oncpu <<<"$a"; read -r off offcpu <<<"$b"
  printf 'round %s: audit on %.0f ops/s (%.0f us node CPU a search), audit off %.0f ops/s (%.0f us)\n' \
    "$r" "$on" "$oncpu" "$off" "$offcpu"
  on_total=$(echo "$on_total + $on" | bc -l); off_total=$(echo "$off_total + $off" | bc -l)
  on_cpu=$(echo "$on_cpu + $oncpu" | bc -l); off_cpu=$(echo "$off_cpu + $offcpu" | bc -l)
done
printf 'node CPU a search, mean of %s rounds: audit on %.0f us, audit off %.0f us (+%.1f%%)\n' \
  "$ROUNDS" "$(echo "$on_cpu / $ROUNDS" | bc -l)" "$(echo "$off_cpu / $ROUNDS" | bc -l)" \
  "$(echo "($on_cpu / $off_cpu - 1) * 100" | bc -l)"
printf 'search throughput, mean of %s rounds: audit on %.0f ops/s, audit off %.0f ops/s\n' \
  "$ROUNDS" "$(echo "$on_total / $ROUNDS" | bc -l)" "$(echo "$off_total / $ROUNDS" | bc -l)"
printf 'audit cost: %.1f%% of search throughput\n' "$(echo "(1 - $on_total / $off_total) * 100" | bc -l)"
