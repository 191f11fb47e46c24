"""Makes a Llama-shaped bf16 checkpoint with random weights and a PEFT LoRA adapter for it,
without torch (numpy + safetensors), fast enough for 16 GB on the device machine.

    python3 scripts/bench/make_synthetic.py OUT [--preset 8b|1b|tiny] [--rank 16] [--shard-gb 5]

Writes OUT/base (config.json, model-0000i-of-0000N.safetensors, index) and OUT/adapter
(adapter_config.json, adapter_model.safetensors: lora_A/lora_B for every linear layer, BF16,
B non-zero). Values come from one pool of normal(0, 0.02) numbers sliced at varying offsets.
"""

import argparse
import json
import os

import numpy as np

PRESETS = {
    "8b": dict(layers=32, hidden=4096, intermediate=14336, heads=32, kv_heads=8, vocab=128256),
    "1b": dict(layers=16, hidden=2048, intermediate=8192, heads=32, kv_heads=8, vocab=128256),
    "tiny": dict(layers=2, hidden=64, intermediate=128, heads=4, kv_heads=2, vocab=256),
}


def serialize_file(data, path, metadata):
    """Writes a safetensors file (the format is 8 bytes of header length, JSON, data)."""
    header, offset = {"__metadata__": metadata}, 0
    for name, t in data.items():
        n = len(t["data"])
        header[name] = {"dtype": t["dtype"], "shape": t["shape"], "data_offsets": [offset, offset + n]}
        offset += n
    text = json.dumps(header, separators=(",", ":"))
    text += " " * ((8 - len(text) % 8) % 8)
    with open(path, "wb") as fh:
        fh.write(len(text).to_bytes(8, "little"))
        fh.write(text.encode())
        for t in data.values():
            fh.write(t["data"])


def bf16_pool(n, seed):
    rng = np.random.default_rng(seed)
    f = (rng.standard_normal(n, dtype=np.float32) * 0.02).view(np.uint32)
    return ((f + 0x7FFF + ((f >> 16) & 1)) >> 16).astype(np.uint16)


class Source:
    def __init__(self, n, seed):
        self.pool = bf16_pool(n, seed)
        self.k = 0

    def take(self, count):
        self.k = (self.k * 7919 + 104729) % (len(self.pool) // 2)
        out = np.empty(count, dtype=np.uint16)
        done = 0
        while done < count:
            start = (self.k + done) % len(self.pool)
            n = min(count - done, len(self.pool) - start)
            out[done:done + n] = self.pool[start:start + n]
            done += n
        return out.tobytes()


def write_adapter(adapter, layers, linear, r):
    """An r-rank PEFT LoRA adapter (BF16, B non-zero) for every linear layer of `layers`
    Llama layers; `linear` maps "self_attn.q_proj" etc. to (out, in)."""
    os.makedirs(adapter, exist_ok=True)
    lsrc = Source(1 << 24, 2)
    data = {}
    for i in range(layers):
        for m, (out_f, in_f) in linear.items():
            key = f"base_model.model.model.layers.{i}.{m}"
            data[f"{key}.lora_A.weight"] = {"dtype": "BF16", "shape": [r, in_f], "data": lsrc.take(r * in_f)}
            data[f"{key}.lora_B.weight"] = {"dtype": "BF16", "shape": [out_f, r], "data": lsrc.take(out_f * r)}
    serialize_file(data, os.path.join(adapter, "adapter_model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(adapter, "adapter_config.json"), "w") as fh:
        json.dump({"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": 2 * r, "lora_dropout": 0.0,
                   "target_modules": sorted(m.split(".")[1] for m in linear), "bias": "none",
                   "fan_in_fan_out": False, "use_rslora": False, "use_dora": False, "inference_mode": True,
                   "base_model_name_or_path": "synthetic-llama"}, fh, indent=2)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--preset", default="8b", choices=PRESETS)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--shard-gb", type=float, default=5.0)
    a = ap.parse_args()
    p = PRESETS[a.preset]
    h, inter, heads, kvh, vocab = p["hidden"], p["intermediate"], p["heads"], p["kv_heads"], p["vocab"]
    hd = h // heads
    linear = {"self_attn.q_proj": (h, h), "self_attn.k_proj": (kvh * hd, h), "self_attn.v_proj": (kvh * hd, h),
              "self_attn.o_proj": (h, h), "mlp.gate_proj": (inter, h), "mlp.up_proj": (inter, h), "mlp.down_proj": (h, inter)}
    tensors = [("model.embed_tokens.weight", (vocab, h))]
    for i in range(p["layers"]):
        tensors.append((f"model.layers.{i}.input_layernorm.weight", (h,)))
        for m, shape in linear.items():
            tensors.append((f"model.layers.{i}.{m}.weight", shape))
        tensors.append((f"model.layers.{i}.post_attention_layernorm.weight", (h,)))
    tensors += [("model.norm.weight", (h,)), ("lm_head.weight", (vocab, h))]
    src = Source(min(1 << 28, 64 << 20 if a.preset == "tiny" else 1 << 28), 1)
    base = os.path.join(a.out, "base")
    os.makedirs(base, exist_ok=True)
    # Split like transformers: a new shard when the next tensor would pass the maximum.
    limit = int(a.shard_gb * 1e9)
    shards, cur, size = [], [], 0
    for name, shape in tensors:
        nbytes = int(np.prod(shape)) * 2
        if cur and size + nbytes > limit:
            shards.append(cur)
            cur, size = [], 0
        cur.append((name, shape))
        size += nbytes
    shards.append(cur)
    weight_map, total = {}, 0
    for k, shard in enumerate(shards):
        fname = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors" if len(shards) > 1 else "model.safetensors"
        data = {}
        for name, shape in shard:
            n = int(np.prod(shape))
            data[name] = {"dtype": "BF16", "shape": list(shape),
                          "data": np.full(n, 0x3F80, dtype=np.uint16).tobytes() if name.endswith("norm.weight") else src.take(n)}
            weight_map[name] = fname
            total += n * 2
        serialize_file(data, os.path.join(base, fname), metadata={"format": "pt"})
        del data
    if len(shards) > 1:
        with open(os.path.join(base, "model.safetensors.index.json"), "w") as fh:
            json.dump({"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, fh, indent=2)
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": h,
              "intermediate_size": inter, "num_hidden_layers": p["layers"], "num_attention_heads": heads,
              "num_key_value_heads": kvh, "head_dim": hd, "vocab_size": vocab, "max_position_embeddings": 8192,
              "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "tie_word_embeddings": False, "hidden_act": "silu",
              "torch_dtype": "bfloat16", "bos_token_id": 1, "eos_token_id": 2}
    with open(os.path.join(base, "config.json"), "w") as fh:
        json.dump(config, fh, indent=2)
    write_adapter(os.path.join(a.out, "adapter"), p["layers"], linear, a.rank)
    print(f"wrote {total / 1e9:.2f} GB in {len(shards)} shard(s) and an r={a.rank} adapter to {a.out}")


if __name__ == "__main__":
    main()
