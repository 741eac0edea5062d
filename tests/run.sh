#!/usr/bin/env bash
# Builds everything once (one profile) and runs every test: unit, property,
# openraft's storage suite, and the multi-process cluster tests.
set -euo pipefail
cd "$(dirname "$0")/.."
. cluster/setup.sh
cargo build --workspace --all-targets
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --workspace --profile ci --no-fail-fast "$@"
else
  cargo test --workspace --no-fail-fast "$@"
fi
