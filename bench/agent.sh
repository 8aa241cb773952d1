#!/usr/bin/env bash
# ferry-agent in its fallback (scan) mode on an image file of this host:
# what a cycle costs and what RPO it keeps.
#
# A `ferry serve` with a fresh local repository enrolls one agent (token made
# with `ferry agent-token create --device IMAGE --interval INTERVAL`); the
# agent then runs for DURATION twice:
#   idle:   nobody writes the image;
#   writes: a writer makes RATE random 4 KiB writes per second to it (10 MB/s
#           at 2500/s), fsyncing once a second.
# A sampler reads GET /api/agents once a second: RPO = now minus the newest
# point's cut (the data an outage would lose), and the agent's CPU from
# /proc. The report gives cycles, cycle time, RPO p50/p95/max, CPU as a share
# of one core, bytes read per cycle and bytes stored per byte written.
# Every process is started here and stopped by PID. Markdown to stdout and --out.
#
# Usage: bench/agent.sh [--out FILE]
# Env:   SIZE (1G), DURATION (60), INTERVAL (1s), RATE (2500), PROFILE (release;
#        dev is optimized too and reuses the tests' build),
#        FERRY_BENCH_DIR (/var/tmp/ferry-bench), CARGO_TARGET_DIR (/var/tmp/ferry-target)
set -euo pipefail

BENCH_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(dirname "$BENCH_ROOT")
OUT="$BENCH_ROOT/results/agent-latest.md"
while [[ $# -gt 0 ]]; do
  case $1 in
    --out) OUT=$2; shift 2 ;;
    *) echo "usage: bench/agent.sh [--out FILE]" >&2; exit 2 ;;
  esac
done
SIZE=${SIZE:-1G}
DURATION=${DURATION:-60}
INTERVAL=${INTERVAL:-1s}
RATE=${RATE:-2500}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-/var/tmp/ferry-target}
ROOT=${FERRY_BENCH_DIR:-/var/tmp/ferry-bench}/agent
rm -rf "$ROOT"
mkdir -p "$ROOT"
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; }
trap cleanup EXIT

PROFILE=${PROFILE:-release}
(cd "$REPO_ROOT" && cargo build --profile "$PROFILE" -p ferry-orchestrator -p ferry-fleet) >"$ROOT/build.log" 2>&1 ||
  { echo "cargo build failed: $ROOT/build.log" >&2; exit 1; }
BIN=$CARGO_TARGET_DIR/$([[ $PROFILE == dev ]] && echo debug || echo "$PROFILE")
export FERRY_HOME=$ROOT/home FERRY_REPO=$ROOT/repo FERRY_PASSWORD="bench password"
"$BIN/ferry" -q init
python3 - "$ROOT/disk.img" "$SIZE" <<'PY'
import os, sys
path, size = sys.argv[1], sys.argv[2]
n = int(size[:-1]) << {"K": 10, "M": 20, "G": 30}[size[-1]]
with open(path, "wb") as f:
    for i in range(n >> 20):
        # Half random, a quarter text, a quarter zeros: a used file system.
        k, mib = i % 4, 1 << 20
        line = b"log line %08d of a text file\n" % i
        f.write(os.urandom(mib) if k < 2 else (line * (mib // len(line) + 1))[:mib] if k == 2 else bytes(mib))
PY
"$BIN/ferry" --json serve --listen 127.0.0.1:0 >"$ROOT/serve.out" 2>"$ROOT/serve.log" &
PIDS+=($!)
for _ in $(seq 100); do [[ -s $ROOT/serve.out ]] && break; sleep 0.1; done
URL=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["url"])' "$ROOT/serve.out")
TOKEN=$(cat "$FERRY_HOME/api-token")
ENROLL=$("$BIN/ferry" agent-token create --source bench --device "$ROOT/disk.img" --interval "$INTERVAL" --keep-last 30)
"$BIN/ferry-agent" --config "$ROOT/agent.toml" enroll --server "$URL" --token "$ENROLL" >/dev/null

phase() { # NAME WRITE_RATE
  local name=$1 rate=$2 wpid=
  local before
  before=$(du -sb "$FERRY_REPO" | cut -f1)
  "$BIN/ferry-agent" --config "$ROOT/agent.toml" run >"$ROOT/$name.agent.out" 2>"$ROOT/$name.agent.log" &
  local apid=$!
  PIDS+=("$apid")
  if [[ $rate -gt 0 ]]; then
    python3 - "$ROOT/disk.img" "$rate" "$DURATION" >"$ROOT/$name.writer" <<'PY' &
import os, random, sys, time
path, rate, dur = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
fd = os.open(path, os.O_WRONLY)
blocks = os.fstat(fd).st_size // 4096
start, n, last = time.time(), 0, time.time()
while time.time() - start < dur:
    due = int((time.time() - start) * rate)
    while n < due:
        os.pwrite(fd, os.urandom(4096), random.randrange(blocks) * 4096)
        n += 1
    if time.time() - last >= 1:
        os.fsync(fd); last = time.time()
    time.sleep(0.002)
os.fsync(fd)
print(n * 4096)
PY
    wpid=$!
    PIDS+=("$wpid")
  fi
  python3 - "$URL" "$TOKEN" "$apid" "$DURATION" >"$ROOT/$name.samples" <<'PY'
import json, sys, time, urllib.request
url, token, pid, dur = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
tick = __import__("os").sysconf("SC_CLK_TCK")
def cpu():
    f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / tick
start, c0 = time.time(), cpu()
while time.time() - start < dur:
    time.sleep(1)
    req = urllib.request.Request(url + "/api/agents", headers={"Authorization": "Bearer " + token})
    a = json.load(urllib.request.urlopen(req))[0]
    st = a.get("status") or {}
    cut = st.get("last_cut")
    rpo = None
    if cut:
        from datetime import datetime
        rpo = time.time() - datetime.fromisoformat(cut.replace("Z", "+00:00")).timestamp()
    print(json.dumps({"t": time.time() - start, "rpo": rpo, "cycles": st.get("cycles_ok", 0),
                      "cycle_secs": st.get("last_cycle_secs"), "read": (st.get("devices") or [{}])[0].get("bytes_read"),
                      "cpu": cpu() - c0}), flush=True)
PY
  kill "$apid" 2>/dev/null || true
  [[ -n $wpid ]] && wait "$wpid" 2>/dev/null || true
  local after
  after=$(du -sb "$FERRY_REPO" | cut -f1)
  local written=0
  [[ -n $wpid ]] && written=$(cat "$ROOT/$name.writer" 2>/dev/null || echo 0)
  python3 - "$ROOT/$name.samples" "$name" "$DURATION" "$((after - before))" "$written" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
name, dur, grew, written = sys.argv[2], float(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
rpo = sorted(r["rpo"] for r in rows if r["rpo"] is not None)
q = lambda p: rpo[min(len(rpo) - 1, int(p * len(rpo)))] if rpo else float("nan")
cyc = [r["cycle_secs"] for r in rows if r["cycle_secs"]]
cycles = rows[-1]["cycles"] if rows else 0
cpu = rows[-1]["cpu"] / rows[-1]["t"] if rows else 0
ratio = f"{grew / written:.2f}" if written else "–"
print(f"| {name} | {cycles} | {sorted(cyc)[len(cyc)//2] if cyc else float('nan'):.2f} | {q(0.5):.1f} | {q(0.95):.1f} | {rpo[-1] if rpo else float('nan'):.1f} | {100*cpu:.0f}% | {(rows[-1]['read'] or 0)/2**20:.0f} MiB | {written/2**20:.0f} MiB | {grew/2**20:.1f} MiB | {ratio} |")
PY
}

{
  echo "# ferry-agent, scan mode, on a $SIZE image file"
  echo
  echo "$(date -u +%F), $(nproc) cores, interval $INTERVAL, $DURATION s per phase, ferry $(cd "$REPO_ROOT" && git rev-parse --short HEAD). Medians over the phase's samples (one a second)."
  echo
  echo "| phase | cycles | cycle s (median) | RPO p50 s | RPO p95 s | RPO max s | agent CPU (one core) | read per cycle | written | repository grew | stored per byte written |"
  echo "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
  phase idle 0
  phase writes "$RATE"
} | tee "$OUT"
