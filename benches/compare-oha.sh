#!/usr/bin/env bash
# hie beside etcd, measured by a load generator that is not ours: oha
# (https://github.com/hatoo/oha, installed from crates.io if missing).
#
# Starts a 3-node hie dev cluster (rate limit lifted) and a 3-member etcd
# (benches/etcd-cluster.sh) on loopback, both TLS with client certificates
# from the same dev CA, and drives each with oha over HTTP/1.1 keep-alive:
#   write           hie create pointer (a 2.7 KB NRLF DocumentReference)  vs etcd put of the same JSON
#   read            hie local search                                     vs etcd serializable range
#   linearizable    hie search with X-HIE-Consistency: linearizable      vs etcd linearizable range
#   nothing         hie /fhir/_status (a fixed OperationOutcome)          vs etcd /version
#                   (what the machine, TLS and HTTP give with no work behind them)
# closed loop at 64 in flight (connections spread at random over the three
# nodes or members), one in flight (writes at the leader and at a follower,
# reads at one node), and reads in open loop at fixed rates and at half of
# the round's measured hie read peak (latency counted from when each
# request was due: oha --latency-correction). Requests go to 2,000
# patients (hie) or 2,000 keys (etcd), a different one each time. Only 2xx
# answers are counted, in rates and in latencies.
#
# Each round runs every workload on both systems, alternating which goes
# first (hie first in odd rounds); the figures are means over the rounds.
#
# Usage: benches/compare-oha.sh [SECONDS] [ROUNDS] [RATES]  (default 10 2 "2000")
# Last lines: `ratio write: X`, `ratio read: Y`, `ratio linearizable: Z`
# (hie/etcd throughput at 64 in flight) and `one write in flight, p50 ms:`.
set -euo pipefail
cd "$(dirname "$0")/.."
. cluster/setup.sh
. benches/etcd-cluster.sh
SECS="${1:-10}"
ROUNDS="${2:-2}"
RATES="${3:-2000}"
PATIENTS=2000
OHA_VERSION=1.16.0

install_etcd
for tool in jq openssl curl python3; do command -v "$tool" >/dev/null || { echo "needs $tool" >&2; exit 1; }; done
if ! command -v oha >/dev/null; then
  echo "installing oha $OHA_VERSION from crates.io..." >&2
  cargo install --locked oha --version "$OHA_VERSION"
fi
cargo build --workspace --all-targets

echo "== machine: $(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo), etcd $(etcd --version | head -1 | awk '{print $3}'), $(oha --version)"
start_hie_and_etcd hie-oha "$PATIENTS"

client() { jq -r --arg role "$1" '[.clients[] | select(.roles | index($role))][0] | "\(.cert) \(.key)"' "$CLUSTER"; }
read -r PRODUCER_CERT PRODUCER_KEY <<<"$(client producer)"
read -r CONSUMER_CERT CONSUMER_KEY <<<"$(client consumer)"
mapfile -t HIE_PORTS < <(jq -r '.nodes[].api_url | capture(":(?<p>[0-9]+)/").p' "$CLUSTER")
ETCD_PORTS=()
for u in "${ETCD_URLS[@]}"; do ETCD_PORTS+=("${u##*:}"); done

# Request bodies and URLs, one per line, for 2,000 patients (the sample
# NRLF pointer without its masterIdentifier, so every create is new).
python3 - "$DIR" "$PATIENTS" tests/data/nrlf/valid.json <<'PY'
import base64, json, sys
out, n, sample = sys.argv[1], int(sys.argv[2]), json.load(open(sys.argv[3]))
sample.pop("masterIdentifier", None)
def nhs(i):  # the dev cluster's sample patients (hie_domain::testkit::nhs)
    prefix = 90_000_000 + i
    for d in range(10):
        digits = [int(c) for c in str(prefix * 10 + d)]
        check = 11 - sum(x * (10 - k) for k, x in enumerate(digits)) % 11
        check = 0 if check == 11 else check
        if check != 10:
            return f"{prefix * 10 + d}{check}"
b64 = lambda s: base64.b64encode(s.encode()).decode()
with open(f"{out}/creates", "w") as c, open(f"{out}/puts", "w") as p, open(f"{out}/searches", "w") as s, \
        open(f"{out}/gets", "w") as g, open(f"{out}/gets-linearizable", "w") as gl:
    for i in range(n):
        doc = dict(sample, subject={"identifier": {"system": "https://fhir.nhs.uk/Id/nhs-number", "value": nhs(i)}})
        body = json.dumps(doc, separators=(",", ":"))
        c.write(body + "\n")
        p.write(json.dumps({"key": b64(f"/bench/patient/{nhs(i)}/oha"), "value": b64(body)}) + "\n")
        s.write(f"https://localhost:1/fhir/DocumentReference?subject:identifier=https://fhir.nhs.uk/Id/nhs-number|{nhs(i)}\n")
        g.write(json.dumps({"key": b64(f"/bench/patient/{nhs(i)}"), "serializable": True}) + "\n")
        gl.write(json.dumps({"key": b64(f"/bench/patient/{nhs(i)}")}) + "\n")
PY

hie_leader() { # the hie node id that leads now
  local admin
  admin=$(jq -r '.nodes[0].admin_url' "$CLUSTER")
  curl -sf "$admin/metrics" | awk '/^hie_raft_leader_id / {print $2}'
}
etcd_leader() { # the index (0..2) of the etcd member that leads now
  local i
  for i in 0 1 2; do
    if curl -sf --cacert "$CERTS/ca.pem" --cert "$CONSUMER_CERT" --key "$CONSUMER_KEY" \
      -X POST -d '{}' "${ETCD_URLS[$i]}/v3/maintenance/status" | jq -e '.leader == .header.member_id' >/dev/null; then
      echo "$i"; return
    fi
  done
}

# oha SYSTEM OP TARGET CONC [RATE]: one run; prints "rps p50 p99 p99.9" (ms) of 2xx answers.
# TARGET: all (connections spread over the three), leader, follower, or a node index 0..2.
oha_run() {
  local system="$1" op="$2" target="$3" conc="$4" rate="${5:-}"
  local ports=() args=() idx=() i leader
  if [ "$system" = hie ]; then ports=("${HIE_PORTS[@]}"); leader=$(($(hie_leader) - 1)); else ports=("${ETCD_PORTS[@]}"); leader=$(etcd_leader); fi
  case "$target" in
    all) idx=(0 1 2) ;;
    leader) idx=("$leader") ;;
    follower) idx=($(( (leader + 1) % 3 ))) ;;
    *) idx=("$target") ;;
  esac
  for i in "${idx[@]}"; do args+=(--connect-to "localhost:1:127.0.0.1:${ports[$i]}"); done
  case "$system-$op" in
    hie-write) args+=(-m POST -T application/fhir+json -H "prefer: return=minimal" -Z "$DIR/creates"
                 --cert "$PRODUCER_CERT" --key "$PRODUCER_KEY" https://localhost:1/fhir/DocumentReference) ;;
    hie-read) args+=(--urls-from-file --cert "$CONSUMER_CERT" --key "$CONSUMER_KEY" "$DIR/searches") ;;
    hie-linearizable) args+=(-H "x-hie-consistency: linearizable" --urls-from-file
                 --cert "$CONSUMER_CERT" --key "$CONSUMER_KEY" "$DIR/searches") ;;
    hie-nothing) args+=(--cert "$CONSUMER_CERT" --key "$CONSUMER_KEY" https://localhost:1/fhir/_status) ;;
    etcd-nothing) args+=(--cert "$CONSUMER_CERT" --key "$CONSUMER_KEY" https://localhost:1/version) ;;
    etcd-write) args+=(-m POST -T application/json -Z "$DIR/puts" --cert "$CONSUMER_CERT" --key "$CONSUMER_KEY"
                 https://localhost:1/v3/kv/put) ;;
    etcd-read) args+=(-m POST -T application/json -Z "$DIR/gets" --cert "$CONSUMER_CERT" --key "$CONSUMER_KEY"
                 https://localhost:1/v3/kv/range) ;;
    etcd-linearizable) args+=(-m POST -T application/json -Z "$DIR/gets-linearizable"
                 --cert "$CONSUMER_CERT" --key "$CONSUMER_KEY" https://localhost:1/v3/kv/range) ;;
  esac
  [ -n "$rate" ] && args+=(-q "$rate" --latency-correction)
  oha --no-tui -z "${SECS}s" -c "$conc" --cacert "$CERTS/ca.pem" --stats-success-breakdown --output-format json \
    "${args[@]}" >"$DIR/oha.json"
  jq -r --argjson s "$SECS" '
    ((.statusCodeDistribution | to_entries | map(select(.key | startswith("2")) | .value) | add) // 0) as $ok
    | [$ok / $s, (.latencyPercentilesSuccessful | .p50, .p99, .["p99.9"] | (. // 0) * 1000)]
    | map(. * 100 | round / 100) | @tsv' "$DIR/oha.json"
}

declare -A SUM
record() { # KEY "rps p50 p99 p999": adds to the sums
  local k="$1" rps p50 p99 p999
  read -r rps p50 p99 p999 <<<"$2"
  SUM[$k-rps]=$(python3 -c "print(${SUM[$k-rps]:-0} + $rps)")
  SUM[$k-p50]=$(python3 -c "print(${SUM[$k-p50]:-0} + $p50)")
  SUM[$k-p99]=$(python3 -c "print(${SUM[$k-p99]:-0} + $p99)")
  SUM[$k-p999]=$(python3 -c "print(${SUM[$k-p999]:-0} + $p999)")
}
pair() { # ROUND NAME OP TARGET CONC [RATE]: both systems, alternating which goes first
  local round="$1" name="$2"; shift 2
  local order=(hie etcd) s r
  [ $((round % 2)) -eq 0 ] && order=(etcd hie)
  for s in "${order[@]}"; do
    r=$(oha_run "$s" "$@")
    printf '  %-34s %-4s %9s/s  p50 %6s  p99 %6s  p99.9 %7s ms\n' "$name" "$s" $r
    record "$s-$name" "$r"
  done
}

NAMES=("read, 64 in flight" "linearizable, 64 in flight" "read, 1 in flight")
for rate in $RATES; do NAMES+=("read, open loop at $rate/s" "nothing, open loop at $rate/s"); done
NAMES+=("read, open loop at half hie's peak" "write, 64 in flight" "write, 1 in flight, at the leader"
  "write, 1 in flight, at a follower")
for round in $(seq "$ROUNDS"); do
  echo "== round $round (hie leader: node $(hie_leader), etcd leader: member $(( $(etcd_leader) + 1 )))"
  # Reads first, while each patient has about as many pointers (1.5) as an
  # etcd range returns values (1); the writes then add pointers.
  pair "$round" "read, 64 in flight" read all 64
  pair "$round" "linearizable, 64 in flight" linearizable all 64
  pair "$round" "read, 1 in flight" read 0 1
  for rate in $RATES; do
    pair "$round" "read, open loop at $rate/s" read all 64 "$rate"
    pair "$round" "nothing, open loop at $rate/s" nothing all 64 "$rate"
  done
  half=$(python3 -c "print(int(${SUM["hie-read, 64 in flight-rps"]} / $round / 2))")
  echo "  (half of hie's mean read peak so far: $half/s)"
  pair "$round" "read, open loop at half hie's peak" read all 64 "$half"
  pair "$round" "write, 64 in flight" write all 64
  pair "$round" "write, 1 in flight, at the leader" write leader 1
  pair "$round" "write, 1 in flight, at a follower" write follower 1
done

mean() { python3 -c "print(f'{${SUM[$1]:-0} / $ROUNDS:.2f}')"; }
echo
echo "== oha, ${SECS} s a run, $ROUNDS rounds, 3 hie nodes and 3 etcd members on $(nproc) cores (means of 2xx answers)"
printf '%-36s | %-40s | %-40s | %s\n' workload "hie: ops/s, p50, p99, p99.9 ms" "etcd: ops/s, p50, p99, p99.9 ms" "hie/etcd"
for name in "${NAMES[@]}"; do
  printf '%-36s | %9s %7s %7s %8s      | %9s %7s %7s %8s      | %s\n' "$name" \
    "$(mean "hie-$name-rps")" "$(mean "hie-$name-p50")" "$(mean "hie-$name-p99")" "$(mean "hie-$name-p999")" \
    "$(mean "etcd-$name-rps")" "$(mean "etcd-$name-p50")" "$(mean "etcd-$name-p99")" "$(mean "etcd-$name-p999")" \
    "$(python3 -c "e=${SUM[etcd-$name-rps]:-0}; print(f'{${SUM[hie-$name-rps]:-0} / e:.2f}' if e else '-')")"
done
ratio() { python3 -c "print(f'{${SUM[hie-$1-rps]} / ${SUM[etcd-$1-rps]}:.2f}')"; }
echo "ratio write: $(ratio "write, 64 in flight")"
echo "ratio read: $(ratio "read, 64 in flight")"
echo "ratio linearizable: $(ratio "linearizable, 64 in flight")"
echo "one write in flight, p50 ms: hie $(mean "hie-write, 1 in flight, at the leader-p50") at the leader," \
  "$(mean "hie-write, 1 in flight, at a follower-p50") at a follower; etcd $(mean "etcd-write, 1 in flight, at the leader-p50")" \
  "and $(mean "etcd-write, 1 in flight, at a follower-p50")"
