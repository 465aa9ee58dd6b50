"""Memory estimate vs reality on the real Gemma 3 270M (GGUF Q4_K_M, dequantized; then bf16/int8/int4).

For each precision the model is saved once with ``gemma4.save_pretrained`` and every measurement runs
in a fresh subprocess (one thread): load the checkpoint, reset the peak-RSS counter
(``/proc/self/clear_refs``), prefill a prompt of N tokens (chunks of 512, ``keep_last=1``) and decode 16
tokens. Reported: that run phase's peak RSS minus the baseline RSS of a fresh process that only
imported torch + gemma4 and ran tiny float32 and bf16 matmuls (measured the same way), against
``estimate_memory`` (weights + allocated KV + prefill activations). In the same child the exact
quantities are checked: bytes of every module tensor == the weight estimate, ``ModelCache.nbytes``
== the KV estimate.

Each row runs ``--repeats`` times with different ``PYTHONHASHSEED``s: with glibc's default malloc the
peak varies by tens of MiB between such runs (the order of allocations decides how the freed
attention temporaries fragment the heap), so the median and the range are reported. One more run per
row sets ``MALLOC_MMAP_THRESHOLD_=131072``: glibc then maps every block of 128 KiB or more on its own
and unmaps it when freed, so RSS follows the bytes actually allocated ("live peak"; that setting
makes prefill ~1.6x slower, so it is a measurement, not a recommendation).

    python benchmarks/memory.py            # writes benchmarks/results/memory.json
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
VARIANTS = {"bf16": ("bf16", None), "int8": ("int8", None), "int4-g32": ("int4", 32), "int4-g128": ("int4", 128)}
# glibc maps blocks of this size or more on their own (and unmaps them when freed): RSS = live bytes.
LIVE_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072"}


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak() -> None:
    # Writing 5 to clear_refs resets VmHWM (the peak RSS) to the current RSS (Linux >= 4.0).
    Path("/proc/self/clear_refs").write_text("5")


def prepare_checkpoints(root: Path, variants=None) -> dict[str, Path]:
    """Save the real 270M model once per precision under ``root`` (reused if present)."""
    import torch

    import gemma4
    from gemma4.quant.rtn import quantize

    out, todo = {}, []
    for name in variants or VARIANTS:
        d = root / name
        out[name] = d
        if not (d / "config.json").exists():
            todo.append(name)
    if todo:
        base = gemma4.load_pretrained("gemma3-270m", dtype=torch.float32)
        for name in todo:
            scheme, gs = VARIANTS[name]
            m = _clone(base) if scheme == "bf16" else quantize(_clone(base), scheme, gs)
            m.to(torch.bfloat16)
            gemma4.save_pretrained(m, out[name])
            del m
            gc.collect()
    return out


def _clone(model):
    import copy

    return copy.deepcopy(model)


def child(spec: dict) -> dict:
    import torch

    torch.set_num_threads(1)
    import gemma4  # noqa: F401

    if spec["mode"] == "baseline":
        torch.ones(64, 64) @ torch.ones(64, 64)
        # Every variant computes in bf16: the first bf16 matmul / batched matmul loads oneDNN's bf16
        # kernels (~7 MiB here), a cost of torch on this CPU rather than of the model's tensors.
        a = torch.ones(64, 64, dtype=torch.bfloat16)
        a @ a
        torch.matmul(a[None, None], a[None, None])
        return {"rss_kb": _status_kb("VmRSS"), "hwm_kb": _status_kb("VmHWM")}
    from gemma4.infer.generate import decode_step, prefill
    from gemma4.model.size import estimate_memory
    from gemma4.quant.rtn import model_nbytes, to_kernel_layout

    model = gemma4.load_pretrained(spec["path"])
    to_kernel_layout(model)
    gc.collect()
    load_hwm = _status_kb("VmHWM")
    _reset_peak()
    after_load = _status_kb("VmRSS")
    n = spec["context"]
    ids = torch.randint(10, 20_000, (1, n), generator=torch.Generator().manual_seed(0))
    cache = model.new_cache()
    with torch.no_grad():
        tok = prefill(model, ids, cache, chunk=512).argmax(-1)
        for _ in range(spec.get("decode", 16)):
            tok = decode_step(model, tok, cache).argmax(-1)
    total = n + spec.get("decode", 16)
    q = model.config.quantization
    wd = q["scheme"] if q else str(model.dtype).removeprefix("torch.")
    est = estimate_memory(model.config, total, 1, wd, group_size=(q or {}).get("group_size") or 32, prefill_chunk=512)
    return {
        "after_load_kb": after_load, "run_hwm_kb": _status_kb("VmHWM"), "load_hwm_kb": load_hwm,
        "model_bytes": model_nbytes(model), "est_weights": est.weights_total,
        "kv_bytes": cache.nbytes(), "kv_reserved": sum(c.reserved_nbytes() for c in cache.layers if c is not None),
        "rss_anon_kb": _status_kb("RssAnon"), "rss_file_kb": _status_kb("RssFile"),
        "est_kv": est.kv_total, "est_kv_reserved": est.kv_reserved, "est_act": est.activations, "est_total": est.total,
    }


def run_child(spec: dict, env: dict | None = None) -> dict:
    r = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True,
                       env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})
    if r.returncode:
        raise RuntimeError(f"child {spec} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def baseline_kb(repeats: int = 3, env: dict | None = None) -> int:
    return min(run_child({"mode": "baseline"}, env)["hwm_kb"] for _ in range(repeats))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--child")
    ap.add_argument("--contexts", default="512,4096")
    ap.add_argument("--variants", default="bf16,int8,int4-g32")
    ap.add_argument("--repeats", type=int, default=3, help="runs per row (PYTHONHASHSEED 1..N)")
    ap.add_argument("--no-live", action="store_true", help="skip the MALLOC_MMAP_THRESHOLD_ run per row")
    ap.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "gemma4-bench-270m"))
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return
    from rich.console import Console
    from rich.table import Table

    variants = args.variants.split(",")
    ckpts = prepare_checkpoints(Path(args.workdir), variants)
    base = baseline_kb()
    live_base = None if args.no_live else baseline_kb(env=LIVE_ENV)
    t = Table(title=f"Gemma 3 270M: estimate vs measured (1 thread; RSS minus a {base / 1024:.0f} MiB python+torch "
                    f"baseline; median of {args.repeats} runs \\[range])")
    for c in ("variant", "ctx", "weights est=held", "KV est=held", "act est", "est MiB",
              "after load", "run peak", "peak/est", "growth", "KV+act est", "live peak", "live/est"):
        t.add_column(c, justify="right")
    rows = []
    mb = lambda x: f"{x / 2**20:.0f}"  # noqa: E731
    for v in variants:
        for ctx in [int(x) for x in args.contexts.split(",")]:
            spec = {"mode": "run", "path": str(ckpts[v]), "context": ctx, "decode": 16}
            runs = [run_child(spec, {"PYTHONHASHSEED": str(i + 1)}) for i in range(args.repeats)]
            peaks = sorted((x["run_hwm_kb"] - base) * 1024 for x in runs)
            r = dict(runs[0])  # the exact checks and the estimate are the same in every run
            measured = statistics.median(peaks)
            r.update(variant=v, context=ctx, baseline_kb=base, measured_bytes=measured, measured_runs=peaks,
                     ratio=measured / r["est_total"], ratio_range=[peaks[0] / r["est_total"], peaks[-1] / r["est_total"]],
                     after_load_runs_kb=[x["after_load_kb"] for x in runs])
            if live_base is not None:
                lv = run_child(spec, {**LIVE_ENV, "PYTHONHASHSEED": "1"})
                r.update(live_baseline_kb=live_base, live_bytes=(lv["run_hwm_kb"] - live_base) * 1024,
                         live_after_load_kb=lv["after_load_kb"])
                r["live_ratio"] = r["live_bytes"] / r["est_total"]
            rows.append(r)
            t.add_row(v, str(ctx), f"{mb(r['est_weights'])}{'=' if r['est_weights'] == r['model_bytes'] else '!='}{mb(r['model_bytes'])}",
                      f"{r['est_kv'] / 2**20:.1f}{'=' if r['est_kv'] == r['kv_bytes'] else '!='}{r['kv_bytes'] / 2**20:.1f}",
                      mb(r["est_act"]), mb(r["est_total"]), f"{(statistics.median(r['after_load_runs_kb']) - base) / 1024:.0f}",
                      f"{mb(measured)} [{mb(peaks[0])}-{mb(peaks[-1])}]",
                      f"{r['ratio']:.2f} [{r['ratio_range'][0]:.2f}-{r['ratio_range'][1]:.2f}]",
                      f"{statistics.median(x['run_hwm_kb'] - x['after_load_kb'] for x in runs) / 1024:.0f}",
                      mb(r["est_kv_reserved"] + r["est_act"]),
                      mb(r["live_bytes"]) if live_base is not None else "-",
                      f"{r['live_ratio']:.2f}" if live_base is not None else "-")
    Console(width=200).print(t)
    out = HERE / "results" / "memory.json"
    out.parent.mkdir(exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps({"baseline_kb": base, "live_baseline_kb": live_base, "repeats": args.repeats,
                               "rows": rows, "time": time.strftime("%Y-%m-%d %H:%M")}, indent=2))
    os.replace(tmp, out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
