#!/usr/bin/env bash
# hie beside etcd, same machine, same run, same load generator.
#
# Starts a 3-node hie dev cluster and a 3-member etcd cluster on loopback
# (Debian's etcd-server, installed if missing), both with TLS and client
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
SECS="${1:-10}"
CONNS="${2:-32}"
PATIENTS="${3:-2000}"
ROUNDS="${4:-4}"

if ! command -v etcd >/dev/null; then
  echo "installing etcd-server (Debian)..." >&2
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq etcd-server >/dev/null
fi
for tool in jq openssl curl bc python3; do command -v "$tool" >/dev/null || { echo "needs $tool" >&2; exit 1; }; done
cargo build --workspace --all-targets

DIR="$(mktemp -d -t hie-vs-etcd.XXXXXX)"
ETCD_PIDS=()
cleanup() {
  for p in "${ETCD_PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  "$HIE_BIN" dev down --dir "$DIR/hie" >/dev/null 2>&1 || true
  for p in "${ETCD_PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
  rm -rf "$DIR"
}
trap cleanup EXIT

echo "== machine: $(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo), etcd $(etcd --version | head -1 | awk '{print $3}')"
"$HIE_BIN" dev up --dir "$DIR/hie" --patients "$PATIENTS" --rate-per-client-per-sec 1000000 --rate-burst 1000000 >/dev/null
CLUSTER="$DIR/hie/cluster.json"
CERTS="$DIR/hie/certs"

# etcd's JSON gateway dials its own gRPC server with the server certificate,
# so with client-certificate authentication that certificate must allow
# both server and client use: issue one from the dev CA.
cat > "$DIR/etcd-ext.cnf" <<'CNF'
basicConstraints = CA:FALSE
keyUsage = digitalSignature, keyEncipherment
extendedKeyUsage = serverAuth, clientAuth
subjectAltName = IP:127.0.0.1, DNS:localhost
CNF
openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -keyout "$DIR/etcd.key" \
  -subj "/CN=etcd bench" -out "$DIR/etcd.csr" 2>/dev/null
openssl x509 -req -in "$DIR/etcd.csr" -CA "$CERTS/ca.pem" -CAkey "$CERTS/ca.key" -CAcreateserial \
  -days 2 -extfile "$DIR/etcd-ext.cnf" -out "$DIR/etcd.pem" 2>/dev/null

read -r -a PORTS <<<"$(python3 -c 'import socket
s=[socket.socket() for _ in range(6)]
[x.bind(("127.0.0.1",0)) for x in s]
print(" ".join(str(x.getsockname()[1]) for x in s))')"
INITIAL="e1=https://127.0.0.1:${PORTS[3]},e2=https://127.0.0.1:${PORTS[4]},e3=https://127.0.0.1:${PORTS[5]}"
ENDPOINTS=""
for i in 0 1 2; do
  n=$((i + 1)); c=${PORTS[$i]}; p=${PORTS[$((i + 3))]}
  etcd --name "e$n" --data-dir "$DIR/etcd/e$n" \
    --listen-client-urls "https://127.0.0.1:$c" --advertise-client-urls "https://127.0.0.1:$c" \
    --listen-peer-urls "https://127.0.0.1:$p" --initial-advertise-peer-urls "https://127.0.0.1:$p" \
    --initial-cluster "$INITIAL" --initial-cluster-state new --initial-cluster-token hie-bench \
    --cert-file "$DIR/etcd.pem" --key-file "$DIR/etcd.key" --trusted-ca-file "$CERTS/ca.pem" --client-cert-auth \
    --peer-auto-tls --logger zap --log-outputs "$DIR/etcd-e$n.log" >>"$DIR/etcd-e$n.out" 2>&1 &
  ETCD_PIDS+=($!)
  ENDPOINTS+="${ENDPOINTS:+,}https://127.0.0.1:$c"
done
CONSUMER_CERT=$(jq -r '.clients[] | select(.roles | index("consumer")) | .cert' "$CLUSTER" | head -1)
CONSUMER_KEY=$(jq -r '.clients[] | select(.roles | index("consumer")) | .key' "$CLUSTER" | head -1)
for _ in $(seq 100); do
  if curl -sf --cacert "$CERTS/ca.pem" --cert "$CONSUMER_CERT" --key "$CONSUMER_KEY" "https://127.0.0.1:${PORTS[0]}/health" | grep -q true; then break; fi
  sleep 0.2
done
curl -sf --cacert "$CERTS/ca.pem" --cert "$CONSUMER_CERT" --key "$CONSUMER_KEY" "https://127.0.0.1:${PORTS[0]}/health" >/dev/null \
  || { echo "etcd did not become healthy" >&2; tail -5 "$DIR"/etcd-e1.log "$DIR"/etcd-e1.out >&2; exit 1; }
"$HIE_BIN" bench --target etcd --cluster "$CLUSTER" --etcd-endpoints "$ENDPOINTS" --workload preload \
  --patients "$PATIENTS" --connections "$CONNS"

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
