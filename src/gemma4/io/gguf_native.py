"""Keep a GGUF's own 4-bit blocks instead of dequantizing and re-quantizing them.

A Q4_K block (144 bytes, 256 weights) is eight 32-weight sub-blocks, each ``w = d*sc_j * q - dmin*m_j``
with q in 0..15, sc_j/m_j 6-bit integers and d/dmin the block's fp16 super-scales. That is an
asymmetric 4-bit grid per 32 inputs — the int4-g32 format of :mod:`gemma4.quant`
(``w = (q - 8) * scale + zero``) with the *same* codes and

    scale = d * sc_j,    zero = 8 * scale - dmin * m_j.

The only loss is rounding (scale, zero) to bf16, the dtype ``_weight_int4pack_mm_for_cpu`` takes:
per weight at most ``|q - 8| * |Δscale| + |Δzero| <= (8 |scale| + |zero|) * 2^-8`` (bf16 keeps 8
significant bits). Re-quantizing the dequantized weights with our own quantizer instead picks a new
grid and rounds a second time.

A Q8_0 block (34 bytes) is an fp16 scale and 32 int8 codes: grouped int8 (``group_size=32``, float16
scales) holds it exactly, codes and scales as stored. Other GGUF types (Q5_0: 5-bit, Q6_K: 6-bit with
16-weight scales, ...) have no exact image and are quantized from their dequantized values with our RTN
quantizer, in the scheme asked for (default int8 with a float16 scale per 32 inputs, which keeps them
within Q8_0's rounding). In llama.cpp's Q4_K_M file of Gemma 3 270M only the 1024- and
2048-wide matrices (attn_output, most ffn_down) are Q4_K: 640-wide rows are not whole 256-blocks, so
q/k/v/gate/up fall back to Q5_0/Q8_0 there. :func:`gguf_native_types` reports the split.

Loading streams the file into a model built on the meta device with its quantized modules already in
place: each tensor is read with plain file reads (a memory map's touched pages would count as resident
memory until it is closed) in row chunks of ~1M weights, dequantized to bf16 and rounded into the
module's preallocated codes. No float copy of the model, or of a whole table, ever exists, so the peak
is the quantized model plus a few MiB of scratch (benchmarks/memory_gguf.py).
"""

from __future__ import annotations

import math
import mmap
import os
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from gemma4._util import Progress, no_progress, release_free_heap
from gemma4.io.checkpoint import _set_tensor, map_key
from gemma4.io.gguf import (_Q8_0, GGUFError, GGUFFile, TensorInfo, _check_types, _norm_shift, config_from_gguf,
                            dequantize, gguf_to_hf, q8_0_blocks)
from gemma4.model import Gemma4ForCausalLM, build_model
from gemma4.quant import QuantWeight, native, prepare_quantized, to_kernel_layout
from gemma4.quant.rtn import DEFAULT_SKIP, FORMAT_VERSION, quantization_targets

__all__ = ["Q4_K", "q4k_blocks", "q4k_to_int4", "gguf_is_bf16", "gguf_is_quantized", "gguf_weight_form",
           "gguf_native_types", "gguf_native_model"]

Q4_K = 12  # gguf.GGMLQuantizationType.Q4_K
_Q4K_BYTES, _QK = 144, 256  # bytes per block, weights per block
# Weights per row chunk while streaming: the bf16 chunk is 512 KiB and the int4 quantizer's float32
# scratch a few times 1 MiB, whatever the table's size.
_CHUNK_ELEMS = 1 << 18
# Buffers from this size up get a memory mapping of their own (see _own_mapping).
_OWN_MAPPING_BYTES = 64 << 10


def _own_mapping(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised tensor in an anonymous private memory mapping of its own, freed (unmapped) the
    moment the tensor dies. Why: the first generate packs the model for the CPU fast path, which fuses
    q/k/v and gate/up into new tensors and frees the separate ones. From the C heap (torch.empty; glibc
    serves blocks up to its raised mmap threshold, 32 MiB, from the heap) the freed ones stay as holes
    the fused copies do not fit in: +45 MiB resident on Gemma 3 270M, 2.5 MiB per layer. Page aligned."""
    n = math.prod(shape) * dtype.itemsize
    if n < _OWN_MAPPING_BYTES:
        return torch.empty(shape, dtype=dtype)
    mm = mmap.mmap(-1, n, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    return torch.frombuffer(mm, dtype=torch.uint8).view(dtype).reshape(shape)  # the tensor keeps mm alive


def q4k_blocks(raw: np.ndarray | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Raw Q4_K bytes (``n_blocks * 144``) -> (codes uint8 [B, 256], scale float64 [B, 8], min float64 [B, 8])
    with ``w = scale * code - min`` per 32-weight sub-block, exactly (float64 holds the fp16 x 6-bit products)."""
    if not isinstance(raw, torch.Tensor):  # a copy: the file's memory map is read-only
        raw = torch.from_numpy(np.array(raw, dtype=np.uint8, copy=True))
    b = raw.reshape(-1, _Q4K_BYTES)
    d = b[:, 0:2].contiguous().view(torch.float16).double()  # [B, 1]
    dmin = b[:, 2:4].contiguous().view(torch.float16).double()
    s = b[:, 4:16].reshape(-1, 3, 4)  # 12 bytes: 8 six-bit scales and 8 six-bit mins
    lo, mid, hi = s[:, 0], s[:, 1], s[:, 2]  # [B, 4] each
    # Sub-blocks 0-3: low 6 bits of bytes 0-3 (scales) / 4-7 (mins). Sub-blocks 4-7: a nibble of bytes
    # 8-11 (low: scale, high: min) plus the top two bits of bytes 0-3 / 4-7 as bits 4-5.
    sc = torch.cat([lo & 63, (hi & 15) | ((lo >> 2) & 48)], -1)
    mn = torch.cat([mid & 63, (hi >> 4) | ((mid >> 2) & 48)], -1)
    qs = b[:, 16:].reshape(-1, 4, 32)  # 4 x 32 bytes: low nibbles = sub-block 2c, high = 2c + 1
    codes = torch.stack([qs & 15, qs >> 4], 2).reshape(-1, _QK)
    return codes, d * sc.double(), dmin * mn.double()


def q4k_to_int4(raw: np.ndarray | torch.Tensor, shape: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """A Q4_K tensor's bytes and torch shape [N, K] -> (codes uint8 [N, K], scales_zeros bf16 [K/32, N, 2]),
    the int4-g32 format of :func:`gemma4.quant.quantize_int4_tensor`, same codes, (scale, zero) rounded
    to bf16 from their exact values."""
    n, k = (int(x) for x in shape)
    if k % _QK:
        raise GGUFError(f"Q4_K rows are whole {_QK}-weight blocks; got shape {list(shape)}")
    codes, scale, mn = q4k_blocks(raw)
    if codes.shape[0] * _QK != n * k:
        raise GGUFError(f"{codes.shape[0]} Q4_K blocks do not hold a [{n}, {k}] tensor")
    zero = 8.0 * scale - mn  # (q - 8) * scale + zero == scale * q - min
    sz = torch.stack([scale, zero], -1).reshape(n, k // 32, 2).to(torch.bfloat16)  # [N, K/32, 2]
    return codes.reshape(n, k), sz.transpose(0, 1).contiguous()


def _module_name(gguf_name: str) -> str | None:
    hf = gguf_to_hf(gguf_name)
    return hf[: -len(".weight")] if hf and hf.endswith(".weight") else None


_FLOAT_TYPES = {"F32", "F16", "BF16"}


def gguf_weight_form(path: str | os.PathLike) -> str:
    """"quantized" (some matrix in a quantized type), "bf16" (every matrix BF16) or "float" (one header parse)."""
    types = {t.type_name for t in GGUFFile(path).tensors.values() if len(t.shape) == 2}
    return "quantized" if types - _FLOAT_TYPES else "bf16" if types == {"BF16"} else "float"


def gguf_is_quantized(path: str | os.PathLike) -> bool:
    """Whether a GGUF stores any 2-D matrix in a quantized type (then it runs in quantized form by default)."""
    return gguf_weight_form(path) == "quantized"


def gguf_is_bf16(path: str | os.PathLike) -> bool:
    """Whether every 2-D matrix of a GGUF is stored as BF16 (then, with the compiled kernels, it runs as
    bf16 weights with float32 activations: :func:`gguf_native_model` with ``rest="bf16"``)."""
    return gguf_weight_form(path) == "bf16"


def gguf_native_types(path: str | os.PathLike) -> dict[str, list[str]]:
    """GGUF tensor type name -> the tensors of that type (GGUF names), for reporting what stays 4-bit."""
    g = GGUFFile(path)
    out: dict[str, list[str]] = {}
    for name, t in g.tensors.items():
        out.setdefault(t.type_name, []).append(name)
    return out


def _plan(tensors: dict[str, TensorInfo], targets: set[str]) -> list[str]:
    """Modules whose GGUF tensor is a Q4_K matrix they can keep (2-D, and a module being quantized)."""
    out = []
    for name, t in tensors.items():
        mod = _module_name(name) if t.qtype == Q4_K else None
        if mod is not None and mod in targets and len(t.shape) == 2:
            out.append(mod)
    return out


def _read_rows(fh, path: Path, t: TensorInfo, row_bytes: int, r0: int, r1: int) -> np.ndarray:
    """Stored bytes of rows r0..r1 (flattened over leading dims) of ``t``, read into fresh memory."""
    n = (r1 - r0) * row_bytes
    buf = np.empty(n, dtype=np.uint8)
    fh.seek(t.offset + r0 * row_bytes)
    if fh.readinto(buf) != n:
        raise GGUFError(f"{path}: tensor {t.name!r} ends early (file truncated while loading?)")
    return buf


def q8_0_to_int8(raw: torch.Tensor, shape: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Raw Q8_0 bytes of ``shape`` [N, K] -> (codes int8 [N, K], scales float16 [N, K/32]), as stored."""
    n, k = shape
    q, d = q8_0_blocks(raw)  # [N*K/32, 32], [N*K/32, 1]
    return q.view(n, k), d.view(n, k // 32)


def _fill_quantized(fh, path: Path, t: TensorInfo, mod: QuantWeight, keep_q4k: bool) -> None:
    """Stream one GGUF tensor into a quantized module: ``keep_q4k``: its Q4_K codes as int4-g32; a Q8_0
    tensor into grouped int8, codes and scales as stored; otherwise dequantized to bf16 and rounded by
    the module's own quantizer, chunk by chunk."""
    want = (*mod.lead, mod.out_features, mod.in_features)
    if tuple(t.shape) != want:
        raise GGUFError(f"{path}: tensor {t.name!r} has shape {list(t.shape)} but the config expects {list(want)}")
    mod.allocate(empty=_own_mapping)
    k, n = mod.in_features, mod.out_features
    rows = math.prod(t.shape[:-1])
    row_bytes = t.nbytes // rows  # GGUFFile checked that rows are whole blocks
    step = max(1, _CHUNK_ELEMS // k)
    for e in range(math.prod(mod.lead)):  # one pass for a 2-D weight; per expert for a stack
        index = e if mod.lead else None
        for r0 in range(0, n, step):
            r1 = min(n, r0 + step)
            raw = _read_rows(fh, path, t, row_bytes, e * n + r0, e * n + r1)
            if keep_q4k:
                q, s = q4k_to_int4(torch.from_numpy(raw), (r1 - r0, k))
            elif t.qtype == _Q8_0 and mod.scheme == "int8" and mod.group_size == 32:
                q, s = q8_0_to_int8(torch.from_numpy(raw), (r1 - r0, k))
            else:
                w = dequantize(raw, t.qtype, (r1 - r0, k), torch.bfloat16, what=f"tensor {t.name!r} in {path}")
                q, s = mod.quantize_rows(w)
            mod.fill_rows(r0, q, s, index)


def gguf_native_model(path: str | os.PathLike, dtype: torch.dtype | None = None, rest: str = "int8",
                      embedding: str | None = None, progress: Progress | None = None) -> Gemma4ForCausalLM:
    """Load a GGUF with its Q4_K matrices kept as int4-g32 (same codes; see the module docstring) and every
    other matrix quantized from its dequantized (bf16) values by the RTN quantizer of :mod:`gemma4.quant`.

    ``rest``: scheme of the non-Q4_K linear layers ("int8": int8 with a float16 scale per 32 inputs, Q8_0
    tensors kept exactly and others rounded to that grid; "int4" = int4-g32 RTN; or "bf16": the matrices'
    values rounded to bf16, exact for a BF16 file, with its other floats read in float32).
    ``embedding``: scheme of the token embedding / tied head (default: ``rest``). ``dtype``: the float
    tensors (norms: read in float32, then cast) and activations; default
    :func:`gemma4.quant.native.activation_dtype` (float32 with the compiled kernels, else bf16). The
    result is an ordinary quantized model (mixed schemes are recorded in ``config.quantization["overrides"]``): ``save_pretrained`` /
    ``load_pretrained`` / ``use_fast_path`` work on it. ``progress`` advances once per tensor.

    Tensors are streamed straight into the quantized modules (see the module docstring): the peak is the
    quantized model plus a few MiB, never a float copy of it."""
    for what, sc in (("rest", rest), ("embedding", embedding)):
        if sc not in ("int8", "int4", "bf16") and not (what == "embedding" and sc is None):
            raise ValueError(f"{what} must be 'int8', 'int4' or 'bf16', got {sc!r}")
    embedding = embedding or rest
    dtype = dtype or native.activation_dtype()
    g = GGUFFile(path)
    path = g.path
    if "token_embd.weight" not in g.tensors:
        raise GGUFError(f"{path}: no token_embd.weight tensor: there are no weights to load")
    cfg = config_from_gguf(g)
    hf_names = {name: _hf_name(path, name) for name in g.tensors}
    _check_types(g, [n for n, hf in hf_names.items() if hf is not None])
    tensors = dict(g.tensors)
    types = dict(Counter(t.type_name for t in tensors.values()))
    del g  # the header (a 262k-entry vocabulary as Python objects) and its memory map go before the weights come
    release_free_heap()

    # The module structure quantize() gave the dequantized model, built without weights: Q4_K matrices
    # int4-g32, the others in `rest`, the token embedding in `embedding`, recorded in the config the same way.
    model = build_model(cfg, dtype=dtype, device="meta")
    kept = _plan(tensors, set(quantization_targets(model)))
    overrides = {m: {"scheme": "int4", "group_size": 32} for m in kept} if rest != "int4" else {}
    emb = "model.embed_tokens"
    if embedding != rest and emb not in kept:
        overrides[emb] = {"scheme": embedding, "group_size": 32 if embedding != "bf16" else None}
    qcfg = {"format": FORMAT_VERSION, "scheme": rest, "group_size": 32 if rest != "bf16" else None,
            "embeddings": True, "skip": list(DEFAULT_SKIP)}
    if overrides:
        qcfg["overrides"] = overrides
    prepare_quantized(model, qcfg)

    qmods = {n: m for n, m in model.named_modules() if isinstance(m, QuantWeight)}
    floats = dict(model.state_dict(keep_vars=True))
    kept_set, seen = set(kept), set()
    ticks = iter((progress or no_progress)(range(len(tensors)), f"loading {path.name}"))
    with open(path, "rb") as fh:
        for name, t in tensors.items():
            key = map_key(hf_names[name], cfg) if hf_names[name] is not None else None
            if key is not None:
                if key in seen:
                    raise GGUFError(f"{path}: two tensors load into {key!r} (the second: {name!r})")
                seen.add(key)
                mod = key[: -len(".weight")] if key.endswith(".weight") else key  # experts: the stack's own name
                if mod in qmods:
                    _fill_quantized(fh, path, t, qmods[mod], keep_q4k=mod in kept_set)
                    # Its int4 codes were written here and are held by nothing else: repack them over
                    # themselves now, and hand the chunks' scratch back to the OS (tensors of other
                    # widths would leave it as holes in the heap: +13 MiB by the end of the 270M file).
                    to_kernel_layout(qmods[mod], in_place=True)
                elif key in floats:
                    _set_tensor(model, key, _read_float(fh, path, t, key, floats[key], cfg, dtype))
                else:
                    raise GGUFError(f"{path}: unexpected tensor {name!r}: the config builds no {key!r}")
            next(ticks, None)
    for _ in ticks:
        pass
    missing = sorted(n for n, x in [*model.named_parameters(), *model.named_buffers()] if x.is_meta)
    if missing:
        more = f" (and {len(missing) - 8} more)" if len(missing) > 8 else ""
        raise GGUFError(f"missing tensor(s) in {path}: {', '.join(missing[:8])}{more}")
    model.gguf_native = {"q4k_int4": sorted(kept), "types": types, "rest": rest, "embedding": embedding}
    return model.eval()


def _hf_name(path: Path, name: str) -> str | None:
    """Our name for a GGUF tensor (None: derived from the config, never loaded)."""
    try:
        return gguf_to_hf(name)
    except KeyError:
        raise GGUFError(f"{path}: tensor {name!r} has no place in a Gemma text model") from None


def _read_float(fh, path: Path, t: TensorInfo, key: str, want: torch.Tensor, cfg, dtype: torch.dtype) -> torch.Tensor:
    """A tensor that stays in float (norms, scalars, the router): the file's values in float32 (Gemma 3's
    stored 1 + w undone there), then cast to ``dtype``: exact in a float32 model, one rounding in bf16."""
    if tuple(t.shape) != tuple(want.shape):
        raise GGUFError(f"{path}: tensor {t.name!r} has shape {list(t.shape)} but the config expects "
                        f"{list(want.shape)}")
    if not want.is_floating_point():
        raise GGUFError(f"{path}: tensor {t.name!r} loads into {key!r}, which is not a float tensor")
    raw = _read_rows(fh, path, t, t.nbytes, 0, 1)
    x = dequantize(raw, t.qtype, t.shape, torch.float32, what=f"tensor {t.name!r} in {path}")
    return (x - _norm_shift(key, cfg)).to(dtype)
