#!/usr/bin/env bash
# Where the Python package's warm load loses against the CLI, in one device call: the same
# 8B-shaped bf16 checkpoint loaded warm by `weightsmith load --json` (its report: total and copy
# rate) and by `weightsmith.load` in Python (time outside and the same report inside), three
# rounds each, beside safetensors.torch.load_file.
#   here:  maturin build --release --skip-auditwheel -o .carry/wheels
#          bash scripts/gpu-check.sh --build && mkdir -p .carry/cli && tar czf .carry/cli/weightsmith.tgz .bin/weightsmith
#   device run (carry .carry/wheels, .carry/cli):  bash scripts/device/python-vs-cli.sh
set -euo pipefail
[ -x .bin/weightsmith ] || tar xzf .carry/cli/weightsmith.tgz
python3 -m pip install -q --no-index --no-deps --target /tmp/site .carry/wheels/*.whl
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
WORK=/tmp/pvc
[ -f "$WORK/8b/base/config.json" ] || python3 scripts/bench/make_synthetic.py "$WORK/8b" --preset 8b --shard-gb 5 > /dev/null
M="$WORK/8b/base"
warm() { cat "$M"/*.safetensors > /dev/null; }
for r in 1 2 3; do
  warm
  start=$(date +%s.%N)
  .bin/weightsmith load "$M" --json > /tmp/cli.json
  end=$(date +%s.%N)
  python3 - "$start" "$end" <<'PY'
import json, sys
r = json.load(open("/tmp/cli.json"))
print(json.dumps({"label": "cli", "process_seconds": round(float(sys.argv[2]) - float(sys.argv[1]), 3),
                  "inside_seconds": round(r["seconds"], 3), "gb_per_s": r["gb_per_s"],
                  "device_gb_per_s": [d["gb_per_s"] for d in r["devices"]], "paths": sorted({p for _, p in r["files"]}),
                  "phases": {k: round(v, 3) for k, v in r["phases"].items()}}))
PY
  warm; python3 scripts/peers/load_peers.py "$M" weightsmith python
  warm; python3 scripts/peers/load_peers.py "$M" safetensors safetensors
done
rm -rf "$WORK"
