# Shell functions the device scripts share; `source scripts/device/lib.sh` after setting M (the
# checkpoint folder). Each prints what it measured; none stops the calling script on failure.
#   ours [load options]  `.bin/weightsmith load "$M"` (KV cache for 4096 tokens, EXTRA's options
#                        too) under a 60 s limit: one JSON line labelled $LABEL with seconds,
#                        copy GB/s, the paths the files took, tensors verified, and per device
#                        (device, allocated bytes, cuMemGetInfo delta)
#   probe LABEL S CMD…   runs CMD; still running after S seconds: each thread's kernel stack,
#                        then kill -9 (a load that never returns shows where it waits)
#   cold / warm          drop the page cache (root) / read the shards into it

cold() { sync; echo 3 > /proc/sys/vm/drop_caches; }
warm() { cat "$M"/*.safetensors > /dev/null; }

ours() {
  timeout 60 .bin/weightsmith load "$M" --cache-seq-len 4096 --json ${EXTRA:-} "$@" > /tmp/ours.json 2> /tmp/ours.err \
    && python3 -c "
import json, sys
r = json.load(open('/tmp/ours.json'))
print(json.dumps({'label': sys.argv[1], 'seconds': round(r['seconds'], 3), 'copy_gb_per_s': round(r['gb_per_s'], 2),
                  'files': sorted(set(p for _, p in r['files'])), 'verified': r['verified_tensors'],
                  'devices': [(d['device'], d['allocated_bytes'], d['mem_info_delta_bytes']) for d in r['devices']]}))
" "${LABEL:-ours}" \
    || { echo "${LABEL:-ours}: failed or timed out"; tail -2 /tmp/ours.err; }
}

probe() {
  local label=$1 secs=$2; shift 2
  "$@" > /tmp/probe.out 2>&1 &
  local pid=$! i
  for ((i = 0; i < secs * 4; i++)); do sleep 0.25; kill -0 $pid 2>/dev/null || break; done
  if kill -0 $pid 2>/dev/null; then
    echo "$label: STILL RUNNING after $secs s"
    for t in /proc/$pid/task/*; do
      echo "  $(cat "$t/comm" 2>/dev/null) [$(cat "$t/wchan" 2>/dev/null)]: $(head -8 "$t/stack" 2>/dev/null | tr '\n' ' ')"
    done
    kill -9 $pid; wait $pid 2>/dev/null
    tail -8 /tmp/probe.out
    return 1
  fi
  wait $pid; local rc=$?
  echo "$label: rc=$rc"; tail -4 /tmp/probe.out
  return $rc
}
