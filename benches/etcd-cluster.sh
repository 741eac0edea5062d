# Sourced by the etcd comparisons: a 3-member etcd cluster on loopback,
# TLS with client certificates from a hie dev cluster's CA.
#
# start_etcd DIR CERTS: installs Debian's etcd-server if it is missing,
# issues etcd a certificate from CERTS/ca.pem, starts three members with
# their data under DIR, waits until the first answers /health, and sets
#   ETCD_PIDS       the members' pids (the caller stops them)
#   ETCD_ENDPOINTS  their client URLs, comma separated
#   ETCD_URLS       the same, as an array
#   ETCD_CLIENT_CERT, ETCD_CLIENT_KEY  a dev-CA client certificate (a consumer's)
# etcd's JSON gateway dials its own gRPC server with the server certificate,
# so with client-certificate authentication that certificate must allow both
# server and client use.

install_etcd() {
  command -v etcd >/dev/null && return
  echo "installing etcd-server (Debian)..." >&2
  local sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq etcd-server >/dev/null
}

start_etcd() {
  local dir="$1" certs="$2" cluster="$3"
  install_etcd
  cat > "$dir/etcd-ext.cnf" <<'CNF'
basicConstraints = CA:FALSE
keyUsage = digitalSignature, keyEncipherment
extendedKeyUsage = serverAuth, clientAuth
subjectAltName = IP:127.0.0.1, DNS:localhost
CNF
  openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -keyout "$dir/etcd.key" \
    -subj "/CN=etcd bench" -out "$dir/etcd.csr" 2>/dev/null
  openssl x509 -req -in "$dir/etcd.csr" -CA "$certs/ca.pem" -CAkey "$certs/ca.key" -CAcreateserial \
    -days 2 -extfile "$dir/etcd-ext.cnf" -out "$dir/etcd.pem" 2>/dev/null
  local ports
  read -r -a ports <<<"$(python3 -c 'import socket
s=[socket.socket() for _ in range(6)]
[x.bind(("127.0.0.1",0)) for x in s]
print(" ".join(str(x.getsockname()[1]) for x in s))')"
  local initial="e1=https://127.0.0.1:${ports[3]},e2=https://127.0.0.1:${ports[4]},e3=https://127.0.0.1:${ports[5]}"
  ETCD_PIDS=(); ETCD_URLS=(); ETCD_ENDPOINTS=""
  local i n c p
  for i in 0 1 2; do
    n=$((i + 1)); c=${ports[$i]}; p=${ports[$((i + 3))]}
    etcd --name "e$n" --data-dir "$dir/etcd/e$n" \
      --listen-client-urls "https://127.0.0.1:$c" --advertise-client-urls "https://127.0.0.1:$c" \
      --listen-peer-urls "https://127.0.0.1:$p" --initial-advertise-peer-urls "https://127.0.0.1:$p" \
      --initial-cluster "$initial" --initial-cluster-state new --initial-cluster-token hie-bench \
      --cert-file "$dir/etcd.pem" --key-file "$dir/etcd.key" --trusted-ca-file "$certs/ca.pem" --client-cert-auth \
      --peer-auto-tls --logger zap --log-outputs "$dir/etcd-e$n.log" >>"$dir/etcd-e$n.out" 2>&1 &
    ETCD_PIDS+=($!)
    ETCD_URLS+=("https://127.0.0.1:$c")
    ETCD_ENDPOINTS+="${ETCD_ENDPOINTS:+,}https://127.0.0.1:$c"
  done
  ETCD_CLIENT_CERT=$(jq -r '.clients[] | select(.roles | index("consumer")) | .cert' "$cluster" | head -1)
  ETCD_CLIENT_KEY=$(jq -r '.clients[] | select(.roles | index("consumer")) | .key' "$cluster" | head -1)
  local _
  for _ in $(seq 100); do
    if curl -sf --cacert "$certs/ca.pem" --cert "$ETCD_CLIENT_CERT" --key "$ETCD_CLIENT_KEY" "${ETCD_URLS[0]}/health" \
      | grep -q true; then
      return 0
    fi
    sleep 0.2
  done
  echo "etcd did not become healthy" >&2
  tail -5 "$dir"/etcd-e1.log "$dir"/etcd-e1.out >&2
  return 1
}

# start_hie_and_etcd NAME PATIENTS: a new temporary directory ($DIR, named
# after NAME), a 3-node hie dev cluster in it (rate limit lifted, PATIENTS
# sample patients) and etcd beside it with one key a patient; both are
# stopped and the directory removed when the script exits. Sets DIR,
# CLUSTER and CERTS, and the variables of start_etcd.
start_hie_and_etcd() {
  local name="$1" patients="$2"
  DIR="$(mktemp -d -t "$name.XXXXXX")"
  ETCD_PIDS=()
  trap stop_hie_and_etcd EXIT
  "$HIE_BIN" dev up --dir "$DIR/hie" --patients "$patients" --rate-per-client-per-sec 1000000 --rate-burst 1000000 >/dev/null
  CLUSTER="$DIR/hie/cluster.json"
  CERTS="$DIR/hie/certs"
  start_etcd "$DIR" "$CERTS" "$CLUSTER"
  "$HIE_BIN" bench --target etcd --cluster "$CLUSTER" --etcd-endpoints "$ETCD_ENDPOINTS" --workload preload \
    --patients "$patients" --connections 32 >/dev/null
}

stop_hie_and_etcd() {
  local p
  for p in "${ETCD_PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  "$HIE_BIN" dev down --dir "$DIR/hie" >/dev/null 2>&1 || true
  for p in "${ETCD_PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
  rm -rf "$DIR"
}
