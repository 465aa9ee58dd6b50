"""Text generation: prefill, decode, batched generation and its streaming form.

* :func:`prefill` runs a prompt through the model in chunks, filling a :class:`~gemma4.model.cache.ModelCache`,
  and returns only the last position's logits (never [T, vocab] unless you call the model yourself).
* :func:`decode_step` feeds one token per row and returns the next logits.
* :func:`stream` yields the new token of every row at each step; :func:`generate` collects them.

Batches of prompts of different lengths are left-padded. The attention mask is [B, past + T], indexed
by slot, and grows by one column per step; position ids count each row's real tokens, so a padded
row computes exactly what it would alone. Rows that finish early keep being fed (their output is
ignored) until every row is done: the cache stays rectangular.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Sequence

import torch

from gemma4._util import Gemma4Error, Progress, no_progress
from gemma4.infer.fast_path import use_fast_path
from gemma4.infer.sampling import SamplingParams, sample_next
from gemma4.infer.speculative import SpeculativeStats, speculative_rounds
from gemma4.model.cache import FullCache, ModelCache, SlidingCache

log = logging.getLogger("gemma4")

__all__ = [
    "GenerationError", "NonFiniteLogitsError", "prepare_prompts", "prefill", "decode_step",
    "find_nonfinite_module", "Generation", "stream", "generate",
]


class GenerationError(Gemma4Error, ValueError):
    """Bad generation input (empty prompt, out-of-vocabulary id, prompt longer than the context...)."""


class NonFiniteLogitsError(Gemma4Error, RuntimeError):
    """The model produced NaN/inf logits; the message names the first module whose output went bad."""


# ----------------------------------------------------------------------------- input
def prepare_prompts(prompts, config, pad_id: int | None = None) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """Prompts (list of id lists, one id list, or a LongTensor [B, T] / [T]) -> left-padded ids [B, T],
    attention mask [B, T] (1 = token) and each prompt's length. Checks emptiness, vocabulary range
    and the context length, naming the offending prompt."""
    if isinstance(prompts, torch.Tensor):
        if prompts.dim() == 1:
            prompts = prompts[None]
        if prompts.dim() != 2 or prompts.is_floating_point() or prompts.is_complex():
            raise GenerationError(f"prompt tensor must be integer ids [B, T], got {prompts.dtype} {list(prompts.shape)}")
        rows = [r.tolist() for r in prompts.cpu()]
    else:
        rows = list(prompts)
        if rows and all(isinstance(x, int) and not isinstance(x, bool) for x in rows):
            rows = [rows]  # a single prompt given as one id list
        rows = [list(r.tolist() if isinstance(r, torch.Tensor) else r) for r in rows]
    if not rows:
        raise GenerationError("no prompts given")
    vocab, ctx = config.vocab_size, config.max_position_embeddings
    for i, r in enumerate(rows):
        if len(r) == 0:
            raise GenerationError(f"prompt {i} is empty: generation needs at least one token (e.g. BOS id {config.bos_token_id})")
        bad = [t for t in r if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < vocab]
        if bad:
            raise GenerationError(f"prompt {i} has out-of-vocabulary token id(s) {bad[:5]}: ids must be integers in [0, {vocab})")
        if len(r) > ctx:
            raise GenerationError(
                f"prompt {i} has {len(r)} tokens but the model's context (max_position_embeddings) is {ctx}"
            )
    lengths = [len(r) for r in rows]
    t = max(lengths)
    pad = config.pad_token_id if pad_id is None else pad_id
    pad = 0 if pad is None else int(pad)
    if not 0 <= pad < vocab:
        raise GenerationError(f"pad_id {pad} is outside the vocabulary [0, {vocab})")
    ids = torch.full((len(rows), t), pad, dtype=torch.long)
    mask = torch.zeros(len(rows), t, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, t - len(r):] = torch.tensor(r, dtype=torch.long)
        mask[i, t - len(r):] = 1
    return ids, mask, lengths


# ----------------------------------------------------------------------------- prefill / decode
def _head_logits(model, h: torch.Tensor) -> torch.Tensor:
    return model.logits(h)


def prefill(
    model,
    input_ids: torch.Tensor,
    cache: ModelCache,
    attention_mask: torch.Tensor | None = None,
    chunk: int | None = 512,
    progress: Progress | None = None,
) -> torch.Tensor:
    """Run the prompt [B, T] through the model into ``cache`` and return the last position's logits [B, V].

    Chunks of ``chunk`` tokens bound the attention working set on long prompts. Every chunk asks the
    model for its last position only (``keep_last=1``); the head runs on the final chunk only.
    ``attention_mask`` [B, T] (left padding) may be None when every row is full; positions come from it.
    ``progress`` (a :data:`gemma4._util.Progress`) is advanced once per chunk: a long prompt is seconds of
    silence otherwise."""
    b, t = input_ids.shape
    if attention_mask is not None and bool(attention_mask.all()):
        attention_mask = None
    step = t if not chunk or chunk >= t else int(chunk)
    past = cache.length
    if attention_mask is not None and attention_mask.shape[1] != past + t:
        raise ValueError(f"attention_mask must cover past + T = {past + t} slots, got {attention_mask.shape[1]}")
    h = None
    for s in (progress or no_progress)(range(0, t, step), f"prefill {t} tokens"):
        e = min(t, s + step)
        m = attention_mask[:, : past + e] if attention_mask is not None else None
        h = model.model(input_ids[:, s:e], m, None, cache, keep_last=1)
    return _head_logits(model, h)[:, -1]


def decode_step(
    model,
    tokens: torch.Tensor,
    cache: ModelCache,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Feed one token per row (``tokens`` [B]) and return the next logits [B, V].

    ``attention_mask`` [B, past + 1] is needed only when the batch has padding; ``position_ids`` [B, 1]
    then saves recounting the mask each step."""
    h = model.model(tokens[:, None], attention_mask, position_ids, cache, keep_last=1)
    return _head_logits(model, h)[:, -1]


# ----------------------------------------------------------------------------- non-finite diagnosis
@torch.no_grad()
def find_nonfinite_module(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> str | None:
    """Re-run ``input_ids`` without a cache, hooking every module, and return the name of the first
    module (in execution order) whose output holds NaN/inf; None if the output is finite."""
    found: list[str] = []
    handles = []

    def hook(name):
        def fn(_mod, _inp, out):
            if found:
                return
            o = out[0] if isinstance(out, tuple) else out
            if isinstance(o, torch.Tensor) and o.is_floating_point() and not bool(torch.isfinite(o).all()):
                found.append(name)
        return fn

    for name, mod in model.named_modules():
        if name:
            handles.append(mod.register_forward_hook(hook(name)))
    try:
        out = model(input_ids, attention_mask=attention_mask)
        if not found and not bool(torch.isfinite(out).all()):
            found.append("output head (logits)")
    finally:
        for hd in handles:
            hd.remove()
    return found[0] if found else None


def _nonfinite_message(model, ids: torch.Tensor, mask: torch.Tensor | None, step: int) -> str:
    where = find_nonfinite_module(model, ids, mask)
    if where is None:
        where = "none on a cache-free re-run (the cached run diverged: a cache or numeric-range problem)"
    else:
        m = re.match(r"model\.layers\.(\d+)\.?(.*)", where)
        if m:
            where = f"{where} (layer {m.group(1)}{', ' + m.group(2) if m.group(2) else ''})"
    return f"non-finite logits at generation step {step}; first module with a NaN/inf output: {where}"


# ----------------------------------------------------------------------------- generation
@dataclass
class _Stops:
    token_ids: frozenset
    strings: tuple[str, ...]
    decode: Callable[[list[int]], str] | None


def _stop_setup(model, stop_token_ids, stop_strings, tokenizer) -> _Stops:
    if stop_token_ids is None:
        eos = model.config.eos_token_id
        ids = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
        if tokenizer is not None and getattr(tokenizer, "stop_token_ids", None):
            ids += list(tokenizer.stop_token_ids)
    else:
        ids = [stop_token_ids] if isinstance(stop_token_ids, int) else list(stop_token_ids)
    for t in ids:
        if not isinstance(t, int) or isinstance(t, bool) or t < 0:
            raise GenerationError(f"stop token ids must be non-negative integers, got {t!r}")
    strings = () if stop_strings is None else ((stop_strings,) if isinstance(stop_strings, str) else tuple(stop_strings))
    if any(not isinstance(s, str) or not s for s in strings):
        raise GenerationError(f"stop strings must be non-empty strings, got {strings!r}")
    decode = None
    if strings:
        if tokenizer is None:
            raise GenerationError("stop_strings need a tokenizer (an object with .decode(ids) or a decode function)")
        decode = tokenizer if callable(tokenizer) and not hasattr(tokenizer, "decode") else tokenizer.decode
    return _Stops(frozenset(ids), strings, decode)


class Generation:
    """One generation run over a batch, as an iterator: each ``next()`` yields a list with, for every
    row, its new token id or None once that row has finished.

    After iteration: ``tokens`` (new ids per row, stop token included), ``finish_reasons`` per row
    ("stop_token", "stop_string", "length" or "context"), and ``prompt_lengths``."""

    def __init__(self, model, prompts, max_new_tokens: int, params: SamplingParams, *, stops: _Stops,
                 pad_id: int | None, prefill_chunk: int | None, monitor=None, progress: Progress | None = None):
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise GenerationError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
        self.model, self.params, self.stops, self.monitor = model, params, stops, monitor
        cfg = model.config
        ids, mask, lengths = prepare_prompts(prompts, cfg, pad_id)
        self.prompt_lengths = lengths
        self.pad_id = int(ids[0, 0]) if min(lengths) < ids.shape[1] else (cfg.pad_token_id or 0)
        # Positions must stay below the context: the last token fed sits at position len + n - 2.
        room = cfg.max_position_embeddings - max(lengths) + 1
        self.max_new = min(max_new_tokens, room)
        self.context_limited = self.max_new < max_new_tokens
        if self.context_limited:
            log.warning("max_new_tokens=%d capped at %d by the context (%d positions)",
                        max_new_tokens, self.max_new, cfg.max_position_embeddings)
        self.prefill_chunk = prefill_chunk
        self.progress = progress
        dev = model.device
        b, t = ids.shape
        self.batch = b
        total = t + max(self.max_new, 1)
        self.input_ids = ids.to(dev)
        self.padded = bool((mask == 0).any())
        # One preallocated mask for the whole run; each step passes a growing view of it.
        self.mask = torch.ones(b, total, dtype=torch.long, device=dev)
        self.mask[:, :t] = mask.to(dev)
        self.positions = torch.tensor(lengths, dtype=torch.long, device=dev)[:, None]  # next position per row
        # Full caches are allocated once for the whole run (chunk = max_length = total).
        self.cache = model.new_cache(chunk=total, max_length=total)
        if total <= cfg.sliding_window:
            # The whole run fits in the sliding window, so no token is ever evicted: a plain cache
            # holds exactly what the ring would, minus the ring's not-yet-written slots, which would
            # cost every decode step a mask and attention over empty slots (~10% of a 270M bf16 step).
            for i, c in enumerate(self.cache.layers):
                if isinstance(c, SlidingCache):
                    self.cache.layers[i] = FullCache(chunk=total, max_length=total)
        self.generator = params.make_generator(dev)
        self.seen = None
        if params.repetition_penalty != 1.0:
            self.seen = torch.zeros(b, cfg.vocab_size, dtype=torch.bool, device=dev)
            self.seen.scatter_(1, ids.to(dev), mask.to(dev).bool())
            # pad positions scattered False may have cleared a real occurrence of the pad id: redo reals
            for i, r in enumerate(ids):
                self.seen[i, r[t - lengths[i]:].to(dev)] = True
        self.tokens: list[list[int]] = [[] for _ in range(b)]
        self.finish_reasons: list[str | None] = [None] * b
        self._checked_chars = [0] * b
        self._step = 0
        self._fed: list[torch.Tensor] = []  # tokens fed to decode steps (for the NaN diagnosis)
        self._iter = self._run()

    def __iter__(self) -> "Generation":
        return self

    def __next__(self) -> list[int | None]:
        return next(self._iter)

    @property
    def done(self) -> bool:
        return all(r is not None for r in self.finish_reasons)

    def _check_finite(self, logits: torch.Tensor) -> None:
        # A float32 sum is non-finite whenever some logit is NaN/inf: a screen ~40x cheaper than
        # isfinite().all() over the vocabulary; the exact check then rules out a mere overflow.
        if not bool(torch.isfinite(logits.sum(dtype=torch.float32))) and not bool(torch.isfinite(logits).all()):
            seq = torch.cat([self.input_ids, *[f[:, None] for f in self._fed]], dim=1)
            mask = self.mask[:, : seq.shape[1]] if self.padded else None
            raise NonFiniteLogitsError(_nonfinite_message(self.model, seq, mask, self._step))

    def _pick(self, logits: torch.Tensor) -> torch.Tensor:
        self._check_finite(logits)
        return sample_next(logits, self.params, self.generator, self.seen)

    def _record(self, nxt: torch.Tensor) -> list[int | None]:
        out: list[int | None] = []
        ids = nxt.tolist()
        for i, tok in enumerate(ids):
            if self.finish_reasons[i] is not None:
                out.append(None)
                continue
            self.tokens[i].append(tok)
            out.append(tok)
            if tok in self.stops.token_ids:
                self.finish_reasons[i] = "stop_token"
            elif self.stops.strings and self._stop_string_hit(i):
                self.finish_reasons[i] = "stop_string"
            elif len(self.tokens[i]) >= self.max_new:
                self.finish_reasons[i] = "context" if self.context_limited else "length"
        if self.seen is not None:
            self.seen.scatter_(1, nxt[:, None], True)
        return out

    def _stop_string_hit(self, i: int) -> bool:
        text = self.stops.decode(self.tokens[i])
        longest = max(len(s) for s in self.stops.strings)
        # Search only text not searched before (less the longest stop string, which may straddle).
        start = max(0, self._checked_chars[i] - longest + 1)
        self._checked_chars[i] = len(text)
        return any(text.find(s, start) >= 0 for s in self.stops.strings)

    @torch.no_grad()
    def _run(self) -> Iterator[list[int | None]]:
        if self.max_new == 0:
            self.finish_reasons = ["length"] * self.batch
            return
        mon, model = self.monitor, self.model
        if mon is not None:
            mon.start(prompt_tokens=sum(self.prompt_lengths), batch=self.batch)
        t = self.input_ids.shape[1]
        logits = prefill(model, self.input_ids, self.cache, self.mask[:, :t] if self.padded else None, self.prefill_chunk,
                         self.progress)
        nxt = self._pick(logits)
        out = self._record(nxt)
        if mon is not None:
            mon.first_token()
        yield out
        while not self.done:
            self._step += 1
            past = self.cache.length
            mask = self.mask[:, : past + 1] if self.padded else None
            pos = self.positions + (past - t)
            self._fed.append(nxt)
            logits = decode_step(model, nxt, self.cache, mask, pos)
            nxt = self._pick(logits)
            out = self._record(nxt)
            if mon is not None:
                mon.token()
            yield out
        if mon is not None:
            mon.finish()


def _params(params: SamplingParams | None, **kw) -> SamplingParams:
    given = {k: v for k, v in kw.items() if v is not None}
    if params is not None:
        if given:
            raise GenerationError(f"pass either params=SamplingParams(...) or sampling keywords, not both ({', '.join(given)})")
        return params
    return SamplingParams(**given)


def stream(
    model,
    prompts,
    max_new_tokens: int = 64,
    *,
    params: SamplingParams | None = None,
    temperature: float | None = None,
    top_k: int | None = None,
    top_p: float | None = None,
    min_p: float | None = None,
    repetition_penalty: float | None = None,
    seed: int | None = None,
    stop_token_ids: int | Iterable[int] | None = None,
    stop_strings: str | Sequence[str] | None = None,
    tokenizer=None,
    pad_id: int | None = None,
    prefill_chunk: int | None = 512,
    monitor=None,
    draft_model=None,
    drafter=None,
    num_draft_tokens: int = 4,
    fast: bool = True,
    progress: Progress | None = None,
) -> "Generation | SpeculativeGeneration":
    """Start a generation and return it as an iterator (see :class:`Generation`).

    prompts: token-id lists (any lengths; left-padded into one batch), one id list, or a LongTensor.
    Sampling: ``params`` or the keywords (temperature 0 = greedy, the default).
    stop_token_ids: None = the config's EOS ids (plus the tokenizer's stop ids); () = never stop on a token.
    stop_strings: stop a row once its decoded output contains one; needs ``tokenizer`` (an object with
        ``.decode(ids)``, or a decode function).
    prefill_chunk: prompt tokens per prefill forward (None = all at once).
    monitor: a :class:`gemma4.infer.monitor.LatencyMonitor` to time the run.
    draft_model / drafter: speculative decoding with a smaller Gemma model or an MTP drafter (one prompt;
        the output is what plain decoding gives: identical tokens when greedy, the target's distribution
        when sampling). ``num_draft_tokens`` per round.
    fast: on CPU, move an inference model (eval mode, no parameter requiring grad) to the fast path on
        first use (:func:`gemma4.infer.use_fast_path`; undo with ``use_plain_path``). Same tokens, ~2x speed.
    progress: advanced once per prefill chunk (a :data:`gemma4._util.Progress`, e.g. the CLI's bar).
    """
    p = _params(params, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                repetition_penalty=repetition_penalty, seed=seed)
    if prefill_chunk is not None and (isinstance(prefill_chunk, bool) or not isinstance(prefill_chunk, int) or prefill_chunk < 1):
        raise GenerationError(f"prefill_chunk must be a positive integer or None, got {prefill_chunk!r}")
    if fast:
        for m in (model, draft_model):
            if m is not None and _inference_only(m):
                # A no-op off CPU, where oneDNN cannot run the dtype, or if done already; the head keeps
                # its plain weight, so nothing is held twice.
                use_fast_path(m)
    stops = _stop_setup(model, stop_token_ids, stop_strings, tokenizer)
    if draft_model is not None or drafter is not None:
        return SpeculativeGeneration(model, prompts, max_new_tokens, p, stops=stops, draft_model=draft_model,
                                     drafter=drafter, num_draft_tokens=num_draft_tokens, monitor=monitor)
    return Generation(model, prompts, max_new_tokens, p, stops=stops, pad_id=pad_id,
                      prefill_chunk=prefill_chunk, monitor=monitor, progress=progress)


def _inference_only(model) -> bool:
    return not model.training and not any(p.requires_grad for p in model.parameters())


class SpeculativeGeneration:
    """:class:`Generation`'s interface over speculative decoding (one prompt): each ``next()`` yields
    ``[token]``; ``tokens``, ``finish_reasons``, ``prompt_lengths``, ``done`` and ``stats``
    (:class:`gemma4.infer.speculative.SpeculativeStats`) as there."""

    def __init__(self, model, prompts, max_new_tokens: int, params: SamplingParams, *, stops: _Stops,
                 draft_model, drafter, num_draft_tokens: int, monitor=None):
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise GenerationError(f"max_new_tokens must be an integer >= 1 with a draft, got {max_new_tokens!r}")
        ids, _, lengths = prepare_prompts(prompts, model.config)
        if len(lengths) != 1:
            raise GenerationError(f"speculative decoding runs one prompt at a time, got {len(lengths)}")
        if stops.strings:
            raise GenerationError("stop_strings are not supported with speculative decoding; use stop_token_ids")
        self.prompt_lengths, self.batch, self.stops = lengths, 1, stops
        self.max_new = min(max_new_tokens, model.config.max_position_embeddings - lengths[0])
        self.stats, self.monitor = SpeculativeStats(), monitor
        self.tokens: list[list[int]] = [[]]
        self.finish_reasons: list[str | None] = [None]
        self._rounds = speculative_rounds(model, ids[0].tolist(), self.max_new, self.stats, drafter=drafter,
                                          draft_model=draft_model, num_draft_tokens=num_draft_tokens,
                                          stop_token_ids=tuple(stops.token_ids), params=params)
        self._iter = self._run()

    def __iter__(self) -> "SpeculativeGeneration":
        return self

    def __next__(self) -> list[int | None]:
        return next(self._iter)

    @property
    def done(self) -> bool:
        return self.finish_reasons[0] is not None

    def _run(self) -> Iterator[list[int | None]]:
        mon = self.monitor
        if mon is not None:
            mon.start(prompt_tokens=self.prompt_lengths[0], batch=1)
        for chunk in self._rounds:
            for tok in chunk:
                self.tokens[0].append(tok)
                if tok in self.stops.token_ids:
                    self.finish_reasons[0] = "stop_token"
                elif len(self.tokens[0]) >= self.max_new:
                    self.finish_reasons[0] = "length"
                if mon is not None:
                    mon.first_token() if len(self.tokens[0]) == 1 else mon.token()
                yield [tok]
        self.stats.new_tokens = len(self.tokens[0])
        if mon is not None:
            mon.finish()


def generate(model, prompts, max_new_tokens: int = 64, **kw) -> list[list[int]]:
    """Generate up to ``max_new_tokens`` per prompt; returns the new token ids per prompt (a row that
    stops on a stop token or stop string includes that token). Keywords as :func:`stream`."""
    g = stream(model, prompts, max_new_tokens, **kw)
    for _ in g:
        pass
    return g.tokens
