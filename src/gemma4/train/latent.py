"""Latent adversarial training (LAT): train the aligned answer to hold while an adversary perturbs the
residual stream of the prompt.

A jailbreak the model never saw moves a prompt's hidden states somewhere training never put them. LAT
(Casper et al. 2024; targeted LAT, Sheshadri et al. 2024) makes the aligned answer robust to a whole ball
of such moves instead of to the few wrappers in the data: each step, projected gradient descent finds a
perturbation δ of one decoder layer's output at the prompt's positions (per token at most ``eps`` times
that token's own residual norm) that makes the *rejected* answer likely, and the model is then trained
on the *chosen* answer under δ, plus on the chosen answer of the clean prompt.

The pairs are the alignment pairs (`gemma4.train.preference.Pairs`): on a harmful prompt the adversary
pushes toward compliance and the model learns to refuse anyway; on a benign prompt the adversary pushes
toward the refusal and the model learns to help anyway. Perturbing both kinds means a perturbed state
says nothing about which answer is right, so the model cannot learn "perturbed, so refuse". ``attacked``
restricts the adversary to some rows (targeted LAT as published: harmful prompts only, the other rows
trained on their clean prompt alone).

`LATDPOObjective` puts the same adversary inside a preference stage (Sheshadri et al. 2024 pair targeted
LAT with DPO): each step is DPO + NLL anchor on the clean batch, plus the chosen answer's NLL under the
attack on the batch's attacked rows.

`LATObjective` follows `gemma4.train.loop.Trainer`'s objective protocol. The perturbation goes in through
a forward hook on the layer (`perturbed`), a public PyTorch interface: nothing in the model changes.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

from gemma4._util import Gemma4Error
from gemma4.train.preference import (Pairs, PreferenceError, Responses, _Sampler, check_preference_settings, dpo_step,
                                     response_nll, sequence_logprobs)

__all__ = ["LATError", "prompt_mask", "perturbed", "LATObjective", "LATDPOObjective"]


class LATError(Gemma4Error, ValueError):
    """Bad latent-adversarial settings; the message names the setting."""


def prompt_mask(rows: Responses) -> torch.Tensor:
    """[N, T] bool: the positions before each row's first response token (its prompt)."""
    return rows.response_mask.long().cumsum(1) == 0


@contextmanager
def perturbed(model, layer: int, delta: torch.Tensor, mask: torch.Tensor, captured: list | None = None):
    """Within the block, decoder layer ``layer`` of ``model`` outputs ``h + delta * mask`` (delta [B, T, H],
    mask [B, T]; both cropped to the batch's length). ``captured``: receives the layer's unperturbed
    output h (for the perturbation's radius)."""
    layers = model.model.layers
    if not 0 <= layer < len(layers):
        raise LATError(f"layer must be in [0, {len(layers) - 1}], got {layer}")

    def hook(_module, _args, out):
        h, kv = out
        t = h.shape[1]
        if captured is not None:
            captured.append(h.detach())
        return h + delta[:, :t] * mask[:, :t, None].to(h.dtype), kv

    handle = layers[layer].register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


class LATObjective:
    """Targeted LAT on preference pairs: per step, ``pgd_steps`` of projected gradient descent on δ
    (minimising the rejected answer's per-token NLL under δ), then the loss
    NLL(chosen | δ) + NLL(chosen | clean prompt)."""

    def __init__(self, pairs: Pairs, *, layer: int = 1, eps: float = 0.5, pgd_steps: int = 4,
                 pgd_step_size: float = 0.5, attacked: torch.Tensor | None = None, batch_size: int = 16,
                 seed: int = 0):
        if eps <= 0:
            raise LATError(f"eps must be > 0, got {eps}")
        if pgd_steps < 1:
            raise LATError(f"pgd_steps must be >= 1, got {pgd_steps}")
        if not 0 < pgd_step_size <= 1:
            raise LATError(f"pgd_step_size must be in (0, 1] (a fraction of the radius), got {pgd_step_size}")
        attacked = torch.ones(len(pairs), dtype=torch.bool) if attacked is None else attacked.bool()
        if attacked.shape != (len(pairs),) or not bool(attacked.any()):
            raise LATError(f"attacked must be [{len(pairs)}] bool with at least one row set")
        self.pairs, self.attacked, self.sampler = pairs, attacked, _Sampler(len(pairs), batch_size, seed)
        self.layer, self.eps, self.pgd_steps, self.step_size = layer, eps, pgd_steps, pgd_step_size

    def next_batch(self) -> tuple[Pairs, Pairs | None]:
        """(the batch's pairs, those of its rows the adversary attacks; None when none is)."""
        idx = self.sampler.next()
        hit = idx[self.attacked[idx]]
        return self.pairs.rows(idx), (self.pairs.rows(hit) if len(hit) else None)

    def _nll(self, model, rows: Responses, delta=None, mask=None, captured=None) -> torch.Tensor:
        dev = model.device
        ids, rmask = rows.input_ids.to(dev), rows.response_mask.to(dev)
        if delta is None:
            return response_nll(*sequence_logprobs(model, ids, rmask))
        with perturbed(model, self.layer, delta, mask, captured):
            return response_nll(*sequence_logprobs(model, ids, rmask))

    def attack(self, model, batch: Pairs) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """(δ [B, T, H], prompt mask [B, T], logs): the perturbation that makes ``batch.rejected`` likely."""
        chosen, rejected = batch.chosen, batch.rejected
        t = max(chosen.input_ids.shape[1], rejected.input_ids.shape[1])
        # Chosen and rejected rows share their prompt, so one δ serves both; pad the masks to one length.
        mask = torch.nn.functional.pad(prompt_mask(rejected), (0, t - rejected.input_ids.shape[1])).to(model.device)
        hidden = model.config.hidden_size
        delta = torch.zeros(len(batch), t, hidden, device=model.device)
        seen: list[torch.Tensor] = []
        radius = before = None
        for k in range(self.pgd_steps):
            delta.requires_grad_(True)
            nll = self._nll(model, rejected, delta, mask, seen if k == 0 else None)
            if k == 0:
                # Each token's radius is eps times its own clean residual norm [B, T, 1], so the perturbation
                # has the same relative size at every position (norms differ: 46 at the first token, 30-40
                # elsewhere at layer 1 of the alignment experiment's SFT model) and whatever the layer's scale.
                h = seen[0]
                radius = self.eps * torch.nn.functional.pad(h.norm(dim=-1, keepdim=True), (0, 0, 0, t - h.shape[1]))
                before = float(nll.detach())
            (g,) = torch.autograd.grad(nll, delta)
            with torch.no_grad():
                # Normalised per token, a step of step_size·radius downhill, then back onto the ball.
                delta = delta - self.step_size * radius * g / g.norm(dim=-1, keepdim=True).clamp_min(1e-12)
                delta = delta * (radius / delta.norm(dim=-1, keepdim=True).clamp_min(1e-12)).clamp(max=1.0)
        with torch.no_grad():
            after = float(self._nll(model, rejected, delta, mask))
        return delta.detach(), mask, {"adv_rejected_nll_clean": before, "adv_rejected_nll": after}

    def clean_loss(self, model, rows: Pairs) -> tuple[torch.Tensor, dict]:
        """The loss on the whole batch's clean prompts: the chosen answer's NLL."""
        clean = self._nll(model, rows.chosen)
        return clean, {"chosen_nll": float(clean.detach()), "tokens": int(rows.chosen.lengths.sum())}

    def loss(self, model, batch: tuple[Pairs, Pairs | None]) -> tuple[torch.Tensor, dict]:
        rows, hit = batch
        loss, logs = self.clean_loss(model, rows)
        if hit is not None:
            delta, mask, logs_adv = self.attack(model, hit)
            adv = self._nll(model, hit.chosen, delta, mask)
            loss = loss + adv
            logs |= logs_adv | {"chosen_nll_adv": float(adv.detach())}
        return loss, logs | {"loss": float(loss.detach())}

    def state(self) -> dict:
        return {"sampler": self.sampler.state()}

    def load_state(self, st: dict) -> None:
        self.sampler.load_state(st["sampler"])


class LATDPOObjective(LATObjective):
    """DPO (any `LOSS_TYPES`) + alpha · NLL(chosen) on the clean batch, plus NLL(chosen | δ) on the batch's
    attacked rows, δ found as in `LATObjective.attack`.

    Why: a DPO stage moves every prompt the way its pairs pull, and the benign pairs pull toward answering;
    harmful prompts unlike any in the pairs (held-out jailbreak wrappers) drift with them (the alignment
    benchmark, runs 56-57: DPO reopens wrapper families that the LAT model had closed). The adversarial
    term keeps the refusal holding over a ball around each harmful prompt while DPO trains. The reference
    log-probs stay those of the clean prompts: δ only enters the added term. Measured there (runs 58-59):
    at LAT's own radius the attack no longer moves the refusal and the term is ~0; at a wider one the
    refusal it trains spreads to benign prompts, so DPO stops lowering over-refusal."""

    def __init__(self, pairs: Pairs, *, beta: float = 0.1, alpha: float = 1.0, loss_type: str = "sigmoid",
                 label_smoothing: float = 0.0, layer: int = 1, eps: float = 0.1, pgd_steps: int = 4,
                 pgd_step_size: float = 0.5, attacked: torch.Tensor | None = None, batch_size: int = 16,
                 seed: int = 0):
        check_preference_settings(loss_type, beta, label_smoothing)
        if loss_type != "simpo" and (pairs.ref_chosen is None or pairs.ref_rejected is None):
            raise PreferenceError("LATDPOObjective needs reference log-probs: call "
                                  "precompute_reference(reference, pairs)")
        super().__init__(pairs, layer=layer, eps=eps, pgd_steps=pgd_steps, pgd_step_size=pgd_step_size,
                         attacked=attacked, batch_size=batch_size, seed=seed)
        self.kw = dict(beta=beta, alpha=alpha, loss_type=loss_type, label_smoothing=label_smoothing)

    def clean_loss(self, model, rows: Pairs) -> tuple[torch.Tensor, dict]:
        """DPO + alpha · NLL(chosen) on the whole batch (`dpo_step`); `LATObjective.loss` adds the attacked term."""
        return dpo_step(model, rows, **self.kw)
