"""Attention backends: ``eager`` (the reference, default), ``sdpa`` (PyTorch's fused kernel) and two
experimental approximations, ``block_sparse`` and ``linear``; all listed in ``ATTENTION_BACKENDS``.

Both follow the backend signature ``fn(q [B,N,T,D], k [B,K,S,D], v, mask [B|1,1,T,S] bool or None,
scale, softcap, ctx)`` and are selected with ``model.set_attention_backend(name)``.

``block_sparse`` — each query block (``block`` slots) attends to a fixed set of key blocks:
  * full-attention layers: the ``local`` most recent blocks (its own included), the first
    ``global_blocks`` blocks (attention sinks) and every ``stride``-th block ("summary" blocks,
    as in the Sparse Transformer's fixed pattern). This is an approximation of full attention.
  * sliding layers: exactly the blocks that intersect the window, so the result is exact (the
    sliding window is already sparse; the gain is not computing the masked-out scores).
  The pattern is defined on slots, so cached decoding sees the same keys as a full forward. Long
  prefills gather the selected key blocks (cost O(T * selected keys) instead of O(T * S)); short
  inputs and decoding use eager attention with the pattern folded into the mask.

``linear`` — causal linear attention with the feature map phi(x) = elu(x) + 1:
  ``o_t = sum_s phi(q_t).phi(k_s) v_s / sum_s phi(q_t).phi(k_s)`` over the keys the mask allows.
  Long prefills use a chunked form: per-chunk sums phi(k) v^T, their prefix sums for every earlier
  chunk, and exact quadratic terms for the query's own chunk. Sliding layers keep their window
  exactly: a window of W keys is the difference of two prefix sums plus one partially visible
  chunk (the chunk size divides W). It ignores ``scale`` and ``softcap`` (phi is not exp), so it is
  an approximation everywhere. Padding is applied per key (left padding); query rows that see no
  valid key output 0 instead of eager's "attend to yourself", which only affects padding rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

__all__ = ["ATTENTION_BACKENDS", "AttnContext", "BlockSparse", "LinearAttention", "eager_attention", "sdpa_attention",
           "block_sparse_attention", "linear_attention", "register", "set_attention_backend"]


# ----------------------------------------------------------------------------- attention backends
@dataclass
class AttnContext:
    """What a backend may need beyond q/k/v: the layer type and the slots behind the mask."""

    layer_type: str
    window: int | None
    q_slots: torch.Tensor  # [T]
    k_slots: torch.Tensor  # [S]


def eager_attention(q, k, v, mask, scale, softcap, ctx):
    """Reference path. q [B,N,T,D], k/v [B,K,S,D], mask bool [B|1,1,T,S] or None -> [B,N,T,D]."""
    b, n, t, d = q.shape
    kh = k.shape[1]
    g = n // kh
    out_dtype = q.dtype
    if out_dtype == torch.bfloat16 and q.device.type == "cpu" and t <= _F32_DECODE_ROWS:
        # Decoding in bf16 on a CPU: float32 products instead. oneDNN builds (and caches) a new bf16
        # primitive for every key length, i.e. every step: 5x the time of the float32 GEMM of the same
        # shape here (200 vs 42 us on Gemma 3 270M), and a cache that grows by ~1 MiB per length.
        q, k, v = q.float(), k.float(), v.float()
    # GQA without copying K/V: query head j belongs to KV head j // g (contiguous groups).
    s = torch.matmul(q.reshape(b, kh, g * t, d), k.transpose(-1, -2)) * scale  # [B,K,G*T,S]
    if softcap:
        s = torch.tanh(s / softcap) * softcap
    s = s.view(b, kh, g, t, -1)
    if mask is not None:
        s = s.masked_fill(~mask[:, :, None], torch.finfo(s.dtype).min)
    # Softmax in float32 then back to the activation dtype, as the reference does.
    p = torch.softmax(s, dim=-1, dtype=torch.float32).to(q.dtype)
    o = torch.matmul(p.view(b, kh, g * t, -1), v)  # [B,K,G*T,D]
    return o.view(b, n, t, v.shape[-1]).to(out_dtype)


_F32_DECODE_ROWS = 4  # query tokens up to which bf16 CPU attention runs its products in float32


def sdpa_attention(q, k, v, mask, scale, softcap, ctx):
    if softcap:  # SDPA cannot soft-cap scores
        return eager_attention(q, k, v, mask, scale, softcap, ctx)
    if k.shape[1] != q.shape[1]:
        if _SDPA_GQA:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=True)
        g = q.shape[1] // k.shape[1]
        k = k.repeat_interleave(g, dim=1)
        v = v.repeat_interleave(g, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


_SDPA_GQA = "enable_gqa" in (F.scaled_dot_product_attention.__doc__ or "")


def set_attention_backend(layers, name: str) -> None:
    if name not in ATTENTION_BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; available: {', '.join(ATTENTION_BACKENDS)}")
    for layer in layers:
        layer.self_attn.backend = name


def _contiguous(slots: torch.Tensor) -> bool:
    """True when the slots are consecutive (a prefill, or a full cache): the fast paths need it."""
    if slots.numel() < 2:
        return True
    return bool(slots[0] >= 0) and bool((slots[1:] - slots[:-1] == 1).all())


# ----------------------------------------------------------------------------- block sparse
@dataclass(frozen=True)
class BlockSparse:
    block: int = 64
    local: int = 2  # most recent key blocks, the query's own block included
    global_blocks: int = 1  # first blocks of the sequence
    stride: int = 8  # every stride-th block (blocks with index % stride == stride - 1)
    min_fast: int = 128  # shorter query runs use the masked eager path
    chunk_bytes: int = 64 << 20  # bound on the gathered keys per step

    def __post_init__(self):
        if min(self.block, self.local, self.stride) < 1 or self.global_blocks < 0:
            raise ValueError(f"invalid block-sparse pattern {self}")

    def __call__(self, q, k, v, mask, scale, softcap, ctx):
        t = q.shape[2]
        if t >= self.min_fast and t >= self.block and _contiguous(ctx.q_slots) and _contiguous(ctx.k_slots):
            return self._fast(q, k, v, mask, scale, softcap, ctx)
        if ctx.window is None:  # sliding layers: the window mask is the (exact) sparsity pattern
            pat = self.pattern(ctx.q_slots, ctx.k_slots)[None, None]
            mask = pat if mask is None else mask & pat
        return eager_attention(q, k, v, mask, scale, softcap, ctx)

    def pattern(self, q_slots: torch.Tensor, k_slots: torch.Tensor) -> torch.Tensor:
        """Token-level pattern [T, S] of a full-attention layer (before causal/padding masking)."""
        qb = torch.div(q_slots, self.block, rounding_mode="floor")[:, None]
        kb = torch.div(k_slots, self.block, rounding_mode="floor")[None, :]
        return ((qb - kb) < self.local) | (kb < self.global_blocks) | (kb % self.stride == self.stride - 1)

    def _selected_blocks(self, qb: torch.Tensor, kb_lo: int, kb_hi: int, window: int | None) -> torch.Tensor:
        """qb [Q] absolute query block ids -> [Q, M] absolute key block ids (-1 = padding)."""
        bs = self.block
        if window is not None:
            lo = torch.div(qb * bs - window + 1, bs, rounding_mode="floor")
            m = (window + bs - 2) // bs + 1
            sel = lo[:, None] + torch.arange(m, device=qb.device)[None]
            sel = torch.where(sel <= qb[:, None], sel, torch.full_like(sel, -1))
        else:
            rows = []
            for b in qb.tolist():
                ids = set(range(max(b - self.local + 1, 0), b + 1)) | set(range(min(self.global_blocks, b + 1)))
                ids |= set(range(self.stride - 1, b + 1, self.stride))
                rows.append(sorted(ids))
            m = max(len(r) for r in rows)
            sel = torch.tensor([r + [-1] * (m - len(r)) for r in rows], device=qb.device, dtype=torch.long)
        return torch.where((sel >= kb_lo) & (sel <= kb_hi), sel, torch.full_like(sel, -1))

    def _fast(self, q, k, v, mask, scale, softcap, ctx):
        b, n, t, d = q.shape
        kh, s, dv = k.shape[1], k.shape[2], v.shape[-1]
        g, bs = n // kh, self.block
        q0, k0 = int(ctx.q_slots[0]), int(ctx.k_slots[0])
        fq, fk = q0 % bs, k0 % bs
        nqb, nkb = -(-(fq + t) // bs), -(-(fk + s) // bs)
        # Pad both axes to whole blocks aligned on slot multiples of `block`.
        qp = F.pad(q, (0, 0, fq, nqb * bs - fq - t)).view(b, kh, g, nqb, bs, d)
        kp = F.pad(k, (0, 0, fk, nkb * bs - fk - s)).view(b, kh, nkb, bs, d)
        vp = F.pad(v, (0, 0, fk, nkb * bs - fk - s)).view(b, kh, nkb, bs, dv)
        kb_lo = k0 // bs
        qb = q0 // bs + torch.arange(nqb, device=q.device)
        sel = self._selected_blocks(qb, kb_lo, kb_lo + nkb - 1, ctx.window)  # [nQB, M] absolute
        rel = (sel - kb_lo).clamp(min=0)  # [nQB, M] block index into kp/vp
        m_sel = sel.shape[1]
        out = q.new_empty(b, kh, g, nqb, bs, dv)
        per_qblock = b * kh * m_sel * bs * (d + dv + g * bs) * 4
        step = max(1, self.chunk_bytes // max(per_qblock, 1))
        r_q = torch.arange(bs, device=q.device)
        for i0 in range(0, nqb, step):
            i1 = min(nqb, i0 + step)
            c = i1 - i0
            kc = kp[:, :, rel[i0:i1]].reshape(b, kh, c, m_sel * bs, d)
            vc = vp[:, :, rel[i0:i1]].reshape(b, kh, c, m_sel * bs, dv)
            sc = torch.einsum("bkgcqd,bkcsd->bkgcqs", qp[:, :, :, i0:i1], kc) * scale
            if softcap:
                sc = torch.tanh(sc / softcap) * softcap
            # Index of every query row / key column in the caller's (unpadded) tensors.
            qi = (torch.arange(i0, i1, device=q.device)[:, None] * bs + r_q[None]) - fq  # [c, bs]
            ki = (rel[i0:i1, :, None] * bs + torch.arange(bs, device=q.device)).reshape(c, -1) - fk  # [c, M*bs]
            ok = (sel[i0:i1] >= 0).repeat_interleave(bs, dim=1) & (ki >= 0) & (ki < s)  # [c, M*bs]
            ok = ok[:, None, :] & ((qi >= 0) & (qi < t))[:, :, None]  # [c, bs, M*bs]
            if mask is not None:
                mm = mask[:, 0][:, qi.clamp(0, t - 1)[:, :, None], ki.clamp(0, s - 1)[:, None, :]]  # [B', c, bs, M*bs]
                ok = ok[None] & mm
            else:
                ok = ok[None]
            sc = sc.masked_fill(~ok[:, None, None], torch.finfo(sc.dtype).min)
            p = torch.softmax(sc, dim=-1, dtype=torch.float32).to(q.dtype)
            out[:, :, :, i0:i1] = torch.einsum("bkgcqs,bkcse->bkgcqe", p, vc)
        out = out.view(b, n, nqb * bs, dv)[:, :, fq : fq + t]
        return out.contiguous()


# ----------------------------------------------------------------------------- linear
def _phi(x: torch.Tensor) -> torch.Tensor:
    return F.elu(x.float()) + 1.0


def _pick_chunk(window: int | None, chunk: int) -> int:
    if window is None:
        return chunk
    c = min(chunk, window)
    while window % c:  # the chunk must divide the window for the exact sliding decomposition
        c -= 1
    return c


@dataclass(frozen=True)
class LinearAttention:
    chunk: int = 64
    min_fast: int = 128

    def __call__(self, q, k, v, mask, scale, softcap, ctx):
        t = q.shape[2]
        if t >= self.min_fast and _contiguous(ctx.q_slots) and _contiguous(ctx.k_slots):
            return self._chunked(q, k, v, mask, ctx)
        return self._quadratic(q, k, v, mask)

    @staticmethod
    def _quadratic(q, k, v, mask):
        """Reference form: explicit [T, S] kernel matrix, masked, row-normalised."""
        b, n, t, d = q.shape
        kh = k.shape[1]
        g = n // kh
        a = torch.matmul(_phi(q).reshape(b, kh, g * t, d), _phi(k).transpose(-1, -2))  # [B,K,G*T,S]
        if mask is not None:
            a = a.view(b, kh, g, t, -1) * mask[:, :, None]
            a = a.reshape(b, kh, g * t, -1)
        o = torch.matmul(a, v.float()) / a.sum(-1, keepdim=True).clamp_min(1e-30)
        return o.view(b, n, t, v.shape[-1]).to(q.dtype)

    def _key_valid(self, mask, ctx, t: int, s: int) -> torch.Tensor | None:
        """Per-key padding validity [B', S]: read from the row of a query that must see the key if it
        is a real token (the newest query within the key's window)."""
        if mask is None:
            return None
        q0 = int(ctx.q_slots[0])
        w = ctx.window if ctx.window is not None else 1 << 40
        qslot = torch.clamp(ctx.k_slots + (w - 1), max=q0 + t - 1)
        qi = (qslot - q0).clamp(0, t - 1)
        return mask[:, 0, qi, torch.arange(s, device=mask.device)]

    def _chunked(self, q, k, v, mask, ctx):
        b, n, t, d = q.shape
        kh, s, dv = k.shape[1], k.shape[2], v.shape[-1]
        g = n // kh
        c = _pick_chunk(ctx.window, self.chunk)
        q0, k0 = int(ctx.q_slots[0]), int(ctx.k_slots[0])
        base = k0 - k0 % c  # chunk j covers slots [base + j*c, base + (j+1)*c)
        fk = k0 - base
        nk = -(-(fk + s) // c)
        fq = (q0 - base) % c
        jq0 = (q0 - base) // c  # key-chunk index of the first query chunk
        nq = -(-(fq + t) // c)
        pk = _phi(k)
        valid = self._key_valid(mask, ctx, t, s)
        if valid is not None:
            pk = pk * valid[:, None, :, None].to(pk.dtype)
        pk = F.pad(pk, (0, 0, fk, nk * c - fk - s)).view(-1, kh, nk, c, d)  # zero features = no key
        vv = F.pad(v.float(), (0, 0, fk, nk * c - fk - s)).view(b, kh, nk, c, dv)
        pq = F.pad(_phi(q), (0, 0, fq, nq * c - fq - t)).view(b, kh, g, nq, c, d)
        kv = torch.einsum("bkjcd,bkjce->bkjde", pk, vv)  # per-chunk sums [B,K,nk,D,Dv]
        z = pk.sum(3)  # [B,K,nk,D]
        # Exclusive prefix sums: P[j] = sum of chunks < j (P has nk + 1 entries).
        P = F.pad(kv.cumsum(2), (0, 0, 0, 0, 1, 0))
        Pz = F.pad(z.cumsum(2), (0, 0, 1, 0))
        J = jq0 + torch.arange(nq, device=q.device)  # key-chunk index of each query chunk
        Jc = J.clamp(max=nk)
        if ctx.window is None:
            lo = torch.zeros_like(Jc)
        else:
            m = ctx.window // c
            lo = (J - m + 1).clamp(min=0, max=nk)  # first fully visible chunk
        S_state = P[:, :, Jc] - P[:, :, lo]  # [B,K,nq,D,Dv]: chunks lo..J-1
        Z_state = Pz[:, :, Jc] - Pz[:, :, lo]
        num = torch.einsum("bkgjcd,bkjde->bkgjce", pq, S_state)
        den = torch.einsum("bkgjcd,bkjd->bkgjc", pq, Z_state)
        r = torch.arange(c, device=q.device)
        # Own chunk: causal within the chunk.
        own = J.clamp(max=nk - 1)
        a = torch.einsum("bkgjcd,bkjed->bkgjce", pq, pk[:, :, own]) * (r[:, None] >= r[None, :])
        a = a * (J < nk)[:, None, None].to(a.dtype)
        num = num + torch.einsum("bkgjce,bkjef->bkgjcf", a, vv[:, :, own])
        den = den + a.sum(-1)
        if ctx.window is not None:
            # The chunk m back is visible only from one key after the query's own offset.
            pj = J - ctx.window // c
            has = (pj >= 0) & (pj < nk)
            pjc = pj.clamp(0, nk - 1)
            a = torch.einsum("bkgjcd,bkjed->bkgjce", pq, pk[:, :, pjc]) * (r[None, :] > r[:, None])
            a = a * has[:, None, None].to(a.dtype)
            num = num + torch.einsum("bkgjce,bkjef->bkgjcf", a, vv[:, :, pjc])
            den = den + a.sum(-1)
        o = num / den.clamp_min(1e-30)[..., None]  # rows with no visible key -> 0
        o = o.reshape(b, n, nq * c, dv)[:, :, fq : fq + t]
        return o.to(q.dtype).contiguous()


block_sparse_attention = BlockSparse()
linear_attention = LinearAttention()


ATTENTION_BACKENDS: dict[str, Callable] = {
    "eager": eager_attention, "sdpa": sdpa_attention,
    "block_sparse": block_sparse_attention, "linear": linear_attention,
}


def register(name: str, backend) -> None:
    """Make a backend of your own selectable with ``model.set_attention_backend(name)`` (an explicit
    call: importing this package changes no registry)."""
    ATTENTION_BACKENDS[name] = backend
