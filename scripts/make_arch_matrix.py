"""The architecture matrix: for every decoder-only architecture in CASES, a tiny random model built
by transformers from its own config class (no download), an all-linear LoRA made by PEFT (with the
`target_parameters` PEFT adds for fused MoE experts), PEFT's own merge_and_unload output, PEFT's
logits, and what transformers itself says about the architecture's tensors.

Run with torch, transformers and peft (the device machine, or `python3 -m venv /tmp/ref &&
/tmp/ref/bin/pip install torch transformers==5.17.0 peft==0.21.0` on the CPU):
    python3 scripts/make_arch_matrix.py fixtures/matrix [model_type ...]
It writes, under fixtures/matrix/:
  <model_type>/base/      the tiny model as save_pretrained writes it (plus a tiny tokenizer)
  <model_type>/adapter/   PEFT's save_pretrained of the LoRA
  <model_type>/merged/    PEFT's merge_and_unload().save_pretrained (plus the tokenizer files,
                          as a user copies them), the reference our merge must match
  <model_type>/case.json  the model class, what the case covers, the in-memory state_dict keys,
                          the input ids and where PEFT's logits are
  <model_type>/logits.safetensors   PEFT's logits (PeftModel before merging, eager attention)
  architectures.json      per model_type, what transformers itself tells (see `describe`); it is
                          embedded by st-io (crates/st-io/src/architectures.json) as the
                          architecture knowledge of completeness checks and expert conversion
  VERSIONS.json           library versions used
"""

import bisect
import json
import os
import shutil
import sys
import tempfile

# PEFT writes target_modules from a set: a fixed hash seed keeps its order, and so the
# committed files, the same from run to run.
if os.environ.get("PYTHONHASHSEED") != "0":
    os.environ["PYTHONHASHSEED"] = "0"
    os.execv(sys.executable, [sys.executable] + sys.argv)

import peft
import torch
import transformers
from peft import LoraConfig, get_peft_model
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoConfig, AutoModelForCausalLM

OUT = sys.argv[1]
ONLY = set(sys.argv[2:])

# Applied where the architecture's own config class has the field.
COMMON = dict(
    num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=4,
    num_key_value_heads=2, head_dim=8, vocab_size=256, max_position_embeddings=128,
    n_layer=2, n_embd=32, n_head=4, n_positions=128, n_inner=64, n_ctx=128,
    num_layers=2, ffn_hidden_size=64, ffn_dim=64, d_model=32, n_heads=4,
    num_local_experts=4, num_experts=4, n_routed_experts=4, num_experts_per_tok=2,
    moe_intermediate_size=32, shared_expert_intermediate_size=32, n_shared_experts=1,
    moe_num_experts=4, moe_k=2, moe_num_shared_experts=1,
    sliding_window=16, rotary_dim=4, pad_token_id=0, bos_token_id=1, eos_token_id=2,
)

# model_type: (overrides, what the case covers)
CASES = {
    "llama": ({}, "RoPE, GQA, SwiGLU"),
    "mistral": ({}, "sliding window"),
    "ministral": ({}, "sliding window layers"),
    "qwen2": ({"tie_word_embeddings": True}, "q/k/v biases, tied embeddings"),
    "qwen3": ({}, "QK-norm"),
    "gemma": ({}, "tied embeddings, scaled embedding"),
    "gemma2": ({}, "soft-capping, sliding/global layers, sandwich norms"),
    "gemma3_text": ({}, "QK-norm, sliding/global layers, soft-capping fields"),
    "phi": ({"partial_rotary_factor": 0.5}, "parallel residual, dense/fc1/fc2, biases"),
    "phi3": ({}, "fused qkv_proj and gate_up_proj"),
    "gpt2": ({}, "learned position embeddings, Conv1D (fan_in_fan_out), fused c_attn"),
    "gpt_bigcode": ({}, "learned position embeddings, multi-query fused c_attn"),
    "gpt_neox": ({"rotary_pct": 0.5}, "parallel residual, fused query_key_value"),
    "gptj": ({"rotary_dim": 4}, "parallel residual, untied head with bias"),
    "opt": ({"word_embed_proj_dim": 32}, "learned position embeddings (offset 2), fc1/fc2"),
    "bloom": ({}, "ALiBi, fused query_key_value, word_embeddings_layernorm"),
    "falcon": ({"new_decoder_architecture": False, "multi_query": True, "parallel_attn": True},
               "fused multi-query attention, parallel attention"),
    "starcoder2": ({}, "biases, sliding window, c_fc/c_proj"),
    "stablelm": ({"partial_rotary_factor": 0.5}, "partial rotary, LayerNorm"),
    "olmo": ({}, "non-parametric LayerNorm"),
    "olmo2": ({}, "QK-norm over all heads, post-norms"),
    "cohere": ({"use_qk_norm": False}, "parallel residual, logit scale, tied embeddings"),
    "granite": ({}, "embedding/residual/logit multipliers"),
    "glm4": ({}, "fused gate_up_proj, post-norms, partial rotary"),
    "exaone4": ({}, "QK-norm, sliding/global layers"),
    "smollm3": ({}, "NoPE layers"),
    "mixtral": ({}, "MoE, fused 3-D experts (w1/w3 -> gate_up_proj), router"),
    "qwen2_moe": ({"decoder_sparse_step": 1, "mlp_only_layers": [0]},
                  "MoE with a shared expert and its gate, a dense layer, fused experts"),
    "qwen3_moe": ({"mlp_only_layers": [0]}, "MoE, QK-norm, fused experts, a dense layer"),
    "olmoe": ({}, "MoE, QK-norm, fused experts"),
    # PEFT's all-linear also wraps phimoe's router, whose forward returns a tuple that PEFT's
    # Linear cannot take: the LoRA names the attention and the experts instead.
    "phimoe": ({}, "MoE, renamed router, fused experts, LayerNorm with biases"),
    "deepseek_v3": ({"first_k_dense_replace": 1, "q_lora_rank": 16, "kv_lora_rank": 16,
                     "qk_rope_head_dim": 8, "qk_nope_head_dim": 8, "v_head_dim": 8,
                     "n_group": 1, "topk_group": 1, "num_key_value_heads": 4},
                    "MLA attention, dense then MoE layers, shared experts, fused experts"),
}

# LoRA settings other than all-linear, where PEFT's all-linear cannot run.
LORA = {
    "phimoe": {"target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"],
               "target_parameters": ["experts.gate_up_proj", "experts.down_proj"]},
}

INPUT_IDS = [[1, 17, 42, 99, 3, 250, 7, 128]]


def tiny_config(model_type, overrides):
    base = AutoConfig.for_model(model_type)
    kwargs = {k: v for k, v in COMMON.items()
              if (hasattr(base, k) or k in base.to_dict())
              and not isinstance(getattr(type(base), k, None), property)}
    kwargs.update(overrides)
    return AutoConfig.for_model(model_type, **kwargs)


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


def seeded_noise(model, seed, scale):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.requires_grad and p.dtype.is_floating_point:
                p.add_((torch.randn(p.shape, generator=g) * scale).to(p.dtype))


def saved_keys(model):
    with tempfile.TemporaryDirectory() as d:
        model.save_pretrained(d)
        keys = {}
        for f in sorted(os.listdir(d)):
            if f.endswith(".safetensors"):
                with safe_open(os.path.join(d, f), "pt") as fh:
                    for k in fh.keys():
                        keys[k] = list(fh.get_slice(k).get_shape())
        return keys


def trace_conversion(config):
    """Which in-memory parameter, and which block of it, every on-disk tensor holds.

    Every element of every floating parameter gets a distinct value (float32, exact below 2^24);
    save_pretrained applies transformers' reverse conversion; each saved element's value tells
    where it came from. Returns {disk_name: {"param", "shape", "expert", "block", "transposed"}}.
    """
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    params = [(n, p) for n, p in model.named_parameters()]
    offsets, total = [], 0
    with torch.no_grad():
        for _, p in params:
            offsets.append(total)
            p.copy_(torch.arange(total, total + p.numel(), dtype=torch.float64).reshape(p.shape).to(torch.float32))
            total += p.numel()
    assert total < 2 ** 24, "tiny model too large to trace exactly"
    out = {}
    with tempfile.TemporaryDirectory() as d:
        model.save_pretrained(d)
        for f in sorted(os.listdir(d)):
            if not f.endswith(".safetensors"):
                continue
            with safe_open(os.path.join(d, f), "pt") as fh:
                for k in fh.keys():
                    t = fh.get_tensor(k).to(torch.float64)
                    first = int(t.reshape(-1)[0].item()) if t.numel() else 0
                    i = bisect.bisect_right(offsets, first) - 1
                    name, p = params[i]
                    local = (t.to(torch.int64) - offsets[i])
                    if local.min() < 0 or local.max() >= p.numel():
                        out[k] = {"param": None}
                        continue
                    entry = {"param": name, "param_shape": list(p.shape), "shape": list(t.shape)}
                    if list(t.shape) == list(p.shape) and torch.equal(local.reshape(-1), torch.arange(p.numel())):
                        entry["block"] = None
                    elif p.dim() == 3 and t.dim() == 2:
                        e_count, d1, d2 = p.shape
                        e = int(local.reshape(-1)[0].item()) // (d1 * d2)
                        idx = local - e * d1 * d2
                        rows, cols = idx // d2, idx % d2
                        a, b = t.shape
                        if torch.equal(rows, rows[:, :1].expand(a, b)) and torch.equal(cols, cols[:1, :].expand(a, b)):
                            transposed = False
                            x0, y0 = int(rows[0, 0]), int(cols[0, 0])
                            ok = torch.equal(rows[:, 0], torch.arange(x0, x0 + a)) and torch.equal(cols[0], torch.arange(y0, y0 + b))
                        else:
                            transposed = True
                            x0, y0 = int(rows[0, 0]), int(cols[0, 0])
                            ok = torch.equal(rows[0], torch.arange(x0, x0 + b)) and torch.equal(cols[:, 0], torch.arange(y0, y0 + a))
                        if not ok:
                            entry["block"] = "unsupported"
                        else:
                            h, w = (b, a) if transposed else (a, b)
                            entry["expert"] = e
                            entry["block"] = {"row_chunk": x0 // h, "row_chunks": d1 // h,
                                              "col_chunk": y0 // w, "col_chunks": d2 // w}
                            entry["transposed"] = transposed
                    elif p.dim() == 3:
                        entry["block"] = "unsupported"
                    else:
                        # Not this parameter's values: a buffer (e_score_correction_bias).
                        entry = {"param": None}
                    out[k] = entry
    return out


def template(name):
    """model.layers.3.x.experts.5.w1.weight -> (model.layers.{i}.x.experts.{e}.w1.weight, 3, 5)."""
    parts = name.split(".")
    layer = expert = None
    for j, p in enumerate(parts):
        if p.isdigit() and j > 0:
            if layer is None and parts[j - 1] in ("layers", "h", "blocks", "layer", "block"):
                parts[j], layer = "{i}", int(p)
            elif parts[j - 1] == "experts":
                parts[j], expert = "{e}", int(p)
    return ".".join(parts), layer, expert


EXPERT_FIELDS = ["num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts"]


def describe(model_type, config, model, disk_keys, trace):
    """What transformers tells about this architecture, in templates ({i} layer, {e} expert)."""
    layer_sets = {}
    model_tensors = []
    experts = 0
    for k in disk_keys:
        t, layer, expert = template(k)
        if expert is not None:
            experts = max(experts, expert + 1)
        if layer is None:
            model_tensors.append(t)
        else:
            layer_sets.setdefault(layer, set()).add(t)
    kinds = []
    for layer in sorted(layer_sets):
        s = sorted(layer_sets[layer])
        if s not in kinds:
            kinds.append(s)
    expert_field = None
    if experts:
        expert_field = next(f for f in EXPERT_FIELDS if config.to_dict().get(f) == experts)
    # Tensors that appear or disappear with a boolean config field (biases, a tied head).
    toggles = {}
    cfg_dict = config.to_dict()
    fields = [f for f, v in cfg_dict.items() if isinstance(v, bool) and ("bias" in f or f == "tie_word_embeddings")]
    for f in fields:
        flipped = tiny_config(model_type, dict(CASES[model_type][0], **{f: not cfg_dict[f]}))
        try:
            m2 = AutoModelForCausalLM.from_config(flipped, dtype=torch.bfloat16)
        except Exception as e:  # a combination the architecture refuses
            print(f"  {model_type}: {f}={not cfg_dict[f]} not buildable: {e}")
            continue
        keys2 = {template(k)[0] for k in saved_keys(m2)}
        keys1 = {template(k)[0] for k in disk_keys}
        if keys1 != keys2:
            toggles[f] = {"value": cfg_dict[f],
                          "class_default": AutoConfig.for_model(model_type).to_dict().get(f, cfg_dict[f]),
                          "added_when_flipped": sorted(keys2 - keys1),
                          "removed_when_flipped": sorted(keys1 - keys2)}
    conversion = {}
    for k, e in trace.items():
        t, _, _ = template(k)
        if e.get("param") is None:
            continue
        pt, _, _ = template(e["param"])
        if pt == t and e["block"] is None:
            continue
        entry = {"param": pt, "block": e["block"]}
        if isinstance(e["block"], dict):
            entry["transposed"] = e["transposed"]
        conversion[t] = entry
    # In-memory parameters of each module in registration order: PEFT nests one ParamWrapper per
    # targeted parameter in this order (the last one outermost).
    params_in_order = list(dict.fromkeys(template(n)[0] for n, _ in model.named_parameters()))
    # Fused expert parameters stored [experts, in, out] (is_transposed, gpt-oss) rather than
    # transformers' usual [experts, out, in]: PEFT lays their LoRA out the other way round.
    transposed_experts = sorted({template(f"{mn}.{pn}")[0] for mn, m in model.named_modules()
                                 if getattr(m, "is_transposed", False)
                                 for pn, _ in m.named_parameters(recurse=False)})
    return {
        "model_type": model_type,
        "architecture": model.__class__.__name__,
        "model_tensors": sorted(model_tensors),
        "layer_kinds": kinds,
        "expert_count_field": expert_field,
        "toggles": toggles,
        "conversion": conversion,
        "parameters": params_in_order,
        "transposed_experts": transposed_experts,
    }


def make_case(model_type, overrides, covers, seed):
    out = os.path.join(OUT, model_type)
    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(out)
    config = tiny_config(model_type, overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16, attn_implementation="eager").eval()
    seeded_noise(model, seed, 0.02)
    base = os.path.join(out, "base")
    model.save_pretrained(base)
    add_tokenizer(base)
    disk_keys = saved_keys(model)
    trace = trace_conversion(config)
    info = describe(model_type, config, model, disk_keys, trace)

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16, attn_implementation="eager").eval()
    state_keys = list(model.state_dict().keys())
    # Tensors transformers keeps in float32 in a 16-bit model (_keep_in_fp32_modules): it loads
    # and saves them in float32 whatever the checkpoint holds.
    info["keep_in_fp32"] = sorted({template(k)[0] for k, v in model.state_dict().items()
                                   if v.dtype == torch.float32})
    lcfg = LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                      **LORA.get(model_type, {"target_modules": "all-linear"}))
    pm = get_peft_model(model, lcfg)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.copy_((torch.randn(p.shape, generator=g) * 0.1).to(p.dtype))
    pm.save_pretrained(os.path.join(out, "adapter"))
    ids = torch.tensor(INPUT_IDS)
    with torch.no_grad():
        logits = pm(input_ids=ids).logits.float()
    merged = pm.merge_and_unload()
    with torch.no_grad():
        merged_logits = merged(input_ids=ids).logits.float()
    merged.save_pretrained(os.path.join(out, "merged"))
    for f in os.listdir(base):
        if f.startswith(("tokenizer", "special_tokens", "chat_template")):
            shutil.copy(os.path.join(base, f), os.path.join(out, "merged", f))
    save_file({"peft": logits.contiguous(), "peft_merged": merged_logits.contiguous()},
              os.path.join(out, "logits.safetensors"))
    with open(os.path.join(out, "adapter", "adapter_config.json")) as fh:
        acfg = json.load(fh)
    case = {"model_type": model_type, "architecture": info["architecture"], "covers": covers,
            "dtype": "bfloat16", "attn_implementation": "eager", "input_ids": INPUT_IDS,
            "lora_request": LORA.get(model_type, {"target_modules": "all-linear"}),
            "target_modules": acfg.get("target_modules"),
            "target_parameters": acfg.get("target_parameters"),
            "state_dict_keys": state_keys}
    with open(os.path.join(out, "case.json"), "w") as fh:
        json.dump(case, fh, indent=1)
    return info


def main():
    os.makedirs(OUT, exist_ok=True)
    arch_path = os.path.join(OUT, "architectures.json")
    archs = {}
    if ONLY and os.path.exists(arch_path):
        with open(arch_path) as fh:
            archs = json.load(fh)
    failed = {}
    for seed, (model_type, (overrides, covers)) in enumerate(sorted(CASES.items()), start=100):
        if ONLY and model_type not in ONLY:
            continue
        try:
            archs[model_type] = make_case(model_type, overrides, covers, seed)
            print("ok", model_type)
        except Exception as e:  # report every case, then fail
            import traceback
            traceback.print_exc()
            failed[model_type] = repr(e)
            shutil.rmtree(os.path.join(OUT, model_type), ignore_errors=True)
    with open(arch_path, "w") as fh:
        json.dump(dict(sorted(archs.items())), fh, indent=1)
    with open(os.path.join(OUT, "VERSIONS.json"), "w") as fh:
        json.dump({"torch": torch.__version__, "transformers": transformers.__version__,
                   "peft": peft.__version__}, fh, indent=1)
    if failed:
        print("FAILED:", json.dumps(failed, indent=1))
        sys.exit(1)


if __name__ == "__main__":
    main()
