#!/usr/bin/env bash
# The criterion micro-benchmarks of the hot paths (benches/hot_paths.rs),
# from the workspace's one build (so RocksDB is not compiled a second time
# in another profile): NHS Number parsing, pointer encode and decode,
# applying a batch of 64 creates, a patient search in RocksDB, DocumentReference
# parsing and searchset rendering, and paging a patient with 50,000 pointers.
#   benches/micro.sh [FILTER]     (for example: benches/micro.sh fhir)
set -euo pipefail
cd "$(dirname "$0")/.."
. cluster/setup.sh
cargo build --workspace --all-targets
BIN=$(ls -t "$CARGO_TARGET_DIR"/debug/deps/hot_paths-* | grep -v '\.d$' | head -1)
"$BIN" --bench "$@"
