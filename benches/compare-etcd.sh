#!/usr/bin/env bash
# hie beside etcd, same machine, same run, same load generator.
#
# Starts a 3-node hie dev cluster and a 3-member etcd cluster on loopback
# (Debian's etcd-server, installed if missing; see benches/etcd-cluster.sh), both with TLS and client
# certificates from the same dev CA, then drives each with `hie bench` at the
# same concurrency:
#   write:             hie create pointer      vs etcd put of a pointer-sized value
#   read:              hie local search        vs etcd serializable get
#   linearizable read: hie linearizable search vs etcd linearizable get
# etcd is driven through its v3 JSON gateway (HTTP/1.1 + JSON, as hie's API
# is). It stops only the processes it started.
#
# Each workload runs ROUNDS times on each system, alternating which goes
# first (hie, etcd, then etcd, hie, ...), so drift in this shared machine
# over the run falls on both alike; the figures are the means.
#
# An even number of rounds lets each system go first equally often.
#
# Usage: benches/compare-etcd.sh [SECONDS] [CONNECTIONS] [PATIENTS] [ROUNDS]  (default 10 32 2000 4)
# Last lines: `ratio write: X`, `ratio read: Y`, `ratio linearizable read: Z` (hie/etcd mean throughput).
set -euo pipefail
cd "$(dirname "$0")/.."
. cluster/setup.sh
. benches/etcd-cluster.sh
SECS="${1:-10}"
CONNS="${2:-32}"
PATIENTS="${3:-2000}"
ROUNDS="${4:-4}"

install_etcd
for tool in jq openssl curl bc python3; do command -v "$tool" >/dev/null || { echo "needs $tool" >&2; exit 1; }; done
cargo build --workspace --all-targets

echo "== machine: $(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo), etcd $(etcd --version | head -1 | awk '{print $3}')"
start_hie_and_etcd hie-vs-etcd "$PATIENTS"
ENDPOINTS="$ETCD_ENDPOINTS"

bench() { # TARGET WORKLOAD -> prints the summary, returns the JSON line in $LAST
  local extra=()
  [ "$1" = etcd ] && extra=(--etcd-endpoints "$ENDPOINTS")
  local out
  out=$("$HIE_BIN" bench --target "$1" --cluster "$CLUSTER" "${extra[@]}" --workload "$2" --connections "$CONNS" \
    --seconds "$SECS" --warmup-seconds 2 --patients "$PATIENTS" --json)
  grep -v '^{' <<<"$out"
  LAST=$(tail -1 <<<"$out")
}
declare -A TP P99 ROUND_RATIOS
measure() { # TARGET NAME WORKLOAD: adds one run's throughput and p99 to the sums
  bench "$1" "$3"
  TP[$1-$2]=$(echo "${TP[$1-$2]:-0} + $(jq .throughput <<<"$LAST")" | bc -l)
  P99[$1-$2]=$(echo "${P99[$1-$2]:-0} + $(jq .p99_ms <<<"$LAST")" | bc -l)
  LAST_TP=$(jq .throughput <<<"$LAST")
}
# Reads first, while each patient has about as many pointers (1.5) as an etcd
# get returns values (1); the writes then add pointers.
for pair in "read search" "linearizable-read linearizable" "write create"; do
  set -- $pair
  name=$1; workload=$2
  for r in $(seq "$ROUNDS"); do
    if [ $((r % 2)) -eq 1 ]; then
      measure hie "$name" "$workload"; h=$LAST_TP; measure etcd "$name" "$workload"; e=$LAST_TP
    else
      measure etcd "$name" "$workload"; e=$LAST_TP; measure hie "$name" "$workload"; h=$LAST_TP
    fi
    ROUND_RATIOS[$name]+="$(printf ' %.2f' "$(echo "$h / $e" | bc -l)")"
  done
  for t in hie etcd; do
    TP[$t-$name]=$(echo "${TP[$t-$name]} / $ROUNDS" | bc -l); P99[$t-$name]=$(echo "${P99[$t-$name]} / $ROUNDS" | bc -l)
  done
done

echo
echo "== $CONNS connections, ${SECS} s each, $ROUNDS rounds, 3 hie nodes and 3 etcd members on $(nproc) cores (means)"
for name in write read linearizable-read; do
  printf '%-18s hie %8.0f ops/s p99 %6.2f ms | etcd %8.0f ops/s p99 %6.2f ms\n' "$name" \
    "${TP[hie-$name]}" "${P99[hie-$name]}" "${TP[etcd-$name]}" "${P99[etcd-$name]}"
done
for name in write read linearizable-read; do printf 'ratio %s each round:%s\n' "$name" "${ROUND_RATIOS[$name]}"; done
printf 'ratio write: %.2f\n' "$(echo "${TP[hie-write]} / ${TP[etcd-write]}" | bc -l)"
printf 'ratio read: %.2f\n' "$(echo "${TP[hie-read]} / ${TP[etcd-read]}" | bc -l)"
printf 'ratio linearizable read: %.2f\n' "$(echo "${TP[hie-linearizable-read]} / ${TP[etcd-linearizable-read]}" | bc -l)"
