"""Quantization quality on weights never quantized before: the house model (issue 16 item 4).

Every earlier quantization number (benchmarks/quant.py, gptq.py) was measured on Gemma 3 270M, whose
only reachable checkpoint is a Q4_K_M GGUF: its "float" weights had already been through a 4-bit grid
once, which flatters every int4 recipe. The house model (gemma4.io.house, 2.83 M parameters, trained
here from scratch in fp32 master weights) has never been quantized, and it has the Gemma 4 parts the
270M lacks (per-layer embeddings, KV sharing, K=V full layers).

Evaluation: held-out perplexity on every token of the three held-out plays (Othello, Richard II,
Twelfth Night), measured exactly as the house build measured its held-out loss: each play one document
(BOS + text, `gemma4.train.data.encode_text`), cut into 128-token pieces (the training row length; a
piece's first token is not predicted), one piece per row (`gemma4.train.data.pack`), batches of 32
rows. Also: top-1 agreement of every variant's argmax with the fp32 master's.

Variants: fp32 (the master), bf16 (the reference every % is against), int8 RTN / GPTQ, int4-g32 RTN /
GPTQ / AWQ+GPTQ, and the mixed recipes (int8 embedding table, k/v at int8). Quantized variants run with
bf16 activations (the dtype the int8/int4 CPU kernels take), as in benchmarks/quant.py.

House-specific detail: the PLE output projection (`layers.N.per_layer_projection`, [128 x 16]) has an
input dim of 16, which no int4 group size divides: int4 variants store those six 4 KB matrices at int8
(a recorded per-module override, so such a model saves and loads like any other).

Calibration for GPTQ/AWQ: 128 rows of 128 tokens (BOS + 127) drawn at seeded random offsets from the
39 *training* plays (never the held-out ones), 16,384 tokens.

    python benchmarks/house_quant.py            # writes benchmarks/results/house_quant.json
    python benchmarks/house_quant.py --variants bf16 "int4-g32 rtn"
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from gemma4._util import atomic_write_text
from gemma4.io import load_pretrained
from gemma4.io.house import HELDOUT_PLAYS, house_model_dir, shakespeare_texts
from gemma4.quant import gptq_quantize, model_nbytes, quantize
from gemma4.quant.gptq import awq_scale
from gemma4.text import load_tokenizer
from gemma4.train.data import encode_text, iterate_rows, pack
from gemma4.train.loss import IGNORE

HERE = Path(__file__).resolve().parent
SEQ_LEN = 128  # the house model's training row length (and its held-out evaluation's)
GOALS = {"int8": 0.005, "int4": 0.03}  # perplexity over bf16 (issue 16 item 4)

# name -> (method, scheme, group size, options). Methods: "float" (no quantization), "rtn" (quantize),
# "gptq" (gptq_quantize), "awq-rtn" (awq_scale then quantize).
VARIANTS = {
    "fp32": ("float", None, None, {"dtype": torch.float32}),
    "bf16": ("float", None, None, {}),
    "int8 rtn": ("rtn", "int8", None, {}),
    "int8 gptq": ("gptq", "int8", None, {}),
    "int4-g32 rtn": ("rtn", "int4", 32, {}),
    "int4-g32 gptq": ("gptq", "int4", 32, {}),
    "int4-g32 awq+rtn": ("awq-rtn", "int4", 32, {}),
    "int4-g32 awq+gptq": ("gptq", "int4", 32, {"awq": True}),
    "int4-g32 rtn, int8 emb/head": ("rtn", "int4", 32, {"embedding_scheme": "int8"}),
    "int4-g32 rtn, int8 emb/head + PLE table": ("rtn", "int4", 32, {"embedding_scheme": "int8", "ple_scheme": "int8"}),
    "int4-g32 gptq, int8 emb/head": ("gptq", "int4", 32, {"embedding_scheme": "int8"}),
    "int4-g32 awq+gptq, int8 emb/head": ("gptq", "int4", 32, {"awq": True, "embedding_scheme": "int8"}),
    "int4-g32 awq+gptq, int8 emb/head + k/v": ("gptq", "int4", 32, {"awq": True, "embedding_scheme": "int8",
                                                                    "int8_modules": ("k_proj", "v_proj")}),
}
DEFAULT = ["fp32", "bf16", "int8 rtn", "int8 gptq", "int4-g32 rtn", "int4-g32 gptq", "int4-g32 awq+rtn",
           "int4-g32 awq+gptq", "int4-g32 rtn, int8 emb/head", "int4-g32 rtn, int8 emb/head + PLE table",
           "int4-g32 gptq, int8 emb/head",
           "int4-g32 awq+gptq, int8 emb/head", "int4-g32 awq+gptq, int8 emb/head + k/v"]

# Modules whose input dim (16, the PLE width) no int4 group divides: stored at int8 under int4.
NARROW = "per_layer_projection"


def heldout_rows(tok, texts: dict[str, str]):
    """Packed 128-token rows of the held-out plays, as the house build's held-out evaluation made them."""
    docs = [encode_text(tok, texts[name], source=name) for name in sorted(HELDOUT_PLAYS)]
    return pack(docs, SEQ_LEN, tok.pad_id or 0)


def calibration_rows(tok, texts: dict[str, str], rows: int = 128, seed: int = 0) -> torch.Tensor:
    """[rows, SEQ_LEN] calibration ids: BOS + 127 tokens from seeded random offsets in the training plays."""
    train = [n for n in sorted(texts) if n not in HELDOUT_PLAYS]
    ids = [tok.encode(texts[n], add_bos=False) for n in train]
    g = torch.Generator().manual_seed(seed)
    out = torch.empty(rows, SEQ_LEN, dtype=torch.long)
    bos = tok.bos_id if tok.bos_id is not None else 2
    for r in range(rows):
        doc = ids[int(torch.randint(len(ids), (1,), generator=g))]
        s = int(torch.randint(len(doc) - SEQ_LEN, (1,), generator=g))
        out[r, 0] = bos
        out[r, 1:] = torch.tensor(doc[s : s + SEQ_LEN - 1])
    return out


@torch.no_grad()
def evaluate(model, data, batch_size: int = 32) -> tuple[float, int, torch.Tensor]:
    """(mean NLL, target count, argmax of every target position in row order) over packed rows."""
    nll, n, preds = 0.0, 0, []
    for b in iterate_rows(data, batch_size):
        h = model.model(b["input_ids"], position_ids=b["position_ids"], segment_ids=b["segment_ids"])  # [B,T,H]
        logits = model.logits(h[:, :-1]).float()  # [B,T-1,V]: position t predicts token t+1
        tgt = b["labels"][:, 1:]
        keep = tgt != IGNORE
        nll += float(F.cross_entropy(logits[keep], tgt[keep], reduction="sum"))
        n += int(keep.sum())
        preds.append(logits[keep].argmax(-1))
    return nll / n, n, torch.cat(preds)


def narrow_overrides(model) -> dict[str, dict]:
    return {name: {"scheme": "int8"} for name, _ in model.named_modules() if name.endswith(NARROW)}


def build(base, name: str, calib: torch.Tensor):
    """A fresh copy of the fp32 master made into variant ``name``; returns (model, seconds to quantize)."""
    method, scheme, gs, opts = VARIANTS[name]
    m = copy.deepcopy(base)
    t0 = time.perf_counter()
    if method == "float":
        return m.to(opts.get("dtype", torch.bfloat16)), 0.0
    int4 = scheme == "int4"
    if method in ("rtn", "awq-rtn"):
        if method == "awq-rtn":
            awq_scale(m, calib, gs)
        over = narrow_overrides(m) if int4 else {}
        if opts.get("embedding_scheme") == "int8":
            over["model.embed_tokens"] = {"scheme": "int8"}
        if opts.get("ple_scheme") == "int8":
            over["model.embed_tokens_per_layer"] = {"scheme": "int8"}
        quantize(m, scheme, gs, overrides=over or None)
    else:
        extra = dict(opts)
        if int4:  # GPTQ the narrow PLE projections to int8 (gptq_quantize records them as overrides)
            extra["int8_modules"] = tuple(extra.get("int8_modules", ())) + (NARROW,)
        gptq_quantize(m, scheme, gs, calib_ids=calib, **extra)
    return m.to(torch.bfloat16), time.perf_counter() - t0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--variants", nargs="*", default=DEFAULT, choices=list(VARIANTS), metavar="VARIANT")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", type=Path, default=HERE / "results" / "house_quant.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    d = house_model_dir("house-shakespeare")
    tok = load_tokenizer(d / "tokenizer.json")
    texts = shakespeare_texts()
    data = heldout_rows(tok, texts)
    calib = calibration_rows(tok, texts)
    base = load_pretrained(d, dtype=torch.float32)
    names = list(dict.fromkeys(["fp32", "bf16"] + list(args.variants)))  # the references first
    res = {"model": str(d), "heldout_plays": sorted(HELDOUT_PLAYS), "rows": len(data), "seq_len": SEQ_LEN,
           "threads": args.threads, "calib_tokens": int(calib.numel()), "goals_vs_bf16": GOALS, "variants": {}}
    ref_pred = None
    print(f"held-out: {len(data)} rows of {SEQ_LEN} ({data.target_tokens} targets); calibration {calib.numel()} tokens")
    print("| variant | weights KiB | held-out loss | perplexity | vs bf16 | top-1 = fp32 | quantize s |")
    print("|---|---|---|---|---|---|---|")
    for name in names:
        m, qs = build(base, name, calib)
        t0 = time.perf_counter()
        nll, n, pred = evaluate(m, data)
        ev = time.perf_counter() - t0
        if ref_pred is None:
            ref_pred = pred
        r = {"loss": nll, "ppl": math.exp(nll), "targets": n, "top1_agree_fp32": float((pred == ref_pred).float().mean()),
             "weights_kib": model_nbytes(m) / 1024, "quantize_s": round(qs, 2), "eval_s": round(ev, 2),
             "quantization": m.config.quantization}
        bf = res["variants"].get("bf16")
        if bf is not None:
            r["vs_bf16"] = r["ppl"] / bf["ppl"] - 1
            scheme = VARIANTS[name][1]
            if scheme in GOALS:
                r["goal"] = GOALS[scheme]
                r["goal_met"] = r["vs_bf16"] <= GOALS[scheme]
        res["variants"][name] = r
        vs = f"{100 * r['vs_bf16']:+.2f}%" if "vs_bf16" in r else "-"
        print(f"| {name} | {r['weights_kib']:.0f} | {nll:.4f} | {r['ppl']:.2f} | {vs} | "
              f"{100 * r['top1_agree_fp32']:.2f}% | {qs:.1f} |", flush=True)
        args.json.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(args.json, json.dumps(res, indent=2, default=str) + "\n")
        del m
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
