#!/usr/bin/env bash
# Measures how long a new region takes to catch up by snapshot.
# Starts a 3-region dev cluster preloaded with PATIENTS synthetic patients
# (about 1.5 pointers each), takes a snapshot, adds a 4th region and reports
# the time until it is ready and the snapshot install time from its log.
# Usage: benches/snapshot-catchup.sh [PATIENTS]   (default 66667: ~100,000 pointers)
set -euo pipefail
cd "$(dirname "$0")/.."
. cluster/setup.sh
cargo build --workspace --all-targets
PATIENTS="${1:-66667}"
DIR="$(mktemp -d -t hie-catchup.XXXXXX)"
trap '"$HIE_BIN" dev down --dir "$DIR" >/dev/null 2>&1 || true; rm -rf "$DIR"' EXIT
"$HIE_BIN" dev up --dir "$DIR" --patients "$PATIENTS" --snapshot-logs-since-last 20000
# Snapshot on the leader, so the learner receives (nearly) everything by snapshot.
LEADER=$("$HIE_BIN" cluster status --cluster "$DIR/cluster.json" --json | jq .leader_id)
"$HIE_BIN" cluster snapshot --cluster "$DIR/cluster.json" --node "$LEADER" >/dev/null
sleep 5
start=$(date +%s.%N)
"$HIE_BIN" dev add-node --dir "$DIR" --region south-west
end=$(date +%s.%N)
echo "pointers: $(curl -s "$(jq -r '.nodes[0].admin_url' "$DIR/cluster.json")/digest" | jq .records) state records"
grep "installed snapshot" "$DIR/node-4/hie.log" | tail -1
printf 'catch-up (add-node until ready): %.1f s\n' "$(echo "$end - $start" | bc)"
