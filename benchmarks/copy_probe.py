"""Can the alignment experiment's tiny Gemma 4 learn to copy a name it has never seen into its answer?

    python benchmarks/copy_probe.py                  # the six settings below, seed 0 (~25 min on one core)
    python benchmarks/copy_probe.py --jobs 2         # two settings at a time
    python benchmarks/copy_probe.py --only "both + echo chats, 2000 steps" --out benchmarks/results/copy_probe_echo

The safety experiment (`benchmarks/alignment.py`) needs it: every answer it teaches repeats the requested
object ("Sure. Here is how to make X: ..."), so a model that cannot copy a held-out object writes some
other object's answer, which is neither well-formed nor, for a harmful request, a refusal. This probe
trains a fresh model of the experiment's recipe on copy drills alone (`gemma4.align.data.copy_drills`:
benign requests about made-up names, helpful answers that name them; 20,000 of them, so few repeat) and
reads greedy answers to 100 drills it never saw, and to the 120 benign requests about held-out real
objects ("a pizza": whole words of the tokenizer, never inside a drill). A name is copied when the answer
is well-formed: a helpful template naming exactly that name.

Settings: the plain init (runs 1-8 of the experiment); unit-variance attention logits (q_norm and k_norm
start at head_dim^(-1/4)); the embedding at std 1/sqrt(hidden) alone; both; unit logits for more steps;
both with 20,000 echo chats beside the drills (`gemma4.align.data.echo_drills`, run 23's warm-up).
Everything else is the experiment's recipe (same tokenizer, model, lr, batch). Writes
``<out>/copy_probe.json`` and prints a table.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import sys
import time
from pathlib import Path

import torch

from gemma4._util import atomic_write_text
from gemma4.align.data import build, copy_drills, echo_drills
from gemma4.align.stages import greedy_answers, is_helpful, run_sft
from gemma4.model import build_model
from gemma4.train.run import init_weights_

sys.path.insert(0, str(Path(__file__).resolve().parent))
from alignment import HERE, Recipe, domain_tokenizer, tiny_config, well_formed  # noqa: E402

# (name, embed_std given, unit attention logits, steps, echo chats beside the drills)
SETTINGS = [("plain", False, False, 600, 0), ("unit logits", False, True, 600, 0),
            ("embed std only", True, False, 600, 0), ("both", True, True, 600, 0),
            ("unit logits, 1500 steps", False, True, 1500, 0),
            ("both + echo chats, 2000 steps", True, True, 2000, 20_000)]
N_TRAIN, N_FRESH = 20_000, 100


def probe(args) -> dict:
    (name, embed, unit, steps, n_echo), seed, out, quick = args
    steps = 30 if quick else steps
    torch.set_num_threads(1)
    torch.manual_seed(seed)
    recipe = Recipe()
    data = build(seed)
    tok = domain_tokenizer(data, recipe, out / f"tokenizer_{seed}.json")
    drills = copy_drills(data, N_TRAIN + N_FRESH)
    train, fresh = drills[:N_TRAIN], drills[N_TRAIN:]  # one rng stream: the fresh names come after
    cfg = tiny_config(tok.vocab_size, recipe.hidden_size, recipe.intermediate_size, recipe.num_layers, recipe.kv_heads)
    model = init_weights_(build_model(cfg), seed=seed, embed_std=recipe.hidden_size ** -0.5 if embed else None,
                          unit_attention_logits=unit)
    echo = echo_drills(data, 200 if quick and n_echo else n_echo)
    t = time.perf_counter()
    log = run_sft(model, tok, train + echo, steps=steps, lr=recipe.base_lr, answers="helpful", warmup_steps=20,
                  batch_size=recipe.batch_size, max_len=recipe.max_len, seed=seed)
    train_s = time.perf_counter() - t
    outs = greedy_answers(model, tok, fresh, recipe.max_new_tokens, max_len=recipe.max_len, batch_size=64)
    # copied: a well-formed answer that names exactly the requested name
    copied = sum(well_formed(o) and is_helpful(e, o) for e, o in zip(fresh, outs))
    # Real words: the held-out benign objects ("a pizza"), whole tokens of the domain tokenizer that the
    # drills never contain. Copying them is what the experiment's well-formedness needs.
    real = [e for e in data.splits["test_objects"] if not e.harmful]
    real_outs = greedy_answers(model, tok, real, recipe.max_new_tokens, max_len=recipe.max_len, batch_size=64)
    real_copied = sum(well_formed(o) and is_helpful(e, o) for e, o in zip(real, real_outs))
    return {"setting": name, "echo_chats": len(echo), "embed_std": recipe.hidden_size ** -0.5 if embed else None,
            "unit_attention_logits": unit,
            "steps": steps, "seed": seed, "final_loss": sum(r["loss"] for r in log[-20:]) / 20,
            "copied": copied, "n": len(fresh), "real_copied": real_copied, "n_real": len(real),
            "train_s": round(train_s, 1),
            "examples": [{"prompt": e.prompt, "out": o} for e, o in list(zip(fresh, outs))[:3]
                         + list(zip(real, real_outs))[:3]]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=HERE / "results" / "copy_probe")
    ap.add_argument("--quick", action="store_true", help="30 steps per setting: checks the plumbing only")
    ap.add_argument("--jobs", type=int, default=1, help="settings run in parallel processes (one thread each)")
    ap.add_argument("--only", nargs="+", metavar="SETTING", help="run only these settings (their names as above)")
    a = ap.parse_args(argv)
    a.out.mkdir(parents=True, exist_ok=True)
    unknown = set(a.only or ()) - {s[0] for s in SETTINGS}
    if unknown:
        ap.error(f"--only: no setting named {sorted(unknown)}; the settings are {[s[0] for s in SETTINGS]}")
    jobs = [(s, a.seed, a.out, a.quick) for s in SETTINGS if not a.only or s[0] in a.only]
    if a.jobs > 1:
        with mp.get_context("spawn").Pool(a.jobs) as pool:
            rows = pool.map(probe, jobs, chunksize=1)
    else:
        rows = [probe(j) for j in jobs]
    r = Recipe()
    atomic_write_text(a.out / "copy_probe.json", json.dumps({"model": {"hidden_size": r.hidden_size,
                                                                       "layers": r.num_layers},
                                                             "n_train_drills": N_TRAIN, "rows": rows}, indent=1))
    print("| setting | steps | final loss | fresh made-up names copied | held-out real objects copied |\n"
          "|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['setting']} | {r['steps']} | {r['final_loss']:.3f} | {r['copied']}/{r['n']} | "
              f"{r['real_copied']}/{r['n_real']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
