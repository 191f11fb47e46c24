"""A LoRA on a multimodal model (text model, vision tower, projector), merged by weightsmith,
loads in transformers as PEFT's merge does and gives PEFT's merged logits exactly (needs torch
and transformers: on CI they are absent and this is reported as skipped; the bits are compared
with PEFT's on CI by tests/tests/arch_matrix.rs)."""

import json

import pytest

import weightsmith

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


@pytest.mark.parametrize("case", ["gemma3", "llava", "mistral3", "qwen2_vl"])
def test_merged_multimodal_model_loads_with_peft_s_logits(fixtures, tmp_path, case):
    from safetensors.torch import load_file
    from transformers import AutoModelForImageTextToText

    d = fixtures / "multimodal" / case
    spec = json.loads((d / "case.json").read_text())
    out = tmp_path / "merged"
    weightsmith.merge(d / "base", [(d / "adapter", 1.0)], out, device="cpu", progress=lambda *a: None)
    model, info = AutoModelForImageTextToText.from_pretrained(
        str(out), dtype=torch.bfloat16, attn_implementation=spec["attn_implementation"],
        output_loading_info=True)
    assert type(model).__name__ == spec["architecture"]
    assert not any(info.values()), info
    with torch.no_grad():
        logits = model.eval()(input_ids=torch.tensor(spec["input_ids"])).logits.float()
    assert torch.equal(logits, load_file(str(d / "logits.safetensors"))["peft_merged"])
