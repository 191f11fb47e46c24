#!/usr/bin/env bash
# On the device machine, in one call: a Llama-3-8B-shaped bf16 base (16.06 GB, random weights)
# and an r=16 all-linear adapter; our CPU merge (warm and cold page cache) against PEFT's
# workflow (load, merge_and_unload, save_pretrained) on CPU and on the GPU; the disk floor;
# and a tensor-by-tensor and logits comparison of our output with PEFT's.
# CUDA_FIRST=1: our CUDA merge before our CPU merge. QUICK=1: only the warm runs (ours CPU,
# ours CUDA twice with WEIGHTSMITH_TRACE, PEFT on the GPU) and the disk floor; no cold runs, no
# PEFT on CPU; with COMPARE=1 the tensor and logits comparison of our output with PEFT's GPU
# merge.
# Needs .bin/weightsmith (a release build from the build machine), carried.
#   cargo build --release -p weightsmith && mkdir -p .bin && cp target/release/weightsmith .bin/
#   device run (carry .bin):  bash scripts/device/merge-bench.sh
set -uo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
exec > >(tee "$OUT/log.txt") 2>&1
export PYTHONUNBUFFERED=1
W=${WORK:-/tmp/wsbench}
rm -rf "$W"; mkdir -p "$W"
echo "cores $(nproc)"; free -g | head -2; df -h "$W" | tail -1
python3 -c "import torch, transformers, peft; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)"
python3 scripts/bench/make_synthetic.py "$W" --preset 8b --rank 16
cold() { sync; echo 3 > /proc/sys/vm/drop_caches; }
# The disk floor: cold read of the base; a 16 GB write with fsync (buffered: the bytes wait in
# the page cache until the fsync) and with O_DIRECT (the disk's write rate); the read and the
# O_DIRECT write at once (the VM's disk shares one budget between them).
cold
python3 scripts/bench/measure.py disk-read-cold -- sh -c "cat $W/base/*.safetensors > /dev/null"
python3 scripts/bench/measure.py disk-write-16GB -- dd if=/dev/zero of="$W/ddw" bs=64M count=240 conv=fsync status=none
rm -f "$W/ddw"; sync
python3 scripts/bench/measure.py disk-write-16GB-direct -- dd if=/dev/zero of="$W/ddw" bs=64M count=240 oflag=direct status=none
rm -f "$W/ddw"; sync
cold
python3 scripts/bench/measure.py disk-read+write -- sh -c "cat $W/base/*.safetensors > /dev/null & dd if=/dev/zero of=$W/ddw bs=64M count=240 oflag=direct status=none; wait"
rm -f "$W/ddw"; sync
# Ours, warm (base in the page cache) and cold. The VM's disk slows under sustained writes, so
# the later of two merges is often the slower one: CUDA_FIRST=1 runs the CUDA merge first.
ours_cpu() {
  cat "$W"/base/*.safetensors > /dev/null
  python3 scripts/bench/measure.py "ours-cpu-warm$1" -- .bin/weightsmith merge --base "$W/base" --adapter "$W/adapter" --out "$W/ours" --device cpu --force
}
ours_cuda() {
  cat "$W"/base/*.safetensors > /dev/null
  WEIGHTSMITH_TRACE=1 python3 scripts/bench/measure.py "ours-cuda-warm$1" -- .bin/weightsmith merge --base "$W/base" --adapter "$W/adapter" --out "$W/ours-cuda" --device cuda:0 --force
}
if [ "${CUDA_FIRST:-0}" = 1 ]; then ours_cuda ""; ours_cpu ""; else ours_cpu ""; ours_cuda ""; fi
if [ "${QUICK:-0}" = 1 ]; then
  if [ "${CUDA_FIRST:-0}" = 1 ]; then ours_cuda -2; ours_cpu -2; else ours_cpu -2; ours_cuda -2; fi
fi
python3 -c "
import hashlib, os, sys
def digest(d):
    return {f: hashlib.sha256(open(os.path.join(d, f), 'rb').read()).hexdigest() for f in sorted(os.listdir(d)) if f.endswith('.safetensors')}
a, b = digest(sys.argv[1]), digest(sys.argv[2])
print('cpu and cuda outputs identical:', a == b)
" "$W/ours" "$W/ours-cuda"
rm -rf "$W/ours-cuda"
if [ "${QUICK:-0}" = 1 ]; then
  cat "$W"/base/*.safetensors > /dev/null
  python3 scripts/bench/measure.py peft-cuda -- python3 scripts/peers/peft_merge.py "$W/base" "$W/adapter" "$W/peft" cuda
  [ "${COMPARE:-0}" = 1 ] && python3 scripts/device/compare_merged.py "$W/ours" "$W/peft" "$W/base"
  rm -rf "$W"
  echo "device-merge-bench (quick): done"
  exit 0
fi
cold
python3 scripts/bench/measure.py ours-cpu-cold -- .bin/weightsmith merge --base "$W/base" --adapter "$W/adapter" --out "$W/ours" --device cpu --force
# PEFT, warm, on CPU and on the GPU.
cat "$W"/base/*.safetensors > /dev/null
python3 scripts/bench/measure.py peft-cpu -- python3 scripts/peers/peft_merge.py "$W/base" "$W/adapter" "$W/peft" cpu
python3 scripts/device/compare_merged.py "$W/ours" "$W/peft" "$W/base"
rm -rf "$W/peft"
cat "$W"/base/*.safetensors > /dev/null
python3 scripts/bench/measure.py peft-cuda -- python3 scripts/peers/peft_merge.py "$W/base" "$W/adapter" "$W/peft" cuda
rm -rf "$W"
echo "device-merge-bench: done"
