#!/usr/bin/env bash
# Where a full backup's and a restore's CPU goes: perf profiles of ferry on the
# cached bench/run.sh image (made by `bench/run.sh --base-only`), as the top
# symbols by share of samples. docs/performance.md sets them against the
# physical limits of the machine.
#
# Usage: bench/profile.sh
# Env:   FERRY_BIN (CARGO_TARGET_DIR/release/ferry), CARGO_TARGET_DIR
#        (/var/tmp/ferry-target), FERRY_BENCH_DIR (/var/tmp/ferry-bench), TOP (25)
set -euo pipefail
BENCH_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
TARGET=${CARGO_TARGET_DIR:-/var/tmp/ferry-target}
FERRY=${FERRY_BIN:-$TARGET/release/ferry}
DIR=${FERRY_BENCH_DIR:-/var/tmp/ferry-bench}/profile
TOP=${TOP:-25}
command -v perf >/dev/null || { echo "perf is not installed (apt-get install linux-perf)" >&2; exit 1; }
[[ -x $FERRY ]] || (cd "$BENCH_ROOT/.." && cargo build --release -p ferry-orchestrator >&2)
BASE=$(bash "$BENCH_ROOT/run.sh" --base-only)
export FERRY_PASSWORD=bench-profile-password
rm -rf "$DIR"; mkdir -p "$DIR"
trap 'rm -rf "$DIR/repo" "$DIR/disk.img" "$DIR/out.img"' EXIT
cp --sparse=always "$BASE" "$DIR/disk.img"
cat "$DIR/disk.img" >/dev/null   # from the page cache, as bench/run.sh does
"$FERRY" -r "$DIR/repo" init >/dev/null 2>&1
perf record -q -F 999 -g -o "$DIR/backup.data" -- \
  "$FERRY" --json -r "$DIR/repo" backup --source profile "$DIR/disk.img" >"$DIR/backup.json" 2>/dev/null
sync
perf record -q -F 999 -g -o "$DIR/restore.data" -- \
  "$FERRY" --json -r "$DIR/repo" restore profile@latest --to "$DIR/out.img" >"$DIR/restore.json" 2>/dev/null
cmp "$DIR/disk.img" "$DIR/out.img" || { echo "the restored image differs" >&2; exit 1; }
# awk, not head: under pipefail, head closing the pipe early killed perf
# report with SIGPIPE and the script with it, before the restore's profile.
for s in backup restore; do
  echo "## $s"
  echo
  perf report -i "$DIR/$s.data" --no-children --sort symbol --stdio 2>/dev/null |
    grep -E '^ +[0-9.]+%' | awk -v top="$TOP" 'NR <= top {printf "    %s %s\n", $1, $3}'
  echo
done
