#!/usr/bin/env bash
# What a merge of a patient with many pointers costs, on a 3-node dev
# cluster (real processes, RocksDB on disk, libp2p, mTLS): the merge's round
# trip, the time until every node has applied it, the Raft log entries (count
# and bytes) each node appended meanwhile, the search of both
# numbers after it, and the refusal one pointer over MERGE_POINTERS_MAX.
# Usage: benches/merge.sh [--pointers N] [--rounds R] [--connections C]
#        (default 10,000 pointers, 3 rounds; tests/bench/merge.rs)
set -euo pipefail
cd "$(dirname "$0")/.."
. cluster/setup.sh
cargo build --workspace --all-targets
exec "$CARGO_TARGET_DIR/debug/hie-merge-bench" "$@"
