"""The peer workflow for merging a LoRA into a GPTQ model, in torch on one device: load each
shard, dequantise every GPTQ layer with AutoGPTQ's own torch formula (qlinear_cuda_old.py:
shifts and masks, zeros + 1, float16 `scales * (weight - zeros)`), add `alpha/r · B @ A`, and
save float16 shards with safetensors (what `auto_gptq`/`optimum` dequantise-then-merge
scripts do; PEFT's merge_and_unload refuses GPTQ layers).

    python3 scripts/peers/gptq_peer.py GPTQ_DIR ADAPTER_DIR OUT_DIR [cuda|cpu]
"""
import json
import os
import sys
import time

import torch
from safetensors.torch import load_file, save_file


def dequant(qweight, qzeros, scales, g_idx, bits):
    wf = torch.arange(0, 32, bits, dtype=torch.int32, device=qweight.device)
    zeros = torch.bitwise_right_shift(qzeros.unsqueeze(2).expand(-1, -1, 32 // bits), wf.view(1, 1, -1))
    zeros = (torch.bitwise_and(zeros, 2**bits - 1) + 1).reshape(qzeros.shape[0], -1)
    weight = torch.bitwise_right_shift(qweight.unsqueeze(1).expand(-1, 32 // bits, -1), wf.view(1, -1, 1))
    weight = torch.bitwise_and(weight, 2**bits - 1).reshape(-1, qweight.shape[1])
    g = g_idx.long()
    return (scales[g] * (weight - zeros[g]).half()).t()


def main():
    base, adapter, out, device = sys.argv[1], sys.argv[2], sys.argv[3], (sys.argv[4] if len(sys.argv) > 4 else "cuda")
    started = time.time()
    cfg = json.load(open(os.path.join(adapter, "adapter_config.json")))
    scale = cfg["lora_alpha"] / cfg["r"]
    bits = json.load(open(os.path.join(base, "config.json")))["quantization_config"]["bits"]
    lora = load_file(os.path.join(adapter, "adapter_model.safetensors"), device=device)
    os.makedirs(out, exist_ok=True)
    for f in sorted(os.listdir(base)):
        if not f.endswith(".safetensors"):
            continue
        t = load_file(os.path.join(base, f), device=device)
        result = {}
        for k in list(t):
            if k.endswith(".qweight"):
                m = k[: -len(".qweight")]
                w = dequant(t[k], t[m + ".qzeros"], t[m + ".scales"], t[m + ".g_idx"], bits).float()
                a = lora.get(f"base_model.model.{m}.lora_A.weight")
                if a is not None:
                    b = lora[f"base_model.model.{m}.lora_B.weight"]
                    w += scale * (b.float() @ a.float())
                result[m + ".weight"] = w.half().contiguous()
            elif not k.endswith((".qzeros", ".scales", ".g_idx")):
                result[k] = t[k]
        del t
        save_file({k: v.cpu() for k, v in result.items()}, os.path.join(out, f), metadata={"format": "pt"})
        del result
    print(f"peer: {time.time() - started:.2f} s in process")


if __name__ == "__main__":
    main()
