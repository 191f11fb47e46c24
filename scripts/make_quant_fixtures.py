#!/usr/bin/env python3
"""Quantised fixtures for weightsmith: GPTQ and EXL2 checkpoints of the tiny Llama, plus the
reference dequantisation and the reference merge of the llama-lora adapter into them.

Pure numpy (no torch, no GPU): `python3 scripts/make_quant_fixtures.py` rewrites
fixtures/quantized/ from fixtures/models/tiny-llama and fixtures/adapters/llama-lora.

GPTQ layout implemented here (the one AutoGPTQ's `QuantLinear.pack` writes, in
auto_gptq/nn_modules/qlinear/qlinear_cuda_old.py, and GPTQModel and transformers read):
- qweight int32 [in*bits/32, out]: for each output column, the codes of input rows 32k..32k+31
  fill `bits` consecutive words as a little-endian bit stream (code j at bits j*bits..; a 3-bit
  code may straddle two words);
- qzeros int32 [groups, out*bits/32]: zero points packed the same way along the outputs, stored
  minus one for checkpoint_format "gptq" (AutoGPTQ "v1"), as they are for "gptq_v2";
- scales float16 [groups, out]; g_idx int32 [in] (group of each input row; with desc_act the
  groups follow a permuted row order);
- W[o, i] = scales[g, o] * (q[i, o] - z[g, o]) with g = g_idx[i], computed exactly in float32
  (a float16 scale times an integer of at most 9 bits is exact in float32).
The quantiser is round-to-nearest on GPTQ's grid (its `Quantizer.find_params`: per group
min/max, scale = (max-min)/maxq, zero = round(-min/scale); symmetric: zero = (maxq+1)/2). GPTQ
proper also corrects the remaining rows with the inverse Hessian, which changes which codes are
chosen but not one bit of the layout; act-order orders rows by a calibration statistic (here the
mean square of random activations).

EXL2: the tensor names, dtypes and shapes exllamav2 writes (q_weight, q_scale, q_scale_max,
q_groups as (bits, first packed row) pairs, q_invperm, q_perm) with mixed 4/6-bit groups; the
codes are packed as a plain bit stream (exllamav2 shuffles them for its kernels). weightsmith
reads EXL2 layers' structure, never their codes.
"""
import json
import os
import shutil
import struct
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASE = os.path.join(ROOT, "fixtures/models/tiny-llama")
ADAPTER = os.path.join(ROOT, "fixtures/adapters/llama-lora/adapter")
OUT = os.path.join(ROOT, "fixtures/quantized")
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

# ---- safetensors, by hand (numpy has no bfloat16) ----
DT = {"F32": ("<f4", 4), "F16": ("<f2", 2), "BF16": ("<u2", 2), "I32": ("<i4", 4),
      "I16": ("<i2", 2), "U32": ("<u4", 4)}


def read_st(path):
    b = open(path, "rb").read()
    n = struct.unpack("<Q", b[:8])[0]
    header = json.loads(b[8:8 + n])
    out = {}
    for k, v in header.items():
        if k == "__metadata__":
            continue
        s, e = v["data_offsets"]
        a = np.frombuffer(b[8 + n + s:8 + n + e], dtype=DT[v["dtype"]][0]).reshape(v["shape"])
        if v["dtype"] == "BF16":
            a = (a.astype(np.uint32) << 16).view(np.float32)
        out[k] = a
    return out


def write_st(path, tensors):
    """tensors: name -> (dtype name, array); written in the given order."""
    header, blobs, off = {"__metadata__": {"format": "pt"}}, [], 0
    for k, (dt, a) in tensors.items():
        data = np.ascontiguousarray(a.astype(DT[dt][0])).tobytes()
        header[k] = {"dtype": dt, "shape": list(a.shape), "data_offsets": [off, off + len(data)]}
        blobs.append(data)
        off += len(data)
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h + b"".join(blobs))


def read_model(folder):
    tensors = {}
    for f in sorted(os.listdir(folder)):
        if f.endswith(".safetensors"):
            tensors.update(read_st(os.path.join(folder, f)))
    return tensors


# ---- GPTQ ----
def pack_stream(codes, bits, axis):
    """Packs unsigned codes (< 2**bits) along `axis` (a multiple of 32 long) as GPTQ does:
    every 32 codes become `bits` int32 words, a little-endian bit stream."""
    codes = np.moveaxis(codes.astype(np.uint64), axis, 0)
    n = codes.shape[0]
    assert n % 32 == 0
    blocks = codes.reshape(n // 32, 32, *codes.shape[1:])
    words = np.zeros((n // 32, bits, *codes.shape[1:]), dtype=np.uint64)
    for j in range(32):
        bit = j * bits
        w, sh = bit // 32, bit % 32
        words[:, w] |= (blocks[:, j] << np.uint64(sh)) & np.uint64(0xFFFFFFFF)
        if sh + bits > 32:
            words[:, w + 1] |= blocks[:, j] >> np.uint64(32 - sh)
    words = words.reshape(n // 32 * bits, *codes.shape[1:]).astype(np.uint32).view(np.int32)
    return np.moveaxis(words, 0, axis)


def unpack_stream(words, bits, axis, n):
    words = np.moveaxis(words.view(np.uint32).astype(np.uint64), axis, 0)
    blocks = words.reshape(n // 32, bits, *words.shape[1:])
    codes = np.zeros((n // 32, 32, *words.shape[1:]), dtype=np.uint64)
    mask = np.uint64((1 << bits) - 1)
    for j in range(32):
        bit = j * bits
        w, sh = bit // 32, bit % 32
        v = blocks[:, w] >> np.uint64(sh)
        if sh + bits > 32:
            v |= blocks[:, w + 1] << np.uint64(32 - sh)
        codes[:, j] = v & mask
    return np.moveaxis(codes.reshape(n, *words.shape[1:]).astype(np.int64), 0, axis)


def gptq_quantize(w, bits, group_size, sym, act_order, rng):
    """w: float32 [out, in]. Returns qweight, qzeros (v1 = zero-1 is applied by the caller),
    scales (float16), g_idx, and the integer codes/zeros for checking."""
    out_f, in_f = w.shape
    gs = in_f if group_size == -1 else group_size
    maxq = 2 ** bits - 1
    if act_order:
        x = rng.standard_normal((256, in_f)).astype(np.float32) * rng.uniform(0.2, 3.0, in_f)
        perm = np.argsort(-(x * x).mean(axis=0), kind="stable")
    else:
        perm = np.arange(in_f)
    g_idx = np.empty(in_f, dtype=np.int32)
    g_idx[perm] = np.arange(in_f) // gs
    groups = (in_f + gs - 1) // gs
    scales = np.zeros((groups, out_f), dtype=np.float16)
    zeros = np.zeros((groups, out_f), dtype=np.int64)
    for g in range(groups):
        cols = perm[g * gs:(g + 1) * gs]
        wg = w[:, cols]
        lo = np.minimum(wg.min(axis=1), 0)
        hi = np.maximum(wg.max(axis=1), 0)
        if sym:
            m = np.maximum(np.abs(lo), hi)
            lo, hi = -m, m
        same = (lo == 0) & (hi == 0)
        lo[same], hi[same] = -1, 1
        scale = ((hi - lo) / maxq).astype(np.float16)
        scale[scale == 0] = np.float16(1e-4)
        zero = np.full(out_f, (maxq + 1) // 2) if sym else np.clip(np.round(-lo / scale.astype(np.float32)), 0, maxq)
        scales[g], zeros[g] = scale, zero
    s = scales[g_idx].T.astype(np.float32)   # [out, in]
    z = zeros[g_idx].T
    codes = np.clip(np.round(w / s + z), 0, maxq).astype(np.int64)   # [out, in]
    return codes, zeros, scales, g_idx


def gptq_dequantize(qweight, qzeros, scales, g_idx, bits, zero_offset):
    """The reference dequantiser: float32 [out, in], exact."""
    in_f = qweight.shape[0] * 32 // bits
    out_f = qweight.shape[1]
    q = unpack_stream(qweight, bits, 0, in_f)          # [in, out]
    z = unpack_stream(qzeros, bits, 1, out_f) + zero_offset   # [groups, out]
    s = scales.astype(np.float32)
    g = g_idx.astype(np.int64)
    w = s[g] * (q - z[g]).astype(np.float32)            # [in, out], exact products
    return np.ascontiguousarray(w.T)


def f16_round(x):
    return x.astype(np.float16)


CASES = [
    # name, bits, group_size, sym, desc_act, checkpoint_format, shards
    ("tiny-llama-gptq-4bit", 4, 32, True, False, "gptq", 1),
    ("tiny-llama-gptq-3bit-actorder", 3, 32, False, True, "gptq", 2),
    ("tiny-llama-gptq-8bit", 8, 64, False, False, "gptq", 1),
    ("tiny-llama-gptq-2bit-v2", 2, -1, False, False, "gptq_v2", 1),
]


def base_config():
    return json.load(open(os.path.join(BASE, "config.json")))


def copy_side_files(dst):
    for f in os.listdir(BASE):
        if not f.endswith(".safetensors") and not f.endswith(".index.json") and f != "config.json":
            shutil.copy(os.path.join(BASE, f), os.path.join(dst, f))


def write_model(dst, tensors, shards):
    names = list(tensors)
    if shards == 1:
        write_st(os.path.join(dst, "model.safetensors"), tensors)
        return
    split = (len(names) + 1) // 2
    parts = [names[:split], names[split:]]
    weight_map, total = {}, 0
    for k, part in enumerate(parts):
        fname = f"model-{k + 1:05d}-of-{len(parts):05d}.safetensors"
        write_st(os.path.join(dst, fname), {n: tensors[n] for n in part})
        for n in part:
            weight_map[n] = fname
            total += np.asarray(tensors[n][1]).astype(DT[tensors[n][0]][0]).nbytes
    json.dump({"metadata": {"total_size": total}, "weight_map": weight_map},
              open(os.path.join(dst, "model.safetensors.index.json"), "w"), indent=2)


def lora_deltas():
    a = read_st(os.path.join(ADAPTER, "adapter_model.safetensors"))
    cfg = json.load(open(os.path.join(ADAPTER, "adapter_config.json")))
    scale = np.float32(cfg["lora_alpha"] / cfg["r"])
    deltas = {}
    for k in a:
        if k.endswith(".lora_A.weight"):
            module = k[len("base_model.model."):-len(".lora_A.weight")]
            b = a[k.replace("lora_A", "lora_B")].astype(np.float32)
            deltas[module] = scale * (b @ a[k].astype(np.float32))
    return deltas


def main():
    rng = np.random.default_rng(20261123)
    base = read_model(BASE)
    deltas = lora_deltas()
    if os.path.isdir(OUT):
        shutil.rmtree(OUT)
    refs = os.path.join(OUT, "references")
    os.makedirs(refs)
    for name, bits, gs, sym, desc_act, fmt, shards in CASES:
        dst = os.path.join(OUT, name)
        os.makedirs(dst)
        tensors, dequant, merged = {}, {}, {}
        for k, w in base.items():
            module = k[:-len(".weight")]
            if k.endswith(".weight") and module.split(".")[-1] in LINEARS:
                codes, zeros, scales, g_idx = gptq_quantize(w.astype(np.float32), bits, gs, sym, desc_act, rng)
                offset = 1 if fmt == "gptq" else 0
                stored_zeros = (zeros - offset) & ((1 << bits) - 1)
                qweight = pack_stream(codes.T, bits, 0)
                qzeros = pack_stream(stored_zeros, bits, 1)
                # The packer and the dequantiser agree with the quantiser's integers.
                assert (unpack_stream(qweight, bits, 0, w.shape[1]) == codes.T).all()
                tensors[module + ".qweight"] = ("I32", qweight)
                tensors[module + ".qzeros"] = ("I32", qzeros)
                tensors[module + ".scales"] = ("F16", scales)
                tensors[module + ".g_idx"] = ("I32", g_idx)
                d = gptq_dequantize(qweight, qzeros, scales, g_idx, bits, offset)
                expect = scales[g_idx].T.astype(np.float32) * (codes - zeros[g_idx].T).astype(np.float32)
                assert (d == expect).all()
                dequant[k] = ("F32", d)
                if module in deltas:
                    merged[k] = ("F16", f16_round(d + deltas[module]))
            else:
                tensors[k] = ("F16", w.astype(np.float16))
        cfg = base_config()
        cfg.pop("torch_dtype", None)
        cfg["dtype"] = "float16"
        cfg["quantization_config"] = {
            "quant_method": "gptq", "bits": bits, "group_size": gs, "desc_act": desc_act,
            "sym": sym, "damp_percent": 0.01, "true_sequential": True,
            "checkpoint_format": fmt, "model_name_or_path": None, "model_file_base_name": None,
        }
        json.dump(cfg, open(os.path.join(dst, "config.json"), "w"), indent=2)
        copy_side_files(dst)
        write_model(dst, tensors, shards)
        write_st(os.path.join(refs, f"{name}.dequant.safetensors"), dequant)
        write_st(os.path.join(refs, f"{name}.merged-llama-lora.safetensors"), merged)
        print(f"wrote {dst}: {len(dequant)} GPTQ linears, {bits}-bit, group {gs}, "
              f"sym {sym}, act-order {desc_act}, {fmt}")

    # EXL2: structure only (see the module docstring).
    dst = os.path.join(OUT, "tiny-llama-exl2")
    os.makedirs(dst)
    tensors = {}
    for k, w in base.items():
        module = k[:-len(".weight")]
        if k.endswith(".weight") and module.split(".")[-1] in LINEARS:
            out_f, in_f = w.shape
            invperm = rng.permutation(in_f).astype(np.int16)
            # Groups of 32 rows: the first half at 6 bits, the rest at 4.
            bits_of = [6 if g < in_f // 64 else 4 for g in range(in_f // 32)]
            q_groups, row, rows_packed = [], 0, []
            for b in bits_of:
                q_groups += [b, row]
                row += 32 * b // 32
            codes = rng.integers(0, 16, size=(in_f, out_f))
            q_weight = np.zeros((row, out_f), dtype=np.int32)
            r = 0
            for g, b in enumerate(bits_of):
                q_weight[r:r + b] = pack_stream(codes[g * 32:(g + 1) * 32] % (1 << b), b, 0)
                r += b
            groups = len(bits_of)
            tensors[module + ".q_weight"] = ("I32", q_weight)
            tensors[module + ".q_invperm"] = ("I16", invperm)
            tensors[module + ".q_perm"] = ("I16", np.argsort(invperm).astype(np.int16))
            tensors[module + ".q_scale"] = ("I32", rng.integers(0, 2**31, size=(groups, out_f // 8)).astype(np.int32))
            tensors[module + ".q_scale_max"] = ("F16", rng.uniform(0.01, 0.1, groups).astype(np.float16))
            tensors[module + ".q_groups"] = ("I16", np.array(q_groups, dtype=np.int16))
        else:
            tensors[k] = ("F16", w.astype(np.float16))
    cfg = base_config()
    cfg.pop("torch_dtype", None)
    cfg["dtype"] = "float16"
    cfg["quantization_config"] = {"quant_method": "exl2", "version": "0.2.8", "bits": 5.0,
                                  "head_bits": 16, "calibration": {"rows": 100, "length": 2048}}
    json.dump(cfg, open(os.path.join(dst, "config.json"), "w"), indent=2)
    copy_side_files(dst)
    write_model(dst, tensors, 1)
    print(f"wrote {dst}: EXL2 structure, 6/4-bit groups")


if __name__ == "__main__":
    sys.exit(main())
