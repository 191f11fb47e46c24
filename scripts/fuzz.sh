#!/usr/bin/env bash
# The fuzz targets (fuzz/, cargo fuzz with libFuzzer), each for SECONDS (default 60), on a copy
# of the committed corpus (fuzz/corpus/TARGET, seeded from the fixtures); prints executions and
# corpus size per target and fails on any crash (its input is left in fuzz/artifacts/TARGET:
# turn it into a regression test). Needs the nightly toolchain; installs cargo-fuzz if missing.
#   bash scripts/fuzz.sh [SECONDS] [TARGET ...]      # .ci/run: 15 s each; by hand: longer
set -euo pipefail
cd "$(dirname "$0")/.."
SECONDS_EACH=${1:-60}
shift || true
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(header index config adapter_config planner)
cargo +nightly --version > /dev/null 2>&1 || rustup toolchain install nightly --profile minimal
command -v cargo-fuzz > /dev/null || cargo install --locked --quiet cargo-fuzz
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
status=0
for t in "${targets[@]}"; do
  cp -r "fuzz/corpus/$t" "$work/$t"
  if cargo +nightly fuzz run --fuzz-dir fuzz "$t" "$work/$t" -- -max_total_time="$SECONDS_EACH" \
       > "$work/$t.log" 2>&1; then
    runs=$(grep -o "Done [0-9]* runs" "$work/$t.log" | tail -1)
    echo "fuzz $t: ${runs:-?} in ${SECONDS_EACH} s; corpus $(ls "fuzz/corpus/$t" | wc -l) seeds -> $(ls "$work/$t" | wc -l) inputs"
  else
    echo "fuzz $t: FAILED"; tail -40 "$work/$t.log"; status=1
  fi
done
exit $status
