"""KV caches: small objects outside the modules, one interface for every layer kind.

Every cache addresses tokens by *slot*: the index of the token in the (padded) batch sequence, the
same for every row. Masks are built from slots (causal ``k <= q``, sliding ``q - k < W``) and the 2-D
padding mask, which is how left-padded batches stay exact.

* :class:`FullCache` keeps every slot (preallocated, grown in chunks).
* :class:`SlidingCache` is a ring buffer of ``window + slack`` slots: a decoded token is written into
  the ring and then attends over it, and a query sees itself plus ``window - 1`` earlier tokens.
  ``slack`` lets speculative decoding roll back that many tokens.
* KV-sharing consumer layers have no cache at all: they attend over their producer's keys/values.
"""

from __future__ import annotations

import torch

from gemma4.model.config import FULL, SLIDING, Gemma4Config


class LayerCache:
    """Interface: ``update`` appends keys/values and returns what the new queries attend over."""

    length: int = 0  # slots written so far

    def key_slots(self, t: int, device: torch.device) -> torch.Tensor:
        """Slots of the keys ``update`` will return when called with ``t`` new tokens (-1 = empty)."""
        raise NotImplementedError

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """k, v: [B, Nkv, T, hd]. Returns keys/values [B, Nkv, S, hd] ordered as ``key_slots``."""
        raise NotImplementedError

    def sees_all_slots(self) -> bool:
        """Whether one new token may attend to every slot ``update`` returns (no empty or out-of-window
        slot): then it needs no mask. Decided from bookkeeping, never from tensor values."""
        return False

    def decode_slot(self, b: int, heads: int, dk: int, dv: int, dtype: torch.dtype, device) -> tuple:
        """Room for one new token, for code that writes it itself (the CPU fast path's one-call decode step):
        returns (k, v, slot, keys) with k/v the buffers [B, heads, capacity, d], ``slot`` the index the new
        key/value go to, and ``keys`` how many leading slots ``update`` would have returned (what the
        token attends over, ordered as ``key_slots``). Counts the token as written. None where this
        cache cannot say (then use ``update``)."""
        return None

    def rollback(self, n: int) -> None:
        raise NotImplementedError

    def nbytes(self) -> int:
        raise NotImplementedError


class FullCache(LayerCache):
    def sees_all_slots(self) -> bool:
        return True

    def __init__(self, chunk: int = 256, max_length: int | None = None):
        self.chunk, self.max_length = chunk, max_length
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None
        self.length = 0

    def key_slots(self, t: int, device: torch.device) -> torch.Tensor:
        return torch.arange(self.length + t, device=device)

    def _reserve(self, b: int, h: int, dk: int, dv: int, dtype, device, need: int) -> None:
        cap = 0 if self.k is None else self.k.shape[2]
        if need <= cap:
            return
        # Grow in whole chunks so decoding reallocates once every `chunk` tokens, not every token.
        new_cap = -(-need // self.chunk) * self.chunk
        if self.max_length is not None:
            new_cap = min(max(new_cap, need), max(self.max_length, need))
        nk = torch.empty(b, h, new_cap, dk, dtype=dtype, device=device)
        nv = torch.empty(b, h, new_cap, dv, dtype=dtype, device=device)
        if self.k is not None:
            nk[:, :, : self.length] = self.k[:, :, : self.length]
            nv[:, :, : self.length] = self.v[:, :, : self.length]
        self.k, self.v = nk, nv

    def decode_slot(self, b, heads, dk, dv, dtype, device):
        self._reserve(b, heads, dk, dv, dtype, device, self.length + 1)
        self.length += 1
        return self.k, self.v, self.length - 1, self.length

    def update(self, k, v):
        b, h, t, d = k.shape
        self._reserve(b, h, d, v.shape[-1], k.dtype, k.device, self.length + t)
        self.k[:, :, self.length : self.length + t] = k
        self.v[:, :, self.length : self.length + t] = v
        self.length += t
        return self.k[:, :, : self.length], self.v[:, :, : self.length]

    def rollback(self, n: int) -> None:
        if not 0 <= n <= self.length:
            raise ValueError(f"cannot roll back {n} tokens from a cache holding {self.length}")
        self.length -= n

    def nbytes(self) -> int:
        """Bytes holding live tokens (the preallocated tail is excluded; see ``reserved_nbytes``)."""
        if self.k is None:
            return 0
        per_slot = (self.k[:, :, :1].numel() * self.k.element_size() + self.v[:, :, :1].numel() * self.v.element_size())
        return per_slot * self.length

    def reserved_nbytes(self) -> int:
        if self.k is None:
            return 0
        return self.k.numel() * self.k.element_size() + self.v.numel() * self.v.element_size()


class SlidingCache(LayerCache):
    def sees_all_slots(self) -> bool:
        # Before the ring wraps, the slots are 0..length, all filled and all inside the window.
        return self.length + 1 <= self.window

    def __init__(self, window: int, slack: int = 0):
        self.window, self.slack = window, slack
        self.capacity = window + slack
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None
        self.length = 0

    def _ring_slots(self, length: int, device) -> torch.Tensor:
        # Ring index j holds the largest slot s < length with s % capacity == j (or nothing).
        j = torch.arange(self.capacity, device=device)
        s = length - 1 - torch.remainder(length - 1 - j, self.capacity)
        return torch.where(s >= 0, s, torch.full_like(s, -1))

    def key_slots(self, t: int, device: torch.device) -> torch.Tensor:
        if t == 1 and self.capacity > 0:
            # Decode: the new token is written into the ring first, then the ring is attended over
            # (only its filled prefix while the ring has not wrapped yet).
            if self.length < self.capacity:
                return torch.arange(self.length + 1, device=device)
            return self._ring_slots(self.length + 1, device)
        kept = min(self.length, self.capacity)
        return torch.arange(self.length - kept, self.length + t, device=device)

    def _alloc(self, b: int, h: int, dk: int, dv: int, dtype, device) -> None:
        if self.k is None:
            self.k = torch.zeros(b, h, max(self.capacity, 1), dk, dtype=dtype, device=device)
            self.v = torch.zeros(b, h, max(self.capacity, 1), dv, dtype=dtype, device=device)

    def decode_slot(self, b, heads, dk, dv, dtype, device):
        if self.capacity == 0:
            return None
        self._alloc(b, heads, dk, dv, dtype, device)
        # The new token goes into the ring first and then attends over it: the filled prefix until the
        # ring wraps, the whole ring after.
        j = self.length % self.capacity
        self.length += 1
        return self.k, self.v, j, min(self.length, self.capacity)

    def update(self, k, v):
        b, h, t, d = k.shape
        self._alloc(b, h, d, v.shape[-1], k.dtype, k.device)
        if t == 1 and self.capacity > 0:
            kb, vb, j, keys = self.decode_slot(b, h, d, v.shape[-1], k.dtype, k.device)
            kb[:, :, j] = k[:, :, 0]
            vb[:, :, j] = v[:, :, 0]
            return kb[:, :, :keys], vb[:, :, :keys]
        kept = min(self.length, self.capacity)
        order = torch.remainder(torch.arange(self.length - kept, self.length, device=k.device), max(self.capacity, 1))
        k_all = torch.cat([self.k[:, :, order], k], dim=2)
        v_all = torch.cat([self.v[:, :, order], v], dim=2)
        # Store the newest `capacity` tokens at their ring positions.
        n = min(t, self.capacity)
        if n > 0:
            slots = torch.arange(self.length + t - n, self.length + t, device=k.device)
            idx = torch.remainder(slots, self.capacity)
            self.k[:, :, idx] = k[:, :, t - n :]
            self.v[:, :, idx] = v[:, :, t - n :]
        self.length += t
        return k_all, v_all

    def rollback(self, n: int) -> None:
        if not 0 <= n <= min(self.slack, self.length):
            raise ValueError(
                f"a sliding cache with slack {self.slack} can roll back at most {min(self.slack, self.length)} tokens, asked {n}"
            )
        self.length -= n

    def nbytes(self) -> int:
        if self.k is None:
            return 0
        return self.k.numel() * self.k.element_size() + self.v.numel() * self.v.element_size()

    reserved_nbytes = nbytes


class ModelCache:
    """The caches of one model: a :class:`LayerCache` per K/V-producing layer, ``None`` for consumers."""

    def __init__(self, config: Gemma4Config, *, slack: int = 0, chunk: int = 256, max_length: int | None = None):
        self.config = config
        modes = config.kv_sharing_modes
        self.layers: list[LayerCache | None] = []
        for i, t in enumerate(config.layer_types):
            if modes[i] == "reuse":
                self.layers.append(None)
            elif t == SLIDING:
                self.layers.append(SlidingCache(config.sliding_window, slack=slack))
            else:
                self.layers.append(FullCache(chunk=chunk, max_length=max_length))

    @property
    def length(self) -> int:
        return next(c.length for c in self.layers if c is not None)

    def first_of_type(self, layer_type: str) -> LayerCache | None:
        for c, t in zip(self.layers, self.config.layer_types):
            if c is not None and t == layer_type:
                return c
        return None

    def rollback(self, n: int) -> None:
        for c in self.layers:
            if c is not None:
                c.rollback(n)

    def nbytes(self) -> int:
        return sum(c.nbytes() for c in self.layers if c is not None)

    def nbytes_by_type(self) -> dict[str, int]:
        out = {SLIDING: 0, FULL: 0}
        for c, t in zip(self.layers, self.config.layer_types):
            if c is not None:
                out[t] += c.nbytes()
        return out
