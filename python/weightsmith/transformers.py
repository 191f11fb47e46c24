"""A transformers loader: the model built without its weights, then given ours.

    from weightsmith.transformers import from_pretrained
    model = from_pretrained("fixtures/models/tiny-llama")      # or a Hub id
    model.generate(...)

The model is built from its config with its parameters on the meta device (accelerate's
``init_empty_weights``; buffers such as rotary frequencies are made as usual), then every
parameter is assigned the tensor ``weightsmith.load`` put on its device (no copy), tied weights
are tied again, and the model is in eval mode. When the plan (or the ``device_map`` given)
spreads the model over several devices, accelerate's ``dispatch_model`` adds the hooks that move
activations between them, as ``from_pretrained(device_map=...)`` does; layers placed on
``"cpu"`` run on the first GPU with their weights brought over as needed (accelerate's CPU
offload). Families whose checkpoints transformers converts on loading (fused MoE experts) are
refused with the reason.
"""

from typing import Any, Dict, Optional, Union

import weightsmith


def from_pretrained(path: str, *, device_map: Union[str, int, Dict[str, Any]] = "auto",
                    dtype: Optional[Any] = None, **plan_options: Any):
    """``AutoModelForCausalLM.from_pretrained`` with weightsmith's load.

    Args:
        path: a model folder or a Hub id.
        device_map: as :func:`weightsmith.load` takes it: ``"auto"`` (this machine's GPUs, per
            the plan), ``"cpu"``, ``"cuda:N"``, a plan from :func:`weightsmith.plan`, or an
            accelerate device_map (module name → GPU index or ``"cpu"``).
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
    folder = report["model"]
    config = AutoConfig.from_pretrained(folder)
    if dtype is None:
        first = next(iter(tensors.values()))
        dtype = first.dtype if first.is_floating_point() else None
    from accelerate import init_empty_weights

    # Parameters on the meta device (no memory, no init), buffers made as usual.
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
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
    if len(devices) <= 1:
        model.to(torch.device(devices.pop()) if devices else torch.device("cpu"))
        return model.eval()
    return _dispatch(model, devices).eval()


def _dispatch(model: Any, devices: set) -> Any:
    """Hooks that move activations between the devices the weights are on (accelerate's
    ``dispatch_model``), with a device map read off the parameters themselves: each module
    that owns parameters goes where they are; modules with buffers only (rotary frequencies)
    go to the first GPU."""
    import torch
    from accelerate import dispatch_model

    gpus = sorted((d for d in devices if d != "cpu"), key=lambda d: torch.device(d).index or 0)
    main = gpus[0] if gpus else "cpu"
    device_map: Dict[str, Any] = {}
    for name, module in model.named_modules():
        own = {str(p.device) for p in module.parameters(recurse=False)}
        if len(own) > 1:
            raise ValueError(f"module {name!r} has parameters on {sorted(own)}; a module is placed whole")
        if own:
            device_map[name] = own.pop()
        elif any(True for _ in module.buffers(recurse=False)):
            device_map[name] = main
    # Buffers go to their module's device; parameters are already there (no copy).
    return dispatch_model(model, device_map=device_map, main_device=main)
