#!/usr/bin/env bash
# What the fault harness's power-cut filesystem costs, so that throughput
# figures from fault runs can be read honestly: two 3-region dev clusters
# side by side, each node's data on its own 256 MiB ext4 image on this
# machine's disk (loop-mounted), as in tests/faults; in cluster B the data
# is seen through hie-powercut-fs (tests/powercut), in A directly. Short
# closed-loop create runs alternate between them (ABBA), so drift in the
# machine falls on both alike.
# Usage: benches/powercut-overhead.sh [SECONDS] [CONNECTIONS] [PAIRS]  (default 5 32 6)
# Needs root (loop mounts, FUSE).
# Last line: `power-cut filesystem: B/A X of creates/s`.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" -ne 0 ] || [ ! -e /dev/fuse ]; then
  echo "benches/powercut-overhead.sh needs root and /dev/fuse (loop mounts, FUSE)" >&2
  exit 2
fi
. cluster/setup.sh
cargo build --workspace --all-targets
BIN="${CARGO_TARGET_DIR:-target}/debug"
SECONDS_EACH="${1:-5}"
CONNECTIONS="${2:-32}"
PAIRS="${3:-6}"
DIR="$(mktemp -d -p /var/tmp -t hie-powercut-ab.XXXXXX)"
FS_PIDS=()
cleanup() {
  set +e
  "$HIE_BIN" dev down --dir "$DIR/a" >/dev/null 2>&1
  "$HIE_BIN" dev down --dir "$DIR/b" >/dev/null 2>&1
  for p in "${FS_PIDS[@]}"; do kill -TERM "$p" 2>/dev/null; done
  sleep 1
  for m in $(grep -o "$DIR[^ ]*" /proc/mounts | sort -r); do umount -l "$m" 2>/dev/null; done
  rm -rf "$DIR"
}
trap cleanup EXIT

# Puts a stopped cluster's node directories on loop-mounted ext4 images,
# through hie-powercut-fs when $2 is "powercut".
disks() { # CLUSTER_DIR MODE
  local c="$1" mode="$2"
  for node in "$c"/node-*/; do
    node="${node%/}"
    local img="$node.img" lower="$node.lower"
    truncate -s 256M "$img" && mkfs.ext4 -q -F "$img"
    mkdir -p "$lower" && mount -o loop "$img" "$lower"
    if [ "$mode" = powercut ]; then
      mkdir "$lower/root" && cp -a "$node/." "$lower/root/"
      "$BIN/hie-powercut-fs" "$lower" "$node" >"$node.fs.log" 2>&1 &
      FS_PIDS+=("$!")
      for _ in $(seq 100); do grep -q ready "$node.fs.log" && break; sleep 0.1; done
      grep -q ready "$node.fs.log" || { echo "hie-powercut-fs did not mount $node" >&2; exit 1; }
    else
      cp -a "$node/." "$lower/" && mount --bind "$lower" "$node"
    fi
  done
}

for side in a b; do
  "$HIE_BIN" dev up --dir "$DIR/$side" --patients 2000 --rate-per-client-per-sec 1000000 --rate-burst 1000000 >/dev/null
  "$HIE_BIN" dev down --dir "$DIR/$side" >/dev/null
done
disks "$DIR/a" plain
disks "$DIR/b" powercut
for side in a b; do "$HIE_BIN" dev up --dir "$DIR/$side" >/dev/null; done

run() { # CLUSTER_DIR -> creates/s
  "$HIE_BIN" bench --cluster "$1/cluster.json" --workload create --connections "$CONNECTIONS" \
    --seconds "$SECONDS_EACH" --warmup-seconds 1 --patients 2000 --json | tail -1 | jq .throughput
}

run "$DIR/a" >/dev/null; run "$DIR/b" >/dev/null
a_total=0; b_total=0; ratios=()
for p in $(seq "$PAIRS"); do
  if [ $((p % 2)) -eq 1 ]; then a=$(run "$DIR/a"); b=$(run "$DIR/b"); else b=$(run "$DIR/b"); a=$(run "$DIR/a"); fi
  ratios+=("$(echo "$b / $a" | bc -l)")
  printf 'pair %s: A (ext4) %.0f creates/s, B (ext4 through hie-powercut-fs) %.0f creates/s, B/A %.3f\n' \
    "$p" "$a" "$b" "${ratios[-1]}"
  a_total=$(echo "$a_total + $a" | bc -l); b_total=$(echo "$b_total + $b" | bc -l)
done
printf 'creates/s, mean of %s pairs: A (ext4) %.0f, B (through hie-powercut-fs) %.0f\n' \
  "$PAIRS" "$(echo "$a_total / $PAIRS" | bc -l)" "$(echo "$b_total / $PAIRS" | bc -l)"
printf 'power-cut filesystem: B/A %.3f of creates/s (median pair %.3f)\n' "$(echo "$b_total / $a_total" | bc -l)" \
  "$(printf '%s\n' "${ratios[@]}" | sort -g | awk '{v[NR]=$1} END{print (NR%2 ? v[(NR+1)/2] : (v[NR/2]+v[NR/2+1])/2)}')"
