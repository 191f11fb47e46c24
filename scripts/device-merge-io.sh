#!/usr/bin/env bash
# On the device machine, in one call: can the disk read and write at once, and does our merge
# make it do so? A Llama-3-8B-shaped bf16 base (16.06 GB) and an r=16 all-linear adapter.
#  1. The disk alone: a cold read of the base, a 16 GB write (buffered + fsync, and O_DIRECT),
#     and the read and the write at the same time.
#  2. Our merge, cold and warm page cache, CPU and CUDA, with .bin/weightsmith against
#     .bin/weightsmith-prev (another build, e.g. the previous commit), taking turns so that the
#     disk's slowing under sustained writes falls on both.
#  3. PEFT on the GPU (warm), for the ratio in the same call.
# Each run prints the disks' read/write GB/s second by second (scripts/diskrate.py) and its
# time and peak RSS (scripts/measure.py). PEFT=0 skips PEFT; ROUNDS=N sets the cold rounds.
#   cargo build --release -p weightsmith && cp target/release/weightsmith .bin/
#   (the other build as .bin/weightsmith-prev)
#   device run (carry .bin):  bash scripts/device-merge-io.sh
set -uo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
exec > >(tee "$OUT/log.txt") 2>&1
export PYTHONUNBUFFERED=1
W=${WORK:-/tmp/wsio}
rm -rf "$W"; mkdir -p "$W"
echo "cores $(nproc)"; free -g | head -2; df -h "$W" | tail -1
python3 scripts/make_synthetic.py "$W" --preset 8b --rank 16 > /dev/null
cold() { sync; echo 3 > /proc/sys/vm/drop_caches; }
warm() { cat "$W"/base/*.safetensors > /dev/null; }
run() { python3 scripts/diskrate.py "$1" -- python3 scripts/measure.py "$@"; }

cold; run disk-read-cold -- sh -c "cat $W/base/*.safetensors > /dev/null"
run disk-write-fsync -- dd if=/dev/zero of="$W/ddw" bs=64M count=240 conv=fsync status=none
rm -f "$W/ddw"; sync
run disk-write-direct -- dd if=/dev/zero of="$W/ddw" bs=64M count=240 oflag=direct status=none
rm -f "$W/ddw"; sync
cold
run disk-read+write -- sh -c "cat $W/base/*.safetensors > /dev/null & dd if=/dev/zero of=$W/ddw bs=64M count=240 oflag=direct status=none; wait"
rm -f "$W/ddw"; sync

merge() { # label binary device
  WEIGHTSMITH_TRACE=1 run "$1" -- "$2" merge --base "$W/base" --adapter "$W/adapter" --out "$W/out-$1" --device "$3" --force > /dev/null
  rm -rf "$W/out-$1"; sync
}
for round in $(seq 1 "${ROUNDS:-2}"); do
  if [ $((round % 2)) = 1 ]; then order="prev new"; else order="new prev"; fi
  for which in $order; do
    bin=.bin/weightsmith; [ "$which" = prev ] && bin=.bin/weightsmith-prev
    cold; merge "$which-cpu-cold-$round" "$bin" cpu
  done
done
for which in new prev; do
  bin=.bin/weightsmith; [ "$which" = prev ] && bin=.bin/weightsmith-prev
  cold; merge "$which-cuda-cold" "$bin" cuda:0
done
for which in prev new; do
  bin=.bin/weightsmith; [ "$which" = prev ] && bin=.bin/weightsmith-prev
  warm; merge "$which-cpu-warm" "$bin" cpu
  warm; merge "$which-cuda-warm" "$bin" cuda:0
done
if [ "${PEFT:-1}" = 1 ]; then
  warm; run peft-cuda-warm -- python3 scripts/peft_merge.py "$W/base" "$W/adapter" "$W/peft" cuda
fi
rm -rf "$W"
echo "device-merge-io: done"
