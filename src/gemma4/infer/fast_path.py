"""CPU decode fast path: linear weights repacked into oneDNN's blocked layout.

Decoding one token is a chain of matrix-vector products, bound by how fast the weights stream from
memory. On x86 CPUs PyTorch's default ``F.linear`` reaches about half the memory bandwidth for these
shapes (measured on the benchmark machine, one thread: bf16 ~16 GB/s, fp32 ~17 GB/s for the
262144 x 640 output head), while oneDNN's linear on a weight reordered once into its blocked layout
reaches ~30-35 GB/s: about twice the decode speed (benchmarks/generate.py).

:func:`use_fast_path` swaps every plain ``nn.Linear`` in the decoder layers for a :class:`PackedLinear`
holding only the reordered weight (same memory). The output head keeps its plain weight (a tied head
reads the embedding table itself: nothing is held twice); a bf16 row being decoded multiplies it with
``torch.mv``, which streams the 262144 x 640 table ~1.4x faster than oneDNN's packed copy did on an
AVX512-BF16 CPU (31 against 41-48 ms, one thread, cold cache); ``head="pack"`` still gives the packed copy.
Quantized and bf16-weight models take the compiled kernels of :mod:`gemma4.quant.native` instead, and where
every layer runs on them (see :class:`DecodeStack`) a decoded token runs all layers in one native call.
:func:`use_plain_path` restores the original modules. A packed model computes the same function (bf16
results were bit-identical in our checks; fp32 differs by summation order, ~1e-6 relative) but
cannot be saved or trained while packed.
"""

from __future__ import annotations

import ctypes
import os
import sys
import threading
from contextlib import contextmanager

import torch
from torch import nn
import torch.nn.functional as F

from gemma4.model.attention import ATTENTION_BACKENDS
from gemma4.model.cache import FullCache, SlidingCache
from gemma4.model.decoder import MLP, Attention, DecoderLayer, RMSNorm, apply_rope, gelu_tanh
from gemma4.quant import Bf16Linear, Int4Linear, Int8Linear, QuantWeight, native

_DTYPES = (torch.float32, torch.bfloat16)
_QUANT_LINEARS = (Int4Linear, Int8Linear, Bf16Linear)
ONEDNN_CACHE_CAPACITY = 64


def configure_onednn(capacity: int = ONEDNN_CACHE_CAPACITY) -> None:
    """Cap oneDNN's two primitive caches (PyTorch's ideep LRU and oneDNN's own) at ``capacity`` shapes,
    unless the user exported ``ONEDNN_PRIMITIVE_CACHE_CAPACITY`` / ``LRU_CACHE_CAPACITY`` already.

    Why: both default to 1024 entries of ~0.3-0.5 MiB here. Eager attention over a growing KV cache has
    a new key length at every decoded token, so RSS grew ~1.2 MiB per token (+226 MiB over 200 tokens of
    the 270M model) for primitives never used again. 64 bound that without evicting what decoding reuses
    (at 16, int4-g32 decode measured 4-9% slower; benchmarks/RESULTS.md). oneDNN reads the variables
    when it is first used, so this only takes effect if called before the process's first oneDNN call;
    :func:`use_fast_path` (and so ``load_pretrained``) calls it. Importing gemma4 sets nothing."""
    for var in ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY"):
        os.environ.setdefault(var, str(int(capacity)))


MMAP_THRESHOLD = 128 * 1024  # glibc's own starting value, held fixed
_MALLOC_SET = False


def configure_malloc(threshold: int = MMAP_THRESHOLD) -> bool:
    """Hold glibc's mmap threshold at ``threshold`` bytes (once per process; returns whether it is set),
    unless the user exported ``MALLOC_MMAP_THRESHOLD_`` (then glibc follows that).

    Why: glibc raises the threshold each time a large block is freed (up to 32 MiB); blocks under it then
    come from the heap, and freed heap blocks mostly stay resident. Decoding Gemma 3 270M Q4_K_M at two
    threads, RSS crept ~40 MB over the warm-up, a 128-token prefill and 128 tokens, to 1.24x the file's
    size above the interpreter-and-torch baseline; with the threshold held it stays at 1.14x. Blocks
    above it are mapped and returned at free: no decode speed change was measurable (benchmarks/RESULTS.md).
    A no-op off Linux/glibc. :func:`use_fast_path` calls it."""
    global _MALLOC_SET
    if _MALLOC_SET or "MALLOC_MMAP_THRESHOLD_" in os.environ or not sys.platform.startswith("linux"):
        return _MALLOC_SET
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    _MALLOC_SET = bool(mallopt(-3, int(threshold)))  # -3: M_MMAP_THRESHOLD (malloc.h); 1 = done
    return _MALLOC_SET


def available(dtype: torch.dtype = torch.float32) -> bool:
    """Whether this PyTorch build and CPU can run the packed path for ``dtype``."""
    if not torch.backends.mkldnn.is_available() or dtype not in _DTYPES:
        return False
    if dtype == torch.bfloat16:
        try:
            return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        except (AttributeError, RuntimeError):
            return False
    return True


def _dense(w: torch.Tensor) -> torch.Tensor:
    return w.to_dense() if w.is_mkldnn else w


_NATIVE_ROWS = 4  # tokens up to which a bf16 linear takes the native GEMV (it does not block over rows)


def _native_f32(x: torch.Tensor, other: torch.Tensor | None = None) -> bool:
    """Whether the fused float32 ops of :mod:`gemma4.quant.native` may take ``x`` (and the float tensors
    that go with it): float32 on the CPU, outside autograd (they have no backward). A model computing
    in bf16 keeps PyTorch's ops, bit-identical to the plain path."""
    return (x.dtype == torch.float32 and x.device.type == "cpu" and not x.requires_grad
            and (other is None or other.dtype == torch.float32))


def _onednn_linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    shape = x.shape
    y = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, shape[-1]), w, bias, "none", [], "")
    return y.view(*shape[:-1], y.shape[-1])


class PackedLinear(nn.Module):
    """A bias-optional linear layer whose weight lives in oneDNN's blocked layout (CPU only).

    The weight is a plain attribute, not a buffer: a oneDNN tensor cannot take part in ``.to()``,
    ``.float()`` or ``state_dict``. A fast-path model is an inference form of the model on this CPU;
    :func:`plain_path` gives back modules that can be moved, saved or trained (:meth:`restore`)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, *, pack: bool = True):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        w = weight.detach()
        # bf16 weights decode through gemma4.quant.native's GEMV where it built: float32 products streamed
        # at memory bandwidth (~2x oneDNN's packed bf16 linears at one token, measured on Gemma 3 270M).
        # It reads the plain weight, so the weight stays plain and prefill runs F.linear on it (~1.3x
        # slower than packed at 128 tokens; still AMX).
        self.native = bias is None and w.dtype == torch.bfloat16 and w.device.type == "cpu" and native.available()
        pack = pack and not self.native
        # Reordered for a batch of 1 (decode); measured as fast as other hints for 128-token prefill.
        self.w = torch.ops.mkldnn._reorder_linear_weight(w, 1) if pack else w
        self.packed = pack
        self.b = None if bias is None else bias.detach()
        self.dtype = w.dtype
        self.one_row_mv = not pack and bias is None and w.dtype == torch.bfloat16

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.native and x.numel() <= _NATIVE_ROWS * self.in_features:
            y = native.bf16_matmul(x.reshape(-1, self.in_features), self.w, checked=True)  # checked at packing
            return y.view(*x.shape[:-1], self.out_features)
        if not self.packed and self.native:
            return F.linear(x, self.w)
        if self.one_row_mv and x.numel() == self.in_features and torch.get_num_threads() == 1:
            # One bf16 row against a plain weight (the tied head while decoding): torch.mv streams the
            # matrix at ~11 GB/s here against ~7-8 GB/s for oneDNN or F.linear on the 262144 x 640 head
            # (cold cache, one thread, AVX512-BF16 CPU); fp32 is bandwidth-bound either way. torch.mv
            # runs on one thread only, so with more threads oneDNN (which splits the rows) is faster.
            return torch.mv(self.w, x.reshape(self.in_features)).view(*x.shape[:-1], self.out_features)
        return _onednn_linear(x, self.w, self.b)

    def restore(self) -> nn.Linear:
        """A plain ``nn.Linear`` with this layer's weight (dense again) and bias, frozen like the loaded model."""
        lin = nn.Linear(self.in_features, self.out_features, bias=self.b is not None, device="meta")
        lin.weight = nn.Parameter(_dense(self.w).contiguous(), requires_grad=False)
        if self.b is not None:
            lin.bias = nn.Parameter(self.b, requires_grad=False)
        return lin

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, dtype={self.dtype}"


class PackedMLP(nn.Module):
    """The gated MLP with gate and up projections fused into one packed matrix (one pass over x)."""

    def __init__(self, mlp: nn.Module):
        super().__init__()
        self.inter = mlp.gate_proj.out_features
        self.gate_up = PackedLinear(torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]).detach())
        self.native = native.available()
        self.down = PackedLinear(mlp.down_proj.weight)
        for lin in (mlp.gate_proj, mlp.up_proj, mlp.down_proj):
            lin.weight = None  # free the plain weights: the packed copies replace them

    def restore(self) -> MLP:
        """A plain :class:`gemma4.model.MLP` with the same weights (gate and up split again)."""
        hidden = self.down.out_features
        with torch.device("meta"):
            mlp = MLP(hidden, self.inter)
        gate, up = _dense(self.gate_up.w).split(self.inter)
        for lin, w in ((mlp.gate_proj, gate), (mlp.up_proj, up), (mlp.down_proj, _dense(self.down.w))):
            lin.weight = nn.Parameter(w.contiguous(), requires_grad=False)
        return mlp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(_gelu_mul(self.gate_up(x), self.inter, self.native))


def _gelu_mul(gu: torch.Tensor, inter: int, use_native: bool) -> torch.Tensor:
    """gelu_tanh(gate) * up of a fused gate/up projection's output [..., 2 * inter]."""
    if use_native and _native_f32(gu):
        return native.gelu_mul(gu, inter, checked=True)
    g, u = gu.split(inter, dim=-1)
    return gelu_tanh(g) * u


class FastRMSNorm(nn.Module):
    """RMSNorm with its float32 scale (``w`` or ``1 + w``) computed once instead of at every call;
    otherwise the same operations in the same order as :class:`gemma4.model.RMSNorm`."""

    def __init__(self, norm: RMSNorm):
        super().__init__()
        self.eps, self.offset = norm.eps, norm.offset
        self.weight = norm.weight  # the same parameter: state_dict and code that reads it see no change
        w = None if norm.weight is None else norm.weight.detach().float()
        self.register_buffer("scale", None if w is None else (w + norm.offset if norm.offset else w),
                             persistent=False)
        self.native = native.available()

    def restore(self) -> RMSNorm:
        """A plain :class:`gemma4.model.RMSNorm` holding the same weight parameter."""
        dim = 1 if self.weight is None else self.weight.shape[0]
        with torch.device("meta"):
            norm = RMSNorm(dim, self.eps, with_scale=self.weight is not None, offset=self.offset)
        norm.weight = self.weight
        return norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.native and _native_f32(x, self.scale):  # one C call instead of seven tensor ops
            return native.rmsnorm(x, self.scale, self.eps, checked=True)
        xf = x.float()
        xf = xf * torch.pow(xf.pow(2).mean(-1, keepdim=True) + self.eps, -0.5)
        if self.scale is not None:
            xf = xf * self.scale
        return xf.type_as(x)


class QuantPackedLinear(nn.Module):
    """A quantized linear layer reduced to its CPU kernel call (:mod:`gemma4.quant.native`'s int8-activation
    kernels where they built here, else int4: ``_weight_int4pack_mm_for_cpu``, int8:
    ``_weight_int8pack_mm``). The modules in :mod:`gemma4.quant` re-check layout, device and
    dtype and reshape around every call; at one token per step that bookkeeping costs as much as a
    small matmul, so it is settled once here. Shares the source module's tensors (no copy).

    ``own``: the source module becomes this module's child ``src`` (so ``state_dict`` and ``.to()`` see
    it once, and :meth:`restore` gives it back); False for a tied head, whose table belongs to the
    embedding."""

    def __init__(self, src: QuantWeight, *, upcast: bool = False, own: bool = True):
        super().__init__()
        self.out_features, self.in_features = src.out_features, src.in_features
        self.scheme = src.scheme
        self.group_size = getattr(src, "group_size", None) or 0  # int4's; int8: 32 = float16 block scales
        self.bf16 = src.scheme == "bf16"  # bf16 weights: the native float32 GEMM, any number of rows
        self.int4 = src.scheme == "int4"
        # Aliases of the source's tensors, not saved: the kernel call reads them without attribute hops.
        self.native, qweight, scales = src.kernel_tensors()
        self.register_buffer("qweight", qweight, persistent=False)
        self.register_buffer("scales", scales, persistent=False)
        self.upcast = upcast  # return float32 (the output head: see QuantPackedHead)
        self.src = src if own else None

    def restore(self) -> QuantWeight:
        """The quantized module this one runs (unchanged: the kernel call shares its tensors)."""
        if self.src is None:
            raise RuntimeError("this packed layer does not own its weight (a tied head): restore the head instead")
        return self.src

    @staticmethod
    def supported(src: nn.Module) -> bool:
        """Whether ``src`` (a 2-D quantized weight) can run the CPU kernel here."""
        return isinstance(src, QuantWeight) and src.kernel_ready()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if self.native:  # reads float32/bf16 rows as they are, writes the dtype asked for
            out = torch.float32 if self.upcast else None
            # checked: the kernels were found available when this layer was packed (no per-call re-check)
            if self.bf16:
                y = native.bf16_matmul(x2, self.qweight, out_dtype=out, checked=True)
            elif self.int4:
                y = native.int4_matmul(x2, self.qweight, self.scales, self.group_size, out_dtype=out, checked=True)
            else:
                y = native.int8_matmul(x2, self.qweight, self.scales, out_dtype=out, checked=True)
            y = y.view(*shape[:-1], self.out_features)
            return y if self.upcast or y.dtype == x.dtype else y.to(x.dtype)
        if x2.dtype != torch.bfloat16:  # PyTorch's kernels take bf16 activations only
            x2 = x2.to(torch.bfloat16)
        x2 = x2.contiguous()
        if self.int4:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, self.qweight, self.group_size, self.scales)
        else:
            y = torch._weight_int8pack_mm(x2, self.qweight, self.scales)
        y = y.view(*shape[:-1], self.out_features)
        if self.upcast:
            return y.float()
        return y if y.dtype == x.dtype else y.to(x.dtype)

    def extra_repr(self) -> str:
        kind = "bf16" if self.bf16 else f"{self.scheme}, group_size={self.group_size}" if self.group_size else "int8"
        return f"in_features={self.in_features}, out_features={self.out_features}, {kind}"


class QuantPackedMLP(nn.Module):
    """The gated MLP of a quantized model with gate and up fused into one kernel call."""

    def __init__(self, mlp: nn.Module):
        super().__init__()
        self.inter = mlp.gate_proj.out_features
        self.gate_up = QuantPackedLinear(QuantWeight.concat_rows([mlp.gate_proj, mlp.up_proj]))
        self.native = native.available()
        self.down = QuantPackedLinear(mlp.down_proj)
        for lin in (mlp.gate_proj, mlp.up_proj):  # free the separate tables: the fused one replaces them
            lin.release()
        # Emptied modules (no tensors, so nothing is saved twice) that restore() refills with their rows.
        self.gate_shell, self.up_shell = mlp.gate_proj, mlp.up_proj

    def restore(self) -> MLP:
        """A :class:`gemma4.model.MLP` with the original quantized gate, up and down modules."""
        self.gate_up.src.split_rows_into([self.gate_shell, self.up_shell])
        with torch.device("meta"):
            mlp = MLP(self.down.in_features, self.inter)
        mlp.gate_proj, mlp.up_proj, mlp.down_proj = self.gate_shell, self.up_shell, self.down.restore()
        return mlp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(_gelu_mul(self.gate_up(x), self.inter, self.native))


class QuantPackedHead(nn.Module):
    """The quantized output head (tied: the embedding table itself) as one kernel call, returning
    float32 logits: the kernel writes bf16, and the upcast (~0.04 ms for 262144 logits) pays for
    itself at once, since argmax/softmax over bf16 run ~1 ms slower per step on this CPU."""

    def __init__(self, table: QuantWeight, tied: bool):
        super().__init__()
        self.tied = tied  # the table is the embedding's (restored as no head at all), else the head's own
        self.lin = QuantPackedLinear(table, upcast=True, own=not tied)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.lin(h)


class FusedQKVAttention(nn.Module):
    """Self-attention (int4/int8 weights) with q, k and v projected by one kernel call, and q and k (same head dim, same eps)
    RMS-normed and rotated together as N + K heads: per head the same operations on the same values,
    a third of the calls. For layers that compute their own K/V with separate q/k/v projections and
    no bias; the wrapped :class:`gemma4.model.Attention` keeps everything else (o_proj, backend)."""

    def __init__(self, attn: Attention, qkv: QuantPackedLinear):
        super().__init__()
        self.n, self.kh, self.d = attn.n_heads, attn.n_kv, attn.head_dim
        # The attention keeps its norms, o_proj and backend; its q/k/v modules were emptied (release())
        # when ``qkv`` took their rows over, so nothing is held or saved twice.
        self.attn, self.qkv = attn, qkv
        qs, ks = _norm_scale(attn.q_norm), _norm_scale(attn.k_norm)
        self.eps = attn.q_norm.eps
        self.register_buffer("qk_scale", torch.cat([qs.expand(self.n, self.d), ks.expand(self.kh, self.d)]),
                             persistent=False)  # [N+K, D]
        self.native = native.available() and self.d <= native.MAX_HEAD_DIM and self.d % 2 == 0

    @staticmethod
    def applies(attn: nn.Module) -> bool:
        return (type(attn) is Attention and not attn.is_consumer and attn.v_proj is not None
                and _norm_scale(attn.q_norm) is not None and _norm_scale(attn.k_norm) is not None
                and attn.q_norm.eps == attn.k_norm.eps)

    @property
    def backend(self) -> str:
        return self.attn.backend

    @backend.setter
    def backend(self, name: str) -> None:  # set_attention_backend on a fast-path model
        self.attn.backend = name

    def forward(self, x, cos, sin, mask, ctx, cache=None, shared_kv=None):
        a = self.attn
        b, t, _ = x.shape
        n, kh, d = self.n, self.kh, self.d
        qkv = self.qkv(x)  # [B,T,(N+2K)*D]
        if self.native and _native_f32(qkv, cos):
            return self._forward_native(qkv, cos, sin, mask, ctx, cache)
        qk = qkv[..., : (n + kh) * d].view(b, t, n + kh, d)
        v = qkv[..., (n + kh) * d :].view(b, t, kh, d)
        # RMSNorm (float32, as gemma4.model.RMSNorm) of every q and k head at once.
        qf = qk.float()
        qf = qf * torch.pow(qf.pow(2).mean(-1, keepdim=True) + self.eps, -0.5)
        qk = apply_rope((qf * self.qk_scale).type_as(qk), cos, sin)  # [B,T,N+K,D]
        q, k = qk[:, :, :n].transpose(1, 2), qk[:, :, n:].transpose(1, 2)  # [B,N,T,D], [B,K,T,D]
        v = (a.v_norm(v) if a.v_norm is not None else v).transpose(1, 2)
        if cache is not None:
            k, v = cache.update(k, v)
        o = ATTENTION_BACKENDS[a.backend](q, k, v, mask, a.scale, a.softcap, ctx)
        o = o.transpose(1, 2).reshape(b, t, n * d)  # [B,T,N*D]
        return a.o_proj(o), (k, v)

    def _forward_native(self, qkv, cos, sin, mask, ctx, cache):
        """float32: q/k norms, RoPE and the value norm in one C call on the projection's output (in place),
        and, for one new token under an exact backend, attention in another (eager's math, one query
        row against the cache)."""
        a = self.attn
        b, t, w = qkv.shape
        n, kh, d = self.n, self.kh, self.d
        rows = qkv.view(b * t, w)  # [B*T,(N+2K)*D], a view: the kernel writes into qkv
        v_eps = a.v_norm.eps if a.v_norm is not None else None
        # one RoPE row per token (position ids given as [1, T] for every batch row broadcast)
        cos, sin = cos.expand(b, t, 1, d).reshape(b * t, d), sin.expand(b, t, 1, d).reshape(b * t, d)
        native.qk_norm_rope_(rows, n + kh, kh, d, self.qk_scale, self.eps, cos, sin, v_eps, checked=True)
        k = qkv[..., n * d : (n + kh) * d].view(b, t, kh, d).transpose(1, 2)  # [B,K,T,D]
        v = qkv[..., (n + kh) * d :].view(b, t, kh, d).transpose(1, 2)
        if cache is not None:
            k, v = cache.update(k, v)
        if t == 1 and a.backend in _EXACT_BACKENDS:
            o = native.attention_decode(rows[:, : n * d].view(b, n, d), k, v, mask, a.scale, a.softcap, checked=True)
            return a.o_proj(o.view(b, 1, n * d)), (k, v)
        q = qkv[..., : n * d].view(b, t, n, d).transpose(1, 2)  # [B,N,T,D]
        o = ATTENTION_BACKENDS[a.backend](q, k, v, mask, a.scale, a.softcap, ctx)
        return a.o_proj(o.transpose(1, 2).reshape(b, t, n * d)), (k, v)

    def restore(self) -> Attention:
        """The original attention with its separate (re-filled) q/k/v modules."""
        a = self.attn
        self.qkv.src.split_rows_into([a.q_proj, a.k_proj, a.v_proj])
        return a


_EXACT_BACKENDS = ("eager", "sdpa")  # backends computing exact attention (the native decode kernel's function)


def _fuse_attention(attn: Attention) -> nn.Module:
    """``attn`` with fused q/k/v when its (already packed) projections allow it, else ``attn``."""
    if not FusedQKVAttention.applies(attn):
        return attn
    mods = [attn.q_proj, attn.k_proj, attn.v_proj]
    if all(isinstance(m, QuantPackedLinear) and m.src is not None for m in mods):
        origs = [m.src for m in mods]
        if len({(type(o), getattr(o, "group_size", 0)) for o in origs}) != 1:
            return attn
        f = QuantWeight.concat_rows(origs)
        if not QuantPackedLinear.supported(f):
            return attn
        for o in origs:
            o.release()
        attn.q_proj, attn.k_proj, attn.v_proj = origs  # the emptied modules, refilled by restore()
        return FusedQKVAttention(attn, QuantPackedLinear(f))
    # Float layers keep separate packed q/k/v (oneDNN's matmuls of these sizes gained nothing measurable).
    return attn


def _norm_scale(norm: nn.Module) -> torch.Tensor | None:
    """The float32 multiplier of an RMSNorm (``w`` or ``1 + w``), None for a scale-less norm."""
    if isinstance(norm, FastRMSNorm):
        return norm.scale
    if norm.weight is None:
        return None
    w = norm.weight.detach().float()
    return w + norm.offset if norm.offset else w


def _mlp_linears(mlp: MLP) -> tuple[nn.Module, nn.Module, nn.Module]:
    """The MLP's three projections (its other child, the activation, has no weights; the packed MLPs
    compute the same gated GELU themselves)."""
    return mlp.gate_proj, mlp.up_proj, mlp.down_proj


def _quant_mlp(child: nn.Module) -> bool:
    return type(child) is MLP and all(isinstance(c, _QUANT_LINEARS) for c in _mlp_linears(child)) \
        and type(child.gate_proj) is type(child.up_proj) and all(QuantPackedLinear.supported(c) for c in _mlp_linears(child))


class DecodeStack:
    """Every decoder layer of one decoded token in one native call (:func:`gemma4.quant.native.decode_layers`).

    Why: the fast path's modules call one C kernel per op, ~10 per layer, and the Python and ctypes work
    around each call (~5-15 us) added up to ~4-5 ms of a ~25 ms bf16 decode step of Gemma 3 270M here,
    as much as one layer's weights take to stream. Built by :func:`use_fast_path` when every layer runs on
    native kernels (int8/int4/bf16 weights, a gated MLP, no MoE, exact attention) and is either a layer
    with fused q/k/v (Gemma 3's, Gemma 4's without K=V), a KV-sharing consumer (Gemma 4 E2B/E4B: q alone,
    over its producer's cache), with or without per-layer inputs; other models keep the modules.
    For fused q/k/v layers the C side runs the modules' own kernels in their order: bit-identical
    results. Consumer layers (whose modules rotate q with PyTorch's RoPE and attend with the eager
    backend) and per-layer inputs (PyTorch's GELU) use the C kernels of the same functions: float32
    rounding apart (tests/test_decode_stack.py). A step it cannot take (several new tokens, a non-float32
    or grad-tracking input, another cache kind, a non-exact attention backend) returns None and the
    modules run it."""

    def __init__(self, model, layers: ctypes.Array, keep: list, producer: list):
        self.layers, self._keep = layers, keep  # keep: the tensors the structs point into
        self.producer = producer  # per layer: the index of the layer whose cache it reads (itself if it has one)
        self.attn = [layer.self_attn.attn if isinstance(layer.self_attn, FusedQKVAttention) else layer.self_attn
                     for layer in model.model.layers]
        types = model.config.layer_types
        self.types = sorted(set(types))
        self.type_of = [self.types.index(lt) for lt in types]
        self.shapes = [(a.n_kv, a.head_dim) for a in self.attn]
        self.head_dim = {lt: a.head_dim for lt, a in zip(types, self.attn)}
        self.ple = [bool(layer.ple_dim) for layer in model.model.layers]
        # The structs hold each step's cache pointers: two threads decoding on one model at once (ctypes
        # releases the GIL during the call) would overwrite each other's, so a step holds the lock.
        self._lock = threading.Lock()

    @staticmethod
    def _linear(m: QuantPackedLinear) -> native.G4Linear:
        return native.G4Linear(m.qweight.data_ptr(), None if m.bf16 else m.scales.data_ptr(), m.out_features,
                               m.in_features, m.group_size, native.G4Linear.KINDS[m.scheme])

    @staticmethod
    def _native_linear(m) -> bool:
        return (isinstance(m, QuantPackedLinear) and m.native and m.qweight.is_contiguous()
                and (m.bf16 or m.scales.is_contiguous()))

    @staticmethod
    def _scale_ok(n) -> bool:
        return isinstance(n, FastRMSNorm) and (n.scale is None or (n.scale.dtype == torch.float32
                                                                  and n.scale.is_contiguous()))

    @classmethod
    def build(cls, model) -> "DecodeStack | None":
        """The stack for a fast-path model whose layers all qualify, else None."""
        if not native.available():
            return None
        layers = model.model.layers
        modes = model.config.kv_sharing_modes
        structs, keep, producer, last_store = (native.G4Layer * len(layers))(), [], [], {}
        for i, (layer, st) in enumerate(zip(layers, structs)):
            if type(layer) is not DecoderLayer or layer.enable_moe:
                return None
            fa, mlp = layer.self_attn, layer.mlp
            if isinstance(fa, FusedQKVAttention) and fa.native:
                a, qkv, qk_scale, qk_eps, kh = fa.attn, fa.qkv, fa.qk_scale, fa.eps, fa.kh
                producer.append(i)
            elif (type(fa) is Attention and fa.is_consumer and cls._native_linear(fa.q_proj) and fa.q_proj.src
                    is not None and cls._scale_ok(fa.q_norm) and fa.q_norm.scale is not None
                    and fa.head_dim <= native.MAX_HEAD_DIM and fa.head_dim % 2 == 0
                    and fa.layer_type in last_store):
                a, qkv, qk_eps, kh = fa, fa.q_proj, fa.q_norm.eps, fa.n_kv
                qk_scale = fa.q_norm.scale.expand(fa.n_heads, fa.head_dim).contiguous()  # [N, D]
                producer.append(last_store[fa.layer_type])
            else:
                return None
            if modes[i] == "store":
                last_store[layer.layer_type] = i
            if not isinstance(mlp, QuantPackedMLP):
                return None
            lins = (qkv, a.o_proj, mlp.gate_up, mlp.down)
            norms = (layer.input_layernorm, layer.post_attention_layernorm, layer.pre_feedforward_layernorm,
                     layer.post_feedforward_layernorm)
            if not all(cls._native_linear(m) for m in lins):
                return None
            if not all(cls._scale_ok(n) and n.eps == norms[0].eps for n in norms):
                return None
            sc = layer.layer_scalar
            if sc is not None and (sc.dtype != torch.float32 or sc.numel() != 1):
                return None
            if layer.ple_dim:
                gate, proj, pn = layer.per_layer_input_gate, layer.per_layer_projection, layer.post_per_layer_input_norm
                if not (cls._native_linear(gate) and cls._native_linear(proj) and cls._scale_ok(pn)):
                    return None
                st.ple_gate, st.ple_proj = cls._linear(gate), cls._linear(proj)
                st.ple_norm, st.ple_eps = None if pn.scale is None else pn.scale.data_ptr(), pn.eps
                keep.append(pn.scale)
            st.qkv, st.o, st.gate_up, st.down = (cls._linear(m) for m in lins)
            for j, n in enumerate(norms):
                st.norm[j] = None if n.scale is None else n.scale.data_ptr()
            st.qk_scale, st.scalar = qk_scale.data_ptr(), None if sc is None else sc.data_ptr()
            st.heads, st.kv_heads, st.head_dim, st.inter = a.n_heads, kh, a.head_dim, mlp.inter
            st.eps, st.qk_eps, st.consumer = norms[0].eps, qk_eps, int(producer[-1] != i)
            st.v_eps = a.v_norm.eps if not a.is_consumer and a.v_norm is not None else -1.0
            st.scale, st.softcap = a.scale, float(a.softcap or 0.0)
            keep += [*(n.scale for n in norms), qk_scale, sc]
        return cls(model, structs, keep, producer)

    def __call__(self, h: torch.Tensor, ple: torch.Tensor | None, rope: dict, masks: dict,
                 cache) -> torch.Tensor | None:
        b, t, hidden = h.shape
        if t != 1 or not _native_f32(h) or not h.is_contiguous():
            return None
        if any(a.backend not in _EXACT_BACKENDS for a in self.attn):
            return None
        if ple is not None and (not _native_f32(ple) or not ple.is_contiguous()):
            return None
        caches = cache.layers
        for i, c in enumerate(caches):  # checked before any slot is taken: a refusal leaves every cache as it was
            if self.producer[i] != i:
                if c is not None:
                    return None
            elif (type(c) not in (FullCache, SlidingCache) or (c.k is not None and (c.k.dtype != torch.float32
                    or c.k.shape[0] != b)) or (type(c) is SlidingCache and c.capacity == 0)):
                return None
        per_type = []
        for lt in self.types:
            cos, sin = rope[lt]
            m = masks[lt]
            # the C side reads one RoPE row per batch row, and one mask row per batch row (or one for all)
            if (cos.dtype != torch.float32 or cos.numel() != b * self.head_dim[lt] or sin.shape != cos.shape
                    or (m is not None and (m.dtype != torch.bool or m.shape[0] not in (1, b)))):
                return None
            if m is not None:
                m = m.reshape(m.shape[0], m.shape[-1]).contiguous()  # [B|1, S]
            per_type.append((cos.contiguous(), sin.contiguous(), m))
        with self._lock:
            return self._step(h, ple, caches, per_type, b, hidden)

    def _step(self, h, ple, caches, per_type, b, hidden):
        st_layers = self.layers
        for i, c in enumerate(caches):
            st = st_layers[i]
            cos, sin, m = per_type[self.type_of[i]]
            if self.producer[i] == i:
                kh, d = self.shapes[i]
                kb, vb, slot, keys = c.decode_slot(b, kh, d, d, torch.float32, h.device)
                st.k_cache, st.v_cache, st.cap, st.slot, st.keys = kb.data_ptr(), vb.data_ptr(), kb.shape[2], slot, keys
            else:  # a consumer attends over what its producer (an earlier layer) wrote this step
                src = st_layers[self.producer[i]]
                st.k_cache, st.v_cache, st.cap, st.keys = src.k_cache, src.v_cache, src.cap, src.keys
            if m is not None and m.shape[-1] != st.keys:  # masks come from these caches' bookkeeping
                raise RuntimeError(f"layer {i}: the attention mask covers {m.shape[-1]} keys, the cache {st.keys}")
            st.mask, st.mask_stride = (None, 0) if m is None else (m.data_ptr(), st.keys if m.shape[0] > 1 else 0)
            st.cos, st.sin = cos.data_ptr(), sin.data_ptr()
            if self.ple[i]:  # ple [B, 1, L, P]: this layer's rows
                st.ple, st.ple_stride = ple[:, 0, i].data_ptr(), ple.shape[2] * ple.shape[3]
        x = h.view(b, hidden)
        native.decode_layers(st_layers, x, checked=True)  # the tensors above live until it returns
        return h


def use_fast_path(model, head: str = "auto"):
    """Repack ``model`` (in place) for fast CPU decoding; returns it. No-op off CPU or where oneDNN
    cannot run the model's dtype. ``head``: "auto" or "plain" (the plain weight, no copy: oneDNN for
    several rows, ``torch.mv`` for one bf16 row), "pack" (a oneDNN-packed copy: +V x H x 2 bytes for a
    tied bf16 table) or "none" (leave the output head alone).
    """
    dtype = model.dtype
    if model.device.type != "cpu" or not available(dtype) or model.fast_path:
        return model
    configure_onednn()
    configure_malloc()
    if head not in ("auto", "pack", "plain", "none"):
        raise ValueError(f"head must be 'auto', 'pack', 'plain' or 'none', got {head!r}")
    replaced: set[int] = set()  # modules swapped out: their children are not visited
    for mod in list(model.model.modules()):
        if id(mod) in replaced:
            replaced.update(id(c) for c in mod.children())
            continue
        for child_name, child in list(mod.named_children()):
            if type(child) in (MLP, *_QUANT_LINEARS):
                replaced.add(id(child))
            if type(child) is MLP and all(type(c) is nn.Linear for c in _mlp_linears(child)):
                setattr(mod, child_name, PackedMLP(child))
            elif _quant_mlp(child):
                setattr(mod, child_name, QuantPackedMLP(child))
            elif isinstance(child, _QUANT_LINEARS) and QuantPackedLinear.supported(child):
                setattr(mod, child_name, QuantPackedLinear(child))
            elif type(child) is RMSNorm:
                setattr(mod, child_name, FastRMSNorm(child))
            elif type(child) is nn.Linear and child.weight is not None and child.weight.dtype == dtype:
                setattr(mod, child_name, PackedLinear(child.weight, child.bias))
                # The loop's module list still holds the dropped layer: free its plain weight now, or
                # every layer's would live until the end (twice the model's memory at the peak).
                child.weight = None
    for layer in model.model.layers:  # after the projections are packed: fuse q/k/v
        layer.self_attn = _fuse_attention(layer.self_attn)
    model.model.decode_stack = DecodeStack.build(model)
    tied = model.lm_head is None and isinstance(model.model.embed_tokens, QuantWeight)
    quant_head = model.model.embed_tokens if tied else model.lm_head
    if isinstance(quant_head, QuantWeight):
        if head != "none" and QuantPackedLinear.supported(quant_head):
            model.lm_head = QuantPackedHead(quant_head, tied=tied)
    elif head != "none":
        tied = model.lm_head is None
        w = model.model.embed_tokens.weight if tied else model.lm_head.weight
        packed = PackedLinear(w, getattr(model.lm_head, "bias", None), pack=(head == "pack"))
        packed.tied = tied  # restored as no head at all (the model multiplies by the embedding)
        model.lm_head = packed
    model.fast_path = True
    return model


def on_fast_path(model) -> bool:
    """Whether :func:`use_fast_path` has swapped ``model``'s modules (then it cannot train or be saved as is)."""
    return bool(getattr(model, "fast_path", False))


@contextmanager
def plain_path(model):
    """Temporarily give a fast-path model its plain modules back (to save, export or quantize it)."""
    fast = on_fast_path(model)
    if fast:
        use_plain_path(model)
    try:
        yield model
    finally:
        if fast:
            use_fast_path(model)


def use_plain_path(model):
    """Undo :func:`use_fast_path` (in place); returns the model."""
    if not model.fast_path:
        return model
    model.model.decode_stack = None
    for layer in model.model.layers:
        if isinstance(layer.self_attn, FusedQKVAttention):
            layer.self_attn = layer.self_attn.restore()
    for mod in list(model.model.modules()):
        for child_name, child in list(mod.named_children()):
            if isinstance(child, (PackedLinear, QuantPackedLinear, PackedMLP, QuantPackedMLP, FastRMSNorm)):
                setattr(mod, child_name, child.restore())
    h = model.lm_head
    if isinstance(h, PackedLinear):
        model.lm_head = None if h.tied else h.restore()
    elif isinstance(h, QuantPackedHead):
        model.lm_head = None if h.tied else h.lin.restore()
    model.fast_path = False
    return model
