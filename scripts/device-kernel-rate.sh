#!/usr/bin/env bash
# On the device machine: the merge kernel's own rate (crates/lora-kernels/examples/kernel_rate.rs,
# device-resident weight, no host copies) beside torch's device copy (the ceiling) and torch's
# addmm merge, on Llama-3-8B shapes and ranks 16 and 64; also our kernel launched per 4096-row
# block (32 MiB of BF16 output, as the merge pipeline launches it).
# Needs .bin/kernel_rate:
#   cargo build --release -p lora-kernels --example kernel_rate && cp target/release/examples/kernel_rate .bin/
set -uo pipefail
nvidia-smi --query-gpu=name --format=csv,noheader
for shape in "14336 4096" "4096 14336" "4096 4096"; do
  for rank in 16 64; do
    .bin/kernel_rate $shape $rank
    python3 scripts/kernel_rate_peer.py $shape $rank
  done
done
.bin/kernel_rate 14336 4096 16 4096
