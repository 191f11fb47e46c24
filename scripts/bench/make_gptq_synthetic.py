"""Makes a Llama-3-8B-shaped GPTQ checkpoint (4-bit, group 128, AutoGPTQ layout, float16
scales; random codes, zeros and scales, float16 embedding, norms and head) and an r=16
all-linear LoRA adapter for it, with numpy only, for the GPTQ merge benchmark.

    python3 scripts/bench/make_gptq_synthetic.py OUT [--preset 8b|1b|tiny] [--rank 16]

Writes OUT/gptq (config.json with quantization_config, 4 shards, index) and OUT/adapter.
Random 32-bit words are valid packed codes for any bit width, so no quantiser is needed.
"""
import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from make_synthetic import PRESETS, serialize_file, write_adapter  # noqa: E402

BITS, GROUP = 4, 128


def f16_bytes(rng, n, lo, hi):
    return rng.uniform(lo, hi, n).astype(np.float16).tobytes()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--preset", default="8b", choices=PRESETS)
    ap.add_argument("--rank", type=int, default=16)
    a = ap.parse_args()
    p = PRESETS[a.preset]
    h, inter, heads, kvh, vocab = p["hidden"], p["intermediate"], p["heads"], p["kv_heads"], p["vocab"]
    hd = h // heads
    linear = {"self_attn.q_proj": (heads * hd, h), "self_attn.k_proj": (kvh * hd, h),
              "self_attn.v_proj": (kvh * hd, h), "self_attn.o_proj": (h, heads * hd),
              "mlp.gate_proj": (inter, h), "mlp.up_proj": (inter, h), "mlp.down_proj": (h, inter)}
    rng = np.random.default_rng(1)
    base = os.path.join(a.out, "gptq")
    os.makedirs(base, exist_ok=True)
    layers = p["layers"]
    per_shard = (layers + 3) // 4
    shards = [list(range(i, min(i + per_shard, layers))) for i in range(0, layers, per_shard)]
    n = len(shards)
    weight_map, total = {}, 0
    for s, ids in enumerate(shards):
        data = {}
        if s == 0:
            data["model.embed_tokens.weight"] = {"dtype": "F16", "shape": [vocab, h], "data": f16_bytes(rng, vocab * h, -0.05, 0.05)}
        for i in ids:
            for m, (out_f, in_f) in linear.items():
                key = f"model.layers.{i}.{m}"
                groups = -(-in_f // GROUP)
                data[f"{key}.qweight"] = {"dtype": "I32", "shape": [in_f * BITS // 32, out_f],
                                         "data": rng.integers(0, 2**32, in_f * BITS // 32 * out_f, dtype=np.uint32).tobytes()}
                data[f"{key}.qzeros"] = {"dtype": "I32", "shape": [groups, out_f * BITS // 32],
                                        "data": np.full(groups * out_f * BITS // 32, 0x77777777, dtype=np.uint32).tobytes()}
                data[f"{key}.scales"] = {"dtype": "F16", "shape": [groups, out_f], "data": f16_bytes(rng, groups * out_f, 0.001, 0.01)}
                data[f"{key}.g_idx"] = {"dtype": "I32", "shape": [in_f], "data": (np.arange(in_f, dtype=np.int32) // GROUP).tobytes()}
            for norm in ("input_layernorm", "post_attention_layernorm"):
                data[f"model.layers.{i}.{norm}.weight"] = {"dtype": "F16", "shape": [h], "data": np.ones(h, dtype=np.float16).tobytes()}
        if s == n - 1:
            data["model.norm.weight"] = {"dtype": "F16", "shape": [h], "data": np.ones(h, dtype=np.float16).tobytes()}
            data["lm_head.weight"] = {"dtype": "F16", "shape": [vocab, h], "data": f16_bytes(rng, vocab * h, -0.05, 0.05)}
        fname = f"model-{s + 1:05d}-of-{n:05d}.safetensors"
        for k, t in data.items():
            weight_map[k] = fname
            total += len(t["data"])
        serialize_file(data, os.path.join(base, fname), metadata={"format": "pt"})
        del data
    with open(os.path.join(base, "model.safetensors.index.json"), "w") as fh:
        json.dump({"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, fh, indent=2)
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": h,
              "intermediate_size": inter, "num_hidden_layers": layers, "num_attention_heads": heads,
              "num_key_value_heads": kvh, "head_dim": hd, "vocab_size": vocab, "max_position_embeddings": 8192,
              "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "tie_word_embeddings": False, "hidden_act": "silu",
              "torch_dtype": "float16", "bos_token_id": 1, "eos_token_id": 2,
              "quantization_config": {"quant_method": "gptq", "bits": BITS, "group_size": GROUP,
                                      "desc_act": False, "sym": True, "checkpoint_format": "gptq"}}
    with open(os.path.join(base, "config.json"), "w") as fh:
        json.dump(config, fh, indent=2)
    write_adapter(os.path.join(a.out, "adapter"), layers, linear, a.rank)
    print(f"wrote {total / 1e9:.2f} GB of GPTQ in {n} shard(s) and an r={a.rank} adapter to {a.out}")


if __name__ == "__main__":
    main()
