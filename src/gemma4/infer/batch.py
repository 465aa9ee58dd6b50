"""Continuous batching: requests join and leave a running decode batch.

:class:`BatchEngine` keeps one decode batch of up to ``max_batch`` rows. Each engine step

1. drops cancelled and timed-out requests (a client that disconnects cancels its row);
2. prefills joining requests within a budget of ``prefill_chunk`` tokens: requests that arrived
   together with short prompts (each fits in one chunk) in one left-padded batched forward, a long
   prompt one chunk per step, so it delays the running rows by one chunk's forward per step instead of
   its whole prefill;
3. runs one decode step for every running row, each at its own position.

Rows have their own lengths. The KV cache is a pool (:class:`BatchCache`) with one row per batch row:
full-attention layers store row ``r``'s token at position ``p`` in column ``p``; sliding layers keep a
per-row ring of ``sliding_window`` columns (position ``p`` in column ``p % window``). A decode step
attends over the pool with a per-row mask, so rows of different lengths share one forward. Running
rows stay packed in pool rows ``0..n-1``: when a row leaves, the last one moves into its place.

A prompt is prefilled through the model's own forward (:meth:`Gemma4TextModel.forward`) with a cache
view of its pool row, in the same chunks :func:`gemma4.infer.generate.prefill` uses, so with
``prefill_chunk`` equal to generate's a request gets the same greedy tokens as ``generate`` on that
request alone (tests/test_batch.py checks it; the batched first prefill is left-padded like
``generate``'s own batches, which give the same tokens as single runs). A decode step (:func:`_decode_forward`) builds per-row
positions and masks and runs the model's own decoder stack (``Gemma4TextModel.run_layers``).

Tokens are chosen by :func:`gemma4.infer.sampling.sample_next`, one call per sampled row with the
request's own :class:`SamplingParams` and generator (a request's seed gives the same draws whatever
else is in the batch). Greedy rows without a repetition penalty share one argmax.

The engine is driven either by :meth:`BatchEngine.step` (tests, benchmarks) or by a background thread
(:meth:`BatchEngine.start`); :meth:`BatchEngine.submit` and :meth:`Request.cancel` are thread-safe.
Listeners (``on_event``) run on the engine thread and must be quick (the server hands events over to
its event loop).
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import deque
from typing import Callable, Sequence

import torch

from gemma4.infer.generate import GenerationError, prepare_prompts
from gemma4.infer.sampling import SamplingParams, argmax, sample_next
from gemma4.model.cache import LayerCache
from gemma4.model.config import FULL, SLIDING
from gemma4.model.decoder import AttnContext

log = logging.getLogger("gemma4")

__all__ = ["BatchEngine", "BatchCache", "Request", "BatchError", "QueueFullError"]

# Finish reasons a request can end with.
STOP, LENGTH, CANCELLED, TIMEOUT, ERROR = "stop", "length", "cancelled", "timeout", "error"


class BatchError(ValueError):
    """A request the engine cannot take (bad prompt, bad setting); the message names the field."""


class QueueFullError(BatchError):
    """The waiting queue is full: the caller should retry later (HTTP 429)."""


# ============================================================================================ requests
_ids = itertools.count(1)


class Request:
    """One submitted generation, updated by the engine as it runs.

    ``tokens``: new token ids so far (a stop token included). ``finish_reason``: None while running,
    then "stop" (a stop token), "length" (``max_new_tokens`` or the context), "cancelled", "timeout"
    or "error" (``error`` holds the exception). With ``logprobs`` set: ``token_logprobs`` (log-prob of
    each chosen token under the model's distribution, before sampling filters) and ``top_logprobs``
    (``logprobs`` pairs (id, log-prob) per token, most likely first). With ``prompt_logprobs`` set:
    ``prompt_token_logprobs`` / ``prompt_top_logprobs`` for every prompt token (None for the first).
    Times (``time.monotonic``): ``t_submit``, ``t_first`` (first token), ``t_done``.
    """

    def __init__(self, prompt: list[int], max_new_tokens: int, params: SamplingParams, stop_token_ids: frozenset,
                 logprobs: int | None, prompt_logprobs: int | None, on_event, timeout: float | None):
        self.id = next(_ids)
        self.prompt = prompt
        self.max_new_tokens = max_new_tokens
        self.params = params
        self.stop_token_ids = stop_token_ids
        self.logprobs = logprobs
        self.prompt_logprobs = prompt_logprobs
        self.on_event = on_event
        self.tokens: list[int] = []
        self.token_logprobs: list[float] = []
        self.top_logprobs: list[list[tuple[int, float]]] = []
        self.prompt_token_logprobs: list[float | None] = []
        self.prompt_top_logprobs: list[list[tuple[int, float]] | None] = []
        self.finish_reason: str | None = None
        self.error: BaseException | None = None
        self.t_submit = time.monotonic()
        self.t_first: float | None = None
        self.t_done: float | None = None
        self.deadline = None if timeout is None else self.t_submit + timeout
        self._cancel = False
        self._done = threading.Event()
        # Engine-side state.
        self._filled = 0  # prompt tokens prefilled
        self._cached = 0  # tokens held in the pool row (prompt and fed tokens)
        self._slot = -1  # pool row while prefilling / running
        self._generator = None
        self._seen: torch.Tensor | None = None  # [V] bool, for the repetition penalty
        self._max_new = max_new_tokens

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def cancel(self) -> None:
        """Ask the engine to drop this request (thread-safe; it ends with finish_reason "cancelled")."""
        self._cancel = True

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the request has finished; False on timeout."""
        return self._done.wait(timeout)

    def __repr__(self) -> str:
        return (f"Request(id={self.id}, prompt={len(self.prompt)} tokens, generated={len(self.tokens)}, "
                f"finish_reason={self.finish_reason!r})")


# ============================================================================================ the cache
class _PoolLayer:
    """Storage of one K/V-producing layer for every pool row: [rows, K, columns, D] keys and values."""

    def __init__(self, kind: str, window: int | None, rows: int):
        self.kind, self.window, self.rows = kind, window, rows
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None

    def ensure(self, like_k: torch.Tensor, like_v: torch.Tensor, columns: int) -> None:
        """Allocate or grow to ``columns`` columns (zero-filled: masked columns must hold finite values,
        since a zero attention weight times a NaN value is still NaN)."""
        cap = 0 if self.k is None else self.k.shape[2]
        if self.k is not None and columns <= cap:
            return
        _, h, _, d = like_k.shape
        nk = like_k.new_zeros(self.rows, h, columns, d)
        nv = like_v.new_zeros(self.rows, h, columns, like_v.shape[-1])
        if self.k is not None:
            nk[:, :, :cap] = self.k
            nv[:, :, :cap] = self.v
        self.k, self.v = nk, nv

    def nbytes(self) -> int:
        return 0 if self.k is None else self.k.numel() * self.k.element_size() + self.v.numel() * self.v.element_size()


class BatchCache:
    """The KV pool of a batch: per-row lengths, full layers by position, sliding layers as per-row rings."""

    def __init__(self, config, rows: int, max_length: int, chunk: int = 256):
        self.config, self.rows, self.max_length, self.chunk = config, rows, max_length, chunk
        modes = config.kv_sharing_modes
        self.layers: list[_PoolLayer | None] = []
        for i, t in enumerate(config.layer_types):
            if modes[i] == "reuse":
                self.layers.append(None)
            elif t == SLIDING:
                self.layers.append(_PoolLayer(SLIDING, config.sliding_window, rows))
            else:
                self.layers.append(_PoolLayer(FULL, None, rows))
        self.full_columns = 0  # columns wanted in full layers (allocated lazily on the first write)

    def reserve(self, length: int) -> None:
        """Make room for ``length`` tokens in every row of the full-attention layers."""
        if length > self.full_columns:
            # Grow in whole chunks: a decode step needs a new column only once every `chunk` tokens.
            self.full_columns = min(max(-(-length // self.chunk) * self.chunk, length), max(self.max_length, length))

    def columns(self, layer: _PoolLayer) -> int:
        return layer.window if layer.kind == SLIDING else self.full_columns

    def move(self, src: int, dst: int, length: int) -> None:
        """Copy pool row ``src`` (holding ``length`` tokens) into row ``dst``."""
        for lay in self.layers:
            if lay is None or lay.k is None:
                continue
            n = min(length, lay.window) if lay.kind == SLIDING else length
            cols = slice(None) if lay.kind == SLIDING else slice(0, n)
            lay.k[dst, :, cols] = lay.k[src, :, cols]
            lay.v[dst, :, cols] = lay.v[src, :, cols]

    def clear_row(self, row: int) -> None:
        for lay in self.layers:
            if lay is not None and lay.k is not None:
                lay.k[row].zero_()
                lay.v[row].zero_()

    def release(self) -> None:
        """Free every tensor (the engine calls this when it goes idle)."""
        for lay in self.layers:
            if lay is not None:
                lay.k = lay.v = None
        self.full_columns = 0

    def nbytes(self) -> int:
        return sum(lay.nbytes() for lay in self.layers if lay is not None)


class _FullRowView(LayerCache):
    """One pool row of a full layer seen as a batch-1 :class:`FullCache` (for the model's own forward)."""

    def __init__(self, pool: BatchCache, layer: _PoolLayer, row: int, length: int):
        self.pool, self.layer, self.row, self.length = pool, layer, row, length

    def key_slots(self, t, device):
        return torch.arange(self.length + t, device=device)

    def update(self, k, v):
        t, lay = k.shape[2], self.layer
        lay.ensure(k, v, self.pool.columns(lay))
        lay.k[self.row, :, self.length:self.length + t] = k[0]
        lay.v[self.row, :, self.length:self.length + t] = v[0]
        self.length += t
        r = slice(self.row, self.row + 1)
        return lay.k[r, :, :self.length], lay.v[r, :, :self.length]


class _SlidingRowView(LayerCache):
    """One pool row of a sliding layer seen as a batch-1 ring cache (same slots as :class:`SlidingCache`)."""

    def __init__(self, pool: BatchCache, layer: _PoolLayer, row: int, length: int):
        self.pool, self.layer, self.row, self.length = pool, layer, row, length

    def key_slots(self, t, device):
        kept = min(self.length, self.layer.window)
        return torch.arange(self.length - kept, self.length + t, device=device)

    def update(self, k, v):
        lay, w, t = self.layer, self.layer.window, k.shape[2]
        lay.ensure(k, v, w)
        kept = min(self.length, w)
        order = torch.remainder(torch.arange(self.length - kept, self.length, device=k.device), w)
        r = slice(self.row, self.row + 1)
        k_all = torch.cat([lay.k[r][:, :, order], k], dim=2)
        v_all = torch.cat([lay.v[r][:, :, order], v], dim=2)
        n = min(t, w)  # only the newest `window` tokens stay in the ring
        idx = torch.remainder(torch.arange(self.length + t - n, self.length + t, device=k.device), w)
        lay.k[self.row][:, idx] = k[0, :, t - n:]
        lay.v[self.row][:, idx] = v[0, :, t - n:]
        self.length += t
        return k_all, v_all


class _RowCache:
    """A :class:`ModelCache` look-alike over one pool row: what ``Gemma4TextModel.forward`` needs."""

    def __init__(self, pool: BatchCache, row: int, length: int):
        self.config = pool.config
        self.layers = []
        for lay in pool.layers:
            if lay is None:
                self.layers.append(None)
            elif lay.kind == SLIDING:
                self.layers.append(_SlidingRowView(pool, lay, row, length))
            else:
                self.layers.append(_FullRowView(pool, lay, row, length))

    @property
    def length(self) -> int:
        return next(c.length for c in self.layers if c is not None)

    def first_of_type(self, layer_type: str):
        for c, t in zip(self.layers, self.config.layer_types):
            if c is not None and t == layer_type:
                return c
        return None


class _GroupView(LayerCache):
    """A batched first prefill of several fresh requests (left-padded [g, T] chunk, nothing cached yet):
    attention runs over the chunk itself; each row's real tokens are stored in its own pool row."""

    def __init__(self, pool: BatchCache, layer: _PoolLayer, slots: list[int], lengths: list[int], t: int):
        self.pool, self.layer, self.slots, self.lengths, self.t = pool, layer, slots, lengths, t
        self.length = 0

    def key_slots(self, t, device):
        return torch.arange(self.length + t, device=device)

    def update(self, k, v):
        lay, t = self.layer, self.t
        lay.ensure(k, v, self.pool.columns(lay))
        for i, (slot, n) in enumerate(zip(self.slots, self.lengths)):
            if lay.kind == FULL:
                lay.k[slot, :, :n] = k[i, :, t - n:]
                lay.v[slot, :, :n] = v[i, :, t - n:]
            else:  # the newest `window` real tokens, at their ring columns
                m = min(n, lay.window)
                idx = torch.remainder(torch.arange(n - m, n, device=k.device), lay.window)
                lay.k[slot][:, idx] = k[i, :, t - m:]
                lay.v[slot][:, idx] = v[i, :, t - m:]
        self.length += t
        return k, v


class _GroupCache:
    """The cache object the model's forward sees during a batched first prefill."""

    def __init__(self, pool: BatchCache, slots: list[int], lengths: list[int], t: int):
        self.config = pool.config
        self.layers = [None if lay is None else _GroupView(pool, lay, slots, lengths, t) for lay in pool.layers]

    @property
    def length(self) -> int:
        return 0

    def first_of_type(self, layer_type: str):
        for c, lt in zip(self.layers, self.config.layer_types):
            if c is not None and lt == layer_type:
                return c
        return None


class _DecodeView:
    """A pool layer during a batched decode step: rows 0..n-1, one new token each at ``positions``."""

    def __init__(self, pool: BatchCache, layer: _PoolLayer, positions: torch.Tensor, keys: int):
        self.pool, self.layer, self.positions, self.keys = pool, layer, positions, keys

    def update(self, k, v):
        """k, v [n, K, 1, D] -> keys/values [n, K, S, D] over the pool columns the mask describes."""
        lay, n = self.layer, k.shape[0]
        lay.ensure(k, v, self.pool.columns(lay))
        rows = torch.arange(n, device=k.device)
        col = self.positions if lay.kind == FULL else torch.remainder(self.positions, lay.window)
        lay.k[rows, :, col] = k[:, :, 0]
        lay.v[rows, :, col] = v[:, :, 0]
        return lay.k[:n, :, :self.keys], lay.v[:n, :, :self.keys]


def _decode_masks(pool: BatchCache, positions: torch.Tensor) -> dict[str, tuple[int, torch.Tensor | None]]:
    """Per layer type: (key columns S, mask [n, 1, 1, S] bool or None when every key is visible)."""
    out = {}
    top = int(positions.max()) + 1
    for lt in set(pool.config.layer_types):
        if lt == SLIDING:
            w = pool.config.sliding_window
            s = min(w, top)  # while no row has wrapped, columns >= max(position)+1 are empty for all
            j = torch.arange(s, device=positions.device)
            # Ring column j of a row at position p holds position p - ((p - j) mod w): valid once >= 0.
            held = positions[:, None] - torch.remainder(positions[:, None] - j[None], w)
            m = held >= 0
        else:
            s = top
            m = torch.arange(s, device=positions.device)[None] <= positions[:, None]
        out[lt] = (s, None if bool(m.all()) else m[:, None, None, :])
    return out


class _DecodeCaches:
    """What ``Gemma4TextModel.run_layers`` reads from a cache (``.layers``) for one batched decode step."""

    def __init__(self, pool: BatchCache, positions: torch.Tensor, keys: dict[str, int]):
        types = pool.config.layer_types
        self.layers = [None if lay is None else _DecodeView(pool, lay, positions, keys[types[i]])
                       for i, lay in enumerate(pool.layers)]


def _decode_forward(model, pool: BatchCache, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """One decode step for pool rows 0..n-1: ``tokens`` [n] at ``positions`` [n] -> logits [n, V].

    ``Gemma4TextModel.forward`` with one new token per row (T = 1), except that each row has its own
    position and its own key mask: the embedding, RoPE tables and masks are built here, the decoder
    stack is the model's own ``run_layers``."""
    m, cfg = model.model, model.config
    ids = tokens[:, None]  # [n,1]
    h = m.embed(ids)
    ple = m.per_layer_inputs(ids, h) if cfg.hidden_size_per_layer_input else None
    pos = positions[:, None]  # [n,1]
    masks = _decode_masks(pool, positions)
    rope = {lt: m.rope(lt, pos, h.dtype) for lt in masks}
    ctxs = {lt: AttnContext(lt, cfg.sliding_window if lt == SLIDING else None, positions,
                            torch.arange(s, device=positions.device))
            for lt, (s, _) in masks.items()}
    caches = _DecodeCaches(pool, positions, {lt: s for lt, (s, _) in masks.items()})
    h, _ = m.run_layers(h, ple, rope, {lt: mk for lt, (_, mk) in masks.items()}, ctxs, caches, 0, False)
    return model.logits(h)[:, -1]


# ============================================================================================ the engine
class BatchEngine:
    """Continuous-batching generation over one model (see the module docstring).

    max_batch: rows decoded together. prefill_chunk: prompt tokens per prefill forward (also the most a
    joining request delays the running rows per step). max_queue: waiting requests beyond which
    :meth:`submit` raises :class:`QueueFullError`. stop_token_ids: the default stop set (None = the
    config's EOS ids).
    """

    def __init__(self, model, *, max_batch: int = 8, prefill_chunk: int = 512, max_queue: int = 64,
                 stop_token_ids: Sequence[int] | None = None, max_length: int | None = None):
        for name, v, lo in (("max_batch", max_batch, 1), ("prefill_chunk", prefill_chunk, 1), ("max_queue", max_queue, 0)):
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise BatchError(f"{name} must be an integer >= {lo}, got {v!r}")
        self.model = model
        cfg = model.config
        self.config = cfg
        for layer in model.model.layers:
            backend = getattr(layer.self_attn, "backend", "eager")
            if backend not in ("eager", "sdpa"):
                raise BatchError(f"the batch engine supports the 'eager' and 'sdpa' attention backends, "
                                 f"not {backend!r} (model.set_attention_backend('eager'))")
        self.max_batch, self.prefill_chunk, self.max_queue = max_batch, prefill_chunk, max_queue
        self.max_length = min(max_length or cfg.max_position_embeddings, cfg.max_position_embeddings)
        if stop_token_ids is None:
            eos = cfg.eos_token_id
            stop_token_ids = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
        self.stop_token_ids = frozenset(int(t) for t in stop_token_ids)
        self.device = model.device
        self.cache = BatchCache(cfg, max_batch, self.max_length)
        self._waiting: deque[Request] = deque()
        self._prefilling: Request | None = None
        self._rows: list[Request] = []  # running rows; index = pool row
        self._last: list[int] = []  # per running row: the token to feed next
        self._lock = threading.Lock()  # guards _waiting
        self._step_lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._thread: threading.Thread | None = None
        self._stopping = False
        # Counters (read by the server's /metrics).
        self.steps = 0
        self.generated_tokens = 0
        self.prompt_tokens = 0

    # ------------------------------------------------------------------------------------------ intake
    def submit(self, prompt: Sequence[int], max_new_tokens: int = 64, params: SamplingParams | None = None, *,
               stop_token_ids: Sequence[int] | None = None, logprobs: int | None = None,
               prompt_logprobs: int | None = None, on_event: Callable[[Request, str], None] | None = None,
               timeout: float | None = None) -> Request:
        """Queue a request and return its :class:`Request` handle.

        prompt: token ids (BOS included if wanted). stop_token_ids: None = the engine's default set;
        () = never stop on a token. logprobs / prompt_logprobs: None = off, k >= 0 = record the chosen
        (or prompt) token's log-prob and the k most likely alternatives. on_event(request, kind) is
        called on the engine thread with kind "token" after each new token and "done" at the end.
        timeout: seconds from now after which the request ends with "timeout".
        Raises :class:`BatchError` for a bad request, :class:`QueueFullError` when the queue is full."""
        params = params if params is not None else SamplingParams()
        if not isinstance(params, SamplingParams):
            raise BatchError(f"params must be a SamplingParams, got {type(params).__name__}")
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise BatchError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
        for name, v in (("logprobs", logprobs), ("prompt_logprobs", prompt_logprobs)):
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= 100):
                raise BatchError(f"{name} must be None or an integer in [0, 100], got {v!r}")
        if timeout is not None and not (isinstance(timeout, (int, float)) and timeout > 0):
            raise BatchError(f"timeout must be a positive number of seconds, got {timeout!r}")
        try:
            _, _, lengths = prepare_prompts([list(prompt)], self.config)
        except GenerationError as e:
            raise BatchError(str(e)) from None
        if lengths[0] > self.max_length:
            raise BatchError(f"prompt has {lengths[0]} tokens but the engine's context is {self.max_length}")
        stops = self.stop_token_ids if stop_token_ids is None else frozenset(int(t) for t in stop_token_ids)
        req = Request([int(t) for t in prompt], max_new_tokens, params, stops, logprobs, prompt_logprobs,
                      on_event, timeout)
        # Positions must stay below the context: the last token fed sits at position len + n - 2.
        req._max_new = min(max_new_tokens, self.max_length - len(req.prompt) + 1)
        with self._wake:
            if len(self._waiting) >= self.max_queue:
                raise QueueFullError(f"the request queue is full ({self.max_queue} waiting); retry later")
            self._waiting.append(req)
            self._wake.notify()
        return req

    @property
    def queue_depth(self) -> int:
        return len(self._waiting)

    @property
    def active(self) -> int:
        """Requests holding a pool row (running or prefilling)."""
        return len(self._rows) + (self._prefilling is not None)

    @property
    def idle(self) -> bool:
        return not self._waiting and self._prefilling is None and not self._rows

    # ------------------------------------------------------------------------------------------ stepping
    @torch.no_grad()
    def step(self) -> bool:
        """One engine iteration; returns False when there was nothing to do."""
        with self._step_lock:
            self._reap()
            worked = False
            # Prefill: whole chunks (the boundaries generate.prefill uses) of as many joining requests
            # as fit in `prefill_chunk` tokens, at least one chunk: short prompts arriving together
            # all start in one step, and running rows wait at most about one chunk's forward.
            budget = self.prefill_chunk
            group = self._take_group(budget)
            if group:
                self._guard(lambda: self._prefill_group(group), group)
                worked = True
                budget -= sum(len(r.prompt) for r in group)
            while budget > 0:
                self._admit()
                req = self._prefilling
                if req is None:
                    break
                need = min(self.prefill_chunk, len(req.prompt) - req._filled)
                if need > budget and budget < self.prefill_chunk:
                    break
                self._guard(self._prefill_chunk, [req])
                worked = True
                budget -= need
                if budget <= 0:
                    break
            if self._rows:
                self._guard(self._decode, list(self._rows))
                worked = True
            if worked:
                self.steps += 1
            if self.idle and self.cache.nbytes():
                self.cache.release()  # idle: give the KV memory back
            return worked

    def run_until_idle(self, max_steps: int | None = None) -> None:
        n = 0
        while self.step():
            n += 1
            if max_steps is not None and n >= max_steps:
                raise BatchError(f"engine still busy after {max_steps} steps")

    def _guard(self, fn, reqs: list[Request]) -> None:
        try:
            fn()
        except Exception as e:  # a failed forward fails the requests in it, not the engine
            log.exception("batch engine step failed")
            for r in reqs:
                if not r.done:
                    r.error = e
                    self._remove(r, ERROR)

    # ------------------------------------------------------------------------------------------ thread
    def start(self) -> "BatchEngine":
        """Run the engine on a background thread until :meth:`stop`."""
        if self._thread is not None:
            return self
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="gemma4-batch", daemon=True)
        self._thread.start()
        return self

    def stop(self, cancel: bool = True) -> None:
        """Stop the background thread (cancelling what is left, by default)."""
        if cancel:
            with self._lock:
                pending = list(self._waiting)
            for r in pending + self._rows + ([self._prefilling] if self._prefilling else []):
                r.cancel()
        with self._wake:
            self._stopping = True
            self._wake.notify_all()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if cancel:
            self.step()

    def _loop(self) -> None:
        while True:
            with self._wake:
                while not self._stopping and self.idle:
                    self._wake.wait(timeout=1.0)
                if self._stopping:
                    return
            try:
                self.step()
            except Exception as e:  # a bug outside a forward: fail what is in flight, keep serving
                log.exception("batch engine step failed outside a forward")
                with self._step_lock:
                    for r in list(self._rows) + ([self._prefilling] if self._prefilling else []):
                        if not r.done:
                            r.error = e
                            self._remove(r, ERROR)

    # ------------------------------------------------------------------------------------------ internals
    def _emit(self, req: Request, kind: str) -> None:
        if req.on_event is not None:
            try:
                req.on_event(req, kind)
            except Exception:  # a listener's bug must not stop the batch
                log.exception("request listener failed")

    def _finish(self, req: Request, reason: str) -> None:
        req.finish_reason = reason
        req.t_done = time.monotonic()
        req._seen = None
        req._done.set()
        self._emit(req, "done")

    def _remove(self, req: Request, reason: str) -> None:
        """Take ``req`` out of wherever it is (queue, prefill, running rows) and finish it."""
        if req in self._rows:
            i = self._rows.index(req)
            last = len(self._rows) - 1
            if reason == ERROR:
                self.cache.clear_row(i)  # non-finite K/V must not linger in a reused row
            if i != last:
                mover = self._rows[last]
                self.cache.move(last, i, mover._cached)
                self._rows[i], self._last[i] = mover, self._last[last]
                mover._slot = i
            self._rows.pop()
            self._last.pop()
            pre = self._prefilling
            if pre is not None and pre._slot == last + 1:
                # Keep the pool packed: the request being prefilled moves down next to the running rows.
                self.cache.move(last + 1, last, pre._cached)
                pre._slot = last
        elif req is self._prefilling:
            self._prefilling = None
            if reason == ERROR:
                self.cache.clear_row(req._slot)
        else:
            with self._lock:
                try:
                    self._waiting.remove(req)
                except ValueError:
                    pass
        req._slot = -1
        self._finish(req, reason)

    def _reap(self) -> None:
        now = time.monotonic()
        with self._lock:
            queued = list(self._waiting)
        for r in queued + self._rows + ([self._prefilling] if self._prefilling else []):
            if r._cancel:
                self._remove(r, CANCELLED)
            elif r.deadline is not None and now > r.deadline:
                self._remove(r, TIMEOUT)

    def _admit(self) -> None:
        if self._prefilling is not None or len(self._rows) >= self.max_batch:
            return
        with self._lock:
            if not self._waiting:
                return
            req = self._waiting.popleft()
        self._init(req, len(self._rows))
        self._prefilling = req

    def _init(self, req: Request, slot: int) -> None:
        req._slot = slot
        req._filled = 0
        req._generator = req.params.make_generator(self.device)
        if req.params.repetition_penalty != 1.0:
            req._seen = torch.zeros(self.config.vocab_size, dtype=torch.bool, device=self.device)
            req._seen[torch.tensor(req.prompt, device=self.device)] = True

    def _take_group(self, budget: int) -> list[Request]:
        """Waiting requests (at least 2) whose whole prompts fit in one chunk and together in ``budget``
        tokens: they are prefilled in one batched forward (one pass over the weights for all of them)."""
        if self._prefilling is not None:
            return []
        group, used = [], 0
        with self._lock:
            while self._waiting and len(self._rows) + len(group) < self.max_batch:
                r = self._waiting[0]
                n = len(r.prompt)
                if r.prompt_logprobs is not None or r._max_new <= 0 or n > self.prefill_chunk or used + n > budget \
                        or r._cancel:
                    break
                group.append(self._waiting.popleft())
                used += n
            if len(group) < 2:  # one request takes the ordinary (chunk-exact) path
                for r in reversed(group):
                    self._waiting.appendleft(r)
                return []
        return group

    def _prefill_group(self, group: list[Request]) -> None:
        n0 = len(self._rows)
        lengths = [len(r.prompt) for r in group]
        t = max(lengths)
        pad = self.config.pad_token_id or 0
        ids = torch.full((len(group), t), pad, dtype=torch.long)
        mask = torch.zeros(len(group), t, dtype=torch.long)
        for i, r in enumerate(group):
            self._init(r, n0 + i)
            ids[i, t - lengths[i]:] = torch.tensor(r.prompt)  # left-padded, as generate batches prompts
            mask[i, t - lengths[i]:] = 1
        self.cache.reserve(t)
        view = _GroupCache(self.cache, [n0 + i for i in range(len(group))], lengths, t)
        h = self.model.model(ids.to(self.device), mask.to(self.device) if min(lengths) < t else None, None, view,
                             keep_last=1)
        logits = self.model.logits(h)[:, -1]  # [g,V]
        for r in group:
            r._filled = r._cached = len(r.prompt)
            self.prompt_tokens += len(r.prompt)
            # Rows are joined before the tokens are picked so that a row failing now leaves the pool packed.
            self._rows.append(r)
            self._last.append(-1)
        for r, tok in zip(group, self._pick(group, logits)):
            if not r.done:
                self._last[self._rows.index(r)] = tok
                self._take(r, tok)

    def _prefill_chunk(self) -> None:
        req = self._prefilling
        start, n = req._filled, len(req.prompt)
        # The same chunk boundaries as generate.prefill (every chunk starts at a multiple of the size).
        end = min(n, start + self.prefill_chunk)
        ids = torch.tensor(req.prompt[start:end], dtype=torch.long, device=self.device)[None]  # [1,t]
        self.cache.reserve(end)
        view = _RowCache(self.cache, req._slot, start)
        want = req.prompt_logprobs is not None
        h = self.model.model(ids, None, None, view, keep_last=0 if want else 1)
        last = None
        if want:
            logits = self.model.logits(h)[0]  # [t,V]
            self._record_prompt_logprobs(req, logits, start, end)
            last = logits[-1:]
        elif end == n:
            last = self.model.logits(h)[:, -1]  # [1,V]: the head runs on the final chunk only
        req._filled = req._cached = end
        self.prompt_tokens += end - start
        if end < n:
            return
        self._prefilling = None
        if req._max_new <= 0:
            req._slot = -1
            self._finish(req, LENGTH)
            return
        tok = self._pick([req], last)[0]
        self._rows.append(req)
        self._last.append(tok)
        self._take(req, tok)

    def _record_prompt_logprobs(self, req: Request, logits: torch.Tensor, start: int, end: int) -> None:
        k = req.prompt_logprobs
        lp = torch.log_softmax(logits.float(), dim=-1)  # [t,V]
        if start == 0:
            req.prompt_token_logprobs.append(None)
            req.prompt_top_logprobs.append(None)
        # Position i predicts prompt token i + 1; the chunk's last position predicts the next chunk's
        # first token (or, at the end of the prompt, the first generated token: not recorded here).
        targets = req.prompt[start + 1:end + 1]
        if not targets:
            return
        rows = lp[: len(targets)]
        chosen = rows.gather(1, torch.tensor(targets, device=rows.device)[:, None])[:, 0].tolist()
        req.prompt_token_logprobs.extend(chosen)
        if k:
            vals, idx = torch.topk(rows, k, dim=-1)
            for v, i in zip(vals.tolist(), idx.tolist()):
                req.prompt_top_logprobs.append(list(zip(i, v)))
        else:
            req.prompt_top_logprobs.extend([] for _ in targets)

    def _decode(self) -> None:
        rows = list(self._rows)
        dev = self.device
        tokens = torch.tensor(self._last, dtype=torch.long, device=dev)
        positions = torch.tensor([len(r.prompt) + len(r.tokens) - 1 for r in rows], dtype=torch.long, device=dev)
        self.cache.reserve(int(positions.max()) + 1)
        logits = _decode_forward(self.model, self.cache, tokens, positions)
        for r in rows:
            r._cached += 1
        picked = self._pick(rows, logits)
        for r, tok in zip(rows, picked):
            if r.done:
                continue
            self._last[self._rows.index(r)] = tok
            self._take(r, tok)

    def _pick(self, reqs: list[Request], logits: torch.Tensor) -> list[int]:
        """Choose the next token of every row of ``logits`` [n, V] (rows with non-finite logits fail)."""
        out: list[int | None] = [None] * len(reqs)
        finite = torch.isfinite(logits.float().sum(-1)).tolist()  # one cheap screen per row
        plain = [i for i, r in enumerate(reqs) if finite[i] and r.params.greedy and r._seen is None]
        if plain:
            # One argmax for every plain greedy row (no copy of the [n, V] logits when all rows are).
            rows = logits if len(plain) == len(reqs) else logits.index_select(0, torch.tensor(plain, device=logits.device))
            for i, t in zip(plain, argmax(rows).tolist()):
                out[i] = t
        for i, r in enumerate(reqs):
            if not finite[i]:
                r.error = FloatingPointError(f"non-finite logits for request {r.id} at its token {len(r.tokens)}")
                continue
            if out[i] is None:
                seen = r._seen[None] if r._seen is not None else None
                out[i] = int(sample_next(logits[i:i + 1], r.params, r._generator, seen)[0])
            if r.logprobs is not None:
                lp = torch.log_softmax(logits[i].float(), dim=-1)
                r.token_logprobs.append(float(lp[out[i]]))
                if r.logprobs:
                    vals, idx = torch.topk(lp, r.logprobs)
                    r.top_logprobs.append(list(zip(idx.tolist(), vals.tolist())))
                else:
                    r.top_logprobs.append([])
        for i, r in enumerate(reqs):
            if out[i] is None:
                self._remove(r, ERROR)
        return [t if t is not None else -1 for t in out]

    def _take(self, req: Request, tok: int) -> None:
        """Record a new token of a running row, tell the listener, and finish the row if it is done."""
        if tok < 0 or req.done:
            return
        req.tokens.append(tok)
        self.generated_tokens += 1
        if req._seen is not None:
            req._seen[tok] = True
        if req.t_first is None:
            req.t_first = time.monotonic()
        self._emit(req, "token")
        if tok in req.stop_token_ids:
            self._remove(req, STOP)
        elif len(req.tokens) >= req._max_new:
            self._remove(req, LENGTH)
