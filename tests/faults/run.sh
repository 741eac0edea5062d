#!/usr/bin/env bash
# Jepsen-style fault tests of real node processes, each in its own network
# namespace, with the history checked at the end.
#   tests/faults/run.sh --seconds N [--seed S] [--nodes 3|5] [--clients C] [--patients P]
#                       [--only KIND] [--power-cuts-one-node] [--no-membership-changes]
# Last line: faults: N injected, M operations, K acknowledged, L lost,
#            V linearizability violations, converged
# Needs root (namespaces, nft, loop mounts, FUSE). Each node's data is on a
# 256 MB ext4 image under /var/tmp/hie-faults, loop-mounted and seen through
# the power-cut filesystem (hie-powercut-fs) where /dev/fuse exists.
# HIE_TEST_PLANT_DURABILITY_BUG=log-fsync|snapshot-fsync|audit-fsync runs
# every node with that fsync skipped (to show the power cuts catch it).
# Installs nftables, iptables, iproute2, e2fsprogs, faketime and fiu-utils
# from Debian if missing, and NetfilterQueue (for the packet delayer,
# nfq_delay.py from ../shared/faultlab) into a venv.
set -euo pipefail
cd "$(dirname "$0")/../.."
if [ "$(id -u)" -ne 0 ]; then
  echo "tests/faults/run.sh needs root (network namespaces, nft, loop mounts, FUSE)" >&2
  exit 2
fi
missing=""
command -v nft >/dev/null 2>&1 || missing="$missing nftables"
command -v iptables >/dev/null 2>&1 || missing="$missing iptables"
command -v ip >/dev/null 2>&1 || missing="$missing iproute2"
command -v mkfs.ext4 >/dev/null 2>&1 || missing="$missing e2fsprogs"
command -v fiu-run >/dev/null 2>&1 || missing="$missing fiu-utils libfiu0"
[ -e /usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1 ] || missing="$missing faketime"
if [ -n "$missing" ]; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing >/dev/null
fi
# The packet delayer (iptables NFQUEUE + NetfilterQueue; this kernel has no
# netem, and refuses nft's own queue expression).
VENV="$HOME/.cache/hie-faults-venv"
if ! "$VENV/bin/python" -c 'import netfilterqueue' 2>/dev/null; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    libnetfilter-queue-dev build-essential python3-venv python3-dev >/dev/null
  rm -rf "$VENV"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q NetfilterQueue==1.1.0
fi
export HIE_FAULTS_PYTHON="$VENV/bin/python"
. cluster/setup.sh
cargo build -q --workspace --all-targets
BIN="${CARGO_TARGET_DIR:-target}/debug"

# Topology (as ../shared/faultlab): a bridge in its own namespace, node N in
# namespace hiefN at 10.77.0.N, and one veth from this namespace at
# 10.77.0.254 for the clients and the harness.
PREFIX=hief
NODES=3
args=("$@")
for ((i = 0; i < ${#args[@]}; i++)); do
  [ "${args[$i]}" = "--nodes" ] && NODES="${args[$((i + 1))]}"
done
CREATED=()
cleanup() {
  set +e
  for ns in "${CREATED[@]}"; do ip netns del "$ns" 2>/dev/null; done
  ip link del "${PREFIX}h" 2>/dev/null
}
trap cleanup EXIT
trap 'exit 130' INT TERM
for ns in "${PREFIX}br" $(seq -f "${PREFIX}%g" 1 "$NODES"); do
  if ip netns list | awk '{print $1}' | grep -qx "$ns"; then
    echo "namespace $ns exists (a previous run?); delete it with: ip netns del $ns" >&2
    exit 1
  fi
done
ip netns add "${PREFIX}br"; CREATED+=("${PREFIX}br")
ip -n "${PREFIX}br" link set lo up
ip -n "${PREFIX}br" link add br0 type bridge
ip -n "${PREFIX}br" link set br0 up
ip link add "${PREFIX}h" type veth peer name hostp netns "${PREFIX}br"
ip -n "${PREFIX}br" link set hostp master br0
ip -n "${PREFIX}br" link set hostp up
ip addr add 10.77.0.254/24 dev "${PREFIX}h"
ip link set "${PREFIX}h" up
for i in $(seq 1 "$NODES"); do
  ns="${PREFIX}$i"
  ip netns add "$ns"; CREATED+=("$ns")
  ip -n "$ns" link set lo up
  ip link add eth0 netns "$ns" type veth peer name "p$i" netns "${PREFIX}br"
  ip -n "${PREFIX}br" link set "p$i" master br0
  ip -n "${PREFIX}br" link set "p$i" up
  ip -n "$ns" addr add "10.77.0.$i/24" dev eth0
  ip -n "$ns" link set eth0 up
done
PATH="$BIN:$PATH" "$BIN/hie-faults" --netns "$PREFIX" "$@"
