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

Other GGUF types have no exact int4-g32 image (Q5_0: 5-bit, Q6_K: 6-bit with 16-weight scales, Q8_0:
8-bit) and are quantized from their dequantized values with our RTN quantizer, in the scheme asked for
(default int8 per output channel). In llama.cpp's Q4_K_M file of Gemma 3 270M only the 1024- and
2048-wide matrices (attn_output, most ffn_down) are Q4_K: 640-wide rows are not whole 256-blocks, so
q/k/v/gate/up fall back to Q5_0/Q8_0 there. :func:`gguf_native_types` reports the split.
"""

from __future__ import annotations

import os
from collections import Counter

import numpy as np
import torch

from gemma4._util import Progress, release_free_heap
from gemma4.io.gguf import GGUFError, GGUFFile, gguf_to_hf, load_gguf
from gemma4.model import Gemma4ForCausalLM
from gemma4.quant import quantize

__all__ = ["Q4_K", "q4k_blocks", "q4k_to_int4", "gguf_native_types", "gguf_native_model"]

Q4_K = 12  # gguf.GGMLQuantizationType.Q4_K
_Q4K_BYTES, _QK = 144, 256  # bytes per block, weights per block


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


def gguf_native_types(path: str | os.PathLike) -> dict[str, list[str]]:
    """GGUF tensor type name -> the tensors of that type (GGUF names), for reporting what stays 4-bit."""
    g = GGUFFile(path)
    out: dict[str, list[str]] = {}
    for name, t in g.tensors.items():
        out.setdefault(t.type_name, []).append(name)
    return out


def gguf_native_model(path: str | os.PathLike, dtype: torch.dtype = torch.bfloat16, rest: str = "int8",
                      embedding: str | None = None, progress: Progress | None = None) -> Gemma4ForCausalLM:
    """Load a GGUF with its Q4_K matrices kept as int4-g32 (same codes; see the module docstring) and every
    other matrix quantized from its dequantized values by :func:`gemma4.quant.quantize`.

    ``rest``: scheme of the non-Q4_K linear layers ("int8" per channel, or "int4" = int4-g32 RTN).
    ``embedding``: scheme of the token embedding / tied head (default: ``rest``). ``dtype``: the float
    tensors (norms) and activations. The result is an ordinary quantized model (mixed schemes are
    recorded in ``config.quantization["overrides"]``): ``save_pretrained`` / ``load_pretrained`` /
    ``use_fast_path`` work on it. ``progress`` advances per tensor read, then per matrix quantized."""
    for what, sc in (("rest", rest), ("embedding", embedding)):
        if sc not in ("int8", "int4") and not (what == "embedding" and sc is None):
            raise ValueError(f"{what} must be 'int8' or 'int4', got {sc!r}")
    embedding = embedding or rest
    g = GGUFFile(path)
    # Every tensor is dequantized, then the Q4_K ones are replaced and the rest re-rounded to int8/int4.
    # bfloat16 rather than float32 halves the transient (the 270M file: ~1.1 GB -> ~0.55 GB): the int8 grid
    # (amax/127 per row) is 2^-1 .. 2^-7 of a value, far coarser than bf16's 2^-9 relative rounding, and
    # the output distribution moves as little (KL to the float32 model 0.0056 vs 0.0065 nats, 9 tokens).
    model = load_gguf(path, dtype=torch.bfloat16, progress=progress)
    names = {n for n, _ in model.named_modules()}
    precomputed, overrides = {}, {}
    for name, t in g.tensors.items():
        mod = _module_name(name) if t.qtype == Q4_K else None
        if mod is None or mod not in names or len(t.shape) != 2:
            continue
        precomputed[mod] = q4k_to_int4(g.raw(name), t.shape)
        if rest != "int4":
            overrides[mod] = {"scheme": "int4", "group_size": 32}
    emb = "model.embed_tokens"
    if embedding != rest and emb not in precomputed:
        overrides[emb] = {"scheme": embedding, "group_size": 32 if embedding == "int4" else None}
    quantize(model, rest, 32 if rest == "int4" else None, precomputed=precomputed, overrides=overrides,
             progress=progress)
    model = model.to(dtype)
    model.gguf_native = {"q4k_int4": sorted(precomputed), "types": dict(Counter(t.type_name for t in g.tensors.values())),
                         "rest": rest, "embedding": embedding}
    release_free_heap()  # the dequantized float weights are gone: give their heap back to the OS
    return model.eval()
