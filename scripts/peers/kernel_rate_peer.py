"""torch on the same shapes as the kernel_rate example: a device-to-device copy of the weight
(the memory-bandwidth ceiling for read W + write W') and the merge torch users write,
`torch.addmm(W, B, A, alpha=s)` in bf16. Timed with CUDA events over 50 runs.

    python3 scripts/peers/kernel_rate_peer.py ROWS COLS RANK
"""
import json
import sys

import torch


def timed(fn, n=50):
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(n):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / n / 1e3


def main():
    rows, cols, rank = (int(x) for x in sys.argv[1:4])
    w = torch.randn(rows, cols, device="cuda", dtype=torch.bfloat16) * 0.02
    out = torch.empty_like(w)
    b = torch.randn(rows, rank, device="cuda", dtype=torch.bfloat16) * 0.01
    a = torch.randn(rank, cols, device="cuda", dtype=torch.bfloat16) * 0.01
    bytes_ = rows * cols * 2 * 2
    for label, fn in [("torch-copy-ceiling", lambda: out.copy_(w)),
                      ("torch-addmm-merge", lambda: torch.addmm(w, b, a, alpha=2.0, out=out))]:
        s = timed(fn)
        print(json.dumps({"label": label, "rows": rows, "cols": cols, "rank": rank,
                          "ms": round(s * 1e3, 3), "gb_per_s": round(bytes_ / s / 1e9, 1)}))


if __name__ == "__main__":
    main()
