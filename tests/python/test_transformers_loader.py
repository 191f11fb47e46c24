"""weightsmith.transformers.from_pretrained gives transformers' own logits (needs torch and
transformers: on CI they are absent and this is reported as skipped; the device script
scripts/device/python-load.sh runs it on a GPU)."""

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("accelerate")


@pytest.mark.parametrize("case", ["llama", "qwen2", "gpt2", "gemma2", "phi3"])
def test_logits_equal_from_pretrained(fixtures, case):
    from transformers import AutoModelForCausalLM

    from weightsmith.transformers import from_pretrained

    path = fixtures / "matrix" / case / "base"
    ours = from_pretrained(str(path), device_map="cpu")
    ref = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.bfloat16).eval()
    ids = torch.tensor([[1, 2, 3, 40, 5]])
    with torch.no_grad():
        assert torch.equal(ours(ids).logits, ref(ids).logits)


def test_converted_families_are_refused_with_the_reason(fixtures):
    from weightsmith.transformers import from_pretrained

    with pytest.raises(ValueError, match="names this model's parameters differently"):
        from_pretrained(str(fixtures / "matrix/mixtral/base"), device_map="cpu")
