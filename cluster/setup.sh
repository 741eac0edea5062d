#!/usr/bin/env bash
# Prerequisites and build settings shared by cluster/dev.sh and tests/run.sh.
# Source it: `. cluster/setup.sh`. Installs what a fresh Debian machine lacks.
set -euo pipefail

# RocksDB's bindings are generated with bindgen, which needs libclang.
# (libclang.so or libclang-N.so: libclang-cpp, which some machines have
# without it, is not what bindgen loads.)
have_libclang() {
  compgen -G '/usr/lib/llvm-*/lib/libclang.so*' >/dev/null \
    || compgen -G '/usr/lib/llvm-*/lib/libclang-[0-9]*.so*' >/dev/null \
    || ldconfig -p 2>/dev/null | grep -Eq 'libclang(-[0-9.]+)?\.so'
}
if ! have_libclang; then
  echo "installing libclang-dev (needed to build RocksDB's bindings)..." >&2
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq libclang-dev >/dev/null
fi

# One target directory outside the clone, reused by later builds; one profile.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/hie-target}"
export CARGO_INCREMENTAL=0
export HIE_BIN="$CARGO_TARGET_DIR/debug/hie"
