#!/usr/bin/env bash
# The index at terabyte scale: memory and lookup throughput of a synthetic
# index of 16.8 million chunks (a 1 TiB disk of unique data at 64 KiB), kept
# whole in memory and kept mostly on disk, in one run (agent/benches/index.rs).
#
# Usage: bench/index.sh
# Env:   FERRY_BENCH_CHUNKS (16777216), FERRY_SPILL_DIR (where runs go),
#        CARGO_TARGET_DIR (/var/tmp/ferry-target), OUT (bench/results/index-latest.md)
set -euo pipefail
BENCH_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-/var/tmp/ferry-target}
OUT=${OUT:-$BENCH_ROOT/results/index-latest.md}
cd "$BENCH_ROOT/.."
cargo bench -q -p ferry-agent --bench index --no-run >&2
{
  echo "# Index at scale ($(date -u +%Y-%m-%d), $(nproc) cores, $(uname -m))"
  echo
  cargo bench -q -p ferry-agent --bench index 2>/dev/null
} | tee "$OUT"
