"""GPTQ vs round-to-nearest on the real Gemma 3 270M: perplexity and top-1 agreement with the same
``evaluate()`` and text as benchmarks/quant.py (US Constitution, full text, 2 threads).

A second text, two chapters of *Alice's Adventures in Wonderland* (benchmarks/data/README.md), is
evaluated the same way: the model has largely memorized the Constitution (bf16 perplexity 4.66), and
quantization damages memorized recall more than ordinary prediction (Alice: bf16 perplexity 15.5).

Calibration (never an evaluation text): ``gemma4.quant.gptq.default_calibration_text()`` — the prose of Python's
reference documentation (``pydoc_data.topics``) first, 32 x 512 = 16,384 tokens by default. (The first
GPTQ rows used this repository's README + sources, 8 x 512 tokens: results/gptq_code_calib_4k.json.)

    python benchmarks/gptq.py            # writes benchmarks/results/gptq.json (rows appended as they finish)
    python benchmarks/gptq.py --variants bf16 "int4-g32 awq+gptq, int8 emb/head"
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import math
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import torch  # noqa: E402

from quant import evaluate  # noqa: E402

# name -> (method, scheme, group, extra)
VARIANTS = {
    "fp32": (None, None, None, {"dtype": "float32"}),
    "bf16": (None, None, None, {}),
    "int4-g32 rtn": ("rtn", "int4", 32, {}),
    "int4-g32 gptq": ("gptq", "int4", 32, {}),
    "int4-g32 gptq, int8 emb/head": ("gptq", "int4", 32, {"embedding_scheme": "int8"}),
    "int4-g32 rtn, int8 emb/head": ("rtn-mixed", "int4", 32, {}),
    "int8 gptq": ("gptq", "int8", None, {}),
    "int4-g32 awq+rtn, int8 emb/head": ("awq-rtn-mixed", "int4", 32, {}),
    "int4-g32 awq+gptq": ("gptq", "int4", 32, {"awq": True}),
    "int4-g32 awq+gptq, int8 emb/head": ("gptq", "int4", 32, {"awq": True, "embedding_scheme": "int8"}),
    "int4-g32 awq+gptq, int8 emb/head + k/v": ("gptq", "int4", 32, {"awq": True, "embedding_scheme": "int8",
                                                                    "int8_modules": ("k_proj", "v_proj")}),
    "int4-g128 awq+gptq, int8 emb/head": ("gptq", "int4", 128, {"awq": True, "embedding_scheme": "int8"}),
    "int4-g128 gptq, int8 emb/head": ("gptq", "int4", 128, {"embedding_scheme": "int8"}),
    "int4-g128 gptq": ("gptq", "int4", 128, {}),
}


def build(base, name, calib):
    from gemma4.quant.gptq import awq_scale, gptq_quantize
    from gemma4.quant.rtn import Int8Embedding, quantize

    method, scheme, gs, extra = VARIANTS[name]
    m = copy.deepcopy(base)
    t0 = time.perf_counter()
    if method == "rtn":
        quantize(m, scheme, gs)
    elif method in ("rtn-mixed", "awq-rtn-mixed"):
        if method == "awq-rtn-mixed":
            awq_scale(m, calib, gs)
        quantize(m, scheme, gs, embeddings=False)
        e = m.model.embed_tokens
        new = Int8Embedding(e.num_embeddings, e.embedding_dim)
        new.set_from_float(e.weight)
        m.model.embed_tokens = new  # tied: lm_head stays None, the table serves the head
    elif method == "gptq":
        gptq_quantize(m, scheme, gs, calib_ids=calib, **extra)
    if extra.get("dtype") == "float32":  # the unquantized reference itself
        return m, 0.0
    return m.to(torch.bfloat16), time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--variants", nargs="*", default=list(VARIANTS))
    ap.add_argument("--calib-tokens", type=int, default=16384)
    args = ap.parse_args()
    torch.set_num_threads(2)
    import gemma4
    from gemma4 import assets
    from gemma4.quant.gptq import calibration_ids
    from gemma4.quant.rtn import model_nbytes

    tok = gemma4.load_tokenizer(assets.gemma3_270m_gguf())
    ids = torch.tensor([tok.encode((HERE / "data" / "us_constitution.txt").read_text(encoding="utf-8"))])
    alice = torch.tensor([tok.encode((HERE / "data" / "alice_ch8_9.txt").read_text(encoding="utf-8"))])
    calib = calibration_ids(tok, n_tokens=args.calib_tokens)
    base = gemma4.load_pretrained("gemma3-270m", dtype=torch.float32)
    _, ref = evaluate(base, ids)  # fp32 argmax: the top-1 reference, as in quant.py
    _, ref_alice = evaluate(base, alice)
    out = HERE / "results" / "gptq.json"
    out.parent.mkdir(exist_ok=True)
    res = {"tokens": ids.shape[1], "calib_tokens": int(calib.numel()), "rows": {}}
    if out.exists():  # keep rows measured by earlier runs with the same text and calibration size
        old = json.loads(out.read_text())
        if (old.get("tokens"), old.get("calib_tokens")) == (res["tokens"], res["calib_tokens"]):
            res["rows"] = old["rows"]
    for name in args.variants:
        m, qs = build(base, name, calib)
        nll, pred = evaluate(m, ids)
        nll_a, pred_a = evaluate(m, alice)
        r = {"ppl": math.exp(nll), "top1_agree_fp32": (pred == ref).float().mean().item(),
             "alice_ppl": math.exp(nll_a), "alice_top1_agree_fp32": (pred_a == ref_alice).float().mean().item(),
             "weights_mib": model_nbytes(m) / 2**20, "quantize_s": qs}
        if "bf16" in res["rows"]:
            r["vs_bf16"] = r["ppl"] / res["rows"]["bf16"]["ppl"] - 1
            if "alice_ppl" in res["rows"]["bf16"]:
                r["alice_vs_bf16"] = r["alice_ppl"] / res["rows"]["bf16"]["alice_ppl"] - 1
        res["rows"][name] = r
        print(f"| {name} | {r['weights_mib']:.0f} | {r['ppl']:.4f} | {100 * r.get('vs_bf16', 0):+.2f}% | "
              f"{100 * r['top1_agree_fp32']:.2f}% | {r['alice_ppl']:.4f} | {100 * r.get('alice_vs_bf16', 0):+.2f}% | "
              f"{100 * r['alice_top1_agree_fp32']:.2f}% | {qs:.0f} |", flush=True)
        out.write_text(json.dumps(res, indent=2))
        del m
        gc.collect()


if __name__ == "__main__":
    main()
