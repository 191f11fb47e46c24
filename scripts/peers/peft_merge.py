"""The peer: PEFT's merge workflow (load, merge_and_unload, save_pretrained at 5GB shards).

    python3 scripts/peers/peft_merge.py BASE ADAPTER OUT DEVICE   (DEVICE: cpu or cuda)
"""

import json
import sys
import time

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

base, adapter, out, device = sys.argv[1:5]
t0 = time.time()
model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16, device_map=device)
t1 = time.time()
model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
if device == "cuda":
    torch.cuda.synchronize()
t2 = time.time()
model.save_pretrained(out, max_shard_size="5GB")
t3 = time.time()
print(json.dumps({"peft_device": device, "load_s": round(t1 - t0, 2), "merge_s": round(t2 - t1, 2),
                  "save_s": round(t3 - t2, 2), "total_s": round(t3 - t0, 2)}), flush=True)
