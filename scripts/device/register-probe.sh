#!/usr/bin/env bash
# On the device machine, one call with a hard time limit on every step: does registering a
# page-cached mapping (cuMemHostRegister) work on this machine's kernel at all (a stuck load
# gets its threads' kernel stacks printed and is killed), then the warm-load paths on a
# Llama-3-8B-shaped checkpoint (staged at several shapes, registered) beside the pread ceiling,
# the pinned-copy ceiling and safetensors, cold loads beside safetensors and `cat`, and the GPU
# tests with a time limit per test binary. (2026-12-02: the registered-nohugepage runs of that
# day's figures came from an experiment since removed: MADV_NOHUGEPAGE before registering
# halved the rate.)
# Builds nothing: carry .bin (bash scripts/gpu-check.sh --build here first).
#   device run (carry .bin):  bash scripts/device/register-probe.sh
set -uo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
exec > >(tee "$OUT/log.txt") 2>&1
export PYTHONUNBUFFERED=1 WEIGHTSMITH_REPO=$PWD WEIGHTSMITH_BIN=$PWD/.bin/weightsmith
T0=$(date +%s)
left() { echo $((${DEADLINE:-560} - ($(date +%s) - T0))); }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
uname -r; nproc
grep -E "MemTotal|MemFree|Cma|FileHuge|FilePmd|ShmemHuge" /proc/meminfo
awk '/^Node/{z=$4} /present/{p=$2} /managed/{print "zone", z, "present", p, "managed", $2}' /proc/zoneinfo
cat /sys/kernel/mm/transparent_hugepage/enabled 2>/dev/null
df -T /tmp . | tail -2

source scripts/device/lib.sh
echo "== registration on a shipped fixture"
F=fixtures/models/tiny-llama
REG=0; cat $F/*.safetensors > /dev/null
probe staged 20 .bin/weightsmith load $F --verify --no-register
probe registered 12 env WEIGHTSMITH_TRACE=1 .bin/weightsmith load $F --verify && REG=1
echo "REG=$REG"

echo "== 8B checkpoint"
W=/tmp/wsload; rm -rf "$W"; mkdir -p "$W"
timeout 150 python3 scripts/bench/make_synthetic.py "$W" --preset 8b --rank 4 > /dev/null || echo "make_synthetic failed"
M="$W/base"; ls -la "$M" | head -8
warm
timeout 60 python3 scripts/bench/pread_probe.py "$M" 1 8 16
timeout 60 python3 scripts/peers/load_peers.py "$M" pinned pinned-copy-ceiling
timeout 60 python3 scripts/peers/load_peers.py "$M" safetensors safetensors-warm
for i in 1 2; do LABEL=staged-w8-32MB-$i ours --no-register; done
for w in 12 16; do for mb in 32 64; do
  LABEL=staged-w$w-${mb}MB WEIGHTSMITH_STAGE_WORKERS=$w WEIGHTSMITH_STAGE_MB=$mb ours --no-register
done; done
LABEL=staged-w8-16MB WEIGHTSMITH_STAGE_MB=16 ours --no-register
if [ $REG = 1 ]; then for i in 1 2; do LABEL=registered-$i ours; done; fi
LABEL=staged-verify ours --no-register --verify
cold; LABEL=cold-staged-w8 ours --no-register
cold; LABEL=cold-staged-w16 WEIGHTSMITH_STAGE_WORKERS=16 ours --no-register
cold; timeout 60 python3 scripts/peers/load_peers.py "$M" safetensors safetensors-cold
cold; s=$(date +%s.%N); cat "$M"/*.safetensors > /dev/null; echo "cold cat: $(python3 -c "import sys; print(round(16.06/($(date +%s.%N)-$s),2))") GB/s"
rm -rf "$W"

echo "== gpu tests (registration as the probe found it works)"
[ $REG = 1 ] || export WEIGHTSMITH_NO_REGISTER=1
env | grep -E "^WEIGHTSMITH_NO_REGISTER" || echo "registration as built"
for t in .bin/tests/*; do
  n=$(left); [ "$n" -gt 15 ] || { echo "$(basename "$t"): skipped (time)"; continue; }
  timeout $((n < 90 ? n : 90)) "$t" --test-threads 1 > "/tmp/$(basename "$t").log" 2>&1; rc=$?
  echo "== $(basename "$t") rc=$rc"
  grep -E "test result|FAILED|panicked" "/tmp/$(basename "$t").log" | head -5
  [ $rc = 124 ] && tail -2 "/tmp/$(basename "$t").log"
done
echo "device-register-probe: done in $(($(date +%s) - T0)) s"
