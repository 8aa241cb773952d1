#!/usr/bin/env bash
# Cutover downtime of the example shop on the local target (issue 17).
#
# ROUNDS times (default 3; the figure is the median): the shop of
# scripts/make-stack runs as the source (`ferry run runbooks/mini-shop.yaml`,
# two TCG VMs with QMP sockets), is protected where it runs (`ferry protect
# --cycles 1`: the initial sync, with bitmaps), takes an order, and is cut
# over with runbooks/mini-shop-cutover.yaml: the source paused, its final
# incrementals taken through the bitmaps, the shop rebuilt and verified in
# the target. Then both runs are rolled back. Reported per round: the
# downtime (the pause of the source's web tier to the last check), the RTO,
# the final incrementals' bytes read, and the steps' times on the way.
#
# Usage: bench/cutover.sh [--rounds N] [--out FILE]
# Env:   ROUNDS (3), FERRY_BENCH_DIR (/var/tmp/ferry-bench), FERRY_BIN, CARGO_TARGET_DIR
set -euo pipefail

BENCH_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$BENCH_ROOT/.." && pwd)
OUT="$BENCH_ROOT/results/cutover-latest.md"
ROUNDS=${ROUNDS:-3}
while [[ $# -gt 0 ]]; do
  case $1 in
    --out) OUT=$2; shift 2 ;;
    --rounds) ROUNDS=$2; shift 2 ;;
    -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
    *) echo "unknown argument: $1" >&2; exit 2 ;;
  esac
done

BENCH_DIR=${FERRY_BENCH_DIR:-/var/tmp/ferry-bench}
RUN="$BENCH_DIR/cutover"
TARGET=${CARGO_TARGET_DIR:-/var/tmp/ferry-target}
FERRY=${FERRY_BIN:-$TARGET/release/ferry}
export FERRY_PASSWORD=bench-password FERRY_HOME="$RUN/home" FERRY_LOG=error FERRY_REPO="$RUN/repo"
unset FERRY_FAULTS FERRY_READ_REPLICA FERRY_STATE

log() { printf '[cutover %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }

if [[ ! -x $FERRY ]]; then
  log "building ferry (release)"
  cargo build --release -p ferry-orchestrator >&2
fi
STACK=/var/tmp/ferry-tools/stack
bash "$ROOT/scripts/make-stack" "$STACK" >/dev/null

rm -rf "$RUN"
mkdir -p "$RUN"
cleanup() {
  for r in $(seq 1 "$ROUNDS"); do
    "$FERRY" -q rollback "cut$r" >/dev/null 2>&1 || true
    "$FERRY" -q rollback "src$r" >/dev/null 2>&1 || true
  done
  [[ ${KEEP_REPOS:-} == 1 ]] || rm -rf "$RUN"
}
trap cleanup EXIT
"$FERRY" -q init >/dev/null
for d in web db; do
  cp "$STACK/$d-data.img" "$RUN/$d-data.img"
  "$FERRY" -q backup --source "shop-$d" "$RUN/$d-data.img" >/dev/null
done
guest="guest=$STACK/guest"
out() { python3 -c 'import json,sys; r=json.load(open(sys.argv[1])); s=[x for x in r["steps"] if x["id"]==sys.argv[2]][0]; print(s["outputs"][sys.argv[3]])' "$@"; }

rows=()
downs=()
for r in $(seq 1 "$ROUNDS"); do
  log "round $r: the source shop"
  "$FERRY" -q --json run "$ROOT/runbooks/mini-shop.yaml" --param "$guest" --id "src$r" >"$RUN/src.json"
  "$FERRY" -q protect --vm "shop-web=$(out "$RUN/src.json" web qmp),disk=web-data.img" \
    --vm "shop-db=$(out "$RUN/src.json" db qmp),disk=db-data.img" --cycles 1 --work-dir "$RUN/protect" >/dev/null
  db=$(out "$RUN/src.json" db addr)
  curl -sf "http://$db/cgi-bin/add?orders&order-$r-last" >/dev/null
  log "round $r: cutover"
  "$FERRY" -q --json run "$ROOT/runbooks/mini-shop-cutover.yaml" \
    --param "source_web_qmp=$(out "$RUN/src.json" web qmp)" --param "source_web_disk=$(out "$RUN/src.json" web-volume path)" \
    --param "source_db_qmp=$(out "$RUN/src.json" db qmp)" --param "source_db_disk=$(out "$RUN/src.json" db-volume path)" \
    --param "$guest" --param "expect=order-$r-last" --id "cut$r" >"$RUN/cut.json"
  row=$(python3 - "$RUN/cut.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
assert r["status"] == "succeeded", r["status"]
s = {x["id"]: x for x in r["steps"]}
read = sum(s[k]["outputs"]["bytes_read"] for k in ("web-final", "db-final"))
d = lambda k: s[k]["duration_secs"]
print(f'{r["downtime_secs"]:.2f} | {r["rto_secs"]:.2f} | {read/1024:.0f} KiB | {d("web-final"):.2f} + {d("db-final"):.2f} | {d("db-volume"):.2f} | {d("db"):.2f} / {d("web"):.2f} | {d("orders"):.2f}')
PY
)
  rows+=("| $r | $row |")
  downs+=("${row%% *}")
  log "round $r: downtime ${row%% *} s"
  "$FERRY" -q rollback "cut$r" >/dev/null
  "$FERRY" -q rollback "src$r" >/dev/null
done
median=$(printf '%s\n' "${downs[@]}" | sort -n | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}')
mkdir -p "$(dirname "$OUT")"
{
  echo "# Cutover downtime, example shop, local target ($(date -u +%F), $(nproc) cores, TCG)"
  echo
  echo "| round | downtime s | RTO s | final incrementals read | pause+backup web + db s | restore db s | boot db / web s | orders check s |"
  echo "|---|---:|---:|---:|---:|---:|---:|---:|"
  printf '%s\n' "${rows[@]}"
  echo
  echo "Median downtime: $median s over $ROUNDS rounds."
} | tee "$OUT"
