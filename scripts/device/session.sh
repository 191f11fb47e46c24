#!/usr/bin/env bash
# One device call for a build-check-measure cycle: the GPU tests (scripts/gpu-check.sh) and the
# quick merge benchmark (QUICK=1 scripts/device/merge-bench.sh). Build here first:
#   bash scripts/gpu-check.sh --build
#   device run (carry .bin):  bash scripts/device/session.sh
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
bash scripts/gpu-check.sh > "$OUT/gpu-check.txt" 2>&1; echo "gpu-check rc=$?"
grep -E "test result|FAILED|panicked|status" "$OUT/gpu-check.txt"
QUICK=1 bash scripts/device/merge-bench.sh
