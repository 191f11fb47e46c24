#!/usr/bin/env bash
# On the device machine, one call: which warm-load path is fastest there (the merge kernels
# have scripts/device/kernel-rate.sh). Builds nothing: carry .bin (weightsmith, tests).
#   here:  bash scripts/gpu-check.sh --build
#   there: bash scripts/device/load-probe.sh
# Prints one JSON line per run: the registered path, the staged path at several worker counts and
# window sizes, the mixed path at several shares, cold staged loads, Python preads alone (the
# host ceiling of staging), the pinned-copy ceiling and safetensors in the same call.
set -uo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
exec > >(tee "$OUT/log.txt") 2>&1
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; nproc; uname -r
echo "== gpu-check"
bash scripts/gpu-check.sh 2>&1 | grep -E "^==|test result|FAILED|panicked|gpu-check"
echo "== cli_load with the staged and mixed paths forced"
for t in .bin/tests/cli_load-*; do
  WEIGHTSMITH_REPO=$PWD WEIGHTSMITH_BIN=$PWD/.bin/weightsmith "$t" --test-threads 1 2>&1 | grep "test result"
  WEIGHTSMITH_WARM_STAGED_PERCENT=50 WEIGHTSMITH_STAGE_MB=1 WEIGHTSMITH_REPO=$PWD WEIGHTSMITH_BIN=$PWD/.bin/weightsmith "$t" --test-threads 1 2>&1 | grep "test result"
done
echo "== load"
W=/tmp/wsload; rm -rf "$W"; mkdir -p "$W"
python3 scripts/bench/make_synthetic.py "$W" --preset 8b --rank 4 > /dev/null
M="$W/base"
source scripts/device/lib.sh
warm
python3 scripts/bench/pread_probe.py "$M" 1 4 8 12 16
python3 scripts/peers/load_peers.py "$M" pinned pinned-copy-ceiling
python3 scripts/peers/load_peers.py "$M" safetensors safetensors-warm
for i in 1 2 3; do LABEL=registered-$i ours; done
for w in 8 12 16; do for mb in 16 32 64; do
  LABEL=staged-w$w-${mb}MB WEIGHTSMITH_STAGE_WORKERS=$w WEIGHTSMITH_STAGE_MB=$mb ours --no-register
done; done
for p in 25 40 55; do for w in 8 12; do
  LABEL=mixed-$p-w$w WEIGHTSMITH_WARM_STAGED_PERCENT=$p WEIGHTSMITH_STAGE_WORKERS=$w ours
done; done
for i in 1 2; do LABEL=mixed-auto-$i WEIGHTSMITH_WARM_STAGED_PERCENT=auto ours; done
WEIGHTSMITH_TRACE=1 WEIGHTSMITH_WARM_STAGED_PERCENT=auto .bin/weightsmith load "$M" --cache-seq-len 4096 --json 2>&1 >/dev/null | grep -E "trace (mixed|file)"
LABEL=mixed-40-verify WEIGHTSMITH_WARM_STAGED_PERCENT=40 ours --verify
LABEL=staged-verify ours --no-register --verify
cold; LABEL=cold-staged-w8 ours
cold; LABEL=cold-staged-w16 WEIGHTSMITH_STAGE_WORKERS=16 ours
cold; python3 scripts/peers/load_peers.py "$M" safetensors safetensors-cold
rm -rf "$W"
echo "device-load-probe: done"
