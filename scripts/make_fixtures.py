"""Makes the small reference fixtures of weightsmith with the real libraries.

Run on a machine with torch, transformers and safetensors (the device machine):
    python3 scripts/make_fixtures.py OUT_DIR
It writes, under OUT_DIR:
  python/all-dtypes.safetensors   every dtype torch and safetensors share, a scalar, an empty
                                  tensor, written by safetensors.torch.save_file
  python/all-dtypes.json          manifest: name -> dtype, shape, sha256 of the bytes
  models/<name>/                  tiny models built from a config (no download) and saved with
                                  transformers' save_pretrained; tiny-llama is sharded
  models/<name>.manifest.json     manifest of every tensor of the saved model, read back with
                                  safetensors.safe_open, plus the expected placement units
  VERSIONS.json                   library versions used
Weights are random (seeded), so the fixtures are reproducible for the same library versions.
"""

import hashlib
import json
import os
import sys

import safetensors
import torch
import transformers
from safetensors import safe_open
from safetensors.torch import save_file

OUT = sys.argv[1]

ST_NAME = {
    torch.bool: "BOOL", torch.uint8: "U8", torch.int8: "I8", torch.int16: "I16",
    torch.int32: "I32", torch.int64: "I64", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.float32: "F32", torch.float64: "F64",
}
for attr, name in [("float8_e4m3fn", "F8_E4M3"), ("float8_e5m2", "F8_E5M2"),
                   ("float8_e8m0fnu", "F8_E8M0"), ("uint16", "U16"), ("uint32", "U32"),
                   ("uint64", "U64"), ("complex64", "C64")]:
    if hasattr(torch, attr):
        ST_NAME[getattr(torch, attr)] = name


def raw_bytes(t):
    t = t.detach().contiguous().reshape(-1)
    if t.numel() == 0:
        return b""
    if t.dtype == torch.complex64:
        t = torch.view_as_real(t).reshape(-1)
    return t.view(torch.uint8).numpy().tobytes()


def entry(t):
    return {"dtype": ST_NAME[t.dtype], "shape": list(t.shape),
            "sha256": hashlib.sha256(raw_bytes(t)).hexdigest()}


def all_dtypes():
    g = torch.Generator().manual_seed(1)
    tensors = {}
    for dtype, name in ST_NAME.items():
        if dtype == torch.bool:
            t = torch.rand(3, 5, generator=g) > 0.5
        elif dtype.is_floating_point or dtype.is_complex:
            base = torch.randn(4, 6, generator=g) * 3
            if dtype.is_complex:
                t = torch.complex(base, base * 2).to(dtype)
            elif name == "F8_E8M0":
                t = base.abs().add(0.01).to(dtype)
            else:
                t = base.to(dtype)
        else:
            t = torch.randint(0, 100, (2, 7), generator=g).to(dtype)
        tensors[f"t.{name.lower()}"] = t
    tensors["scalar.f32"] = torch.tensor(3.25)
    tensors["empty.bf16"] = torch.zeros(0, 4, dtype=torch.bfloat16)
    out = os.path.join(OUT, "python")
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, "all-dtypes.safetensors")
    save_file(tensors, path, metadata={"format": "pt", "made_by": "scripts/make_fixtures.py"})
    manifest = {"metadata": {"format": "pt", "made_by": "scripts/make_fixtures.py"}, "tensors": {}}
    with safe_open(path, framework="pt") as f:
        for k in f.keys():
            manifest["tensors"][k] = entry(f.get_tensor(k))
    with open(os.path.join(out, "all-dtypes.json"), "w") as fh:
        json.dump(manifest, fh, indent=1, sort_keys=True)


SMALL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=128, max_position_embeddings=64)

MODELS = {
    # name: (config class, model class, config kwargs, save kwargs, expected units)
    "tiny-llama": ("LlamaConfig", "LlamaForCausalLM",
                   dict(SMALL, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                        vocab_size=256, tie_word_embeddings=False),
                   dict(max_shard_size="100KB")),
    "tiny-mistral": ("MistralConfig", "MistralForCausalLM",
                     dict(SMALL, sliding_window=16, tie_word_embeddings=False), {}),
    "tiny-mixtral": ("MixtralConfig", "MixtralForCausalLM",
                     dict(SMALL, num_local_experts=2, num_experts_per_tok=1,
                          tie_word_embeddings=False), {}),
    "tiny-qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(SMALL, tie_word_embeddings=True), {}),
    "tiny-gemma": ("GemmaConfig", "GemmaForCausalLM", dict(SMALL, head_dim=8), {}),
    "tiny-phi3": ("Phi3Config", "Phi3ForCausalLM",
                  dict(SMALL, tie_word_embeddings=False, pad_token_id=0), {}),
    "tiny-gpt2": ("GPT2Config", "GPT2LMHeadModel",
                  dict(n_embd=32, n_layer=2, n_head=4, vocab_size=128, n_positions=64), {}),
}


def models():
    for name, (config_cls, model_cls, kwargs, save_kwargs) in MODELS.items():
        torch.manual_seed(len(name))
        config = getattr(transformers, config_cls)(**kwargs)
        model = getattr(transformers, model_cls)(config).to(torch.bfloat16).eval()
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0, 0.05)
        out = os.path.join(OUT, "models", name)
        model.save_pretrained(out, **save_kwargs)
        files = sorted(f for f in os.listdir(out) if f.endswith(".safetensors"))
        tensors = {}
        for fname in files:
            with safe_open(os.path.join(out, fname), framework="pt") as f:
                for k in f.keys():
                    e = entry(f.get_tensor(k))
                    e["file"] = fname
                    tensors[k] = e
        manifest = {"architecture": model_cls, "files": files,
                    "num_hidden_layers": model.config.num_hidden_layers,
                    "tie_word_embeddings": bool(getattr(model.config, "tie_word_embeddings", True)),
                    "tensors": tensors}
        with open(os.path.join(OUT, "models", name + ".manifest.json"), "w") as fh:
            json.dump(manifest, fh, indent=1, sort_keys=True)


def main():
    all_dtypes()
    models()
    with open(os.path.join(OUT, "VERSIONS.json"), "w") as fh:
        json.dump({"torch": torch.__version__, "transformers": transformers.__version__,
                   "safetensors": safetensors.__version__}, fh, indent=1)


if __name__ == "__main__":
    main()
