"""Checks checkpoints written by weightsmith against the originals with the real libraries.

    python3 scripts/device/check_written.py ORIGINAL WRITTEN [--transformers]

Every tensor of ORIGINAL (a folder or file) must be in WRITTEN with the same dtype, shape and
bytes, as read by Python `safetensors` (safe_open, framework "pt" when torch is there, else the
framework-free `safetensors.deserialize`). With --transformers, both folders are loaded with
`AutoModelForCausalLM.from_pretrained` and their logits on a fixed input must be identical.
Prints one JSON line with what was compared; exits 1 on any difference.
"""

import hashlib
import json
import os
import sys

import safetensors


def read_all(path):
    files = [path] if os.path.isfile(path) else [
        os.path.join(path, f) for f in sorted(os.listdir(path)) if f.endswith(".safetensors")]
    out = {}
    for f in files:
        with open(f, "rb") as fh:
            for name, t in safetensors.deserialize(fh.read()):
                out[name] = (t["dtype"], list(t["shape"]), hashlib.sha256(bytes(t["data"])).hexdigest())
    return out, [os.path.basename(f) for f in files]


def main():
    original, written = sys.argv[1], sys.argv[2]
    a, _ = read_all(original)
    b, files = read_all(written)
    problems = [f"{k}: {a.get(k)} != {b.get(k)}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    result = {"tensors": len(a), "written_files": files, "identical": not problems}
    if os.path.isdir(written) and len(files) > 1:
        with open(os.path.join(written, "model.safetensors.index.json")) as fh:
            index = json.load(fh)
        mapped = {k: v for k, v in index["weight_map"].items()}
        for f in files:
            with open(os.path.join(written, f), "rb") as fh:
                for name, _ in safetensors.deserialize(fh.read()):
                    if mapped.get(name) != f:
                        problems.append(f"index maps {name} to {mapped.get(name)}, found in {f}")
        result["index_total_size_ok"] = index["metadata"]["total_size"] == sum(
            len(bytes(t["data"])) for f in files
            for _, t in safetensors.deserialize(open(os.path.join(written, f), "rb").read()))
        if not result["index_total_size_ok"]:
            problems.append("index total_size differs from the tensor bytes")
    if "--transformers" in sys.argv:
        import torch
        from transformers import AutoModelForCausalLM
        ids = torch.arange(0, 12).reshape(1, 12) % 100
        logits = []
        for d in (original, written):
            m = AutoModelForCausalLM.from_pretrained(d, torch_dtype=torch.float32).eval()
            with torch.no_grad():
                logits.append(m(ids).logits)
        result["transformers_logits_equal"] = bool(torch.equal(logits[0], logits[1]))
        if not result["transformers_logits_equal"]:
            problems.append("transformers logits differ")
    result["problems"] = problems
    print(json.dumps(result))
    sys.exit(1 if problems else 0)


if __name__ == "__main__":
    main()
