#!/usr/bin/env bash
# Orchestrator overhead end to end: `ferry run` of runbooks of no-op steps
# (1,000 in 10 chains, and 200 in one chain) with the state on SQLite and on
# the PostgreSQL server at 127.0.0.1:5432. Every step's start and end are
# committed to the state before the next decision, so this is the real
# per-step cost of scheduling. Also runs `cargo bench -p ferry-engine` (the
# pure engine). Writes bench/results/engine-latest.md.
#   usage: bench/engine.sh
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-/var/tmp/ferry-target}
cargo build --release --locked -p ferry-orchestrator >/dev/null
ferry=$CARGO_TARGET_DIR/release/ferry
work=$(mktemp -d /var/tmp/ferry-bench-engine.XXXXXX)
db=ferry_bench_$$
trap 'rm -rf "$work"; psql -h 127.0.0.1 -U postgres -d postgres -qc "DROP DATABASE IF EXISTS $db" >/dev/null 2>&1 || true' EXIT

gen() { # gen LANES PER FILE
  python3 - "$@" <<'PY'
import sys
lanes, per, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
with open(out, "w") as f:
    f.write("name: noop-%dx%d\ntargets:\n  local: { type: local, parallelism: 16 }\nsteps:\n" % (lanes, per))
    for l in range(lanes):
        for i in range(per):
            f.write("  - id: s%d-%d\n    uses: noop\n" % (l, i))
            if i:
                f.write("    needs: s%d-%d\n" % (l, i - 1))
PY
}
gen 10 100 "$work/wide.yaml"
gen 1 200 "$work/chain.yaml"

out=bench/results/engine-latest.md
mkdir -p bench/results
{
  echo "# Orchestrator overhead ($(date -u +%Y-%m-%dT%H:%MZ), $(nproc) cores)"
  echo
  echo '```'
  cargo bench --locked -p ferry-engine --bench engine 2>/dev/null | grep -E 'plan|engine'
  echo '```'
  echo
  echo "wall: the whole \`ferry run\` process; in run: from the run's creation to its last event (state open, runtime start and exit excluded)."
  echo
  echo "| runbook | state | steps | wall s | in run s | ms per step (wall) | ms per step (in run) |"
  echo "|---|---|---:|---:|---:|---:|---:|"
} >"$out"
psql -h 127.0.0.1 -U postgres -d postgres -qc "CREATE DATABASE $db" >/dev/null
for rb in wide chain; do
  steps=$(grep -c '^  - id:' "$work/$rb.yaml")
  for state in "sqlite://$work/state-$rb.db" "postgres://postgres@127.0.0.1:5432/$db"; do
    kind=${state%%:*}
    t0=$(date +%s.%N)
    FERRY_HOME=$work/home "$ferry" --quiet --state "$state" run "$work/$rb.yaml" --id "$rb-$kind" >/dev/null
    t1=$(date +%s.%N)
    inrun=$(FERRY_HOME=$work/home "$ferry" --state "$state" --json runs --limit 1 |
      python3 -c 'import json,sys; r=json.load(sys.stdin)[0]; print((r["finished_ms"]-r["created_ms"])/1000)')
    python3 -c "w=$t1-$t0; r=$inrun; print(f'| $rb | $kind | $steps | {w:.2f} | {r:.2f} | {w*1000/$steps:.2f} | {r*1000/$steps:.2f} |')" >>"$out"
  done
done
cat "$out"
