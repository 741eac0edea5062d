#!/usr/bin/env bash
# Measures how long a new region takes to catch up by snapshot, and what a
# node costs per pointer. Starts a 3-region dev cluster preloaded with
# PATIENTS synthetic patients (about 1.5 pointers each), reports each node's
# disk (its RocksDB store, and its whole data directory) and resident memory
# per pointer, takes a snapshot, adds a 4th region and reports the time until
# it is ready, the snapshot install time from its log, and every node's peak
# resident memory (VmHWM: the most it ever held, snapshot build, send and
# install included). The preload goes through the bulk-load path (batch
# Bundles), and its time is printed by `hie dev up` ("seeded ...").
# Usage: benches/snapshot-catchup.sh [PATIENTS] [SAMPLE]   (default 66667: ~100,000
# pointers; SAMPLE `minimal` or `nrlf`, the shape of each pointer: `hie dev up --sample`)
set -euo pipefail
cd "$(dirname "$0")/.."
. cluster/setup.sh
cargo build --workspace --all-targets
PATIENTS="${1:-66667}"
SAMPLE="${2:-minimal}"
DIR="$(mktemp -d -t hie-catchup.XXXXXX)"
trap '"$HIE_BIN" dev down --dir "$DIR" >/dev/null 2>&1 || true; rm -rf "$DIR"' EXIT
"$HIE_BIN" dev up --dir "$DIR" --patients "$PATIENTS" --sample "$SAMPLE" --snapshot-logs-since-last 20000
ADMIN=$(jq -r '.nodes[0].admin_url' "$DIR/cluster.json")
# Every node's figures once every node has applied the whole preload (the
# seeding returns when the writes are committed, not applied everywhere).
pointers_on() { curl -s "$1/metrics" | awk '$1 == "hie_pointers" { print $2 }'; }
for _ in $(seq 120); do
  counts=$(for url in $(jq -r '.nodes[].admin_url' "$DIR/cluster.json"); do pointers_on "$url"; done | sort -u)
  [ "$(wc -l <<<"$counts")" -eq 1 ] && break
  sleep 1
done
POINTERS=$(pointers_on "$ADMIN")
for d in "$DIR"/node-*/; do
  pid=$(cat "$d/hie.pid")
  store=$(du -sb "$d/store" | cut -f1); all=$(du -sb "$d" | cut -f1)
  rss=$(awk '/^VmRSS/ { print $2 * 1024 }' "/proc/$pid/status")
  echo "$(basename "$d"): peak resident during the preload $(awk '/^VmHWM/ { print int($2 / 1024) }' "/proc/$pid/status") MiB"
  printf '%s: %s pointers; store %.1f MB (%.0f bytes a pointer), data dir %.1f MB; resident %.1f MiB (%.0f bytes a pointer)\n' \
    "$(basename "$d")" "$POINTERS" "$(echo "$store / 1000000" | bc -l)" "$(echo "$store / $POINTERS" | bc -l)" \
    "$(echo "$all / 1000000" | bc -l)" "$(echo "$rss / 1048576" | bc -l)" "$(echo "$rss / $POINTERS" | bc -l)"
done
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
for d in "$DIR"/node-*/; do
  pid=$(cat "$d/hie.pid")
  printf '%s: peak resident %.0f MiB, now %.0f MiB\n' "$(basename "$d")" \
    "$(awk '/^VmHWM/ { print $2 / 1024 }' "/proc/$pid/status")" "$(awk '/^VmRSS/ { print $2 / 1024 }' "/proc/$pid/status")"
done
ls -l "$DIR"/node-*/store/snapshots/
