"""Speculative decoding: a cheap drafter proposes k tokens, the target checks them in one forward.

Two kinds of drafter:

* the Gemma 4 MTP drafter (:class:`gemma4.model.drafter.Gemma4Drafter`): reads the target's K/V and last
  hidden state, so it has no cache and no prefill of its own;
* any smaller Gemma model with the same vocabulary (a plain draft model with its own cache).

One round: draft k tokens d1..dk after the pending token x; the target runs [x, d1..dk] in one
forward (``keep_last=k+1``) and so scores every candidate plus one extra position; the longest
prefix the target agrees with is kept, followed by the target's own token at the first
disagreement (or after dk when all agree). Rejected candidates are removed from the caches with
``rollback``: the target cache is built with ``slack=k`` so that its sliding-window rings keep k
spare slots and rolling back k tokens never loses a key still inside the window.

Greedy (temperature 0): a candidate is accepted iff it equals the target's argmax, so the output
is token-identical to plain greedy decoding. Sampling (temperature > 0): the standard speculative
sampling rule (accept d with probability min(1, p(d)/q(d)), else resample from max(0, p - q)),
whose output follows the target's distribution exactly. Batch size 1.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch

from gemma4.infer.sampling import SamplingError, SamplingParams, argmax, probabilities
from gemma4.model.config import FULL, SLIDING

__all__ = ["SpeculativeStats", "SpeculativeResult", "speculative_generate", "greedy_decode"]


@dataclass
class SpeculativeStats:
    drafted: int = 0  # candidate tokens proposed
    accepted: int = 0  # candidates the target agreed with
    rounds: int = 0  # verification forwards of the target (prefill not counted)
    new_tokens: int = 0
    accepted_per_round: list[int] = field(default_factory=list)

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def tokens_per_round(self) -> float:
        """New tokens per target forward after the prefill (1.0 = no gain over plain decoding)."""
        return (self.new_tokens - 1) / self.rounds if self.rounds else 0.0

    def as_dict(self) -> dict:
        return {"drafted": self.drafted, "accepted": self.accepted, "rounds": self.rounds,
                "new_tokens": self.new_tokens, "acceptance_rate": round(self.acceptance_rate, 4),
                "tokens_per_round": round(self.tokens_per_round, 4)}


@dataclass
class SpeculativeResult:
    tokens: list[int]
    stats: SpeculativeStats


# ----------------------------------------------------------------------------- helpers
def _prompt_tensor(model, prompt, max_new_tokens: int) -> torch.Tensor:
    ids = torch.as_tensor(prompt, dtype=torch.long, device=model.device)
    if ids.dim() == 2:
        if ids.shape[0] != 1:
            raise ValueError(f"speculative decoding runs one prompt at a time, got a batch of {ids.shape[0]}")
        ids = ids[0]
    if ids.dim() != 1:
        raise ValueError(f"prompt must be a list of token ids or a [T] / [1, T] tensor, got shape {list(ids.shape)}")
    if ids.numel() == 0:
        raise ValueError("empty prompt: at least one token id is needed")
    v = model.config.vocab_size
    if int(ids.min()) < 0 or int(ids.max()) >= v:
        raise ValueError(f"token id out of range: prompt ids span [{int(ids.min())}, {int(ids.max())}] but vocab_size is {v}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    limit = model.config.max_position_embeddings
    if ids.numel() + max_new_tokens > limit:
        raise ValueError(f"prompt ({ids.numel()} tokens) + max_new_tokens ({max_new_tokens}) exceeds the context of {limit}")
    return ids[None]


def _check_finite(logits: torch.Tensor, what: str) -> None:
    if not torch.isfinite(logits).all():
        raise FloatingPointError(f"{what} produced non-finite logits")


class _Picker:
    """Chooses draft tokens and verifies candidates, greedily or by speculative sampling, with the one
    sampler's distributions (:func:`gemma4.infer.sampling.probabilities`)."""

    def __init__(self, params: SamplingParams, device):
        if params.repetition_penalty != 1.0:
            raise SamplingError("repetition_penalty is not supported with speculative decoding (it would change "
                                "the target distribution per candidate); use 1.0")
        self.params, self.greedy = params, params.greedy
        self.gen = params.make_generator(device)

    def _sample(self, probs: torch.Tensor) -> int:
        return int(torch.multinomial(probs, 1, generator=self.gen))

    def first(self, logits: torch.Tensor) -> int:
        """The token after the prompt: the target's own choice (nothing to verify yet)."""
        if self.greedy:
            return int(argmax(logits))
        return self._sample(probabilities(logits, self.params))

    def draft(self, logits: torch.Tensor) -> tuple[int, torch.Tensor | None]:
        """logits [V] -> (token, its proposal distribution q or None when greedy)."""
        if self.greedy:
            return int(argmax(logits)), None
        q = probabilities(logits, self.params)
        return self._sample(q), q

    def verify(self, target_logits: torch.Tensor, drafts: list[int], qs: list) -> tuple[int, int]:
        """target_logits [k+1, V] (row i scores the token after candidate i) -> (accepted n, next token)."""
        if self.greedy:
            best = argmax(target_logits).tolist()
            n = 0
            while n < len(drafts) and drafts[n] == best[n]:
                n += 1
            return n, best[n]
        p = probabilities(target_logits, self.params)  # [k+1, V]
        for i, (d, q) in enumerate(zip(drafts, qs)):
            r = float(torch.rand((), generator=self.gen, device=p.device))
            if r * float(q[d]) < float(p[i, d]):  # r < p/q without dividing by a tiny q
                continue
            resid = (p[i] - q).clamp(min=0)
            if float(resid.sum()) <= 0:  # p == q up to rounding: any sample from p is exact
                resid = p[i]
            return i, self._sample(resid / resid.sum())
        return len(drafts), self._sample(p[-1])


def _key_slots(cache, t: int, device) -> dict[str, torch.Tensor]:
    """Slots of the keys the target's producer layers will return for ``t`` new tokens, by type
    (a decoding sliding cache returns its ring, not chronological order)."""
    out = {}
    for lt in (SLIDING, FULL):
        c = cache.first_of_type(lt)
        if c is not None:
            out[lt] = c.key_slots(t, device)
    return out


def _finish(out: list[int], max_new_tokens: int, stop: set[int]) -> tuple[list[int], bool]:
    for i, tok in enumerate(out):
        if tok in stop:
            return out[: i + 1], True
    return out[:max_new_tokens], len(out) >= max_new_tokens


# ----------------------------------------------------------------------------- plain greedy
@torch.no_grad()
def greedy_decode(model, prompt, max_new_tokens: int, stop_token_ids: Sequence[int] = ()) -> list[int]:
    """Plain cached greedy decoding, one token per forward: the reference speculative decoding must equal."""
    ids = _prompt_tensor(model, prompt, max_new_tokens)
    cache = model.new_cache()
    logits = model(ids, cache=cache, keep_last=1)[0, -1]
    out: list[int] = []
    stop = set(stop_token_ids)
    while True:
        _check_finite(logits, "target")
        tok = int(argmax(logits))
        out.append(tok)
        if tok in stop or len(out) >= max_new_tokens:
            return out
        logits = model(torch.tensor([[tok]], device=ids.device), cache=cache)[0, -1]


# ----------------------------------------------------------------------------- speculative decoding
def speculative_generate(
    target,
    prompt,
    max_new_tokens: int,
    *,
    drafter=None,
    draft_model=None,
    num_draft_tokens: int = 4,
    stop_token_ids: Sequence[int] = (),
    params: SamplingParams | None = None,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
) -> SpeculativeResult:
    """Generate up to ``max_new_tokens`` after ``prompt`` with ``target``, drafting with either an
    MTP ``drafter`` (:class:`gemma4.model.drafter.Gemma4Drafter`) or a smaller ``draft_model``.

    Sampling: ``params`` (a :class:`SamplingParams`) or the keywords; top_k/top_p None mean off.
    Returns the new token ids and :class:`SpeculativeStats` (acceptance rate, tokens per round)."""
    stats = SpeculativeStats()
    out = [t for chunk in speculative_rounds(target, prompt, max_new_tokens, stats, drafter=drafter,
                                             draft_model=draft_model, num_draft_tokens=num_draft_tokens,
                                             stop_token_ids=stop_token_ids,
                                             params=params or SamplingParams(temperature, top_k or 0,
                                                                             1.0 if top_p is None else top_p,
                                                                             seed=seed))
           for t in chunk]
    stats.new_tokens = len(out)
    return SpeculativeResult(out, stats)


def speculative_rounds(target, prompt, max_new_tokens: int, stats: SpeculativeStats, *, drafter=None,
                       draft_model=None, num_draft_tokens: int = 4, stop_token_ids: Sequence[int] = (),
                       params: SamplingParams = SamplingParams()) -> Iterator[list[int]]:
    """Speculative decoding as a stream: yields the tokens each round commits (a stop token ends it and
    is included). ``stats`` is filled in as it goes. What ``gemma4.stream(..., draft_model=)`` runs."""
    if (drafter is None) == (draft_model is None):
        raise ValueError("pass exactly one of drafter= (an MTP drafter) or draft_model= (a smaller Gemma model)")
    if not isinstance(num_draft_tokens, int) or num_draft_tokens < 1:
        raise ValueError(f"num_draft_tokens must be a positive integer, got {num_draft_tokens!r}")
    ids = _prompt_tensor(target, prompt, max_new_tokens)
    pick = _Picker(params, ids.device)
    stop = set(stop_token_ids)
    if drafter is not None:
        drafter.check_target(target.config)
        rounds = _run_mtp(target, drafter, ids, max_new_tokens, num_draft_tokens, stop, pick, stats)
    else:
        if draft_model.config.vocab_size != target.config.vocab_size:
            raise ValueError(f"draft model vocab_size={draft_model.config.vocab_size} != target vocab_size={target.config.vocab_size}")
        rounds = _run_draft_model(target, draft_model, ids, max_new_tokens, num_draft_tokens, stop, pick, stats)
    sent = 0
    for out, done in rounds:
        yield out[sent:]
        sent = len(out)
        if done:
            return


@torch.no_grad()  # on a generator: applied around each step, never leaked to the caller
def _run_mtp(target, drafter, ids, max_new, K, stop, pick, stats):
    dev = ids.device
    cache = target.new_cache(slack=K)
    slots = _key_slots(cache, ids.shape[1], dev)
    h, kv = target.model.forward_export_kv(ids, cache=cache, keep_last=1)
    logits = target.logits(h)[0, -1]
    _check_finite(logits, "target")
    x = pick.first(logits)
    out = [x]
    h_last = h[:, -1:]  # target's final-normed hidden state at slot p
    p = ids.shape[1] - 1  # newest slot the target has K/V for
    while True:
        out, done = _finish(out, max_new, stop)
        yield out, done
        if done:
            return
        k = min(K, max_new - len(out) - 1)
        drafts, qs = [], []
        tok, hd = x, h_last
        pos = torch.tensor([[p + 1]], device=dev)  # constant query position for the whole round
        for _ in range(k):
            emb = drafter.input_embeds(target, torch.tensor([[tok]], device=dev), hd)
            dl, hd = drafter(emb, kv, pos, key_slots=slots, last_slot=p)
            _check_finite(dl, "drafter")
            tok, q = pick.draft(dl[0, -1])
            drafts.append(tok)
            qs.append(q)
        cand = torch.tensor([[x] + drafts], device=dev)
        slots = _key_slots(cache, cand.shape[1], dev)
        h, kv = target.model.forward_export_kv(cand, cache=cache, keep_last=cand.shape[1])
        logits = target.logits(h)[0]  # [k+1, V]
        _check_finite(logits, "target")
        n, x = pick.verify(logits, drafts, qs)
        cache.rollback(k - n)
        stats.rounds += 1
        stats.drafted += k
        stats.accepted += n
        stats.accepted_per_round.append(n)
        out += drafts[:n] + [x]
        h_last = h[:, n : n + 1]
        p += 1 + n
        # The K/V just returned also hold the rejected candidates (slots > p); the drafter masks them.


@torch.no_grad()
def _run_draft_model(target, draft, ids, max_new, K, stop, pick, stats):
    dev = ids.device
    tcache, dcache = target.new_cache(slack=K), draft.new_cache(slack=K)
    logits = target(ids, cache=tcache, keep_last=1)[0, -1]
    _check_finite(logits, "target")
    x = pick.first(logits)
    draft(ids, cache=dcache, keep_last=1)  # the draft's own prefill (its logits are not needed)
    seq = ids[0].tolist() + [x]  # every token so far; the last one is not in either cache yet
    out = [x]
    while True:
        out, done = _finish(out, max_new, stop)
        yield out, done
        if done:
            return
        k = min(K, max_new - len(out) - 1)
        drafts, qs = [], []
        if k:
            # Bring the draft cache up to date (1 token, or 2 after a fully accepted round), then draft.
            feed = seq[dcache.length :]
            dl = draft(torch.tensor([feed], device=dev), cache=dcache, keep_last=1)[0, -1]
            for j in range(k):
                _check_finite(dl, "draft model")
                tok, q = pick.draft(dl)
                drafts.append(tok)
                qs.append(q)
                if j < k - 1:
                    dl = draft(torch.tensor([[tok]], device=dev), cache=dcache)[0, -1]
        cand = torch.tensor([[x] + drafts], device=dev)
        logits = target(cand, cache=tcache, keep_last=cand.shape[1])[0]
        _check_finite(logits, "target")
        n, x = pick.verify(logits, drafts, qs)
        tcache.rollback(k - n)
        seq += drafts[:n] + [x]
        # The draft cache may hold rejected candidates; keep only tokens the target committed.
        committed = len(seq) - 1
        if dcache.length > committed:
            dcache.rollback(dcache.length - committed)
        stats.rounds += 1
        stats.drafted += k
        stats.accepted += n
        stats.accepted_per_round.append(n)
        out += drafts[:n] + [x]
