#!/usr/bin/env bash
# On the device machine, in one call: can the disk read and write at once, and does our merge
# make it do so? A Llama-3-8B-shaped bf16 base (16.06 GB; PRESET=1b for a smaller one) and an
# r=16 all-linear adapter.
#  1. The disk alone: a cold read of the base, a write of as many bytes (buffered + fsync, and O_DIRECT),
#     and the read and the write at the same time.
#  2. Our merge, cold and warm page cache, CPU and CUDA (MODES), with each build in BINS
#     ("name:path ...", default .bin/weightsmith against .bin/weightsmith-prev, e.g. the
#     previous commit's), taking turns so that the disk's slowing under sustained writes falls
#     on all.
#  3. PEFT on the GPU (warm), for the ratio in the same call.
# Each run prints the disks' read/write GB/s second by second (scripts/bench/diskrate.py) and its
# time and peak RSS (scripts/bench/measure.py). PEFT=0 skips PEFT, DISK=0 the disk runs; ROUNDS=N
# sets the rounds (2).
#   cargo build --release -p weightsmith && cp target/release/weightsmith .bin/
#   (the other build as .bin/weightsmith-prev)
#   device run (carry .bin):  bash scripts/device/merge-io.sh
set -uo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
exec > >(tee "$OUT/log.txt") 2>&1
export PYTHONUNBUFFERED=1
W=${WORK:-/tmp/wsio}
rm -rf "$W"; mkdir -p "$W"
echo "cores $(nproc)"; free -g | head -2; df -h "$W" | tail -1
python3 scripts/bench/make_synthetic.py "$W" --preset "${PRESET:-8b}" --rank 16 > /dev/null
# The disk runs write as many bytes as the base holds, in 64 MiB blocks.
blocks=$(( ($(du -cb "$W"/base/*.safetensors | tail -1 | cut -f1) + (64 << 20) - 1) / (64 << 20) ))
cold() { sync; echo 3 > /proc/sys/vm/drop_caches; }
warm() { cat "$W"/base/*.safetensors > /dev/null; }
run() { python3 scripts/bench/diskrate.py "$1" -- python3 scripts/bench/measure.py "$@"; }

if [ "${DISK:-1}" = 1 ]; then
cold; run disk-read-cold -- sh -c "cat $W/base/*.safetensors > /dev/null"
run disk-write-fsync -- dd if=/dev/zero of="$W/ddw" bs=64M count=$blocks conv=fsync status=none
rm -f "$W/ddw"; sync
run disk-write-direct -- dd if=/dev/zero of="$W/ddw" bs=64M count=$blocks oflag=direct status=none
rm -f "$W/ddw"; sync
cold
run disk-read+write -- sh -c "cat $W/base/*.safetensors > /dev/null & dd if=/dev/zero of=$W/ddw bs=64M count=$blocks oflag=direct status=none; wait"
rm -f "$W/ddw"; sync
fi

merge() { # label binary device
  # The merge's report goes to /dev/null, the measurements (stdout of run) stay.
  WEIGHTSMITH_TRACE=1 run "$1" -- sh -c "exec $2 merge --base $W/base --adapter $W/adapter --out $W/out-$1 --device $3 --force > /dev/null"
  rm -rf "$W/out-$1"; sync
}
# Every mode, every build, ROUNDS times; the builds' order turns each round.
read -r -a bins <<< "${BINS:-new:.bin/weightsmith prev:.bin/weightsmith-prev}"
for round in $(seq 1 "${ROUNDS:-2}"); do
  for mode in ${MODES:-cpu-cold cuda-cold cpu-warm cuda-warm}; do
    device=cpu; [ "${mode%-*}" = cuda ] && device=cuda:0
    n=${#bins[@]}
    for i in $(seq 0 $((n - 1))); do
      entry=${bins[$(((i + round - 1) % n))]}
      if [ "${mode#*-}" = cold ]; then cold; else warm; fi
      merge "${entry%%:*}-$mode-$round" "${entry#*:}" "$device"
    done
  done
done
if [ "${PEFT:-1}" = 1 ]; then
  warm; run peft-cuda-warm -- python3 scripts/peers/peft_merge.py "$W/base" "$W/adapter" "$W/peft" cuda
fi
rm -rf "$W"
echo "device-merge-io: done"
