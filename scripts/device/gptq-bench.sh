#!/usr/bin/env bash
# On the device machine, in one call: a Llama-3-8B-shaped GPTQ checkpoint (4-bit, group 128,
# 5.7 GB) and an r=16 all-linear adapter; our merge into it on the GPU and on the CPU (warm
# page cache) against the torch peer (scripts/peers/gptq_peer.py: AutoGPTQ's dequantisation formula,
# merge, save) on the GPU; the disk write floor for the 16 GB output; our CPU and CUDA outputs
# compared byte for byte. Needs .bin/weightsmith (carried).
set -uo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
exec > >(tee "$OUT/gptq-log.txt") 2>&1
export PYTHONUNBUFFERED=1
W=${WORK:-/tmp/wsgptq}
rm -rf "$W"; mkdir -p "$W"
echo "cores $(nproc)"
python3 scripts/bench/make_gptq_synthetic.py "$W" --preset "${PRESET:-8b}" --rank 16
.bin/weightsmith inspect "$W/gptq" | head -8
python3 scripts/bench/measure.py disk-write-16GB -- dd if=/dev/zero of="$W/ddw" bs=64M count=240 conv=fsync status=none
rm -f "$W/ddw"
warm() { cat "$W"/gptq/*.safetensors > /dev/null; }
warm
WEIGHTSMITH_TRACE=1 python3 scripts/bench/measure.py ours-cuda -- .bin/weightsmith merge --base "$W/gptq" --adapter "$W/adapter" --out "$W/ours-cuda" --device cuda:0
warm
python3 scripts/bench/measure.py ours-cpu -- .bin/weightsmith merge --base "$W/gptq" --adapter "$W/adapter" --out "$W/ours-cpu" --device cpu
python3 -c "
import hashlib, os, sys
def digest(d):
    return {f: hashlib.sha256(open(os.path.join(d, f), 'rb').read()).hexdigest() for f in sorted(os.listdir(d)) if f.endswith('.safetensors')}
print('cpu and cuda outputs identical:', digest(sys.argv[1]) == digest(sys.argv[2]))
" "$W/ours-cpu" "$W/ours-cuda"
rm -rf "$W/ours-cpu"
warm
python3 scripts/bench/measure.py peer-torch-cuda -- python3 scripts/peers/gptq_peer.py "$W/gptq" "$W/adapter" "$W/peer" cuda
python3 - "$W/ours-cuda" "$W/peer" <<'PY'
# Ours against the peer on the layers of layer 0: the peer rounds the dequantised weight to
# float16 before adding the delta (AutoGPTQ's formula), so a 1-ulp difference is expected.
import os, sys, torch
from safetensors import safe_open
def tensors(d):
    out = {}
    for f in sorted(os.listdir(d)):
        if f.endswith(".safetensors"):
            h = safe_open(os.path.join(d, f), "pt")
            out.update({k: h for k in h.keys()})
    return out
a, b = tensors(sys.argv[1]), tensors(sys.argv[2])
assert sorted(a) == sorted(b), "different tensor names"
worst = 0
for k in sorted(a):
    if k.startswith("model.layers.0."):
        x, y = (a[k].get_tensor(k).view(torch.int16).int(), b[k].get_tensor(k).view(torch.int16).int())
        key = lambda v: torch.where(v < 0, -(v & 0x7FFF), v)   # sign-magnitude order: ulps through zero
        worst = max(worst, (key(x) - key(y)).abs().max().item())
print(f"ours vs peer on layer 0: same {len(a)} tensor names, max {worst} ulp")
PY
warm
WEIGHTSMITH_TRACE=1 python3 scripts/bench/measure.py ours-cuda-2 -- .bin/weightsmith merge --base "$W/gptq" --adapter "$W/adapter" --out "$W/ours-cuda" --device cuda:0 --force
rm -rf "$W"
echo "device-gptq-bench: done"
