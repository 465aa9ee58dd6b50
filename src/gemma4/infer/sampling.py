"""Choosing the next token from logits: greedy, temperature, top-k, top-p, min-p, repetition penalty.

``sample_next(logits, params, generator, history)`` is a free function so that every decoding loop
(plain generation, speculative decoding) picks tokens the same way. Processing order: repetition
penalty, then temperature, then top-k, top-p and min-p filters, then a draw. ``temperature == 0``
is greedy (argmax over the penalised logits; the filters cannot change an argmax).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from gemma4._util import Gemma4Error


class SamplingError(Gemma4Error, ValueError):
    """An invalid sampling setting; the message names the field and the accepted range."""


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens. The defaults are greedy decoding.

    temperature: 0 = greedy; > 0 divides the logits before the softmax.
    top_k: keep the k most likely tokens (0 = off).
    top_p: keep the smallest set of tokens whose probability reaches p (1.0 = off).
    min_p: drop tokens whose probability is below ``min_p * p(most likely)`` (0.0 = off).
    repetition_penalty: > 1 discourages tokens already in the prompt or output (CTRL-style: a
        positive logit is divided by it, a negative one multiplied). 1.0 = off.
    seed: seeds the generator of a generation run, so sampled output is reproducible.
    """

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        def num(name: str, v) -> float:
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise SamplingError(f"{name} must be a finite number, got {v!r}")
            return float(v)

        t = num("temperature", self.temperature)
        # Tiny temperatures overflow logits / t (1e-45 gives inf, then NaN probabilities); below 1e-4
        # sampling is greedy in all but name, so 0 is the way to ask for it.
        if t < 0 or 0 < t < 1e-4:
            raise SamplingError(f"temperature must be 0 (greedy) or >= 1e-4, got {t}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise SamplingError(f"top_k must be an integer >= 0 (0 = off), got {self.top_k!r}")
        p = num("top_p", self.top_p)
        if not 0.0 < p <= 1.0:
            raise SamplingError(f"top_p must be in (0, 1] (1 = off), got {p}")
        mp = num("min_p", self.min_p)
        if not 0.0 <= mp <= 1.0:
            raise SamplingError(f"min_p must be in [0, 1] (0 = off), got {mp}")
        rp = num("repetition_penalty", self.repetition_penalty)
        if rp <= 0:
            raise SamplingError(f"repetition_penalty must be > 0 (1 = off), got {rp}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)
                                      or not 0 <= self.seed < 2**64):  # torch generators take 64-bit seeds
            raise SamplingError(f"seed must be a non-negative integer or None, got {self.seed!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def make_generator(self, device: torch.device | str = "cpu") -> torch.Generator | None:
        """A generator seeded with ``seed`` (None when greedy or unseeded: the global RNG is used)."""
        if self.greedy or self.seed is None:
            return None
        return torch.Generator(device=device).manual_seed(self.seed)


def seen_mask(history: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Token ids [B, n] (negative entries = no token, e.g. padding) -> presence mask [B, V] bool."""
    valid = history >= 0
    counts = torch.zeros(history.shape[0], vocab_size, dtype=torch.int32, device=history.device)
    # scatter_add, not scatter: duplicate indices (repeats, and the clamped -1 entries) must add up.
    counts.scatter_add_(1, history.clamp(min=0), valid.to(torch.int32))
    return counts > 0


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """logits [B, V] float; seen [B, V] bool. Returns new logits."""
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def filter_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Temperature-scaled logits [B, V] with filtered-out tokens set to -inf."""
    x = logits / params.temperature
    neg_inf = torch.tensor(float("-inf"), dtype=x.dtype, device=x.device)
    if params.top_k and params.top_k < x.shape[-1]:
        kth = torch.topk(x, params.top_k, dim=-1).values[:, -1:]  # [B,1]
        x = torch.where(x < kth, neg_inf, x)
    if params.top_p < 1.0:
        sorted_x, order = torch.sort(x, dim=-1, descending=True)
        probs = torch.softmax(sorted_x, dim=-1)
        # Drop a token when the tokens ranked above it already reach top_p (the top token always stays).
        drop_sorted = (probs.cumsum(-1) - probs) >= params.top_p
        drop = torch.zeros_like(drop_sorted).scatter_(1, order, drop_sorted)
        x = torch.where(drop, neg_inf, x)
    if params.min_p > 0.0:
        probs = torch.softmax(x, dim=-1)
        limit = probs.max(dim=-1, keepdim=True).values * params.min_p
        x = torch.where(probs < limit, neg_inf, x)
    return x


def probabilities(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """logits [..., V] -> float32 probabilities after temperature, top-k, top-p and min-p (a sampling
    ``params``; not greedy). What speculative sampling compares draft and target distributions with."""
    x = logits.float().reshape(-1, logits.shape[-1])  # [N, V]
    return torch.softmax(filter_logits(x, params), dim=-1).reshape(logits.shape)


_ARGMAX_BLOCK = 512


def argmax(x: torch.Tensor) -> torch.Tensor:
    """``x.argmax(-1)`` for [..., V] floats, the same index (the first maximum; NaN counts as the maximum).

    Why not argmax itself: on the CPU, argmax over a 262,144-wide row takes ~1.2 ms here (a scalar loop
    carrying an index) while amax takes ~35 us, about 2-3% of a decode step. So: the largest value of each
    block of 512, the first block holding the overall maximum (argmax over the block maxima), then the
    first maximum inside that block."""
    v = x.shape[-1]
    if x.device.type != "cpu" or v < 4 * _ARGMAX_BLOCK or v % _ARGMAX_BLOCK:
        return x.argmax(dim=-1)
    blocks = x.reshape(-1, v // _ARGMAX_BLOCK, _ARGMAX_BLOCK)  # [N, V/512, 512]
    # amax propagates NaN, so a block holding a NaN is "the maximum", as argmax counts it.
    best = blocks.amax(-1).argmax(-1)  # [N]
    rows = torch.arange(blocks.shape[0])
    inner = blocks[rows, best].argmax(-1)  # [N]
    return (best * _ARGMAX_BLOCK + inner).reshape(x.shape[:-1])


def sample_next(
    logits: torch.Tensor,
    params: SamplingParams,
    generator: torch.Generator | None = None,
    history: torch.Tensor | None = None,
) -> torch.Tensor:
    """Pick one token per row.

    logits: [B, V] (any float dtype; computed in float32).
    history: for the repetition penalty, either token ids [B, n] (negative = none) or a presence
        mask [B, V] bool (what a decoding loop keeps up to date cheaply). Ignored when the penalty is 1.
    generator: the random source when sampling (``params.make_generator()``); None uses the global RNG.
    Returns token ids [B] (int64).
    """
    if logits.dim() != 2:
        raise ValueError(f"logits must be [B, V], got {list(logits.shape)}")
    x = logits.float()
    if params.repetition_penalty != 1.0 and history is not None:
        seen = history if history.dtype == torch.bool else seen_mask(history, x.shape[-1])
        x = apply_repetition_penalty(x, seen, params.repetition_penalty)
    if params.greedy:
        return argmax(x)
    x = filter_logits(x, params)
    probs = torch.softmax(x, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
