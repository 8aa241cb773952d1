#!/usr/bin/env bash
# Ferry over plain S3 (s3s-fs on 127.0.0.1) against Ferry on a local
# directory, and against restic on the same S3 server, on one disk image.
#
# In one run, on the image bench/run.sh builds and caches, in ROUNDS rounds
# (default 3; the figures are medians, these machines are noisy):
#   local      ferry to a directory repository: full backup, restore (+ cmp)
#   s3         ferry to s3s-fs: full backup, restore (+ cmp); throughput
#              ratios S3/local (target >= 0.70 for backup and restore)
#   objects    objects written per GiB of new data (round 1): ferry's PUT
#              requests and objects in the bucket against restic's objects in
#              the bucket for the same image (target: ferry <= 1/4 of restic)
#   faults     ferry backup to a fresh prefix with FERRY_FAULTS (5% of
#              requests fail), wall time against the fault-free S3 backup
#              (target <= 1.5x) and retries; in round 1 the point is then
#              restored without faults and compared with the image
#   threads    the S3 restore again with FERRY_RESTORE_THREADS set to a local
#              restore's count, against the remote default (twice that)
#   pack sizes the S3 backup and restore again in repositories made with
#              `init --pack-size` for each other size of PACK_SIZES (MiB):
#              time, peak RSS, objects per GiB (round 1)
#   prune      after the rounds, for every size of PACK_SIZES: a full backup,
#              1% clustered (1 MiB) plus 1% scattered (4 KiB) writes to the
#              image, an incremental, forget the full, `prune` (default
#              --max-unused): packs and bytes repacked and deleted, time, RSS
# Wall/user/sys/peak RSS come from GNU time, s3s-fs's CPU from /proc/PID/stat.
# s3s-fs is started on a free port on 127.0.0.1 and killed (by PID) at exit.
# A Markdown report goes to stdout and --out.
#
# Usage: bench/s3.sh [--quick] [--rounds N] [--out FILE]
# Env:   SIZE_MIB (2048), ROUNDS (3), FERRY_BENCH_DIR (/var/tmp/ferry-bench),
#        FERRY_BIN, CARGO_TARGET_DIR (/var/tmp/ferry-target), FERRY_TOOLS_DIR
#        (/var/tmp/ferry-tools; s3s-fs is installed there if missing),
#        FAULTS (the FERRY_FAULTS spec), PACK_SIZES ("16 64 128"; 128 is
#        what `ferry init` gives object storage, measured as the plain S3
#        steps), KEEP_REPOS=1
set -euo pipefail

BENCH_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(dirname "$BENCH_ROOT")
HELPERS="$BENCH_ROOT/helpers.py"

# ---------------------------------------------------------------- arguments
OUT="$BENCH_ROOT/results/s3-latest.md"
SIZE_MIB=${SIZE_MIB:-2048}
ROUNDS=${ROUNDS:-3}
while [[ $# -gt 0 ]]; do
  case $1 in
    --quick) SIZE_MIB=256; shift ;;
    --out) OUT=$2; shift 2 ;;
    --rounds) ROUNDS=$2; shift 2 ;;
    -h|--help) sed -n '2,27p' "$0"; exit 0 ;;
    *) echo "unknown argument: $1" >&2; exit 2 ;;
  esac
done

BENCH_DIR=${FERRY_BENCH_DIR:-/var/tmp/ferry-bench}
CACHE="$BENCH_DIR/cache"          # base images, shared with bench/run.sh
RUN="$BENCH_DIR/s3run"            # everything else, wiped at every run
LOGS="$RUN/logs"
DISK="$RUN/disk.img"
SIZE_BYTES=$((SIZE_MIB * 1024 * 1024))
BASE="$CACHE/base-${SIZE_MIB}M.img"
SEED_SELECT=20240601              # must match bench/run.sh: same image
TOOLS_DIR=${FERRY_TOOLS_DIR:-/var/tmp/ferry-tools}
S3S_VERSION=0.14.1                # newer s3s-fs needs a newer rustc
S3S_ROOT="$TOOLS_DIR/s3s-fs"
S3S_BIN="$S3S_ROOT/bin/s3s-fs"
S3_DATA="$RUN/s3-data"            # s3s-fs: one top-level directory per bucket
BUCKET=ferry-bench RESTIC_BUCKET=restic-bucket
FAULTS=${FAULTS:-"rate=0.05 seed=1 kinds=error+slowdown+reset+partial+lost"}
PACK_SIZES=${PACK_SIZES:-"16 64 128"}
DEFAULT_PACK=128                  # ferry init's pack size for object storage (pack::REMOTE_PACK_SIZE)
# A local restore's thread count (agent/src/restore.rs restore_threads).
LOCAL_THREADS=$(( $(nproc) * 2 > 4 ? $(nproc) * 2 : 4 ))
for p in $PACK_SIZES; do
  [[ $p =~ ^[0-9]+$ ]] || { echo "PACK_SIZES must be MiB figures, not $p" >&2; exit 2; }
done
OTHER_SIZES=$(for p in $PACK_SIZES; do [[ $p == "$DEFAULT_PACK" ]] || echo "$p"; done)

export RESTIC_PASSWORD=bench FERRY_PASSWORD=bench-password
export RESTIC_CACHE_DIR="$RUN/cache/restic" XDG_CACHE_HOME="$RUN/cache/xdg"
# Only the variables set below may steer the AWS clients (ferry's SDK, restic).
unset AWS_PROFILE AWS_DEFAULT_PROFILE AWS_SESSION_TOKEN AWS_DEFAULT_REGION \
      AWS_ENDPOINT AWS_ENDPOINT_URL_S3 AWS_VIRTUAL_HOSTED_STYLE_REQUEST FERRY_FAULTS FERRY_REPO
export AWS_ACCESS_KEY_ID=ferrybench AWS_SECRET_ACCESS_KEY=ferrybench-secret AWS_REGION=us-east-1
export AWS_CONFIG_FILE=/dev/null AWS_SHARED_CREDENTIALS_FILE=/dev/null AWS_EC2_METADATA_DISABLED=true
# Retries are logged at debug level with their backoff: summed per step below.
export FERRY_LOG="warn,ferry_agent::store=debug"

log() { printf '[s3bench %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() { log "error: $*"; exit 1; }

# ---------------------------------------------------------------- tools
install_tools() {
  local missing=()
  command -v restic >/dev/null || missing+=(restic)
  [[ -x /usr/bin/time ]] || missing+=(time)
  command -v mkfs.ext4 >/dev/null || missing+=(e2fsprogs)
  command -v curl >/dev/null || missing+=(curl)
  if [[ ${#missing[@]} -gt 0 ]]; then
    log "installing ${missing[*]}"
    if ! DEBIAN_FRONTEND=noninteractive apt-get install -y "${missing[@]}" >&2; then
      apt-get update >&2
      DEBIAN_FRONTEND=noninteractive apt-get install -y "${missing[@]}" >&2
    fi
  fi
  export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-/var/tmp/ferry-target}
  if [[ ! -x $S3S_BIN ]]; then
    log "installing s3s-fs $S3S_VERSION into $S3S_ROOT (about 6.5 min; log: $LOGS/s3s-fs-install.log)"
    mkdir -p "$S3S_ROOT"
    cargo install "s3s-fs@$S3S_VERSION" --locked --features binary --root "$S3S_ROOT" \
      >"$LOGS/s3s-fs-install.log" 2>&1 || die "cargo install s3s-fs failed (see $LOGS/s3s-fs-install.log)"
    [[ -x $S3S_BIN ]] || die "no binary at $S3S_BIN after cargo install"
  fi
  if [[ -n ${FERRY_BIN:-} ]]; then
    FERRY_BIN_GIVEN=1
    [[ -x $FERRY_BIN ]] || die "FERRY_BIN=$FERRY_BIN is not executable"
  else
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
}

# ---------------------------------------------------------------- base image
# bench/run.sh's make_base, taken from run.sh itself so that both benchmarks
# build (and share, through $CACHE) the very same image. run.sh cannot be
# sourced (it runs its main), so the function's text is extracted.
load_make_base() {
  local def
  def=$(sed -n '/^make_base() {$/,/^}$/p' "$BENCH_ROOT/run.sh")
  [[ $def == *'mkfs.ext4'* ]] || die "cannot find make_base() in $BENCH_ROOT/run.sh"
  eval "$def"
}

# ---------------------------------------------------------------- s3s-fs
S3S_PID="" PORT=""
cleanup() {
  if [[ -n $S3S_PID ]] && kill -0 "$S3S_PID" 2>/dev/null; then
    kill "$S3S_PID" 2>/dev/null || true
    wait "$S3S_PID" 2>/dev/null || true
  fi
  rm -f "$DISK"
  [[ ${KEEP_REPOS:-0} == 1 ]] || rm -rf "$RUN/repos" "$S3_DATA" "$RUN/restore"
}

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

start_s3s() {
  mkdir -p "$S3_DATA/$BUCKET" "$S3_DATA/$RESTIC_BUCKET"   # a bucket is a directory
  local try
  for try in 1 2 3; do
    PORT=$(free_port)
    "$S3S_BIN" --host 127.0.0.1 --port "$PORT" --access-key "$AWS_ACCESS_KEY_ID" \
      --secret-key "$AWS_SECRET_ACCESS_KEY" "$S3_DATA" >"$LOGS/s3s-fs.log" 2>&1 &
    S3S_PID=$!
    local i
    for i in $(seq 100); do
      if ! kill -0 "$S3S_PID" 2>/dev/null; then break; fi
      if curl -s -o /dev/null "http://127.0.0.1:$PORT/"; then
        export AWS_ENDPOINT_URL="http://127.0.0.1:$PORT"
        log "s3s-fs $S3S_VERSION pid $S3S_PID on 127.0.0.1:$PORT, data in $S3_DATA"
        return 0
      fi
      sleep 0.1
    done
    kill "$S3S_PID" 2>/dev/null || true; wait "$S3S_PID" 2>/dev/null || true; S3S_PID=""
    log "s3s-fs did not come up on port $PORT (try $try), see $LOGS/s3s-fs.log"
  done
  die "cannot start s3s-fs"
}

# CPU seconds (user+sys) s3s-fs has used so far.
s3s_cpu() {
  awk -v hz="$(getconf CLK_TCK)" '{ sub(/^.*\) /, ""); printf "%.2f", ($12 + $13) / hz }' \
    "/proc/$S3S_PID/stat"
}

# Objects, and their bytes, under a directory of s3s-fs's data dir (an object
# is a file; s3s-fs keeps its metadata and temporary files as dot files).
objects_in() { find "$1" -type f ! -name '.*' 2>/dev/null | wc -l; }
bytes_in() { find "$1" -type f ! -name '.*' -printf '%s\n' 2>/dev/null | awk '{ n += $1 } END { printf "%d", n }'; }

# ---------------------------------------------------------------- measuring
declare -A R   # R[STEP.ROUND,metric]: wall cpu rss s3cpu dur status ident; R[STEP,metric] = median

# measure STEP CMD...: run CMD under GNU time, stdout to $LOGS/STEP.out,
# stderr to $LOGS/STEP.err; records wall, client CPU, peak RSS, s3s-fs CPU and
# ferry's own duration_secs; returns CMD's status.
measure() {
  local step=$1; shift
  local tf="$LOGS/$step.time" rc=0 c0=0 c1=0
  log "$step"
  sync   # earlier steps' dirty pages are not this step's work
  [[ -n $S3S_PID ]] && c0=$(s3s_cpu)
  echo "+ $*" >"$LOGS/$step.err"
  /usr/bin/time -f '%e %U %S %M' -o "$tf" "$@" >"$LOGS/$step.out" 2>>"$LOGS/$step.err" </dev/null || rc=$?
  [[ -n $S3S_PID ]] && c1=$(s3s_cpu)
  local wall=0 usr=0 sys=0 rss=0 dur
  [[ -s $tf ]] && read -r wall usr sys rss < <(tail -n1 "$tf")
  R[$step,wall]=$wall
  R[$step,cpu]=$(awk -v u="$usr" -v s="$sys" 'BEGIN{printf "%.2f", u+s}')
  R[$step,rss]=$(awk -v k="$rss" 'BEGIN{printf "%.0f", k/1024}')
  R[$step,s3cpu]=$(awk -v a="$c0" -v b="$c1" 'BEGIN{printf "%.2f", b-a}')
  read -r R[$step,rwait] R[$step,lwait] < <(retry_waits "$LOGS/$step.err")
  R[$step,adj]=$(awk -v w="$wall" -v l="${R[$step,lwait]}" 'BEGIN{printf "%.2f", w-l}')
  dur=$(jget "$LOGS/$step.out" duration_secs 2>/dev/null || true)
  [[ -n $dur ]] && R[$step,dur]=$(awk -v d="$dur" 'BEGIN{printf "%.2f", d}')
  if [[ $rc -eq 0 ]]; then R[$step,status]=ok
  else R[$step,status]=failed; log "$step FAILED (exit $rc, see $LOGS/$step.err)"; fi
  return "$rc"
}

# jget FILE KEY.KEY...: a value from a JSON document ("" if absent).
jget() {
  python3 - "$@" <<'PY'
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
}

# retry_waits LOG: seconds ferry slept before retries, all and for locks/ objects
# (from its debug lines `retrying object="..." attempt=N wait=48.1ms`).
retry_waits() {
  python3 - "$1" <<'PY'
import re, sys
unit = {"s": 1.0, "ms": 1e-3, "µs": 1e-6, "us": 1e-6, "ns": 1e-9}
total = locks = 0.0
for line in open(sys.argv[1], errors="replace"):
    line = re.sub(r"\x1b\[[0-9;]*m", "", line)
    if "retrying" not in line:
        continue
    m = re.search(r"wait=([0-9.]+)(s|ms|µs|us|ns)\b", line)
    if not m:
        continue
    w = float(m.group(1)) * unit[m.group(2)]
    total += w
    if re.search(r'object="?locks/', line):
        locks += w
print(f"{total:.2f} {locks:.2f}")
PY
}

warm() { cat "$DISK" >/dev/null; }

# restore_cmp STEP REPO [PREFIX...]: restore the latest point into a new file
# (the command run after PREFIX, e.g. env VAR=VALUE), cmp with the image.
restore_cmp() {
  local step=$1 repo=$2 dir="$RUN/restore/$1"
  shift 2
  rm -rf "$dir"; mkdir -p "$dir"
  if measure "$step" "$@" "$FERRY_BIN" --json -r "$repo" restore bench@latest --to "$dir/disk.img"; then
    if cmp -s "$DISK" "$dir/disk.img"; then R[$step,ident]=yes; else R[$step,ident]=NO; fi
  fi
  rm -rf "$dir"
}

# ferry_round KIND ROUND REPO [BUCKET_DIR]: init (with the INIT_ARGS array),
# full backup, restore + cmp. With BUCKET_DIR, the objects and bytes the
# backup added there.
INIT_ARGS=()
ferry_round() {
  local kind=$1 r=$2 repo=$3 bdir=${4:-} o0=0 b0=0
  "$FERRY_BIN" -r "$repo" init "${INIT_ARGS[@]}" >"$LOGS/$kind-init.$r.log" 2>&1 </dev/null \
    || { log "$kind.$r: init FAILED (see $LOGS/$kind-init.$r.log)"; R[$kind-backup.$r,status]=failed; return 0; }
  [[ -n $bdir ]] && { o0=$(objects_in "$bdir"); b0=$(bytes_in "$bdir"); }
  warm
  measure "$kind-backup.$r" "$FERRY_BIN" --json -r "$repo" backup --source bench "$DISK" || return 0
  if [[ -n $bdir ]]; then
    R[$kind,objs]=$(( $(objects_in "$bdir") - o0 ))
    R[$kind,bytes]=$(( $(bytes_in "$bdir") - b0 ))
  fi
  restore_cmp "$kind-restore.$r" "$repo"
}

# ---------------------------------------------------------------- steps
run_all() {
  cp --sparse=always "$BASE" "$DISK"
  mkdir -p "$RUN/repos" "$RUN/restore"
  start_s3s
  local r
  for ((r = 1; r <= ROUNDS; r++)); do
    log "round $r of $ROUNDS"
    # 1. local directory repository
    ferry_round local "$r" "$RUN/repos/local-$r"
    # 2. the same on s3s-fs (objects counted in round 1)
    local bdir=""; [[ $r == 1 ]] && bdir="$S3_DATA/$BUCKET/plain-1"
    ferry_round s3 "$r" "s3://$BUCKET/plain-$r" $bdir
    # 2a. the S3 restore again with the thread count of a local restore
    #     (FERRY_RESTORE_THREADS): what the remote default buys
    if [[ ${R[s3-backup.$r,status]:-} == ok ]]; then
      restore_cmp "s3t-restore.$r" "s3://$BUCKET/plain-$r" env FERRY_RESTORE_THREADS="$LOCAL_THREADS"
    fi
    if [[ $r == 1 && ${R[s3-backup.1,status]:-} == ok ]]; then
      "$FERRY_BIN" --json -r "s3://$BUCKET/plain-1" stats >"$LOGS/s3-stats.json" 2>"$LOGS/s3-stats.err" </dev/null || true
    fi
    # 2b. the same with each other pack size
    local p
    for p in $OTHER_SIZES; do
      bdir=""; [[ $r == 1 ]] && bdir="$S3_DATA/$BUCKET/p$p-1"
      INIT_ARGS=(--pack-size "${p}MiB")
      ferry_round "s3p$p" "$r" "s3://$BUCKET/p$p-$r" $bdir
      INIT_ARGS=()
      [[ ${KEEP_REPOS:-0} == 1 ]] || rm -rf "$S3_DATA/$BUCKET/p$p-$r"
    done
    # 3. restic on the same server, same image (round 1 only: it is the slow one)
    [[ $r == 1 ]] && run_restic
    # 4. injected faults, fresh prefix (init without faults); the faulted
    #    backup's point is restored without faults and compared in round 1
    local faulty="s3://$BUCKET/faults-$r"
    if "$FERRY_BIN" -r "$faulty" init >"$LOGS/faults-init.$r.log" 2>&1 </dev/null; then
      warm
      if measure "faults-backup.$r" env FERRY_FAULTS="$FAULTS" "$FERRY_BIN" --json -r "$faulty" backup --source bench "$DISK" \
         && [[ $r == 1 ]]; then
        restore_cmp "faults-restore.1" "$faulty"
      fi
    else
      log "faults.$r: init FAILED (see $LOGS/faults-init.$r.log)"; R[faults-backup.$r,status]=failed
    fi
    # Keep the disk's contents (and its writeback) the same from round to round.
    if [[ ${KEEP_REPOS:-0} != 1 ]]; then
      rm -rf "$RUN/repos/local-$r" "$S3_DATA/$BUCKET/plain-$r" "$S3_DATA/$BUCKET/faults-$r"
    fi
  done
  for s in local-backup local-restore s3-backup s3-restore s3t-restore faults-backup faults-restore restic-backup; do
    summarize "$s"
  done
  for p in $OTHER_SIZES; do summarize "s3p$p-backup"; summarize "s3p$p-restore"; done
  prune_by_pack_size
}

# prune_by_pack_size: what prune rewrites after churn, for every pack size.
# Changes $DISK: it runs after every step that compares a restore with it.
prune_by_pack_size() {
  local p repo
  for p in $PACK_SIZES; do
    repo="s3://$BUCKET/prune-$p"
    "$FERRY_BIN" -r "$repo" init --pack-size "${p}MiB" >"$LOGS/prune-init.$p.log" 2>&1 </dev/null &&
      "$FERRY_BIN" --json -r "$repo" backup --source bench "$DISK" >"$LOGS/prune-full.$p.out" 2>"$LOGS/prune-full.$p.err" </dev/null ||
      { log "prune.$p: init or full backup FAILED (see $LOGS/prune-*.$p.*)"; R[prune-$p,status]=failed; }
  done
  python3 "$HELPERS" writes "$DISK" clustered 11 >/dev/null
  python3 "$HELPERS" writes "$DISK" scattered 12 >/dev/null
  for p in $PACK_SIZES; do
    [[ ${R[prune-$p,status]:-} == failed ]] && continue
    repo="s3://$BUCKET/prune-$p"
    local full
    full=$(jget "$LOGS/prune-full.$p.out" point) || { log "prune.$p: no point in $LOGS/prune-full.$p.out"; R[prune-$p,status]=failed; continue; }
    if "$FERRY_BIN" --json -r "$repo" backup --source bench "$DISK" >"$LOGS/prune-incr.$p.out" 2>"$LOGS/prune-incr.$p.err" </dev/null &&
       "$FERRY_BIN" -r "$repo" forget "$full" >"$LOGS/prune-forget.$p.log" 2>&1 </dev/null &&
       measure "prune-$p" "$FERRY_BIN" --json -r "$repo" prune; then
      R[prune-$p,status]=ok
    else
      R[prune-$p,status]=failed
    fi
    [[ ${KEEP_REPOS:-0} == 1 ]] || rm -rf "$S3_DATA/$BUCKET/prune-$p"
  done
}

run_restic() {
  local rrepo="s3:http://127.0.0.1:$PORT/$RESTIC_BUCKET"
  if restic -r "$rrepo" init >"$LOGS/restic-init.log" 2>&1 </dev/null; then
    local o0 b0
    o0=$(objects_in "$S3_DATA/$RESTIC_BUCKET"); b0=$(bytes_in "$S3_DATA/$RESTIC_BUCKET")
    warm
    if measure restic-backup.1 restic -r "$rrepo" backup --json --host bench "$DISK"; then
      R[restic,objs]=$(( $(objects_in "$S3_DATA/$RESTIC_BUCKET") - o0 ))
      R[restic,bytes]=$(( $(bytes_in "$S3_DATA/$RESTIC_BUCKET") - b0 ))
    fi
  else
    log "restic init FAILED (see $LOGS/restic-init.log)"; R[restic-backup.1,status]=failed
  fi
}

# summarize STEP: R[STEP,metric] = median over the rounds that succeeded;
# status ok if every round that ran succeeded.
summarize() {
  local step=$1 m r vals n=0 bad=0
  for ((r = 1; r <= ROUNDS; r++)); do
    case ${R[$step.$r,status]:-} in ok) n=$((n + 1)) ;; failed) bad=1 ;; esac
  done
  if [[ $n -eq 0 || $bad -eq 1 ]]; then R[$step,status]=failed; [[ $n -eq 0 && $bad -eq 0 ]] && R[$step,status]=missing; return 0; fi
  R[$step,status]=ok R[$step,n]=$n
  for m in wall dur cpu s3cpu rss rwait lwait adj; do
    vals=""
    for ((r = 1; r <= ROUNDS; r++)); do
      [[ ${R[$step.$r,status]:-} == ok && -n ${R[$step.$r,$m]:-} ]] && vals+="${R[$step.$r,$m]} "
    done
    [[ -n $vals ]] && R[$step,$m]=$(printf '%s\n' $vals | sort -g | awk '{v[NR]=$1} END{
      if (NR % 2) printf "%.2f", v[(NR+1)/2]; else printf "%.2f", (v[NR/2]+v[NR/2+1])/2 }')
  done
  [[ -n ${R[$step,rss]:-} ]] && R[$step,rss]=$(awk -v k="${R[$step,rss]}" 'BEGIN{printf "%.0f", k}')
  R[$step,ident]=yes
  for ((r = 1; r <= ROUNDS; r++)); do
    [[ -z ${R[$step.$r,ident]:-} || ${R[$step.$r,ident]} == yes ]] || R[$step,ident]=NO
  done
}

# ---------------------------------------------------------------- report
cell() { # cell STEP METRIC
  local st=${R[$1,status]:-missing}
  if [[ $st == ok ]]; then echo "${R[$1,$2]:-?}"; else echo "$st"; fi
}
ok() { local s; for s in "$@"; do [[ ${R[$s,status]:-} == ok ]] || return 1; done; }
calc() { awk "BEGIN{ $1 }"; }   # calc 'printf ..., expr'
div() { calc "printf \"%.2f\", $1/$2"; }
req() { jget "$LOGS/$1.out" "requests.$2"; }
verdict() { # verdict AWK_CONDITION: yes / no
  if calc "exit !($1)"; then echo yes; else echo "**no**"; fi
}
walls() { # walls STEP: each round's wall time
  local r out=""
  for ((r = 1; r <= ROUNDS; r++)); do
    case ${R[$1.$r,status]:-} in ok) out+="${R[$1.$r,wall]}, " ;; failed) out+="failed, " ;; esac
  done
  echo "${out%, }"
}
per_round() { # per_round STEP STEP: each round's wall ratio A/B
  local r out=""
  for ((r = 1; r <= ROUNDS; r++)); do
    ok "$1.$r" "$2.$r" && out+="$(div "${R[$1.$r,wall]}" "${R[$2.$r,wall]}"), "
  done
  echo "${out%, }"
}

report() {
  local gib=1073741824 apparent alloc
  apparent=$(stat -c %s "$BASE"); alloc=$(du -B1 "$BASE" | cut -f1)
  echo "# Ferry over S3 (s3s-fs) benchmark"
  echo
  echo "- Date: $(date -Is)"
  echo "- Machine: $(nproc) cores, $(awk -F': ' '/^model name/{print $2; exit}' /proc/cpuinfo)," \
       "$(awk '/MemTotal/{printf "%.0f GiB RAM", $2/1048576}' /proc/meminfo), kernel $(uname -r);" \
       "load average at the start $LOAD0, at the end $(cut -d' ' -f1-3 /proc/loadavg)"
  echo "- Work dir: $RUN ($(df -T "$RUN" | awk 'NR==2{print $2}')); the local repository and s3s-fs's data dir are on it"
  echo "- Image: the cached bench/run.sh image ($BASE), ext4, apparent $(calc "printf \"%.1f\", $apparent/1048576") MiB," \
       "allocated $(calc "printf \"%.1f\", $alloc/1048576") MiB"
  echo "- ferry: $("$FERRY_BIN" --version 2>/dev/null || echo '?'), $FERRY_SRC$([[ -n ${FERRY_BIN_GIVEN:-} ]] && echo ' (FERRY_BIN); checkout' || echo ', built from') $TREE"
  echo "- S3 server: s3s-fs $S3S_VERSION on 127.0.0.1 (plain HTTP, SigV4); ferry repositories s3://$BUCKET/plain-N"
  echo "- restic: $(restic version | head -n1), repository v2 (zstd auto), s3:http://127.0.0.1:PORT/$RESTIC_BUCKET"
  echo "- Faults: \`FERRY_FAULTS=\"$FAULTS\"\` on the backup only, into a fresh prefix s3://$BUCKET/faults-N"
  echo "- $ROUNDS rounds, each: local backup, local restore, S3 backup, S3 restore, S3 backup with faults;" \
       "restic and the restore of a faulted backup in round 1 only. Figures are medians over the rounds."
  echo
  echo "Times in seconds. Wall and client CPU (user+sys) from GNU time. \"ferry's own\" is the"
  echo "\`duration_secs\` of ferry's JSON summary: without process start and opening the repository (key"
  echo "derivation); a backup's includes removing its lock, a restore's does not. Retry backoff: the sleeps"
  echo "before retried requests (ferry's debug log), in brackets those spent on removing the repository lock."
  echo "s3s-fs CPU is the server's user+sys during the step (/proc/PID/stat). Restores go to a new file"
  echo "(ferry syncs it before it exits) and are compared with \`cmp\`."
  echo
  echo "## Raw figures"
  echo
  echo "| Step | Wall s, each round | Wall s, median | ferry's own s | Retry backoff s (lock removal) | Client CPU s | s3s-fs CPU s | Peak RSS MiB | Identical |"
  echo "|---|---|---:|---:|---:|---:|---:|---:|:---:|"
  local s label
  for s in local-backup local-restore s3-backup s3-restore s3t-restore faults-backup faults-restore restic-backup; do
    case $s in
      s3t-restore) label="ferry, S3: restore with $LOCAL_THREADS threads (a local restore's count)" ;;
      local-*) label="ferry, local dir: ${s#local-}" ;;
      s3-*) label="ferry, S3: ${s#s3-}" ;;
      faults-backup) label="ferry, S3 with 5% faults: backup" ;;
      faults-restore) label="ferry, S3: restore of a faulted backup (no faults)" ;;
      restic-*) label="restic, S3: backup" ;;
    esac
    local s3c="–" dur="–" id="–" rw="–"
    [[ $s == local-* ]] || s3c=$(cell "$s" s3cpu)
    [[ $s == restic-* ]] || { dur=$(cell "$s" dur); rw="$(cell "$s" rwait) ($(cell "$s" lwait))"; }
    [[ $s == *restore ]] && ok "$s" && id=${R[$s,ident]}
    echo "| $label | $(walls "$s") | $(cell "$s" wall) | $dur | $rw | $(cell "$s" cpu) | $s3c | $(cell "$s" rss) | $id |"
  done

  # ---- throughput: local time / S3 time, medians
  # bkd etc.: the same without the sleeps before retried lock removals (see the report)
  local bk="n/a" rs="n/a" bkd="n/a" rsd="n/a" fr="n/a" frd="n/a"
  ok local-backup s3-backup && { bk=$(div "${R[local-backup,wall]}" "${R[s3-backup,wall]}"); bkd=$(div "${R[local-backup,adj]}" "${R[s3-backup,adj]}"); }
  ok local-restore s3-restore && { rs=$(div "${R[local-restore,wall]}" "${R[s3-restore,wall]}"); rsd=$(div "${R[local-restore,adj]}" "${R[s3-restore,adj]}"); }
  ok s3-backup faults-backup && { fr=$(div "${R[faults-backup,wall]}" "${R[s3-backup,wall]}"); frd=$(div "${R[faults-backup,adj]}" "${R[s3-backup,adj]}"); }

  # ---- objects per GiB of new data (round 1)
  local new puts f_puts_g f_objs_g r_new r_g="n/a" objratio="n/a" objratio2="n/a" kinds=""
  if ok s3-backup.1; then
    new=$(jget "$LOGS/s3-backup.1.out" new_bytes)
    puts=$(req s3-backup.1 puts)
    f_puts_g=$(calc "printf \"%.1f\", $puts/($new/$gib)")
    f_objs_g=$(calc "printf \"%.1f\", ${R[s3,objs]}/($new/$gib)")
    [[ -s $LOGS/s3-stats.json ]] && kinds=$(python3 -c '
import json, sys
s = json.load(open(sys.argv[1]))
print(", ".join(f"{k} {c}" for k, (c, _) in s["objects"].items()))' "$LOGS/s3-stats.json")
  fi
  if ok restic-backup.1; then
    r_new=$(jget "$LOGS/restic-backup.1.out" data_added)
    r_g=$(calc "printf \"%.1f\", ${R[restic,objs]}/($r_new/$gib)")
  fi
  if ok s3-backup.1 restic-backup.1; then
    objratio=$(div "$f_puts_g" "$r_g"); objratio2=$(div "$f_objs_g" "$r_g")
  fi

  # ---- retries
  local retries="" retries0="" r
  for ((r = 1; r <= ROUNDS; r++)); do
    ok "faults-backup.$r" && retries+="$(req "faults-backup.$r" retries), "
    ok "s3-backup.$r" && retries0+="$(req "s3-backup.$r" retries), "
  done
  retries=${retries%, } retries0=${retries0%, }

  if ok local-backup s3-backup local-restore s3-restore; then
    echo
    echo "CPU: the S3 steps need the client's CPU plus the server's, on the same cores. If both steps were"
    echo "bound by CPU alone, S3 / local throughput would be local client CPU / (S3 client CPU + s3s-fs CPU):" \
         "$(div "${R[local-backup,cpu]}" "$(calc "print ${R[s3-backup,cpu]}+${R[s3-backup,s3cpu]}")") for the backup," \
         "$(div "${R[local-restore,cpu]}" "$(calc "print ${R[s3-restore,cpu]}+${R[s3-restore,s3cpu]}")") for the restore" \
         "($(nproc) cores; other load on the machine comes on top)."
  fi
  if grep -qs "ListObjectVersions is not implemented" "$LOGS"/s3-*.err; then
    echo
    echo "Lock removal: s3 repositories delete through ListObjectVersions (every version of the object)," \
         "which s3s-fs answers with 501 NotImplemented; ferry retries that as transient" \
         "($(grep -h -c "cannot remove the repository lock" "$LOGS"/s3-backup.1.err) lock(s) per command" \
         "given up after $(grep -h "retrying" "$LOGS"/s3-backup.1.err | grep -c 'locks/') retries)," \
         "sleeps the backoff above, then leaves the lock behind. Real S3 implements ListObjectVersions."
  fi
  echo
  echo "## Objects written by the full backup (round 1)"
  echo
  echo "| Tool | New data GiB | Stored MiB | PUT requests | Objects added to the bucket | Per GiB of new data |"
  echo "|---|---:|---:|---:|---:|---:|"
  if ok s3-backup.1; then
    echo "| ferry | $(calc "printf \"%.3f\", $new/$gib") | $(calc "printf \"%.1f\", ${R[s3,bytes]}/1048576") |" \
         "$puts | ${R[s3,objs]} | $f_puts_g PUTs, $f_objs_g objects |"
  else echo "| ferry | failed | | | | |"; fi
  if ok restic-backup.1; then
    echo "| restic | $(calc "printf \"%.3f\", $r_new/$gib") | $(calc "printf \"%.1f\", ${R[restic,bytes]}/1048576") |" \
         "not counted | ${R[restic,objs]} | $r_g objects |"
  else echo "| restic | failed | | | | |"; fi
  echo
  echo "New data: ferry's \`new_bytes\`, restic's \`data_added\`, both unique data before compression."
  echo "Objects: files the backup added under the repository's directory in s3s-fs's data dir (not what \`init\` wrote)."
  [[ -n $kinds ]] && echo "ferry \`stats\` after the backup, objects by kind: $kinds."
  if ok s3-backup.1; then
    echo "ferry requests: $(req s3-backup.1 puts) PUT, $(req s3-backup.1 gets) GET, $(req s3-backup.1 lists) LIST," \
         "$(req s3-backup.1 deletes) DELETE, $(req s3-backup.1 retries) retried;" \
         "$(calc "printf \"%.1f\", $(req s3-backup.1 bytes_up)/1048576") MiB up."
  fi

  pack_size_report
  echo
  echo "## Targets"
  echo
  echo "| Target | Measured (medians) | Met |"
  echo "|---|---|:---:|"
  local v
  v="n/a"; [[ $bk != n/a ]] && v=$(verdict "$bk >= 0.70")
  echo "| backup throughput S3 / local ≥ 0.70 | $bk (${R[local-backup,wall]:-?} s local, ${R[s3-backup,wall]:-?} s S3; rounds: $(per_round local-backup s3-backup)); without the lock-removal backoff $bkd | $v |"
  v="n/a"; [[ $rs != n/a ]] && v=$(verdict "$rs >= 0.70")
  echo "| restore throughput S3 / local ≥ 0.70 | $rs (${R[local-restore,wall]:-?} s local, ${R[s3-restore,wall]:-?} s S3; rounds: $(per_round local-restore s3-restore)); without the lock-removal backoff $rsd | $v |"
  # The target is objects at rest; a pack sent in parts costs more PUT
  # requests than one object (opening, parts, completing): reported too.
  v="n/a"; [[ $objratio2 != n/a ]] && v=$(verdict "$objratio2 <= 0.25")
  echo "| objects per GiB of new data ≤ ¼ of restic's | ferry/restic $objratio2 by objects ($objratio by PUT requests): ${f_puts_g:-?} PUTs/GiB against $r_g objects/GiB | $v |"
  v="n/a"; [[ $fr != n/a ]] && v=$(verdict "$fr <= 1.5")
  echo "| backup with 5% faults ≤ 1.5× the fault-free time | ${fr}× (${R[faults-backup,wall]:-?} s against ${R[s3-backup,wall]:-?} s; rounds: $(per_round faults-backup s3-backup)); without the lock-removal backoff ${frd}×; retries per round $retries (fault-free: $retries0) | $v |"
  local idv=yes s2
  local others=""
  for p in $OTHER_SIZES; do others+=" s3p$p-restore"; done
  for s2 in local-restore s3-restore s3t-restore faults-restore $others; do ok "$s2" && [[ ${R[$s2,ident]} == yes ]] || idv="**no**"; done
  echo "| every restore byte-identical | local ${R[local-restore,ident]:-–}, S3 ${R[s3-restore,ident]:-–} (and with $LOCAL_THREADS threads ${R[s3t-restore,ident]:-–}), faulted backup ${R[faults-restore,ident]:-–}$(for p in $OTHER_SIZES; do printf ', %s MiB packs %s' "$p" "${R[s3p$p-restore,ident]:-–}"; done) | $idv |"
  echo
  echo "Logs: \`$LOGS\` (kept until the next run)."
}

# pack_size_report: the S3 steps and prune for every size of PACK_SIZES.
pack_size_report() {
  local gib=1073741824 p kind objs puts new rg="" pr
  ok restic-backup.1 && rg=$(calc "printf \"%.4f\", ${R[restic,objs]}/($(jget "$LOGS/restic-backup.1.out" data_added)/$gib)")
  echo
  echo "## Pack size (\`ferry init --pack-size\`)"
  echo
  echo "S3 steps as above, one repository per size and round; objects in round 1. Prune: after the rounds, a"
  echo "full backup per size, then 1% clustered (1 MiB) and 1% scattered (4 KiB) writes to the image, an"
  echo "incremental, \`forget\` of the full and \`prune\` (default --max-unused 10%)."
  echo
  echo "| Pack MiB | S3 backup s | backup CPU s: client / s3s-fs | S3 restore s | backup / restore peak RSS MiB | PUTs (objects) per GiB | / restic's objects | prune: packs repacked, MiB repacked, MiB deleted | prune s, peak RSS MiB | prune GETs, PUTs |"
  echo "|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|"
  for p in $PACK_SIZES; do
    if [[ $p == "$DEFAULT_PACK" ]]; then kind=s3; else kind="s3p$p"; fi
    local row="| $p | $(cell "$kind-backup" wall) | $(cell "$kind-backup" cpu) / $(cell "$kind-backup" s3cpu) | $(cell "$kind-restore" wall) | $(cell "$kind-backup" rss) / $(cell "$kind-restore" rss) |"
    if ok "$kind-backup.1"; then
      new=$(jget "$LOGS/$kind-backup.1.out" new_bytes); puts=$(req "$kind-backup.1" puts); objs=${R[$kind,objs]}
      row+=" $(calc "printf \"%.1f (%.1f)\", $puts/($new/$gib), $objs/($new/$gib)") |"
      if [[ -n $rg ]]; then row+=" $(calc "printf \"%.2f\", ($objs/($new/$gib))/$rg") |"; else row+=" n/a |"; fi
    else
      row+=" failed | n/a |"
    fi
    pr="$LOGS/prune-$p.out"
    if ok "prune-$p"; then
      row+=" $(jget "$pr" repacked_packs), $(calc "printf \"%.1f\", $(jget "$pr" repacked_bytes)/1048576"), $(calc "printf \"%.1f\", $(jget "$pr" deleted_bytes)/1048576") |"
      row+=" ${R[prune-$p,wall]}, ${R[prune-$p,rss]} | $(jget "$pr" requests.gets), $(jget "$pr" requests.puts) |"
    else
      row+=" ${R[prune-$p,status]:-missing} | | |"
    fi
    echo "$row"
  done
}

# ---------------------------------------------------------------- main
main() {
  LOAD0=$(cut -d' ' -f1-3 /proc/loadavg)
  rm -rf "$RUN"; mkdir -p "$LOGS"
  trap cleanup EXIT
  trap 'exit 130' INT TERM
  install_tools
  load_make_base
  make_base
  log "base image: apparent $(du -h --apparent-size "$BASE" | cut -f1), allocated $(du -h "$BASE" | cut -f1)"
  run_all
  mkdir -p "$(dirname "$OUT")"
  report | tee "$OUT"
  log "report written to $OUT"
}

main
