"""Compares two merged checkpoints: every tensor (ulps at the scale of max(|a|, |b|, |base|)
on the GPU) and transformers' logits on a fixed prompt.

    python3 scripts/device/compare_merged.py OURS PEFT BASE
"""

import json
import os
import sys

import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

ours, peft_dir, base = sys.argv[1:4]


def tensors(d):
    out = {}
    for f in sorted(os.listdir(d)):
        if f.endswith(".safetensors"):
            h = safe_open(os.path.join(d, f), "pt")
            out.update({k: (h, k) for k in h.keys()})
    return out


a, b, w = tensors(ours), tensors(peft_dir), tensors(base)
assert sorted(a) == sorted(b), "different tensor names"
worst, differ, total = 0.0, 0, 0
for k in a:
    x = a[k][0].get_tensor(k).cuda().float()
    y = b[k][0].get_tensor(k).cuda().float()
    z = w[k][0].get_tensor(k).cuda().float() if k in w else torch.zeros_like(x)
    scale = torch.maximum(torch.maximum(x.abs(), y.abs()), z.abs()).clamp_min(2.0 ** -126)
    ulp = torch.exp2(torch.floor(torch.log2(scale)) - 7)
    worst = max(worst, float(((x - y).abs() / ulp).max()))
    differ += int((x != y).sum())
    total += x.numel()
ids = torch.arange(1, 33).reshape(1, 32).cuda()
logits = []
for d in (ours, peft_dir):
    m = AutoModelForCausalLM.from_pretrained(d, dtype=torch.bfloat16, device_map="cuda").eval()
    with torch.no_grad():
        logits.append(m(ids).logits.float())
    del m
    torch.cuda.empty_cache()
diff = (logits[0] - logits[1]).abs()
print(json.dumps({"tensors": len(a), "elements": total, "elements_differing": differ,
                  "max_ulps_at_scale": worst, "logits_max_abs_diff": float(diff.max()),
                  "logits_mean_abs_diff": float(diff.mean()),
                  "logits_scale": float(logits[1].abs().mean()),
                  "argmax_agreement": float((logits[0].argmax(-1) == logits[1].argmax(-1)).float().mean())}), flush=True)
