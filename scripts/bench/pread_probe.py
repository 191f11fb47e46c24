"""The host side of a warm load alone: how fast T threads `pread` page-cached shards into
their own buffers (no GPU), the ceiling of the staged path's reads on this machine.

    python3 scripts/bench/pread_probe.py MODEL_DIR [THREADS ...]   # default 1 4 8 16, 32 MiB reads
"""

import json
import os
import sys
import threading
import time

model = sys.argv[1]
counts = [int(t) for t in sys.argv[2:]] or [1, 4, 8, 16]
window = 32 << 20
files = sorted(os.path.join(model, f) for f in os.listdir(model) if f.endswith(".safetensors"))
jobs = []
for f in files:
    size = os.path.getsize(f)
    jobs += [(f, off, min(window, size - off)) for off in range(0, size, window)]
total = sum(n for _, _, n in jobs)
fds = {f: os.open(f, os.O_RDONLY) for f in files}
for threads in counts:
    lock = threading.Lock()
    queue = list(reversed(jobs))

    def worker():
        buf = bytearray(window)
        view = memoryview(buf)
        while True:
            with lock:
                if not queue:
                    return
                f, off, n = queue.pop()
            got = os.preadv(fds[f], [view[:n]], off)
            assert got == n, (f, off, got)

    pool = [threading.Thread(target=worker) for _ in range(threads)]
    t0 = time.perf_counter()
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    s = time.perf_counter() - t0
    print(json.dumps({"label": f"pread-{threads}-threads", "gb_per_s": round(total / s / 1e9, 2)}))
