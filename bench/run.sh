#!/usr/bin/env bash
# Ferry vs restic vs borg on one generated ext4 disk image.
#
# Per tool, on the same file path ($RUN/disk.img):
#   full            backup of the pristine base image
#   incr-nochange   same bytes again (mtime touched, so no tool can skip the
#                   file from metadata alone: this measures re-read + dedup)
#   incr-scattered  after 1% of the image is rewritten as random 4 KiB blocks
#   incr-clustered  after a further 1% is rewritten as random 1 MiB extents
#   restore         latest point into a fresh dir, then cmp with disk.img
#   check           the tool's repository check (pass/fail + time)
# Each step records wall/user/sys/peak RSS (GNU time), repo growth (du -sb)
# and files added to the repo.  A Markdown report goes to stdout and --out.
#
# With ROUNDS > 1 the whole sequence runs ROUNDS times, every tool once per
# round in turn (interleaved), and each figure is the median of the rounds;
# the rounds of the full backup and the restore are listed beside them.
#
# Usage: bench/run.sh [--quick] [--rounds N] [--tools "restic borg borg-fixed ferry"] [--out FILE]
#        bench/run.sh --base-only   (make the cached base image, print its path)
# Env:   SIZE_MIB (2048), ROUNDS (1), FERRY_BENCH_DIR (/var/tmp/ferry-bench), FERRY_BIN,
#        CARGO_TARGET_DIR (/var/tmp/ferry-target), FERRY_INIT_ARGS, KEEP_REPOS=1
set -euo pipefail

BENCH_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(dirname "$BENCH_ROOT")
HELPERS="$BENCH_ROOT/helpers.py"

# ---------------------------------------------------------------- arguments
TOOLS="restic borg borg-fixed ferry"
OUT="$BENCH_ROOT/results/latest.md"
SIZE_MIB=${SIZE_MIB:-2048}
ROUNDS=${ROUNDS:-1}
while [[ $# -gt 0 ]]; do
  case $1 in
    --quick) SIZE_MIB=256; shift ;;
    --rounds) ROUNDS=$2; shift 2 ;;
    --tools) TOOLS=$2; shift 2 ;;
    --out) OUT=$2; shift 2 ;;
    --base-only) BASE_ONLY=1; shift ;;
    -h|--help) sed -n '2,18p' "$0"; exit 0 ;;
    *) echo "unknown argument: $1" >&2; exit 2 ;;
  esac
done
for t in $TOOLS; do
  case $t in restic|borg|borg-fixed|ferry) ;; *) echo "unknown tool: $t" >&2; exit 2 ;; esac
done

BENCH_DIR=${FERRY_BENCH_DIR:-/var/tmp/ferry-bench}
CACHE="$BENCH_DIR/cache"          # base images, kept across runs (keyed by size)
RUN="$BENCH_DIR/run"              # everything else, wiped at every run
LOGS="$RUN/logs"
DISK="$RUN/disk.img"
SIZE_BYTES=$((SIZE_MIB * 1024 * 1024))
BASE="$CACHE/base-${SIZE_MIB}M.img"
STEPS=(full incr-nochange incr-scattered-4k incr-clustered-1m)
SEED_SELECT=20240601 SEED_SCATTERED=1 SEED_CLUSTERED=2

export RESTIC_PASSWORD=bench BORG_PASSPHRASE=bench FERRY_PASSWORD=bench-password
# Keep every tool's caches/config inside the run dir: fresh and equal for each run.
export RESTIC_CACHE_DIR="$RUN/cache/restic" BORG_BASE_DIR="$RUN/cache/borg"
export XDG_CACHE_HOME="$RUN/cache/xdg" BORG_RELOCATED_REPO_ACCESS_IS_OK=yes

log() { printf '[bench %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
has() { [[ " $TOOLS " == *" $1 "* ]]; }

# ---------------------------------------------------------------- peers
install_peers() {
  local pkgs=(restic borgbackup time e2fsprogs) missing=()
  command -v restic >/dev/null || missing+=(restic)
  command -v borg >/dev/null || missing+=(borgbackup)
  [[ -x /usr/bin/time ]] || missing+=(time)
  command -v mkfs.ext4 >/dev/null || missing+=(e2fsprogs)
  [[ ${#missing[@]} -eq 0 ]] && return 0
  log "installing ${missing[*]}"
  if ! DEBIAN_FRONTEND=noninteractive apt-get install -y "${pkgs[@]}" >&2; then
    apt-get update >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y "${pkgs[@]}" >&2
  fi
}

# ---------------------------------------------------------------- ferry binary
FERRY_STATUS=ok
resolve_ferry() {
  if [[ -n ${FERRY_BIN:-} ]]; then
    [[ -x $FERRY_BIN ]] || { FERRY_STATUS="FERRY_BIN=$FERRY_BIN not executable"; return 0; }
    return 0
  fi
  export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-/var/tmp/ferry-target}
  FERRY_BIN="$CARGO_TARGET_DIR/release/ferry"
  log "building ferry (cargo build --release -p ferry-orchestrator, log: $LOGS/ferry-build.log)"
  if ! (cd "$REPO_ROOT" && cargo build --release -p ferry-orchestrator) >"$LOGS/ferry-build.log" 2>&1; then
    FERRY_STATUS="cargo build failed (see ferry-build.log)"
  elif [[ ! -x $FERRY_BIN ]]; then
    FERRY_STATUS="no binary at $FERRY_BIN after build"
  fi
}

# ---------------------------------------------------------------- base image
# A sparse raw file holding ext4 filled to ~52% with real files from /usr.
make_base() {
  if [[ -f $BASE ]]; then log "using cached $BASE"; return 0; fi
  mkdir -p "$CACHE"
  local src="$CACHE/src-${SIZE_MIB}M" tmp="$BASE.tmp"
  rm -rf "$src" "$tmp"; mkdir -p "$src"
  log "copying ~52% of ${SIZE_MIB} MiB of files from /usr into $src"
  python3 "$HELPERS" select $((SIZE_BYTES * 52 / 100)) $((SIZE_BYTES * 55 / 100)) \
      "$SEED_SELECT" /usr/bin /usr/sbin /usr/lib /usr/libexec /usr/share /usr/include \
    | tar -C / --null --no-recursion -T - -cf - 2>/dev/null \
    | tar -C "$src" -xpf -
  log "mkfs.ext4 -d ($(du -sh "$src" | cut -f1) of files)"
  truncate -s "${SIZE_MIB}M" "$tmp"
  mkfs.ext4 -F -q -L ferrybench -d "$src" "$tmp"
  fallocate --dig-holes "$tmp"   # any zeroed metadata/free space becomes holes
  rm -rf "$src"
  mv "$tmp" "$BASE"
}

# ---------------------------------------------------------------- tool commands
repo_of() { echo "$RUN/repos/$1"; }

# tool_argv TOOL ACTION [ARG]: sets CMD (argv) and CWD for the tool's ACTION.
CMD=() CWD=/
tool_argv() {
  local tool=$1 action=$2 arg=${3:-} repo
  repo=$(repo_of "$tool"); CWD=$RUN
  case $tool:$action in
    restic:init)    CMD=(restic init --repo "$repo" "${RESTIC_INIT_ARGS[@]}") ;;
    restic:backup)  CMD=(restic -r "$repo" backup --host bench "$DISK") ;;
    restic:restore) CMD=(restic -r "$repo" restore latest --host bench --target "$arg") ;;
    restic:check)   CMD=(restic -r "$repo" check) ;;
    borg*:init)     CMD=(borg init -e repokey "$repo") ;;
    # borg archives the relative path given, so run it from $RUN on "disk.img"
    borg:backup)    CMD=(borg create --compression lz4 "$repo::$arg" disk.img) ;;
    borg-fixed:backup)
      CMD=(borg create --compression lz4 --chunker-params "fixed,4194304" "$repo::$arg" disk.img) ;;
    borg*:restore)  CMD=(borg extract --sparse "$repo::${STEPS[-1]}"); CWD=$arg ;;
    borg*:check)    CMD=(borg check "$repo") ;;
    ferry:init)
      local extra=()
      read -r -a extra <<<"${FERRY_INIT_ARGS:-}"
      CMD=("$FERRY_BIN" -r "$repo" init "${extra[@]}") ;;
    ferry:backup)   CMD=("$FERRY_BIN" -r "$repo" backup --source bench "$DISK") ;;
    ferry:restore)  CMD=("$FERRY_BIN" -r "$repo" restore bench@latest --to "$arg") ;;
    ferry:check)    CMD=("$FERRY_BIN" -r "$repo" check) ;;
    *) echo "no command for $tool $action" >&2; return 1 ;;
  esac
}

# Where TOOL's restore into DIR leaves the image.
restored_path() {
  case $1 in
    restic) echo "$2$DISK" ;;   # restic re-creates the absolute path
    *) echo "$2/disk.img" ;;
  esac
}

# ---------------------------------------------------------------- measuring
declare -A R   # R[tool,step,metric]; metrics: wall cpu rss growth objs status ident

repo_bytes() { du -sb "$1" | cut -f1; }
repo_files() { find "$1" -type f | wc -l; }

# measure TOOL STEP ACTION [ARG]: run and record one step; returns its status.
measure() {
  local tool=$1 step=$2 action=$3 arg=${4:-} repo tf b0 f0 rc=0
  repo=$(repo_of "$tool"); tf="$LOGS/$tool-$step.time"
  b0=$(repo_bytes "$repo"); f0=$(repo_files "$repo")
  log "$tool: $step"
  (
    echo "### $tool $step: $(date -Is)"
    tool_argv "$tool" "$action" "$arg"
    echo "+ (cd $CWD; ${CMD[*]})"
    cd "$CWD" && /usr/bin/time -f '%e %U %S %M' -o "$tf" "${CMD[@]}"
  ) >>"$LOGS/$tool.log" 2>&1 </dev/null || rc=$?
  local wall=0 usr=0 sys=0 rss=0
  [[ -s $tf ]] && read -r wall usr sys rss < <(tail -n1 "$tf")
  R[$tool,$step,wall]=$wall
  R[$tool,$step,cpu]=$(awk -v u="$usr" -v s="$sys" 'BEGIN{printf "%.2f", u+s}')
  R[$tool,$step,rss]=$(awk -v k="$rss" 'BEGIN{printf "%.0f", k/1024}')
  R[$tool,$step,growth]=$(awk -v a="$(repo_bytes "$repo")" -v b="$b0" 'BEGIN{printf "%.2f", (a-b)/1048576}')
  R[$tool,$step,objs]=$(( $(repo_files "$repo") - f0 ))
  if [[ $rc -eq 0 ]]; then R[$tool,$step,status]=ok
  else R[$tool,$step,status]=failed; log "$tool: $step FAILED (exit $rc, see $LOGS/$tool.log)"; fi
  return "$rc"
}

mark() { # mark TOOL STATUS STEP...: set the status of steps that did not run
  local tool=$1 st=$2; shift 2
  for s in "$@"; do R[$tool,$s,status]=$st; done
}

apply_writes() { python3 "$HELPERS" writes "$DISK" "$1" "$2" >/dev/null; }

# run_tool TOOL: the whole sequence for one tool.
run_tool() {
  local tool=$1 repo
  repo=$(repo_of "$tool")
  local all=("${STEPS[@]}" restore check)
  if [[ $tool == ferry && $FERRY_STATUS != ok ]]; then
    log "ferry: skipped ($FERRY_STATUS)"; mark ferry failed "${all[@]}"; return 0
  fi
  rm -rf "$repo" "$DISK"
  cp --sparse=always "$BASE" "$DISK"
  tool_argv "$tool" init
  if ! (cd "$CWD" && "${CMD[@]}") >>"$LOGS/$tool.log" 2>&1 </dev/null; then
    log "$tool: init FAILED (see $LOGS/$tool.log)"; mark "$tool" failed "${all[@]}"; return 0
  fi
  cat "$DISK" >/dev/null   # warm-up: every tool starts with the image in page cache

  if ! measure "$tool" full backup full; then
    mark "$tool" skipped "${all[@]:1}"; return 0
  fi
  touch "$DISK"
  measure "$tool" incr-nochange backup incr-nochange || true
  apply_writes scattered "$SEED_SCATTERED"
  measure "$tool" incr-scattered-4k backup incr-scattered-4k || true
  apply_writes clustered "$SEED_CLUSTERED"
  measure "$tool" incr-clustered-1m backup incr-clustered-1m || true

  # Restore the latest point into a fresh dir on the same filesystem.
  # Ferry syncs the restored image before it reports success; restic and borg do
  # not. "restore+sync" times each tool until its image is on disk, so the
  # comparison is like for like; earlier steps' dirty pages are flushed first.
  local dir="$RUN/restore/$tool" t0
  rm -rf "$dir"; mkdir -p "$dir"; sync
  if measure "$tool" restore restore "$dir"; then
    t0=$(date +%s.%N); sync
    R[$tool,restore+sync,wall]=$(awk -v a="${R[$tool,restore,wall]}" -v t0="$t0" -v t1="$(date +%s.%N)" \
      'BEGIN{printf "%.2f", a + t1 - t0}')
    R[$tool,restore+sync,status]=ok
    if cmp -s "$DISK" "$(restored_path "$tool" "$dir")"; then R[$tool,restore,ident]=yes
    else R[$tool,restore,ident]=no; fi
  fi
  rm -rf "$dir"
  measure "$tool" check check || true
  [[ ${KEEP_REPOS:-0} == 1 ]] || rm -rf "$repo"
}

# medians: every figure becomes the median of its rounds; a step is ok only
# if it was ok in every round. ROUNDLIST[TOOL,STEP] lists the rounds' walls.
declare -A ROUNDLIST=()
medians() {
  local k r v vals st
  declare -A keys=()
  for k in "${!ALL[@]}"; do keys[${k#*|}]=1; done
  R=()
  for k in "${!keys[@]}"; do
    vals=()
    for ((r = 1; r <= ROUNDS; r++)); do
      v=${ALL[$r|$k]:-}
      [[ -n $v ]] && vals+=("$v")
    done
    if [[ $k == *,status ]]; then
      st=ok
      for v in "${vals[@]}"; do [[ $v == ok ]] || st=$v; done
      [[ ${#vals[@]} -eq $ROUNDS ]] || st=${st/ok/missing}
      R[$k]=$st
    elif [[ $k == *,ident ]]; then
      st=yes
      for v in "${vals[@]}"; do [[ $v == yes ]] || st=no; done
      R[$k]=$st
    else
      R[$k]=$(printf '%s\n' "${vals[@]}" | sort -g | awk '{a[NR]=$1} END{ if (NR % 2) print a[(NR+1)/2]; else printf "%.2f", (a[NR/2]+a[NR/2+1])/2 }')
      if [[ $k == *,wall ]]; then ROUNDLIST[${k%,wall}]=$(IFS=/; echo "${vals[*]}"); fi
    fi
  done
}

# ---------------------------------------------------------------- report
cell() { # cell TOOL STEP METRIC
  local st=${R[$1,$2,status]:-missing}
  if [[ $st == ok ]]; then echo "${R[$1,$2,$3]:-?}"; else echo "$st"; fi
}
ratio() { # ratio TOOL_A TOOL_B STEP METRIC: A/B, or why not
  local a=$1 b=$2 s=$3 m=$4
  [[ ${R[$a,$s,status]:-} == ok && ${R[$b,$s,status]:-} == ok ]] || { echo "n/a"; return; }
  awk -v x="${R[$a,$s,$m]}" -v y="${R[$b,$s,$m]}" \
    'BEGIN{ if (y+0 == 0) print (x+0 == 0 ? "both 0" : "inf"); else printf "%.2f", x/y }'
}

tool_version() {
  case $1 in
    restic) restic version | head -n1 ;;
    borg|borg-fixed) borg --version ;;
    ferry) if [[ $FERRY_STATUS == ok ]]; then "$FERRY_BIN" --version 2>/dev/null || echo "ferry (no --version)"
           else echo "ferry: $FERRY_STATUS"; fi ;;
  esac
}
tool_desc() {
  case $1 in
    restic) if [[ ${#RESTIC_INIT_ARGS[@]} -gt 0 ]]; then echo "restic, CDC, repo v2, compression auto (zstd)"
            else echo "restic, CDC, repo v1 (no compression)"; fi ;;
    borg) echo "borg, CDC buzhash (default chunker params), lz4" ;;
    borg-fixed) echo "borg, fixed 4 MiB chunks, lz4" ;;
    ferry) echo "ferry${FERRY_INIT_ARGS:+ (init $FERRY_INIT_ARGS)}" ;;
  esac
}

report() {
  local apparent alloc bs bc fb used
  apparent=$(stat -c %s "$BASE"); alloc=$(du -B1 "$BASE" | cut -f1)
  bs=$(dumpe2fs -h "$BASE" 2>/dev/null | awk -F: '/^Block size/{print $2+0}')
  bc=$(dumpe2fs -h "$BASE" 2>/dev/null | awk -F: '/^Block count/{print $2+0}')
  fb=$(dumpe2fs -h "$BASE" 2>/dev/null | awk -F: '/^Free blocks/{print $2+0}')
  used=$(( (bc - fb) * bs ))
  mib() { awk -v b="$1" 'BEGIN{printf "%.1f MiB", b/1048576}'; }

  echo "# Ferry backup benchmark"
  echo
  echo "- Date: $(date -Is)"
  echo "- Machine: $(nproc) cores, $(awk -F': ' '/^model name/{print $2; exit}' /proc/cpuinfo)," \
       "$(awk '/MemTotal/{printf "%.0f GiB RAM", $2/1048576}' /proc/meminfo), kernel $(uname -r)"
  echo "- Work dir: $RUN ($(df -T "$RUN" | awk 'NR==2{print $2}'))"
  echo "- Image: ext4, apparent $(mib "$apparent"), allocated $(mib "$alloc")," \
       "used by the filesystem $(mib "$used") (real files from /usr)"
  echo "- Changes: scattered = 1% as 4 KiB blocks at random 4 KiB offsets;" \
       "clustered = a further 1% as 1 MiB extents at random 1 MiB offsets (fixed seeds)"
  echo "- incr-nochange: identical bytes, mtime touched (no metadata shortcut possible)"
  echo "- Tools:"
  for t in $TOOLS; do echo "  - \`$t\`: $(tool_desc "$t") — $(tool_version "$t")"; done
  echo
  [[ $ROUNDS -gt 1 ]] && echo "- $ROUNDS interleaved rounds (every tool once per round, in the order above); every figure is the median of the rounds" && echo
  echo "Times in seconds; CPU = user+sys; RSS = peak resident set (GNU time);"
  echo "growth = repository size change (du -sb); objects = files added to the repository."
  local s t
  for s in "${STEPS[@]}"; do
    echo; echo "## $s"; echo
    echo "| Tool | Wall s | CPU s | Peak RSS MiB | Repo growth MiB | Objects written |"
    echo "|---|---:|---:|---:|---:|---:|"
    for t in $TOOLS; do
      echo "| $t | $(cell "$t" "$s" wall) | $(cell "$t" "$s" cpu) | $(cell "$t" "$s" rss) |" \
           "$(cell "$t" "$s" growth) | $(cell "$t" "$s" objs) |"
    done
  done
  echo; echo "## restore (latest point, then cmp with the source image)"; echo
  echo "| Tool | Wall s | Wall s until on disk (restore+sync) | CPU s | Peak RSS MiB | Identical |"
  echo "|---|---:|---:|---:|---:|:---:|"
  for t in $TOOLS; do
    echo "| $t | $(cell "$t" restore wall) | $(cell "$t" restore+sync wall) | $(cell "$t" restore cpu) |" \
         "$(cell "$t" restore rss) | $(cell "$t" restore ident) |"
  done
  echo; echo "## check (repository check after all steps)"; echo
  echo "| Tool | Wall s | CPU s | Peak RSS MiB | Result |"
  echo "|---|---:|---:|---:|:---:|"
  for t in $TOOLS; do
    echo "| $t | $(cell "$t" check wall) | $(cell "$t" check cpu) | $(cell "$t" check rss) |" \
         "${R[$t,check,status]:-missing} |"
  done

  local peers=()
  for t in $TOOLS; do [[ $t == ferry ]] || peers+=("$t"); done
  if has ferry && [[ ${#peers[@]} -gt 0 ]]; then
    echo; echo "## Ferry / peer ratios (< 1 means Ferry is better)"; echo
    local hdr="| Scenario |" sep="|---|" p
    for p in "${peers[@]}"; do hdr+=" time vs $p | growth vs $p |"; sep+="---:|---:|"; done
    echo "$hdr"; echo "$sep"
    for s in "${STEPS[@]}" restore restore+sync; do
      local row="| $s |"
      [[ $ROUNDS -gt 1 && $s == full ]] && row="| $s (ferry rounds ${ROUNDLIST[ferry,full]:-?} s) |"
      [[ $ROUNDS -gt 1 && $s == restore ]] && row="| $s (ferry rounds ${ROUNDLIST[ferry,restore]:-?} s) |"
      for p in "${peers[@]}"; do
        local g="n/a"; [[ $s == restore* ]] || g=$(ratio ferry "$p" "$s" growth)
        row+=" $(ratio ferry "$p" "$s" wall) | $g |"
      done
      echo "$row"
    done
  fi
  echo
  echo "Logs: \`$LOGS\` (kept until the next run)."
}

# ---------------------------------------------------------------- main
main() {
  if [[ ${BASE_ONLY:-} == 1 ]]; then make_base; echo "$BASE"; return 0; fi
  install_peers
  rm -rf "$RUN"; mkdir -p "$LOGS" "$RUN/repos"
  has ferry && resolve_ferry
  # restic >= 0.14 can create a v2 repository, which compresses (zstd, "auto").
  RESTIC_INIT_ARGS=()
  if has restic && restic init --help | grep -q -- --repository-version; then
    RESTIC_INIT_ARGS=(--repository-version 2)
  fi
  make_base
  log "base image: apparent $(du -h --apparent-size "$BASE" | cut -f1), allocated $(du -h "$BASE" | cut -f1)"
  local t r k
  declare -gA ALL=()
  for ((r = 1; r <= ROUNDS; r++)); do
    [[ $ROUNDS -gt 1 ]] && log "round $r of $ROUNDS"
    for t in $TOOLS; do run_tool "$t"; done
    for k in "${!R[@]}"; do ALL[$r|$k]=${R[$k]}; done
    [[ $r -lt $ROUNDS ]] && R=()
  done
  [[ $ROUNDS -gt 1 ]] && medians
  mkdir -p "$(dirname "$OUT")"
  report | tee "$OUT"
  rm -f "$DISK"
  log "report written to $OUT"
}

main
