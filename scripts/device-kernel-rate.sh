#!/usr/bin/env bash
# On the device machine: the merge kernel's own rate (crates/lora-kernels/examples/kernel_rate.rs,
# device-resident weight, no host copies) beside torch's device copy (the ceiling) and torch's
# addmm merge, on Llama-3-8B shapes and ranks 16 and 64; also our kernel launched per 4096-row
# block (32 MiB of BF16 output, as the merge pipeline launches it). PREV_PTX=FILE times that
# PTX too in the same call (a variant built with the same launch shape, e.g. from another
# commit: `git show REV:crates/lora-kernels/ptx/merge.ptx > .bin/prev.ptx`). CHECK=1 first runs
# the GPU tests that compare the CUDA merge with the CPU's bits (cli_merge, merge_fixtures,
# quantized from .bin/tests: bash scripts/gpu-check.sh --build).
# Needs .bin/kernel_rate:
#   cargo build --release -p lora-kernels --example kernel_rate && cp target/release/examples/kernel_rate .bin/
set -uo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
exec > >(tee "$OUT/log.txt") 2>&1
nvidia-smi --query-gpu=name --format=csv,noheader
if [ "${CHECK:-0}" = 1 ]; then
  export WEIGHTSMITH_REPO=$PWD WEIGHTSMITH_BIN=$PWD/.bin/weightsmith
  for t in .bin/tests/cli_merge-* .bin/tests/merge_fixtures-* .bin/tests/quantized-*; do
    echo "== $(basename "$t")"
    timeout 120 "$t" --test-threads 1 2>&1 | grep -E "test result|FAILED|panicked"
  done
fi
for shape in "14336 4096" "4096 14336" "4096 4096"; do
  for rank in 16 64; do
    timeout 30 .bin/kernel_rate $shape $rank
    [ -n "${PREV_PTX:-}" ] && WEIGHTSMITH_MERGE_PTX=$PREV_PTX timeout 30 .bin/kernel_rate $shape $rank
    timeout 60 python3 scripts/kernel_rate_peer.py $shape $rank
  done
done
timeout 30 .bin/kernel_rate 14336 4096 16 4096
echo "device-kernel-rate: done"
