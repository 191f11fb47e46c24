"""Loads weightsmith's merge of every architecture-matrix case with transformers and compares
its logits with PEFT's.

    python3 scripts/device/check_arch_matrix.py fixtures/matrix OURS_DIR [--json out.json]

OURS_DIR/<model_type>/ holds `weightsmith merge --base fixtures/matrix/<t>/base --adapter
fixtures/matrix/<t>/adapter --out OURS_DIR/<t>` (scripts/device/arch-matrix.sh makes them). For
each case: transformers' from_pretrained(output_loading_info=True) must report nothing missing,
unexpected, mismatched or failed; the logits on the case's input ids (bfloat16, eager
attention, as PEFT's were made) are compared with PEFT's merged model's and with the PeftModel's
before merging. Prints a table; exits 1 when a case fails.
"""

import json
import os
import sys

import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM


def check(matrix, ours, model_type):
    case_dir = os.path.join(matrix, model_type)
    with open(os.path.join(case_dir, "case.json")) as fh:
        case = json.load(fh)
    out = os.path.join(ours, model_type)
    model, info = AutoModelForCausalLM.from_pretrained(
        out, dtype=torch.bfloat16, attn_implementation=case["attn_implementation"],
        output_loading_info=True)
    model.eval()
    info = {k: sorted(map(str, v)) for k, v in info.items() if v}
    ids = torch.tensor(case["input_ids"])
    with torch.no_grad():
        logits = model(input_ids=ids).logits.float()
    ref = load_file(os.path.join(case_dir, "logits.safetensors"))
    scale = ref["peft_merged"].abs().max().item()
    d_merged = (logits - ref["peft_merged"]).abs().max().item()
    d_peft = (logits - ref["peft"]).abs().max().item()
    d_peft_own = (ref["peft_merged"] - ref["peft"]).abs().max().item()
    # Our weights are within 1 ulp of PEFT's merge: bf16 logits may move by a few of their own
    # ulps (2^-8 relative) where a weight differs. PEFT's own merged model strays from its
    # unmerged model by d_peft_own; ours may stray as far, and a little more.
    ok = not info and d_merged <= 2 ** -6 * max(scale, 1.0) and d_peft <= max(2 * d_peft_own, 2 ** -6 * scale)
    return {"model_type": model_type, "architecture": case["architecture"],
            "loading_info": info, "max_abs_logit": scale,
            "vs_peft_merged": d_merged, "vs_peft_unmerged": d_peft,
            "peft_merged_vs_unmerged": d_peft_own, "ok": ok}


def main():
    matrix, ours = sys.argv[1], sys.argv[2]
    json_out = sys.argv[sys.argv.index("--json") + 1] if "--json" in sys.argv else None
    rows = []
    for t in sorted(os.listdir(matrix)):
        if not os.path.exists(os.path.join(matrix, t, "case.json")):
            continue
        try:
            rows.append(check(matrix, ours, t))
        except Exception as e:  # a case transformers refuses is a failure, reported with the rest
            rows.append({"model_type": t, "ok": False, "error": repr(e)})
    print(f"{'model_type':<14} {'loading info':<14} {'|logit|max':>10} {'vs PEFT merged':>15} {'vs PEFT unmerged':>17} {'PEFT own':>9}  ok")
    for r in rows:
        if "error" in r:
            print(f"{r['model_type']:<14} ERROR {r['error']}")
            continue
        info = "empty" if not r["loading_info"] else json.dumps(r["loading_info"])[:40]
        print(f"{r['model_type']:<14} {info:<14} {r['max_abs_logit']:>10.4f} {r['vs_peft_merged']:>15.3g} "
              f"{r['vs_peft_unmerged']:>17.3g} {r['peft_merged_vs_unmerged']:>9.3g}  {'yes' if r['ok'] else 'NO'}")
    if json_out:
        with open(json_out, "w") as fh:
            json.dump(rows, fh, indent=1)
    failed = [r["model_type"] for r in rows if not r["ok"]]
    print(f"{len(rows) - len(failed)} of {len(rows)} cases pass" + (f"; failed: {failed}" if failed else ""))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
