#!/usr/bin/env bash
# Runs every cargo-fuzz target for a bounded time (default 60 s each) and
# fails on the first crash. Usage: tests/fuzz/run.sh [--seconds N]
# Needs cargo-fuzz (installed here if missing). The toolchain is stable, so
# RUSTC_BOOTSTRAP=1 lets cargo-fuzz pass its sanitizer flags.
set -euo pipefail
cd "$(dirname "$0")"
SECONDS_EACH=60
if [ "${1:-}" = "--seconds" ]; then SECONDS_EACH="$2"; fi
command -v cargo-fuzz >/dev/null 2>&1 || cargo install cargo-fuzz --locked
export RUSTC_BOOTSTRAP=1
export CARGO_TARGET_DIR="${HIE_FUZZ_TARGET_DIR:-$HOME/.cache/hie-fuzz-target}"
unset CARGO_INCREMENTAL
for target in nhs_number document_reference search_params search_body; do
  mkdir -p "corpus/$target"
  cp seeds/"$target"* "corpus/$target/" 2>/dev/null || true
  echo "fuzzing $target for $SECONDS_EACH s"
  cargo fuzz run --fuzz-dir . "$target" "corpus/$target" -- -max_total_time="$SECONDS_EACH" -max_len=65536 2>&1 \
    | grep -E "^(#[0-9]+.*DONE|Done|==[0-9]+==|SUMMARY|thread .* panicked)" || true
  # cargo fuzz exits non-zero on a crash; PIPESTATUS keeps that.
  [ "${PIPESTATUS[0]}" -eq 0 ] || { echo "fuzz target $target crashed: see tests/fuzz/artifacts/$target" >&2; exit 1; }
done
echo "fuzz: every target ran $SECONDS_EACH s without a crash"
