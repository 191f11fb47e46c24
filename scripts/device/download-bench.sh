#!/usr/bin/env bash
# Hub downloads and header-only plans on loopback, ours against huggingface_hub in the same run,
# from the same Hub-compatible server program (tests/src/bin/hub-server.rs, files in memory):
#   - a multi-GB synthetic checkpoint into a fresh cache: hub_publish::download (what `load` and
#     `merge` do for a Hub id; examples/download.rs) against huggingface_hub.snapshot_download
#     (HF_HUB_DISABLE_XET=1, its default 8 workers);
#   - a Llama-3.1-405B-shaped repository (191 shards, headers only): `weightsmith plan` against
#     huggingface_hub.get_safetensors_metadata, with the bytes each read.
# It measures the clients (requests, hashing, writing the cache), not a network.
#   here:   bash scripts/device/download-bench.sh --build       # .bin/{weightsmith,hub-server,download}
#   device run (carry .carry with .bin packed, or .bin):  bash scripts/device/download-bench.sh
# PRESET (1b: 3 GB) and RUNS (3) as in publish-bench.sh. Results: $OUT/download-bench.txt.
set -euo pipefail
cd "$(dirname "$0")/../.."
if [ "${1:-}" = "--build" ]; then
  cargo build --release -p weightsmith --bin weightsmith
  cargo build --release -p weightsmith-tests --bin hub-server
  cargo build --release -p hub-publish --example download
  mkdir -p .bin && cp target/release/weightsmith target/release/hub-server target/release/examples/download .bin/
  strip .bin/weightsmith .bin/hub-server .bin/download
  exit 0
fi
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
exec > >(tee "$OUT/download-bench.txt") 2>&1
PRESET=${PRESET:-1b}
RUNS=${RUNS:-3}
WORK=${WORK:-/tmp/weightsmith-download-bench}
mkdir -p "$WORK"
[ -f "$WORK/$PRESET/base/config.json" ] || python3 scripts/bench/make_synthetic.py "$WORK/$PRESET" --preset "$PRESET" --shard-gb 2
MODEL="$WORK/$PRESET/base"
BYTES=$(du -sbL "$MODEL" | cut -f1)
echo "model: $BYTES bytes in $(ls "$MODEL" | wc -l) files; $(nproc) cores"
coproc SRV { .bin/hub-server --serve bench/model="$MODEL" --llama-shaped bench/405b=405b 2> "$WORK/server.err"; }
read -r EP <&"${SRV[0]}"
export HF_ENDPOINT=$EP HF_HUB_DISABLE_XET=1 HF_HUB_DISABLE_PROGRESS_BARS=1 HF_HUB_DISABLE_TELEMETRY=1
unset HF_TOKEN HF_HUB_OFFLINE || true
secs() { python3 -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.3f}')" "$1" "$2"; }
declare -a ours py plan_ours plan_py
for n in $(seq 1 "$RUNS"); do
  rm -rf "$WORK/cache-ours" "$WORK/cache-py"
  t0=$(date +%s.%N); HF_HUB_CACHE="$WORK/cache-ours" .bin/download bench/model > "$WORK/ours.txt"; t1=$(date +%s.%N)
  ours+=("$(secs "$t0" "$t1")")
  t0=$(date +%s.%N)
  HF_HUB_CACHE="$WORK/cache-py" python3 -c "from huggingface_hub import snapshot_download; snapshot_download('bench/model')" > /dev/null
  t1=$(date +%s.%N)
  py+=("$(secs "$t0" "$t1")")
  cmp <(cd "$WORK/cache-ours/models--bench--model/snapshots"/*/ && sha256sum -- * | sort) \
      <(cd "$WORK/cache-py/models--bench--model/snapshots"/*/ && sha256sum -- * | sort) > /dev/null \
    || echo "run $n: the two caches differ!"
  echo "run $n: download ours ${ours[-1]} s, huggingface_hub ${py[-1]} s"
  t0=$(date +%s.%N)
  HF_HUB_CACHE="$WORK/cache-plan" .bin/weightsmith plan bench/405b --devices 141GiB,141GiB,141GiB,141GiB,141GiB,141GiB,141GiB,141GiB --cache-seq-len 8192 --json > "$WORK/plan.json"
  t1=$(date +%s.%N); plan_ours+=("$(secs "$t0" "$t1")")
  t0=$(date +%s.%N)
  HF_HUB_CACHE="$WORK/cache-plan" python3 -c "from huggingface_hub import get_safetensors_metadata; m = get_safetensors_metadata('bench/405b'); print(len(m.files_metadata))" > /dev/null
  t1=$(date +%s.%N); plan_py+=("$(secs "$t0" "$t1")")
  echo "run $n: 405B-shaped header-only plan ours ${plan_ours[-1]} s, get_safetensors_metadata ${plan_py[-1]} s"
done
exec {SRV[1]}>&-
wait "$SRV_PID" 2>/dev/null || true
cat "$WORK/server.err"
python3 - "$BYTES" "${ours[*]}" "${py[*]}" "${plan_ours[*]}" "${plan_py[*]}" <<'PY'
import sys, statistics as st
b = int(sys.argv[1]); f = lambda s: [float(x) for x in s.split()]
o, p, po, pp = (st.median(f(a)) for a in sys.argv[2:6])
print(f"median download: ours {o:.2f} s ({b/o/1e9:.2f} GB/s), huggingface_hub {p:.2f} s ({b/p/1e9:.2f} GB/s); ours/peer time {o/p:.2f}")
print(f"median 405B-shaped plan from headers: ours {po:.2f} s, get_safetensors_metadata {pp:.2f} s; ours/peer time {po/pp:.2f}")
PY
rm -rf "$WORK/cache-ours" "$WORK/cache-py" "$WORK/cache-plan"
