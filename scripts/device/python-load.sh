#!/usr/bin/env bash
# The Python package on the device machine: `weightsmith.load` (torch tensors on cuda:0 through
# DLPack) against safetensors.torch.load_file(device=) and transformers from_pretrained
# (device_map="cuda:0"), warm and cold, on an 8B-shaped bf16 checkpoint, in one call; then the
# checks of scripts/device/check_python_loader.py (torch.equal on every tensor, the transformers
# loader's logits equal from_pretrained's).
#   here:  maturin build --release --skip-auditwheel -o .carry/wheels   (an abi3 wheel)
#   device run (carry .carry):  bash scripts/device/python-load.sh
# ROUNDS (2), PRESET (8b). Results: $OUT/python-load.txt.
set -euo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
exec > >(tee "$OUT/python-load.txt") 2>&1
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --target /tmp/site .carry/wheels/*.whl
export PYTHONPATH=/tmp/site
ROUNDS=${ROUNDS:-2}
PRESET=${PRESET:-8b}
WORK=/tmp/python-load
[ -f "$WORK/$PRESET/base/config.json" ] || python3 scripts/bench/make_synthetic.py "$WORK/$PRESET" --preset "$PRESET" --shard-gb 5
M="$WORK/$PRESET/base"
echo "model: $(du -sb "$M" | cut -f1) bytes"
cold() { sync; echo 3 > /proc/sys/vm/drop_caches; }
warm() { cat "$M"/*.safetensors > /dev/null; }
for r in $(seq 1 "$ROUNDS"); do
  for who in weightsmith safetensors transformers; do
    warm; python3 scripts/peers/load_peers.py "$M" "$who" "warm-$who" || echo "warm-$who failed"
    cold; python3 scripts/peers/load_peers.py "$M" "$who" "cold-$who" || echo "cold-$who failed"
  done
done | tee "$WORK/runs.jsonl"
python3 - "$WORK/runs.jsonl" <<'PY'
import json, sys, statistics as st
runs = {}
for line in open(sys.argv[1]):
    if line.startswith("{"):
        r = json.loads(line); runs.setdefault(r["label"], []).append(r["seconds"])
med = {k: st.median(v) for k, v in runs.items()}
for k in sorted(med): print(f"{k}: median {med[k]:.2f} s over {len(runs[k])}")
for mode in ("warm", "cold"):
    o = med.get(f"{mode}-weightsmith")
    for peer in ("safetensors", "transformers"):
        p = med.get(f"{mode}-{peer}")
        if o and p: print(f"{mode}: weightsmith.load is {p / o:.2f}x {peer}")
PY
warm
python3 scripts/device/check_python_loader.py "$M"
rm -rf "$WORK"
