#!/usr/bin/env bash
# Ferry over plain S3 (s3s-fs on 127.0.0.1) against Ferry on a local
# directory, and against restic on the same S3 server, on one disk image.
#
# In one run, on the image bench/run.sh builds and caches:
#   local      ferry to a directory repository: full backup, restore (+ cmp)
#   s3         ferry to s3s-fs: full backup, restore (+ cmp); throughput
#              ratios S3/local (target >= 0.70 for backup and restore)
#   objects    objects written per GiB of new data: ferry (PUT requests and
#              objects in the bucket) against restic's objects in the bucket
#              for the same image (target: ferry <= 1/4 of restic)
#   faults     ferry backup to a fresh prefix with FERRY_FAULTS (5% of
#              requests fail), wall time against the fault-free S3 backup
#              (target <= 1.5x) and retries; the point is then restored
#              without faults and compared with the image
# Wall/user/sys/peak RSS come from GNU time, s3s-fs's CPU from /proc/PID/stat.
# A Markdown report goes to stdout and --out.
#
# Usage: bench/s3.sh [--quick] [--out FILE]
# Env:   SIZE_MIB (2048), FERRY_BENCH_DIR (/var/tmp/ferry-bench), FERRY_BIN,
#        CARGO_TARGET_DIR (/var/tmp/ferry-target), FERRY_TOOLS_DIR
#        (/var/tmp/ferry-tools, s3s-fs is installed there), FAULTS (the
#        FERRY_FAULTS spec), KEEP_REPOS=1
set -euo pipefail

BENCH_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(dirname "$BENCH_ROOT")
HELPERS="$BENCH_ROOT/helpers.py"

# ---------------------------------------------------------------- arguments
OUT="$BENCH_ROOT/results/s3-latest.md"
SIZE_MIB=${SIZE_MIB:-2048}
while [[ $# -gt 0 ]]; do
  case $1 in
    --quick) SIZE_MIB=256; shift ;;
    --out) OUT=$2; shift 2 ;;
    -h|--help) sed -n '2,23p' "$0"; exit 0 ;;
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

export RESTIC_PASSWORD=bench FERRY_PASSWORD=bench
export RESTIC_CACHE_DIR="$RUN/cache/restic" XDG_CACHE_HOME="$RUN/cache/xdg"
# Only the variables set below may steer the AWS clients (ferry's SDK, restic).
unset AWS_PROFILE AWS_DEFAULT_PROFILE AWS_SESSION_TOKEN AWS_DEFAULT_REGION \
      AWS_ENDPOINT AWS_ENDPOINT_URL_S3 AWS_VIRTUAL_HOSTED_STYLE_REQUEST FERRY_FAULTS FERRY_REPO
export AWS_ACCESS_KEY_ID=ferrybench AWS_SECRET_ACCESS_KEY=ferrybench-secret AWS_REGION=us-east-1
export AWS_CONFIG_FILE=/dev/null AWS_SHARED_CREDENTIALS_FILE=/dev/null AWS_EC2_METADATA_DISABLED=true

log() { printf '[s3bench %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() { log "error: $*"; exit 1; }

# ---------------------------------------------------------------- tools
install_tools() {
  local missing=()
  command -v restic >/dev/null || missing+=(restic)
  [[ -x /usr/bin/time ]] || missing+=(time)
  command -v mkfs.ext4 >/dev/null || missing+=(e2fsprogs)
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
    [[ -x $FERRY_BIN ]] || die "FERRY_BIN=$FERRY_BIN is not executable"
  else
    FERRY_BIN="$CARGO_TARGET_DIR/release/ferry"
    log "building ferry (cargo build --release -p ferry-orchestrator, log: $LOGS/ferry-build.log)"
    (cd "$REPO_ROOT" && cargo build --release -p ferry-orchestrator) >"$LOGS/ferry-build.log" 2>&1 \
      || die "cargo build failed (see $LOGS/ferry-build.log)"
    [[ -x $FERRY_BIN ]] || die "no binary at $FERRY_BIN after the build"
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

# Objects under a directory of s3s-fs's data dir (its own metadata files aside).
objects_in() {
  find "$1" -type f ! -name '*.s3s-fs-*' ! -path '*/.s3s-fs*' ! -name '.*' 2>/dev/null | wc -l
}
bytes_in() { du -sb "$1" | cut -f1; }

# ---------------------------------------------------------------- measuring
declare -A R   # R[step,metric]: wall usr sys cpu rss s3cpu status

# measure STEP CMD...: run CMD under GNU time, stdout to $LOGS/STEP.out,
# stderr to $LOGS/STEP.err; records wall/cpu/rss and s3s-fs CPU; returns CMD's status.
measure() {
  local step=$1; shift
  local tf="$LOGS/$step.time" rc=0 c0=0 c1=0
  log "$step"
  sync   # earlier steps' dirty pages are not this step's work
  [[ -n $S3S_PID ]] && c0=$(s3s_cpu)
  echo "+ $*" >"$LOGS/$step.err"
  /usr/bin/time -f '%e %U %S %M' -o "$tf" "$@" >"$LOGS/$step.out" 2>>"$LOGS/$step.err" </dev/null || rc=$?
  [[ -n $S3S_PID ]] && c1=$(s3s_cpu)
  local wall=0 usr=0 sys=0 rss=0
  [[ -s $tf ]] && read -r wall usr sys rss < <(tail -n1 "$tf")
  R[$step,wall]=$wall
  R[$step,cpu]=$(awk -v u="$usr" -v s="$sys" 'BEGIN{printf "%.2f", u+s}')
  R[$step,rss]=$(awk -v k="$rss" 'BEGIN{printf "%.0f", k/1024}')
  R[$step,s3cpu]=$(awk -v a="$c0" -v b="$c1" 'BEGIN{printf "%.2f", b-a}')
  if [[ $rc -eq 0 ]]; then R[$step,status]=ok
  else R[$step,status]=failed; log "$step FAILED (exit $rc, see $LOGS/$step.err)"; fi
  return "$rc"
}

# jget FILE KEY.KEY...: a value from a JSON document ("" if absent).
jget() {
  python3 - "$@" <<'EOF'
import json, sys
doc = sys.stdin if sys.argv[1] == "-" else open(sys.argv[1])
text = doc.read().strip()
try:
    v = json.loads(text)
except ValueError:
    v = json.loads(text.splitlines()[-1])   # line-delimited output: the last line
for k in sys.argv[2].split("."):
    v = v.get(k) if isinstance(v, dict) else None
print("" if v is None else v)
EOF
}

warm() { cat "$DISK" >/dev/null; }

# ferry_backup_restore NAME REPO [BUCKET_DIR]: init, full backup, restore, cmp;
# with BUCKET_DIR, the objects and bytes the backup added there.
ferry_backup_restore() {
  local name=$1 repo=$2 bdir=${3:-} dir="$RUN/restore/$1" o0=0 b0=0
  "$FERRY_BIN" -r "$repo" init >"$LOGS/$name-init.log" 2>&1 </dev/null \
    || { log "$name: init FAILED (see $LOGS/$name-init.log)"; R[$name-backup,status]=failed; return 0; }
  [[ -n $bdir ]] && { o0=$(objects_in "$bdir"); b0=$(bytes_in "$bdir"); }
  warm
  measure "$name-backup" "$FERRY_BIN" --json -r "$repo" backup --source bench "$DISK" || return 0
  if [[ -n $bdir ]]; then
    R[$name,objs]=$(( $(objects_in "$bdir") - o0 ))
    R[$name,bytes]=$(( $(bytes_in "$bdir") - b0 ))
  fi
  rm -rf "$dir"; mkdir -p "$dir"
  if measure "$name-restore" "$FERRY_BIN" --json -r "$repo" restore bench@latest --to "$dir/disk.img"; then
    if cmp -s "$DISK" "$dir/disk.img"; then R[$name-restore,ident]=yes; else R[$name-restore,ident]=NO; fi
  fi
  rm -rf "$dir"
}

# ---------------------------------------------------------------- steps
run_all() {
  cp --sparse=always "$BASE" "$DISK"
  mkdir -p "$RUN/repos" "$RUN/restore"

  # 1. local directory repository
  ferry_backup_restore local "$RUN/repos/ferry-local"

  # 2. the same on s3s-fs
  start_s3s
  local plain="s3://$BUCKET/plain" faulty="s3://$BUCKET/faults"
  ferry_backup_restore s3 "$plain" "$S3_DATA/$BUCKET/plain"
  if [[ ${R[s3-backup,status]:-} == ok ]]; then
    "$FERRY_BIN" --json -r "$plain" stats >"$LOGS/s3-stats.json" 2>"$LOGS/s3-stats.err" </dev/null || true
  fi

  # 3. restic on the same server, same image
  local rrepo="s3:http://127.0.0.1:$PORT/$RESTIC_BUCKET"
  if restic -r "$rrepo" init >"$LOGS/restic-init.log" 2>&1 </dev/null; then
    R[restic,objs0]=$(objects_in "$S3_DATA/$RESTIC_BUCKET")
    R[restic,bytes0]=$(bytes_in "$S3_DATA/$RESTIC_BUCKET")
    warm
    if measure restic-backup restic -r "$rrepo" backup --json --host bench "$DISK"; then
      R[restic,objs]=$(( $(objects_in "$S3_DATA/$RESTIC_BUCKET") - ${R[restic,objs0]} ))
      R[restic,bytes]=$(( $(bytes_in "$S3_DATA/$RESTIC_BUCKET") - ${R[restic,bytes0]} ))
    fi
  else
    log "restic init FAILED (see $LOGS/restic-init.log)"; R[restic-backup,status]=failed
  fi

  # 4. ferry with injected faults, fresh prefix (init without faults)
  if "$FERRY_BIN" -r "$faulty" init >"$LOGS/faults-init.log" 2>&1 </dev/null; then
    warm
    if measure faults-backup env FERRY_FAULTS="$FAULTS" "$FERRY_BIN" --json -r "$faulty" backup --source bench "$DISK"; then
      local dir="$RUN/restore/faults"; rm -rf "$dir"; mkdir -p "$dir"
      if measure faults-restore "$FERRY_BIN" --json -r "$faulty" restore bench@latest --to "$dir/disk.img"; then
        if cmp -s "$DISK" "$dir/disk.img"; then R[faults-restore,ident]=yes; else R[faults-restore,ident]=NO; fi
      fi
      rm -rf "$dir"
    fi
  else
    log "faults: init FAILED (see $LOGS/faults-init.log)"; R[faults-backup,status]=failed
  fi
}

# ---------------------------------------------------------------- report
cell() { # cell STEP METRIC
  local st=${R[$1,status]:-missing}
  if [[ $st == ok ]]; then echo "${R[$1,$2]:-?}"; else echo "$st"; fi
}
ok() { local s; for s in "$@"; do [[ ${R[$s,status]:-} == ok ]] || return 1; done; }
calc() { awk "BEGIN{ $1 }"; }   # calc 'printf ..., expr'
req() { jget "$LOGS/$1.out" "requests.$2"; }
verdict() { # verdict OK_EXPR: yes/no from an awk condition
  if calc "exit !($1)"; then echo yes; else echo "**no**"; fi
}

report() {
  local gib=1073741824
  local apparent alloc
  apparent=$(stat -c %s "$BASE"); alloc=$(du -B1 "$BASE" | cut -f1)
  echo "# Ferry over S3 (s3s-fs) benchmark"
  echo
  echo "- Date: $(date -Is)"
  echo "- Machine: $(nproc) cores, $(awk -F': ' '/^model name/{print $2; exit}' /proc/cpuinfo)," \
       "$(awk '/MemTotal/{printf "%.0f GiB RAM", $2/1048576}' /proc/meminfo), kernel $(uname -r)," \
       "load average before the run $LOAD0"
  echo "- Work dir: $RUN ($(df -T "$RUN" | awk 'NR==2{print $2}')); the local repository and s3s-fs's data dir are on it"
  echo "- Image: the cached bench/run.sh image, ext4, apparent $(calc "printf \"%.1f\", $apparent/1048576") MiB," \
       "allocated $(calc "printf \"%.1f\", $alloc/1048576") MiB"
  echo "- ferry: $("$FERRY_BIN" --version 2>/dev/null || echo '?') ($FERRY_BIN, tree $(cd "$REPO_ROOT" && git rev-parse --short HEAD 2>/dev/null || echo '?')$(cd "$REPO_ROOT" && [[ -n $(git status --porcelain --untracked-files=no 2>/dev/null) ]] && echo ', with uncommitted changes'))"
  echo "- S3 server: s3s-fs $S3S_VERSION on 127.0.0.1 (plain HTTP, SigV4), ferry repository s3://$BUCKET/plain"
  echo "- restic: $(restic version | head -n1), repository v2 (zstd auto), s3:http://127.0.0.1:PORT/$RESTIC_BUCKET"
  echo "- Faults: \`FERRY_FAULTS=\"$FAULTS\"\` on the backup only (fresh prefix s3://$BUCKET/faults)"
  echo
  echo "Times in seconds (wall); CPU = user+sys of the client (GNU time); s3s-fs CPU = the server's"
  echo "user+sys during the step (/proc). Restores go to a new file and are compared with \`cmp\`."
  echo
  echo "## Raw figures"
  echo
  echo "| Step | Wall s | Client CPU s | s3s-fs CPU s | Peak RSS MiB | Identical |"
  echo "|---|---:|---:|---:|---:|:---:|"
  local s label
  for s in local-backup local-restore s3-backup s3-restore restic-backup faults-backup faults-restore; do
    case $s in
      local-*) label="ferry, local dir: ${s#local-}" ;;
      s3-*) label="ferry, S3: ${s#s3-}" ;;
      restic-*) label="restic, S3: backup" ;;
      faults-backup) label="ferry, S3 + 5% faults: backup" ;;
      faults-restore) label="ferry, S3: restore of the faulted backup (no faults)" ;;
    esac
    local s3c="–"; [[ $s == local-* ]] || s3c=$(cell "$s" s3cpu)
    local id="–"; [[ $s == *restore ]] && id=${R[$s,ident]:-–}
    echo "| $label | $(cell "$s" wall) | $(cell "$s" cpu) | $s3c | $(cell "$s" rss) | $id |"
  done

  # ---- throughput
  local bk="n/a" rs="n/a"
  ok local-backup s3-backup && bk=$(calc "printf \"%.2f\", ${R[local-backup,wall]}/${R[s3-backup,wall]}")
  ok local-restore s3-restore && rs=$(calc "printf \"%.2f\", ${R[local-restore,wall]}/${R[s3-restore,wall]}")

  # ---- objects per GiB
  local new puts objs f_puts_g f_objs_g r_new r_objs r_g="n/a" rb="" objratio="n/a" objratio2="n/a"
  local kinds=""
  if ok s3-backup; then
    new=$(jget "$LOGS/s3-backup.out" new_bytes)
    puts=$(req s3-backup puts)
    objs=${R[s3,objs]}
    f_puts_g=$(calc "printf \"%.1f\", $puts/($new/$gib)")
    f_objs_g=$(calc "printf \"%.1f\", $objs/($new/$gib)")
    [[ -s $LOGS/s3-stats.json ]] && kinds=$(python3 -c '
import json, sys
s = json.load(open(sys.argv[1]))
print(", ".join(f"{k} {c}" for k, (c, _) in s["objects"].items()))' "$LOGS/s3-stats.json")
  fi
  if ok restic-backup; then
    r_new=$(jget "$LOGS/restic-backup.out" data_added)
    r_objs=${R[restic,objs]}
    r_g=$(calc "printf \"%.1f\", $r_objs/($r_new/$gib)")
  fi
  if ok s3-backup restic-backup; then
    objratio=$(calc "printf \"%.2f\", $f_puts_g/$r_g")
    objratio2=$(calc "printf \"%.2f\", $f_objs_g/$r_g")
  fi

  # ---- faults
  local fr="n/a" retries="n/a"
  if ok faults-backup; then
    retries=$(req faults-backup retries)
    ok s3-backup && fr=$(calc "printf \"%.2f\", ${R[faults-backup,wall]}/${R[s3-backup,wall]}")
  fi

  echo
  echo "## Objects written by the full backup"
  echo
  echo "| Tool | New data GiB (uncompressed) | Stored MiB | PUT requests | Objects in the bucket | Per GiB of new data |"
  echo "|---|---:|---:|---:|---:|---:|"
  if ok s3-backup; then
    echo "| ferry | $(calc "printf \"%.3f\", $new/$gib") | $(calc "printf \"%.1f\", ${R[s3,bytes]}/1048576") |" \
         "$puts | $objs | $f_puts_g PUTs, $f_objs_g objects |"
  else echo "| ferry | failed | | | | |"; fi
  if ok restic-backup; then
    echo "| restic | $(calc "printf \"%.3f\", $r_new/$gib") | $(calc "printf \"%.1f\", ${R[restic,bytes]}/1048576") |" \
         "not counted | $r_objs | $r_g objects |"
  else echo "| restic | failed | | | | |"; fi
  echo
  echo "New data: ferry's \`new_bytes\`, restic's \`data_added\` (both before compression)."
  echo "Objects: files the backup added to the repository's directory in s3s-fs's data dir (what \`init\` wrote is not counted)."
  [[ -n $kinds ]] && echo "ferry \`stats\` after the backup, objects by kind: $kinds."
  if ok s3-backup; then
    echo "ferry requests: $(req s3-backup puts) PUT, $(req s3-backup gets) GET, $(req s3-backup lists) LIST," \
         "$(req s3-backup deletes) DELETE, $(req s3-backup retries) retried;" \
         "$(calc "printf \"%.1f\", $(req s3-backup bytes_up)/1048576") MiB up."
  fi

  echo
  echo "## Targets"
  echo
  echo "| Target | Measured | Met |"
  echo "|---|---|:---:|"
  local v
  v="n/a"; [[ $bk != n/a ]] && v=$(verdict "$bk >= 0.70")
  echo "| backup throughput S3 / local ≥ 0.70 | $bk (${R[local-backup,wall]:-?} s local, ${R[s3-backup,wall]:-?} s S3) | $v |"
  v="n/a"; [[ $rs != n/a ]] && v=$(verdict "$rs >= 0.70")
  echo "| restore throughput S3 / local ≥ 0.70 | $rs (${R[local-restore,wall]:-?} s local, ${R[s3-restore,wall]:-?} s S3) | $v |"
  v="n/a"; [[ $objratio != n/a ]] && v=$(verdict "$objratio <= 0.25")
  echo "| objects per GiB of new data ≤ ¼ of restic's | ferry/restic $objratio by PUTs ($objratio2 by objects): ${f_puts_g:-?} PUTs/GiB against ${r_g} objects/GiB | $v |"
  v="n/a"; [[ $fr != n/a ]] && v=$(verdict "$fr <= 1.5")
  echo "| backup with 5% faults ≤ 1.5× the fault-free time | ${fr}× (${R[faults-backup,wall]:-?} s), $retries retries | $v |"
  local idv=yes s2
  for s2 in local-restore s3-restore faults-restore; do [[ ${R[$s2,ident]:-} == yes ]] || idv="**no**"; done
  echo "| every restore byte-identical (local, S3, faulted backup) | local ${R[local-restore,ident]:-–}, S3 ${R[s3-restore,ident]:-–}, faulted ${R[faults-restore,ident]:-–} | $idv |"
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
