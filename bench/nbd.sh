#!/usr/bin/env bash
# Ferry over NBD: change-map incrementals from a qcow2 dirty bitmap, and
# instant restore (ferry serve-nbd), on one qcow2 disk, in one run.
#
# The disk is bench/run.sh's cached ext4 image (real files from /usr),
# converted to qcow2 and served by qemu-nbd on 127.0.0.1:
#   full      ferry backup of nbd://127.0.0.1:PORT/disk (qemu-nbd -r, no bitmap)
#   writes    qemu-img bitmap --add -g GRANULARITY disk.qcow2 bm0, then 1% of the disk
#             rewritten by qemu-io as 4 KiB blocks of random data at random
#             4 KiB-aligned offsets (seeded)
#   incr A    ferry backup of nbd://...?bitmap=bm0 (qemu-nbd -r -B bm0): only
#             the extents the bitmap marks are read
#   incr B    the same state without the change map, into a copy of the
#             repository taken after the full backup (same parent point)
#             Targets: time B / A >= 10; growth A / changed bytes <= 1.5
#             at 4 KiB granularity, <= 2 at 64 KiB (the default of libvirt
#             checkpoints and qemu-img: ferry compares each marked region with
#             the parent's chunk and stores only the 4 KiB blocks that changed)
#   peers     restic, borg (default chunker) and borg with fixed 4 MiB chunks
#             on the raw image (qemu-img convert -O raw) before and after the
#             same writes: repository growth / changed bytes
#   instant   ferry serve-nbd of the latest point: time from process start to
#             the first 4 KiB read (and the server's own ready_secs), nbdcopy
#             of the whole export to /dev/null and to a file, against ferry
#             restore of the same point to a file. Target: NBD throughput
#             >= 0.5 of the local restore's
# Every restore and NBD copy is compared (cmp) with qemu-img convert -O raw of
# the qcow2; a mismatch fails the run (exit 1, after the report).
# Incrementals and the instant-restore steps run ROUNDS times (medians).
# qemu-nbd and ferry serve-nbd are started here and stopped by PID.
# A Markdown report goes to stdout and --out.
#
# Usage: bench/nbd.sh [--quick] [--rounds N] [--out FILE]
# Env:   SIZE_MIB (2048), ROUNDS (3), GRANULARITY (65536: the bitmap's bytes per
#        bit), FERRY_BENCH_DIR (/var/tmp/ferry-bench),
#        FERRY_BIN, CARGO_TARGET_DIR (/var/tmp/ferry-target), KEEP_REPOS=1
set -euo pipefail

BENCH_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(dirname "$BENCH_ROOT")
HELPERS="$BENCH_ROOT/helpers.py"

# ---------------------------------------------------------------- arguments
OUT="$BENCH_ROOT/results/nbd-latest.md"
SIZE_MIB=${SIZE_MIB:-2048}
ROUNDS=${ROUNDS:-3}
while [[ $# -gt 0 ]]; do
  case $1 in
    --quick) SIZE_MIB=256; shift ;;
    --out) OUT=$2; shift 2 ;;
    --rounds) ROUNDS=$2; shift 2 ;;
    -h|--help) sed -n '2,32p' "$0"; exit 0 ;;
    *) echo "unknown argument: $1" >&2; exit 2 ;;
  esac
done
[[ $ROUNDS =~ ^[1-9][0-9]*$ ]] || { echo "--rounds must be a positive integer" >&2; exit 2; }

BENCH_DIR=${FERRY_BENCH_DIR:-/var/tmp/ferry-bench}
CACHE="$BENCH_DIR/cache"          # base images, shared with bench/run.sh
RUN="$BENCH_DIR/nbdrun"           # everything else, wiped at every run
LOGS="$RUN/logs"
QCOW="$RUN/disk.qcow2"            # the disk qemu-nbd serves
DISK="$RUN/disk.img"              # raw copy of it: the peers' source and the reference
SIZE_BYTES=$((SIZE_MIB * 1024 * 1024))
BASE="$CACHE/base-${SIZE_MIB}M.img"
SEED_SELECT=20240601              # must match bench/run.sh: same image
SEED_WRITES=1
UNIT=4096
GRANULARITY=${GRANULARITY:-65536}
[[ $GRANULARITY =~ ^[0-9]+$ && $GRANULARITY -ge $UNIT ]] || { echo "GRANULARITY must be a number of bytes >= $UNIT" >&2; exit 2; }
NWRITES=$(( (SIZE_BYTES / 100 + UNIT / 2) / UNIT ))   # 1% of the disk: 5243 for 2 GiB
CHANGED=$((NWRITES * UNIT))
EXPORT=disk BITMAP=bm0
PEERS=(restic borg borg-fixed)

export RESTIC_PASSWORD=bench BORG_PASSPHRASE=bench FERRY_PASSWORD=bench-password
export RESTIC_CACHE_DIR="$RUN/cache/restic" BORG_BASE_DIR="$RUN/cache/borg"
export XDG_CACHE_HOME="$RUN/cache/xdg" BORG_RELOCATED_REPO_ACCESS_IS_OK=yes
unset FERRY_REPO FERRY_LOG

log() { printf '[nbdbench %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() { log "error: $*"; exit 1; }

# ---------------------------------------------------------------- tools
install_tools() {
  local missing=()
  command -v restic >/dev/null || missing+=(restic)
  command -v borg >/dev/null || missing+=(borgbackup)
  [[ -x /usr/bin/time ]] || missing+=(time)
  command -v mkfs.ext4 >/dev/null || missing+=(e2fsprogs)
  command -v qemu-nbd >/dev/null || missing+=(qemu-utils)
  command -v nbdcopy >/dev/null || missing+=(libnbd-bin)
  if [[ ${#missing[@]} -gt 0 ]]; then
    log "installing ${missing[*]}"
    if ! DEBIAN_FRONTEND=noninteractive apt-get install -y "${missing[@]}" >&2; then
      apt-get update >&2
      DEBIAN_FRONTEND=noninteractive apt-get install -y "${missing[@]}" >&2
    fi
  fi
  if [[ -n ${FERRY_BIN:-} ]]; then
    FERRY_BIN_GIVEN=1
    [[ -x $FERRY_BIN ]] || die "FERRY_BIN=$FERRY_BIN is not executable"
  else
    export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-/var/tmp/ferry-target}
    FERRY_BIN="$CARGO_TARGET_DIR/release/ferry"
    log "building ferry (cargo build --release -p ferry-orchestrator, log: $LOGS/ferry-build.log)"
    (cd "$REPO_ROOT" && cargo build --release -p ferry-orchestrator) >"$LOGS/ferry-build.log" 2>&1 \
      || die "cargo build failed (see $LOGS/ferry-build.log)"
    [[ -x $FERRY_BIN ]] || die "no binary at $FERRY_BIN after the build"
  fi
  # A private copy: a concurrent cargo build cannot swap the binary mid-run.
  cp "$FERRY_BIN" "$RUN/ferry"; FERRY_SRC=$FERRY_BIN; FERRY_BIN="$RUN/ferry"
  TREE=$(cd "$REPO_ROOT" && git rev-parse --short HEAD 2>/dev/null || echo '?')
  if [[ -z ${FERRY_BIN_GIVEN:-} ]] && (cd "$REPO_ROOT" && [[ -n $(git status --porcelain --untracked-files=no 2>/dev/null) ]]); then
    TREE+=", with uncommitted changes"
  fi
  RESTIC_INIT_ARGS=()
  if restic init --help | grep -q -- --repository-version; then
    RESTIC_INIT_ARGS=(--repository-version 2)
  fi
}

# ---------------------------------------------------------------- base image
# bench/run.sh's make_base, taken from run.sh itself (as bench/s3.sh does) so
# that all benchmarks build and share, through $CACHE, the very same image.
load_make_base() {
  local def
  def=$(sed -n '/^make_base() {$/,/^}$/p' "$BENCH_ROOT/run.sh")
  [[ $def == *'mkfs.ext4'* ]] || die "cannot find make_base() in $BENCH_ROOT/run.sh"
  eval "$def"
}

# ---------------------------------------------------------------- processes
NBD_PID="" NBD_PORT="" SERVE_PID=""
cleanup() {
  nbd_stop || true
  serve_stop || true
  rm -f "$DISK" "$QCOW" "$RUN/restore.img" "$RUN/nbdcopy.img" "$RUN/qemu-nbd.pid"
  rm -rf "$RUN/writes"
  [[ ${KEEP_REPOS:-0} == 1 ]] || rm -rf "$RUN/repos"
}

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# nbd_start [QEMU-NBD OPTIONS...]: serve $QCOW read-only as export $EXPORT on a
# free port of 127.0.0.1; --fork returns once the server accepts connections.
nbd_start() {
  local try pidf="$RUN/qemu-nbd.pid"
  for try in 1 2 3; do
    NBD_PORT=$(free_port); rm -f "$pidf"
    if qemu-nbd -r -f qcow2 -x "$EXPORT" -b 127.0.0.1 -p "$NBD_PORT" -t --fork \
         --pid-file="$pidf" "$@" "$QCOW" >>"$LOGS/qemu-nbd.log" 2>&1 </dev/null; then
      NBD_PID=$(cat "$pidf")
      log "qemu-nbd pid $NBD_PID on 127.0.0.1:$NBD_PORT${*:+ (}${*}${*:+)}"
      return 0
    fi
    log "qemu-nbd did not start on port $NBD_PORT (try $try), see $LOGS/qemu-nbd.log"
  done
  die "cannot start qemu-nbd"
}

# Stop a process that is not our child (qemu-nbd forked away): by PID, then
# wait until it is gone, so the image's lock is released.
nbd_stop() {
  [[ -n $NBD_PID ]] || return 0
  kill "$NBD_PID" 2>/dev/null || true
  local i
  for i in $(seq 100); do kill -0 "$NBD_PID" 2>/dev/null || break; sleep 0.05; done
  kill -0 "$NBD_PID" 2>/dev/null && { kill -9 "$NBD_PID" 2>/dev/null || true; sleep 0.2; }
  NBD_PID=""
}

serve_stop() {
  [[ -n $SERVE_PID ]] || return 0
  kill "$SERVE_PID" 2>/dev/null || true
  wait "$SERVE_PID" 2>/dev/null || true
  SERVE_PID=""
}

# CPU seconds (user+sys) a process has used so far.
proc_cpu() {
  awk -v hz="$(getconf CLK_TCK)" '{ sub(/^.*\) /, ""); printf "%.2f", ($12 + $13) / hz }' "/proc/$1/stat"
}

# ---------------------------------------------------------------- measuring
declare -A R   # R[STEP.ROUND,metric] (R[STEP,metric] = median); metrics: wall cpu rss status ...
FAILURES=()

# measure STEP CMD...: run CMD under GNU time, stdout to $LOGS/STEP.out,
# stderr to $LOGS/STEP.err; records wall, CPU, peak RSS; returns CMD's status.
measure() {
  local step=$1; shift
  local tf="$LOGS/$step.time" rc=0
  log "$step"
  sync   # earlier steps' dirty pages are not this step's work
  echo "+ $*" >"$LOGS/$step.err"
  /usr/bin/time -f '%e %U %S %M' -o "$tf" "$@" >"$LOGS/$step.out" 2>>"$LOGS/$step.err" </dev/null || rc=$?
  local wall=0 usr=0 sys=0 rss=0
  [[ -s $tf ]] && read -r wall usr sys rss < <(tail -n1 "$tf")
  R[$step,wall]=$wall
  R[$step,cpu]=$(awk -v u="$usr" -v s="$sys" 'BEGIN{printf "%.2f", u+s}')
  R[$step,rss]=$(awk -v k="$rss" 'BEGIN{printf "%.0f", k/1024}')
  if [[ $rc -eq 0 ]]; then R[$step,status]=ok
  else R[$step,status]=failed; FAILURES+=("$step failed (exit $rc, see $LOGS/$step.err)"); log "$step FAILED (exit $rc)"; fi
  return "$rc"
}

# jget FILE KEY: a value from a JSON document ("" if absent or null).
jget() {
  { python3 - "$@" <<'PY'
import json, sys
text = open(sys.argv[1]).read().strip()
try:
    v = json.loads(text)
except ValueError:
    v = json.loads(text.splitlines()[-1])   # line-delimited output: the last line
for k in sys.argv[2].split("."):
    v = v.get(k) if isinstance(v, dict) else None
print("" if v is None else v)
PY
  } 2>/dev/null || true
}

repo_bytes() { du -sb "$1" | cut -f1; }
mib() { awk -v b="$1" 'BEGIN{ if (b == "") print "?"; else printf "%.1f", b/1048576 }'; }
calc() { awk "BEGIN{ $1 }"; }
fmt() { awk -v x="$1" -v d="$2" 'BEGIN{ if (x == "") print ""; else printf "%.*f", d, x }'; }  # fmt NUMBER DECIMALS
div() { awk -v x="$1" -v y="$2" 'BEGIN{ if (x == "" || y == "" || y+0 == 0) print "n/a"; else printf "%.2f", x/y }'; }
ok() { local s; for s in "$@"; do [[ ${R[$s,status]:-} == ok ]] || return 1; done; }

# identical STEP FILE: cmp FILE with the reference image; records R[STEP,ident].
identical() {
  if cmp "$DISK" "$2" >>"$LOGS/$1.cmp" 2>&1; then R[$1,ident]=yes
  else
    R[$1,ident]=NO; FAILURES+=("$1: $2 differs from qemu-img convert -O raw of the qcow2 (see $LOGS/$1.cmp)")
    log "$1: MISMATCH with the reference image"
  fi
}

# summarize STEP METRIC...: R[STEP,METRIC] = median over the rounds that
# succeeded, R[STEP,rounds,METRIC] = their values; status ok if any did (the
# failed ones are listed under Failures).
summarize() {
  local step=$1 m r; shift
  local good=()
  for ((r = 1; r <= ROUNDS; r++)); do
    [[ ${R[$step.$r,status]:-missing} == ok ]] && good+=("$r")
  done
  if [[ ${#good[@]} -eq 0 ]]; then R[$step,status]=failed; return 0; fi
  R[$step,status]=ok
  for m in "$@"; do
    local vals=()
    for r in "${good[@]}"; do vals+=("${R[$step.$r,$m]:-}"); done
    R[$step,rounds,$m]=$(IFS=,; echo "${vals[*]}" | sed 's/,/, /g')
    R[$step,$m]=$(printf '%s\n' "${vals[@]}" | sort -g | awk '{a[NR]=$1} END{ if (NR == 0) print ""; else if (NR % 2) print a[(NR+1)/2]; else { x = (a[NR/2]+a[NR/2+1])/2; if (x == int(x)) printf "%d", x; else printf "%.3f", x } }')
  done
}

# ---------------------------------------------------------------- helpers in python
# firstbyte.py SERVE_OUT T0 REF: wait for serve-nbd's JSON line in SERVE_OUT,
# connect (fixed newstyle, NBD_OPT_GO), read the first 4 KiB and compare it with
# REF's. Prints JSON: url, url_secs and first_secs (wall clock since T0, the
# moment the server process was started), same (bytes equal).
write_python() {
  cat >"$RUN/firstbyte.py" <<'PY'
import json, socket, struct, sys, time
from urllib.parse import urlparse, unquote
out, t0, ref = sys.argv[1], float(sys.argv[2]), sys.argv[3]
deadline = time.time() + 60
line = None
while time.time() < deadline:
    with open(out, "rb") as f:
        data = f.read()
    if b"\n" in data:
        line = data.split(b"\n", 1)[0]
        break
    time.sleep(0.002)
if line is None:
    sys.exit("serve-nbd printed no URL within 60 s")
t_url = time.time()
info = json.loads(line)
u = urlparse(info["url"])
name = unquote(u.path.lstrip("/")).encode()

def recv(s, n):
    b = bytearray()
    while len(b) < n:
        c = s.recv(n - len(b))
        if not c:
            raise EOFError("server closed the connection")
        b += c
    return bytes(b)

IHAVEOPT = 0x49484156454F5054
s = socket.create_connection((u.hostname, u.port), timeout=30)
s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
magic, opt, hflags = struct.unpack(">QQH", recv(s, 18))
assert magic == 0x4E42444D41474943 and opt == IHAVEOPT, "not an NBD newstyle server"
s.sendall(struct.pack(">I", 3))                                   # FIXED_NEWSTYLE | NO_ZEROES
payload = struct.pack(">I", len(name)) + name + struct.pack(">H", 0)
s.sendall(struct.pack(">QII", IHAVEOPT, 7, len(payload)) + payload)  # NBD_OPT_GO
while True:
    rmagic, ropt, rtype, rlen = struct.unpack(">QIII", recv(s, 20))
    body = recv(s, rlen)
    if rtype == 1:                                                # NBD_REP_ACK
        break
    if rtype & 0x80000000:
        sys.exit(f"NBD_OPT_GO refused: type {rtype:#x} {body!r}")
s.sendall(struct.pack(">IHHQQI", 0x25609513, 0, 0, 1, 0, 4096))   # NBD_CMD_READ 0, 4 KiB
rmagic, err, handle = struct.unpack(">IIQ", recv(s, 16))
assert rmagic == 0x67446698 and handle == 1, "unexpected reply"
if err:
    sys.exit(f"read failed: NBD error {err}")
block = recv(s, 4096)
t_first = time.time()
s.sendall(struct.pack(">IHHQQI", 0x25609513, 0, 2, 2, 0, 0))     # NBD_CMD_DISC
s.close()
with open(ref, "rb") as f:
    same = f.read(4096) == block
print(json.dumps({"url": info["url"], "url_secs": t_url - t0, "first_secs": t_first - t0,
                  "ready_secs": info.get("ready_secs"), "same": same}))
PY
  # writes.py DIR SIZE COUNT UNIT SEED: COUNT blocks of random data at distinct
  # random UNIT-aligned offsets (seeded): DIR/N holds block N, DIR/cmds the
  # qemu-io commands, DIR/list "offset file" per block.
  cat >"$RUN/writes.py" <<'PY'
import os, random, sys
d, size, count, unit, seed = sys.argv[1], *map(int, sys.argv[2:6])
rng = random.Random(seed)
offsets = sorted(rng.sample(range(size // unit), count))
with open(os.path.join(d, "cmds"), "w") as cmds, open(os.path.join(d, "list"), "w") as lst:
    for i, idx in enumerate(offsets):
        p = os.path.join(d, str(i))
        with open(p, "wb") as f:
            f.write(rng.randbytes(unit))
        cmds.write(f"write -q -s {p} {idx * unit} {unit}\n")
        lst.write(f"{idx * unit} {p}\n")
PY
  # checkwrites.py IMAGE LIST UNIT: every written block is in IMAGE.
  cat >"$RUN/checkwrites.py" <<'PY'
import sys
img, lst, unit = sys.argv[1], sys.argv[2], int(sys.argv[3])
bad = n = 0
with open(img, "rb") as f:
    for line in open(lst):
        off, p = line.split()
        f.seek(int(off))
        n += 1
        if f.read(unit) != open(p, "rb").read():
            bad += 1
print(f"{n - bad} of {n} blocks as written")
sys.exit(1 if bad else 0)
PY
  # dirty.py: bytes a `nbdinfo --map` listing marks dirty (type bit 0).
  cat >"$RUN/dirty.py" <<'PY'
import sys
total = 0
for line in sys.stdin:
    f = line.split()
    if len(f) >= 3 and int(f[2]) & 1:
        total += int(f[1])
print(total)
PY
}

# ---------------------------------------------------------------- peers
peer_argv() { # peer_argv TOOL ACTION [ARCHIVE]: sets CMD
  local tool=$1 repo="$RUN/repos/$1"
  case $tool:$2 in
    restic:init)    CMD=(restic init --repo "$repo" "${RESTIC_INIT_ARGS[@]}") ;;
    restic:backup)  CMD=(restic -r "$repo" backup --host bench "$DISK") ;;
    borg*:init)     CMD=(borg init -e repokey "$repo") ;;
    borg:backup)    CMD=(borg create --compression lz4 "$repo::$3" disk.img) ;;
    borg-fixed:backup)
      CMD=(borg create --compression lz4 --chunker-params "fixed,4194304" "$repo::$3" disk.img) ;;
  esac
}

# peer_step TOOL STEP: back up $DISK (from $RUN: borg archives the relative path).
peer_step() {
  local tool=$1 step=$2 repo="$RUN/repos/$1" b0 old=$PWD
  ok "$tool-init" || return 0
  b0=$(repo_bytes "$repo")
  cat "$DISK" >/dev/null   # every tool starts with the image in page cache
  peer_argv "$tool" backup "$step"
  cd "$RUN"
  measure "$tool-$step" "${CMD[@]}" || true
  cd "$old"
  R[$tool-$step,growth]=$(( $(repo_bytes "$repo") - b0 ))
}

peers_init() {
  local tool
  mkdir -p "$RUN/repos"
  for tool in "${PEERS[@]}"; do
    peer_argv "$tool" init
    if (cd "$RUN" && "${CMD[@]}") >"$LOGS/$tool-init.log" 2>&1 </dev/null; then R[$tool-init,status]=ok
    else R[$tool-init,status]=failed; FAILURES+=("$tool init failed (see $LOGS/$tool-init.log)"); fi
  done
}

# ---------------------------------------------------------------- ferry steps
# ferry_backup STEP REPO URL: ferry --json backup; growth and JSON fields.
ferry_backup() {
  local step=$1 repo=$2 url=$3 b0 k
  b0=$(repo_bytes "$repo")
  cat "$QCOW" >/dev/null   # qemu-nbd reads from the page cache, as the peers do
  measure "$step" "$FERRY_BIN" --json -r "$repo" backup --source bench "$url" || true
  R[$step,growth]=$(( $(repo_bytes "$repo") - b0 ))
  if ok "$step"; then
    for k in bytes_read new_bytes stored_bytes changed_bytes unchanged_bytes disk_bytes; do
      R[$step,$k]=$(jget "$LOGS/$step.out" "$k")
    done
    R[$step,duration_secs]=$(fmt "$(jget "$LOGS/$step.out" duration_secs)" 2)
  fi
}

# serve STEP REPO: start ferry serve-nbd of bench@latest, time the first 4 KiB.
serve() {
  local step=$1 repo=$2 t0
  : >"$LOGS/$step.serve.out"
  t0=$EPOCHREALTIME
  "$FERRY_BIN" --json -r "$repo" serve-nbd bench@latest --listen 127.0.0.1:0 --insecure \
    >"$LOGS/$step.serve.out" 2>"$LOGS/$step.serve.err" </dev/null &
  SERVE_PID=$!
  if python3 "$RUN/firstbyte.py" "$LOGS/$step.serve.out" "$t0" "$DISK" >"$LOGS/$step.first.json" 2>"$LOGS/$step.first.err"; then
    R[$step,url]=$(jget "$LOGS/$step.first.json" url)
    R[$step,first]=$(fmt "$(jget "$LOGS/$step.first.json" first_secs)" 3)
    R[$step,urlsecs]=$(fmt "$(jget "$LOGS/$step.first.json" url_secs)" 3)
    R[$step,ready]=$(fmt "$(jget "$LOGS/$step.first.json" ready_secs)" 3)
    if [[ $(jget "$LOGS/$step.first.json" same) == True ]]; then R[$step,status]=ok
    else R[$step,status]=failed; FAILURES+=("$step: the first 4 KiB over NBD differ from the image"); fi
  else
    R[$step,status]=failed; FAILURES+=("$step: no first read from serve-nbd (see $LOGS/$step.first.err, $LOGS/$step.serve.err)")
    serve_stop; return 1
  fi
}

# ---------------------------------------------------------------- the run
prepare() {
  make_base
  log "qemu-img convert -O qcow2 $BASE $QCOW"
  qemu-img convert -O qcow2 "$BASE" "$QCOW"
  qemu-img convert -O raw "$QCOW" "$DISK"   # the "before" image for the peers
  QCOW_FILE_BYTES=$(stat -c %s "$QCOW")
  QCOW_ALLOC=$(qemu-img info --output=json "$QCOW" | python3 -c 'import json,sys; print(json.load(sys.stdin)["actual-size"])')
}

full_backups() {
  local tool
  peers_init
  for tool in "${PEERS[@]}"; do peer_step "$tool" full; done
  "$FERRY_BIN" -r "$RUN/repos/ferry-parent" init >"$LOGS/ferry-init.log" 2>&1 </dev/null \
    || die "ferry init failed (see $LOGS/ferry-init.log)"
  nbd_start
  ferry_backup ferry-full "$RUN/repos/ferry-parent" "nbd://127.0.0.1:$NBD_PORT/$EXPORT"
  nbd_stop
  ok ferry-full || die "ferry's full backup failed (see $LOGS/ferry-full.err)"
}

apply_writes() {
  local w="$RUN/writes"
  rm -rf "$w"; mkdir -p "$w"
  qemu-img bitmap --add -g "$GRANULARITY" "$QCOW" "$BITMAP"
  python3 "$RUN/writes.py" "$w" "$SIZE_BYTES" "$NWRITES" "$UNIT" "$SEED_WRITES"
  log "qemu-io: $NWRITES writes of $UNIT bytes into $QCOW (bitmap $BITMAP, granularity $GRANULARITY)"
  local t0=$EPOCHREALTIME
  qemu-io -t writeback -f qcow2 "$QCOW" <"$w/cmds" >"$LOGS/qemu-io.log" 2>&1 \
    || die "qemu-io failed (see $LOGS/qemu-io.log)"
  WRITE_SECS=$(calc "printf \"%.2f\", $EPOCHREALTIME - $t0")
  if grep -Eqi 'error|failed|invalid' "$LOGS/qemu-io.log"; then die "qemu-io reported errors (see $LOGS/qemu-io.log)"; fi
  rm -f "$DISK"
  qemu-img convert -O raw "$QCOW" "$DISK"   # the "after" image: peers' source and reference
  python3 "$RUN/checkwrites.py" "$DISK" "$w/list" "$UNIT" >"$LOGS/checkwrites.log" 2>&1 \
    || die "the writes are not in the image (see $LOGS/checkwrites.log)"
  log "$(cat "$LOGS/checkwrites.log")"
  rm -rf "$w"
}

incrementals() {
  local tool r
  for tool in "${PEERS[@]}"; do peer_step "$tool" incr; done
  nbd_start -B "$BITMAP"
  local base="nbd://127.0.0.1:$NBD_PORT/$EXPORT"
  nbdinfo --map="qemu:dirty-bitmap:$BITMAP" "$base" >"$LOGS/bitmap-map.txt" 2>&1 || true
  DIRTY=$(python3 "$RUN/dirty.py" <"$LOGS/bitmap-map.txt" 2>/dev/null || echo "?")
  for ((r = 1; r <= ROUNDS; r++)); do
    local a="$RUN/repos/ferry-a-$r" b="$RUN/repos/ferry-b-$r"
    rm -rf "$a" "$b"
    cp -a "$RUN/repos/ferry-parent" "$a"; cp -a "$RUN/repos/ferry-parent" "$b"
    # what every ferry command pays: process start, key derivation, listing
    measure "open.$r" "$FERRY_BIN" -r "$a" points || true
    # alternate the order, so that neither always runs right after the copies
    if (( r % 2 )); then
      ferry_backup "incr-a.$r" "$a" "$base?bitmap=$BITMAP"
      ferry_backup "incr-b.$r" "$b" "$base"
    else
      ferry_backup "incr-b.$r" "$b" "$base"
      ferry_backup "incr-a.$r" "$a" "$base?bitmap=$BITMAP"
    fi
    # the point of round 1 is restored and served below; B's is checked once
    if (( r > 1 )) && [[ ${KEEP_REPOS:-0} != 1 ]]; then rm -rf "$a" "$b"; fi
  done
  nbd_stop
  summarize incr-a wall cpu rss growth bytes_read new_bytes stored_bytes changed_bytes unchanged_bytes duration_secs
  summarize incr-b wall cpu rss growth bytes_read new_bytes stored_bytes duration_secs
  summarize open wall cpu
  ok incr-a.1 || die "the bitmap incremental failed (see $LOGS/incr-a.1.err)"
}

instant_restore() {
  local repo="$RUN/repos/ferry-a-1" r img="$RUN/restore.img" cp="$RUN/nbdcopy.img"
  # Correctness of the no-bitmap incremental's point, once.
  if ok incr-b.1; then
    rm -f "$img"
    if measure check-b "$FERRY_BIN" --json -r "$RUN/repos/ferry-b-1" restore bench@latest --to "$img"; then
      identical check-b "$img"
    fi
    rm -f "$img"
    [[ ${KEEP_REPOS:-0} == 1 ]] || rm -rf "$RUN/repos/ferry-b-1"
  fi
  for ((r = 1; r <= ROUNDS; r++)); do
    # local restore of the bitmap incremental's point; ferry syncs before it exits
    rm -f "$img"
    find "$repo" -type f -exec cat {} + >/dev/null
    if measure "restore.$r" "$FERRY_BIN" --json -r "$repo" restore bench@latest --to "$img"; then
      R[restore.$r,dur]=$(fmt "$(jget "$LOGS/restore.$r.out" duration_secs)" 2)
      identical "restore.$r" "$img"
    fi
    rm -f "$img"

    # serve-nbd, first 4 KiB, then the whole export into a file (+ sync), cmp
    find "$repo" -type f -exec cat {} + >/dev/null
    if serve "serve-file.$r" "$repo"; then
      rm -f "$cp"
      if measure "nbdcopy-file.$r" nbdcopy "${R[serve-file.$r,url]}" "$cp"; then
        local t0=$EPOCHREALTIME; sync
        R[nbdcopy-file.$r,sync]=$(calc "printf \"%.2f\", $EPOCHREALTIME - $t0")
        R[nbdcopy-file.$r,synced]=$(calc "printf \"%.2f\", ${R[nbdcopy-file.$r,wall]} + ${R[nbdcopy-file.$r,sync]}")
        identical "nbdcopy-file.$r" "$cp"
      fi
      R[nbdcopy-file.$r,srvcpu]=$(proc_cpu "$SERVE_PID" 2>/dev/null || echo "")
      R[nbdcopy-file.$r,srvrss]=$(awk '/^VmHWM/{printf "%.0f", $2/1024}' "/proc/$SERVE_PID/status" 2>/dev/null || echo "")
      serve_stop
      rm -f "$cp"
    fi

    # a fresh server (cold chunk cache), the whole export to nbdcopy's null:
    find "$repo" -type f -exec cat {} + >/dev/null
    if serve "serve-null.$r" "$repo"; then
      measure "nbdcopy-null.$r" nbdcopy "${R[serve-null.$r,url]}" null: || true
      R[nbdcopy-null.$r,srvcpu]=$(proc_cpu "$SERVE_PID" 2>/dev/null || echo "")
      serve_stop
    fi

    # round 1 only, a diagnostic: one connection, one request in flight
    if (( r == 1 )); then
      find "$repo" -type f -exec cat {} + >/dev/null
      if serve "serve-serial" "$repo"; then
        measure "nbdcopy-serial" nbdcopy --connections=1 --requests=1 "${R[serve-serial,url]}" null: || true
        R[nbdcopy-serial,srvcpu]=$(proc_cpu "$SERVE_PID" 2>/dev/null || echo "")
        serve_stop
      fi
    fi
  done
  # both servers' first reads count as samples of first-byte time
  local n=0
  for ((r = 1; r <= ROUNDS; r++)); do
    local s
    for s in serve-file serve-null; do
      ok "$s.$r" || continue
      n=$((n + 1))
      R[serve.$n,status]=ok R[serve.$n,first]=${R[$s.$r,first]}
      R[serve.$n,urlsecs]=${R[$s.$r,urlsecs]} R[serve.$n,ready]=${R[$s.$r,ready]}
    done
  done
  local saved=$ROUNDS; ROUNDS=$n
  [[ $n -gt 0 ]] && summarize serve first urlsecs ready
  ROUNDS=$saved
  summarize restore wall cpu rss dur
  summarize nbdcopy-file wall cpu rss sync synced srvcpu srvrss
  summarize nbdcopy-null wall cpu rss srvcpu
}

# ---------------------------------------------------------------- report
cell() { # cell STEP METRIC
  if ok "$1"; then echo "${R[$1,$2]:-?}"; else echo "${R[$1,status]:-missing}"; fi
}
cellm() { # cellm STEP METRIC: bytes as MiB
  if ok "$1"; then mib "${R[$1,$2]:-}"; else echo "${R[$1,status]:-missing}"; fi
}
rounds() { echo "${R[$1,rounds,$2]:-–}"; }
verdict() { if calc "exit !($1)"; then echo yes; else echo "**no**"; fi; }
idents() { # idents STEP: yes if every round's copy was identical
  local r v="" all=yes
  for ((r = 1; r <= ROUNDS; r++)); do
    v=${R[$1.$r,ident]:-–}
    [[ $v == yes ]] || all=no
  done
  echo "$all"
}

report() {
  local gib=1073741824 apparent alloc
  apparent=$(stat -c %s "$BASE"); alloc=$(du -B1 "$BASE" | cut -f1)
  echo "# Ferry over NBD: change-map incrementals and instant restore"
  echo
  echo "- Date: $(date -Is)"
  echo "- Machine: $(nproc) cores, $(awk -F': ' '/^model name/{print $2; exit}' /proc/cpuinfo)," \
       "$(awk '/MemTotal/{printf "%.0f GiB RAM", $2/1048576}' /proc/meminfo), kernel $(uname -r);" \
       "load average at the start $LOAD0, at the end $(cut -d' ' -f1-3 /proc/loadavg)"
  echo "- Work dir: $RUN ($(df -T "$RUN" | awk 'NR==2{print $2}')); repositories, images and restores all on it, page cache warm"
  echo "- Disk: the cached bench/run.sh image ($BASE: ext4 of real files from /usr, apparent $(mib "$apparent") MiB," \
       "allocated $(mib "$alloc") MiB), \`qemu-img convert -O qcow2\`: qcow2 file $(mib "$QCOW_FILE_BYTES") MiB" \
       "($(mib "$QCOW_ALLOC") MiB allocated)"
  echo "- Changes: \`qemu-img bitmap --add -g $GRANULARITY disk.qcow2 $BITMAP\`, then $NWRITES writes of $UNIT bytes of random data" \
       "at distinct random $UNIT-aligned offsets (seed $SEED_WRITES) with one \`qemu-io\` ($WRITE_SECS s):" \
       "$(mib "$CHANGED") MiB changed ($CHANGED bytes, 1% of the disk); \`nbdinfo --map=qemu:dirty-bitmap:$BITMAP\`" \
       "marks $DIRTY bytes dirty"
  echo "- NBD: $(qemu-nbd --version | head -n1) on 127.0.0.1 (\`qemu-nbd -r -f qcow2 -t [-B $BITMAP]\`);" \
       "$(nbdcopy --version | head -n1) with its defaults"
  echo "- ferry: $("$FERRY_BIN" --version 2>/dev/null || echo '?'), $FERRY_SRC$([[ -n ${FERRY_BIN_GIVEN:-} ]] && echo ' (FERRY_BIN); checkout' || echo ', built from') $TREE; defaults (fixed 64 KiB chunks, zstd 2)"
  echo "- Peers, on the raw image (\`qemu-img convert -O raw\` of the qcow2, before and after the writes):" \
       "$(restic version | head -n1) (repository v2, zstd auto); $(borg --version) with lz4, default chunker and" \
       "\`--chunker-params fixed,4194304\`"
  echo "- $ROUNDS round(s) of the incrementals (each into a fresh \`cp -a\` of the repository after the full backup)" \
       "and of the instant-restore steps; figures are medians, every round's value in the \"rounds\" column."
  echo
  echo "Times in seconds (wall, GNU time, process start to exit); CPU = user+sys; RSS = peak resident set."
  echo "Growth = repository size change (\`du -sb\`). Read/new/stored are ferry's JSON \`bytes_read\`, \`new_bytes\`"
  echo "(unique data before compression), \`stored_bytes\` (after compression and encryption)."

  echo
  echo "## Full backup"
  echo
  echo "| Tool | Source | Wall s | CPU s | Peak RSS MiB | Read MiB | Repository MiB |"
  echo "|---|---|---:|---:|---:|---:|---:|"
  echo "| ferry | qemu-nbd, no bitmap | $(cell ferry-full wall) | $(cell ferry-full cpu) | $(cell ferry-full rss) |" \
       "$(cellm ferry-full bytes_read) | $(cellm ferry-full growth) |"
  local t
  for t in "${PEERS[@]}"; do
    echo "| $t | raw file | $(cell "$t-full" wall) | $(cell "$t-full" cpu) | $(cell "$t-full" rss) | – | $(cellm "$t-full" growth) |"
  done

  echo
  echo "## Incremental after 1% scattered 4 KiB writes"
  echo
  echo "| Tool | Source | Wall s, rounds | Wall s | CPU s | Peak RSS MiB | Read MiB | New MiB | Stored MiB | Growth MiB | Growth / changed |"
  echo "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"
  local s label
  for s in incr-a incr-b; do
    [[ $s == incr-a ]] && label="A: qemu-nbd \`?bitmap=$BITMAP\`" || label="B: qemu-nbd, no change map"
    echo "| ferry | $label | $(rounds "$s" wall) | $(cell "$s" wall) | $(cell "$s" cpu) | $(cell "$s" rss) |" \
         "$(cellm "$s" bytes_read) | $(cellm "$s" new_bytes) | $(cellm "$s" stored_bytes) | $(cellm "$s" growth) |" \
         "$(ok "$s" && div "${R[$s,growth]}" "$CHANGED" || echo n/a) |"
  done
  for t in "${PEERS[@]}"; do
    echo "| $t | raw file | ${R[$t-incr,wall]:-–} | $(cell "$t-incr" wall) | $(cell "$t-incr" cpu) | $(cell "$t-incr" rss) | – | – | – |" \
         "$(cellm "$t-incr" growth) | $(ok "$t-incr" && div "${R[$t-incr,growth]}" "$CHANGED" || echo n/a) |"
  done
  echo
  echo "Changed: $(mib "$CHANGED") MiB; ferry A's JSON \`changed_bytes\` (what the bitmap marks): $(cellm incr-a changed_bytes) MiB," \
       "of which \`unchanged_bytes\` (compared equal to the parent's chunks, not stored): $(cellm incr-a unchanged_bytes) MiB." \
       "ferry's own \`duration_secs\` (without process start and opening the repository): A $(cell incr-a duration_secs) s, B $(cell incr-b duration_secs) s" \
       "(rounds: A $(rounds incr-a duration_secs); B $(rounds incr-b duration_secs))."
  echo "Growth rounds: A $(rounds incr-a growth) bytes; B $(rounds incr-b growth) bytes."
  if ok incr-b ferry-full; then
    echo "Without a change map ferry reads every 4 MiB segment that \`base:allocation\` shows data in: the full backup" \
         "read $(mib "${R[ferry-full,bytes_read]}") MiB; after the writes, which also land in the file system's free space" \
         "(allocating qcow2 clusters there), B read $(mib "${R[incr-b,bytes_read]}") MiB, and stored every 64 KiB chunk a write touched."
  fi

  echo
  echo "## Instant restore (point of incremental A)"
  echo
  echo "| Step | Rounds | Median | Client CPU s | ferry CPU s | ferry peak RSS MiB | Identical |"
  echo "|---|---|---:|---:|---:|---:|:---:|"
  echo "| serve-nbd: process start → URL printed, s | $(rounds serve urlsecs) | $(cell serve urlsecs) | – | – | – | – |"
  echo "| serve-nbd: its own \`ready_secs\` | $(rounds serve ready) | $(cell serve ready) | – | – | – | – |"
  echo "| serve-nbd: process start → first 4 KiB read, s | $(rounds serve first) | $(cell serve first) | – | – | – | yes if the first 4 KiB matched: $(ok serve && echo yes || echo "**no**") |"
  echo "| nbdcopy → null:, s | $(rounds nbdcopy-null wall) | $(cell nbdcopy-null wall) | $(cell nbdcopy-null cpu) | $(cell nbdcopy-null srvcpu) | – | – |"
  echo "| nbdcopy --connections=1 --requests=1 → null: (round 1), s | ${R[nbdcopy-serial,wall]:-–} | $(cell nbdcopy-serial wall) | $(cell nbdcopy-serial cpu) | $(cell nbdcopy-serial srvcpu) | – | – |"
  echo "| nbdcopy → file, s | $(rounds nbdcopy-file wall) | $(cell nbdcopy-file wall) | $(cell nbdcopy-file cpu) | $(cell nbdcopy-file srvcpu) | $(cell nbdcopy-file srvrss) | $(idents nbdcopy-file) |"
  echo "| nbdcopy → file, then sync, s | $(rounds nbdcopy-file synced) | $(cell nbdcopy-file synced) | – | – | – | – |"
  echo "| ferry restore → file (synced before exit), s | $(rounds restore wall) | $(cell restore wall) | $(cell restore cpu) | (same process) | $(cell restore rss) | $(idents restore) |"
  echo
  echo "Serve steps: a fresh \`ferry serve-nbd\` (default 512 MiB chunk cache) per copy; first-byte times from both servers of each round;" \
       "ferry CPU is the server's user+sys from its start to the end of the copy (/proc/PID/stat)." \
       "ferry restore's own \`duration_secs\`: $(cell restore dur) s. The repository's files are read into the page cache before each step."
  if ok check-b; then
    echo "The point of the no-change-map incremental (B, round 1) restored identical: ${R[check-b,ident]:-?}."
  fi

  # ---- targets
  local tr="n/a" gr="n/a" nr="n/a" nrn="n/a" v
  ok incr-a incr-b && tr=$(div "${R[incr-b,wall]}" "${R[incr-a,wall]}")
  ok incr-a && gr=$(div "${R[incr-a,growth]}" "$CHANGED")
  ok restore nbdcopy-file && nr=$(div "${R[restore,wall]}" "${R[nbdcopy-file,synced]}")
  ok restore nbdcopy-null && nrn=$(div "${R[restore,wall]}" "${R[nbdcopy-null,wall]}")
  local per_t="" r
  for ((r = 1; r <= ROUNDS; r++)); do
    ok "incr-a.$r" "incr-b.$r" && per_t+="$(div "${R[incr-b.$r,wall]}" "${R[incr-a.$r,wall]}"), "
  done
  per_t=${per_t%, }
  echo
  echo "## Targets"
  echo
  echo "| Target | Measured (medians) | Met |"
  echo "|---|---|:---:|"
  v="n/a"; [[ $tr != n/a ]] && v=$(verdict "$tr >= 10")
  echo "| incremental with the bitmap ≥ 10× faster than without (time B / A) | ${tr}× (${R[incr-b,wall]:-?} s against ${R[incr-a,wall]:-?} s; rounds: $per_t); ferry's own duration B/A $(ok incr-a incr-b && div "${R[incr-b,duration_secs]}" "${R[incr-a,duration_secs]}" || echo n/a)× | $v |"
  # Issue 18: a bitmap coarser than the writes may mark 16× what changed; the
  # growth goal is 2× there, 1.5× at the writes' own granularity.
  local gmax=1.5
  (( GRANULARITY > UNIT )) && gmax=2
  v="n/a"; [[ $gr != n/a ]] && v=$(verdict "$gr <= $gmax")
  local peers_g="" 
  for t in "${PEERS[@]}"; do peers_g+="$t $(ok "$t-incr" && div "${R[$t-incr,growth]}" "$CHANGED" || echo n/a)×, "; done
  echo "| repository growth of incremental A ≤ ${gmax}× the changed bytes (bitmap granularity $GRANULARITY bytes) | ${gr}× ($(cellm incr-a growth) MiB for $(mib "$CHANGED") MiB changed); peers: ${peers_g%, } | $v |"
  v="n/a"; [[ $nr != n/a ]] && v=$(verdict "$nr >= 0.5")
  echo "| NBD throughput ≥ 0.5 of the local restore's: the export read whole (nbdcopy → null:) against ferry restore → file | ${nrn} (ferry restore ${R[restore,wall]:-?} s, nbdcopy ${R[nbdcopy-null,wall]:-?} s) | $([[ $nrn != n/a ]] && verdict "$nrn >= 0.5" || echo n/a) |"
  echo "| the same, both into a file until on disk (nbdcopy → file, then sync) | ${nr} (ferry restore ${R[restore,wall]:-?} s, nbdcopy + sync ${R[nbdcopy-file,synced]:-?} s) | $v |"
  echo "| first 4 KiB readable (no target) | $(cell serve first) s from process start; serve-nbd's \`ready_secs\` $(cell serve ready) s | – |"
  local ba0="n/a"
  ok incr-a incr-b open && ba0=$(div "$(calc "print ${R[incr-b,wall]} - ${R[open,wall]}")" "$(calc "print ${R[incr-a,wall]} - ${R[open,wall]}")")
  echo "| (diagnostic) time B / A without the fixed cost of any ferry command | ${ba0}×: \`ferry points\` on the same repository (process start, Argon2 key derivation, listing) takes $(cell open wall) s (rounds: $(rounds open wall)) | – |"
  echo "| (diagnostic) serve-nbd CPU for the whole export | $(cell nbdcopy-null srvcpu) s with nbdcopy's defaults, ${R[nbdcopy-serial,srvcpu]:-?} s with one request in flight (${R[nbdcopy-serial,wall]:-?} s); ferry restore $(cell restore cpu) s | – |"
  local allid=yes
  [[ $(idents restore) == yes && $(idents nbdcopy-file) == yes ]] || allid="**no**"
  [[ ${R[check-b,ident]:-yes} == yes ]] || allid="**no**"
  echo "| restored image and NBD copy byte-identical to \`qemu-img convert -O raw\` of the qcow2 | restore $(idents restore), nbdcopy $(idents nbdcopy-file), incremental B's point ${R[check-b,ident]:-–} | $allid |"
  if [[ ${#FAILURES[@]} -gt 0 ]]; then
    echo
    echo "## Failures"
    echo
    local f; for f in "${FAILURES[@]}"; do echo "- $f"; done
  fi
  echo
  echo "Logs: \`$LOGS\` (kept until the next run)."
}

# ---------------------------------------------------------------- main
main() {
  LOAD0=$(cut -d' ' -f1-3 /proc/loadavg)
  nbd_stop 2>/dev/null || true
  rm -rf "$RUN"; mkdir -p "$LOGS" "$RUN/repos"
  trap cleanup EXIT
  trap 'exit 130' INT TERM
  install_tools
  write_python
  load_make_base
  prepare
  log "disk: qcow2 $(du -h --apparent-size "$QCOW" | cut -f1), raw allocated $(du -h "$DISK" | cut -f1)"
  full_backups
  apply_writes
  incrementals
  instant_restore
  mkdir -p "$(dirname "$OUT")"
  report | tee "$OUT"
  log "report written to $OUT"
  if [[ ${#FAILURES[@]} -gt 0 ]]; then
    log "FAILED: ${#FAILURES[@]} problem(s):"
    local f; for f in "${FAILURES[@]}"; do log "  $f"; done
    exit 1
  fi
}

main
