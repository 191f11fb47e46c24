#!/usr/bin/env bash
# On the device machine, one short call after a change to the load path: the GPU tests
# (scripts/gpu-check.sh), then `weightsmith load` of a Llama-3-8B-shaped checkpoint (16.06 GB,
# 4 shards) warm through the registered and staged paths beside safetensors' load_file in the
# same call. Builds nothing: carry .bin (bash scripts/gpu-check.sh --build here first).
# MIXED=1 adds the mixed path (registered+pinned) at several shares.
#   device run (carry .bin):  bash scripts/device/upload-check.sh
set -uo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
exec > >(tee "$OUT/log.txt") 2>&1
export PYTHONUNBUFFERED=1
T0=$(date +%s)
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; uname -r
bash scripts/gpu-check.sh | grep -E "^==|test result|FAILED|panicked|TIMED|gpu-check"
echo "== 8B checkpoint ($(($(date +%s) - T0)) s)"
W=/tmp/wsload; rm -rf "$W"; mkdir -p "$W"
timeout 150 python3 scripts/bench/make_synthetic.py "$W" --preset 8b --rank 4 > /dev/null || echo "make_synthetic failed"
M="$W/base"
source scripts/device/lib.sh
warm
timeout 60 python3 scripts/peers/load_peers.py "$M" safetensors safetensors-warm
for i in 1 2 3; do LABEL=registered-$i ours; done
LABEL=staged ours --no-register
if [ "${MIXED:-0}" = 1 ]; then
  for i in 1 2 3; do LABEL=mixed-auto-$i WEIGHTSMITH_WARM_STAGED_PERCENT=auto ours; done
  for p in 15 25 35; do LABEL=mixed-$p WEIGHTSMITH_WARM_STAGED_PERCENT=$p ours; done
  LABEL=mixed-auto-verify WEIGHTSMITH_WARM_STAGED_PERCENT=auto ours --verify
fi
timeout 60 python3 scripts/peers/load_peers.py "$M" safetensors safetensors-warm-2
rm -rf "$W"
echo "device-upload-check: done in $(($(date +%s) - T0)) s"
