#!/usr/bin/env bash
# Ferry's EBS direct restore (`ferry restore POINT --to ebs://`) against a
# local restore of the same point, on moto (a Python stand-in for AWS) on
# 127.0.0.1, with the image bench/run.sh builds and caches.
#
# The image is backed up once into a directory repository; then, in ROUNDS
# interleaved rounds (default 3; the figures are medians):
#   local      ferry restore POINT --to FILE, then cmp with the image
#   ebs        ferry restore POINT --to ebs:// with a fresh FERRY_HOME (so the
#              restore journal never turns it into a resume): StartSnapshot,
#              PutSnapshotBlock of every 512 KiB block that is not all zeros,
#              CompleteSnapshot; checks blocks_put + blocks_zero =
#              ceil(size / 512 KiB), and counts the PUTs in moto's log too
# and in round 1 only:
#   agentless  ferry backup --source bench-ebs ebs://SNAP?name=disk of the
#              snapshot just written (ListSnapshotBlocks, GetSnapshotBlock)
#              into a second repository
#   readback   ferry restore of that point to a file: its first SIZE bytes
#              must equal the image, the rest (EBS sizes are whole GiB) zeros
# Wall/user/sys/peak RSS come from GNU time, moto's CPU from /proc/PID/stat.
# moto is started on a free port on 127.0.0.1, warmed up with one small
# snapshot before anything is timed, reset after every round (it keeps every
# block in memory) and killed (by PID) at exit.
# A Markdown report goes to stdout and --out.
#
# Usage: bench/ebs.sh [--quick] [--rounds N] [--out FILE]
# Env:   SIZE_MIB (2048), ROUNDS (3), FERRY_BENCH_DIR (/var/tmp/ferry-bench),
#        FERRY_BIN, CARGO_TARGET_DIR (/var/tmp/ferry-target), FERRY_TOOLS_DIR
#        (/var/tmp/ferry-tools; moto must be installed in its moto/ venv),
#        KEEP_REPOS=1
set -euo pipefail

BENCH_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(dirname "$BENCH_ROOT")
# shellcheck disable=SC2034  # used by make_base, taken from run.sh
HELPERS="$BENCH_ROOT/helpers.py"

# ---------------------------------------------------------------- arguments
OUT="$BENCH_ROOT/results/ebs-latest.md"
SIZE_MIB=${SIZE_MIB:-2048}
ROUNDS=${ROUNDS:-3}
while [[ $# -gt 0 ]]; do
  case $1 in
    --quick) SIZE_MIB=256; shift ;;
    --out) OUT=$2; shift 2 ;;
    --rounds) ROUNDS=$2; shift 2 ;;
    -h|--help) sed -n '2,30p' "$0"; exit 0 ;;
    *) echo "unknown argument: $1" >&2; exit 2 ;;
  esac
done

BENCH_DIR=${FERRY_BENCH_DIR:-/var/tmp/ferry-bench}
CACHE="$BENCH_DIR/cache"          # base images, shared with bench/run.sh
RUN="$BENCH_DIR/ebsrun"           # everything else, wiped at every run
LOGS="$RUN/logs"
DISK="$RUN/disk.img"
SIZE_BYTES=$((SIZE_MIB * 1024 * 1024))
BASE="$CACHE/base-${SIZE_MIB}M.img"
# shellcheck disable=SC2034  # used by make_base
SEED_SELECT=20240601              # must match bench/run.sh: same image
TOOLS_DIR=${FERRY_TOOLS_DIR:-/var/tmp/ferry-tools}
MOTO_BIN="$TOOLS_DIR/moto/bin/moto_server"
BLOCK=$((512 * 1024))             # EBS direct API block
GIB=1073741824

export FERRY_PASSWORD=bench-password
# Only the variables set below may steer ferry's AWS SDK.
unset AWS_PROFILE AWS_DEFAULT_PROFILE AWS_SESSION_TOKEN AWS_DEFAULT_REGION \
      AWS_ENDPOINT AWS_ENDPOINT_URL_EBS AWS_ENDPOINT_URL_EC2 FERRY_FAULTS FERRY_REPO FERRY_HOME
export AWS_ACCESS_KEY_ID=ferrybench AWS_SECRET_ACCESS_KEY=ferrybench-secret AWS_REGION=us-east-1
export AWS_CONFIG_FILE=/dev/null AWS_SHARED_CREDENTIALS_FILE=/dev/null AWS_EC2_METADATA_DISABLED=true
export AWS_ALLOW_HTTP=true
export FERRY_LOG=${FERRY_LOG:-warn}

log() { printf '[ebsbench %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() { log "error: $*"; exit 1; }

# ---------------------------------------------------------------- tools
install_tools() {
  local missing=()
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
  [[ -x $MOTO_BIN ]] || die "no moto at $MOTO_BIN: python3 -m venv $TOOLS_DIR/moto && $TOOLS_DIR/moto/bin/pip install 'moto[server]' boto3 (see TESTING.md)"
  MOTO_VERSION=$("$TOOLS_DIR/moto/bin/python" -c 'import moto; print(moto.__version__)' 2>/dev/null || echo '?')
  export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-/var/tmp/ferry-target}
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

# ---------------------------------------------------------------- moto
MOTO_PID="" PORT="" ENDPOINT="" EBS_URL=""
cleanup() {
  if [[ -n $MOTO_PID ]] && kill -0 "$MOTO_PID" 2>/dev/null; then
    kill "$MOTO_PID" 2>/dev/null || true
    wait "$MOTO_PID" 2>/dev/null || true
  fi
  rm -f "$DISK"
  [[ ${KEEP_REPOS:-0} == 1 ]] || rm -rf "$RUN/repos" "$RUN/restore" "$RUN/homes"
}

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

start_moto() {
  local try
  for try in 1 2 3; do
    PORT=$(free_port)
    "$MOTO_BIN" -H 127.0.0.1 -p "$PORT" >"$LOGS/moto.log" 2>&1 &
    MOTO_PID=$!
    for _ in $(seq 150); do
      if ! kill -0 "$MOTO_PID" 2>/dev/null; then break; fi
      if [[ $(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$PORT/moto-api/") == 200 ]]; then
        ENDPOINT="http://127.0.0.1:$PORT"
        export AWS_ENDPOINT_URL=$ENDPOINT
        EBS_URL="ebs://?region=$AWS_REGION&endpoint=$ENDPOINT"
        log "moto $MOTO_VERSION pid $MOTO_PID on 127.0.0.1:$PORT"
        warm_moto
        return 0
      fi
      sleep 0.1
    done
    kill "$MOTO_PID" 2>/dev/null || true; wait "$MOTO_PID" 2>/dev/null || true; MOTO_PID=""
    log "moto did not come up on port $PORT (try $try), see $LOGS/moto.log"
  done
  die "cannot start moto"
}

# Forget every snapshot (moto keeps their blocks in memory), then warm up.
reset_moto() {
  curl -s -o /dev/null -X POST "$ENDPOINT/moto-api/reset" || log "moto reset failed"
  warm_moto
}

# moto imports and builds its EC2 and EBS backends on their first request
# (about 2 s in a new process, 0.1 s after a reset): make them exist before a
# step is timed, with one small snapshot written, completed and read back
# through boto3 in moto's own venv.
warm_moto() {
  "$TOOLS_DIR/moto/bin/python" - "$ENDPOINT" "$AWS_REGION" >>"$LOGS/moto-warm.log" 2>&1 <<'PY' \
    || log "moto warm-up failed (see $LOGS/moto-warm.log)"
import base64, hashlib, sys, boto3
ep, region = sys.argv[1:3]
kw = dict(endpoint_url=ep, region_name=region, aws_access_key_id="warm", aws_secret_access_key="warm")
ec2, ebs = boto3.client("ec2", **kw), boto3.client("ebs", **kw)
snap = ebs.start_snapshot(VolumeSize=1)["SnapshotId"]
data = bytes(range(256)) * 2048
ebs.put_snapshot_block(SnapshotId=snap, BlockIndex=0, BlockData=data, DataLength=len(data),
                       Checksum=base64.b64encode(hashlib.sha256(data).digest()).decode(),
                       ChecksumAlgorithm="SHA256")
ebs.complete_snapshot(SnapshotId=snap, ChangedBlocksCount=1)
ec2.describe_snapshots(SnapshotIds=[snap])
for b in ebs.list_snapshot_blocks(SnapshotId=snap)["Blocks"]:
    ebs.get_snapshot_block(SnapshotId=snap, BlockIndex=b["BlockIndex"], BlockToken=b["BlockToken"])["BlockData"].read()
print("warm", snap)
PY
}

# CPU seconds (user+sys, all threads) moto has used so far.
moto_cpu() {
  awk -v hz="$(getconf CLK_TCK)" '{ sub(/^.*\) /, ""); printf "%.2f", ($12 + $13) / hz }' \
    "/proc/$MOTO_PID/stat"
}

# moto's resident memory, now and at its peak, in MiB.
moto_mem() {
  awk '/^VmRSS/{r=$2} /^VmHWM/{h=$2} END{printf "%.0f %.0f\n", r/1024, h/1024}' "/proc/$MOTO_PID/status"
}

# moto's access log lines [FROM, TO) matching an ERE, counted.
moto_count() {
  sed -n "$(($1 + 1)),$2p" "$LOGS/moto.log" | grep -cE "$3" || true
}

# ---------------------------------------------------------------- measuring
declare -A R   # R[step.round,metric], R[step,metric] (medians); see measure

# measure STEP CMD...: runs CMD under GNU time, stdout to $LOGS/STEP.out,
# stderr to $LOGS/STEP.err; records wall, client CPU, peak RSS, moto's CPU,
# ferry's own duration_secs and the EBS requests moto logged; returns CMD's
# status.
measure() {
  local step=$1; shift
  local tf="$LOGS/$step.time" rc=0 c0 c1 l0 l1
  log "$step"
  sync   # earlier steps' dirty pages are not this step's work
  c0=$(moto_cpu); l0=$(wc -l <"$LOGS/moto.log")
  echo "+ $*" >"$LOGS/$step.err"
  /usr/bin/time -f '%e %U %S %M' -o "$tf" "$@" >"$LOGS/$step.out" 2>>"$LOGS/$step.err" </dev/null || rc=$?
  c1=$(moto_cpu); l1=$(wc -l <"$LOGS/moto.log")
  local wall=0 usr=0 sys=0 rss=0 dur
  [[ -s $tf ]] && read -r wall usr sys rss < <(tail -n1 "$tf")
  R[$step,wall]=$wall
  R[$step,cpu]=$(awk -v u="$usr" -v s="$sys" 'BEGIN{printf "%.2f", u+s}')
  R[$step,rss]=$(awk -v k="$rss" 'BEGIN{printf "%.0f", k/1024}')
  R[$step,mcpu]=$(awk -v a="$c0" -v b="$c1" 'BEGIN{printf "%.2f", b-a}')
  R[$step,mputs]=$(moto_count "$l0" "$l1" 'PUT /snapshots/[^ ]+/blocks/')
  R[$step,mgets]=$(moto_count "$l0" "$l1" 'GET /snapshots/[^ ]+/blocks/')
  # Any answer but 2xx (throttling, errors) in moto's access log.
  R[$step,merr]=$(moto_count "$l0" "$l1" '" [^2][0-9][0-9] ')
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

warm() { cat "$@" >/dev/null; }
warm_repo() { find "$1" -type f -exec cat {} + >/dev/null; }

# The image's bytes in FILE: the first SIZE_BYTES equal the image, anything
# after them (an EBS volume is whole GiB) is zeros. Prints yes or NO.
same_as_image() {
  local f=$1 size
  size=$(stat -c %s "$f")
  if [[ $size -lt $SIZE_BYTES ]] || ! cmp -s -n "$SIZE_BYTES" "$DISK" "$f"; then echo NO; return; fi
  if [[ $size -gt $SIZE_BYTES ]] && ! cmp -s -n $((size - SIZE_BYTES)) -i "$SIZE_BYTES:0" "$f" /dev/zero; then
    echo NO; return
  fi
  echo yes
}

# ---------------------------------------------------------------- steps
local_restore() { # local_restore ROUND
  local step=local-restore.$1 dir="$RUN/restore/local"
  rm -rf "$dir"; mkdir -p "$dir"
  warm_repo "$RUN/repos/local"
  if measure "$step" "$FERRY_BIN" --json -r "$RUN/repos/local" restore "$POINT" --to "$dir/disk.img"; then
    if cmp -s "$DISK" "$dir/disk.img"; then R[$step,ident]=yes; else R[$step,ident]=NO; fi
  fi
  rm -rf "$dir"
}

ebs_restore() { # ebs_restore ROUND
  local r=$1 step=ebs-restore.$1 home="$RUN/homes/ebs-$1"
  rm -rf "$home"; mkdir -p "$home"
  warm_repo "$RUN/repos/local"
  measure "$step" env FERRY_HOME="$home" "$FERRY_BIN" --json -r "$RUN/repos/local" restore "$POINT" --to "$EBS_URL" \
    || return 0
  local o="$LOGS/$step.out" k
  for k in snapshot_id size blocks_put blocks_zero blocks_resumed requests already_complete; do
    R[$step,$k]=$(jget "$o" "$k")
  done
  local want=$(( (${R[$step,size]} + BLOCK - 1) / BLOCK ))
  R[$step,blocks]=$want
  if [[ $((${R[$step,blocks_put]} + ${R[$step,blocks_zero]})) -eq $want && ${R[$step,blocks_resumed]} == 0 \
        && ${R[$step,already_complete]} == False ]]; then
    R[$step,check]=yes
  else
    R[$step,check]=NO
    log "$step: blocks_put ${R[$step,blocks_put]} + blocks_zero ${R[$step,blocks_zero]} != $want, or resumed/already complete"
  fi
  rm -rf "$home"
}

# Round 1: read the snapshot back through the agentless source, restore that
# point to a file, compare with the image.
agentless() {
  local snap=${R[ebs-restore.1,snapshot_id]:-} repo="$RUN/repos/agentless" home="$RUN/homes/agentless"
  [[ -n $snap ]] || { log "no snapshot from ebs-restore.1: agentless backup skipped"; return 0; }
  mkdir -p "$home"
  "$FERRY_BIN" -r "$repo" init >"$LOGS/agentless-init.log" 2>&1 </dev/null \
    || { log "agentless: init FAILED (see $LOGS/agentless-init.log)"; R[agentless-backup.1,status]=failed; return 0; }
  measure agentless-backup.1 env FERRY_HOME="$home" "$FERRY_BIN" --json -r "$repo" \
    backup --source bench-ebs "ebs://$snap?region=$AWS_REGION&endpoint=$ENDPOINT&name=disk" || return 0
  local dir="$RUN/restore/readback"
  rm -rf "$dir"; mkdir -p "$dir"
  warm_repo "$repo"
  if measure readback-restore.1 "$FERRY_BIN" --json -r "$repo" restore bench-ebs@latest --to "$dir/disk.img"; then
    R[readback,size]=$(stat -c %s "$dir/disk.img")
    R[readback-restore.1,ident]=$(same_as_image "$dir/disk.img")
  fi
  rm -rf "$dir"
  [[ ${KEEP_REPOS:-0} == 1 ]] || rm -rf "$repo"
}

run_all() {
  # The cached image itself, through a link (saves a copy of it on a small
  # disk); its name is the restored disk's name.
  ln -sfn "$BASE" "$DISK"
  mkdir -p "$RUN/repos" "$RUN/restore" "$RUN/homes"
  start_moto
  # One full backup; every round restores its point.
  "$FERRY_BIN" -r "$RUN/repos/local" init >"$LOGS/local-init.log" 2>&1 </dev/null \
    || die "init failed (see $LOGS/local-init.log)"
  warm "$DISK"
  measure local-backup.1 "$FERRY_BIN" --json -r "$RUN/repos/local" backup --source bench "$DISK" \
    || die "the backup failed (see $LOGS/local-backup.1.err)"
  POINT=$(jget "$LOGS/local-backup.1.out" point)
  local r mem
  for ((r = 1; r <= ROUNDS; r++)); do
    log "round $r of $ROUNDS"
    local_restore "$r"
    ebs_restore "$r"
    [[ $r == 1 ]] && agentless
    read -r mem _ < <(moto_mem)
    R[moto,rss.$r]=$mem
    reset_moto
  done
  read -r _ 'R[moto,hwm]' < <(moto_mem)
  for s in local-backup local-restore ebs-restore agentless-backup readback-restore; do
    summarize "$s"
  done
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
  for m in wall dur cpu mcpu rss requests; do
    vals=""
    for ((r = 1; r <= ROUNDS; r++)); do
      [[ ${R[$step.$r,status]:-} == ok && -n ${R[$step.$r,$m]:-} ]] && vals+="${R[$step.$r,$m]} "
    done
    [[ -n $vals ]] || continue
    # shellcheck disable=SC2086  # one value per word
    R[$step,$m]=$(printf '%s\n' $vals | sort -g | awk '{v[NR]=$1} END{
      if (NR % 2) printf "%.2f", v[(NR+1)/2]; else printf "%.2f", (v[NR/2]+v[NR/2+1])/2 }')
  done
  [[ -n ${R[$step,rss]:-} ]] && R[$step,rss]=$(awk -v k="${R[$step,rss]}" 'BEGIN{printf "%.0f", k}')
  R[$step,ident]=yes R[$step,check]=yes
  for ((r = 1; r <= ROUNDS; r++)); do
    [[ -z ${R[$step.$r,ident]:-} || ${R[$step.$r,ident]} == yes ]] || R[$step,ident]=NO
    [[ -z ${R[$step.$r,check]:-} || ${R[$step.$r,check]} == yes ]] || R[$step,check]=NO
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
mbs() { calc "printf \"%.0f\", $1/1e6/$2"; }   # mbs BYTES SECONDS: MB/s
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
  local apparent=$SIZE_BYTES alloc s label
  alloc=$(du -B1 "$BASE" | cut -f1)
  echo "# Ferry EBS direct restore (moto) benchmark"
  echo
  echo "- Date: $(date -Is)"
  echo "- Machine: $(nproc) cores, $(awk -F': ' '/^model name/{print $2; exit}' /proc/cpuinfo)," \
       "$(awk '/MemTotal/{printf "%.0f GiB RAM", $2/1048576}' /proc/meminfo), kernel $(uname -r);" \
       "load average at the start $LOAD0, at the end $(cut -d' ' -f1-3 /proc/loadavg)"
  local fstype; fstype=$(df -T "$RUN" | awk 'NR==2{print $2}')
  echo "- Work dir: $RUN ($fstype); the image, the repositories and the restored files are on it$([[ $fstype == tmpfs ]] \
       && echo " (in memory: a local restore's writes and syncs cost no disk time, so it is faster than onto a disk)")"
  echo "- Image: the cached bench/run.sh image ($BASE), ext4, disk $(calc "printf \"%.1f\", $apparent/1048576") MiB," \
       "data (allocated, not holes) $(calc "printf \"%.1f\", $alloc/1048576") MiB"
  echo "- ferry: $("$FERRY_BIN" --version 2>/dev/null || echo '?'), $FERRY_SRC$([[ -n ${FERRY_BIN_GIVEN:-} ]] && echo ' (FERRY_BIN); checkout' || echo ', built from') $TREE"
  echo "- AWS: moto $MOTO_VERSION (\`moto_server\`, Python, one process) on 127.0.0.1, plain HTTP, dummy keys;" \
       "warmed up (one small snapshot written and read through boto3) after it starts and after every reset, reset after every round; its resident memory at the end of each round $(for ((r = 1; r <= ROUNDS; r++)); do printf '%s MiB ' "${R[moto,rss.$r]:-?}"; done)(peak ${R[moto,hwm]:-?} MiB)"
  echo "- One full backup of the image into a directory repository, then $ROUNDS rounds, each: restore of its point to a" \
       "new file (+ \`cmp\`), restore to \`ebs://\` with a fresh FERRY_HOME; in round 1 also the agentless backup of that" \
       "snapshot into a second repository and a restore of its point to a file (+ compare). Figures are medians over the rounds."
  echo
  echo "Times in seconds. Wall, client CPU (user+sys) and peak RSS from GNU time; \"ferry's own\" is the"
  echo "\`duration_secs\` of ferry's JSON: without process start and key derivation, except for the EBS restore,"
  echo "whose count starts before the repository is opened (and includes StartSnapshot, CompleteSnapshot and the"
  echo "DescribeSnapshots that sees it \`completed\`). moto CPU is the server's user+sys during the"
  echo "step (/proc/PID/stat). MB/s = 10^6 bytes per second of wall time: of the disk's size ($(calc "printf \"%.0f\", $apparent/1e6") MB) and of its data"
  echo "($(calc "printf \"%.0f\", $alloc/1e6") MB, the image's allocated bytes; the agentless backup's: the bytes it read)."
  echo
  echo "## Raw figures"
  echo
  echo "| Step | Wall s, each round | Wall s, median | ferry's own s | Client CPU s | moto CPU s | Peak RSS MiB | MB/s of disk | MB/s of data | Checked |"
  echo "|---|---|---:|---:|---:|---:|---:|---:|---:|:---:|"
  for s in local-backup local-restore ebs-restore agentless-backup readback-restore; do
    case $s in
      local-backup) label="ferry backup of the image (once, local directory)" ;;
      local-restore) label="ferry restore → file" ;;
      ebs-restore) label="ferry restore → \`ebs://\` (moto)" ;;
      agentless-backup) label="ferry backup \`ebs://SNAP\` (agentless, round 1)" ;;
      readback-restore) label="ferry restore of the agentless point → file (round 1)" ;;
    esac
    local disk_b=$apparent data_b=$alloc chk="–" tp="–" tpd="–"
    if [[ $s == agentless-backup ]] && ok "$s"; then
      disk_b=$(jget "$LOGS/agentless-backup.1.out" disk_bytes); data_b=$(jget "$LOGS/agentless-backup.1.out" bytes_read)
    fi
    [[ $s == readback-restore ]] && disk_b=${R[readback,size]:-$apparent}
    if ok "$s"; then
      tp=$(mbs "$disk_b" "${R[$s,wall]}"); tpd=$(mbs "$data_b" "${R[$s,wall]}")
      case $s in
        local-restore|readback-restore) chk="identical: ${R[$s,ident]}" ;;
        ebs-restore) chk="blocks: ${R[$s,check]}" ;;
      esac
    fi
    echo "| $label | $(walls "$s") | $(cell "$s" wall) | $(cell "$s" dur) | $(cell "$s" cpu) | $(cell "$s" mcpu) | $(cell "$s" rss) | $tp | $tpd | $chk |"
  done

  # ---- EBS requests, per round
  echo
  echo "## EBS restore: requests"
  echo
  echo "| Round | Snapshot | Blocks put | Zero blocks skipped | put + zero = ceil(size / 512 KiB) | PutSnapshotBlock requests (ferry / moto's log) | Answers not 2xx | Per GiB of disk | Per GiB of data | MiB sent |"
  echo "|---:|---|---:|---:|---|---:|---:|---:|---:|---:|"
  local r st
  for ((r = 1; r <= ROUNDS; r++)); do
    st=ebs-restore.$r
    if ok "$st"; then
      echo "| $r | ${R[$st,snapshot_id]} | ${R[$st,blocks_put]} | ${R[$st,blocks_zero]} |" \
           "${R[$st,blocks_put]} + ${R[$st,blocks_zero]} = $((${R[$st,blocks_put]} + ${R[$st,blocks_zero]})) of ${R[$st,blocks]}: ${R[$st,check]} |" \
           "${R[$st,requests]} / ${R[$st,mputs]} | ${R[$st,merr]} |" \
           "$(calc "printf \"%.1f\", ${R[$st,requests]}/($apparent/$GIB)") |" \
           "$(calc "printf \"%.1f\", ${R[$st,requests]}/($alloc/$GIB)") |" \
           "$(calc "printf \"%.1f\", ${R[$st,blocks_put]}*$BLOCK/1048576") |"
    else
      echo "| $r | ${R[$st,status]:-missing} | | | | | | | | |"
    fi
  done
  echo
  echo "Data is the image's allocated bytes; a 512 KiB block with any non-zero byte is sent whole, so \"MiB sent\""
  echo "is at least the data. A block of zeros is never sent (EBS reads it as zeros). moto does not verify the"
  echo "SHA-256 of a block (ferry sends one with every block)."

  # ---- the comparison
  echo
  echo "## EBS / local"
  echo
  echo "| | local restore | EBS restore | EBS / local throughput (local wall / EBS wall) |"
  echo "|---|---:|---:|---:|"
  if ok local-restore ebs-restore; then
    local lw=${R[local-restore,wall]} ew=${R[ebs-restore,wall]}
    echo "| wall s (median) | $lw | $ew | $(div "$lw" "$ew") (rounds: $(per_round local-restore ebs-restore)) |"
    echo "| MB/s of disk | $(mbs "$apparent" "$lw") | $(mbs "$apparent" "$ew") | |"
    echo "| MB/s of data | $(mbs "$alloc" "$lw") | $(mbs "$alloc" "$ew") | |"
    echo "| client CPU s | ${R[local-restore,cpu]} | ${R[ebs-restore,cpu]} | |"
    echo "| moto CPU s | – | ${R[ebs-restore,mcpu]} | |"
    echo "| peak RSS MiB | ${R[local-restore,rss]} | ${R[ebs-restore,rss]} | |"
    echo
    echo "moto is the bottleneck when its CPU is close to the wall time: it is one Python process (one core at a time" \
         "under the GIL). In the EBS restore it used $(calc "printf \"%.0f\", 100*${R[ebs-restore,mcpu]}/$ew")% of one core's wall time," \
         "$(calc "printf \"%.1f\", ${R[ebs-restore,mcpu]}/($alloc/$GIB)") CPU-s per GiB of data, against ferry's" \
         "$(calc "printf \"%.1f\", ${R[ebs-restore,cpu]}/($alloc/$GIB)") CPU-s per GiB ($(calc "printf \"%.1f\", ${R[local-restore,cpu]}/($alloc/$GIB)") for the local restore)." \
         "These figures show ferry's request count and overhead against a stand-in, not AWS's speed: real EBS" \
         "takes 16 PutSnapshotBlock in flight at network and service latency, and has its own per-snapshot rate limits."
  fi
  if ok agentless-backup; then
    local ab="$LOGS/agentless-backup.1.out" gets=${R[agentless-backup.1,mgets]}
    echo
    echo "Agentless backup (round 1): read $(calc "printf \"%.1f\", $(jget "$ab" bytes_read)/1048576") MiB of a" \
         "$(calc "printf \"%.0f\", $(jget "$ab" disk_bytes)/1048576") MiB snapshot with $gets GetSnapshotBlock requests (moto's log)," \
         "stored $(calc "printf \"%.1f\", $(jget "$ab" stored_bytes)/1048576") MiB in $(jget "$ab" packs_written) packs," \
         "${R[agentless-backup,wall]} s wall: $(mbs "$(jget "$ab" bytes_read)" "${R[agentless-backup,wall]}") MB/s of data read," \
         "$(mbs "$(jget "$ab" disk_bytes)" "${R[agentless-backup,wall]}") MB/s of disk; the local backup of the image took" \
         "${R[local-backup,wall]:-?} s ($(mbs "$alloc" "${R[local-backup,wall]:-1}") MB/s of data)." \
         "moto used ${R[agentless-backup,mcpu]} CPU-s, ferry ${R[agentless-backup,cpu]}." \
         "Restored to a file, the point's disk (${R[readback,size]:-?} bytes, whole GiB) equals the image" \
         "in its first $SIZE_BYTES bytes and is zeros after them: ${R[readback-restore,ident]:-–}."
  fi
  echo
  echo "## Checks"
  echo
  echo "| Check | Result |"
  echo "|---|:---:|"
  echo "| every local restore byte-identical to the image | $(cell local-restore ident) |"
  echo "| every EBS restore: blocks_put + blocks_zero = ceil(size / 512 KiB), nothing resumed | $(cell ebs-restore check) |"
  local mm=yes
  for ((r = 1; r <= ROUNDS; r++)); do
    ok "ebs-restore.$r" && [[ ${R[ebs-restore.$r,requests]} == "${R[ebs-restore.$r,mputs]}" ]] || mm=NO
  done
  echo "| ferry's PutSnapshotBlock count = the PUTs in moto's log | $mm |"
  echo "| the snapshot read back (agentless backup, restore) equals the image | $(cell readback-restore ident) |"
  echo
  echo "Logs: \`$LOGS\` (kept until the next run)."
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
