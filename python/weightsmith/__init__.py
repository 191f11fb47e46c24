"""weightsmith: model weights from disk to GPUs and back.

One function per verb of the ``weightsmith`` command, with the same meaning and the same
reports (the dictionaries the CLI's ``--json`` prints)::

    import weightsmith
    report = weightsmith.inspect("fixtures/models/tiny-llama")
    plan = weightsmith.plan("fixtures/models/tiny-llama", devices=["8GiB", "8GiB"])
    merged = weightsmith.merge("fixtures/models/tiny-llama",
                               ["fixtures/adapters/llama-lora/adapter"], "merged-tiny-llama")
    tensors = weightsmith.load("fixtures/models/tiny-llama")   # name -> tensor, zero-copy

Models and adapters are local paths or Hub ids ``OWNER/NAME[@REVISION]``. Errors raise
:class:`weightsmith.Error` (its message names the file, tensor or field), ``ValueError`` for
arguments that do not go together, ``FileNotFoundError`` for a missing path; Ctrl-C stops a
merge cleanly (nothing is left behind) and raises ``KeyboardInterrupt``.
"""

import json
import sys
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

from . import _native
from ._native import Error, Tensor, __version__

__all__ = ["Error", "Tensor", "inspect", "plan", "merge", "publish", "load", "__version__"]

Progress = Callable[[int, int, str], None]


def _terminal_progress() -> Optional[Progress]:
    """A one-line progress report on a terminal (stderr), as the CLI shows one."""
    if not sys.stderr.isatty():
        return None

    def show(done: int, total: int, what: str) -> None:
        pct = 100.0 * done / total if total else 100.0
        sys.stderr.write(f"\r{pct:5.1f}% {done / 1e9:.2f}/{total / 1e9:.2f} GB {what[:60]:<60}")
        if total and done >= total:
            sys.stderr.write("\n")
        sys.stderr.flush()

    return show


def _sizes(values: Union[None, str, int, Sequence[Union[str, int]]]) -> Optional[str]:
    if values is None:
        return None
    if isinstance(values, (str, int)):
        return str(values)
    return ",".join(str(v) for v in values)


def _flags(**options: Any) -> List[str]:
    out: List[str] = []
    for key, value in options.items():
        flag = "--" + key.replace("_", "-")
        if value is None or value is False:
            continue
        if value is True:
            out.append(flag)
        else:
            out += [flag, str(value)]
    return out


def _call(argv: List[str], progress: Optional[Progress] = None) -> Dict[str, Any]:
    return json.loads(_native.call([str(a) for a in argv], progress))


def inspect(path: str, *, tensors: bool = False) -> Dict[str, Any]:
    """Reads a checkpoint's headers and reports files, tensors, placement units and problems.

    Args:
        path: a model folder, a ``.safetensors`` file, or a Hub id (read header-only).
        tensors: list every tensor in the report.

    Returns:
        The report ``weightsmith inspect --json`` prints.
    """
    return _call(["inspect", str(path)] + _flags(tensors=tensors))


def plan(
    path: str,
    *,
    devices: Union[str, Sequence[Union[str, int]]] = "auto",
    reserve: Union[None, str, int, Sequence[Union[str, int]]] = None,
    cache_seq_len: Union[None, int, str] = None,
    device_map: Optional[Dict[str, Any]] = None,
    **options: Any,
) -> Dict[str, Any]:
    """Decides where each layer and its KV cache go, from the checkpoint's headers.

    Args:
        path: a model folder, a ``.safetensors`` file, or a Hub id.
        devices: ``"auto"`` (this machine's GPUs) or simulated capacities (``["24GiB", "24GiB"]``).
        reserve: memory each device keeps free: one size or one per device.
        cache_seq_len: tokens of KV cache per layer, or ``"max"``.
        device_map: check a placement instead of choosing one: a plan this function returned
            (perhaps edited) or an accelerate device_map (module name → GPU index or ``"cpu"``).
        **options: any other flag of ``weightsmith plan`` (``strategy="balanced"``, ...).

    Returns:
        The plan ``weightsmith plan --json`` prints.
    """
    argv = ["plan", str(path), "--devices", _sizes(devices)]
    argv += _flags(reserve=_sizes(reserve), cache_seq_len=cache_seq_len,
                   device_map=_device_map(device_map), **options)
    return _call(argv)


def _device_map(device_map: Union[None, str, int, Dict[str, Any]]) -> Optional[str]:
    """The ``--device-map`` JSON for a dict, a GPU index, or ``"cuda:N"`` (everything there)."""
    if device_map is None or device_map in ("auto", "cpu"):
        return None
    if isinstance(device_map, dict):
        return json.dumps(device_map)
    if isinstance(device_map, int) or (isinstance(device_map, str) and
                                       (device_map == "cuda" or device_map.startswith("cuda:"))):
        return json.dumps({"": device_map})
    raise ValueError(f"device_map must be \"auto\", \"cpu\", \"cuda:N\", a GPU index, a plan or a "
                     f"module → device dict, not {device_map!r}")


def merge(
    base: str,
    adapters: Iterable[Union[str, Tuple[str, float]]],
    out: str,
    *,
    dtype: Optional[str] = None,
    device: str = "auto",
    max_shard_size: str = "5GB",
    verify: bool = False,
    force: bool = False,
    base_model: Optional[str] = None,
    progress: Optional[Progress] = None,
) -> Dict[str, Any]:
    """Merges LoRA adapters into their base and writes a standalone 16-bit checkpoint.

    Args:
        base: the base model folder or Hub id.
        adapters: adapter folders or Hub ids, or ``(adapter, weight)`` pairs.
        out: the output folder (refused if it exists, unless ``force``; never an input).
        dtype: ``"bf16"`` or ``"f16"`` (default: the base's 16-bit dtype).
        device: ``"auto"``, ``"cpu"`` or ``"cuda:N"`` (the same bits either way).
        max_shard_size: the largest shard (``"5GB"``, ``"4GiB"``).
        verify: recompute sample rows in f64 and report the largest error in ulps.
        force: replace an existing output folder (a checkpoint folder or an empty one only).
        base_model: the card's ``base_model`` (default: the base's Hub id when it has one).
        progress: called as ``progress(done_bytes, total_bytes, tensor)``; default: a line
            on a terminal.

    Returns:
        The report ``weightsmith merge --json`` prints.
    """
    argv = ["merge", "--base", str(base), "--out", str(out)]
    for a in adapters:
        if isinstance(a, (tuple, list)):
            path, weight = a
            argv += ["--adapter", f"{path}:{float(weight)}"]
        else:
            argv += ["--adapter", str(a)]
    argv += _flags(dtype=dtype, device=device, max_shard_size=max_shard_size, verify=verify,
                   force=force, base_model=base_model)
    return _call(argv, progress if progress is not None else _terminal_progress())


def publish(folder: str, repo: str, **options: Any) -> Dict[str, Any]:
    """Publishes a checkpoint folder to a Hub repository (one commit; a re-run sends only what
    changed).

    Args:
        folder: the checkpoint folder.
        repo: ``OWNER/NAME``.
        **options: any flag of ``weightsmith publish``: ``dry_run=True``, ``private=True``,
            ``token=...``, ``endpoint=...``, ``base_model=...``, ``create_pr=True``, ...

    Returns:
        The summary ``weightsmith publish --json`` prints.
    """
    return _call(["publish", str(folder), "--repo", str(repo)] + _flags(**options))


def load(
    path: str,
    *,
    device_map: Union[str, int, Dict[str, Any]] = "auto",
    progress: Optional[Progress] = None,
    as_torch: Optional[bool] = None,
    **options: Any,
) -> Dict[str, Any]:
    """Loads a checkpoint onto this machine's GPUs per the plan (or host memory without one).

    Args:
        path: a model folder, a ``.safetensors`` file, or a Hub id (downloaded to the cache).
        device_map: ``"auto"`` (the plan over this machine's devices); ``"cpu"`` loads into
            host memory; ``"cuda:N"`` or ``N`` puts everything on one GPU; a plan from
            :func:`plan` (perhaps edited) or an accelerate device_map (module name → GPU index
            or ``"cpu"``) places each layer where it says, checked against each device's free
            memory first. A layer is placed whole, with its KV cache.
        progress: called as ``progress(done_bytes, total_bytes, file)``, at most 20 times a
            second: ``(0, total, "")`` while buffers are allocated after the plan, then before
            a file's copy, and last ``(total, total, "")``.
        as_torch: return ``torch.Tensor``s (default: when torch is installed).
        **options: any other flag of ``weightsmith load`` (``reserve=...``, ``cache_seq_len=...``).

    Returns:
        ``{name: tensor}`` in checkpoint order: ``torch.Tensor``s sharing our memory, or
        :class:`weightsmith.Tensor` (DLPack: ``torch.from_dlpack``, ``numpy.from_dlpack``).
        The memory is freed when the last tensor is gone. ``load.last_report`` holds the
        report ``weightsmith load --json`` prints.
    """
    argv = ["load", str(path)] + _flags(device_map=_device_map(device_map), **options)
    report, tensors = _native.load(argv, progress if progress is not None else _terminal_progress(),
                                   device_map == "cpu")
    load.last_report = json.loads(report)  # type: ignore[attr-defined]
    if as_torch is None:
        as_torch = "torch" in sys.modules or _has_torch()
    if as_torch:
        import torch

        return {t.name: torch.from_dlpack(t) for t in tensors}
    return {t.name: t for t in tensors}


def _has_torch() -> bool:
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True
