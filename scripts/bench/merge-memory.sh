#!/usr/bin/env bash
# Peak anonymous memory (RssAnon: what the process allocated, not mapped file pages) of a merge
# with a large adapter: a Llama-1B-shaped bf16 base (3.0 GB) and an r=256 all-linear adapter
# (345 MB), CPU, for each binary given (e.g. an older build beside the current one). Runs here.
#   bash scripts/bench/merge-memory.sh target/release/weightsmith [.bin/weightsmith-prev ...]
# PRESET (1b), RANK (256), WORK (/tmp/merge-memory). Needs python3 with numpy.
set -euo pipefail
cd "$(dirname "$0")/../.."
WORK=${WORK:-/tmp/merge-memory}
PRESET=${PRESET:-1b}
RANK=${RANK:-256}
[ -f "$WORK/base/config.json" ] || python3 scripts/bench/make_synthetic.py "$WORK" --preset "$PRESET" --rank "$RANK"
for bin in "$@"; do
  for round in 1 2; do
    python3 scripts/bench/measure.py "$bin" -- "$bin" merge --base "$WORK/base" --adapter "$WORK/adapter" \
      --out "$WORK/out" --device cpu --force | tail -1
    rm -rf "$WORK/out"
  done
done
