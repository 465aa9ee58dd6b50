"""Our engine against llama.cpp (llama-cpp-python) on the same GGUF files (issue 16).

Files: the real Gemma 3 270M Q4_K_M (``gemma4.assets.gemma3_270m_gguf()``), and BF16 and Q8_0 GGUFs
written from it by our own ``gemma4 convert`` (cached in ``--cache``, never in git; llama.cpp loads
them as they are). Every (engine, file, threads) configuration runs in a fresh subprocess, rounds
interleaved; a 128-token prompt (real text, the file's own tokenizer) then 128 greedy tokens.
Prefill tok/s = prompt tokens / time to first token; decode tok/s = 1 / the median time between
consecutive new tokens (the median resists bursts of load on a shared machine); peak RSS is the
subprocess's own, shown beside its baseline after imports (interpreter + torch, or + llama_cpp).

Engines:
  llama.cpp   ``llama_cpp.Llama(path, n_threads=n)``, greedy (temp 0), timed per yielded token
  ours-api    the default Python API: ``gemma4.load_pretrained(path)`` + ``gemma4.stream`` (a quantized
              GGUF runs in its quantized form, ``gemma4.io.gguf_native_model``, since this session's
              change; before it, the API dequantized to float32)
  ours-cli    the CLI's path: ``gemma4.cli._common.load_model(path)`` + ``gemma4.stream`` (the same
              loading rule as the API since then)

Also measured: the memory-bandwidth bound (bytes of weights streamed per decoded token / a measured
read bandwidth: the best of a numpy sum and a torch copy over 1 GiB) and quality at equal bits:
top-1 agreement with the float32 reference (the Q4_K_M weights dequantized to float32) over the
last 112 of 128 teacher-forced positions.

llama-cpp-python is an optional benchmark dependency (``pip install -e .[bench]``), built from its sdist
for this CPU. Without it this script says so and exits 0. On the benchmark machine (Sapphire Rapids-class,
AMX) a ``-DGGML_NATIVE=ON`` build segfaults in ``ggml_backend_amx_mul_mat`` on the first quantized
(Q4_K/Q8_0) matmul (BF16 runs), so build it with the same native ISA minus AMX:

    CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON -DGGML_AVX_VNNI=ON \
      -DGGML_AVX512=ON -DGGML_AVX512_VBMI=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON -DGGML_AMX_INT8=OFF" \
      pip install --no-binary :all: llama-cpp-python==0.3.36

    python benchmarks/vs_llamacpp.py                    # 1 and 2 threads, 2 rounds
    python benchmarks/vs_llamacpp.py --threads 1 --rounds 1
"""

from __future__ import annotations

import argparse
import ctypes
import importlib.util
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
PROMPT_LEN = 128
NEW_TOKENS = 128
QUALITY_FROM = 16  # agreement counted on positions 16..127: 112 positions
# Our own prose (no copied text): enough words for 128 tokens of ordinary English.
TEXT = (
    "The harbour town woke slowly on the first cold morning of autumn. Fishermen carried their nets down "
    "the stone steps while the baker opened his shutters and set loaves of dark bread in the window. "
    "A small girl in a red coat chased gulls along the quay, and her grandfather, leaning on a wooden "
    "stick, called after her to keep away from the edge. Out beyond the breakwater the sea was grey and "
    "restless, and the ferry that should have left at seven still waited at its mooring, its engine "
    "coughing smoke into the wind. In the square the clock struck the hour twice, as it always did, "
    "because nobody had repaired it since the storm three winters ago. The schoolteacher counted her "
    "pupils at the gate and frowned: two were missing again, and she guessed they had gone to watch the "
    "boats instead of learning their sums. Later that afternoon a stranger arrived on the mail coach."
)


def _rss_mb() -> float:
    """Peak resident MB of this process. VmHWM, not ru_maxrss: Linux carries ru_maxrss across fork+exec, so a
    worker would report at least the driver's RSS (the 17:24 run's peaks below 536 MB were masked so)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _load_avg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


# ----------------------------------------------------------------------------- files
def prepare_files(cache: Path) -> dict[str, Path]:
    import gemma4

    q4 = Path(gemma4.assets.gemma3_270m_gguf())
    cache.mkdir(parents=True, exist_ok=True)
    files = {"Q4_K_M": q4}
    for name, typ in (("BF16", "bf16"), ("Q8_0", "q8_0")):
        dst = cache / f"gemma-3-270m-{typ}.gguf"
        if not dst.exists():
            # Our own converter writes the file (dequantizing the Q4_K_M weights to float32 first).
            p = subprocess.run([sys.executable, "-m", "gemma4", "convert", str(q4), str(dst), "--type", typ],
                               capture_output=True, text=True)
            if p.returncode != 0 or not dst.exists():
                raise SystemExit(f"gemma4 convert to {typ} failed:\n{p.stdout[-2000:]}\n{p.stderr[-3000:]}")
        files[name] = dst
    return files


def prompt_ids(q4: Path) -> list[int]:
    import gemma4

    ids = gemma4.load_tokenizer(q4).encode(TEXT)
    if len(ids) < PROMPT_LEN:
        raise SystemExit(f"the benchmark text is only {len(ids)} tokens; it needs {PROMPT_LEN}")
    return ids[:PROMPT_LEN]


def weight_bytes_file(path: Path) -> int:
    """Bytes a decode step streams for a GGUF run as stored: every 2-D matrix once (the tied token
    table once, as the output head; its per-token embedding row is negligible)."""
    from gemma4.io import GGUFFile

    return sum(t.nbytes for t in GGUFFile(path).tensors.values() if len(t.shape) >= 2)


# ----------------------------------------------------------------------------- workers (one process each)
def _threads(n: int) -> None:
    import torch

    torch.set_num_threads(n)


def worker_bandwidth(threads: int) -> dict:
    import numpy as np
    import torch

    _threads(threads)
    n = 1 << 30
    a = np.ones(n // 4, dtype=np.float32)
    best_np = 0.0
    for _ in range(5):
        t = time.perf_counter()
        a.sum()
        best_np = max(best_np, n / (time.perf_counter() - t))
    src = torch.ones(n // 4)
    dst = torch.empty_like(src)
    best_copy = 0.0
    for _ in range(5):
        t = time.perf_counter()
        dst.copy_(src)
        best_copy = max(best_copy, 2 * n / (time.perf_counter() - t))  # read + write
    return {"numpy_sum_GBs": best_np / 1e9, "torch_copy_GBs": best_copy / 1e9,
            "read_GBs": max(best_np, best_copy) / 1e9, "threads": threads}


def _model_bytes(model) -> int:
    """Bytes of the model's weight tensors (each storage once), as they sit after the fast path."""
    import torch

    seen, total = set(), 0
    tensors = list(model.parameters()) + list(model.buffers())
    for mod in model.modules():
        for v in vars(mod).values():
            if hasattr(v, "is_mkldnn") and v.is_mkldnn:
                tensors.append(v)
    for t in tensors:
        if t is None or t.dim() < 2:
            continue
        if t.is_mkldnn:
            total += t.numel() * t.element_size()
            continue
        key = t.untyped_storage().data_ptr()
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    head_w = getattr(model.lm_head, "w", None)
    emb = getattr(model.model.embed_tokens, "weight", None)
    if head_w is not None and head_w.is_mkldnn and isinstance(emb, torch.Tensor) and emb.dim() == 2:
        total -= emb.untyped_storage().nbytes()  # a packed head copy is streamed; the table only gives one row
    return total


def worker_speed(engine: str, path: Path, threads: int, prompt: list[int]) -> dict:
    base = None
    t0 = time.perf_counter()
    if engine == "llama.cpp":
        import llama_cpp

        base = _rss_mb()
        llm = llama_cpp.Llama(str(path), n_threads=threads, n_threads_batch=threads, n_ctx=512, n_batch=512,
                              verbose=False)
        load_s = time.perf_counter() - t0
        rss_load = _rss_mb()
        # Warm-up on other tokens (not starting with <bos>, so no prefix of the real prompt is reused).
        for i, _ in enumerate(llm.generate(prompt[1:17], temp=0.0, top_k=1, repeat_penalty=1.0)):
            if i >= 7:
                break
        llm.reset()
        times, out = [], []
        start = time.perf_counter()
        for tok in llm.generate(prompt, temp=0.0, top_k=1, repeat_penalty=1.0, reset=True):
            times.append(time.perf_counter())
            out.append(int(tok))
            if len(out) >= NEW_TOKENS:
                break
        streamed = None  # the driver counts the file's bytes (importing gemma4 here would add torch to the RSS)
        how = "llama_cpp.Llama"
    else:
        import torch

        import gemma4

        _threads(threads)
        base = _rss_mb()
        if engine == "ours-api":
            model = gemma4.load_pretrained(path)
            how = f"load_pretrained ({str(model.dtype).removeprefix('torch.')})"
        else:
            from gemma4.cli._common import load_model

            model, _, how = load_model(str(path))
        load_s = time.perf_counter() - t0
        rss_load = _rss_mb()
        gemma4.generate(model, [prompt[:16]], 8, stop_token_ids=())  # warm-up (kernels, fast-path swap)
        times = []
        start = time.perf_counter()
        with torch.inference_mode():
            g = gemma4.stream(model, [prompt], NEW_TOKENS, stop_token_ids=())
            for _ in g:
                times.append(time.perf_counter())
        out = g.tokens[0]
        streamed = _model_bytes(model)  # a tied table counts once: the head reads it whole
    ttft = times[0] - start
    steps = sorted(b - a for a, b in zip(times, times[1:]))
    return {"engine": engine, "file": path.name, "threads": threads, "how": how, "load_s": load_s,
            "prefill_tok_s": PROMPT_LEN / ttft, "ttft_s": ttft,
            "decode_tok_s": 1.0 / steps[len(steps) // 2],
            "decode_tok_s_mean": (len(out) - 1) / (times[-1] - times[0]),
            "rss_base_mb": base, "peak_rss_load_mb": rss_load, "peak_rss_mb": _rss_mb(),
            "weight_bytes_per_token": streamed, "tokens": out, "load_avg": _load_avg()}


def worker_quality(engine: str, files: dict[str, str], prompt: list[int], ref_path: Path) -> dict:
    import numpy as np

    n = len(prompt)
    out = {}
    if engine == "llama.cpp":
        import llama_cpp

        ref = json.loads(ref_path.read_text())["argmax"]
        files = dict(files)
        # llama.cpp's own 4-bit files, quantized by llama.cpp from our BF16 file (cached beside it).
        for name, ftype in (("Q4_0 (llama.cpp, from BF16)", llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0),
                            ("Q4_K_M (llama.cpp, from BF16)", llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M)):
            dst = Path(files["BF16"]).with_name(f"gemma-3-270m-{name.split()[0].lower()}-llamacpp.gguf")
            if not dst.exists():
                params = llama_cpp.llama_model_quantize_default_params()
                params.ftype = ftype
                tmp = dst.with_suffix(".part")
                if llama_cpp.llama_model_quantize(str(files["BF16"]).encode(), str(tmp).encode(), ctypes.byref(params)):
                    raise RuntimeError(f"llama.cpp could not quantize {files['BF16']} to {name}")
                os.replace(tmp, dst)
            files[name] = str(dst)
        for name, path in files.items():
            llm = llama_cpp.Llama(path, n_threads=1, n_ctx=512, n_batch=512, logits_all=True, verbose=False)
            llm.eval(prompt)
            top = np.asarray(llm.scores[:n]).argmax(-1).tolist()
            out[f"llama.cpp {name}"] = sum(a == b for a, b in zip(top[QUALITY_FROM:], ref[QUALITY_FROM:]))
            del llm
        return out
    import torch

    import gemma4

    _threads(1)
    ids = torch.tensor([prompt])

    def top1(model) -> list[int]:
        with torch.inference_mode():
            return model(ids)[0].float().argmax(-1).tolist()

    fp32 = gemma4.load_pretrained(files["Q4_K_M"], dtype=torch.float32)
    ref = top1(fp32)
    ref_path.write_text(json.dumps({"argmax": ref}))

    def agree(model) -> int:
        return sum(a == b for a, b in zip(top1(model)[QUALITY_FROM:], ref[QUALITY_FROM:]))

    out["ours fp32 (reference)"] = agree(fp32)
    out["ours bf16 (BF16 file, bf16 activations)"] = agree(gemma4.load_pretrained(files["BF16"], dtype=torch.bfloat16))
    # The same bf16 weights computed in float32 (what llama.cpp's BF16 row does: bf16 weights, fp32
    # activations); held as float32 here, so twice the memory and the fp32 speed.
    out["ours BF16 file as float32 (bf16 weights, fp32 activations)"] = agree(
        gemma4.load_pretrained(files["BF16"], dtype=torch.float32))
    from gemma4.quant import native

    # Two kernel paths: the compiled ones (what runs by default where they build; this measure is one
    # 128-token forward, so on an AVX-512 build it runs their prefill GEMM: float32 activations times the
    # dequantized weights; decode rounds activations to int8 in two passes per 32-block) and PyTorch's
    # (bf16 activations).
    for label, env in (("native kernels: fp32 activations", None),
                       ("PyTorch kernels, bf16 activations", "0")):
        if env is None:
            os.environ.pop("GEMMA4_NATIVE", None)
        else:
            os.environ["GEMMA4_NATIVE"] = env
        if env is None and not native.available():
            continue
        # int8-g32 (a float16 scale per 32 inputs, Q8_0's layout) has no PyTorch kernel: native only
        for scheme, gs in (("int8", None), ("int8", 32), ("int4", 32)) if env is None else (("int8", None), ("int4", 32)):
            m = gemma4.load_pretrained(files["Q4_K_M"], dtype=torch.float32)
            gemma4.quantize(m, scheme, gs)
            out[f"ours {scheme}{'-g32' if gs else ''} (RTN of fp32, {label})"] = agree(
                m if env is None else m.to(torch.bfloat16))
            del m
    os.environ.pop("GEMMA4_NATIVE", None)
    from gemma4.cli._common import load_model

    from gemma4.infer import use_fast_path
    from gemma4.infer.generate import decode_step, prefill

    def agree_decoding(model) -> int:
        """The same positions through the decode path: a QUALITY_FROM-token prefill, then one cached decode
        step per position, teacher-forced on the prompt (what generation computes; for int8/int4 weights
        the two-pass int8 activations of the one-row kernels instead of the prefill GEMM's float32)."""
        use_fast_path(model)
        with torch.inference_mode():
            cache = model.new_cache()
            prefill(model, ids[:, :QUALITY_FROM], cache)
            rows = [decode_step(model, ids[:, t], cache) for t in range(QUALITY_FROM, n)]  # positions 16..n-1
        top = torch.cat(rows, 0).float().argmax(-1).tolist()
        return sum(a == b for a, b in zip(top, ref[QUALITY_FROM:]))

    for name in ("BF16", "Q8_0", "Q4_K_M"):  # BF16: bf16 weights, float32 activations (gemma4.quant's "bf16")
        m, _, _ = load_model(files[name])
        out[f"ours {name} file, CLI default (gguf-native)"] = agree(m)
        out[f"ours {name} file, CLI default, decode path"] = agree_decoding(m)
        del m
    return out


# ----------------------------------------------------------------------------- driver
def _run(args: list[str], env_threads: int | None = None) -> dict:
    env = dict(os.environ)
    if env_threads:
        env["OMP_NUM_THREADS"] = str(env_threads)
    p = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, env=env)
    if p.returncode != 0:
        raise SystemExit(f"worker {args} failed:\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", type=Path, default=Path(os.environ.get("GEMMA4_BENCH_CACHE",
                    Path.home() / ".cache" / "gemma4" / "bench-vs-llamacpp")))
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--rounds", type=int, default=2, help="interleaved rounds; the best round of each is kept")
    ap.add_argument("--files", default="Q4_K_M,BF16,Q8_0")
    ap.add_argument("--engines", default="llama.cpp,ours-api,ours-cli")
    ap.add_argument("--skip", default="", help="engine:file pairs not to run, comma-separated (e.g. ours-api:Q8_0)")
    ap.add_argument("--no-quality", action="store_true", help="speed only")
    ap.add_argument("--quality-only", action="store_true", help="quality only (writes vs_llamacpp_quality.json)")
    ap.add_argument("--quality-engines", default="ours,llama.cpp",
                    help="llama.cpp alone reuses the float32 reference's argmax cached by an earlier ours run")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "vs_llamacpp.json")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--spec", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        spec = json.loads(args.spec)
        if args.worker == "bandwidth":
            r = worker_bandwidth(spec["threads"])
        elif args.worker == "quality":
            r = worker_quality(spec["engine"], spec["files"], spec["prompt"], Path(spec["ref"]))
        else:
            r = worker_speed(args.worker, Path(spec["path"]), spec["threads"], spec["prompt"])
        print(json.dumps(r))
        return

    if importlib.util.find_spec("llama_cpp") is None:
        print("llama-cpp-python is not installed: this benchmark compares against it, so it is skipped. "
              "Install it (optional), built for this CPU from its sdist: see this script's docstring for the "
              "CMAKE_ARGS (AMX off), then pip install --no-binary :all: llama-cpp-python==0.3.36")
        return
    import llama_cpp

    load_start = _load_avg()
    files = prepare_files(args.cache)
    files = {k: v for k, v in files.items() if k in args.files.split(",")} | {"Q4_K_M": files["Q4_K_M"]}
    prompt = prompt_ids(files["Q4_K_M"])
    threads = [int(t) for t in args.threads.split(",")]
    if args.quality_only:
        args.rounds, threads, args.out = 0, [], args.out.with_name(args.out.stem + "_quality.json")
    bw = {t: _run(["--worker", "bandwidth", "--spec", json.dumps({"threads": t})], t) for t in threads}

    runs = [] if args.quality_only else [(e, f, t) for t in threads for f in args.files.split(",") for e in args.engines.split(",")
                                                 if f"{e}:{f}" not in args.skip.split(",")]
    best: dict[tuple, dict] = {}
    for rnd in range(args.rounds):
        for e, f, t in runs:
            r = _run(["--worker", e, "--spec", json.dumps({"path": str(files[f]), "threads": t, "prompt": prompt})], t)
            print(f"round {rnd + 1}: {e:9s} {f:6s} {t}T decode {r['decode_tok_s']:6.1f} tok/s, "
                  f"prefill {r['prefill_tok_s']:6.1f} tok/s, peak RSS {r['peak_rss_mb']:.0f} MB, load {r['load_avg']}",
                  flush=True)
            key = (e, f, t)
            rounds = best.get(key, {}).get("rounds", []) + [[round(r["decode_tok_s"], 2), round(r["prefill_tok_s"], 1)]]
            if key not in best or r["decode_tok_s"] > best[key]["decode_tok_s"]:
                best[key] = r
            best[key]["rounds"] = rounds
    results = [best[k] for k in runs]
    for r in results:
        if r["weight_bytes_per_token"] is None:
            r["weight_bytes_per_token"] = weight_bytes_file(Path(files[next(k for k, v in files.items() if v.name == r["file"])]))
        r["file_mb"] = files[next(k for k, v in files.items() if v.name == r["file"])].stat().st_size / 1e6
        r["bound_tok_s"] = bw[r["threads"]]["read_GBs"] * 1e9 / r["weight_bytes_per_token"]
        r["of_bound"] = r["decode_tok_s"] / r["bound_tok_s"]
        ref = best.get(("llama.cpp", next(k for k, v in files.items() if v.name == r["file"]), r["threads"]))
        r["decode_vs_llamacpp"] = r["decode_tok_s"] / ref["decode_tok_s"] if ref else None
        r["prefill_vs_llamacpp"] = r["prefill_tok_s"] / ref["prefill_tok_s"] if ref else None
        r["rss_over_base_vs_file"] = (r["peak_rss_mb"] - r["rss_base_mb"]) / r["file_mb"]

    quality = {}
    if not args.no_quality:
        ref_path = args.cache / "fp32_argmax.json"
        spec = {"files": {k: str(v) for k, v in files.items()}, "prompt": prompt, "ref": str(ref_path)}
        for eng in args.quality_engines.split(","):
            quality.update(_run(["--worker", "quality", "--spec", json.dumps({**spec, "engine": eng})], 1))

    hdr = ("engine", "file", "thr", "decode tok/s", "vs llama.cpp", "prefill tok/s", "vs llama.cpp",
           "peak RSS MB (base)", "(peak-base)/file", "bound tok/s", "of bound")
    lines = [" | ".join(hdr)]
    for r in results:
        vs = lambda x: f"{x:.2f}x" if x is not None else "-"  # noqa: E731
        lines.append(" | ".join([r["engine"], r["file"], str(r["threads"]), f"{r['decode_tok_s']:.1f}",
                                 vs(r["decode_vs_llamacpp"]), f"{r['prefill_tok_s']:.0f}", vs(r["prefill_vs_llamacpp"]),
                                 f"{r['peak_rss_mb']:.0f} ({r['rss_base_mb']:.0f})", f"{r['rss_over_base_vs_file']:.2f}",
                                 f"{r['bound_tok_s']:.0f}", f"{r['of_bound']:.0%}"]))
    print("\n".join(lines))
    print("bandwidth:", {t: f"{b['read_GBs']:.1f} GB/s" for t, b in bw.items()})
    if quality:
        print(f"top-1 agreement with the float32 reference over {PROMPT_LEN - QUALITY_FROM} positions:")
        for k, v in quality.items():
            print(f"  {k}: {v}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    doc = {"prompt_len": PROMPT_LEN, "new_tokens": NEW_TOKENS, "rounds": args.rounds,
           "llama_cpp_version": llama_cpp.__version__, "cpu_count": os.cpu_count(),
           "load_avg_start": load_start, "load_avg_end": _load_avg(), "bandwidth": bw,
           "files": {k: {"path": v.name, "mb": v.stat().st_size / 1e6} for k, v in files.items()},
           "results": results, "quality_top1_of_112": quality,
           "command": "python benchmarks/vs_llamacpp.py " + " ".join(sys.argv[1:])}
    tmp = args.out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(doc, indent=1))
    os.replace(tmp, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
