#!/usr/bin/env bash
# What a slow replica costs a replicated repository.
#
# In one run, in ROUNDS interleaved rounds (default 3; figures are medians):
#   two     a full backup into 2 directory replicas, write quorum 2, every PUT
#           delayed by FAST (default 40ms: a cloud PUT)
#   three   the same backup into 3 replicas, write quorum 2, two delayed by
#           FAST and one by SLOW (default 400ms: 10x slower)
# For each: the backup's wall time, and how long its writes waited for their
# quorum (p50, p99, from the backup's JSON summary, `replication`). The goal
# of issue 17: the slow third replica costs at most 10% over the two fast ones.
# After the last round, `ferry repair` of the three-replica repository and a
# restore read from it are timed, and the restore is compared with the image.
# The delays are injected by FERRY_FAULTS (connectors/src/faults.rs), one spec
# per replica (`at=`).
#
# Usage: bench/replicas.sh [--quick] [--rounds N] [--out FILE]
# Env:   SIZE_MIB (1024), ROUNDS (3), FAST (40ms), SLOW (400ms),
#        FERRY_BENCH_DIR (/var/tmp/ferry-bench), FERRY_BIN, CARGO_TARGET_DIR
set -euo pipefail

BENCH_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
OUT="$BENCH_ROOT/results/replicas-latest.md"
SIZE_MIB=${SIZE_MIB:-1024}
ROUNDS=${ROUNDS:-3}
FAST=${FAST:-40ms}
SLOW=${SLOW:-400ms}
while [[ $# -gt 0 ]]; do
  case $1 in
    --quick) SIZE_MIB=256; ROUNDS=2; shift ;;
    --out) OUT=$2; shift 2 ;;
    --rounds) ROUNDS=$2; shift 2 ;;
    -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
    *) echo "unknown argument: $1" >&2; exit 2 ;;
  esac
done

BENCH_DIR=${FERRY_BENCH_DIR:-/var/tmp/ferry-bench}
RUN="$BENCH_DIR/replicas"
TARGET=${CARGO_TARGET_DIR:-/var/tmp/ferry-target}
FERRY=${FERRY_BIN:-$TARGET/release/ferry}
export FERRY_PASSWORD=bench-password FERRY_HOME="$RUN/home" FERRY_LOG=error
unset FERRY_REPO FERRY_FAULTS FERRY_READ_REPLICA

log() { printf '[replicas %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }

if [[ ! -x $FERRY ]]; then
  log "building ferry (release)"
  cargo build --release -p ferry-orchestrator >&2
fi

rm -rf "$RUN"
mkdir -p "$RUN"
trap '[[ ${KEEP_REPOS:-} == 1 ]] || rm -rf "$RUN"' EXIT

# A disk of incompressible and compressible data with holes: 1/4 random,
# 1/4 text-like, the rest holes.
DISK="$RUN/disk.img"
log "making a ${SIZE_MIB} MiB image"
python3 - "$DISK" "$SIZE_MIB" <<'PY'
import os, random, sys
path, mib = sys.argv[1], int(sys.argv[2])
rng = random.Random(17)
words = [bytes(rng.choice(b"abcdefghijklmnop ") for _ in range(rng.randint(3, 9))) for _ in range(500)]
with open(path, "wb") as f:
    f.truncate(mib << 20)
    for i in range(mib):
        kind = i % 4
        if kind == 0:
            f.seek(i << 20); f.write(os.urandom(1 << 20))
        elif kind == 1:
            f.seek(i << 20)
            buf = bytearray()
            while len(buf) < (1 << 20):
                buf += rng.choice(words) + b" "
            f.write(bytes(buf[: 1 << 20]))
PY

# backup NAME REPLICAS... : one full backup into a new repository, prints
# "wall p50 p99" (seconds, milliseconds, milliseconds).
backup() {
  local name=$1; shift
  local first=$1; shift
  local args=() faults="put-latency=$FAST"
  for r in "$@"; do args+=(--replica "$r"); done
  [[ $name == three ]] && faults="put-latency=$FAST; put-latency=$SLOW at=/slow"
  rm -rf "$RUN/$name"
  mkdir -p "$RUN/$name"
  "$FERRY" -q -r "$first" init "${args[@]}" --write-quorum 2 >/dev/null
  local start end
  start=$(date +%s.%N)
  FERRY_FAULTS="$faults" "$FERRY" -q --json -r "$first" backup --source bench "$DISK" > "$RUN/$name.json"
  end=$(date +%s.%N)
  python3 - "$RUN/$name.json" "$start" "$end" <<'PY'
import json, sys
s = json.load(open(sys.argv[1]))
r = s["replication"]
print(f"{float(sys.argv[3]) - float(sys.argv[2]):.3f} {r['wait_p50_ms']:.1f} {r['wait_p99_ms']:.1f}")
PY
}

declare -a TWO THREE
for round in $(seq 1 "$ROUNDS"); do
  # Interleaved, the order alternating by round.
  for which in two three; do
    [[ $((round % 2)) == 0 ]] && which=$([[ $which == two ]] && echo three || echo two)
    if [[ $which == two ]]; then
      res=$(backup two "$RUN/two/a" "$RUN/two/b")
      TWO+=("$res"); log "round $round two:   $res"
    else
      res=$(backup three "$RUN/three/a" "$RUN/three/b" "$RUN/three/slow")
      THREE+=("$res"); log "round $round three: $res"
    fi
  done
done

median() { sort -n | awk '{a[NR]=$1} END {print (NR % 2) ? a[(NR+1)/2] : (a[NR/2] + a[NR/2+1]) / 2}'; }
col() { local i=$1; shift; for x in "$@"; do echo "$x" | awk -v i="$i" '{print $i}'; done; }
W2=$(col 1 "${TWO[@]}" | median); W3=$(col 1 "${THREE[@]}" | median)
P50_2=$(col 2 "${TWO[@]}" | median); P50_3=$(col 2 "${THREE[@]}" | median)
P99_2=$(col 3 "${TWO[@]}" | median); P99_3=$(col 3 "${THREE[@]}" | median)

# The last three-replica repository: what the slow replica lacks, its repair,
# and a restore from the set.
log "check, repair and restore of the three-replica repository"
behind=$("$FERRY" -q --json -r "$RUN/three/a" check | python3 -c 'import json,sys; r=json.load(sys.stdin)["replicas"]["replicas"]; print(" ".join(str(x["missing"]) for x in r))' || true)
start=$(date +%s.%N)
"$FERRY" -q --json -r "$RUN/three/a" repair > "$RUN/repair.json"
end=$(date +%s.%N)
REPAIR=$(echo "$end - $start" | bc)
start=$(date +%s.%N)
FERRY_FAULTS="latency=0ms; latency=20ms at=/slow" "$FERRY" -q -r "$RUN/three/a" restore bench@latest --to "$RUN/restored.img" >/dev/null
end=$(date +%s.%N)
RESTORE=$(echo "$end - $start" | bc)
cmp "$DISK" "$RUN/restored.img" || { log "restore differs"; exit 1; }

ratio() { python3 -c "print(f'{$1 / $2:.2f}')"; }
mkdir -p "$(dirname "$OUT")"
{
  echo "# Replicated repository: the cost of a slow replica"
  echo
  echo "$(date -u +%Y-%m-%dT%H:%MZ), $(nproc) cores; ${SIZE_MIB} MiB image; $ROUNDS interleaved rounds, medians."
  echo "PUT delays injected per replica: fast $FAST, slow $SLOW (FERRY_FAULTS)."
  echo
  echo "| full backup | two fast replicas, quorum 2 | two fast + one slow, quorum 2 | three / two |"
  echo "|---|---|---|---|"
  echo "| wall time (s) | $W2 | $W3 | $(ratio "$W3" "$W2") |"
  echo "| write wait p50 (ms) | $P50_2 | $P50_3 | $(ratio "$P50_3" "$P50_2") |"
  echo "| write wait p99 (ms) | $P99_2 | $P99_3 | $(ratio "$P99_3" "$P99_2") |"
  echo
  echo "After the last three-replica backup, objects each replica lacked: $behind (a, b, slow);"
  echo "\`ferry repair\` took $(printf %.2f "$REPAIR") s without delays; a restore from the set (slow replica 20 ms per request) took $(printf %.2f "$RESTORE") s and matched the image."
  echo
  echo "Rounds (wall s, p50 ms, p99 ms): two: ${TWO[*]}; three: ${THREE[*]}."
} | tee "$OUT"
