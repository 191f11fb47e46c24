"""The peers of `weightsmith load`, timed inside Python (imports excluded), GB/s printed as
JSON lines: safetensors.torch.load_file(device="cuda:0") over every shard, transformers
from_pretrained(device_map="cuda:0"), a plain pinned-memory copy of the same bytes (the
ceiling), and weightsmith's Python package (`weightsmith.load`: torch tensors on cuda:0,
zero-copy through DLPack; `weightsmith-transformers`: its transformers loader).

    python3 scripts/peers/load_peers.py MODEL_DIR safetensors|transformers|pinned|weightsmith|weightsmith-transformers LABEL
"""

import json
import os
import sys
import time

import torch

model, which, label = sys.argv[1:4]
files = sorted(os.path.join(model, f) for f in os.listdir(model) if f.endswith(".safetensors"))
total = sum(os.path.getsize(f) for f in files)
torch.cuda.init()
torch.empty(1, device="cuda:0")
torch.cuda.synchronize()
# Imports happen before the clock starts, for every peer alike: a program imports once.
if which == "safetensors":
    from safetensors.torch import load_file
elif which == "weightsmith":
    import weightsmith
elif which == "weightsmith-transformers":
    from weightsmith.transformers import from_pretrained
elif which == "transformers":
    from transformers import AutoModelForCausalLM
t0 = time.time()
if which == "safetensors":
    keep = [load_file(f, device="cuda:0") for f in files]
elif which == "weightsmith":
    keep = weightsmith.load(model, as_torch=True)
elif which == "weightsmith-transformers":
    keep = from_pretrained(model)
elif which == "transformers":
    keep = AutoModelForCausalLM.from_pretrained(model, dtype=torch.bfloat16, device_map="cuda:0")
else:
    chunk = 4 << 30
    host = torch.empty(chunk, dtype=torch.uint8, pin_memory=True)
    dev = torch.empty(chunk, dtype=torch.uint8, device="cuda:0")
    torch.cuda.synchronize()
    t0 = time.time()
    done = 0
    while done < total:
        n = min(chunk, total - done)
        dev[:n].copy_(host[:n], non_blocking=True)
        done += n
torch.cuda.synchronize()
dt = time.time() - t0
line = {"label": label, "seconds": round(dt, 3), "gb_per_s": round(total / dt / 1e9, 2)}
if which == "weightsmith":
    # The load as the library times it (plan, allocate, copy), and the files' paths: what
    # the Python layer (import, DLPack, torch.from_dlpack) adds is the difference.
    line["inside_seconds"] = round(weightsmith.load.last_report["seconds"], 3)
    line["copy_gb_per_s"] = round(weightsmith.load.last_report["gb_per_s"], 2)
    line["paths"] = sorted({p for _, p in weightsmith.load.last_report["files"]})
    line["phases"] = {k: round(v, 3) for k, v in weightsmith.load.last_report["phases"].items()}
print(json.dumps(line), flush=True)
