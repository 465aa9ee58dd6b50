"""Preference objectives: response log-probabilities, the DPO family of losses with an NLL anchor, and
the training-loop objectives built on them (SFT on responses, DPO).

Rows are ``prompt + response`` token ids, right-padded, with a boolean ``response_mask`` marking the
response tokens (the only ones scored). ``log pi(y|x)`` is the *sum* of the response tokens'
log-probabilities; per-token quantities (the NLL anchor, the constrained stage's cost) divide by the
response's token count.

Log-probabilities are computed from the decoder's hidden states one chunk of scored tokens at a time
through the model's own head (soft-cap included), under activation checkpointing: autograd never holds
more than one chunk of [tokens x vocab] logits, as in `gemma4.train.loss`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from gemma4._util import Gemma4Error
from gemma4.train.loss import _head_logits, chunk_tokens

__all__ = [
    "PreferenceError", "Responses", "Pairs", "LOSS_TYPES", "token_logprobs", "sequence_logprobs",
    "preference_loss", "reference_logprobs", "precompute_reference", "response_nll", "dpo_step",
    "SFTObjective", "DPOObjective",
]

LOSS_TYPES = ("sigmoid", "ipo", "hinge", "robust", "simpo")


class PreferenceError(Gemma4Error, ValueError):
    """Bad preference data or settings; the message names the field."""


# ----------------------------------------------------------------------------- data
@dataclass
class Responses:
    """Rows of prompt + response ids [N, T], right-padded with ``pad_id``.

    response_mask [N, T] (bool): token t belongs to the response (scored as a prediction from t-1).
    lengths [N]: real tokens per row (the rest is padding)."""

    input_ids: torch.Tensor
    response_mask: torch.Tensor
    lengths: torch.Tensor
    pad_id: int = 0

    def __post_init__(self) -> None:
        if self.input_ids.dim() != 2 or self.input_ids.shape != self.response_mask.shape:
            raise PreferenceError(f"input_ids {list(self.input_ids.shape)} and response_mask "
                                  f"{list(self.response_mask.shape)} must both be [N, T]")
        if self.lengths.shape != (self.input_ids.shape[0],):
            raise PreferenceError(f"lengths must be [N] = [{self.input_ids.shape[0]}], got {list(self.lengths.shape)}")
        if len(self) and bool((self.response_mask[:, 0]).any()):
            raise PreferenceError("response_mask marks a row's first token: it has no position predicting it")
        if len(self) and bool((self.response_mask.sum(1) == 0).any()):
            raise PreferenceError("a row has no response token (response_mask all False)")

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def rows(self, index) -> "Responses":
        """The selected rows, cropped to the longest real row among them (less padding to compute)."""
        lengths = self.lengths[index]
        t = int(lengths.max()) if lengths.numel() else 1
        return Responses(self.input_ids[index, :t], self.response_mask[index, :t], lengths, self.pad_id)

    @staticmethod
    def from_lists(rows: list[list[int]], masks: list[list[bool]], pad_id: int = 0) -> "Responses":
        if len(rows) != len(masks) or any(len(r) != len(m) for r, m in zip(rows, masks)):
            raise PreferenceError("every row needs a response mask of its own length")
        if not rows:
            raise PreferenceError("no rows given")
        t = max(len(r) for r in rows)
        ids = torch.full((len(rows), t), int(pad_id), dtype=torch.long)
        mask = torch.zeros(len(rows), t, dtype=torch.bool)
        for i, (r, m) in enumerate(zip(rows, masks)):
            ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
            mask[i, : len(m)] = torch.tensor(m, dtype=torch.bool)
        return Responses(ids, mask, torch.tensor([len(r) for r in rows], dtype=torch.long), int(pad_id))

    @staticmethod
    def cat(parts: list["Responses"]) -> "Responses":
        """Rows of several Responses in one batch (padded to the longest), e.g. chosen then rejected."""
        t = max(p.input_ids.shape[1] for p in parts)
        pad = parts[0].pad_id
        ids = torch.cat([F.pad(p.input_ids, (0, t - p.input_ids.shape[1]), value=pad) for p in parts])
        mask = torch.cat([F.pad(p.response_mask, (0, t - p.response_mask.shape[1]), value=False) for p in parts])
        return Responses(ids, mask, torch.cat([p.lengths for p in parts]), pad)


@dataclass
class Pairs:
    """Preference pairs: ``chosen`` ≻ ``rejected`` row by row (same prompts), with the frozen
    reference's summed log-probs once computed (`precompute_reference`)."""

    chosen: Responses
    rejected: Responses
    ref_chosen: torch.Tensor | None = None
    ref_rejected: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if len(self.chosen) != len(self.rejected):
            raise PreferenceError(f"{len(self.chosen)} chosen rows but {len(self.rejected)} rejected rows")

    def __len__(self) -> int:
        return len(self.chosen)

    def rows(self, index) -> "Pairs":
        return Pairs(self.chosen.rows(index), self.rejected.rows(index),
                     None if self.ref_chosen is None else self.ref_chosen[index],
                     None if self.ref_rejected is None else self.ref_rejected[index])


# ----------------------------------------------------------------------------- log-probs
def _chunk_logprobs(model, h: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    # The model's own head (soft-cap and quantized tables included), widened to float32 before the
    # softmax so that log-probs near 0 keep their precision under bf16 autocast.
    z = _head_logits(model, h).float()
    return z.gather(1, t[:, None])[:, 0] - torch.logsumexp(z, dim=-1)


def token_logprobs(model, input_ids: torch.Tensor, response_mask: torch.Tensor,
                   attention_mask: torch.Tensor | None = None, *, chunk: int | None = None) -> torch.Tensor:
    """log p(token t | tokens < t) for every response token, as a float32 [B, T] tensor that is 0
    elsewhere (column 0 is always 0: nothing predicts the first token).

    Rows are right-padded: a causal model's real tokens never attend to later padding, so no mask is
    needed; ``attention_mask`` [B, T] (1 = token) is passed to the model when given (left padding)."""
    if input_ids.dim() != 2 or input_ids.shape != response_mask.shape:
        raise PreferenceError(f"input_ids {list(input_ids.shape)} and response_mask {list(response_mask.shape)} "
                              "must both be [B, T]")
    vocab = model.config.vocab_size
    if input_ids.numel() and (int(input_ids.min()) < 0 or int(input_ids.max()) >= vocab):
        raise PreferenceError(f"token ids span [{int(input_ids.min())}, {int(input_ids.max())}] outside the "
                              f"vocabulary (size {vocab})")
    h = model.model(input_ids, attention_mask)  # [B,T,H], final-normed
    keep = response_mask[:, 1:].bool()  # [B,T-1]: position t predicts token t+1
    hs = h[:, :-1][keep]  # [N,H]: only scored positions reach the head
    tg = input_ids[:, 1:][keep]  # [N]
    chunk = chunk or chunk_tokens(vocab)
    parts = [checkpoint(_chunk_logprobs, model, hs[s : s + chunk], tg[s : s + chunk], use_reentrant=False)
             for s in range(0, hs.shape[0], chunk)]
    flat = torch.cat(parts) if parts else hs.new_zeros(0, dtype=torch.float32)
    out = torch.zeros(input_ids.shape, dtype=torch.float32, device=h.device)
    # Scatter the scored tokens back to their [B, T] places (a differentiable masked copy).
    return out.masked_scatter(F.pad(keep, (1, 0), value=False), flat)


def sequence_logprobs(model, input_ids: torch.Tensor, response_mask: torch.Tensor,
                      attention_mask: torch.Tensor | None = None, *,
                      chunk: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed log-prob of each row's response tokens [B] float32, response token counts [B])."""
    lp = token_logprobs(model, input_ids, response_mask, attention_mask, chunk=chunk)
    return lp.sum(1), response_mask[:, 1:].sum(1)


def _rows_logprobs(model, r: Responses) -> tuple[torch.Tensor, torch.Tensor]:
    dev = model.device
    return sequence_logprobs(model, r.input_ids.to(dev), r.response_mask.to(dev))


# ----------------------------------------------------------------------------- losses
def check_preference_settings(loss_type: str, beta: float, label_smoothing: float = 0.0) -> None:
    """Raise PreferenceError on a loss type, beta or label smoothing that `preference_loss` cannot honour
    (callers check before any work: a command line validates before loading models)."""
    if loss_type not in LOSS_TYPES:
        raise PreferenceError(f"unknown loss_type {loss_type!r}: use one of {', '.join(LOSS_TYPES)}")
    if beta <= 0:
        raise PreferenceError(f"beta must be > 0, got {beta}")
    if not 0.0 <= label_smoothing < 0.5:
        raise PreferenceError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    if label_smoothing and loss_type not in ("sigmoid", "robust"):
        # Refused rather than ignored: a setting that silently does nothing misleads an ablation.
        raise PreferenceError(f"label_smoothing applies to the sigmoid and robust losses only, not {loss_type!r}")


def preference_loss(pc: torch.Tensor, pr: torch.Tensor, rc: torch.Tensor | None, rr: torch.Tensor | None, *,
                    beta: float = 0.1, loss_type: str = "sigmoid", label_smoothing: float = 0.0,
                    chosen_tokens: torch.Tensor | None = None, rejected_tokens: torch.Tensor | None = None,
                    simpo_gamma: float = 0.5) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair losses [B] and the implicit rewards (chosen [B], rejected [B]).

    pc/pr: policy log-probs of chosen/rejected (sums over response tokens); rc/rr: the reference's.
    With z = (pc - rc) - (pr - rr):

    * sigmoid (DPO): -(1-e)·log σ(βz) - e·log σ(-βz)   (e = label_smoothing: conservative DPO)
    * ipo: (z - 1/(2β))²
    * hinge: max(0, 1 - βz)
    * robust: (-(1-e)·log σ(βz) + e·log σ(-βz)) / (1-2e)   (unbiased under label-flip rate e)
    * simpo: reference-free, length-normalised: -log σ(β·(pc/|y_c| - pr/|y_r|) - γ)  (rc, rr unused;
      needs the token counts)

    Rewards are β·(pc - rc) and β·(pr - rr) (simpo: β·pc/|y_c| and β·pr/|y_r|)."""
    check_preference_settings(loss_type, beta, label_smoothing)
    if loss_type == "simpo":
        if chosen_tokens is None or rejected_tokens is None:
            raise PreferenceError("loss_type 'simpo' needs chosen_tokens and rejected_tokens (response lengths)")
        cr = beta * pc / chosen_tokens.clamp_min(1)
        rj = beta * pr / rejected_tokens.clamp_min(1)
        return -F.logsigmoid(cr - rj - simpo_gamma), cr.detach(), rj.detach()
    if rc is None or rr is None:
        raise PreferenceError(f"loss_type {loss_type!r} needs the reference log-probs (precompute_reference)")
    z = (pc - rc) - (pr - rr)
    e = label_smoothing
    if loss_type == "sigmoid":
        loss = -(1 - e) * F.logsigmoid(beta * z) - e * F.logsigmoid(-beta * z)
    elif loss_type == "ipo":
        loss = (z - 1.0 / (2.0 * beta)) ** 2
    elif loss_type == "hinge":
        loss = torch.relu(1.0 - beta * z)
    else:  # robust
        loss = (-(1 - e) * F.logsigmoid(beta * z) + e * F.logsigmoid(-beta * z)) / (1 - 2 * e)
    return loss, (beta * (pc - rc)).detach(), (beta * (pr - rr)).detach()


def response_nll(logp: torch.Tensor, ntok: torch.Tensor) -> torch.Tensor:
    """Mean per-token NLL over all response tokens of a batch (sum of -log p / total tokens)."""
    return -logp.sum() / ntok.sum().clamp_min(1)


@torch.no_grad()
def reference_logprobs(reference, rows: Responses, batch_size: int = 32) -> torch.Tensor:
    """Summed response log-probs of every row under the frozen ``reference`` [N] (float32, CPU)."""
    out = []
    for s in range(0, len(rows), batch_size):
        lp, _ = _rows_logprobs(reference, rows.rows(slice(s, s + batch_size)))
        out.append(lp.cpu())
    return torch.cat(out)


def precompute_reference(reference, pairs: Pairs, batch_size: int = 32) -> Pairs:
    """``pairs`` with the reference's log-probs filled in: computed once, so that each training step
    needs only the policy's forward passes."""
    was = reference.training
    reference.eval()
    try:
        rc = reference_logprobs(reference, pairs.chosen, batch_size)
        rr = reference_logprobs(reference, pairs.rejected, batch_size)
    finally:
        reference.train(was)
    return Pairs(pairs.chosen, pairs.rejected, rc, rr)


def dpo_step(model, batch: Pairs, *, beta: float = 0.1, alpha: float = 0.0, loss_type: str = "sigmoid",
             label_smoothing: float = 0.0, simpo_gamma: float = 0.5) -> tuple[torch.Tensor, dict]:
    """DPO loss (mean over pairs) + alpha · per-token NLL of the chosen responses, and its metrics.

    Chosen and rejected rows go through the policy as one batch (one forward, one backward)."""
    n = len(batch)
    both = Responses.cat([batch.chosen, batch.rejected])
    lp, ntok = _rows_logprobs(model, both)
    pc, pr, nc, nr = lp[:n], lp[n:], ntok[:n], ntok[n:]
    dev = lp.device
    rc = None if batch.ref_chosen is None else batch.ref_chosen.to(dev)
    rr = None if batch.ref_rejected is None else batch.ref_rejected.to(dev)
    losses, cr, rj = preference_loss(pc, pr, rc, rr, beta=beta, loss_type=loss_type, label_smoothing=label_smoothing,
                                     chosen_tokens=nc, rejected_tokens=nr, simpo_gamma=simpo_gamma)
    pref = losses.mean()
    nll = response_nll(pc, nc)
    loss = pref + alpha * nll if alpha else pref
    logs = {
        "loss_pref": float(pref.detach()), "nll_chosen": float(nll.detach()),
        "reward_acc": float((cr > rj).float().mean()), "reward_margin": float((cr - rj).mean()),
        "reward_chosen": float(cr.mean()), "reward_rejected": float(rj.mean()),
        "logp_chosen": float(pc.detach().mean()), "logp_rejected": float(pr.detach().mean()),
        "tokens": int(both.lengths.sum()),
    }
    return loss, logs


# ----------------------------------------------------------------------------- objectives
class _Sampler:
    """Seeded batches of row indices: a fresh permutation each epoch, whole batches only (wrapping)."""

    def __init__(self, n: int, batch_size: int, seed: int = 0):
        if n < 1:
            raise PreferenceError("no rows to sample from")
        self.n, self.batch_size, self.seed = n, min(batch_size, n), seed
        self.epoch, self.cursor = 0, 0
        self._order = self._perm()

    def _perm(self) -> torch.Tensor:
        return torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 100_003 + self.epoch))

    def next(self) -> torch.Tensor:
        if self.cursor + self.batch_size > self.n:
            self.epoch, self.cursor = self.epoch + 1, 0
            self._order = self._perm()
        idx = self._order[self.cursor : self.cursor + self.batch_size]
        self.cursor += self.batch_size
        return idx

    def state(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor, "n": self.n, "seed": self.seed}

    def load_state(self, st: dict) -> None:
        if st.get("n") != self.n or st.get("seed") != self.seed:
            raise PreferenceError(f"sampler state is for {st.get('n')} rows / seed {st.get('seed')}, "
                                  f"not {self.n} / {self.seed}")
        self.epoch, self.cursor = int(st["epoch"]), int(st["cursor"])
        self._order = self._perm()


class SFTObjective:
    """Per-token NLL of the response tokens (supervised fine-tuning on prompt -> answer rows).

    The objective protocol of `gemma4.train.loop.Trainer`: ``next_batch()``, ``loss(model, batch) ->
    (loss, logs)``, optional ``after_step(model, step, logs) -> dict`` and ``state()/load_state()``."""

    def __init__(self, rows: Responses, batch_size: int = 16, seed: int = 0):
        self.data, self.sampler = rows, _Sampler(len(rows), batch_size, seed)

    def next_batch(self) -> Responses:
        return self.data.rows(self.sampler.next())

    def loss(self, model, batch: Responses) -> tuple[torch.Tensor, dict]:
        lp, ntok = _rows_logprobs(model, batch)
        nll = response_nll(lp, ntok)
        return nll, {"nll": float(nll.detach()), "tokens": int(batch.lengths.sum())}

    def state(self) -> dict:
        return {"sampler": self.sampler.state()}

    def load_state(self, st: dict) -> None:
        self.sampler.load_state(st["sampler"])


class DPOObjective:
    """DPO (any `LOSS_TYPES`) + alpha · NLL(chosen) on pairs whose reference log-probs are precomputed."""

    def __init__(self, pairs: Pairs, *, beta: float = 0.1, alpha: float = 1.0, loss_type: str = "sigmoid",
                 label_smoothing: float = 0.0, simpo_gamma: float = 0.5, batch_size: int = 16, seed: int = 0):
        check_preference_settings(loss_type, beta, label_smoothing)
        if loss_type != "simpo" and (pairs.ref_chosen is None or pairs.ref_rejected is None):
            raise PreferenceError("DPOObjective needs reference log-probs: call precompute_reference(reference, pairs)")
        self.pairs, self.sampler = pairs, _Sampler(len(pairs), batch_size, seed)
        self.kw = dict(beta=beta, alpha=alpha, loss_type=loss_type, label_smoothing=label_smoothing,
                       simpo_gamma=simpo_gamma)

    def next_batch(self) -> Pairs:
        return self.pairs.rows(self.sampler.next())

    def loss(self, model, batch: Pairs) -> tuple[torch.Tensor, dict]:
        return dpo_step(model, batch, **self.kw)

    def state(self) -> dict:
        return {"sampler": self.sampler.state()}

    def load_state(self, st: dict) -> None:
        self.sampler.load_state(st["sampler"])

