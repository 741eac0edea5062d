#!/usr/bin/env bash
# FHIR Subscriptions on a 3-node dev cluster (real processes, RocksDB on disk,
# libp2p, mTLS both ways) with a local HTTPS receiver:
#   latency: from a create's 201 to the receiver's 2xx for its notification,
#            100 subscriptions, creates at 100/s and 1,000/s (open loop);
#   cost:    creates/s, 64 in flight, with 0, 100 and 10,000 subscriptions,
#            in that order and reversed (ABBA), in one cluster.
# Usage: benches/subscriptions.sh latency [--subscriptions N] [--rates 100,1000] [--seconds S]
#        benches/subscriptions.sh cost [--counts 0,100,10000] [--seconds S] [--connections C] [--matching yes|no]
#        (tests/bench/subscriptions.rs)
set -euo pipefail
cd "$(dirname "$0")/.."
. cluster/setup.sh
cargo build --workspace --all-targets
exec "$CARGO_TARGET_DIR/debug/hie-subscription-bench" "$@"
