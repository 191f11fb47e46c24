#!/usr/bin/env bash
# On the device machine: makes the PEFT adapter fixtures and PEFT's reference merges.
#   device run:  bash scripts/device/adapter-fixtures.sh
# Results: $OUT/adapter-fixtures.tar.gz (unpack at the repository root) and $OUT/log.txt.
set -euo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
exec > >(tee "$OUT/log.txt") 2>&1
export PYTHONUNBUFFERED=1
python3 -c "import torch, transformers, peft, tokenizers; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)"
work=$(mktemp -d)
cp -r fixtures "$work/fixtures"
python3 scripts/fixtures/make_adapter_fixtures.py "$work/fixtures"
tar -C "$work" -czf "$OUT/adapter-fixtures.tar.gz" fixtures/adapters fixtures/models/tiny-llama
ls -la "$work/fixtures/adapters"/*
