#!/usr/bin/env bash
# On the device machine (python3 with torch, transformers, safetensors; no Rust toolchain):
# makes the reference fixtures with the real libraries, then checks that checkpoints written by
# our streaming writer (the `reshard` example, built here beforehand into .bin/) read back
# identically with Python safetensors and give identical logits with transformers.
#
#   cargo build --release -p st-io --example reshard && mkdir -p .bin && cp target/release/examples/reshard .bin/
#   device run (carry .bin):  bash scripts/device/fixtures.sh
# Results: $OUT/fixtures.tar.gz (unpack at the repository root) and $OUT/log.txt.
set -euo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
exec > >(tee "$OUT/log.txt") 2>&1
export PYTHONUNBUFFERED=1
work=$(mktemp -d)
python3 -c "import torch, transformers, safetensors; print('torch', torch.__version__, 'transformers', transformers.__version__, 'safetensors', safetensors.__version__)"
python3 scripts/fixtures/make_fixtures.py "$work/fixtures"
status=0
for model in "$work"/fixtures/models/*/; do
  name=$(basename "$model")
  .bin/reshard "$model" "$work/resharded/$name" --max-shard-size 40KB
  python3 scripts/device/check_written.py "$model" "$work/resharded/$name" --transformers || status=1
  .bin/reshard "$model" "$work/single/$name" --max-shard-size 50GB
  python3 scripts/device/check_written.py "$model" "$work/single/$name" --transformers || status=1
done
mkdir -p "$work/dt"
.bin/reshard "$work/fixtures/python/all-dtypes.safetensors" "$work/dt/all" --max-shard-size 100
python3 scripts/device/check_written.py "$work/fixtures/python/all-dtypes.safetensors" "$work/dt/all" || status=1
tar -C "$work" -czf "$OUT/fixtures.tar.gz" fixtures
echo "device-fixtures: status $status"
exit $status
