#!/usr/bin/env bash
# Publish benchmark on loopback: `weightsmith publish` against the official Python client
# (`huggingface_hub.HfApi.upload_folder`, LFS path with HF_HUB_DISABLE_XET=1) uploading the same
# synthetic Llama-shaped checkpoint to the same Hub-compatible server program
# (tests/src/bin/hub-server.rs), a fresh server per run so nothing is deduplicated.
# It measures the client side (hashing, preupload, LFS transfer, commit), not a network.
#
#   bash scripts/bench/publish-bench.sh            # PRESET=1b (3 GB), RUNS=3, TRANSFER=basic
#   PRESET=tiny RUNS=1 bash scripts/bench/publish-bench.sh
#   TRANSFER=multipart CHUNK=67108864 bash scripts/bench/publish-bench.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
PRESET=${PRESET:-1b}
RUNS=${RUNS:-3}
TRANSFER=${TRANSFER:-basic}
CHUNK=${CHUNK:-67108864}
WORK=${WORK:-/tmp/weightsmith-publish-bench}
BIN=${WEIGHTSMITH_BIN:-target/release/weightsmith}
SERVER=${HUB_SERVER_BIN:-target/release/hub-server}

if [[ -z "${WEIGHTSMITH_BIN:-}" ]]; then
  cargo build --quiet --release -p weightsmith --bin weightsmith
  cargo build --quiet --release -p weightsmith-tests --bin hub-server
fi
python3 -c "import numpy, safetensors, huggingface_hub" 2>/dev/null \
  || python3 -m pip install --quiet numpy safetensors huggingface_hub

mkdir -p "$WORK"
if [[ ! -f "$WORK/$PRESET/base/config.json" ]]; then
  python3 scripts/bench/make_synthetic.py "$WORK/$PRESET" --preset "$PRESET" --shard-gb 2
fi
MODEL="$WORK/$PRESET/base"
BYTES=$(du -sb "$MODEL" | cut -f1)
server_args=(--token hf_bench)
[[ "$TRANSFER" == multipart ]] && server_args+=(--multipart "$CHUNK")
echo "model: $MODEL, $BYTES bytes, transfer $TRANSFER, $(nproc) cores"

run_one() { # $1 = ours|python, $2 = run number; prints seconds
  local who=$1 n=$2 ep t0 t1
  coproc SRV { "$SERVER" "${server_args[@]}" 2>/dev/null; }
  read -r ep <&"${SRV[0]}"
  t0=$(date +%s.%N)
  if [[ $who == ours ]]; then
    "$BIN" publish "$MODEL" --repo "bench/ours$n" --endpoint "$ep" --token hf_bench > /dev/null
  else
    HF_HUB_DISABLE_XET=1 HF_HUB_DISABLE_PROGRESS_BARS=1 python3 - "$ep" "$MODEL" "bench/py$n" <<'PY'
import sys
from huggingface_hub import HfApi
api = HfApi(endpoint=sys.argv[1], token="hf_bench")
api.create_repo(sys.argv[3], exist_ok=True)
api.upload_folder(folder_path=sys.argv[2], repo_id=sys.argv[3], commit_message="bench")
PY
  fi
  t1=$(date +%s.%N)
  exec {SRV[1]}>&-
  wait "$SRV_PID" 2>/dev/null || true
  python3 -c "print(f'{$t1-$t0:.3f}')"
}

declare -a ours py
for n in $(seq 1 "$RUNS"); do
  # Warm page cache for both: the first read of each run comes from memory.
  cat "$MODEL"/*.safetensors > /dev/null
  ours+=("$(run_one ours "$n")")
  py+=("$(run_one python "$n")")
  echo "run $n: ours ${ours[-1]} s, huggingface_hub ${py[-1]} s"
done
python3 - "$BYTES" "${ours[*]}" "${py[*]}" <<'PY'
import sys, statistics as st
b = int(sys.argv[1]); o = [float(x) for x in sys.argv[2].split()]; p = [float(x) for x in sys.argv[3].split()]
mo, mp = st.median(o), st.median(p)
print(f"median: weightsmith publish {mo:.2f} s ({b/mo/1e9:.2f} GB/s), huggingface_hub upload_folder {mp:.2f} s ({b/mp/1e9:.2f} GB/s); ours/peer time ratio {mo/mp:.2f}")
PY
