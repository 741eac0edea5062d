#!/usr/bin/env bash
# Where a workload's CPU goes, thread by thread: starts a 3-region dev
# cluster, runs `hie bench` against it, and prints for every node thread
# (grouped by name) and for the load generator the CPU time and context
# switches each operation cost. A thread woken for every request shows up
# here long before it shows in throughput.
# Usage: benches/threads.sh [WORKLOAD] [SECONDS] [CONNECTIONS] [dev up flags...]  (default create 10 32)
set -euo pipefail
cd "$(dirname "$0")/.."
. cluster/setup.sh
cargo build --workspace --all-targets
WORKLOAD="${1:-create}"
SECS="${2:-10}"
CONNS="${3:-32}"
shift $(( $# < 3 ? $# : 3 ))
DIR="$(mktemp -d -t hie-threads.XXXXXX)"
trap '"$HIE_BIN" dev down --dir "$DIR/c" >/dev/null 2>&1 || true; rm -rf "$DIR"' EXIT
"$HIE_BIN" dev up --dir "$DIR/c" --patients 2000 --rate-per-client-per-sec 1000000 --rate-burst 1000000 "$@" >/dev/null
PIDS=$(jq -r '.nodes[].pid' "$DIR/c/cluster.json")

snapshot() { # OUT: every node thread's pid, name, CPU seconds and context switches
  python3 - "$1" $PIDS <<'PY'
import json, os, sys
hz, out = os.sysconf('SC_CLK_TCK'), {}
for pid in sys.argv[2:]:
    for tid in os.listdir(f'/proc/{pid}/task'):
        try:
            st = open(f'/proc/{pid}/task/{tid}/stat').read()
            f = st[st.rindex(')') + 2:].split()
            sw = sum(int(l.split()[1]) for l in open(f'/proc/{pid}/task/{tid}/status') if 'ctxt_switches' in l)
            out[tid] = [pid, st[st.index('(') + 1:st.rindex(')')], (int(f[11]) + int(f[12])) / hz, sw]
        except (FileNotFoundError, ProcessLookupError):
            pass
json.dump(out, open(sys.argv[1], 'w'))
PY
}

snapshot "$DIR/before.json"
/usr/bin/time -f '%U %S' -o "$DIR/loadgen.time" "$HIE_BIN" bench --cluster "$DIR/c/cluster.json" --workload "$WORKLOAD" \
  --connections "$CONNS" --seconds "$SECS" --warmup-seconds 0 --patients 2000 --json >"$DIR/bench.json"
snapshot "$DIR/after.json"
THROUGHPUT=$(tail -1 "$DIR/bench.json" | jq .throughput)
python3 - "$DIR/before.json" "$DIR/after.json" "$DIR/loadgen.time" "$THROUGHPUT" "$SECS" "$WORKLOAD" <<'PY'
import collections, json, re, sys
a, b = json.load(open(sys.argv[1])), json.load(open(sys.argv[2]))
user, sys_ = map(float, open(sys.argv[3]).read().split()[-2:])
tput, secs = float(sys.argv[4]), float(sys.argv[5])
ops = tput * secs
print(f'{sys.argv[6]}: {tput:.0f} ops/s over {secs:.0f} s; per operation:')
rows, total = collections.defaultdict(lambda: [0.0, 0]), collections.defaultdict(lambda: [0.0, 0])
for tid, (pid, name, cpu, sw) in b.items():
    c0, s0 = a.get(tid, [0, 0, 0.0, 0])[2:]
    key = (pid, re.sub(r'[-_:]?\d+$', '', name))
    rows[key][0] += cpu - c0; rows[key][1] += sw - s0
    total[pid][0] += cpu - c0; total[pid][1] += sw - s0
for (pid, name), (c, s) in sorted(rows.items(), key=lambda r: -r[1][0]):
    if c * 1e6 / ops >= 0.5 or s / ops >= 0.05:
        print(f'  node {pid:>7} {name:<20} {c * 1e6 / ops:7.1f} us CPU {s / ops:6.2f} switches')
for pid, (c, s) in total.items():
    print(f'  node {pid:>7} {"(all threads)":<20} {c * 1e6 / ops:7.1f} us CPU {s / ops:6.2f} switches')
print(f'  load generator {"":<13} {(user + sys_) * 1e6 / ops:7.1f} us CPU')
PY
