#!/usr/bin/env bash
# What auditing costs the read path: local-search throughput of a 3-region dev
# cluster with audit on, then the same cluster with audit off
# (`hie dev up --no-audit`), in one run, ROUNDS times, alternating which goes first.
# With RATE, each round also runs an open-loop load at RATE searches a second
# (below the peak, so the answer does not depend on how requests batch at
# saturation) and reports the nodes' CPU time and context switches a search.
# Usage: benches/audit-cost.sh [SECONDS] [CONNECTIONS] [ROUNDS] [RATE]  (default 10 32 2, no RATE)
# Last line: `audit cost: X% of search throughput`.
set -euo pipefail
cd "$(dirname "$0")/.."
. cluster/setup.sh
cargo build --workspace --all-targets
SECONDS_EACH="${1:-10}"
CONNECTIONS="${2:-32}"
ROUNDS="${3:-2}"
RATE="${4:-0}"
DIR="$(mktemp -d -t hie-audit-cost.XXXXXX)"
trap '"$HIE_BIN" dev down --dir "$DIR/on" >/dev/null 2>&1 || true; "$HIE_BIN" dev down --dir "$DIR/off" >/dev/null 2>&1 || true; rm -rf "$DIR"' EXIT

# CPU seconds (user + system) the cluster's node processes have used.
node_cpu() { # DIR
  local pid
  for pid in $(jq -r '.nodes[].pid' "$1/cluster.json"); do
    cat "/proc/$pid/stat"
  done | awk -v hz="$(getconf CLK_TCK)" '{ t += ($14 + $15) / hz } END { print t }'
}

# Context switches (voluntary and not) of every thread of the cluster's nodes.
node_switches() { # DIR
  local pid
  for pid in $(jq -r '.nodes[].pid' "$1/cluster.json"); do
    cat /proc/"$pid"/task/*/status 2>/dev/null
  done | awk '/ctxt_switches/ { s += $2 } END { print s }'
}

run() { # DIR FLAGS... -> "throughput cpu-microseconds-per-search [fixed-rate-cpu-us switches]"
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
  local line
  line="$tput $(echo "($after - $before) * 1000000 / ($tput * ($SECONDS_EACH + 2))" | bc -l)"
  if [ "$RATE" != 0 ]; then
    local sw0 sw1 done_ops
    before=$(node_cpu "$d"); sw0=$(node_switches "$d")
    out=$("$HIE_BIN" bench --cluster "$d/cluster.json" --workload search --connections "$CONNECTIONS" \
      --seconds "$SECONDS_EACH" --warmup-seconds 0 --patients 2000 --rate "$RATE" --json)
    after=$(node_cpu "$d"); sw1=$(node_switches "$d")
    done_ops=$(tail -1 <<<"$out" | jq ".throughput * $SECONDS_EACH")
    line="$line $(echo "($after - $before) * 1000000 / $done_ops" | bc -l) $(echo "($sw1 - $sw0) / $done_ops" | bc -l)"
  fi
  echo "$line"
  "$HIE_BIN" dev down --dir "$d" >/dev/null
  rm -rf "$d"
}

on_total=0; off_total=0; on_cpu=0; off_cpu=0; on_fix=0; off_fix=0; on_sw=0; off_sw=0
for r in $(seq "$ROUNDS"); do
  # Alternate which goes first, so neither always runs on a warmer machine.
  # (Command substitution, which waits for each cluster to be stopped and
  # removed before the next starts.)
  if [ $((r % 2)) -eq 1 ]; then
    a=$(run "$DIR/on"); b=$(run "$DIR/off" --no-audit)
  else
    b=$(run "$DIR/off" --no-audit); a=$(run "$DIR/on")
  fi
  read -r on oncpu onfix onsw <<<"$a"; read -r off offcpu offfix offsw <<<"$b"
  printf 'round %s: audit on %.0f ops/s (%.0f us node CPU a search), audit off %.0f ops/s (%.0f us)\n' \
    "$r" "$on" "$oncpu" "$off" "$offcpu"
  if [ "$RATE" != 0 ]; then
    printf 'round %s at %s/s: node CPU a search on %.0f us, off %.0f us; context switches a search on %.2f, off %.2f\n' \
      "$r" "$RATE" "$onfix" "$offfix" "$onsw" "$offsw"
    on_fix=$(echo "$on_fix + $onfix" | bc -l); off_fix=$(echo "$off_fix + $offfix" | bc -l)
    on_sw=$(echo "$on_sw + $onsw" | bc -l); off_sw=$(echo "$off_sw + $offsw" | bc -l)
  fi
  on_total=$(echo "$on_total + $on" | bc -l); off_total=$(echo "$off_total + $off" | bc -l)
  on_cpu=$(echo "$on_cpu + $oncpu" | bc -l); off_cpu=$(echo "$off_cpu + $offcpu" | bc -l)
done
printf 'node CPU a search, mean of %s rounds: audit on %.0f us, audit off %.0f us (+%.1f%%)\n' \
  "$ROUNDS" "$(echo "$on_cpu / $ROUNDS" | bc -l)" "$(echo "$off_cpu / $ROUNDS" | bc -l)" \
  "$(echo "($on_cpu / $off_cpu - 1) * 100" | bc -l)"
if [ "$RATE" != 0 ]; then
  printf 'at %s searches/s, mean of %s rounds: node CPU a search on %.0f us, off %.0f us (+%.1f%%); context switches a search on %.2f, off %.2f\n' \
    "$RATE" "$ROUNDS" "$(echo "$on_fix / $ROUNDS" | bc -l)" "$(echo "$off_fix / $ROUNDS" | bc -l)" \
    "$(echo "($on_fix / $off_fix - 1) * 100" | bc -l)" "$(echo "$on_sw / $ROUNDS" | bc -l)" "$(echo "$off_sw / $ROUNDS" | bc -l)"
fi
printf 'search throughput, mean of %s rounds: audit on %.0f ops/s, audit off %.0f ops/s\n' \
  "$ROUNDS" "$(echo "$on_total / $ROUNDS" | bc -l)" "$(echo "$off_total / $ROUNDS" | bc -l)"
printf 'audit cost: %.1f%% of search throughput\n' "$(echo "(1 - $on_total / $off_total) * 100" | bc -l)"
