#!/usr/bin/env bash
# Sets up a fresh machine, builds hie, and starts a local 3-region cluster
# with sample data in .hie-dev/ (in the background; stop it with
# `cluster/dev.sh down`). Extra arguments go to `hie dev up`.
set -euo pipefail
cd "$(dirname "$0")/.."
. cluster/setup.sh
cargo build --workspace --all-targets
if [ "${1:-}" = "down" ]; then
  exec "$HIE_BIN" dev down --dir .hie-dev
fi
exec "$HIE_BIN" dev up --dir .hie-dev "$@"
