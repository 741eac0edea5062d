#!/usr/bin/env bash
# Two builds side by side, one create in flight: two 3-region dev clusters,
# one from each binary, and oha (`-c 1`) sending creates to each cluster's
# leader in turn, short runs in ABBA order, so drift in this shared machine
# falls on both alike. Creates carry the sample NRLF pointer
# (tests/data/nrlf/valid.json) for 100 patients, a different one each time.
# Usage: benches/ab-one-create.sh BIN_A BIN_B [SECONDS] [PAIRS]  (default 5 6)
# Each pair prints both p50 and p99 (ms); the last line is `mean p50 A X B Y ms`.
set -euo pipefail
cd "$(dirname "$0")/.."
A="$1"; B="$2"; S="${3:-5}"; P="${4:-6}"
command -v oha >/dev/null || cargo install --locked oha --version 1.16.0
DIR="$(mktemp -d -t hie-ab1.XXXXXX)"
trap '"$A" dev down --dir "$DIR/a" >/dev/null 2>&1 || true; "$B" dev down --dir "$DIR/b" >/dev/null 2>&1 || true; rm -rf "$DIR"' EXIT
"$A" dev up --dir "$DIR/a" --patients 100 --rate-per-client-per-sec 1000000 --rate-burst 1000000 >/dev/null
"$B" dev up --dir "$DIR/b" --patients 100 --rate-per-client-per-sec 1000000 --rate-burst 1000000 >/dev/null
python3 - "$DIR/creates" tests/data/nrlf/valid.json <<'PY'
import json, sys
sample = json.load(open(sys.argv[2]))
sample.pop("masterIdentifier", None)
with open(sys.argv[1], "w") as out:
    for i in range(100):
        prefix = 90_000_000 + i  # the dev cluster's sample patients
        for d in range(10):
            digits = [int(c) for c in str(prefix * 10 + d)]
            check = 11 - sum(x * (10 - k) for k, x in enumerate(digits)) % 11
            check = 0 if check == 11 else check
            if check != 10:
                break
        doc = dict(sample, subject={"identifier": {"system": "https://fhir.nhs.uk/Id/nhs-number",
                                                  "value": f"{prefix * 10 + d}{check}"}})
        out.write(json.dumps(doc, separators=(",", ":")) + "\n")
PY
leader_port() { # CLUSTER_DIR -> the leader's API port
  local l
  l=$(curl -sf "$(jq -r '.nodes[0].admin_url' "$1/cluster.json")/metrics" | awk '/^hie_raft_leader_id / {print $2}')
  jq -r ".nodes[$((l - 1))].api_url" "$1/cluster.json" | sed 's|.*:\([0-9]*\)/fhir|\1|'
}
run() { # CLUSTER_DIR -> "p50 p99" in ms
  local c="$1/certs/client-gp-practice-a"
  oha --no-tui -z "${S}s" -c 1 --cacert "$1/certs/ca.pem" --cert "$c.pem" --key "$c.key" -m POST \
    -T application/fhir+json -H "prefer: return=minimal" -Z "$DIR/creates" \
    "https://localhost:$(leader_port "$1")/fhir/DocumentReference" --output-format json --stats-success-breakdown \
    | jq -r '[.latencyPercentilesSuccessful | .p50, .p99 | . * 1000 * 100 | round / 100] | @tsv'
}
sa=0; sb=0
for p in $(seq "$P"); do
  if [ $((p % 2)) -eq 1 ]; then ra=$(run "$DIR/a"); rb=$(run "$DIR/b"); else rb=$(run "$DIR/b"); ra=$(run "$DIR/a"); fi
  read -r a50 a99 <<<"$ra"; read -r b50 b99 <<<"$rb"
  echo "pair $p: p50 ms A $a50 B $b50  p99 ms A $a99 B $b99"
  sa=$(echo "$sa + $a50" | bc -l); sb=$(echo "$sb + $b50" | bc -l)
done
printf 'mean p50 A %.2f B %.2f ms\n' "$(echo "$sa / $P" | bc -l)" "$(echo "$sb / $P" | bc -l)"
