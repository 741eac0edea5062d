#!/usr/bin/env bash
# Two builds (or one build with two environments) measured side by side:
# two 3-region dev clusters run at once, one from each binary, and short
# closed-loop runs of one workload alternate between them (ABBA order), so
# drift in this shared machine falls on both alike. To measure a change:
# copy the binary before it (`cp "$HIE_BIN" /tmp/hie-before`), rebuild, and
# run `benches/ab-builds.sh "$HIE_BIN" /tmp/hie-before create 5 8`. The
# same binary on both sides shows this machine's noise floor.
# ENV_A / ENV_B: extra environment for each cluster's nodes (for example a
# switch read by a throwaway build).
# Usage: benches/ab-builds.sh BIN_A BIN_B [WORKLOAD] [SECONDS] [PAIRS] [dev up flags...]  (default create 5 8)
# Each pair prints both throughputs and p99 latencies; the last line is
# `mean A X B Y A/B Z p99 ms A P B Q` (throughput in ops/s, mean p99 in ms).
set -euo pipefail
cd "$(dirname "$0")/.."
A="$1"; B="$2"; W="${3:-create}"; S="${4:-5}"; P="${5:-8}"
shift $(( $# < 5 ? $# : 5 ))
DIR="$(mktemp -d -t hie-ab.XXXXXX)"
trap '"$A" dev down --dir "$DIR/a" >/dev/null 2>&1 || true; "$B" dev down --dir "$DIR/b" >/dev/null 2>&1 || true; rm -rf "$DIR"' EXIT
read -r -a env_a <<<"${ENV_A:-}"; read -r -a env_b <<<"${ENV_B:-}"
env "${env_a[@]}" "$A" dev up --dir "$DIR/a" --patients 2000 --rate-per-client-per-sec 1000000 --rate-burst 1000000 "$@" >/dev/null
env "${env_b[@]}" "$B" dev up --dir "$DIR/b" --patients 2000 --rate-per-client-per-sec 1000000 --rate-burst 1000000 "$@" >/dev/null
run() { # BIN DIR -> "throughput p99_ms"
  "$1" bench --cluster "$2/cluster.json" --workload "$W" --connections 32 --seconds "$S" --warmup-seconds 1 \
    --patients 2000 --json | tail -1 | jq -r '"\(.throughput) \(.p99_ms)"'
}
run "$A" "$DIR/a" >/dev/null; run "$B" "$DIR/b" >/dev/null
ta=0; tb=0; la=0; lb=0
for p in $(seq "$P"); do
  if [ $((p % 2)) -eq 1 ]; then ra=$(run "$A" "$DIR/a"); rb=$(run "$B" "$DIR/b"); else rb=$(run "$B" "$DIR/b"); ra=$(run "$A" "$DIR/a"); fi
  read -r a pa <<<"$ra"; read -r b pb <<<"$rb"
  printf 'pair %s: A %.0f B %.0f A/B %.3f  p99 ms A %.2f B %.2f\n' "$p" "$a" "$b" "$(echo "$a / $b" | bc -l)" "$pa" "$pb"
  ta=$(echo "$ta + $a" | bc -l); tb=$(echo "$tb + $b" | bc -l)
  la=$(echo "$la + $pa" | bc -l); lb=$(echo "$lb + $pb" | bc -l)
done
printf 'mean A %.0f B %.0f A/B %.3f p99 ms A %.2f B %.2f\n' "$(echo "$ta / $P" | bc -l)" "$(echo "$tb / $P" | bc -l)" \
  "$(echo "$ta / $tb" | bc -l)" "$(echo "$la / $P" | bc -l)" "$(echo "$lb / $P" | bc -l)"
