#!/usr/bin/env bash
# On the device machine: the merge kernel's own rate (crates/lora-kernels/examples/kernel_rate.rs,
# device-resident weight, no host copies) beside torch's device copy (the ceiling) and torch's
# addmm merge, on Llama-3-8B shapes and ranks 16 and 64; also our kernel launched per 4096-row
# block (32 MiB of BF16 output, as the merge pipeline launches it). PREV_PTX=FILE times that
# PTX too in the same call (a variant built with the same launch shape, e.g. from another
# commit: `git show REV:crates/lora-kernels/ptx/merge.ptx > .bin/prev.ptx`). CHECK=1 first runs
# the GPU tests that compare the CUDA merge with the CPU's bits (cli_merge, merge_fixtures,
# quantized from .bin/tests: bash scripts/gpu-check.sh --build; kernel_on_host there runs every
# merge kernel variant on the GPU against the CPU's bits). SWEEP=1 times every kernel that takes
# each rank (WEIGHTSMITH_MERGE_KERNEL) and the chosen ones at other block targets. PROFILE=1
# first writes each kernel's SASS and, where Nsight Compute is installed, its profile of
# lora_merge_v8 (and PROFILE_KERNELS="NAME RANK") to $OUT.
# Needs .bin/kernel_rate:
#   cargo build --release -p lora-kernels --example kernel_rate && cp target/release/examples/kernel_rate .bin/
set -uo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
exec > >(tee "$OUT/log.txt") 2>&1
nvidia-smi --query-gpu=name --format=csv,noheader
if [ "${CHECK:-0}" = 1 ]; then
  export WEIGHTSMITH_REPO=$PWD WEIGHTSMITH_BIN=$PWD/.bin/weightsmith WEIGHTSMITH_REQUIRE_GPU=1
  for t in .bin/tests/kernel_on_host-* .bin/tests/cli_merge-* .bin/tests/merge_fixtures-* .bin/tests/quantized-*; do
    echo "== $(basename "$t")"
    timeout 120 "$t" --test-threads 1 2>&1 | grep -E "test result|FAILED|panicked"
  done
fi
# Every kernel of the merge's launch shapes: lora_merge_v8 and the register
# variants of gpu.rs (a variant that does not take a rank says so and is skipped).
VARIANTS="lora_merge_v8 $(grep -o 'kernel: "lora_merge_r[0-9a-z_]*"' crates/lora-kernels/src/gpu.rs | sed 's/kernel: "//; s/"//' | tr '\n' ' ')"
if [ "${PROFILE:-0}" = 1 ]; then
  # SASS of the kernels (ptxas for sm_90, cuobjdump) and Nsight Compute's view of a few.
  export PATH=$PATH:/usr/local/cuda/bin
  mkdir -p "$OUT/sass"
  ptxas -arch=sm_90 -v crates/lora-kernels/ptx/merge.ptx -o /tmp/merge.cubin 2>&1 | grep -E "registers|spill" | head -40
  for k in $VARIANTS; do cuobjdump -sass -fun "$k" /tmp/merge.cubin > "$OUT/sass/$k.txt" 2>&1; done
  if command -v ncu > /dev/null; then
    for kr in "lora_merge_v8 64" "lora_merge_v8 16" "${PROFILE_KERNELS:-}"; do
      set -- $kr; [ $# = 2 ] || continue
      WEIGHTSMITH_MERGE_KERNEL=$1 timeout 120 ncu --launch-skip 2 --launch-count 1 --section SpeedOfLight \
        --section WarpStateStats --section Occupancy --section ComputeWorkloadAnalysis --section MemoryWorkloadAnalysis \
        .bin/kernel_rate 14336 4096 "$2" > "$OUT/ncu-$1-r$2.txt" 2>&1
      grep -E "Duration|Throughput|Registers|Achieved Occupancy|Stall|Issue Slots|Warp Cycles" "$OUT/ncu-$1-r$2.txt" | head -30
    done
  else
    echo "no ncu"
  fi
fi
for shape in "14336 4096" "4096 14336" "4096 4096"; do
  for rank in 16 32 64; do
    timeout 30 .bin/kernel_rate $shape $rank
    if [ "${SWEEP:-0}" = 1 ]; then
      for v in $VARIANTS; do
        WEIGHTSMITH_MERGE_KERNEL=$v timeout 30 .bin/kernel_rate $shape $rank 2> /dev/null
      done
      for b in 1024 4096 8192; do
        WEIGHTSMITH_MERGE_BLOCKS=$b timeout 30 .bin/kernel_rate $shape $rank
      done
    fi
    [ -n "${PREV_PTX:-}" ] && WEIGHTSMITH_MERGE_KERNEL=lora_merge_v8 WEIGHTSMITH_MERGE_PTX=$PREV_PTX timeout 30 .bin/kernel_rate $shape $rank
    timeout 60 python3 scripts/kernel_rate_peer.py $shape $rank
  done
done
timeout 30 .bin/kernel_rate 14336 4096 16 4096
echo "device-kernel-rate: done"
