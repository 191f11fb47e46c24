#!/usr/bin/env bash
# On the device machine: the merge kernel's own rate (crates/lora-kernels/examples/kernel_rate.rs,
# device-resident weight, no host copies) beside torch's device copy (the ceiling) and torch's
# addmm merge, on Llama-3-8B shapes and ranks 16 and 64; also our kernel launched per 4096-row
# block (32 MiB of BF16 output, as the merge pipeline launches it). PREV_PTX=FILE times that
# PTX's lora_merge_tile_bb too in the same call (e.g. from another commit:
# `git show REV:crates/lora-kernels/ptx/merge.ptx > .bin/prev.ptx`; PREV_KERNELS="NAME:ROWS:COLS
# ..." times those kernels of it instead, e.g. experiments built into that file). CHECK=1 first runs
# the GPU tests that compare the CUDA merge with the CPU's bits (cli_merge, merge_fixtures,
# quantized from .bin/tests: bash scripts/gpu-check.sh --build; kernel_on_host there runs every
# merge kernel case on the GPU against the CPU's bits). SWEEP=1 times every tile kernel of
# kernels/merge.cu (WS_TILE_KERNEL lines: name, columns per thread group, ...) and the scalar
# lora_merge. PROFILE=1 first writes each kernel's SASS and, where Nsight Compute is
# installed, its profile of lora_merge_tile at r = 16 and 64 (and PROFILE_KERNELS="NAME RANK")
# to $OUT.
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
# Every tile kernel, as NAME:TILE_ROWS:TILE_COLS (16 rows per WS_TILE_KERNEL's R, 64 columns
# per its H).
VARIANTS="$(grep -oE '^WS_TILE_KERNEL\([a-z0-9_]+, [0-9]+, [0-9]+' kernels/merge.cu | sed -E 's/WS_TILE_KERNEL\(([a-z0-9_]+), ([0-9]+), ([0-9]+)/\1:\2:\3/' \
  | while IFS=: read -r k r h; do echo "$k:$((16 * r)):$((64 * h))"; done | tr '\n' ' ')"
echo "tile kernels: $VARIANTS"
if [ "${PROFILE:-0}" = 1 ]; then
  # SASS of the kernels (ptxas for sm_90, cuobjdump) and Nsight Compute's view of a few.
  export PATH=$PATH:/usr/local/cuda/bin
  mkdir -p "$OUT/sass"
  ptxas -arch=sm_90 -v crates/lora-kernels/ptx/merge.ptx -o /tmp/merge.cubin 2>&1 | grep -E "registers|spill" | head -40
  for krc in $VARIANTS lora_merge:0:0; do k=${krc%%:*}; cuobjdump -sass -fun "$k" /tmp/merge.cubin > "$OUT/sass/$k.txt" 2>&1; done
  if command -v ncu > /dev/null; then
    for r in 16 64; do
      timeout 120 ncu --launch-skip 2 --launch-count 1 --metrics 'regex:smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio' \
        .bin/kernel_rate 14336 4096 $r > "$OUT/ncu-stalls-r$r.txt" 2>&1
      echo "stalls at r = $r (warps per issue):"
      grep -E "stalled" "$OUT/ncu-stalls-r$r.txt" | awk '$NF > 0.05' | sed -E 's/smsp__average_warps_issue_stalled_//; s/_per_issue_active.ratio//' | sort -k3 -g -r | head -12
    done
    for kr in "lora_merge_tile_bb 64" "lora_merge_tile_bb 16" "${PROFILE_KERNELS:-}"; do
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
# SHAPES="ROWS,COLS ..." narrows the shapes.
for shape in ${SHAPES:-14336,4096 4096,14336 4096,4096}; do
  shape=${shape/,/ }
  for rank in 16 32 64; do
    timeout 30 .bin/kernel_rate $shape $rank
    if [ "${SWEEP:-0}" = 1 ]; then
      for krc in $VARIANTS; do
        IFS=: read -r k tr tc <<< "$krc"
        WEIGHTSMITH_MERGE_KERNEL=$k WEIGHTSMITH_MERGE_TILE_ROWS=$tr WEIGHTSMITH_MERGE_TILE_COLS=$tc timeout 30 .bin/kernel_rate $shape $rank
      done
      WEIGHTSMITH_MERGE_KERNEL=lora_merge timeout 30 .bin/kernel_rate $shape $rank
      # Kernels that stride over row tiles by design (BLOCK_SWEEP="NAME:ROWS:COLS ..."), at
      # several block targets.
      for krc in ${BLOCK_SWEEP:-}; do
        IFS=: read -r k tr tc <<< "$krc"
        for b in 528 1056 2112 100000000; do
          WEIGHTSMITH_MERGE_BLOCKS=$b WEIGHTSMITH_MERGE_KERNEL=$k WEIGHTSMITH_MERGE_TILE_ROWS=$tr WEIGHTSMITH_MERGE_TILE_COLS=$tc timeout 30 .bin/kernel_rate $shape $rank
        done
      done
    fi
    if [ -n "${PREV_PTX:-}" ]; then
      for krc in ${PREV_KERNELS:-lora_merge_tile_bb:64:128}; do
        IFS=: read -r k tr tc <<< "$krc"
        WEIGHTSMITH_MERGE_KERNEL=$k WEIGHTSMITH_MERGE_TILE_ROWS=$tr WEIGHTSMITH_MERGE_TILE_COLS=$tc WEIGHTSMITH_MERGE_PTX=$PREV_PTX timeout 30 .bin/kernel_rate $shape $rank
      done
    fi
    timeout 60 python3 scripts/peers/kernel_rate_peer.py $shape $rank
  done
done
timeout 30 .bin/kernel_rate 14336 4096 16 4096
echo "device-kernel-rate: done"
