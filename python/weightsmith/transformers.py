"""A transformers loader: the model built without its weights, then given ours.

    from weightsmith.transformers import from_pretrained
    model = from_pretrained("fixtures/models/tiny-llama")      # or a Hub id
    model.generate(...)

The model is built from its config with its parameters on the meta device (accelerate's
``init_empty_weights``; buffers such as rotary frequencies are made as usual), then every parameter is assigned the tensor
``weightsmith.load`` put on the GPU (no copy), tied weights are tied again, and the model is
in eval mode. For models whose weights all fit on one device; families whose checkpoints
transformers converts on loading (fused MoE experts) are refused with the reason.
"""

from typing import Any, Optional

import weightsmith


def from_pretrained(path: str, *, device_map: str = "auto", dtype: Optional[Any] = None, **plan_options: Any):
    """``AutoModelForCausalLM.from_pretrained`` with weightsmith's load.

    Args:
        path: a model folder or a Hub id.
        device_map: ``"auto"`` (this machine's GPUs, per the plan) or ``"cpu"``.
        dtype: the model's dtype (default: the checkpoint's).
        **plan_options: flags of ``weightsmith load`` (``reserve=...``, ``cache_seq_len=...``).

    Returns:
        The model, in eval mode, its parameters the loaded tensors.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    tensors = weightsmith.load(path, device_map=device_map, as_torch=True, **plan_options)
    report = weightsmith.load.last_report
    devices = {str(t.device) for t in tensors.values()}
    if len(devices) > 1:
        raise ValueError(
            f"{path}: the plan spreads the model over {sorted(devices)}; this loader builds "
            "single-device models (pass reserve= or cache_seq_len= so it fits on one)")
    folder = report["model"]
    config = AutoConfig.from_pretrained(folder)
    if dtype is None:
        first = next(iter(tensors.values()))
        dtype = first.dtype if first.is_floating_point() else None
    from accelerate import init_empty_weights

    # Parameters on the meta device (no memory, no init), buffers made as usual.
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    device = torch.device(devices.pop()) if devices else torch.device("cpu")
    params = dict(model.named_parameters())
    missing = [n for n in params if n not in tensors]
    unexpected = [n for n in tensors if n not in params]
    tied = set(getattr(model, "_tied_weights_keys", None) or [])
    missing = [n for n in missing if n not in tied and not any(n.endswith(t) for t in tied)]
    if unexpected:
        raise ValueError(
            f"{path}: transformers names this model's parameters differently from its checkpoint "
            f"(e.g. {unexpected[0]!r}); load it with transformers' from_pretrained instead")
    state = {n: t for n, t in tensors.items() if n in params}
    model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    still_meta = [n for n, p in model.named_parameters() if p.is_meta]
    if still_meta or missing:
        raise ValueError(f"{path}: no tensor for {sorted(set(still_meta) | set(missing))[:3]}")
    # Buffers made on the meta device (rotary frequencies) are made again on the device.
    for module in model.modules():
        for name, buf in list(module.named_buffers(recurse=False)):
            if buf is not None and buf.is_meta:
                raise ValueError(f"{path}: buffer {name!r} has no value; load it with transformers' from_pretrained")
    model.to(device)
    return model.eval()
