"""Attention backends at long context: prefill time, peak memory, and quality against exact attention.

A tiny Gemma 4 config (2 layers [sliding, full], hidden 256, 4 query heads / 1 KV head of dim 64,
window 512, vocab 4096) with random weights (``init_random_``: matrices N(0, 0.02), norm scales
U(0.5, 1.5)). Gemma's post-attention norms give the attention branch a residual share of RMS ~1
against ~0.3 for the token embedding, so the logits depend on what attention returned.

Input: "random but structured" — a random 64-token motif repeated over the whole context with 10%
of the tokens replaced at random, so attention has long-range copies to find. Random q/k with
norm scales ~1 give peaky attention (score std ~8), so this is a harsh test: any change of the
attended keys changes the output.

Second suite (``--real-contexts``, default 1k and 4k): the one trained checkpoint reachable here,
Gemma 3 270M (``load_pretrained("gemma3-270m")``, Q4_K_M dequantized to fp32; 18 layers, 15 sliding
with window 512, 3 full), on real text: the project's own spec (gemma4-spec.md) tokenized with
the checkpoint's tokenizer. Besides agreement with exact attention it reports each backend's
teacher-forced next-token accuracy on that text.

Each (backend, context) runs in its own subprocess: peak memory is that process's peak RSS minus its
RSS after a warm-up (model + runtime), and one backend's allocations cannot inflate another's.
Quality compares the last ``--positions`` logits with the exact backend (sdpa; eager where run):
mean KL(exact || backend), top-1 next-token agreement, max |delta logit|.

    python benchmarks/attention.py                      # 1k/4k/16k, 1 thread
    python benchmarks/attention.py --contexts 1024 --threads 2
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

BACKENDS = ("eager", "sdpa", "block_sparse", "linear", "masks")  # "masks": the model's mask building alone
S, F = "sliding_attention", "full_attention"
CONFIG = dict(model_type="gemma4_text", vocab_size=4096, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
              layer_types=[S, F], num_attention_heads=4, num_key_value_heads=1, head_dim=64, global_head_dim=64,
              sliding_window=512, hidden_size_per_layer_input=0, final_logit_softcapping=30.0,
              max_position_embeddings=32768)


def _status_mb(key: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _reset_peak() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) so loading the checkpoint does not count."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def structured_ids(n: int, vocab: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    motif = torch.randint(3, vocab, (64,), generator=g)
    ids = motif.repeat(-(-n // 64))[:n].clone()
    noise = torch.rand(n, generator=g) < 0.10
    ids[noise] = torch.randint(3, vocab, (int(noise.sum()),), generator=g)
    return ids[None]


SPEC = Path(__file__).resolve().parents[1] / "../shared/reference/gemma4-spec.md"


def real_ids(n: int) -> torch.Tensor:
    from gemma4 import assets, load_tokenizer

    tok = load_tokenizer(str(assets.gemma3_270m_gguf()))
    ids = tok.encode(SPEC.resolve().read_text(encoding="utf-8"))
    if len(ids) < n:
        raise SystemExit(f"the spec has only {len(ids)} tokens, fewer than the context {n}")
    return torch.tensor([ids[:n]])


def worker(suite: str, backend: str, ctx: int, positions: int, out: str) -> None:
    from safetensors.torch import save_file

    import gemma4.model.attention  # noqa: F401  (registers block_sparse / linear)
    from gemma4 import Gemma4Config, build_model, init_random_, load_pretrained

    if suite == "tiny":
        model = init_random_(build_model(Gemma4Config.from_dict(CONFIG)), seed=0)
        ids = structured_ids(ctx, CONFIG["vocab_size"])
    else:
        model = load_pretrained("gemma3-270m", dtype=torch.float32)
        ids = real_ids(ctx)
    if backend != "masks":
        model.set_attention_backend(backend)
    with torch.no_grad():
        model(ids[:, :256], keep_last=1)  # warm-up: kernels, allocator
        reset = _reset_peak()
        base = _status_mb("VmRSS")
        t0 = time.perf_counter()
        if backend == "masks":  # what the model builds for any backend: one dense [T,S] mask per layer type
            from gemma4.model.decoder import build_mask

            slots = torch.arange(ctx)
            masks = [build_mask(slots, slots, model.config.sliding_window if lt == S else None, None)
                     for lt in sorted(set(model.config.layer_types))]
            logits = torch.zeros(positions, model.config.vocab_size)
        else:
            logits = model(ids, keep_last=positions)[0]
        dt = time.perf_counter() - t0
    # VmHWM after the reset = peak of this prefill; else the process-lifetime peak.
    peak = _status_mb("VmHWM") if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    save_file({"logits": logits.contiguous(), "ids": ids[0].contiguous()}, out)
    print(json.dumps({"seconds": dt, "peak_rss_mb": peak, "base_rss_mb": base}))


def quality(ref: torch.Tensor, got: torch.Tensor, ids: torch.Tensor | None = None) -> dict:
    lp, lq = torch.log_softmax(ref.double(), -1), torch.log_softmax(got.double(), -1)
    kl = (lp.exp() * (lp - lq)).sum(-1).mean().item()
    agree = (ref.argmax(-1) == got.argmax(-1)).float().mean().item()
    q = {"kl": kl, "top1_agreement": agree, "max_abs_logit_diff": (ref - got).abs().max().item()}
    if ids is not None:  # logits row i predicts ids[-n + i + 1]; the last row has no target
        n = got.shape[0]
        q["next_token_accuracy"] = (got[:-1].argmax(-1) == ids[-n + 1 :]).float().mean().item()
    return q


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--contexts", type=int, nargs="+", default=[1024, 4096, 16384], help="tiny random model")
    ap.add_argument("--real-contexts", type=int, nargs="*", default=[1024, 4096],
                    help="Gemma 3 270M on real text (none to skip)")
    ap.add_argument("--backends", nargs="+", default=list(BACKENDS))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--positions", type=int, default=256, help="last positions whose logits are compared")
    ap.add_argument("--eager-max", type=int, default=4096,
                    help="skip eager above this context (its [T,S] fp32 scores need ~3*4*T^2*4 bytes: 13 GB at 16k)")
    ap.add_argument("--out", default=str(Path(__file__).with_name("attention.json")))
    ap.add_argument("--worker", nargs=5, metavar=("SUITE", "BACKEND", "CTX", "POSITIONS", "OUT"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    if a.worker:
        worker(a.worker[0], a.worker[1], int(a.worker[2]), int(a.worker[3]), a.worker[4])
        return

    from rich.console import Console
    from rich.table import Table
    from safetensors.torch import load_file

    env = dict(os.environ, OMP_NUM_THREADS=str(a.threads), MKL_NUM_THREADS=str(a.threads))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        runs = [("tiny", c) for c in a.contexts] + [("gemma3-270m", c) for c in a.real_contexts]
        for suite, ctx in runs:
            logits, ids = {}, None
            for be in a.backends:
                if be == "eager" and ctx > a.eager_max:
                    rows.append({"model": suite, "context": ctx, "backend": be, "skipped": f"context > --eager-max {a.eager_max}"})
                    continue
                f = os.path.join(tmp, f"{suite}-{be}-{ctx}.safetensors")
                cmd = [sys.executable, __file__, "--threads", str(a.threads), "--worker", suite, be, str(ctx), str(a.positions), f]
                r = subprocess.run(cmd, capture_output=True, text=True, env=env)
                if r.returncode != 0:
                    rows.append({"model": suite, "context": ctx, "backend": be, "skipped": f"failed: {r.stderr.strip()[-300:]}"})
                    print(rows[-1]["skipped"], file=sys.stderr)
                    continue
                m = json.loads(r.stdout.strip().splitlines()[-1])
                saved = load_file(f)
                logits[be], ids = saved["logits"], saved["ids"]
                rows.append({"model": suite, "context": ctx, "backend": be, "seconds": m["seconds"],
                             "tok_per_s": ctx / m["seconds"], "peak_rss_mb": m["peak_rss_mb"],
                             "prefill_mem_mb": m["peak_rss_mb"] - m["base_rss_mb"]})
                print(f"{suite} ctx {ctx:>6} {be:>12}: {m['seconds']:.2f} s", file=sys.stderr, flush=True)
            logits.pop("masks", None)
            ref_name = "sdpa" if "sdpa" in logits else next(iter(logits), None)
            for row in rows:
                if row["model"] == suite and row["context"] == ctx and row["backend"] in logits and ref_name:
                    row["reference"] = ref_name
                    row.update(quality(logits[ref_name], logits[row["backend"]], ids if suite != "tiny" else None))

    t = Table(title=f"attention backends, prefill, {a.threads} thread(s); exact reference = sdpa")
    cols = ("model", "context", "backend", "prefill s", "x vs sdpa", "prefill mem MB", "peak RSS MB",
            "KL vs exact", "top-1 agree", "max |dlogit|", "next-tok acc")
    for c in cols:
        t.add_column(c, justify="right")
    base_s = {(r["model"], r["context"]): r["seconds"] for r in rows if r["backend"] == "sdpa" and "seconds" in r}
    md = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        if "skipped" in r:
            cells = [r["model"], str(r["context"]), r["backend"], "skipped", "", "", "", "", "", "", r["skipped"][:60]]
        else:
            sp = base_s.get((r["model"], r["context"]))
            acc = r.get("next_token_accuracy")
            cells = [r["model"], str(r["context"]), r["backend"], f"{r['seconds']:.2f}",
                     f"{sp / r['seconds']:.2f}" if sp else "", f"{r['prefill_mem_mb']:.0f}", f"{r['peak_rss_mb']:.0f}",
                     *((f"{r['kl']:.2e}", f"{100 * r['top1_agreement']:.1f}%", f"{r['max_abs_logit_diff']:.1e}")
                       if "kl" in r else ("", "", "")), "" if acc is None else f"{100 * acc:.1f}%"]
        t.add_row(*cells)
        md.append("| " + " | ".join(cells) + " |")
    Console(width=200).print(t)
    print("\n".join(md))
    meta = {"command": "python " + " ".join([os.path.relpath(__file__)] + sys.argv[1:]), "threads": a.threads,
            "config": CONFIG, "positions": a.positions, "torch": torch.__version__,
            "input": "64-token random motif repeated, 10% random substitutions (seed 0)",
            "weights": "init_random_(seed=0): matrices N(0,0.02), norm scales U(0.5,1.5)"}
    tmp_out = a.out + ".tmp"
    with open(tmp_out, "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=2)
    os.replace(tmp_out, a.out)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
