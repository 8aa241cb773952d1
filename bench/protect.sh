#!/usr/bin/env bash
# Ferry continuous protection (ferry protect) of a live VM under write load.
#
# A scripts/make-guest guest boots under QEMU (TCG) with a blank qcow2 disk and
# ferry.mode=writer: RATE random-offset 4 KiB O_DIRECT writes per second to
# /dev/vda (default 2500/s = 10 MB/s), FILL=random (incompressible). After a
# warm-up (the achieved rate is read from the guest's serial heartbeat),
#   ferry -r REPO --json protect --vm bench=QMP --interval INTERVAL
#         --duration DURATION --status STATUS.json --work-dir DIR
#         [--keep-within KEEP_WITHIN]
# runs while a sampler reads STATUS.json once a second (lag_secs = now minus
# the newest committed point's instant = the current RPO), the ferry and QEMU
# CPU times from /proc, and the guest's heartbeat. The report gives the cycles
# ok/failed, the lag per second (p50/p95/max, share of seconds below
# LAG_TARGET, target >= 95 %) and at each commit (from the per-cycle JSON),
# cycle time, bytes read/changed/stored per cycle, ferry's CPU (GNU time,
# including the qemu-img it runs), QEMU's CPU, the writer's achieved rate
# before and during protection, and the repository size at the end.
# Space: nothing prunes during the run, and the repository grows by about
# 12 MB a second at the default rate (41 GiB for DURATION=60m, 2026-12-07);
# it is removed at exit unless KEEP_REPOS=1.
# QEMU, ferry and the sampler are started here and killed by PID on exit.
# A Markdown report goes to stdout and --out.
#
# Usage: bench/protect.sh [--duration 5m] [--out FILE]
# Env:   DURATION (5m), INTERVAL (1s), RATE (2500), FILL (random), DISK_SIZE (2G),
#        KEEP_WITHIN (10m; empty: no retention), WARMUP_SECS (10), LAG_TARGET (5),
#        WORK_DIR (ferry's --work-dir, where the fleecing images go; default
#        $FERRY_BENCH_DIR/protectrun/work; e.g. /dev/shm/ferry-protect for tmpfs),
#        FERRY_BENCH_DIR (/var/tmp/ferry-bench), FERRY_BIN,
#        CARGO_TARGET_DIR (/var/tmp/ferry-target),
#        GUEST_DIR (/var/tmp/ferry-tools/guest), KEEP_REPOS=1
set -euo pipefail

BENCH_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(dirname "$BENCH_ROOT")

# ---------------------------------------------------------------- arguments
OUT="$BENCH_ROOT/results/protect-latest.md"
DURATION=${DURATION:-5m}
while [[ $# -gt 0 ]]; do
  case $1 in
    --duration) DURATION=$2; shift 2 ;;
    --out) OUT=$2; shift 2 ;;
    -h|--help) sed -n '2,32p' "$0"; exit 0 ;;
    *) echo "unknown argument: $1" >&2; exit 2 ;;
  esac
done
INTERVAL=${INTERVAL:-1s}
RATE=${RATE:-2500}
FILL=${FILL:-random}
DISK_SIZE=${DISK_SIZE:-2G}
KEEP_WITHIN=${KEEP_WITHIN-10min}
WARMUP_SECS=${WARMUP_SECS:-10}
LAG_TARGET=${LAG_TARGET:-5}
GUEST_DIR=${GUEST_DIR:-/var/tmp/ferry-tools/guest}
[[ $RATE =~ ^[0-9]+$ && $WARMUP_SECS =~ ^[0-9]+$ ]] ||
  { echo "RATE and WARMUP_SECS must be integers" >&2; exit 2; }

BENCH_DIR=${FERRY_BENCH_DIR:-/var/tmp/ferry-bench}
RUN="$BENCH_DIR/protectrun"       # everything, wiped at every run
LOGS="$RUN/logs"
REPO="$RUN/repo"
DISK="$RUN/vm.qcow2"
QMP="$RUN/vm.qmp"
SERIAL="$LOGS/serial.log"
STATUS="$RUN/status.json"
CYCLES="$LOGS/cycles.jsonl"
SAMPLES="$LOGS/samples.tsv"
WORK_DIR=${WORK_DIR:-$RUN/work}
export FERRY_PASSWORD=bench-password

log() { printf '[protect %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

# ---------------------------------------------------------------- cleanup
QEMU_PID="" TIME_PID="" FERRY_PID="" SAMPLER_PID=""
alive() { [[ -n $1 ]] && kill -0 "$1" 2>/dev/null; }
stop_pid() { # stop_pid PID: TERM, up to 5 s, then KILL
  local pid=$1 i
  alive "$pid" || return 0
  kill "$pid" 2>/dev/null || true
  for i in $(seq 100); do alive "$pid" || return 0; sleep 0.05; done
  kill -9 "$pid" 2>/dev/null || true
}
cleanup() {
  local rc=$?
  stop_pid "$SAMPLER_PID"
  if [[ -z $FERRY_PID ]] && alive "$TIME_PID"; then FERRY_PID=$(pgrep -P "$TIME_PID" || true); fi
  stop_pid "$FERRY_PID"
  stop_pid "$TIME_PID"
  stop_pid "$QEMU_PID"
  if [[ ${KEEP_REPOS:-0} != 1 && -d $RUN ]]; then
    rm -rf "$REPO" "$DISK" "$RUN/work"
  fi
  rm -rf "$WORK_DIR/bench"   # fleecing leftovers of the VM "bench", if any
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ---------------------------------------------------------------- setup
rm -rf "$RUN"; mkdir -p "$LOGS" "$WORK_DIR"

if [[ -z ${FERRY_BIN:-} ]]; then
  export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-/var/tmp/ferry-target}
  log "building ferry (cargo build --release -p ferry-orchestrator, log: $LOGS/ferry-build.log)"
  (cd "$REPO_ROOT" && cargo build --release -p ferry-orchestrator) >"$LOGS/ferry-build.log" 2>&1 ||
    die "cargo build failed (see $LOGS/ferry-build.log)"
  FERRY_BIN="$CARGO_TARGET_DIR/release/ferry"
fi
[[ -x $FERRY_BIN ]] || die "FERRY_BIN=$FERRY_BIN is not executable"
# A private copy: a concurrent build cannot swap the binary mid-run.
cp "$FERRY_BIN" "$RUN/ferry"
FERRY="$RUN/ferry"

for c in qemu-system-x86_64 qemu-img python3 /usr/bin/time; do
  command -v "$c" >/dev/null || die "$c is missing (scripts/setup-vm installs QEMU; apt-get install time)"
done
log "building the guest (scripts/make-guest $GUEST_DIR)"
bash "$REPO_ROOT/scripts/make-guest" "$GUEST_DIR" >"$LOGS/make-guest.log" 2>&1 ||
  die "scripts/make-guest failed (see $LOGS/make-guest.log)"

qemu-img create -q -f qcow2 "$DISK" "$DISK_SIZE"
"$FERRY" -r "$REPO" init >"$LOGS/init.log" 2>&1 || die "ferry init failed (see $LOGS/init.log)"

# ---------------------------------------------------------------- the VM
log "booting the writer VM (rate=$RATE fill=$FILL, $DISK_SIZE qcow2)"
qemu-system-x86_64 -accel tcg -cpu max -m 256 -nodefaults -no-user-config \
  -display none -no-reboot -daemonize -pidfile "$RUN/qemu.pid" \
  -serial "file:$SERIAL" \
  -kernel "$GUEST_DIR/vmlinuz" -initrd "$GUEST_DIR/initrd.gz" \
  -append "console=ttyS0 quiet panic=-1 ferry.mode=writer ferry.rate=$RATE ferry.fill=$FILL" \
  -qmp "unix:$QMP,server=on,wait=off" \
  -blockdev "driver=file,filename=$DISK,node-name=file0" \
  -blockdev "driver=qcow2,file=file0,node-name=disk0" \
  -device virtio-blk-pci,drive=disk0 2>"$LOGS/qemu.log" ||
  die "qemu failed to start (see $LOGS/qemu.log)"
QEMU_PID=$(<"$RUN/qemu.pid")

# heartbeat: the latest "ferry-writer: t=S writes=N" as "S N"
heartbeat() { grep -ao 'ferry-writer: t=[0-9]* writes=[0-9]*' "$SERIAL" | tail -n1 | sed 's/.*t=\([0-9]*\) writes=\([0-9]*\)/\1 \2/'; }
deadline=$((SECONDS + 120))
until grep -aq 'ferry-writer: t=2 ' "$SERIAL" 2>/dev/null; do
  alive "$QEMU_PID" || die "QEMU exited during boot (see $SERIAL, $LOGS/qemu.log)"
  ((SECONDS < deadline)) || die "the guest never started writing (see $SERIAL)"
  sleep 0.2
done
# CPU seconds (utime + stime) of PID
cpu_secs() { awk -v t="$(getconf CLK_TCK)" '{sub(/.*\) /, ""); printf "%.2f", ($12 + $13) / t}' "/proc/$1/stat"; }
read -r WARM_T0 WARM_W0 < <(heartbeat)
WARM_C0=$(cpu_secs "$QEMU_PID") WARM_S0=$(date +%s.%N)
log "guest writing; warm-up ${WARMUP_SECS}s"
sleep "$WARMUP_SECS"
read -r WARM_T1 WARM_W1 < <(heartbeat)
WARM_C1=$(cpu_secs "$QEMU_PID") WARM_S1=$(date +%s.%N)
WARM_RATE=$(awk -v a="$WARM_W0" -v b="$WARM_W1" -v s="$WARM_T0" -v t="$WARM_T1" \
  'BEGIN{ if (t > s) printf "%.0f", (b - a) / (t - s); else print "n/a" }')
WARM_QCPU=$(awk -v a="$WARM_C0" -v b="$WARM_C1" -v s="$WARM_S0" -v t="$WARM_S1" \
  'BEGIN{ printf "%.0f", 100 * (b - a) / (t - s) }')
log "writer before protection: $WARM_RATE writes/s (requested $RATE), QEMU at $WARM_QCPU % of one core"

# ---------------------------------------------------------------- protect
PROTECT_ARGS=(--vm "bench=$QMP" --interval "$INTERVAL" --duration "$DURATION"
  --status "$STATUS" --work-dir "$WORK_DIR")
[[ -n $KEEP_WITHIN ]] && PROTECT_ARGS+=(--keep-within "$KEEP_WITHIN")
log "ferry protect ${PROTECT_ARGS[*]}"
T_START=$(date +%s.%N)
NO_COLOR=1 FERRY_LOG=${FERRY_LOG:-info} /usr/bin/time -f '%e %U %S %M' -o "$LOGS/ferry.time" \
  "$FERRY" -r "$REPO" --json protect "${PROTECT_ARGS[@]}" >"$CYCLES" 2>"$LOGS/ferry.log" </dev/null &
TIME_PID=$!
for _ in $(seq 100); do
  FERRY_PID=$(pgrep -P "$TIME_PID" || true)
  [[ -n $FERRY_PID ]] && break
  sleep 0.02
done
[[ -n $FERRY_PID ]] || die "ferry protect did not start (see $LOGS/ferry.log)"

# Once a second (on a fixed grid from T_START) until ferry exits: the status
# file's lag/backlog/counters, ferry's and QEMU's CPU (s), the guest heartbeat.
python3 - "$STATUS" "$FERRY_PID" "$QEMU_PID" "$SERIAL" "$T_START" >"$SAMPLES" <<'PY' &
import json, os, re, sys, time
status, fpid, qpid, serial, t0 = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], float(sys.argv[5])
tck = os.sysconf("SC_CLK_TCK")
hb = re.compile(rb"ferry-writer: t=(\d+) writes=(\d+)")
def cpu(pid):  # utime + stime (self only), seconds
    try:
        with open(f"/proc/{pid}/stat") as f:
            s = f.read()
        fields = s[s.rindex(")") + 2:].split()
        if fields[0] == "Z":
            return None
        return (int(fields[11]) + int(fields[12])) / tck
    except (OSError, ValueError, IndexError):
        return None
def heartbeat():
    try:
        with open(serial, "rb") as f:
            f.seek(max(0, os.path.getsize(serial) - 4096))
            m = hb.findall(f.read())
        return m[-1] if m else (b"NA", b"NA")
    except OSError:
        return (b"NA", b"NA")
def na(v):
    return "NA" if v is None else str(v)
def rss(pid):  # resident KiB
    try:
        with open(f"/proc/{pid}/status") as f:
            for l in f:
                if l.startswith("VmRSS:"):
                    return int(l.split()[1])
    except (OSError, ValueError):
        return None
print("t\tlag\tbacklog\tthroughput\tok\tfailed\tferry_cpu\tqemu_cpu\tguest_t\tguest_writes\tferry_rss_kib", flush=True)
k = 0
while True:
    k += 1
    wait = t0 + k - time.time()
    if wait > 0:
        time.sleep(wait)
    fc = cpu(fpid)
    if fc is None:
        break
    lag = backlog = thr = ok = failed = None
    try:
        with open(status) as f:
            s = json.load(f)["sources"][0]
        lag, backlog, thr = s.get("lag_secs"), s.get("backlog_bytes"), s.get("throughput_bytes_per_sec")
        ok, failed = s.get("cycles_ok"), s.get("cycles_failed")
    except (OSError, ValueError, KeyError, IndexError):
        pass
    gt, gw = heartbeat()
    print("\t".join([f"{time.time():.3f}", na(lag), na(backlog), na(thr), na(ok), na(failed),
                     na(fc), na(cpu(qpid)), gt.decode(), gw.decode(), na(rss(fpid))]), flush=True)
PY
SAMPLER_PID=$!

FERRY_RC=0
wait "$TIME_PID" || FERRY_RC=$?
T_END=$(date +%s.%N)
TIME_PID="" FERRY_PID=""
wait "$SAMPLER_PID" || true
SAMPLER_PID=""
log "ferry protect exited with $FERRY_RC after $(awk -v a="$T_START" -v b="$T_END" 'BEGIN{printf "%.0f", b-a}') s"
alive "$QEMU_PID" || log "WARNING: QEMU is gone (see $SERIAL)"
stop_pid "$QEMU_PID"; QEMU_PID=""

REPO_BYTES=$(du -sb "$REPO" | cut -f1)
POINTS=$("$FERRY" -r "$REPO" --json points 2>/dev/null | python3 -c 'import json,sys; print(len(json.load(sys.stdin)))' || echo "n/a")
log "ferry check"
CHECK_T0=$SECONDS
if "$FERRY" -r "$REPO" check >"$LOGS/check.log" 2>&1; then CHECK=ok; else CHECK="FAILED (see $LOGS/check.log)"; fi
CHECK_SECS=$((SECONDS - CHECK_T0))

# ---------------------------------------------------------------- report
results() {
  python3 - "$CYCLES" "$SAMPLES" "$LOGS/ferry.time" "$INTERVAL" "$RATE" "$LAG_TARGET" \
    "$T_START" "$T_END" "$REPO_BYTES" "$LOGS/ferry.log" <<'PY'
import datetime, json, math, re, sys
cyc_path, smp_path, time_path, interval, rate, target, t_start, t_end, repo_bytes, log_path = sys.argv[1:]
rate, target, t_start, t_end, repo_bytes = float(rate), float(target), float(t_start), float(t_end), int(repo_bytes)
iv = interval.strip()
ivs = float(iv[:-2]) / 1000 if iv.endswith("ms") else float(iv.rstrip("smh")) * {"s": 1, "m": 60, "h": 3600}.get(iv[-1], 1)
wall = t_end - t_start

def pct(xs, p):  # nearest rank
    xs = sorted(xs)
    return xs[max(0, math.ceil(p / 100 * len(xs)) - 1)] if xs else float("nan")
def mean(xs):
    return sum(xs) / len(xs) if xs else float("nan")
def mib(b):
    return f"{b / 1048576:.1f} MiB"
def f(x, d=2):
    return "n/a" if x != x else f"{x:.{d}f}"

cycles = [json.loads(l) for l in open(cyc_path) if l.strip().startswith("{")]
ok = [c for c in cycles if "point" in c]
bad = [c for c in cycles if "error" in c]
full = [c for c in ok if c["mode"].startswith("full read")]
inc = [c for c in ok if not c["mode"].startswith("full read")]

rows = []
for l in open(smp_path).read().splitlines()[1:]:
    v = l.split("\t")
    if len(v) == 11:
        rows.append(v)
num = lambda s: None if s == "NA" else float(s)
lags = [num(r[1]) for r in rows]
have = [x for x in lags if x is not None]
first_i = next((i for i, x in enumerate(lags) if x is not None), None)
under_all = sum(1 for x in lags if x is not None and x < target)
steady = lags[first_i:] if first_i is not None else []
under_steady = sum(1 for x in steady if x is not None and x < target)
share_all = under_all / len(lags) if lags else float("nan")
share_steady = under_steady / len(steady) if steady else float("nan")
first_point_after = float(rows[first_i][0]) - t_start if first_i is not None else float("nan")

# guest writer rate during protection, from the heartbeat seen by the sampler
hbs = [(float(r[0]), int(r[8]), int(r[9])) for r in rows if r[8] != "NA"]
g_rate = g_min = g_p5 = float("nan")
g_zero = 0
if len(hbs) >= 2:
    (_, gt0, gw0), (_, gt1, gw1) = hbs[0], hbs[-1]
    if gt1 > gt0:
        g_rate = (gw1 - gw0) / (gt1 - gt0)
    per = [(b[2] - a[2]) / (b[0] - a[0]) for a, b in zip(hbs, hbs[1:]) if b[0] > a[0]]
    g_min, g_p5 = (min(per), pct(per, 5)) if per else (g_min, g_p5)
    g_zero = sum(1 for x in per if x == 0)

try:
    w_, u_, s_, rss_ = open(time_path).read().split()[-4:]
    ferry_cpu, rss = float(u_) + float(s_), int(rss_) / 1024
except (OSError, ValueError):
    ferry_cpu = rss = float("nan")
fcpu = [num(r[6]) for r in rows if r[6] != "NA"]
qcpu = [num(r[7]) for r in rows if r[7] != "NA"]
ferry_self = fcpu[-1] if fcpu else float("nan")
qemu_cpu = qcpu[-1] - qcpu[0] if len(qcpu) >= 2 else float("nan")
qemu_span = float(rows[-1][0]) - float(rows[0][0]) if len(rows) >= 2 else float("nan")

# Where an incremental cycle's time goes, from ferry's log (info level):
#   setup    cycle start -> cut (QMP, listing points, qemu-img create, blockdev-add, transaction)
#   backup   cut -> "recovery point committed" (NBD read of the dirty extents, seal, pack, point)
#   teardown -> "cycle committed" (export/NBD server/job/fleece node removed, old bitmaps dropped)
#   between  cycle end -> next cycle start (retention, then the sleep to the next interval)
def ts(x):  # RFC 3339 UTC with up to 9 fraction digits -> epoch seconds
    m = re.match(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(\d+))?Z", x)
    base = datetime.datetime.strptime(m.group(1), "%Y-%m-%dT%H:%M:%S").replace(tzinfo=datetime.timezone.utc)
    return base.timestamp() + (float("0." + m.group(2)) if m.group(2) else 0.0)
events = {}
ansi = re.compile(r"\x1b\[[0-9;]*m")
pat = re.compile(r'^(\S+Z)\s+\w+\s+(recovery point committed|cycle committed|protected)\b.*?\bpoint="?([0-9a-f]{64})')
try:
    for line in open(log_path, errors="replace"):
        m = pat.match(ansi.sub("", line))
        if m:
            events[(m.group(2), m.group(3))] = ts(m.group(1))
except OSError:
    pass
ph = {"setup": [], "backup": [], "teardown": [], "between": []}
ph_mib = []  # bytes read (MiB) of the cycles in ph["backup"]
starts, ends, cuts = [], [], []
for c in ok:
    e, rc, cc = (events.get((k, c["point"])) for k in ("protected", "recovery point committed", "cycle committed"))
    if e is None:
        continue
    start = e - c["cycle_secs"]
    starts.append(start); ends.append(e); cuts.append(ts(c["cut"]))
    if c in inc and rc is not None and cc is not None:
        ph["setup"].append(ts(c["cut"]) - start)
        ph["backup"].append(rc - ts(c["cut"]))
        ph_mib.append(c["bytes_read"] / 1048576)
        ph["teardown"].append(cc - rc)
ph["between"] = [b - a for a, b in zip(ends[1:], starts[2:])]
period = [b - a for a, b in zip(starts[1:], starts[2:])]
cut_period = [b - a for a, b in zip(cuts[1:], cuts[2:])]
n10 = max(1, len(ph["setup"]) // 10)
# backup phase ~ fixed + per_mib * MiB read (least squares)
fixed = per_mib = float("nan")
if len(ph_mib) >= 3:
    mx, my = mean(ph_mib), mean(ph["backup"])
    sxx = sum((x - mx) ** 2 for x in ph_mib)
    if sxx > 0:
        per_mib = sum((x - mx) * (y - my) for x, y in zip(ph_mib, ph["backup"])) / sxx
        fixed = my - per_mib * mx

sum_changed = sum(c["changed_bytes"] for c in inc)
sum_stored = sum(c["stored_bytes"] for c in inc)
commit_lags = [c["lag_secs"] for c in ok]
inc_secs = [c["cycle_secs"] for c in inc]
guest_bytes = (g_rate if g_rate == g_rate else rate) * 4096

meet = lambda ok_: "**met**" if ok_ else "**missed**"
print("| Metric | Value | Target / note |")
print("|---|---:|---|")
print(f"| Guest writer, requested | {rate:.0f} writes/s ({rate * 4096 / 1e6:.1f} MB/s) | 4 KiB random offsets, O_DIRECT |")
print(f"| Guest writer, achieved during protection | {f(g_rate, 0)} writes/s ({f(g_rate * 4096 / 1e6, 1)} MB/s) | "
      f"{'ok' if g_rate >= 0.95 * rate else 'below 95 % of requested'}; per second: p5 {f(g_p5, 0)}/s, {g_zero} s with no heartbeat progress (writer stalled) |")
print(f"| Protection run (wall) | {wall:.0f} s | interval {interval} |")
print(f"| Cycles ok / failed | {len(ok)} / {len(bad)} | {len(full)} full read, {len(inc)} incremental |")
print(f"| First point committed after | {f(first_point_after, 1)} s | full read of the disk |")
print(f"| Lag sampled per second: p50 / p95 / max | {f(pct(have, 50))} / {f(pct(have, 95))} / {f(max(have) if have else float('nan'))} s | "
      f"{len(lags)} samples, {len(lags) - len(have)} before the first point |")
print(f"| Seconds with lag < {target:g} s, after the first point | {100 * share_steady:.1f} % ({under_steady}/{len(steady)}) | "
      f">= 95 %: {meet(share_steady >= 0.95)} |")
print(f"| Seconds with lag < {target:g} s, whole run | {100 * share_all:.1f} % ({under_all}/{len(lags)}) | "
      f"counts the seconds before the first point as missed |")
print(f"| Lag at commit (per-cycle JSON): p50 / p95 / max | {f(pct(commit_lags, 50))} / {f(pct(commit_lags, 95))} / {f(max(commit_lags) if commit_lags else float('nan'))} s | now minus cut when the point is committed |")
print(f"| Cycle time, incremental: mean / p50 / p95 / max | {f(mean(inc_secs))} / {f(pct(inc_secs, 50))} / {f(pct(inc_secs, 95))} / {f(max(inc_secs) if inc_secs else float('nan'))} s | interval {ivs:g} s |")
if full:
    fs = ", ".join("%.1f" % c["cycle_secs"] for c in full)
    fr = ", ".join(mib(c["bytes_read"]) for c in full)
    fst = ", ".join(mib(c["stored_bytes"]) for c in full)
    print(f"| Cycle time, full read | {fs} s | read {fr}, stored {fst} |")
if ph["setup"]:
    print(f"| Incremental cycle phases, mean: setup / backup / teardown | {f(mean(ph['setup']))} / {f(mean(ph['backup']))} / {f(mean(ph['teardown']))} s | "
          f"setup: start to cut; backup: cut to point committed; teardown: view removed |")
    print(f"| Backup phase fit: fixed + per MiB read | {f(fixed)} s + {f(1000 * per_mib, 1)} ms/MiB | least squares over the incrementals |")
    print(f"| Setup, first / last 10 % of cycles | {f(mean(ph['setup'][:n10]))} / {f(mean(ph['setup'][-n10:]))} s | growth here = per-cycle cost rising with the point count |")
print(f"| Start-to-start period, mean / p95; idle between cycles, mean | {f(mean(period))} / {f(pct(period, 95))}; {f(mean(ph['between']))} s | "
      f"idle = retention + sleep to the next interval |")
print(f"| Mean bytes read per incremental cycle | {mib(mean([c['bytes_read'] for c in inc]) if inc else 0)} | "
      f"guest wrote {mib(guest_bytes * mean(cut_period)) if cut_period else 'n/a'} per mean cut-to-cut period ({f(mean(cut_period))} s) |")
print(f"| Mean changed bytes per incremental cycle | {mib(mean([c['changed_bytes'] for c in inc]) if inc else 0)} | from the frozen bitmap |")
print(f"| Mean bytes stored per incremental cycle | {mib(mean([c['stored_bytes'] for c in inc]) if inc else 0)} | new data written to the repository |")
sum_read = sum(c["bytes_read"] for c in inc)
over = sum(1 for c in inc if c["bytes_read"] > c["changed_bytes"])
print(f"| Read / changed (incrementals) | {f(sum_read / sum_changed if sum_changed else float('nan'), 3)} | "
      f"{over} of {len(inc)} cycles read more than the change map (whole segments re-read) |")
print(f"| Stored / changed (incrementals) | {f(sum_stored / sum_changed if sum_changed else float('nan'), 3)} | "
      f"random (incompressible) blocks; stored includes the re-stored chunk lists |")
print(f"| Mean backlog at commit | {mib(mean([c['backlog_bytes'] for c in ok]) if ok else 0)} | written since the cut, while the cycle ran |")
print(f"| Ferry CPU (user+sys, incl. its qemu-img) | {f(ferry_cpu, 1)} s = {f(100 * ferry_cpu / wall, 0)} % of one core | self only {f(ferry_self, 1)} s; peak RSS {f(rss, 0)} MiB |")
print(f"| QEMU CPU during protection | {f(qemu_cpu, 1)} s = {f(100 * qemu_cpu / qemu_span, 0)} % of one core | TCG guest + block layer, fleecing, NBD export |")
print(f"| Repository size at end | {mib(repo_bytes)} | sum stored {mib(sum(c['stored_bytes'] for c in ok))} |")

# A soak is flat when these do not drift: the run in up to 6 windows of at
# least 5 minutes each, by each cycle's cut.
nwin = max(1, min(6, int(wall // 300)))
span = wall / nwin
print()
print("### Over time")
print()
print("| window | incremental cycles | cycle p50 / p95 s | stored per cycle | stored / guest-written | lag p95 s | ferry RSS max |")
print("|---|---:|---:|---:|---:|---:|---:|")
for w in range(nwin):
    a, b = t_start + w * span, t_start + (w + 1) * span
    cs = [c for c in inc if a <= ts(c["cut"]) < b]
    secs = [c["cycle_secs"] for c in cs]
    stored = sum(c["stored_bytes"] for c in cs)
    rw = [r for r in rows if a <= float(r[0]) < b]
    hb = [(float(r[0]), int(r[9])) for r in rw if r[9] != "NA"]
    written = (hb[-1][1] - hb[0][1]) * 4096 if len(hb) >= 2 else 0
    # the written bytes of the window's cycles, approximately: guest writes in the window
    lag_w = [num(r[1]) for r in rw if num(r[1]) is not None]
    rss_w = [int(r[10]) for r in rw if r[10] != "NA"]
    print(f"| {w * span / 60:.0f}–{(w + 1) * span / 60:.0f} min | {len(cs)} | {f(pct(secs, 50))} / {f(pct(secs, 95))} | "
          f"{mib(stored / len(cs)) if cs else 'n/a'} | {f(stored / written, 2) if written else 'n/a'} | "
          f"{f(pct(lag_w, 95))} | {f(max(rss_w) / 1024, 0) + ' MiB' if rss_w else 'n/a'} |")
PY
}

report() {
  echo "# Ferry continuous protection benchmark (ferry protect)"
  echo
  echo "- Date: $(date -Is)"
  echo "- Machine: $(nproc) cores, $(awk -F': ' '/^model name/{print $2; exit}' /proc/cpuinfo)," \
       "$(awk '/MemTotal/{printf "%.0f GiB RAM", $2/1048576}' /proc/meminfo), kernel $(uname -r)"
  echo "- Work dir: $RUN ($(df -T "$RUN" | awk 'NR==2{print $2}')); fleecing images (--work-dir): $WORK_DIR ($(df -T "$WORK_DIR" | awk 'NR==2{print $2}'))"
  echo "- Ferry: $("$FERRY" --version 2>/dev/null || echo unknown) ($(git -C "$REPO_ROOT" rev-parse --short HEAD 2>/dev/null || echo '?'))"
  echo "- QEMU: $(qemu-system-x86_64 --version | head -n1), TCG (no KVM), guest from scripts/make-guest, 256 MiB RAM"
  echo "- Disk: $DISK_SIZE qcow2, blank at boot; guest \`ferry.mode=writer ferry.rate=$RATE ferry.fill=$FILL\`"
  echo "- Before protection (${WARMUP_SECS} s warm-up): writer $WARM_RATE writes/s (guest heartbeat), QEMU CPU $WARM_QCPU % of one core"
  echo "- Command: \`ferry --json protect --interval $INTERVAL --duration $DURATION${KEEP_WITHIN:+ --keep-within $KEEP_WITHIN} --status STATUS.json\`" \
       "(exit $FERRY_RC); lag sampled from STATUS.json once a second"
  echo "- Repository: local directory; $POINTS points at end; \`ferry check\`: $CHECK (${CHECK_SECS} s)"
  echo
  results
  echo
  echo "Logs: \`$LOGS\` (cycles.jsonl, samples.tsv, ferry.log, serial.log; kept until the next run)."
}

mkdir -p "$(dirname "$OUT")"
report | tee "$OUT"
log "report written to $OUT"
[[ $FERRY_RC -eq 0 && $CHECK == ok ]]
