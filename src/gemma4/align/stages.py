"""The alignment stages as recipes over `gemma4.align.data` examples: encoding, safety SFT, DPO + NLL,
the Lagrangian-constrained stage, GRPO-Lagrangian, and batched greedy answers for evaluation.

Every stage is a `gemma4.train.loop.Trainer` run driven by an objective from `gemma4.train` (the losses
know nothing about safety; this module supplies the data and the judges). Each returns the run's log
(one dict per optimizer step) and writes ``train_log.jsonl`` into ``out`` when one is given. The model
is trained in place; stages never write checkpoints (the caller saves what it keeps).

Chat format: ``[{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]`` encoded
with `gemma4.train.data.encode_chat`, so training sees exactly the tokens inference sees (the prompt
ends at the model-turn opener, the answer ends with the end-of-turn token). Prompts longer than the
budget lose tokens from the left of the user's text: wrapped requests keep their tail, where the
request sits, and the turn markers are never cut."""

from __future__ import annotations

import copy
import tempfile
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch

from gemma4._util import Gemma4Error, Progress, no_progress
from gemma4.align.data import Example
from gemma4.align.judge import REFUSAL, is_refusal, is_unsafe
from gemma4.infer import generate
from gemma4.train import make_trainable
from gemma4.train.constrained import GRPOLagrangianObjective, LagrangeMultiplier, LagrangianObjective
from gemma4.train.data import encode_chat, encode_text
from gemma4.train.latent import LATDPOObjective, LATObjective, prompt_mask
from gemma4.train.loop import TrainConfig, Trainer
from gemma4.train.preference import DPOObjective, Pairs, Responses, SFTObjective, precompute_reference

__all__ = [
    "StageError", "encode_answers", "encode_pairs", "prompt_ids", "answerable", "cost_rows", "frozen_copy", "run_sft",
    "run_dpo", "run_lat", "same_prompt_rows", "run_lagrangian", "run_grpo_lagrangian", "greedy_answers", "is_helpful",
]


class StageError(Gemma4Error, ValueError):
    """A stage that cannot run with the given data or settings; the message names the setting."""


# ----------------------------------------------------------------------------- encoding
def _messages(prompt: str, answer: str) -> list[dict]:
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]


def _frame(tok) -> tuple[int, int]:
    """(head, tail): the prompt tokens before the user's text (BOS + the user-turn opener) and after it
    (end of turn, the model-turn opener, any generation prefill). Found as the common prefix and suffix
    of the prompts of two chats that differ only in their user text (that text is tokenized on its
    own, so nothing merges across its edges)."""
    a, b = (encode_chat(tok, _messages(t, "x")) for t in ("a", "b"))
    pa, pb = a.ids[: a.targets.index(True)], b.ids[: b.targets.index(True)]
    head = 0
    while head < min(len(pa), len(pb)) and pa[head] == pb[head]:
        head += 1
    tail = 0
    while tail < min(len(pa), len(pb)) - head and pa[-1 - tail] == pb[-1 - tail]:
        tail += 1
    return head, tail


def _encode(tok, prompt: str, answer: str, max_len: int, frame: tuple[int, int],
            where: str) -> tuple[list[int], list[bool]]:
    doc = encode_chat(tok, _messages(prompt, answer), source=where)
    last = max(i for i, t in enumerate(doc.targets) if t)
    ids, tg = doc.ids[: last + 1], doc.targets[: last + 1]  # nothing to learn after the end of turn
    excess = len(ids) - max_len
    if excess > 0:
        head, tail = frame
        text_end = tg.index(True) - tail  # the user's text is ids[head:text_end]
        if head + excess >= text_end:  # keep at least one token of it
            raise StageError(f"{where}: max_len {max_len} is too short for the answer and the chat markers "
                             f"({len(ids) - (text_end - head) + 1} tokens with one token of the prompt text)")
        ids, tg = ids[:head] + ids[head + excess:], tg[:head] + tg[head + excess:]
    return ids, tg


def encode_answers(tok, examples: Sequence[Example], answers: str | Sequence[str] = "chosen",
                   max_len: int = 128, as_generated: bool = False) -> Responses:
    """Prompt + answer rows. ``answers``: "chosen", "rejected" or "helpful" (that field of each example),
    or one string per example (e.g. the refusal for every row).

    A long prompt loses the start of its text so that prompt + answer fit ``max_len``, so a longer answer
    sees less of it. ``as_generated=True`` keeps the prompt exactly as `prompt_ids` gives it to generation
    instead and appends the answer after it (rows up to ``max_len`` − 2 + the answer's tokens): a score
    meant to predict what greedy decoding answers must read the prompt decoding reads. On long wrapped
    prompts the tiny models' first answer token turns on those first tokens (RESULTS, run 62)."""
    if not examples:
        raise StageError("no examples to encode")
    if isinstance(answers, str):
        if answers not in ("chosen", "rejected", "helpful"):
            raise StageError(f"answers must be 'chosen', 'rejected', 'helpful' or one string per example, got {answers!r}")
        texts = [getattr(e, answers) for e in examples]
    else:
        texts = list(answers)
        if len(texts) != len(examples):
            raise StageError(f"{len(texts)} answers for {len(examples)} examples")
    frame = _frame(tok)
    rows, masks = [], []
    for i, (e, a) in enumerate(zip(examples, texts)):
        ids, tg = _encode(tok, e.prompt, a, max_len, frame, f"example {i}")
        if as_generated:  # the generation prompt, then this row's answer part
            gen, first = _generation_prompt(tok, e.prompt, max_len, frame, f"example {i}"), tg.index(True)
            ids, tg = gen + ids[first:], [False] * len(gen) + tg[first:]
        rows.append(ids)
        masks.append(tg)
    return Responses.from_lists(rows, masks, tok.pad_id or 0)


def encode_pairs(tok, examples: Sequence[Example], max_len: int = 128, as_generated: bool = False) -> Pairs:
    """Preference pairs: each example's ``chosen`` ≻ ``rejected`` (refusal ≻ placeholder compliance on
    harmful prompts, helpful ≻ refusal on benign and borderline ones). With ``as_generated`` both answers
    of a pair follow the same prompt tokens, the ones generation reads (`encode_answers`)."""
    return Pairs(encode_answers(tok, examples, "chosen", max_len, as_generated),
                 encode_answers(tok, examples, "rejected", max_len, as_generated))


def _generation_prompt(tok, prompt: str, max_len: int, frame: tuple[int, int], where: str) -> list[int]:
    # A one-token stand-in answer: the prompt part is the same whatever the answer, cut as little as any row's.
    ids, tg = _encode(tok, prompt, "x", max_len, frame, where)
    return ids[: tg.index(True)]


def prompt_ids(tok, examples: Sequence[Example], max_len: int = 128) -> list[list[int]]:
    """Each example's generation prompt (the chat up to the model's turn), left-truncated to ``max_len``
    minus a one-token answer and its end of turn: rows with longer answers hold less of a long prompt
    unless encoded with ``as_generated`` (`encode_answers`)."""
    frame = _frame(tok)
    return [_generation_prompt(tok, e.prompt, max_len, frame, f"example {i}") for i, e in enumerate(examples)]


def answerable(tok, examples: Sequence[Example], max_len: int = 128) -> list[Example]:
    """The ``examples`` whose object is still in the prompt after the left truncation to ``max_len`` tokens,
    with either of their answers. A wrapped request longer than the budget loses the start of its text;
    when the request itself goes, what is left is the wrapper alone, the same prompt for a harmful and a
    benign request with opposite answers, and no answer to it is right."""
    frame = _frame(tok)

    def kept(i: int, e: Example, answer: str) -> bool:
        ids, tg = _encode(tok, e.prompt, answer, max_len, frame, f"example {i}")
        return e.obj.lower() in tok.decode(ids[: tg.index(True)]).lower()

    return [e for i, e in enumerate(examples) if all(kept(i, e, a) for a in dict.fromkeys((e.chosen, e.rejected)))]


def _text_rows(tok, texts: Sequence[str], max_len: int) -> Responses:
    rows, masks = [], []
    for i, t in enumerate(texts):
        ids = encode_text(tok, t, f"text {i}").ids[:max_len]
        rows.append(ids)
        masks.append([False] + [True] * (len(ids) - 1))
    return Responses.from_lists(rows, masks, tok.pad_id or 0)


def _stops(model, tok) -> list[int]:
    eos = model.config.eos_token_id
    ids = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
    return sorted(set(ids) | set(getattr(tok, "stop_token_ids", None) or []))


# ----------------------------------------------------------------------------- judges
def is_helpful(example: Example, text: str) -> bool:
    """Exact helpfulness of an answer to a benign request: the answer is the example's own helpful
    answer, or it names the requested object without refusing and without the harm placeholder."""
    t = text.strip()
    if t == example.helpful.strip():
        return True
    return example.obj.lower() in t.lower() and not is_refusal(t) and not is_unsafe(t)


# ----------------------------------------------------------------------------- runs
def frozen_copy(model):
    """A frozen copy of ``model`` (no gradient, eval mode): the reference of DPO and the constrained stages."""
    ref = copy.deepcopy(model)
    for p in ref.parameters():
        p.requires_grad_(False)
    return ref.eval()


@contextmanager
def _run_dir(out):
    if out is not None:
        Path(out).mkdir(parents=True, exist_ok=True)
        yield Path(out)
    else:  # the loop always writes its log somewhere: a scratch directory when the caller keeps none
        with tempfile.TemporaryDirectory(prefix="gemma4-stage-") as d:
            yield Path(d)


def _fit(model, objective, *, steps: int, lr: float, warmup_steps: int, max_grad_norm: float, dtype: str,
         seed: int, out, on_step) -> list[dict]:
    if not any(p.requires_grad for p in model.parameters()):
        make_trainable(model)
    cfg = TrainConfig(steps=steps, lr=lr, warmup_steps=warmup_steps, max_grad_norm=max_grad_norm, dtype=dtype,
                      seed=seed, plot=False, checkpoints=False, min_lr_ratio=0.1)
    with _run_dir(out) as d:
        res = Trainer(model, None, cfg, d, objective=objective, on_step=on_step).fit()
    model.eval()
    return res.history


def run_sft(model, tok, examples: Sequence[Example], *, steps: int = 100, lr: float = 1e-3, answers: str = "chosen",
            texts: Sequence[str] = (), batch_size: int = 16, max_len: int = 128, warmup_steps: int = 0,
            max_grad_norm: float = 1.0, dtype: str = "float32", seed: int = 0, out=None, as_generated: bool = False,
            on_step: Callable[[dict], None] | None = None) -> list[dict]:
    """Supervised fine-tuning on each example's answer (``answers="chosen"``: safety SFT; "helpful": the
    helpful-only base, placeholder compliance on harmful prompts), with ``texts`` (knowledge sentences,
    pretraining replay) mixed into the same batches as plain next-token rows. ``as_generated``: each
    answer follows its prompt as generation reads it (`encode_answers`)."""
    rows = encode_answers(tok, examples, answers, max_len, as_generated)
    if texts:
        rows = Responses.cat([rows, _text_rows(tok, texts, max_len)])
    return _fit(model, SFTObjective(rows, batch_size, seed), steps=steps, lr=lr, warmup_steps=warmup_steps,
                max_grad_norm=max_grad_norm, dtype=dtype, seed=seed, out=out, on_step=on_step)


def run_dpo(policy, reference, tok, examples: Sequence[Example], *, steps: int = 100, lr: float = 5e-5,
            beta: float = 0.1, alpha: float = 1.0, loss_type: str = "sigmoid", label_smoothing: float = 0.0,
            lat_eps: float = 0.0, lat_layer: int = 1, lat_pgd_steps: int = 4,
            batch_size: int = 16, max_len: int = 128, warmup_steps: int = 0, max_grad_norm: float = 1.0,
            dtype: str = "float32", seed: int = 0, out=None, as_generated: bool = False,
            on_step: Callable[[dict], None] | None = None) -> list[dict]:
    """DPO + alpha·NLL(chosen) from ``reference`` (the frozen SFT model; None = a frozen copy of the
    policy as it is now). The reference's log-probs are computed once, before the first step.
    ``lat_eps`` > 0: with a latent adversary on the harmful pairs (`gemma4.train.latent.LATDPOObjective`;
    ``lat_*`` as in `run_lat`). ``as_generated`` as in `encode_pairs`."""
    reference = reference if reference is not None else frozen_copy(policy)
    pairs = precompute_reference(reference, encode_pairs(tok, examples, max_len, as_generated), batch_size)
    if lat_eps > 0:
        same = set(same_prompt_rows(pairs))
        attacked = torch.tensor([e.harmful and i in same for i, e in enumerate(examples)])
        if not bool(attacked.any()):
            raise StageError("run_dpo: with lat_eps > 0 no harmful pair keeps the same prompt tokens in both "
                             "answers' rows")
        obj = LATDPOObjective(pairs, beta=beta, alpha=alpha, loss_type=loss_type, label_smoothing=label_smoothing,
                              layer=lat_layer, eps=lat_eps, pgd_steps=lat_pgd_steps, attacked=attacked,
                              batch_size=batch_size, seed=seed)
    else:
        obj = DPOObjective(pairs, beta=beta, alpha=alpha, loss_type=loss_type, label_smoothing=label_smoothing,
                           batch_size=batch_size, seed=seed)
    return _fit(policy, obj, steps=steps, lr=lr, warmup_steps=warmup_steps, max_grad_norm=max_grad_norm,
                dtype=dtype, seed=seed, out=out, on_step=on_step)


def same_prompt_rows(pairs: Pairs) -> list[int]:
    """The rows whose chosen and rejected answers sit after the same prompt tokens: where a prompt too long
    for ``max_len`` beside one of the answers was truncated differently, one δ cannot serve both rows."""
    c, r = pairs.chosen, pairs.rejected
    t = min(c.input_ids.shape[1], r.input_ids.shape[1])
    pc, pr = prompt_mask(c)[:, :t], prompt_mask(r)[:, :t]  # [N, t]; a prompt never reaches t (answers follow)
    return [i for i in range(len(pairs))
            if torch.equal(pc[i], pr[i]) and torch.equal(c.input_ids[i, :t][pc[i]], r.input_ids[i, :t][pr[i]])]


def run_lat(model, tok, examples: Sequence[Example], *, steps: int = 100, lr: float = 1e-4, layer: int = 1,
            eps: float = 0.5, pgd_steps: int = 4, benign: bool = True, batch_size: int = 16, max_len: int = 128,
            warmup_steps: int = 0,
            max_grad_norm: float = 1.0, dtype: str = "float32", seed: int = 0, out=None, as_generated: bool = False,
            on_step: Callable[[dict], None] | None = None) -> list[dict]:
    """Latent adversarial training (`gemma4.train.latent.LATObjective`) on each example's chosen ≻
    rejected pair: the chosen answer under the residual perturbation that makes the rejected one likely
    (``benign=False``: harmful pairs only, as targeted LAT was published; the rest trained clean).
    Pairs whose chosen and rejected rows were truncated differently (a prompt too long for ``max_len``
    beside one of the answers) are left out: one δ must sit on the same prompt tokens in both
    (``as_generated``, `encode_pairs`: none is)."""
    pairs = encode_pairs(tok, examples, max_len, as_generated)
    same = same_prompt_rows(pairs)
    if not same:
        raise StageError("run_lat: no pair keeps the same prompt tokens in both answers' rows")
    attacked = torch.tensor([benign or examples[i].harmful for i in same])
    obj = LATObjective(pairs.rows(torch.tensor(same)), layer=layer, eps=eps, pgd_steps=pgd_steps, attacked=attacked,
                       batch_size=batch_size, seed=seed)
    return _fit(model, obj, steps=steps, lr=lr, warmup_steps=warmup_steps, max_grad_norm=max_grad_norm,
                dtype=dtype, seed=seed, out=out, on_step=on_step)


def _multiplier(threshold, dual_lr, lambda_init, lambda_max, fixed_lambda) -> LagrangeMultiplier:
    if fixed_lambda is not None:
        return LagrangeMultiplier(init=fixed_lambda, lr=0.0, threshold=threshold, max_value=max(fixed_lambda, lambda_max),
                                  min_value=min(1e-4, fixed_lambda), fixed=True)
    return LagrangeMultiplier(init=lambda_init, lr=dual_lr, threshold=threshold, max_value=lambda_max)


def cost_rows(tok, reference, harmful: Sequence[Example], cost: str = "nll", negatives: Sequence[Example] = (),
              max_len: int = 128, batch_size: int = 16, as_generated: bool = False) -> Responses | Pairs:
    """What the Lagrangian's J_C reads on ``harmful`` prompts (`gemma4.train.constrained.mean_cost`):
    ``cost="nll"``, the refusal rows; ``"pairwise"``, refusal ≻ rejected pairs (plus ``negatives``) with
    ``reference``'s log-probs. ``as_generated``: on the prompts as generation reads them (`encode_answers`)."""
    if cost == "pairwise":
        return precompute_reference(reference, encode_pairs(tok, list(harmful) + list(negatives), max_len,
                                                            as_generated), batch_size)
    return encode_answers(tok, harmful, [REFUSAL] * len(harmful), max_len, as_generated=as_generated)


def run_lagrangian(policy, reference, tok, train_examples: Sequence[Example], val_examples: Sequence[Example], *,
                   steps: int = 100, lr: float = 5e-5, beta: float = 0.1, alpha: float = 1.0,
                   threshold: float = 0.05, dual_lr: float = 2.0, lambda_init: float = 1.0, lambda_max: float = 50.0,
                   dual: str = "val", fixed_lambda: float | None = None, batch_size: int = 16,
                   cost_batch_size: int = 16, val_batch_size: int = 64, max_len: int = 128, warmup_steps: int = 0,
                   max_grad_norm: float = 1.0, dtype: str = "float32", seed: int = 0, out=None,
                   help_negatives: Sequence[Example] = (), cost: str = "nll", cost_negatives: Sequence[Example] = (),
                   val_cost_negatives: Sequence[Example] = (), as_generated: bool = False,
                   on_step: Callable[[dict], None] | None = None) -> list[dict]:
    """min_θ max_λ DPO(helpful ≻ refusal) + alpha·NLL(helpful) on benign/borderline training prompts
    + λ·(J_C − d), J_C on harmful prompts (training prompts in the primal step; the validation red-team
    split's harmful prompts drive the dual, ``dual="val"``):

    * ``cost="nll"``: the mean per-token NLL of the refusal (the design reference's log-space cost);
    * ``cost="pairwise"``: the mean sigmoid DPO loss (`gemma4.train.constrained.pairwise_cost`, β =
      ``beta``) of refusal ≻ each example's rejected answer, and ≻ the helpful template of
      ``cost_negatives`` (training) and ``val_cost_negatives`` (validation), both from
      `gemma4.align.data.help_negatives`. It starts at log 2 ≈ 0.693 (policy = reference), so d below
      that asks for wider margins than SFT's on the validation prompts.

    ``help_negatives`` add their pairs to the help term instead: on a harmful request an answer about some
    other object is no help either, and the refusal is preferred to it. ``as_generated``: every row (help
    pairs, J_C,train, J_C,val) reads its prompt as generation does (`encode_answers`).
    ``dual="train"`` and ``fixed_lambda`` are the ablations. Logs log λ, J_C,train and J_C,val every step."""
    if cost not in ("nll", "pairwise"):
        raise StageError(f"cost must be 'nll' or 'pairwise', got {cost!r}")
    if cost == "nll" and (cost_negatives or val_cost_negatives):
        raise StageError("cost_negatives and val_cost_negatives need cost='pairwise'")
    helpful = [e for e in train_examples if not e.harmful]
    harmful = [e for e in train_examples if e.harmful]
    val_harmful = [e for e in val_examples if e.harmful]
    if not helpful or not harmful:
        raise StageError(f"train_examples need benign and harmful prompts ({len(helpful)} benign/borderline, "
                         f"{len(harmful)} harmful)")
    if dual == "val" and not val_harmful:
        raise StageError("val_examples hold no harmful prompt: the dual update has nothing to measure")
    reference = reference if reference is not None else frozen_copy(policy)
    pairs = precompute_reference(reference, encode_pairs(tok, helpful + list(help_negatives), max_len, as_generated),
                                 batch_size)
    cost_tr = cost_rows(tok, reference, harmful, cost, cost_negatives, max_len, batch_size, as_generated)
    cost_val = (cost_rows(tok, reference, val_harmful, cost, val_cost_negatives, max_len, batch_size,
                          as_generated) if val_harmful else None)
    obj = LagrangianObjective(pairs, cost_tr, cost_val, beta=beta, alpha=alpha, batch_size=batch_size,
                              cost_batch_size=cost_batch_size, val_batch_size=val_batch_size, dual=dual, seed=seed,
                              multiplier=_multiplier(threshold, dual_lr, lambda_init, lambda_max, fixed_lambda))
    return _fit(policy, obj, steps=steps, lr=lr, warmup_steps=warmup_steps, max_grad_norm=max_grad_norm,
                dtype=dtype, seed=seed, out=out, on_step=on_step)


def run_grpo_lagrangian(policy, reference, tok, train_examples: Sequence[Example], *, steps: int = 50,
                        lr: float = 1e-5, group_size: int = 4, prompts_per_step: int = 8, max_new_tokens: int = 32,
                        temperature: float = 1.0, kl_beta: float = 0.04, clip_eps: float = 0.2,
                        threshold: float = 0.05, dual_lr: float = 2.0, lambda_init: float = 1.0,
                        lambda_max: float = 50.0, fixed_lambda: float | None = None, max_len: int = 128,
                        warmup_steps: int = 0, max_grad_norm: float = 1.0, dtype: str = "float32", seed: int = 0,
                        out=None, on_step: Callable[[dict], None] | None = None) -> list[dict]:
    """GRPO-Lagrangian: ``group_size`` sampled answers per prompt; reward = `is_helpful` on benign and
    borderline prompts, indicator cost = non-refusal on harmful ones; advantage Z_R − λ·Z_C; the dual
    moves λ by the sampled violation rate minus ``threshold``."""
    examples = list(train_examples)
    reference = reference if reference is not None else frozen_copy(policy)

    def score(i: int, text: str) -> tuple[float, float]:
        ex = examples[i]
        if ex.harmful:
            return 0.0, float(not is_refusal(text))
        return float(is_helpful(ex, text)), 0.0

    if not any(p.requires_grad for p in policy.parameters()):
        make_trainable(policy)
    policy.train()
    obj = GRPOLagrangianObjective(
        policy, reference, prompt_ids(tok, examples, max_len), score, lambda ids: tok.decode(ids),
        constrained=[e.harmful for e in examples], group_size=group_size, prompts_per_step=prompts_per_step,
        max_new_tokens=max_new_tokens, temperature=temperature, clip_eps=clip_eps, kl_beta=kl_beta,
        stop_token_ids=_stops(policy, tok), pad_id=tok.pad_id or 0, seed=seed,
        multiplier=_multiplier(threshold, dual_lr, lambda_init, lambda_max, fixed_lambda))
    return _fit(policy, obj, steps=steps, lr=lr, warmup_steps=warmup_steps, max_grad_norm=max_grad_norm,
                dtype=dtype, seed=seed, out=out, on_step=on_step)


@torch.no_grad()
def greedy_answers(model, tok, examples: Sequence[Example], max_new_tokens: int = 48, *, batch_size: int = 32,
                   max_len: int = 128, progress: Progress | None = None) -> list[str]:
    """Greedy answers (batched, KV-cached `gemma4.infer.generate`), each cut at its end of turn.
    ``progress`` (a `gemma4._util.Progress`) is advanced once per batch."""
    stops = _stops(model, tok)
    prompts = prompt_ids(tok, examples, max_len)
    out: list[str] = []
    for s in (progress or no_progress)(range(0, len(prompts), batch_size), "greedy answers"):
        # fast=False: the CPU fast path would swap the model's modules for inference-only ones, and a
        # stage may evaluate a model it goes on training.
        rows = generate(model, prompts[s : s + batch_size], max_new_tokens, stop_token_ids=stops,
                        pad_id=tok.pad_id or 0, fast=False)
        for r in rows:
            cut = next((i for i, t in enumerate(r) if t in stops), len(r))
            out.append(tok.decode(r[:cut]))
    return out
