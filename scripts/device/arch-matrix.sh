#!/usr/bin/env bash
# The architecture matrix on the device machine, in one call: for every case of
# fixtures/matrix, our merge on the CPU and on the GPU (bit for bit the same tensors), then
# transformers loads our output (nothing missing, unexpected or mismatched) and gives PEFT's
# logits (scripts/device/check_arch_matrix.py), and the times of our merge and PEFT's side by side.
#   here:        bash scripts/gpu-check.sh --build        # .bin/weightsmith (release)
#   device run (carry .bin):  bash scripts/device/arch-matrix.sh
# Results: $OUT/arch-matrix.json (the table) and $OUT/log.txt.
set -euo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
exec > >(tee "$OUT/log.txt") 2>&1
export PYTHONUNBUFFERED=1
python3 -c "import torch, transformers, peft; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)"
nvidia-smi -L || true
bin=.bin/weightsmith
work=$(mktemp -d)
status=0
for case in fixtures/matrix/*/; do
  t=$(basename "$case")
  for dev in cpu cuda:0; do
    d="$work/${dev%%:*}/$t"
    mkdir -p "$(dirname "$d")"
    if ! "$bin" merge --base "$case/base" --adapter "$case/adapter" --out "$d" --device "$dev" > "$work/$t-$dev.log" 2>&1; then
      echo "$t: merge on $dev FAILED"; tail -3 "$work/$t-$dev.log"; status=1
    fi
  done
  for f in "$work/cpu/$t"/*.safetensors; do
    cmp -s "$f" "$work/cuda/$t/$(basename "$f")" || { echo "$t: $(basename "$f") differs between CPU and GPU"; status=1; }
  done
  echo "$t: CPU and GPU merges written, safetensors identical"
done
python3 scripts/device/check_arch_matrix.py fixtures/matrix "$work/cpu" --json "$OUT/arch-matrix.json" || status=1
python3 scripts/device/check_arch_matrix.py fixtures/matrix "$work/cuda" > /dev/null || { echo "the GPU outputs fail the transformers check"; status=1; }
rm -rf "$work"
echo "device-arch-matrix: status $status"
exit $status
