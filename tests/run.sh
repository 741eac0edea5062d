#!/usr/bin/env bash
# Builds everything once (one profile) and runs every test: unit, property,
# openraft's storage suite, and the multi-process cluster tests.
set -euo pipefail
cd "$(dirname "$0")/.."
. cluster/setup.sh
cargo build --workspace --all-targets

# promtool (metrics, alert rules, Prometheus config) and headless Chromium
# (the status page), from Debian's packages.
missing=""
command -v promtool >/dev/null 2>&1 || missing="$missing prometheus"
command -v chromium >/dev/null 2>&1 || missing="$missing chromium"
if [ -n "$missing" ]; then
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends $missing >/dev/null
fi

# A real FHIR R4 library and a stock FHIR client, for the conformance test.
VENV="$HOME/.cache/hie-venv"
if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/pip" install -q -r tests/fhir/requirements.txt; then
  rm -rf "$VENV"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q -r tests/fhir/requirements.txt
fi
export HIE_FHIR_PYTHON="$VENV/bin/python"
status=0
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --workspace --profile ci --no-fail-fast "$@" || status=$?
else
  cargo test --workspace --no-fail-fast "$@" || status=$?
fi
# The deterministic simulation, 1,000 seeds (its own build; see the script).
tests/sim.sh 1000 || status=$?
# A bounded fault run against real node processes, where this machine lets
# us make network namespaces (root); longer soaks are run by hand.
if [ "$(id -u)" -eq 0 ] && ip netns add hie-probe 2>/dev/null; then
  ip netns del hie-probe
  tests/faults/run.sh --seconds 60 --seed 1 || status=$?
else
  echo "faults: skipped (network namespaces need root here)"
fi
exit $status
