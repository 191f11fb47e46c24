"""On a GPU machine: weightsmith.load's torch tensors equal safetensors' tensor for tensor
(torch.equal), and weightsmith.transformers.from_pretrained gives transformers'
from_pretrained logits (same dtype, eager attention).

    python3 scripts/device/check_python_loader.py MODEL_DIR
"""

import os
import sys

import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import weightsmith
from weightsmith.transformers import from_pretrained

model = sys.argv[1]
ours = weightsmith.load(model, as_torch=True)
devices = {str(t.device) for t in ours.values()}
checked = 0
for f in sorted(os.listdir(model)):
    if f.endswith(".safetensors"):
        ref = load_file(os.path.join(model, f), device="cuda:0")
        for k, v in ref.items():
            assert torch.equal(ours[k], v), k
            checked += 1
        del ref
print(f"weightsmith.load: {checked} tensors on {sorted(devices)}, torch.equal to safetensors' every one")
del ours
torch.cuda.empty_cache()
ids = torch.tensor([[1, 15, 300, 4000, 27, 9, 1024, 77]], device="cuda:0")
ref = AutoModelForCausalLM.from_pretrained(model, dtype=torch.bfloat16, device_map="cuda:0",
                                           attn_implementation="eager").eval()
with torch.no_grad():
    want = ref(ids).logits
del ref
torch.cuda.empty_cache()
m = from_pretrained(model)
m.config._attn_implementation = "eager"
with torch.no_grad():
    got = m(ids).logits
print(f"weightsmith.transformers.from_pretrained: logits equal to from_pretrained's: {torch.equal(got, want)} "
      f"(max |diff| {(got - want).abs().max().item():.3g})")
assert torch.equal(got, want)
out = m.generate(ids, max_new_tokens=4, do_sample=False)
print("generate:", tuple(out.shape))
del m
torch.cuda.empty_cache()

# A device map given by hand (accelerate's form): the last two layers in host memory. The
# model spans cuda:0 and the host; accelerate's hooks run the host layers on cuda:0.
from transformers import AutoConfig

n = AutoConfig.from_pretrained(model).num_hidden_layers
device_map = {"": 0, f"model.layers.{n - 1}": "cpu", f"model.layers.{n - 2}": "cpu"}
tensors = weightsmith.load(model, device_map=device_map, as_torch=True)
placed = {str(tensors[f"model.layers.{i}.mlp.up_proj.weight"].device) for i in (n - 2, n - 1)}
assert placed == {"cpu"}, placed
assert str(tensors["model.layers.0.mlp.up_proj.weight"].device) == "cuda:0"
del tensors
m = from_pretrained(model, device_map=device_map)
m.config._attn_implementation = "eager"
with torch.no_grad():
    got = m(ids).logits
print(f"device_map with layers {n - 2}-{n - 1} on the host: logits equal to from_pretrained's: "
      f"{torch.equal(got.to(want.device), want)} (max |diff| {(got.to(want.device) - want).abs().max().item():.3g})")
assert torch.equal(got.to(want.device), want)
