#!/usr/bin/env bash
# Delta restore against a full restore, on the benchmark's ext4 image.
#
# The image bench/run.sh builds (and caches) is backed up once. Then, in
# ROUNDS interleaved rounds (default 3; figures are medians):
#   full    `ferry restore` of the point into a new file
#   delta   a copy of the image with 1% of it rewritten as scattered 4 KiB
#           blocks (bench/helpers.py writes, a new seed each round), then
#           `ferry restore --delta` of the point over it
#   base    failback: that changed copy backed up as a second point (not
#           timed), then restored over a pristine copy of the image with
#           `--delta --base FIRST-POINT`: what the points share is not read
# Both outputs are compared with the image (cmp). Reported: wall times and
# their ratio (goal of issue 17: delta >= 10x faster), and the delta's bytes
# written, chunks fetched and bytes read from the repository against the
# bytes changed (goal: written <= 1.5x changed).
#
# Usage: bench/delta.sh [--quick] [--rounds N] [--out FILE]
# Env:   SIZE_MIB (2048), ROUNDS (3), FERRY_BENCH_DIR (/var/tmp/ferry-bench),
#        FERRY_BIN, CARGO_TARGET_DIR
set -euo pipefail

BENCH_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
OUT="$BENCH_ROOT/results/delta-latest.md"
SIZE_MIB=${SIZE_MIB:-2048}
ROUNDS=${ROUNDS:-3}
while [[ $# -gt 0 ]]; do
  case $1 in
    --quick) SIZE_MIB=256; ROUNDS=2; shift ;;
    --out) OUT=$2; shift 2 ;;
    --rounds) ROUNDS=$2; shift 2 ;;
    -h|--help) sed -n '2,17p' "$0"; exit 0 ;;
    *) echo "unknown argument: $1" >&2; exit 2 ;;
  esac
done

BENCH_DIR=${FERRY_BENCH_DIR:-/var/tmp/ferry-bench}
RUN="$BENCH_DIR/delta"
TARGET=${CARGO_TARGET_DIR:-/var/tmp/ferry-target}
FERRY=${FERRY_BIN:-$TARGET/release/ferry}
export FERRY_PASSWORD=bench-password FERRY_HOME="$RUN/home" FERRY_LOG=error
unset FERRY_REPO FERRY_FAULTS FERRY_READ_REPLICA

log() { printf '[delta %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }

if [[ ! -x $FERRY ]]; then
  log "building ferry (release)"
  cargo build --release -p ferry-orchestrator >&2
fi
BASE=$(SIZE_MIB=$SIZE_MIB FERRY_BENCH_DIR=$BENCH_DIR bash "$BENCH_ROOT/run.sh" --base-only | tail -1)
[[ -f $BASE ]] || { log "no base image"; exit 1; }

rm -rf "$RUN"
mkdir -p "$RUN"
trap '[[ ${KEEP_REPOS:-} == 1 ]] || rm -rf "$RUN"' EXIT
REPO="$RUN/repo"
"$FERRY" -q -r "$REPO" init >/dev/null
"$FERRY" -q -r "$REPO" backup --source bench "$BASE" >/dev/null
log "backed up $BASE"

now() { date +%s.%N; }
BASE_POINT=$("$FERRY" -q --json -r "$REPO" points | python3 -c 'import json,sys; print(json.load(sys.stdin)[-1]["id"])')
declare -a FULL DELTA WRITTEN FETCHED DOWN CHANGED BASED BASED_SKIP BASED_FETCHED
for round in $(seq 1 "$ROUNDS"); do
  for which in full delta; do
    [[ $((round % 2)) == 0 ]] && which=$([[ $which == full ]] && echo delta || echo full)
    if [[ $which == full ]]; then
      rm -f "$RUN/full.img"
      sync; t0=$(now)
      "$FERRY" -q -r "$REPO" restore "$BASE_POINT" --to "$RUN/full.img" >/dev/null
      t1=$(now)
      cmp "$BASE" "$RUN/full.img" || { log "full restore differs"; exit 1; }
      FULL+=("$(echo "$t1 - $t0" | bc)")
      log "round $round full:  ${FULL[-1]} s"
    else
      cp --sparse=always "$BASE" "$RUN/delta.img"
      changed=$(python3 "$BENCH_ROOT/helpers.py" writes "$RUN/delta.img" scattered "$((round + 40))")
      sync; t0=$(now)
      "$FERRY" -q --json -r "$REPO" restore "$BASE_POINT" --to "$RUN/delta.img" --delta > "$RUN/delta.json"
      t1=$(now)
      cmp "$BASE" "$RUN/delta.img" || { log "delta restore differs"; exit 1; }
      DELTA+=("$(echo "$t1 - $t0" | bc)")
      read -r w f d < <(python3 -c 'import json,sys; s=json.load(open(sys.argv[1])); print(s["bytes_written"], s["chunks_fetched"], s["requests"]["bytes_down"])' "$RUN/delta.json")
      WRITTEN+=("$w"); FETCHED+=("$f"); DOWN+=("$d"); CHANGED+=("$changed")
      log "round $round delta: ${DELTA[-1]} s, wrote $w of $changed changed bytes, fetched $f chunks"
      # Failback: the changed disk is the newer point; a pristine copy holds the base.
      # (Under the base image's file name: disks are matched by name.)
      mkdir -p "$RUN/newer"
      NEWER="$RUN/newer/$(basename "$BASE")"
      cp --sparse=always "$BASE" "$NEWER"
      python3 "$BENCH_ROOT/helpers.py" writes "$NEWER" scattered "$((round + 40))" >/dev/null
      newer=$("$FERRY" -q --json -r "$REPO" backup --source bench "$NEWER" | python3 -c 'import json,sys; print(json.load(sys.stdin)["point"])')
      cp --sparse=always "$BASE" "$RUN/delta.img"
      sync; t0=$(now)
      "$FERRY" -q --json -r "$REPO" restore "$newer" --to "$RUN/delta.img" --delta --base "$BASE_POINT" > "$RUN/based.json"
      t1=$(now)
      cmp "$NEWER" "$RUN/delta.img" || { log "delta --base restore differs"; exit 1; }
      BASED+=("$(echo "$t1 - $t0" | bc)")
      read -r sk fe < <(python3 -c 'import json,sys; s=json.load(open(sys.argv[1])); print(s["bytes_skipped"], s["chunks_fetched"])' "$RUN/based.json")
      BASED_SKIP+=("$sk"); BASED_FETCHED+=("$fe")
      log "round $round base:  ${BASED[-1]} s, skipped $sk bytes, fetched $fe chunks"
    fi
  done
done

median() { printf '%s\n' "$@" | sort -n | awk '{a[NR]=$1} END {print (NR % 2) ? a[(NR+1)/2] : (a[NR/2] + a[NR/2+1]) / 2}'; }
F=$(median "${FULL[@]}"); D=$(median "${DELTA[@]}")
W=$(median "${WRITTEN[@]}"); C=$(median "${CHANGED[@]}")
FE=$(median "${FETCHED[@]}"); DN=$(median "${DOWN[@]}")
B=$(median "${BASED[@]}"); BS=$(median "${BASED_SKIP[@]}"); BF=$(median "${BASED_FETCHED[@]}")
mib() { python3 -c "print(f'{$1 / 1048576:.1f}')"; }
mkdir -p "$(dirname "$OUT")"
{
  echo "# Delta restore against a full restore"
  echo
  echo "$(date -u +%Y-%m-%dT%H:%MZ), $(nproc) cores; the ${SIZE_MIB} MiB ext4 image of bench/run.sh ($(du -h "$BASE" | cut -f1) allocated); $ROUNDS interleaved rounds, medians; directory repository."
  echo
  echo "| | full restore | delta restore (1% scattered 4 KiB writes) | full / delta |"
  echo "|---|---|---|---|"
  echo "| wall time (s) | $F | $D | $(python3 -c "print(f'{$F / $D:.1f}')")x |"
  echo "| failback: --delta --base (s) | $F | $B | $(python3 -c "print(f'{$F / $B:.1f}')")x |"
  echo
  echo "Delta: $(mib "$W") MiB written for $(mib "$C") MiB changed ($(python3 -c "print(f'{$W / $C:.2f}')")x), $FE chunks fetched ($(mib "$DN") MiB read from the repository)."
  echo
  echo "With --base: $(mib "$BS") MiB known equal to the base and neither read nor written, $BF chunks fetched."
  echo
  echo "Rounds (s): full ${FULL[*]}; delta ${DELTA[*]}; delta --base ${BASED[*]}."
} | tee "$OUT"
