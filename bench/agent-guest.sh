#!/usr/bin/env bash
# ferry-agent inside a Linux guest under software emulation (TCG), tracking
# an LVM volume with dm-era: what RPO it keeps and what it costs the guest.
#
# Runs tests/agent_guest.rs::bench_agent_in_guest once per era block size:
# moto (S3) and `ferry serve` on the host, a guest (scripts/make-guest:
# Debian's kernel, busybox, lvm, dmsetup, era_invalidate) with a LV of
# FERRY_BENCH_LV_MIB (1024) and the agent at a 1 s interval. After the
# agent's first (full) read, two phases of 60 s each:
#   idle:   nobody writes the volume;
#   writes: ferry-writer asks for FERRY_BENCH_RATE (2500 = 10 MB/s) random
#           4 KiB O_DIRECT writes per second to it; the phase ends once two
#           points were cut after the writer stopped (the backlog stored).
# Before the agent starts, the writer runs 20 s alone on the plain volume:
# the rate the guest can write without dm-era, to compare with.
# RPO is computed from the points' cuts and commit times (guest clock):
# between two commits the data an outage would lose reaches back to the
# older point's cut. The agent's CPU is its utime+stime over the phase with
# its children's (dmsetup, era_invalidate), read in the guest. Markdown to stdout and --out.
#
# Usage: bench/agent-guest.sh [--out FILE]
# Env:   BLOCKS ("64 4": era block sizes in KiB), FERRY_BENCH_RATE,
#        FERRY_BENCH_LV_MIB, CARGO_TARGET_DIR (/var/tmp/ferry-target).
# Uses the test build of ferry-agent (the dev profile is optimized).
set -euo pipefail

BENCH_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(dirname "$BENCH_ROOT")
OUT="$BENCH_ROOT/results/agent-guest-latest.md"
while [[ $# -gt 0 ]]; do
  case $1 in
    --out) OUT=$2; shift 2 ;;
    *) echo "usage: bench/agent-guest.sh [--out FILE]" >&2; exit 2 ;;
  esac
done
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-/var/tmp/ferry-target}
cd "$REPO_ROOT"
cargo build -q -p ferry-orchestrator -p ferry-fleet
mkdir -p "$(dirname "$OUT")"
{
  echo "# ferry-agent in a TCG guest, dm-era mode ($(date -u +%Y-%m-%dT%H:%MZ))"
  for kib in ${BLOCKS:-64 4}; do
    FERRY_BENCH_BLOCK_KIB=$kib cargo test -q -p ferry-tests --test agent_guest -- \
      --ignored --exact bench_agent_in_guest --nocapture 2>/dev/null |
      sed -n '/^era blocks/,/^| writes/p'
  done
} | tee "$OUT"
