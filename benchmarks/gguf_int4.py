"""The GGUF's own 4-bit blocks kept as int4 (``gemma4.io.gguf_native.gguf_native_model``) on the real Gemma 3
270M: conversion error, perplexity / top-1 agreement (the same ``evaluate()``, text, fp32 reference and 2
threads as benchmarks/quant.py), a save/load round trip, and packed decode speed (1 thread) beside our
bf16 / int8 / int4-g32 models measured in the same run.

    python benchmarks/gguf_int4.py            # writes benchmarks/results/gguf_int4.json
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import torch  # noqa: E402

from quant import evaluate, ours_decode  # noqa: E402

# name -> gguf_native_model kwargs (None: made from the fp32 model with quant.quantize, as quant.py does)
VARIANTS = {
    "bf16": None,
    "int8 (our RTN, all)": ("int8", None),
    "int4-g32 (our RTN, all)": ("int4", 32),
    "gguf-native: Q4_K kept, rest int8": {"rest": "int8"},
    "gguf-native: Q4_K kept, rest int4-g32 RTN, emb int8": {"rest": "int4", "embedding": "int8"},
    "gguf-native: Q4_K kept, rest int4-g32 RTN": {"rest": "int4"},
}


def build(base, path, name):
    from gemma4.io.gguf_native import gguf_native_model
    from gemma4.quant.rtn import quantize

    v = VARIANTS[name]
    if isinstance(v, dict):
        return gguf_native_model(path, **v)
    m = copy.deepcopy(base)
    if v is not None:
        quantize(m, *v)
    return m.to(torch.bfloat16)


def conversion_error(path) -> dict:
    """Q4_K -> int4-g32 vs the GGUF's own float32 dequantization, every Q4_K tensor."""
    from gemma4.io.gguf import GGUFFile
    from gemma4.io.gguf_native import Q4_K, q4k_blocks, q4k_to_int4
    from gemma4.quant.rtn import int4_dequant, quantize_int4_tensor

    g = GGUFFile(path)
    worst = ratio = 0.0
    sq = sq_rtn = ref_sq = 0.0
    n = 0
    for name, t in g.tensors.items():
        if t.qtype != Q4_K:
            continue
        n += 1
        ref = g.load(name, torch.float32)
        codes, sz = q4k_to_int4(g.raw(name), t.shape)
        err = (int4_dequant(codes, sz, 32, torch.float32) - ref).abs()
        _, s, mn = q4k_blocks(g.raw(name))
        bound = ((8 * s.abs() + (8 * s - mn).abs()) * 2.0**-8)[:, :, None].expand(-1, -1, 32).reshape(ref.shape)
        worst, ratio = max(worst, err.max().item()), max(ratio, (err / bound.float()).max().item())
        sq += err.double().pow(2).sum().item()
        ref_sq += ref.double().pow(2).sum().item()
        q2, sz2 = quantize_int4_tensor(ref, 32)  # our quantizer on the same (already 4-bit) weights
        sq_rtn += (int4_dequant(q2, sz2, 32, torch.float32) - ref).double().pow(2).sum().item()
    return {"q4k_tensors": n, "max_abs_err": worst, "max_err_over_bound": ratio,
            "rel_rms_err": math.sqrt(sq / ref_sq), "rel_rms_err_our_rtn": math.sqrt(sq_rtn / ref_sq)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=24)
    ap.add_argument("--skip-speed", action="store_true")
    args = ap.parse_args()
    import gemma4
    from gemma4 import assets
    from gemma4.io import load_pretrained, save_pretrained
    from gemma4.io.gguf_native import gguf_native_types
    from gemma4.infer.fast_path import use_fast_path
    from gemma4.quant.rtn import model_nbytes

    path = assets.gemma3_270m_gguf()
    res: dict = {"time": time.strftime("%Y-%m-%d %H:%M"),
                 "gguf_types": {k: len(v) for k, v in gguf_native_types(path).items()}}
    res["conversion"] = conversion_error(path)
    print(json.dumps(res, indent=1), flush=True)

    torch.set_num_threads(2)
    tok = gemma4.load_tokenizer(path)
    ids = torch.tensor([tok.encode((HERE / "data" / "us_constitution.txt").read_text(encoding="utf-8"))])
    base = gemma4.load_pretrained("gemma3-270m", dtype=torch.float32)
    _, ref = evaluate(base, ids)  # fp32 argmax: the top-1 reference, as in quant.py
    out = HERE / "results" / "gguf_int4.json"
    out.parent.mkdir(exist_ok=True)
    rows = res["quality"] = {}
    for name in VARIANTS:
        m = build(base, path, name)
        nll, pred = evaluate(m, ids)
        r = {"ppl": math.exp(nll), "top1_agree_fp32": (pred == ref).float().mean().item(),
             "weights_mib": model_nbytes(m) / 2**20}
        if "bf16" in rows:
            r["vs_bf16"] = r["ppl"] / rows["bf16"]["ppl"] - 1
        rows[name] = r
        print(f"| {name} | {r['weights_mib']:.0f} | {r['ppl']:.4f} | {100 * r.get('vs_bf16', 0):+.2f}% | "
              f"{100 * r['top1_agree_fp32']:.2f}% |", flush=True)
        if name == "gguf-native: Q4_K kept, rest int8":  # the mixed model saves and loads unchanged
            with tempfile.TemporaryDirectory() as d:
                save_pretrained(m, d)
                m2 = load_pretrained(d)
                with torch.no_grad():
                    same = torch.equal(m(ids[:, :64]), m2(ids[:, :64]))
                res["save_load_identical_logits"] = bool(same)
                print("save/load identical logits:", same, flush=True)
                del m2
        out.write_text(json.dumps(res, indent=2))
        del m
        gc.collect()

    if args.skip_speed:
        return
    torch.set_num_threads(1)
    speed = ["bf16", "int8 (our RTN, all)", "int4-g32 (our RTN, all)", "gguf-native: Q4_K kept, rest int8",
             "gguf-native: Q4_K kept, rest int4-g32 RTN, emb int8"]
    models = {name: use_fast_path(build(base, path, name)) for name in speed}
    del base
    gc.collect()
    prompt = torch.randint(10, 20_000, (1, 32), generator=torch.Generator().manual_seed(0))
    runs: dict[str, list[float]] = {k: [] for k in models}
    for _ in range(args.rounds):
        for name, m in models.items():
            runs[name].append(ours_decode(m, prompt, args.new_tokens))
    res["speed"] = {name: {"best": max(v), "median": statistics.median(v), "all": v} for name, v in runs.items()}
    for name, v in res["speed"].items():
        print(f"| {name} (packed) | {v['best']:.1f} | {v['median']:.1f} |", flush=True)
    out.write_text(json.dumps(res, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
