"""Weight-only quantization by module swapping: int8 per output channel, int4 group-wise, and bf16
storage with float32 compute.

``quantize(model, "int8" | "int4" | "bf16", group_size=32)`` replaces, in place:

* every ``nn.Linear`` (attention, MLP, PLE gates/projections) by :class:`Int8Linear` / :class:`Int4Linear`;
* the token embedding by a quantized table that serves both the lookup and the tied output head (one
  copy of the table: a tied model keeps ``lm_head = None`` and its logits come from the table's own
  ``head`` matmul, :meth:`gemma4.model.Gemma4ForCausalLM.tied_head`);
* the PLE table (a lookup only) and the MoE expert stacks.

The router (top-k selection is sensitive, and the matrix is tiny) and norms stay in float.

Formats (scales in bf16, the dtype the CPU kernels take, except grouped int8's float16 ones):

* int8: ``w ≈ q * scale``, q int8 in [-127, 127], one scale per output row (symmetric; the scale is
  rounded *up* to bf16 so no weight clips); or, with ``group_size=32``, one float16 scale per 32 inputs
  of a row: GGUF's Q8_0 layout, which a Q8_0 file loads into exactly (codes and scales as stored).
* bf16: the weight rounded to bf16 (exact for a bf16 checkpoint), multiplied in the activations' dtype
  (:class:`Bf16Weight`: a BF16 GGUF's default form, float32 activations as llama.cpp computes it).
* int4: ``w ≈ (q - 8) * scale + zero``, q in [0, 15], one (scale, zero) pair per ``group_size``
  inputs of a row (asymmetric min/max). ``scales_zeros`` is stored as ``[.., K/g, N, 2]`` — the layout
  ``torch._weight_int4pack_mm_for_cpu`` reads — and the codes as uint8 ``[.., N, K/2]`` with the even
  input in the low nibble. That nibble order is the portable file format; in memory the codes are
  repacked into the kernel's own layout, which depends on the CPU's vector width (AVX-512, AVX2 or
  none), and unpacked again when saved.

Matmuls on CPU use the compiled int8-activation kernels of :mod:`gemma4.quant.native` when they built
and passed their self-check here (they read these same formats; int4 codes then stay in the portable
order, and the small (scale, zero) table is stored in row order, ``scales_zeros`` a strided view of it). Otherwise
``torch._weight_int8pack_mm`` / ``_weight_int4pack_mm_for_cpu`` with bf16 activations (on this CPU both
are 10-30x slower with float32 activations than with bf16), and dequantize-then-matmul elsewhere
(other devices, shapes the kernels reject).
"""

from __future__ import annotations

import functools
import logging
from typing import Any, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from gemma4._util import Gemma4Error, Progress, no_progress, release_free_heap
from gemma4.model import Experts, Gemma4ForCausalLM
from gemma4.quant import native

log = logging.getLogger("gemma4")

SCHEMES = ("int8", "int4", "bf16")
GROUP_SIZES = (32, 64, 128, 256)
FORMAT_VERSION = 1
DEFAULT_SKIP = ("router",)
_FLOAT_OK = (torch.float32, torch.bfloat16, torch.float16)
_ROWS_PER_CHUNK = 8192  # quantize big tables in row chunks: bounded float temporaries
# The int4 repack's temporaries (int32 codes, the packing op's own buffers) are tens of times the rows:
# 8192-row chunks of the 262144 x 640 table peaked 84 MiB above the table, 1024-row chunks 14 MiB.
_REPACK_ROWS = 1024


class QuantizationError(Gemma4Error, ValueError):
    """Bad quantization request or quantized checkpoint; the message names the problem."""


# ----------------------------------------------------------------------------- kernels available here
def _has_op(name: str) -> bool:
    return hasattr(torch.ops.aten, name)


@functools.cache
def int8_kernel_ok() -> bool:
    """Self-check of torch._weight_int8pack_mm on this machine (it has silently wrong results for
    unsupported shapes, so shapes are also gated in :func:`int8_shape_ok`)."""
    if not hasattr(torch, "_weight_int8pack_mm"):
        return False
    try:
        g = torch.Generator().manual_seed(0)
        w = torch.randint(-127, 128, (48, 64), dtype=torch.int8, generator=g)
        s = torch.rand(48, generator=g).to(torch.bfloat16)
        x = torch.randn(3, 64, generator=g).to(torch.bfloat16)
        ref = (x.float() @ w.float().t()) * s.float()
        y = torch._weight_int8pack_mm(x, w, s).float()
        return bool(torch.allclose(y, ref, rtol=2e-2, atol=2e-2 * float(ref.abs().max())))
    except Exception:  # noqa: BLE001 - any failure means "don't use it"
        return False


def int8_shape_ok(k: int) -> bool:
    # The vectorised kernel walks K in 16-wide steps and returns garbage for other K (measured on
    # AVX-512, torch 2.13); 32 leaves a margin for wider vector units.
    return k % 32 == 0


# int4 CPU layout candidates: (kind, BLOCK_N). "split": a byte holds rows r and r + BLOCK_N/2 of a
# block (AVX-512: 64 rows, AVX2: 32); "pairs": rows 2j and 2j+1 (no vector unit, and partial blocks).
_INT4_LAYOUTS = (("split", 64), ("split", 32), ("pairs", 32))


def _unpack_cpu_int4(p: torch.Tensor, layout: tuple[str, int], k: int) -> torch.Tensor:
    """Kernel-packed int4 [N, K/2] -> codes uint8 [N, K]."""
    kind, bn = layout
    n = p.shape[0]
    full = n // bn * bn
    out = torch.empty(n, k, dtype=torch.uint8, device=p.device)
    if full:
        blk = p[:full].reshape(full // bn, k, bn // 2)  # [NB, K, BN/2] bytes
        lo, hi = blk & 15, blk >> 4
        rows = torch.cat([lo, hi], -1) if kind == "split" else torch.stack([lo, hi], -1).reshape(full // bn, k, bn)
        out[:full] = rows.transpose(1, 2).reshape(full, k)
    if n > full:
        nb = n - full
        t = p[full:].reshape(k, nb // 2)
        out[full:] = torch.stack([t & 15, t >> 4], -1).reshape(k, nb).t()
    return out


def _gather_cpu_int4_rows(p: torch.Tensor, layout: tuple[str, int], k: int, ids: torch.Tensor) -> torch.Tensor:
    """Codes [n, K] of rows ``ids`` of a kernel-packed [N, K/2] tensor, without unpacking the rest."""
    kind, bn = layout
    n = p.shape[0]
    full = n // bn * bn
    ids = ids.reshape(-1).long()
    in_full = ids < full
    r = torch.where(in_full, ids % bn, ids - full)
    base = torch.where(in_full, (ids // bn) * bn * (k // 2), torch.full_like(ids, full * (k // 2)))
    width = torch.where(in_full, torch.full_like(ids, bn // 2), torch.full_like(ids, max(n - full, 2) // 2))
    split = in_full & (kind == "split")
    col = torch.where(split, r % (bn // 2), r // 2)
    shift = torch.where(split, (r >= bn // 2).long() * 4, (r % 2) * 4)
    idx = base[:, None] + torch.arange(k, device=p.device)[None] * width[:, None] + col[:, None]  # [n, K]
    return (p.reshape(-1)[idx] >> shift[:, None].to(torch.uint8)) & 15


@functools.cache
def int4_cpu_layout() -> tuple[str, int] | None:
    """Which CPU int4 layout this torch build packs into (probed and checked numerically), or None
    when the kernel is missing or unrecognised — then int4 stays portable and dequantizes."""
    if not (_has_op("_convert_weight_to_int4pack_for_cpu") and _has_op("_weight_int4pack_mm_for_cpu")):
        return None
    try:
        g = torch.Generator().manual_seed(0)
        for n in (128, 80):  # full blocks, and a partial last block
            k = 64
            q = torch.randint(0, 16, (n, k), dtype=torch.int32, generator=g)
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 2)
            found = [lay for lay in _INT4_LAYOUTS if torch.equal(_unpack_cpu_int4(packed, lay, k), q.to(torch.uint8))]
            if not found:
                log.warning("unrecognised int4 CPU packing layout: int4 weights will be dequantized per matmul")
                return None
            layout = found[0]
            sz = torch.rand(k // 32, n, 2, generator=g).to(torch.bfloat16)
            x = torch.randn(2, k, generator=g).to(torch.bfloat16)
            w = int4_dequant(q.to(torch.uint8), sz, 32, torch.float32)
            ref = x.float() @ w.t()
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, 32, sz).float()
            if not torch.allclose(y, ref, rtol=2e-2, atol=2e-2 * float(ref.abs().max())):
                return None
        return layout
    except Exception:  # noqa: BLE001
        return None


def kernels_available() -> dict[str, bool]:
    nat = native.available()
    return {"int8": nat or int8_kernel_ok(), "int4": nat or int4_cpu_layout() is not None, "native": nat}


# ----------------------------------------------------------------------------- quantize / dequantize
def _bf16_round_up(s: torch.Tensor) -> torch.Tensor:
    """Smallest bf16 >= s (s > 0): a scale rounded up never lets a weight clip."""
    b = s.to(torch.bfloat16)
    up = torch.nextafter(b, torch.tensor(float("inf"), dtype=torch.bfloat16))
    return torch.where(b.float() < s, up, b)


def _f16_round_up(s: torch.Tensor) -> torch.Tensor:
    """Smallest float16 >= s (0 < s <= 65504), as :func:`_bf16_round_up`."""
    h = s.clamp(min=2.0**-24).to(torch.float16)
    up = torch.nextafter(h, torch.tensor(float("inf"), dtype=torch.float16))
    return torch.where(h.float() < s, up, h)


INT8_GROUP = 32  # the one group size of grouped int8 (GGUF's Q8_0 block)


def quantize_int8_tensor(w: torch.Tensor, group_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """[.., N, K] float -> (q int8 [.., N, K], scales): symmetric, bf16 scales [.., N] (one per output row),
    or with ``group_size=32`` float16 scales [.., N, K/32] (one per 32 inputs: Q8_0's layout)."""
    wf = w.detach().float()
    if not group_size:
        scale = _bf16_round_up((wf.abs().amax(-1) / 127.0).clamp(min=1e-12))
        q = torch.round(wf / scale.float()[..., None]).clamp_(-127, 127).to(torch.int8)
        return q, scale
    blocks = wf.reshape(*wf.shape[:-1], wf.shape[-1] // group_size, group_size)  # [.., N, K/g, g]
    if float(blocks.abs().amax()) / 127.0 > 65504:
        raise QuantizationError("a weight is too large for a float16 block scale (|w| > 8.3e6)")
    scale = _f16_round_up((blocks.abs().amax(-1) / 127.0).clamp(min=1e-12))
    q = torch.round(blocks / scale.float()[..., None]).clamp_(-127, 127).to(torch.int8)
    return q.reshape(wf.shape), scale


def int8_dequant(q: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if scales.dim() == q.dim():  # grouped: [.., N, K/32] scales
        n_groups = scales.shape[-1]
        blocks = q.float().reshape(*q.shape[:-1], n_groups, q.shape[-1] // n_groups)
        return (blocks * scales.float()[..., None]).reshape(q.shape).to(dtype)
    return (q.float() * scales.float()[..., None]).to(dtype)


# Clipping candidates for int4 groups: trim this fraction of the [min, max] range off each end. Plain
# min/max is a poor grid when one outlier stretches a group; the per-group choice with the least
# squared error (the round-to-nearest grid search llama.cpp's k-quants also do) cuts the weight error
# by ~20% on Gemma 3 270M.
_INT4_TRIMS = (0.0, 0.04, 0.08, 0.12, 0.16)


def int4_grid(t: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor):
    scale = _bf16_round_up(((hi - lo) / 15.0).clamp(min=1e-12))
    zero = (lo + 8.0 * scale.float()).to(torch.bfloat16)
    q = torch.round((t - zero.float()[..., None]) / scale.float()[..., None] + 8.0).clamp_(0, 15)
    err = ((q - 8.0) * scale.float()[..., None] + zero.float()[..., None] - t).pow_(2).sum(-1)
    return q, scale, zero, err


def quantize_int4_tensor(w: torch.Tensor, group_size: int, search: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """[.., N, K] float -> (codes uint8 [.., N, K] in 0..15, scales_zeros bf16 [.., K/g, N, 2]).
    Asymmetric: a group's (clipped) [min, max] maps onto 0..15, w ≈ (q - 8) * scale + zero."""
    *lead, n, k = w.shape
    t = w.detach().float().reshape(*lead, n, k // group_size, group_size)
    lo0, hi0 = t.amin(-1), t.amax(-1)
    q, scale, zero, err = int4_grid(t, lo0, hi0)
    if search:
        r = hi0 - lo0
        for a in _INT4_TRIMS:
            for b in _INT4_TRIMS:
                if a == b == 0.0:
                    continue
                q2, s2, z2, e2 = int4_grid(t, lo0 + a * r, hi0 - b * r)
                better = e2 < err
                q = torch.where(better[..., None], q2, q)
                scale, zero, err = torch.where(better, s2, scale), torch.where(better, z2, zero), torch.where(better, e2, err)
    sz = torch.stack([scale, zero], -1).transpose(-3, -2).contiguous()  # [.., K/g, N, 2]
    return q.to(torch.uint8).reshape(*lead, n, k), sz


def int4_dequant(codes: torch.Tensor, sz: torch.Tensor, group_size: int, dtype: torch.dtype) -> torch.Tensor:
    """codes [.., N, K] + scales_zeros [.., K/g, N, 2] -> weight [.., N, K]."""
    *lead, n, k = codes.shape
    s = sz.float().transpose(-3, -2)  # [.., N, K/g, 2]
    t = codes.float().reshape(*lead, n, k // group_size, group_size)
    return ((t - 8.0) * s[..., 0:1] + s[..., 1:2]).reshape(*lead, n, k).to(dtype)


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """[.., K] codes 0..15 -> [.., K/2] uint8, even input in the low nibble (the file format)."""
    return (codes[..., 0::2] | (codes[..., 1::2] << 4)).to(torch.uint8)


def unpack_nibbles(p: torch.Tensor) -> torch.Tensor:
    return torch.stack([p & 15, p >> 4], -1).reshape(*p.shape[:-1], p.shape[-1] * 2)


# ----------------------------------------------------------------------------- quantized weights
class QuantWeight(nn.Module):
    """A quantized weight [*lead, N, K] (lead = (E,) for expert stacks). Subclasses pick the scheme.

    Buffers keep their dtype when the model is cast (``model.to(torch.bfloat16)`` must not round
    int4 scales through fp16, say); only their device follows."""

    scheme = ""
    _fixed_dtype: tuple[str, ...] = ()

    def __init__(self, n: int, k: int, lead: tuple[int, ...] = ()):
        super().__init__()
        self.out_features, self.in_features, self.lead = n, k, tuple(lead)

    def _apply(self, fn, recurse=True):
        keep = {name: b for name, b in self._buffers.items() if name in self._fixed_dtype and b is not None}
        super()._apply(fn, recurse)
        for name, old in keep.items():
            new = self._buffers[name]
            if new is not None and new.dtype != old.dtype:
                self._buffers[name] = old.to(device=new.device)
        return self

    def extra_repr(self) -> str:
        lead = f"lead={self.lead}, " if self.lead else ""
        return f"{lead}in_features={self.in_features}, out_features={self.out_features}, scheme={self.scheme}"

    # -- the public interface other module swaps (the CPU fast path) use: rows in, rows out, release.
    def kernel_ready(self) -> bool:
        """Prepare the weight for its CPU kernel (int4: repack into the kernel layout) and say whether
        the kernel can run it here (2-D, on CPU, a layout/shape the kernel accepts)."""
        raise NotImplementedError

    def kernel_tensors(self) -> tuple[bool, torch.Tensor, torch.Tensor]:
        """After :meth:`kernel_ready`: (native, codes, scales) as the CPU kernel reads them — native True
        for :mod:`gemma4.quant.native`'s kernels, False for PyTorch's."""
        raise NotImplementedError

    def row_tensors(self, start: int = 0, stop: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(portable codes or int8 values [rows, K], scales in the module's own layout) of a row range."""
        raise NotImplementedError

    def set_rows(self, q: torch.Tensor, s: torch.Tensor) -> None:
        """Replace the whole weight with ``row_tensors``-style tensors (shapes checked by the caller)."""
        raise NotImplementedError

    @classmethod
    def concat_rows(cls, mods: list["QuantWeight"]) -> "QuantWeight":
        """One 2-D weight holding the rows of ``mods`` in order (codes and scales unchanged, so the
        fused matmul gives the same bits as the separate ones)."""
        parts = [m.row_tensors() for m in mods]
        first = mods[0]
        f = first.empty_like(sum(m.out_features for m in mods))
        f.set_rows(torch.cat([q for q, _ in parts]), torch.cat([s for _, s in parts], dim=first.scale_row_dim))
        return f

    def split_rows_into(self, targets: list["QuantWeight"]) -> None:
        """Inverse of :meth:`concat_rows`: refill ``targets`` (emptied by :meth:`release`) with their rows."""
        start = 0
        for t in targets:
            t.set_rows(*self.row_tensors(start, start + t.out_features))
            start += t.out_features

    def _ensure_ready(self, in_place: bool = False) -> None:
        """Bring the tensors into the form the kernels read after a load or cast (see the subclasses)."""

    def release(self) -> None:
        """Drop the tensors (after a fused copy took them over); :meth:`set_rows` refills."""
        for name in list(self._buffers):
            if name != "weight":
                self._buffers[name] = None

    # -- filling a weight row by row (a loader streaming a file into a meta-built model)
    def allocate(self, device: str | torch.device = "cpu", empty=None) -> None:
        """Replace every meta-device buffer (a model built on the meta device, then
        :func:`prepare_quantized`) by an uninitialised one of the same shape and dtype on ``device``,
        for :meth:`fill_rows` to write. Untouched pages of a fresh buffer cost no memory until written.
        ``empty(shape, dtype)``: makes each buffer instead of ``torch.empty`` (a loader choosing where
        the memory comes from)."""
        for name, b in self._buffers.items():
            if b is not None and b.is_meta:
                self._buffers[name] = (empty(tuple(b.shape), b.dtype) if empty is not None
                                       else torch.empty(b.shape, dtype=b.dtype, device=device))

    def quantize_rows(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Float rows [rows, K] -> (codes, scales) as :meth:`set_from_float` stores them. Every row (int8)
        or group of a row (int4) is rounded on its own, so rows quantized in chunks give the same bits
        as the whole table at once."""
        raise NotImplementedError

    def fill_rows(self, start: int, q: torch.Tensor, s: torch.Tensor, index: int | None = None) -> None:
        """Write rows ``start .. start + len(q)`` (of expert ``index`` for a stacked weight) from
        :meth:`quantize_rows`-style tensors, into buffers made by :meth:`allocate`."""
        raise NotImplementedError

    def _check_rows(self, start: int, q: torch.Tensor, s: torch.Tensor, want_s: tuple[int, ...]) -> None:
        n = q.shape[0] if q.dim() == 2 else -1
        if q.dim() != 2 or q.shape[1] != self.in_features or not 0 <= start <= self.out_features - n \
                or tuple(s.shape) != want_s:
            raise QuantizationError(f"rows {list(q.shape)} / scales {list(s.shape)} at row {start} do not fit a "
                                    f"[{self.out_features}, {self.in_features}] {self.scheme} weight")


class Int8Weight(QuantWeight):
    """int8 codes with bf16 row scales, or (``group_size=32``) float16 scales per 32 inputs of a row."""

    scheme = "int8"
    _fixed_dtype = ("scales",)

    def __init__(self, n, k, lead=(), device=None, group_size: int | None = None):
        super().__init__(n, k, lead)
        if group_size not in (None, 0, INT8_GROUP):
            raise QuantizationError(f"int8 group_size must be None (per row) or {INT8_GROUP}, got {group_size!r}")
        self.group_size = group_size or None
        self.register_buffer("qweight", torch.empty(*lead, n, k, dtype=torch.int8, device=device))
        shape, dt = ((n, k // INT8_GROUP), torch.float16) if self.group_size else ((n,), torch.bfloat16)
        self.register_buffer("scales", torch.empty(*lead, *shape, dtype=dt, device=device))

    def extra_repr(self) -> str:
        return super().extra_repr() + (f", group_size={self.group_size}" if self.group_size else "")

    @property
    def _scale_dtype(self) -> torch.dtype:
        return torch.float16 if self.group_size else torch.bfloat16

    def set_from_float(self, w: torch.Tensor) -> None:
        q, s = _chunked(w, functools.partial(quantize_int8_tensor, group_size=self.group_size))
        self.qweight, self.scales = q, s

    scale_row_dim = 0

    def empty_like(self, n: int) -> "Int8Weight":
        return Int8Weight(n, self.in_features, group_size=self.group_size)

    def kernel_ready(self) -> bool:
        # PyTorch's int8 kernel takes row scales only: grouped weights need the native kernels.
        return (not self.lead and self.qweight is not None and self.qweight.device.type == "cpu"
                and not self.qweight.is_meta and int8_shape_ok(self.in_features)
                and (native.available() or (not self.group_size and int8_kernel_ok())))

    def kernel_tensors(self):
        return native.available(), self.qweight, self.scales

    def row_tensors(self, start=0, stop=None):
        return self.qweight[start:stop].clone(), self.scales[start:stop].clone()

    def quantize_rows(self, w):
        return quantize_int8_tensor(w, self.group_size)

    def fill_rows(self, start, q, s, index=None):
        qw, sc = (self.qweight, self.scales) if index is None else (self.qweight[index], self.scales[index])
        self._check_rows(start, q, s, (q.shape[0], *sc.shape[1:]))
        qw[start:start + q.shape[0]].copy_(q)
        sc[start:start + q.shape[0]].copy_(s)

    def set_rows(self, q, s) -> None:
        self._buffers["qweight"], self._buffers["scales"] = q, s

    def _ensure_ready(self, in_place: bool = False) -> None:
        """After loading in another float dtype: scales back to bf16 / float16 (exact: they are values of
        that dtype). int8 codes need no repacking, so ``in_place`` changes nothing here."""
        if self.scales.dtype != self._scale_dtype and not self.scales.is_meta:
            self._buffers["scales"] = self.scales.to(self._scale_dtype)

    def dequantize(self, dtype=torch.float32, index: int | None = None) -> torch.Tensor:
        q, s = (self.qweight, self.scales) if index is None else (self.qweight[index], self.scales[index])
        return int8_dequant(q, s, dtype)

    def matmul(self, x: torch.Tensor, index: int | None = None) -> torch.Tensor:
        """x [.., K] -> x @ W[index]^T [.., N], in x's dtype."""
        self._ensure_ready()
        q = self.qweight if index is None else self.qweight[index]
        s = self.scales if index is None else self.scales[index]
        if x.device.type == "cpu" and q.device.type == "cpu" and int8_shape_ok(self.in_features) and native.available():
            y = native.int8_matmul(x.reshape(-1, self.in_features), q, s)
            return y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)  # no-op for float32/bf16
        if x.device.type == "cpu" and int8_shape_ok(self.in_features) and not self.group_size and int8_kernel_ok():
            x2 = x.reshape(-1, self.in_features).to(torch.bfloat16).contiguous()
            y = torch._weight_int8pack_mm(x2, q, s.to(torch.bfloat16))
            return y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)
        return F.linear(x, int8_dequant(q, s, x.dtype))

    def rows(self, ids: torch.Tensor, dtype) -> torch.Tensor:
        self._ensure_ready()
        return int8_dequant(self.qweight[ids], self.scales[ids], dtype)


class Int4Weight(QuantWeight):
    scheme = "int4"
    _fixed_dtype = ("scales_zeros",)

    def __init__(self, n, k, group_size: int, lead=(), device=None, kernel_layout: bool = True):
        super().__init__(n, k, lead)
        self.group_size = group_size
        self.kernel_layout = kernel_layout  # False for lookup-only tables: never repacked
        self.register_buffer("qweight", torch.empty(*lead, n, k // 2, dtype=torch.uint8, device=device))
        self.register_buffer("scales_zeros", torch.empty(*lead, k // group_size, n, 2, dtype=torch.bfloat16, device=device))
        self._packed: tuple[str, int] | None = None  # the CPU layout qweight is in, None = portable
        # For the native kernels (codes stay portable): scales_zeros in row order [.., N, K/g, 2], a
        # derived copy (not saved), dropped whenever the codes or scales change.
        self._sz_rows: torch.Tensor | None = None

    def _reset_layout(self) -> None:
        self._packed, self._sz_rows = None, None

    def _apply(self, fn, recurse=True):
        self._sz_rows = None  # a device move or cast: re-derived on the next use
        return super()._apply(fn, recurse)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", group_size={self.group_size}"

    def set_from_float(self, w: torch.Tensor) -> None:
        codes, sz = _chunked(w, functools.partial(quantize_int4_tensor, group_size=self.group_size), sz_dim=-2)
        self.qweight, self.scales_zeros = pack_nibbles(codes), sz
        self._reset_layout()
        self._ensure_ready()

    scale_row_dim = -2  # scales_zeros is [K/g, N, 2]

    def empty_like(self, n: int) -> "Int4Weight":
        return Int4Weight(n, self.in_features, self.group_size)

    def kernel_ready(self) -> bool:
        if self.lead or self.qweight is None or self.qweight.device.type != "cpu" or self.qweight.is_meta:
            return False
        self._ensure_ready()
        return self._packed is not None or self._sz_rows is not None

    def kernel_tensors(self):
        if self._sz_rows is not None:
            return True, self.qweight, self._sz_rows
        return False, self.qweight, self.scales_zeros

    def row_tensors(self, start=0, stop=None):
        # Through the portable nibble order, so a fused weight is packed exactly as the kernel packs it.
        return self.codes()[start:stop], self.scales_zeros[:, start:stop].contiguous()

    def set_rows(self, codes, sz) -> None:
        self._buffers["qweight"], self._buffers["scales_zeros"] = pack_nibbles(codes), sz
        self._reset_layout()
        self._ensure_ready()

    def allocate(self, device="cpu", empty=None) -> None:
        super().allocate(device, empty)
        self._reset_layout()  # filled in the portable order; _ensure_ready / to_kernel_layout repacks

    def quantize_rows(self, w):
        return quantize_int4_tensor(w, self.group_size)

    def fill_rows(self, start, codes, sz, index=None):
        if self._packed is not None:
            raise QuantizationError("fill_rows writes portable codes; this weight is already in the kernel layout")
        self._sz_rows = None
        qw, szt = (self.qweight, self.scales_zeros) if index is None else (self.qweight[index], self.scales_zeros[index])
        n = codes.shape[0]
        self._check_rows(start, codes, sz, (self.in_features // self.group_size, n, 2))
        qw[start:start + n].copy_(pack_nibbles(codes))
        szt[:, start:start + n].copy_(sz)  # scales_zeros is [K/g, N, 2]: rows are its middle dim

    # -- layouts
    def _kernel_usable(self) -> bool:
        return (self.kernel_layout and self.qweight.device.type == "cpu" and not self.qweight.is_meta
                and self.out_features % 16 == 0 and self.group_size in GROUP_SIZES
                and int4_cpu_layout() is not None)

    def release(self) -> None:
        super().release()
        self._reset_layout()

    def _native_usable(self) -> bool:
        return (self.kernel_layout and self.qweight is not None and self.qweight.device.type == "cpu"
                and not self.qweight.is_meta and self.in_features % 32 == 0 and self.group_size % 32 == 0
                and native.available())

    def _ensure_ready(self, in_place: bool = False) -> None:
        """After loading (portable codes, maybe float32 scales): repack for the kernel, scales to bf16.

        ``in_place=True`` writes the kernel layout over the portable codes instead of into a second
        table. Only for codes no one else holds (the loader's fresh buffers): a caller's tensor would
        be rewritten under it."""
        if self.scales_zeros.dtype != torch.bfloat16 and not self.scales_zeros.is_meta:
            self._buffers["scales_zeros"] = self.scales_zeros.to(torch.bfloat16)
        if self._packed is None and self._sz_rows is None and self._native_usable():
            # The native kernels read (scale, zero) in row order [.., N, K/g, 2]. The buffer becomes a
            # strided view of that one copy (same [.., K/g, N, 2] shape and values), not a second table.
            rows = self.scales_zeros.transpose(-3, -2).contiguous()  # no copy when already in row order
            self._buffers["scales_zeros"] = rows.transpose(-3, -2)
            self._sz_rows = rows
            return
        if self._packed is None and self._sz_rows is None and self._kernel_usable():
            layout = int4_cpu_layout()
            src = self.qweight.reshape(-1, self.out_features, self.in_features // 2)
            # Same size in both layouts. A second table would double the load's peak for a moment, and
            # the freed portable one stays in the C heap (glibc does not hand it back to the OS).
            packed = src if in_place else torch.empty_like(src)
            # Row chunks that are whole kernel blocks (1024 = 16 x 64) pack independently, so the int32
            # codes the packing op wants exist one chunk at a time (a 262144-row table would need 670 MB).
            # In place is safe for the same reason: a chunk's codes are copied out before it is written.
            step = _REPACK_ROWS
            for e in range(src.shape[0]):
                for r in range(0, self.out_features, step):
                    codes = unpack_nibbles(src[e, r : r + step]).to(torch.int32)
                    packed[e, r : r + step] = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 2)
            self._buffers["qweight"] = packed.reshape(self.qweight.shape)
            self._packed = layout

    def codes(self, index: int | None = None) -> torch.Tensor:
        q = self.qweight if index is None else self.qweight[index]
        if self._packed is None:
            return unpack_nibbles(q)
        flat = q.reshape(-1, self.out_features, self.in_features // 2)
        out = torch.stack([_unpack_cpu_int4(f, self._packed, self.in_features) for f in flat])
        return out.reshape(*q.shape[:-1], self.in_features)

    def dequantize(self, dtype=torch.float32, index: int | None = None) -> torch.Tensor:
        sz = self.scales_zeros if index is None else self.scales_zeros[index]
        return int4_dequant(self.codes(index), sz, self.group_size, dtype)

    def matmul(self, x: torch.Tensor, index: int | None = None) -> torch.Tensor:
        self._ensure_ready()
        if self._sz_rows is not None and x.device.type == "cpu":
            q = self.qweight if index is None else self.qweight[index]
            sz = self._sz_rows if index is None else self._sz_rows[index]
            y = native.int4_matmul(x.reshape(-1, self.in_features), q, sz, self.group_size)
            return y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)
        if self._packed is not None and x.device.type == "cpu":
            q = self.qweight if index is None else self.qweight[index]
            sz = self.scales_zeros if index is None else self.scales_zeros[index]
            x2 = x.reshape(-1, self.in_features).to(torch.bfloat16).contiguous()
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, q, self.group_size, sz)
            return y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)
        return F.linear(x, self.dequantize(x.dtype, index))

    def rows(self, ids: torch.Tensor, dtype) -> torch.Tensor:
        self._ensure_ready()
        flat = ids.reshape(-1)
        if self._packed is None:
            codes = unpack_nibbles(self.qweight[flat])  # [n, K]
        else:
            codes = _gather_cpu_int4_rows(self.qweight, self._packed, self.in_features, flat)
        sz = self.scales_zeros[:, flat]  # [K/g, n, 2]
        return int4_dequant(codes, sz, self.group_size, dtype).reshape(*ids.shape, self.in_features)

    # -- state dict: always the portable nibble order
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self._packed is not None and self.qweight is not None:  # a released module saves nothing
            destination[prefix + "qweight"] = pack_nibbles(self.codes())

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._reset_layout()  # the loaded codes are in file order: repack on first use


class Bf16Weight(QuantWeight):
    """Weights stored as bf16 and multiplied in the activations' dtype (float32 by default): the form a
    BF16 GGUF runs in (:func:`gemma4.io.gguf_native_model`). Half the memory of float32 weights, and,
    unlike a model cast to bf16, every activation (norms, attention, residuals, the matmuls' inputs and
    sums) keeps float32: llama.cpp's BF16 numerics, and for a bf16 checkpoint the float32 model's function.

    ``qweight`` is the bf16 table itself (no scales: ``row_tensors`` gives an empty [rows, 0] second
    tensor, so the fusing code of the CPU fast path treats it like the other schemes)."""

    scheme = "bf16"
    _fixed_dtype = ("qweight",)  # a model cast to float32 keeps its weights in bf16: that is the form
    scale_row_dim = 0

    def __init__(self, n, k, lead=(), device=None):
        super().__init__(n, k, lead)
        self.register_buffer("qweight", torch.empty(*lead, n, k, dtype=torch.bfloat16, device=device))

    def set_from_float(self, w: torch.Tensor) -> None:
        self.qweight = w.detach().to(torch.bfloat16).contiguous()

    def empty_like(self, n: int) -> "Bf16Weight":
        return Bf16Weight(n, self.in_features)

    def kernel_ready(self) -> bool:
        return (not self.lead and self.qweight is not None and self.qweight.device.type == "cpu"
                and not self.qweight.is_meta and native.available())

    def kernel_tensors(self):
        return True, self.qweight, None

    def row_tensors(self, start=0, stop=None):
        q = self.qweight[start:stop]
        return q.clone(), q.new_empty(q.shape[0], 0)

    def quantize_rows(self, w):
        return w.to(torch.bfloat16), w.new_empty(w.shape[0], 0, dtype=torch.bfloat16)

    def fill_rows(self, start, q, s, index=None):
        qw = self.qweight if index is None else self.qweight[index]
        self._check_rows(start, q, s, (q.shape[0], 0))
        qw[start:start + q.shape[0]].copy_(q)

    def set_rows(self, q, s) -> None:
        self._buffers["qweight"] = q.to(torch.bfloat16)

    def _ensure_ready(self, in_place: bool = False) -> None:
        """After loading in another float dtype: back to bf16 (exact for values that were bf16)."""
        if self.qweight is not None and self.qweight.dtype != torch.bfloat16 and not self.qweight.is_meta:
            self._buffers["qweight"] = self.qweight.to(torch.bfloat16)

    def dequantize(self, dtype=torch.float32, index: int | None = None) -> torch.Tensor:
        return (self.qweight if index is None else self.qweight[index]).to(dtype)

    def matmul(self, x: torch.Tensor, index: int | None = None) -> torch.Tensor:
        """x [.., K] -> x @ W[index]^T [.., N] in x's dtype, products and sums in float32 (native kernel)
        or in x's dtype (``F.linear`` on the widened weight, elsewhere)."""
        self._ensure_ready()
        w = self.qweight if index is None else self.qweight[index]
        if x.device.type == "cpu" and w.device.type == "cpu" and native.available():
            y = native.bf16_matmul(x.reshape(-1, self.in_features), w)
            return y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)
        return F.linear(x, w.to(x.dtype))

    def rows(self, ids: torch.Tensor, dtype) -> torch.Tensor:
        self._ensure_ready()
        return self.qweight[ids].to(dtype)


def _chunked(w: torch.Tensor, fn, sz_dim: int | None = None):
    """Run a quantizer over row chunks of a 2-D table (bounded temporaries for 262144-row tables)."""
    if w.dim() != 2 or w.shape[0] <= _ROWS_PER_CHUNK:
        return fn(w)
    # Chunks go straight into preallocated outputs: a list of parts and its concatenation would hold
    # the quantized table twice (2 x 168 MB for a 262144 x 640 int8 table).
    n, q, s, dim = w.shape[0], None, None, 0
    for i in range(0, n, _ROWS_PER_CHUNK):
        qi, si = fn(w[i : i + _ROWS_PER_CHUNK])
        if q is None:
            dim = (sz_dim if sz_dim is not None else 0) % si.dim()
            q = qi.new_empty((n, *qi.shape[1:]))
            s = si.new_empty((*si.shape[:dim], n, *si.shape[dim + 1:]))
        q[i : i + qi.shape[0]] = qi
        s.narrow(dim, i, si.shape[dim]).copy_(si)
    return q, s


# ----------------------------------------------------------------------------- modules
class Int8Linear(Int8Weight):
    """nn.Linear (no bias) with int8 per-output-channel weights."""

    def forward(self, x):
        return self.matmul(x)


class Int4Linear(Int4Weight):
    """nn.Linear (no bias) with int4 group-wise weights."""

    def forward(self, x):
        return self.matmul(x)


class Bf16Linear(Bf16Weight):
    """nn.Linear (no bias) with bf16 weights, computed in the activations' dtype."""

    def forward(self, x):
        return self.matmul(x)


class _EmbeddingMixin:
    """Quantized nn.Embedding. ``weight`` is an empty tensor that only carries the model's dtype and
    device (``Gemma4ForCausalLM.dtype``, ``embed()``'s scale rounding and checkpoint dtype detection
    read it); the table itself is ``qweight`` + scales."""

    def _init_witness(self, dtype, device):
        self.register_buffer("weight", torch.empty(0, dtype=dtype, device=device))

    @property
    def num_embeddings(self) -> int:
        return self.out_features

    @property
    def embedding_dim(self) -> int:
        return self.in_features

    def forward(self, ids):
        return self.rows(ids, self.weight.dtype)

    def head(self, h):
        """Logits through the tied table: h [.., H] -> [.., V]."""
        return self.matmul(h)


class Int8Embedding(_EmbeddingMixin, Int8Weight):
    def __init__(self, v, h, dtype=torch.float32, device=None, group_size=None):
        Int8Weight.__init__(self, v, h, device=device, group_size=group_size)
        self._init_witness(dtype, device)


class Int4Embedding(_EmbeddingMixin, Int4Weight):
    def __init__(self, v, h, group_size, dtype=torch.float32, device=None, kernel_layout=True):
        Int4Weight.__init__(self, v, h, group_size, device=device, kernel_layout=kernel_layout)
        self._init_witness(dtype, device)


class Bf16Embedding(_EmbeddingMixin, Bf16Weight):
    def __init__(self, v, h, dtype=torch.float32, device=None):
        Bf16Weight.__init__(self, v, h, device=device)
        self._init_witness(dtype, device)


class QuantExperts(Experts):
    """MoE expert stacks [E, 2I, H] / [E, H, I] quantized per expert; routing code is inherited."""

    def __init__(self, num_experts: int, hidden: int, inter: int, make):
        nn.Module.__init__(self)
        self.num_experts = num_experts
        self.gate_up_proj = make(2 * inter, hidden, (num_experts,))
        self.down_proj = make(hidden, inter, (num_experts,))

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        g, u = self.gate_up_proj.matmul(x, e).chunk(2, dim=-1)
        return self.down_proj.matmul(F.gelu(g, approximate="tanh") * u, e)


# ----------------------------------------------------------------------------- planning
def validate_request(scheme: str, group_size: int | None) -> int | None:
    if scheme not in SCHEMES:
        raise QuantizationError(f"unknown quantization scheme {scheme!r}; choose one of {', '.join(SCHEMES)}")
    if scheme == "int8":
        if group_size not in (None, 0, INT8_GROUP):
            raise QuantizationError(f"int8 group_size must be None (one scale per output row) or {INT8_GROUP} "
                                    f"(a float16 scale per 32 inputs, GGUF's Q8_0 layout), got {group_size!r}")
        return group_size or None
    if scheme == "bf16":
        if group_size not in (None, 0):
            raise QuantizationError("bf16 stores each weight as it is: group_size must be None")
        return None
    if group_size is None:
        group_size = 32
    if group_size not in GROUP_SIZES:
        raise QuantizationError(f"int4 group_size must be one of {GROUP_SIZES}, got {group_size!r}")
    return group_size


def _targets(model: Gemma4ForCausalLM, embeddings: bool, skip: Iterable[str]) -> list[tuple[str, str, nn.Module]]:
    """(qualified name, kind, module) of everything to quantize, kind in linear/embedding/ple/experts."""
    skip = tuple(skip)
    out = []
    for name, mod in model.named_modules():
        if any(s and (f".{s}." in f".{name}." ) for s in skip):
            continue
        if isinstance(mod, nn.Linear):
            out.append((name, "linear", mod))
        elif isinstance(mod, Experts) and not isinstance(mod, QuantExperts):
            out.append((name, "experts", mod))
        elif isinstance(mod, nn.Embedding) and embeddings:
            out.append((name, "ple" if name.endswith("embed_tokens_per_layer") else "embedding", mod))
    return out


def quantization_targets(model: Gemma4ForCausalLM, embeddings: bool = True,
                         skip: Iterable[str] = DEFAULT_SKIP) -> list[str]:
    """Names of the modules :func:`quantize` / :func:`prepare_quantized` replace (linear layers, the
    embedding tables, expert stacks), for a caller planning per-module overrides."""
    return [name for name, _, _ in _targets(model, embeddings, skip)]


def _shape(kind: str, mod: nn.Module) -> list[tuple[str, int, int]]:
    if kind == "experts":
        return [("gate_up_proj", mod.gate_up_proj.shape[-2], mod.gate_up_proj.shape[-1]),
                ("down_proj", mod.down_proj.shape[-2], mod.down_proj.shape[-1])]
    return [("weight", mod.weight.shape[0], mod.weight.shape[1])]


def _check_divisible(targets, group_size: int | None, plan: dict[str, tuple[str, int | None]] | None = None) -> None:
    for name, kind, mod in targets:
        gs = plan[name][1] if plan and name in plan else group_size
        if kind == "linear" and getattr(mod, "bias", None) is not None:
            raise QuantizationError(f"{name} has a bias; only bias-free linear layers are supported")
        for sub, n, k in _shape(kind, mod):
            if k % 2 and gs:
                raise QuantizationError(f"{name}.{sub}: input dim {k} is odd; int4 packs two inputs per byte")
            if gs and k % gs:
                raise QuantizationError(
                    f"group size {gs} does not divide the input dim {k} of {name}.{sub} "
                    f"(shape [{n}, {k}]); choose a group size dividing every input dim"
                )


def _plan_overrides(targets, overrides: dict[str, Any] | None) -> dict[str, tuple[str, int | None]]:
    """Validate per-module overrides ({module name: {"scheme": .., "group_size": ..}}, or just the scheme
    string) against the modules being quantized -> {name: (scheme, group_size)}."""
    if not overrides:
        return {}
    if not isinstance(overrides, dict):
        raise QuantizationError(f"quantization overrides must be a dict, got {type(overrides).__name__}")
    names = {name for name, _, _ in targets}
    plan = {}
    for name, spec in overrides.items():
        if name not in names:
            raise QuantizationError(f"quantization override names {name!r}, which is not a module being quantized")
        if isinstance(spec, str):
            spec = {"scheme": spec}
        if not isinstance(spec, dict) or "scheme" not in spec or set(spec) - {"scheme", "group_size"}:
            raise QuantizationError(f"quantization override for {name!r} must be {{'scheme': .., 'group_size': ..}}, got {spec!r}")
        plan[name] = (spec["scheme"], validate_request(spec["scheme"], spec.get("group_size")))
    return plan


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, new)


def _build(kind: str, mod: nn.Module, scheme: str, group_size: int | None, dtype, device) -> nn.Module:
    def make(n, k, lead=(), kernel_layout=True):
        if scheme == "int8":
            return Int8Weight(n, k, lead, device=device, group_size=group_size)
        if scheme == "bf16":
            return Bf16Weight(n, k, lead, device=device)
        return Int4Weight(n, k, group_size, lead, device=device, kernel_layout=kernel_layout)

    if kind == "experts":
        e, two_i, h = mod.gate_up_proj.shape
        return QuantExperts(e, h, two_i // 2, make)
    n, k = mod.weight.shape
    if kind == "linear":
        if scheme == "bf16":
            return Bf16Linear(n, k, device=device)
        if scheme == "int8":
            return Int8Linear(n, k, device=device, group_size=group_size)
        return Int4Linear(n, k, group_size, device=device)
    if scheme == "int8":
        return Int8Embedding(n, k, dtype=dtype, device=device, group_size=group_size)
    if scheme == "bf16":
        return Bf16Embedding(n, k, dtype=dtype, device=device)
    # The PLE table is only gathered from: keep it in the portable order (no kernel repack).
    return Int4Embedding(n, k, group_size, dtype=dtype, device=device, kernel_layout=(kind == "embedding"))


def _is_quantized(model: nn.Module) -> bool:
    return any(isinstance(m, (QuantWeight, QuantExperts)) for m in model.modules())


def quantize(model: Gemma4ForCausalLM, scheme: str = "int4", group_size: int | None = None, *,
             embeddings: bool = True, skip: Iterable[str] = DEFAULT_SKIP,
             precomputed: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
             overrides: dict[str, Any] | None = None, progress: Progress | None = None) -> Gemma4ForCausalLM:
    """Quantize ``model`` in place (weights only) and record the recipe in ``model.config.quantization``.

    ``scheme``: "int8" (per output channel, symmetric) or "int4" (``group_size`` 32/64/128/256,
    default 32). ``embeddings``: also quantize the token embedding/tied head and the PLE table.
    ``skip``: module-name components left in float (default: the MoE router).
    ``precomputed``: {module name: the (codes, scales) quantize_int8/int4_tensor would return}, used
    instead of rounding that module's weight (GPTQ, gemma4.quant.gptq).
    ``overrides``: {module name: {"scheme": .., "group_size": ..}} for modules stored in another scheme
    than ``scheme`` (mixed models, e.g. int4 layers beside an int8 table); recorded in the config, so
    the mixed model saves and loads like any other.
    ``progress``: a ``gemma4._util.Progress`` callable, advanced once per quantized module."""
    if getattr(model, "fast_path", False):
        raise QuantizationError("this model is on the CPU fast path (load_pretrained's default): quantize it inside "
                                "`with gemma4.infer.plain_path(model):`, or load it with fast=False")
    group_size = validate_request(scheme, group_size)
    if model.config.quantization or _is_quantized(model):
        q = model.config.quantization or {}
        raise QuantizationError(
            f"model is already quantized ({q.get('scheme', '?')}"
            f"{', group ' + str(q['group_size']) if q.get('group_size') else ''}); quantize from float weights"
        )
    dtype = model.dtype
    targets = _targets(model, embeddings, skip)
    for name, kind, mod in targets:
        for p in mod.parameters():
            if p.is_meta:
                raise QuantizationError(f"{name} has no data (meta device): load weights first, or use prepare_quantized")
            if p.dtype not in _FLOAT_OK:
                raise QuantizationError(f"{name} has dtype {p.dtype}; quantize float32/bfloat16/float16 weights")
    plan = _plan_overrides(targets, overrides)
    _check_divisible(targets, group_size, plan)
    with torch.no_grad():
        # pop as we go: each float weight is freed once its quantized copy exists
        for _ in (progress or no_progress)(range(len(targets)), f"quantize {scheme}"):
            name, kind, mod = targets.pop(0)
            dev = next(mod.parameters()).device
            new = _build(kind, mod, *plan.get(name, (scheme, group_size)), dtype, dev)
            if kind == "experts":
                new.gate_up_proj.set_from_float(mod.gate_up_proj)
                new.down_proj.set_from_float(mod.down_proj)
            else:
                new.set_from_float(mod.weight) if name not in (precomputed or {}) else _set_precomputed(new, *precomputed[name])
            _set_module(model, name, new)
            del mod, new
    _record(model, scheme, group_size, embeddings, skip, plan)
    return model


def _set_precomputed(new: nn.Module, q: torch.Tensor, s: torch.Tensor) -> None:
    """Give a fresh quantized module codes/scales made elsewhere (same format as set_from_float's)."""
    want = (new.qweight.shape[:-1] + (new.in_features,), new.scales_zeros.shape) if isinstance(new, Int4Weight) \
        else (new.qweight.shape, new.scales.shape)
    if (tuple(q.shape), tuple(s.shape)) != tuple(map(tuple, want)):
        raise QuantizationError(f"precomputed shapes {list(q.shape)}, {list(s.shape)} do not match {want}")
    if isinstance(new, Int4Weight):
        new.qweight, new.scales_zeros = pack_nibbles(q.to(torch.uint8)), s.to(torch.bfloat16)
        new._reset_layout()
    else:
        new.qweight, new.scales = q.to(torch.int8), s.to(new._scale_dtype)
    new._ensure_ready()


def _record(model, scheme, group_size, embeddings, skip, plan=None) -> None:
    q = {"format": FORMAT_VERSION, "scheme": scheme, "group_size": group_size, "embeddings": bool(embeddings),
         "skip": list(skip)}
    if plan:  # only mixed models carry the key: single-scheme configs are unchanged
        q["overrides"] = {n: {"scheme": sc, "group_size": gs} for n, (sc, gs) in sorted(plan.items())}
    cfg = model.config.replace(quantization=q)
    model.config = cfg
    model.model.config = cfg


def prepare_quantized(model: Gemma4ForCausalLM, qcfg: dict[str, Any]) -> Gemma4ForCausalLM:
    """Give a freshly built (usually meta-device) model the module structure ``quantize`` produced for
    ``qcfg`` (a config's ``quantization`` section), so packed weights + scales can be loaded into it."""
    if not isinstance(qcfg, dict):
        raise QuantizationError(f"quantization config must be a dict, got {type(qcfg).__name__}")
    unknown = sorted(set(qcfg) - {"format", "scheme", "group_size", "embeddings", "skip", "overrides"})
    if unknown:
        raise QuantizationError(f"unknown key(s) in the quantization config: {', '.join(unknown)}")
    if qcfg.get("format", FORMAT_VERSION) != FORMAT_VERSION:
        raise QuantizationError(f"quantization format {qcfg.get('format')!r} is not supported (this version reads {FORMAT_VERSION})")
    if "scheme" not in qcfg:
        raise QuantizationError("quantization config has no 'scheme'")
    scheme = qcfg["scheme"]
    group_size = validate_request(scheme, qcfg.get("group_size"))
    embeddings = bool(qcfg.get("embeddings", True))
    skip = qcfg.get("skip", list(DEFAULT_SKIP))
    if _is_quantized(model):
        raise QuantizationError("model already has quantized modules")
    dtype = model.dtype
    targets = _targets(model, embeddings, skip)
    plan = _plan_overrides(targets, qcfg.get("overrides"))
    _check_divisible(targets, group_size, plan)
    for name, kind, mod in targets:
        dev = next(mod.parameters()).device
        _set_module(model, name, _build(kind, mod, *plan.get(name, (scheme, group_size)), dtype, dev))
    _record(model, scheme, group_size, embeddings, skip, plan)
    return model


def to_kernel_layout(model: nn.Module, in_place: bool = False) -> nn.Module:
    """Repack every int4 weight still in the portable file layout into the CPU kernel's layout now
    rather than on first use (the first forward would otherwise pay for the repack and hold each table
    twice for a moment). ``load_pretrained`` already does this, in place. ``in_place``: see
    ``Int4Weight._ensure_ready`` — only for weights whose tensors no one else holds."""

    for m in model.modules():
        if isinstance(m, QuantWeight):
            m._ensure_ready(in_place=in_place)
    release_free_heap()
    return model


def dequantize_model(model: Gemma4ForCausalLM, dtype: torch.dtype | None = None) -> Gemma4ForCausalLM:
    """Float copy of every quantized weight back into ordinary modules (for comparisons/exports)."""
    dtype = dtype or model.dtype
    for name, mod in list(model.named_modules()):
        if isinstance(mod, (Int8Linear, Int4Linear, Bf16Linear)):
            lin = nn.Linear(mod.in_features, mod.out_features, bias=False, device=mod.qweight.device, dtype=dtype)
            lin.weight = nn.Parameter(mod.dequantize(dtype), requires_grad=False)
            _set_module(model, name, lin)
        elif isinstance(mod, (Int8Embedding, Int4Embedding, Bf16Embedding)):
            emb = nn.Embedding(mod.out_features, mod.in_features, device=mod.qweight.device, dtype=dtype)
            emb.weight = nn.Parameter(mod.dequantize(dtype), requires_grad=False)
            _set_module(model, name, emb)
        elif isinstance(mod, QuantExperts):
            ex = Experts.__new__(Experts)
            nn.Module.__init__(ex)
            ex.num_experts = mod.num_experts
            ex.gate_up_proj = nn.Parameter(mod.gate_up_proj.dequantize(dtype), requires_grad=False)
            ex.down_proj = nn.Parameter(mod.down_proj.dequantize(dtype), requires_grad=False)
            _set_module(model, name, ex)
    cfg = model.config.replace(quantization=None)
    model.config = model.model.config = cfg
    return model


def model_nbytes(model: nn.Module) -> int:
    """Bytes of every parameter and buffer the model holds (each storage once)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        key = (t.untyped_storage().data_ptr(), t.device) if not t.is_meta else id(t)
        if key in seen:
            continue
        seen.add(key)
        total += t.numel() * t.element_size()
    return total
