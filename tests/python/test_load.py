"""`load`: zero-copy DLPack tensors that equal the file, freed when the last one goes."""

import gc
import json
import struct

import numpy as np

import weightsmith
from weightsmith import _native


def file_tensors(path):
    """name -> (dtype, shape, bytes) straight from a safetensors file."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    header.pop("__metadata__", None)
    return {k: (v["dtype"], v["shape"], raw[8 + n + v["data_offsets"][0]:8 + n + v["data_offsets"][1]])
            for k, v in header.items()}


def test_load_equals_the_files_tensor_for_tensor(fixtures):
    folder = fixtures / "models/tiny-llama"
    expected = {}
    for f in sorted(folder.glob("*.safetensors")):
        expected.update(file_tensors(f))
    tensors = weightsmith.load(folder, device_map="cpu", as_torch=False)
    assert set(tensors) == set(expected)
    for name, t in tensors.items():
        dtype, shape, data = expected[name]
        assert (t.dtype, t.shape, t.device) == (dtype, shape, "host")
        assert t.to_bytes() == data, name
    assert weightsmith.load.last_report["backend"].startswith("host")


def test_numpy_takes_them_without_a_copy(fixtures):
    tensors = weightsmith.load(fixtures / "python/all-dtypes.safetensors", device_map="cpu",
                               as_torch=False, cache_seq_len=0)
    expected = file_tensors(fixtures / "python/all-dtypes.safetensors")
    kinds = {"F32": np.float32, "F16": np.float16, "I32": np.int32, "U8": np.uint8, "I64": np.int64}
    checked = 0
    for name, t in tensors.items():
        dtype, shape, data = expected[name]
        if dtype not in kinds:
            continue
        a = np.from_dlpack(t)
        b = np.from_dlpack(t)
        assert a.dtype == kinds[dtype] and list(a.shape) == shape
        assert a.tobytes() == data
        # The same memory twice: no copy was made.
        assert a.__array_interface__["data"][0] == b.__array_interface__["data"][0]
        checked += 1
    assert checked >= 4


def test_memory_comes_back_when_the_last_tensor_goes(fixtures):
    gc.collect()
    before = _native.live_models()
    tensors = weightsmith.load(fixtures / "models/tiny-llama", device_map="cpu", as_torch=False)
    arrays = [np.from_dlpack(t) for t in tensors.values() if t.dtype == "F32"]
    assert _native.live_models() == before + 1
    keep = list(tensors.values())[0]
    del tensors, arrays
    gc.collect()
    assert _native.live_models() == before + 1, "one tensor still holds the model"
    del keep
    gc.collect()
    assert _native.live_models() == before


def test_a_device_map_places_each_layer_where_it_says(fixtures):
    folder = fixtures / "models/tiny-llama"
    # Without a GPU the plan has one device, the host: index 0 and "cpu" both mean it.
    tensors = weightsmith.load(folder, device_map={"": 0, "model.layers.1": "cpu"}, as_torch=False)
    expected = {}
    for f in sorted(folder.glob("*.safetensors")):
        expected.update(file_tensors(f))
    assert {n: t.to_bytes() for n, t in tensors.items()} == {n: v[2] for n, v in expected.items()}
    assert weightsmith.load.last_report["plan"]["strategy"] == "fixed"
    units = {u["name"]: u["device"] for u in weightsmith.load.last_report["plan"]["units"]}
    assert units["layers.1"] == "host" and units["layers.0"] == 0


def test_a_device_map_that_leaves_a_layer_out_is_refused_naming_it(fixtures):
    import pytest

    with pytest.raises(ValueError, match='no device for module "model.layers.0"'):
        weightsmith.load(fixtures / "models/tiny-llama", device_map={"model.embed_tokens": 0})
    with pytest.raises(ValueError, match="device_map must be"):
        weightsmith.load(fixtures / "models/tiny-llama", device_map="tpu")
