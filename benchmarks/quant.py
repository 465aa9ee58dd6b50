"""Quantization quality and speed on the real Gemma 3 270M.

The one real checkpoint reachable here is the Q4_K_M GGUF of Gemma 3 270M; ``load_pretrained`` dequantizes it
to float32, and that float32 model is the "unquantized" reference every variant is made from.

Quality (2 threads): perplexity on ``benchmarks/data/us_constitution.txt`` (public domain, 5480 tokens with
BOS, see data/README.md), evaluated in 512-token chunks through the KV cache, and top-1 next-token
agreement with the float32 model, for fp32 / bf16 / int8 / int4-g32 / int4-g128 (quantized variants run
with bf16 activations, the dtype the kernels take).

Speed (1 thread, same process, interleaved rounds, best round reported): greedy decode tok/s after a
32-token prompt, ours (bf16 / int8 / int4) beside transformers' ``Gemma3ForCausalLM`` in bf16 on the same
weights (our float model saved with ``save_pretrained``); each variant also runs after
``gemma4.infer.fast_path.use_fast_path`` ("packed" rows, the CLI's default path). Peak memory: a fresh subprocess per variant
(load, 512-token prefill, 16 decode steps), peak RSS minus a python+torch baseline (benchmarks/memory.py).

    python benchmarks/quant.py            # writes benchmarks/results/quant.json
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import torch  # noqa: E402

import memory as membench  # noqa: E402

QUALITY = ["fp32", "bf16", "int8", "int4-g32", "int4-g128"]
SPEED = ["bf16", "int8", "int4-g32", "int4-g128"]


def make_variant(base, name):
    from gemma4.quant.rtn import quantize

    m = copy.deepcopy(base)
    if name == "fp32":
        return m
    if name != "bf16":
        scheme, gs = membench.VARIANTS[name]
        quantize(m, scheme, gs)
    return m.to(torch.bfloat16)


@torch.no_grad()
def token_nll(model, ids: torch.Tensor, chunk: int = 512, head_rows: int = 128):
    """(NLL of every next token [T-1], argmax per position [T-1]) over ids [1, T], the cache carrying
    context across chunks."""
    cache = model.new_cache()
    nll, preds = [], []
    t = ids.shape[1]
    for s in range(0, t - 1, chunk):
        e = min(t - 1, s + chunk)
        h = model.model(ids[:, s:e], cache=cache)  # [1, n, H]
        for r in range(0, h.shape[1], head_rows):
            lg = model.logits(h[:, r : r + head_rows]).float()[0]  # [rows, V]
            tgt = ids[0, s + r + 1 : s + r + 1 + lg.shape[0]]
            nll.append(torch.nn.functional.cross_entropy(lg, tgt, reduction="none"))
            preds.append(lg.argmax(-1))
    return torch.cat(nll), torch.cat(preds)


@torch.no_grad()
def evaluate(model, ids: torch.Tensor, chunk: int = 512, head_rows: int = 128):
    """(mean NLL, argmax per position [T-1]) over ids [1, T]."""
    nll, preds = token_nll(model, ids, chunk, head_rows)
    return nll.mean().item(), preds


@torch.no_grad()
def ours_decode(model, prompt, n_new):
    from gemma4.infer.generate import decode_step, prefill

    cache = model.new_cache()
    tok = prefill(model, prompt, cache).argmax(-1)
    t0 = time.perf_counter()
    for _ in range(n_new):
        tok = decode_step(model, tok, cache).argmax(-1)
    return n_new / (time.perf_counter() - t0)


@torch.no_grad()
def hf_decode(model, prompt, n_new):
    out = model(input_ids=prompt, use_cache=True)
    pkv = out.past_key_values
    tok = out.logits[:, -1].argmax(-1, keepdim=True)
    t0 = time.perf_counter()
    for _ in range(n_new):
        out = model(input_ids=tok, past_key_values=pkv, use_cache=True)
        pkv = out.past_key_values
        tok = out.logits[:, -1].argmax(-1, keepdim=True)
    return n_new / (time.perf_counter() - t0)


def hf_child(path: str) -> dict:
    torch.set_num_threads(1)
    import transformers

    m = transformers.Gemma3ForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
    gc.collect()
    membench._reset_peak()
    prompt = torch.randint(10, 20_000, (1, 512), generator=torch.Generator().manual_seed(0))
    hf_decode(m, prompt, 16)
    return {"run_hwm_kb": membench._status_kb("VmHWM")}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hf-child")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=24)
    ap.add_argument("--skip-quality", action="store_true")
    ap.add_argument("--workdir", default=str(Path("/tmp") / "gemma4-bench-270m"))
    args = ap.parse_args()
    if args.hf_child:
        print(json.dumps(hf_child(args.hf_child)))
        return
    from rich.console import Console
    from rich.table import Table

    import gemma4
    from gemma4 import assets
    from gemma4.quant.rtn import kernels_available, model_nbytes

    con = Console(width=150)
    results: dict = {"kernels": kernels_available(), "time": time.strftime("%Y-%m-%d %H:%M")}
    base = gemma4.load_pretrained("gemma3-270m", dtype=torch.float32)

    # ------------------------------------------------------------------ quality
    if not args.skip_quality:
        torch.set_num_threads(2)
        tok = gemma4.load_tokenizer(assets.gemma3_270m_gguf())
        text = (HERE / "data" / "us_constitution.txt").read_text(encoding="utf-8")
        ids = torch.tensor([tok.encode(text)])
        qrows, ref_pred = {}, None
        for name in QUALITY:
            m = make_variant(base, name)
            t0 = time.perf_counter()
            nll, pred = evaluate(m, ids)
            if ref_pred is None:
                ref_pred = pred
            qrows[name] = {"ppl": math.exp(nll), "nll": nll, "top1_agree_fp32": (pred == ref_pred).float().mean().item(),
                           "weights_mib": model_nbytes(m) / 2**20, "eval_s": time.perf_counter() - t0}
            con.print(f"{name}: ppl {qrows[name]['ppl']:.4f}  agree {qrows[name]['top1_agree_fp32']:.4f}")
            del m
            gc.collect()
        results["quality"] = {"tokens": ids.shape[1], "rows": qrows}
        t = Table(title=f"Gemma 3 270M perplexity, US Constitution ({ids.shape[1]} tokens)")
        for c in ("variant", "weights MiB", "perplexity", "vs bf16", "top-1 agreement with fp32"):
            t.add_column(c, justify="right")
        b = qrows["bf16"]["ppl"]
        for name, r in qrows.items():
            t.add_row(name, f"{r['weights_mib']:.0f}", f"{r['ppl']:.4f}", f"{100 * (r['ppl'] / b - 1):+.2f}%",
                      f"{100 * r['top1_agree_fp32']:.2f}%")
        con.print(t)

    # ------------------------------------------------------------------ speed
    torch.set_num_threads(1)
    ckpts = membench.prepare_checkpoints(Path(args.workdir), SPEED)
    import transformers

    hf = transformers.Gemma3ForCausalLM.from_pretrained(str(ckpts["bf16"]), dtype=torch.bfloat16).eval()
    models = {name: make_variant(base, name) for name in SPEED}
    from gemma4.infer.fast_path import use_fast_path

    # The same variants through use_fast_path (what `gemma4 generate` runs): fused kernel calls, f32 logits.
    models.update({f"{name} packed": use_fast_path(make_variant(base, name)) for name in SPEED})
    del base
    gc.collect()
    prompt = torch.randint(10, 20_000, (1, 32), generator=torch.Generator().manual_seed(0))
    runs: dict[str, list[float]] = {k: [] for k in ["transformers-bf16", *models]}
    for _ in range(args.rounds):
        runs["transformers-bf16"].append(hf_decode(hf, prompt, args.new_tokens))
        for name, m in models.items():
            runs[name].append(ours_decode(m, prompt, args.new_tokens))
    del hf, models
    gc.collect()
    basekb = membench.baseline_kb()
    peaks = {}
    for name in SPEED:
        r = membench.run_child({"mode": "run", "path": str(ckpts[name]), "context": 512, "decode": 16})
        peaks[name] = (r["run_hwm_kb"] - basekb) / 1024
    import subprocess

    r = subprocess.run([sys.executable, __file__, "--hf-child", str(ckpts["bf16"])], capture_output=True, text=True,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    peaks["transformers-bf16"] = ((json.loads(r.stdout.strip().splitlines()[-1])["run_hwm_kb"] - basekb) / 1024
                                  if r.returncode == 0 else float("nan"))
    hf_best = max(runs["transformers-bf16"])
    t = Table(title=f"decode speed, 1 thread, 32-token prompt, {args.new_tokens} new tokens (best of {args.rounds} interleaved rounds)")
    for c in ("engine", "tok/s best", "tok/s median", "x transformers bf16", "peak RSS MiB (512 prompt)"):
        t.add_column(c, justify="right")
    srows = {}
    for name, v in runs.items():
        srows[name] = {"best": max(v), "median": statistics.median(v), "all": v, "x_hf": max(v) / hf_best,
                       "peak_rss_mib": peaks.get(name)}
        t.add_row(name, f"{max(v):.1f}", f"{statistics.median(v):.1f}", f"{max(v) / hf_best:.2f}",
                  f"{peaks.get(name, float('nan')):.0f}")
    con.print(t)
    results["speed"] = {"baseline_kb": basekb, "rows": srows, "llama_cpp": "not installed (llama-cpp-python absent)"}
    out = HERE / "results" / "quant.json"
    out.parent.mkdir(exist_ok=True)
    if args.skip_quality and out.exists():  # keep the quality rows of the last full run
        prev = json.loads(out.read_text())
        if "quality" in prev:
            results["quality"], results["quality_time"] = prev["quality"], prev.get("quality_time", prev.get("time"))
    out.write_text(json.dumps(results, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
