"""Constrained objectives: a Lagrange multiplier with dual ascent, the RL-free Lagrangian stage
(helpfulness DPO + λ · a log-space refusal cost) and GRPO-Lagrangian (sampled groups, per-component
z-scored advantages, clipped ratio, KL to the reference).

Problem: minimise L_help(θ) subject to J_C(θ) ≤ d, solved as min_θ max_{λ≥0} L_help + λ·(J_C − d). The
primal step is an ordinary optimizer step on L_help + λ·J_C,train; the dual step moves log λ by the
constraint violation measured where the constraint is meant to hold (a held-out validation split by
default: on training prompts the constraint is met almost at once and then says nothing).

Both objectives follow `gemma4.train.loop.Trainer`'s objective protocol. Judges are not imported here:
the GRPO objective takes a ``score(prompt_index, text) -> (reward, cost)`` callable."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from gemma4._util import Gemma4Error
from gemma4.infer import generate
from gemma4.train.preference import (Pairs, Responses, _rows_logprobs, _Sampler, dpo_step, preference_loss,
                                     token_logprobs)

__all__ = [
    "ConstraintError", "LagrangeMultiplier", "refusal_cost", "mean_refusal_cost", "pairwise_cost", "mean_cost",
    "LagrangianObjective", "group_zscore", "grpo_advantages", "GRPOLagrangianObjective",
]


class ConstraintError(Gemma4Error, ValueError):
    """Bad constrained-training settings; the message names the setting."""


class LagrangeMultiplier:
    """λ ≥ 0 stored as log λ, updated by ``log λ ← clamp(log λ + η·(J − d), log λ_min, log λ_max)``.

    Working in log space makes the step multiplicative (λ rises and decays geometrically, never
    crosses 0) and is what Safe RLHF does. The floor λ_min keeps a long satisfied stretch from driving
    log λ so low that the multiplier needs dozens of steps to respond when the constraint binds again.
    ``fixed=True`` never updates (the fixed-penalty ablation)."""

    def __init__(self, init: float = 1.0, lr: float = 2.0, threshold: float = 0.05, max_value: float = 50.0,
                 min_value: float = 1e-4, fixed: bool = False):
        if not (init > 0 and max_value > 0 and 0 < min_value <= init <= max_value):
            raise ConstraintError(f"need 0 < lambda_min ({min_value}) <= lambda_init ({init}) <= lambda_max ({max_value})")
        if lr < 0:
            raise ConstraintError(f"lambda learning rate must be >= 0, got {lr}")
        self.log_lambda = math.log(init)
        self.lr, self.threshold, self.fixed = float(lr), float(threshold), bool(fixed)
        self.log_max, self.log_min = math.log(max_value), math.log(min_value)

    @property
    def value(self) -> float:
        return math.exp(self.log_lambda)

    def update(self, cost: float) -> float:
        """One dual-ascent step on the measured cost; returns the new λ."""
        if not math.isfinite(cost):
            raise ConstraintError(f"the constraint cost is not finite ({cost})")
        if not self.fixed:
            self.log_lambda = min(self.log_max, max(self.log_min, self.log_lambda + self.lr * (cost - self.threshold)))
        return self.value

    def state(self) -> dict:
        return {"log_lambda": self.log_lambda}

    def load_state(self, st: dict) -> None:
        self.log_lambda = float(st["log_lambda"])


def refusal_cost(model, rows: Responses) -> torch.Tensor:
    """Per-row cost [B]: the mean per-token NLL of the (refusal) response. Log space on purpose: a
    probability cost 1 − p(refusal) has a vanishing gradient once p is near 0, exactly where the
    constraint is violated worst."""
    lp, ntok = _rows_logprobs(model, rows)
    return -lp / ntok.clamp_min(1)


@torch.no_grad()
def mean_refusal_cost(model, rows: Responses, batch_size: int = 64) -> float:
    """J_C over ``rows``: the mean of `refusal_cost`, no gradient, in batches of ``batch_size``."""
    total = 0.0
    for s in range(0, len(rows), batch_size):
        total += float(refusal_cost(model, rows.rows(slice(s, s + batch_size))).sum())
    return total / len(rows)


def pairwise_cost(model, pairs: Pairs, beta: float = 0.1) -> torch.Tensor:
    """Per-pair cost [B]: the sigmoid DPO loss of (refusal ≻ an answer) pairs, −log σ(β·z) with z the
    policy's log-ratio margin over the reference's (log 2 where the policy is the reference). Unlike
    `refusal_cost` it does not saturate once the refusal is certain on the training prompts: the gradient
    keeps pushing the rejected answer down, which is what holds prompts never trained on."""
    if pairs.ref_chosen is None or pairs.ref_rejected is None:
        raise ConstraintError("cost pairs need reference log-probs: call precompute_reference first")
    n = len(pairs)
    lp, _ = _rows_logprobs(model, Responses.cat([pairs.chosen, pairs.rejected]))
    dev = lp.device
    loss, _, _ = preference_loss(lp[:n], lp[n:], pairs.ref_chosen.to(dev), pairs.ref_rejected.to(dev), beta=beta)
    return loss


@torch.no_grad()
def mean_cost(model, rows: Responses | Pairs, beta: float = 0.1, batch_size: int = 64) -> float:
    """J_C over ``rows``, no gradient, in batches of ``batch_size``: `mean_refusal_cost` for refusal rows,
    the mean of `pairwise_cost` (at ``beta``) for pairs."""
    if not isinstance(rows, Pairs):
        return mean_refusal_cost(model, rows, batch_size)
    total = 0.0
    for s in range(0, len(rows), batch_size):
        total += float(pairwise_cost(model, rows.rows(slice(s, s + batch_size)), beta).sum())
    return total / len(rows)


class LagrangianObjective:
    """L = DPO(helpful ≻ refusal) + α·NLL(helpful) on benign pairs + λ·J_C,train, where J_C is the mean
    per-token NLL of the refusal on harmful prompts (``cost_train``/``cost_val`` as `Responses`: the
    refusal rows) or the mean `pairwise_cost` of (refusal ≻ answer) pairs on harmful prompts (both as
    `Pairs` with reference log-probs). After each optimizer step the dual update uses J_C on ``cost_val``
    (``dual="val"``, default) or on this step's training batch (``dual="train"``, the ablation); a
    ``LagrangeMultiplier(fixed=True)`` gives the fixed-penalty ablation.

    Logged every step: loss_help, j_tr, j_val, lambda (used in this step's loss), log_lambda (after the
    dual update), and the DPO metrics of the helpfulness pairs."""

    def __init__(self, help_pairs: Pairs, cost_train: Responses | Pairs,
                 cost_val: Responses | Pairs | None = None, *,
                 multiplier: LagrangeMultiplier | None = None, beta: float = 0.1, alpha: float = 1.0,
                 loss_type: str = "sigmoid", batch_size: int = 16, cost_batch_size: int = 16,
                 val_batch_size: int = 64, dual: str = "val", seed: int = 0):
        if dual not in ("val", "train"):
            raise ConstraintError(f"dual must be 'val' or 'train', got {dual!r}")
        if dual == "val" and (cost_val is None or not len(cost_val)):
            raise ConstraintError("dual='val' needs validation cost rows (cost_val)")
        if help_pairs.ref_chosen is None and loss_type != "simpo":
            raise ConstraintError("help_pairs need reference log-probs: call precompute_reference first")
        self.pairwise = isinstance(cost_train, Pairs)
        if cost_val is not None and isinstance(cost_val, Pairs) != self.pairwise:
            raise ConstraintError("cost_train and cost_val must both be refusal rows (Responses) or both Pairs")
        self.pairs, self.cost_train, self.cost_val, self.dual = help_pairs, cost_train, cost_val, dual
        self.cost_beta = beta
        self.mult = multiplier or LagrangeMultiplier()
        self.kw = dict(beta=beta, alpha=alpha, loss_type=loss_type)
        self.val_batch_size = val_batch_size
        self.help_sampler = _Sampler(len(help_pairs), batch_size, seed)
        self.cost_sampler = _Sampler(len(cost_train), cost_batch_size, seed + 1)
        self._j_tr: list[float] = []

    def next_batch(self) -> tuple[Pairs, Responses | Pairs]:
        return self.pairs.rows(self.help_sampler.next()), self.cost_train.rows(self.cost_sampler.next())

    def loss(self, model, batch) -> tuple[torch.Tensor, dict]:
        pairs, cost_rows = batch
        l_help, logs = dpo_step(model, pairs, **self.kw)
        if self.pairwise:
            j_tr = pairwise_cost(model, cost_rows, self.cost_beta).mean()
            cost_tokens = int(cost_rows.chosen.lengths.sum() + cost_rows.rejected.lengths.sum())
        else:
            j_tr = refusal_cost(model, cost_rows).mean()
            cost_tokens = int(cost_rows.lengths.sum())
        lam = self.mult.value
        self._j_tr.append(float(j_tr.detach()))
        logs = {"loss_help": float(l_help.detach()), "j_tr": float(j_tr.detach()), "lambda": lam, **logs,
                "tokens": logs["tokens"] + cost_tokens}
        return l_help + lam * j_tr, logs

    def after_step(self, model, step: int, rec: dict) -> dict:
        out = {}
        if self.cost_val is not None and len(self.cost_val):
            out["j_val"] = mean_cost(model, self.cost_val, self.cost_beta, self.val_batch_size)
        signal = out["j_val"] if self.dual == "val" else sum(self._j_tr) / len(self._j_tr)
        self._j_tr = []
        self.mult.update(signal)
        out["log_lambda"] = self.mult.log_lambda
        return out

    def state(self) -> dict:
        return {"help": self.help_sampler.state(), "cost": self.cost_sampler.state(), "dual": self.mult.state()}

    def load_state(self, st: dict) -> None:
        self.help_sampler.load_state(st["help"])
        self.cost_sampler.load_state(st["cost"])
        self.mult.load_state(st["dual"])


# ----------------------------------------------------------------------------- GRPO-Lagrangian
def group_zscore(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """(x − group mean) / group std along dim 1 of [P, G]; a group whose values are all equal (std 0:
    nothing to prefer) gets zeros instead of a division by zero. Population std (G samples are the
    whole group)."""
    mean = x.mean(1, keepdim=True)
    std = x.std(1, keepdim=True, unbiased=False)
    return torch.where(std > eps, (x - mean) / std.clamp_min(eps), torch.zeros_like(x))


def grpo_advantages(rewards: torch.Tensor, costs: torch.Tensor, lam: float) -> torch.Tensor:
    """A = Z_R − λ·Z_C over groups [P, G]. Each component is z-scored within its group *before* they
    are combined: scalarising first (r − λc, then one z-score) would let the within-group variances
    re-weight the terms, and λ would stop meaning the price of a unit of cost."""
    if rewards.shape != costs.shape or rewards.dim() != 2:
        raise ConstraintError(f"rewards {list(rewards.shape)} and costs {list(costs.shape)} must both be [P, G]")
    return group_zscore(rewards.float()) - lam * group_zscore(costs.float())


class GRPOLagrangianObjective:
    """GRPO with a cost constraint. Each batch: ``prompts_per_step`` prompts, ``group_size`` samples each
    from the current policy (KV-cached `gemma4.infer.generate`, temperature ~1), scored by
    ``score(prompt_index, text) -> (reward, cost)``; advantage Z_R − λ·Z_C per sample, on every one of
    its tokens; PPO-clipped ratio against the sampling policy's token log-probs plus β·KL(π‖π_ref) (the
    k3 estimator exp(r−p) − (r−p) − 1, unbiased and always ≥ 0). The dual step uses the mean cost of the
    samples of ``constrained`` prompts (e.g. the harmful ones, indicator cost = non-refusal).

    ``prompts``: token ids of each prompt up to the model's turn (generation prompts)."""

    def __init__(self, policy, reference, prompts: Sequence[Sequence[int]], score: Callable[[int, str], tuple[float, float]],
                 decode: Callable[[list[int]], str], *, constrained: Sequence[bool] | None = None,
                 multiplier: LagrangeMultiplier | None = None, group_size: int = 4, prompts_per_step: int = 4,
                 max_new_tokens: int = 24, temperature: float = 1.0, top_k: int = 0, clip_eps: float = 0.2,
                 kl_beta: float = 0.04, stop_token_ids: Sequence[int] | None = None, pad_id: int = 0, seed: int = 0):
        if group_size < 2:
            raise ConstraintError(f"group_size must be >= 2 (advantages compare samples of one prompt), got {group_size}")
        if not prompts:
            raise ConstraintError("no prompts given")
        if constrained is not None and len(constrained) != len(prompts):
            raise ConstraintError(f"constrained has {len(constrained)} flags for {len(prompts)} prompts")
        self.policy, self.reference = policy, reference
        self.prompts = [list(p) for p in prompts]
        self.score, self.decode = score, decode
        self.constrained = list(constrained) if constrained is not None else [True] * len(prompts)
        self.mult = multiplier or LagrangeMultiplier(threshold=0.0)
        self.G, self.max_new, self.temperature, self.top_k = group_size, max_new_tokens, temperature, top_k
        self.clip_eps, self.kl_beta = clip_eps, kl_beta
        self.stop_ids = list(stop_token_ids) if stop_token_ids is not None else None
        self.pad_id, self.seed = pad_id, seed
        self.sampler = _Sampler(len(self.prompts), prompts_per_step, seed)
        self._draws = 0
        self._costs: list[float] = []

    @torch.no_grad()
    def next_batch(self) -> dict:
        idx = self.sampler.next().tolist()
        batch_prompts = [self.prompts[i] for i in idx for _ in range(self.G)]  # [P*G]: each prompt G times
        self._draws += 1
        # The policy samples in whatever mode it trains in (Gemma has no dropout); fast=False keeps its
        # modules trainable.
        outs = generate(self.policy, batch_prompts, self.max_new, temperature=self.temperature,
                        top_k=self.top_k or None, seed=self.seed * 1_000_003 + self._draws,
                        stop_token_ids=self.stop_ids, pad_id=self.pad_id, fast=False)
        stops = set(self.stop_ids or [])
        rewards, costs = [], []
        for k, toks in enumerate(outs):
            text = self.decode([t for t in toks if t not in stops])
            r, c = self.score(idx[k // self.G], text)
            rewards.append(float(r))
            costs.append(float(c))
        R = torch.tensor(rewards).view(len(idx), self.G)  # [P,G]
        C = torch.tensor(costs).view(len(idx), self.G)
        lam = self.mult.value
        adv = grpo_advantages(R, C, lam).reshape(-1)  # [P*G]
        rows = Responses.from_lists([p + t for p, t in zip(batch_prompts, outs)],
                                    [[False] * len(p) + [True] * len(t) for p, t in zip(batch_prompts, outs)],
                                    self.pad_id)
        dev = self.policy.device
        ids, mask = rows.input_ids.to(dev), rows.response_mask.to(dev)
        old = token_logprobs(self.policy, ids, mask)
        ref = token_logprobs(self.reference, ids, mask)
        flags = torch.tensor([self.constrained[i] for i in idx]).repeat_interleave(self.G)
        if bool(flags.any()):
            self._costs.extend(C.reshape(-1)[flags].tolist())
        return {"ids": ids, "mask": mask, "old": old, "ref": ref, "adv": adv.to(dev), "lambda": lam,
                "reward": float(R.mean()), "cost": float(C.reshape(-1)[flags].mean()) if bool(flags.any()) else 0.0,
                "tokens": int(rows.lengths.sum()), "response_tokens": int(mask.sum())}

    def loss(self, model, batch: dict) -> tuple[torch.Tensor, dict]:
        mask = batch["mask"][:, 1:].float()  # [B,T-1]: response tokens as predictions
        new = token_logprobs(model, batch["ids"], batch["mask"])[:, 1:]
        old, ref = batch["old"][:, 1:], batch["ref"][:, 1:]
        a = batch["adv"][:, None]  # [B,1]: one advantage for every token of a sample
        ratio = torch.exp(new - old)
        surr = -torch.minimum(ratio * a, ratio.clamp(1 - self.clip_eps, 1 + self.clip_eps) * a)
        d = ref - new
        kl = torch.exp(d) - d - 1.0  # k3 estimator of KL(π‖π_ref) per token
        per_tok = (surr + self.kl_beta * kl) * mask
        ntok = mask.sum(1).clamp_min(1)
        # Token mean within each sample, then the mean over samples (GRPO's normalisation).
        loss = (per_tok.sum(1) / ntok).mean()
        logs = {"reward": batch["reward"], "cost": batch["cost"], "lambda": batch["lambda"],
                "kl": float(((kl * mask).sum(1) / ntok).mean().detach()),
                "clip_frac": float((((ratio - 1).abs() > self.clip_eps).float() * mask).sum() / mask.sum().clamp_min(1)),
                "response_len": batch["response_tokens"] / batch["ids"].shape[0], "tokens": batch["tokens"]}
        return loss, logs

    def after_step(self, model, step: int, rec: dict) -> dict:
        if self._costs:  # no constrained prompt drawn this step: nothing measured, λ stays
            self.mult.update(sum(self._costs) / len(self._costs))
        self._costs = []
        return {"log_lambda": self.mult.log_lambda}

    def state(self) -> dict:
        return {"sampler": self.sampler.state(), "draws": self._draws, "dual": self.mult.state()}

    def load_state(self, st: dict) -> None:
        self.sampler.load_state(st["sampler"])
        self._draws = int(st["draws"])
        self.mult.load_state(st["dual"])
