#!/usr/bin/env bash
# On the device machine, in one call: a Llama-3-8B-shaped bf16 checkpoint (4 shards, 16.06 GB,
# random weights); `weightsmith load` warm (registered path), warm without registration (pinned
# path) and cold (after drop_caches), one run with --verify; the peers (safetensors load_file to
# cuda:0, transformers from_pretrained to cuda:0, warm and cold) and a pinned copy as the ceiling.
# Needs .bin/weightsmith (release build from the build machine), carried.
#   cargo build --release -p weightsmith && mkdir -p .bin && cp target/release/weightsmith .bin/
#   device run (carry .bin):  bash scripts/device/load-bench.sh
set -uo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
exec > >(tee "$OUT/log.txt") 2>&1
export PYTHONUNBUFFERED=1
W=${WORK:-/tmp/wsload}
rm -rf "$W"; mkdir -p "$W"
nvidia-smi --query-gpu=name,memory.total,memory.free --format=csv
python3 scripts/bench/make_synthetic.py "$W" --preset 8b --rank 4 > /dev/null
M="$W/base"
source scripts/device/lib.sh
# EXTRA: more load options, e.g. EXTRA="--strategy balanced" on several GPUs. PEERS=0 skips
# the peers and the fixtures (a quicker run).
warm; LABEL=ours-warm ours
warm; LABEL=ours-warm-2 ours
warm; LABEL=ours-warm-pinned ours --no-register
warm; LABEL=ours-warm-verify ours --verify
cold; LABEL=ours-cold ours
if [ "${PEERS:-1}" = 1 ]; then
warm; python3 scripts/peers/load_peers.py "$M" pinned pinned-copy-ceiling
warm; python3 scripts/peers/load_peers.py "$M" safetensors safetensors-warm
cold; python3 scripts/peers/load_peers.py "$M" safetensors safetensors-cold
warm; python3 scripts/peers/load_peers.py "$M" transformers transformers-warm
cold; python3 scripts/peers/load_peers.py "$M" transformers transformers-cold
# Correctness on the GPU with the shipped fixtures too.
for m in fixtures/models/*/; do .bin/weightsmith load "$m" --verify --cache-seq-len 64 | head -1; done
fi
rm -rf "$W"
echo "device-load-bench: done"
