#!/usr/bin/env bash
# The GPU tests, in one command on the device machine: the same test executables CI runs on
# the host (built here, carried in .bin/tests), now with a GPU present, so `load` goes through
# CUDA and every tensor is read back from the device and compared with the file.
#   bash scripts/gpu-check.sh --build     # here: builds the binary and test executables into .bin
#   device run (carry .bin):  bash scripts/gpu-check.sh
set -euo pipefail
if [ "${1:-}" = "--build" ]; then
  cargo build --release -p weightsmith
  rm -rf .bin/tests && mkdir -p .bin/tests
  cp target/release/weightsmith .bin/
  # The tests whose behaviour changes with a GPU present (the carried tree must stay small).
  # kernel_on_host runs every merge-kernel case on the GPU too when one is present.
  cargo test --no-run -p gpu-mem -p lora-kernels -p weightsmith-tests 2>&1 | grep -o '(target/[^)]*)' | tr -d '()' \
    | grep -E 'gpu_mem-|kernel_on_host-|alloc_failure-|cli_load-|cli_plan-|cli_merge-|merge_fixtures-|quantized-|arch_matrix-' | while read -r exe; do cp "$exe" .bin/tests/; done
  strip .bin/weightsmith .bin/tests/*
  ls .bin/tests
  exit 0
fi
nvidia-smi -L || true
export WEIGHTSMITH_REPO=$PWD WEIGHTSMITH_BIN=$PWD/.bin/weightsmith WEIGHTSMITH_REQUIRE_PYTHON=1
export WEIGHTSMITH_REQUIRE_GPU=1
status=0
# Each test binary gets 300 s: a hang (a registration that never returned, once) fails the
# check and names the test still running instead of eating the device call.
for t in .bin/tests/*; do
  echo "== $(basename "$t")"
  rc=0
  timeout 300 "$t" --test-threads 1 > /tmp/gpu-check.log 2>&1 || rc=$?
  grep -E "^test |test result|panicked" /tmp/gpu-check.log || true
  # A binary that failed before its tests ran (a crash, a panic outside a test) shows its end.
  [ $rc = 0 ] || [ $rc = 124 ] || grep -q "test result" /tmp/gpu-check.log || tail -20 /tmp/gpu-check.log
  [ $rc = 124 ] && { echo "TIMED OUT after 300 s; its last output:"; tail -3 /tmp/gpu-check.log; }
  [ $rc = 0 ] || status=1
done
echo "gpu-check: status $status"
exit $status
