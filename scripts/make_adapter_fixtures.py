"""Makes PEFT adapter fixtures and PEFT's own merges of them, the references of `weightsmith merge`.

Run on a machine with torch, transformers, peft and tokenizers (the device machine), after
scripts/make_fixtures.py made the base models:
    python3 scripts/make_adapter_fixtures.py FIXTURES_DIR
It adds a tiny tokenizer (tokenizer.json, tokenizer_config.json with a chat template,
special_tokens_map.json) to FIXTURES_DIR/models/tiny-llama, and writes under
FIXTURES_DIR/adapters/<name>/:
  adapter/     what peft's save_pretrained wrote (adapter_config.json, adapter_model.safetensors)
  merged/      peft's merge_and_unload() + save_pretrained of the merged model (the reference)
  case.json    base, adapters with weights, dtype, and what each case covers
Adapters are trained by nothing: every trainable tensor (A, B, DoRA magnitudes, saved modules)
gets seeded random noise so every delta is non-zero.
"""

import json
import os
import shutil
import sys

import peft
import torch
import transformers
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

FX = sys.argv[1]
MODELS = os.path.join(FX, "models")


def add_tokenizer(model_dir):
    from tokenizers import Tokenizer, models, pre_tokenizers
    vocab = {f"t{i}": i for i in range(250)}
    vocab.update({"<unk>": 250, "<s>": 251, "</s>": 252, "<pad>": 253})
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    fast.chat_template = "{% for m in messages %}<s> {{ m['content'] }} </s>{% endfor %}"
    fast.save_pretrained(model_dir)


def perturb(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                noise = torch.randn(p.shape, generator=g, dtype=torch.float32) * 0.05
                p.add_(noise.to(p.dtype))


def make(name, base, configs, weights=None, dtype=torch.bfloat16, covers="", merged_shard="100KB"):
    """configs: list of (adapter_name, LoraConfig, seed)."""
    out = os.path.join(FX, "adapters", name)
    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(out)
    base_dir = os.path.join(MODELS, base)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=dtype)
    first, config, seed = configs[0]
    pm = get_peft_model(model, config, adapter_name=first)
    perturb(pm, seed)
    adapter_dirs = []
    pm.save_pretrained(os.path.join(out, "adapter"), selected_adapters=[first])
    adapter_dirs.append("adapter")
    # peft saves non-default adapter names in a subfolder; keep one folder per adapter.
    if first != "default":
        shutil.move(os.path.join(out, "adapter", first), os.path.join(out, "adapter.tmp"))
        shutil.rmtree(os.path.join(out, "adapter"))
        shutil.move(os.path.join(out, "adapter.tmp"), os.path.join(out, "adapter"))
    for i, (aname, cfg, s) in enumerate(configs[1:], start=2):
        pm.add_adapter(aname, cfg)
        pm.set_adapter(aname)
        perturb(pm, s)
        d = os.path.join(out, f"adapter{i}")
        pm.save_pretrained(d, selected_adapters=[aname])
        shutil.move(os.path.join(d, aname), d + ".tmp")
        shutil.rmtree(d)
        shutil.move(d + ".tmp", d)
        adapter_dirs.append(f"adapter{i}")
    if len(configs) > 1:
        names = [c[0] for c in configs]
        pm.add_weighted_adapter(names, weights, adapter_name="combined", combination_type="cat")
        pm.set_adapter("combined")
        for n in names:
            pm.delete_adapter(n)
    merged = pm.merge_and_unload()
    merged.save_pretrained(os.path.join(out, "merged"), max_shard_size=merged_shard)
    tok_files = [f for f in os.listdir(base_dir) if f.startswith(("tokenizer", "special_tokens"))]
    for f in tok_files:
        shutil.copy(os.path.join(base_dir, f), os.path.join(out, "merged", f))
    case = {"base": f"models/{base}", "adapters": adapter_dirs,
            "weights": weights or [1.0], "dtype": str(dtype).replace("torch.", ""), "covers": covers}
    with open(os.path.join(out, "case.json"), "w") as fh:
        json.dump(case, fh, indent=1)
    from safetensors import safe_open
    keys = []
    for d in adapter_dirs:
        with safe_open(os.path.join(out, d, "adapter_model.safetensors"), "pt") as f:
            keys += [(k, list(f.get_slice(k).get_shape())) for k in f.keys()]
    print(name, "keys:", keys[:8], "...", len(keys))


def main():
    add_tokenizer(os.path.join(MODELS, "tiny-llama"))
    all_linear = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    make("llama-lora", "tiny-llama",
         [("default", LoraConfig(r=8, lora_alpha=16, target_modules=all_linear, init_lora_weights=False), 11)],
         covers="plain LoRA, every linear layer, sharded bf16 base")
    make("llama-rslora-f16", "tiny-llama",
         [("default", LoraConfig(r=8, lora_alpha=8, use_rslora=True,
                                 target_modules=r".*\.(q_proj|v_proj|down_proj)",
                                 rank_pattern={"q_proj": 4, "layers.1.mlp.down_proj": 16},
                                 alpha_pattern={"v_proj": 32}, init_lora_weights=False), 12)],
         dtype=torch.float16, covers="rsLoRA, regex target_modules, rank_pattern, alpha_pattern, f16")
    make("gpt2-fan-in-fan-out", "tiny-gpt2",
         [("default", LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj", "c_fc"],
                                 fan_in_fan_out=True, init_lora_weights=False), 13)],
         covers="GPT-2 Conv1D weights stored transposed (fan_in_fan_out)")
    make("llama-dora", "tiny-llama",
         [("default", LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"],
                                 use_dora=True, init_lora_weights=False), 14)],
         covers="DoRA magnitude vectors")
    make("llama-embedding-mts", "tiny-llama",
         [("default", LoraConfig(r=8, lora_alpha=16, target_modules=["embed_tokens", "q_proj"],
                                 modules_to_save=["lm_head"], init_lora_weights=False), 15)],
         covers="embedding LoRA, modules_to_save of the head")
    make("qwen2-tied-bias", "tiny-qwen2",
         [("default", LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj"],
                                 lora_bias=True, init_lora_weights=False), 16)],
         covers="tied embeddings, base biases, LoRA bias")
    make("llama-two-weighted", "tiny-llama",
         [("a", LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "o_proj"], init_lora_weights=False), 17),
          ("b", LoraConfig(r=4, lora_alpha=4, target_modules=["q_proj", "up_proj"], init_lora_weights=False), 18)],
         weights=[1.0, 0.5], covers="two adapters with weights 1.0 and 0.5 (weighted sum of deltas)")
    with open(os.path.join(FX, "adapters", "VERSIONS.json"), "w") as fh:
        json.dump({"torch": torch.__version__, "transformers": transformers.__version__,
                   "peft": peft.__version__}, fh, indent=1)


if __name__ == "__main__":
    main()
