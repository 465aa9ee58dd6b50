"""Fine-tuning speed and memory: ours against transformers + PEFT on the real Gemma 3 270M, one thread.

The Gemma 3 270M GGUF (`gemma4.io.assets.gemma3_270m_gguf()`) is converted once with our
`gemma4 convert gemma3-270m DIR --dtype float32` into a safetensors directory (cached), which both engines
load: ours with `gemma4.load_pretrained`, transformers with `Gemma3ForCausalLM.from_pretrained`. The data
are the same token rows for both: the two public-domain texts of benchmarks/data (Alice chapters VIII-IX
and the US Constitution) tokenized with the model's tokenizer and cut into `--seq-len` rows; every token
is a target. Each (mode, engine) runs in a fresh subprocess (its peak RSS is its own), one torch thread,
and the configurations are interleaved round-robin over `--rounds` rounds (the machine is shared: the
best round of each is kept).

Same recipe on both sides (what each library does by default for it):

* LoRA: rank `--rank` (alpha 2x rank) on q/k/v/o and gate/up/down of every layer; the frozen base in
  bf16, the adapters in fp32, bf16 autocast. Ours: `add_lora` + the train package's `Trainer.train_step`
  (chunked cross-entropy, never the full [tokens x 262,144] logits). transformers: `peft.get_peft_model`
  with the same targets and `model(input_ids, labels=...).loss`.
* full: every parameter trainable in fp32 (master weights), bf16 autocast, AdamW.

Both clip the gradient norm at 1.0 and take fused AdamW steps (`fused=True`) at lr 1e-4. Timed: steps 2..N (step 1 warms up
allocators and oneDNN). Peak RSS: the process's high-water mark over the whole run (load included) and
over training alone (after loading, freed heap is handed back with malloc_trim in both engines and the
kernel's counter is reset, /proc/self/clear_refs).

    python benchmarks/train.py                       # LoRA and full, 2 rounds, 6 steps of 1 x 256 tokens
    python benchmarks/train.py --modes lora --steps 8 --rounds 3
    python benchmarks/train.py --modes lora --rounds 2 --steps 5 --paired-steps 9   # + speed in one process, steps alternating
    python benchmarks/train.py --modes lora --steps 3 --profile ours   # torch.profiler over step 2, in-process
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
TEXTS = (HERE / "data" / "alice_ch8_9.txt", HERE / "data" / "us_constitution.txt")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LR = 1e-4


def _hwm_mb() -> float:
    """This process's peak resident set (VmHWM) in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def _settle() -> float:
    """After loading, in both engines alike: hand freed heap back to the OS (glibc keeps the load's
    temporaries resident otherwise), so the training peak is training's own; returns the RSS then."""
    from gemma4._util import release_free_heap

    import gc

    gc.collect()
    release_free_heap()
    return _rss_mb()


def _reset_hwm() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # 5: reset the peak RSS counter
        return True
    except OSError:
        return False


def converted_dir() -> Path:
    """The Gemma 3 270M as a float32 safetensors directory (converted once, cached)."""
    from gemma4.io.assets import cache_dir

    dst = cache_dir() / "bench" / "gemma3-270m-f32"
    if (dst / "config.json").is_file() and (dst / "model.safetensors").is_file():
        return dst
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dst.parent, prefix=".convert-"))
    try:
        out = tmp / "model"
        cmd = [sys.executable, "-m", "gemma4", "convert", "gemma3-270m", str(out), "--dtype", "float32"]
        print("$ " + " ".join(cmd[2:]), flush=True)
        subprocess.run(cmd, check=True)
        os.replace(out, dst)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dst


def make_rows(model_dir: Path, seq_len: int, n_rows: int) -> list[list[int]]:
    from gemma4.text import load_tokenizer

    tok = load_tokenizer(model_dir)
    ids: list[int] = []
    for p in TEXTS:
        ids += tok.encode(p.read_text(encoding="utf-8"), add_bos=True)
    rows = [ids[i : i + seq_len] for i in range(0, len(ids) - seq_len + 1, seq_len)]
    if len(rows) < n_rows:
        raise SystemExit(f"only {len(rows)} rows of {seq_len} tokens in the texts; need {n_rows}")
    return rows[:n_rows]


# ------------------------------------------------------------------------------------------------ workers


def _step_profiler(args, i: int):
    """torch.profiler around step 2 (index 1; the first warms up) when ``--profile`` is given, else nothing."""
    if not getattr(args, "profile", None) or i != min(1, args.steps - 1):
        return contextlib.nullcontext()
    import torch.profiler as tp

    args.prof = tp.profile(activities=[tp.ProfilerActivity.CPU], record_shapes=True, profile_memory=True)
    return args.prof


def _batches(rows, batch: int, steps: int):
    import torch

    t = torch.tensor(rows, dtype=torch.long)
    for s in range(steps):
        yield t[s * batch : (s + 1) * batch]


def setup_ours(model_dir: Path, mode: str, rows, args, out: str):
    """Our model and trainer, ready: (step() -> loss, info). ``out`` is the trainer's output directory."""
    import torch

    from gemma4.io import load_pretrained
    from gemma4.train import Trainer, TrainConfig, add_lora
    from gemma4.train.data import Packed

    t0 = time.perf_counter()
    if mode == "lora":
        model = load_pretrained(model_dir, dtype=torch.bfloat16)
        add_lora(model, TARGETS, r=args.rank, alpha=2.0 * args.rank)
    else:
        model = load_pretrained(model_dir, dtype=torch.float32, trainable=True)
    model.train()
    info = {"load_s": time.perf_counter() - t0, "load_peak_mb": _hwm_mb()}
    ids = torch.tensor(rows, dtype=torch.long)  # [N, T]
    n, t = ids.shape
    data = Packed(ids, ids.clone(), torch.arange(t).expand(n, t).contiguous(), torch.ones(n, t, dtype=torch.long))
    cfg = TrainConfig(steps=args.steps, lr=LR, min_lr_ratio=1.0, batch_size=args.batch, max_grad_norm=1.0,
                      dtype="bfloat16", seed=0, plot=False)
    trainer = Trainer(model, data, cfg, out)
    # Row order: the trainer's seeded permutation; transformers gets the same rows in the same order.
    info["order"] = trainer.stream._permutation().tolist()[: args.steps * args.batch]
    info["trainable"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return (lambda: trainer.train_step()["loss"]), info


def setup_hf(model_dir: Path, mode: str, rows, args, order):
    """transformers (+ PEFT) model and the same step: (step() -> loss, info)."""
    import torch
    import transformers

    t0 = time.perf_counter()
    dtype = torch.bfloat16 if mode == "lora" else torch.float32
    model = transformers.Gemma3ForCausalLM.from_pretrained(str(model_dir), dtype=dtype)
    if mode == "lora":
        import peft

        model = peft.get_peft_model(model, peft.LoraConfig(r=args.rank, lora_alpha=2 * args.rank,
                                                           target_modules=TARGETS, lora_dropout=0.0))
    model.train()
    info = {"load_s": time.perf_counter() - t0, "load_peak_mb": _hwm_mb()}
    params = [p for p in model.parameters() if p.requires_grad]
    # The fused AdamW, as transformers' Trainer uses by default (optim "adamw_torch_fused") and ours does.
    opt = torch.optim.AdamW(params, lr=LR, fused=True)
    batches = _batches([rows[i] for i in order], args.batch, args.steps)
    info["trainable"] = sum(p.numel() for p in params)

    def step() -> float:
        batch = next(batches)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    return step, info


def _timed_steps(step, args) -> tuple[list[float], list[float]]:
    times, losses = [], []
    for i in range(args.steps):
        s = time.perf_counter()
        with _step_profiler(args, i):
            losses.append(step())
        times.append(time.perf_counter() - s)
    return times, losses


def _measured(step, info: dict, args) -> dict:
    """Run the timed steps of one engine alone in its process: RSS after loading, then the training peak."""
    info["rss_loaded_mb"] = _settle()
    reset = _reset_hwm()
    info["times"], info["losses"] = _timed_steps(step, args)
    info["train_peak_mb"] = _hwm_mb() if reset else None
    return info


def worker_ours(model_dir: Path, mode: str, rows, args) -> dict:
    with tempfile.TemporaryDirectory() as out:
        return _measured(*setup_ours(model_dir, mode, rows, args, out), args)


def worker_hf(model_dir: Path, mode: str, rows, args, order) -> dict:
    return _measured(*setup_hf(model_dir, mode, rows, args, order), args)


def worker_paired(model_dir: Path, mode: str, rows, args) -> dict:
    """Speed only: both engines in this one process, their steps alternating (ours, transformers, ours, ...)
    on the same rows in the same order. The host's speed drifts by up to 1.5x over tens of seconds here,
    which separate runs (one engine after the other) turn into noise in the ratio; adjacent steps of the
    two see the same host. Peak memory is not measured here (both models share the process)."""
    with tempfile.TemporaryDirectory() as out:
        ours, info = setup_ours(model_dir, mode, rows, args, out)
        hf, _ = setup_hf(model_dir, mode, rows, args, info["order"])
        t_o, t_h, l_o, l_h = [], [], [], []
        for _ in range(args.steps):
            for step, times, losses in ((ours, t_o, l_o), (hf, t_h, l_h)):
                s = time.perf_counter()
                losses.append(step())
                times.append(time.perf_counter() - s)
    return {"ours_times": t_o, "hf_times": t_h, "ours_losses": l_o, "hf_losses": l_h}


def worker_main(args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    rows = json.loads(Path(args.rows).read_text())
    model_dir = Path(args.model_dir)
    if args.worker == "paired":
        res = worker_paired(model_dir, args.mode, rows, args)
    elif args.worker == "ours":
        res = worker_ours(model_dir, args.mode, rows, args)
    else:
        res = worker_hf(model_dir, args.mode, rows, args, json.loads(args.order))
    res["peak_mb"] = _hwm_mb()
    res["ru_maxrss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT " + json.dumps(res), flush=True)


def profile_main(args) -> int:
    """One engine in this process with torch.profiler over its second step: the ops' self CPU time
    (with and without input shapes), printed and written to benchmarks/results/train_profile_<engine>_<mode>.json."""
    import torch

    torch.set_num_threads(args.threads)
    model_dir = converted_dir()
    rows = make_rows(model_dir, args.seq_len, args.steps * args.batch)
    mode = args.modes.split(",")[0].strip()
    if args.profile == "ours":
        res = worker_ours(model_dir, mode, rows, args)
    else:
        res = worker_hf(model_dir, mode, rows, args, list(range(len(rows))))
    prof = args.prof
    print(f"{args.profile} {mode}: step times {', '.join(f'{t:.2f}' for t in res['times'])} s, "
          f"losses {', '.join(f'{x:.3f}' for x in res['losses'])}, peak RSS {_hwm_mb():.0f} MB")
    ka = prof.key_averages()
    print(ka.table(sort_by="self_cpu_time_total", row_limit=30))
    print(prof.key_averages(group_by_input_shape=True).table(sort_by="self_cpu_time_total", row_limit=20,
                                                              max_name_column_width=40, max_shapes_column_width=60))
    top = sorted(ka, key=lambda e: -e.self_cpu_time_total)[:40]
    out = {"engine": args.profile, "mode": mode, "seq_len": args.seq_len, "times_s": res["times"],
           "ops": [{"name": e.key, "count": e.count, "self_ms": round(e.self_cpu_time_total / 1e3, 2),
                    "total_ms": round(e.cpu_time_total / 1e3, 2)} for e in top]}
    path = HERE / "results" / f"train_profile_{args.profile}_{mode}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {path}")
    return 0


# ------------------------------------------------------------------------------------------------- driver


def run_one(engine: str, mode: str, model_dir: Path, rows_file: Path, args, order=None) -> dict:
    """One (engine, mode) in a fresh subprocess. engine "ours-baseline" is ours imported from
    ``--baseline-src`` (an older source tree), for before/after comparisons within one run."""
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), TOKENIZERS_PARALLELISM="false")
    if engine == "ours-baseline":
        env["PYTHONPATH"] = os.pathsep.join([str(Path(args.baseline_src) / "src"), env.get("PYTHONPATH", "")])
        engine = "ours"
    cmd = [sys.executable, __file__, "--worker", engine, "--mode", mode, "--model-dir", str(model_dir),
           "--rows", str(rows_file), "--steps", str(args.steps), "--batch", str(args.batch), "--rank", str(args.rank),
           "--threads", str(args.threads)]
    if order is not None:
        cmd += ["--order", json.dumps(order)]
    if engine == "paired":
        cmd[cmd.index("--steps") + 1] = str(args.paired_steps)
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    if proc.returncode != 0 or not line:
        raise SystemExit(f"{engine}/{mode} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    res = json.loads(line[-1][7:])
    res["wall_s"] = wall
    if engine == "paired":
        return res
    timed = res["times"][1:] or res["times"]
    res["step_s"] = sum(timed) / len(timed)
    res["tok_per_s"] = args.batch * args.seq_len / res["step_s"]
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--worker", choices=("ours", "hf", "paired"), help=argparse.SUPPRESS)
    ap.add_argument("--model-dir", help=argparse.SUPPRESS)
    ap.add_argument("--rows", help=argparse.SUPPRESS)
    ap.add_argument("--order", help=argparse.SUPPRESS)
    ap.add_argument("--mode", default="lora", help=argparse.SUPPRESS)
    ap.add_argument("--modes", default="lora,full", help="Comma list of lora, full.")
    ap.add_argument("--steps", type=int, default=6, help="Optimizer steps per run (the first is not timed).")
    ap.add_argument("--batch", type=int, default=1, help="Rows per step.")
    ap.add_argument("--seq-len", type=int, default=256, help="Tokens per row.")
    ap.add_argument("--rank", type=int, default=8, help="LoRA rank.")
    ap.add_argument("--rounds", type=int, default=2, help="Interleaved rounds; the best of each is kept.")
    ap.add_argument("--paired-steps", type=int, default=0,
                    help="Also measure speed with both engines in one process, steps alternating, this many "
                         "steps each (the first pair is not timed): the ratio per adjacent pair, whose median "
                         "is robust to the host's drift.")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", type=Path, default=HERE / "results" / "train.json")
    ap.add_argument("--baseline-src", help="Also run ours from this source tree (its src/ first on PYTHONPATH), "
                    "e.g. `git archive HEAD src | tar -x -C DIR`: engine ours-baseline.")
    ap.add_argument("--profile", choices=("ours", "hf"), help="Profile one engine's step 2 in this process "
                    "(first of --modes) instead of benchmarking.")
    args = ap.parse_args(argv)
    if args.worker:
        worker_main(args)
        return 0
    if args.profile:
        return profile_main(args)
    model_dir = converted_dir()
    rows = make_rows(model_dir, args.seq_len, max(args.steps, args.paired_steps) * args.batch)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    runs: dict[tuple[str, str], list[dict]] = {}
    paired: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        rows_file = Path(tmp) / "rows.json"
        rows_file.write_text(json.dumps(rows))
        for r in range(args.rounds):
            for mode in modes:
                ours = run_one("ours", mode, model_dir, rows_file, args)
                done = [("ours", ours)]
                if args.baseline_src:
                    done.append(("ours-baseline", run_one("ours-baseline", mode, model_dir, rows_file, args)))
                hf = run_one("hf", mode, model_dir, rows_file, args, order=ours["order"])
                done.append(("transformers+peft" if mode == "lora" else "transformers", hf))
                if args.paired_steps > 1:
                    pr = run_one("paired", mode, model_dir, rows_file, args)
                    pairs = [h / o for o, h in zip(pr["ours_times"][1:], pr["hf_times"][1:])]
                    paired.setdefault(mode, []).extend(pairs)
                    print(f"round {r + 1} {mode:4s} paired: transformers/ours step time per pair "
                          f"{', '.join(f'{x:.2f}' for x in pairs)}; losses ours {pr['ours_losses'][0]:.3f} "
                          f"transformers {pr['hf_losses'][0]:.3f}", flush=True)
                for eng, res in done:
                    runs.setdefault((mode, eng), []).append(res)
                    print(f"round {r + 1} {mode:4s} {eng:18s} {res['tok_per_s']:7.1f} tok/s  step {res['step_s']:.2f} s  "
                          f"peak {res['peak_mb']:.0f} MB (training {res['train_peak_mb'] or 0:.0f} MB)  "
                          f"losses {', '.join(f'{x:.3f}' for x in res['losses'][:3])}", flush=True)
    table = []
    for (mode, eng), rs in runs.items():
        best = max(rs, key=lambda x: x["tok_per_s"])
        table.append({"mode": mode, "engine": eng, "tok_per_s": round(best["tok_per_s"], 1),
                      "tok_per_s_rounds": [round(x["tok_per_s"], 1) for x in rs],
                      "peak_rss_mb": round(min(x["peak_mb"] for x in rs)),
                      "train_peak_rss_mb": round(min((x["train_peak_mb"] or 0) for x in rs)),
                      "load_peak_rss_mb": round(min(x["load_peak_mb"] for x in rs)),
                      "rss_after_load_mb": round(min(x["rss_loaded_mb"] for x in rs)),
                      "load_s": round(min(x["load_s"] for x in rs), 1), "trainable": best["trainable"],
                      "first_loss": round(rs[0]["losses"][0], 4), "losses": [round(v, 4) for v in rs[0]["losses"]]})
    print(f"\n{'mode':5s} {'engine':18s} {'tok/s':>8s} {'peak RSS MB':>12s} {'loaded MB':>10s} {'train peak MB':>14s} {'trainable':>11s} {'step-1 loss':>11s}")
    for row in table:
        print(f"{row['mode']:5s} {row['engine']:18s} {row['tok_per_s']:8.1f} {row['peak_rss_mb']:12d} {row['rss_after_load_mb']:10d} "
              f"{row['train_peak_rss_mb']:14d} {row['trainable']:11d} {row['first_loss']:11.4f}")
    ratios = {}
    for mode in modes:
        o = next(x for x in table if x["mode"] == mode and x["engine"] == "ours")
        h = next(x for x in table if x["mode"] == mode and x["engine"].startswith("transformers"))
        ratios[mode] = {"speed_x": round(o["tok_per_s"] / h["tok_per_s"], 3),
                        "peak_rss_x": round(o["peak_rss_mb"] / h["peak_rss_mb"], 3),
                        "train_peak_rss_x": round(o["train_peak_rss_mb"] / max(1, h["train_peak_rss_mb"]), 3)}
        print(f"{mode}: ours/transformers speed {ratios[mode]['speed_x']:.2f}x (goal >= 1.5x), peak RSS "
              f"{ratios[mode]['peak_rss_x']:.2f}x, training peak RSS {ratios[mode]['train_peak_rss_x']:.2f}x (goal <= 0.6x)")
        if mode in paired:
            pr = sorted(paired[mode])
            ratios[mode]["paired_speed_x_median"] = round(pr[len(pr) // 2] if len(pr) % 2 else
                                                          (pr[len(pr) // 2 - 1] + pr[len(pr) // 2]) / 2, 3)
            ratios[mode]["paired_speed_x_all"] = [round(x, 3) for x in paired[mode]]
            print(f"{mode}: paired steps (one process, alternating): ours/transformers speed median "
                  f"{ratios[mode]['paired_speed_x_median']:.2f}x over {len(pr)} pairs (min {pr[0]:.2f}x, max {pr[-1]:.2f}x)")
        base = next((x for x in table if x["mode"] == mode and x["engine"] == "ours-baseline"), None)
        if base is not None:
            ratios[mode]["baseline_speed_x"] = round(base["tok_per_s"] / h["tok_per_s"], 3)
            ratios[mode]["baseline_peak_rss_x"] = round(base["peak_rss_mb"] / h["peak_rss_mb"], 3)
            print(f"{mode}: baseline/transformers speed {ratios[mode]['baseline_speed_x']:.2f}x, "
                  f"peak RSS {ratios[mode]['baseline_peak_rss_x']:.2f}x")
    import torch
    import transformers

    out = {"settings": {k: v for k, v in vars(args).items() if k in ("steps", "batch", "seq_len", "rank", "rounds",
                                                                     "threads", "modes", "baseline_src", "paired_steps")},
           "torch": torch.__version__, "transformers": transformers.__version__, "rows": table, "ratios": ratios,
           "note": "1 thread on a 2-core machine shared with other jobs: timings are noisy"}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
