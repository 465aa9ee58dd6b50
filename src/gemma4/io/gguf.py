"""GGUF checkpoints: llama.cpp's Gemma 3 / Gemma 4 files in, Gemma 4 / Gemma 3 files out.

Reading: the header is parsed here over a read-only memory map (the ``gguf`` package's ``GGUFReader``
builds a numpy view per vocabulary entry and needs ~16 s for a 262k-token vocab; this parser needs
well under a second). Tensors are dequantized one at a time, in row chunks, straight into the target
dtype, and streamed into a meta-built model by ``checkpoint.load_state_streaming``, so the weights
are never held twice. Block formats are decoded by ``gguf.quants`` (every type it implements: Q4_0 ..
Q8_0, the K-quants, IQ*, TQ*, MXFP4 ...); F32/F16/BF16 and Q8_0 (the usual embedding type) have torch
fast paths that give the same bits.

Conventions that differ from Hugging Face checkpoints, all handled in ``gguf_to_hf`` /
``_norm_shift``:
* tensor names (``blk.3.attn_q.weight`` <-> ``model.layers.3.self_attn.q_proj.weight``);
* shapes: GGUF lists dimensions fastest-first (ggml ``ne``), torch slowest-first, so they are reversed;
* Gemma 3 files store every RMSNorm scale as ``1 + w`` (llama.cpp's converter adds the 1 that
  Gemma 3's norm applies at run time); Gemma 4 norms multiply by ``w`` and are stored unchanged;
* Gemma 4 files carry a ``rope_freqs`` tensor (1 for rotated pairs, 1e30 for the rest) that encodes
  the proportional RoPE of full-attention layers: it is read as ``partial_rotary_factor``.
"""

from __future__ import annotations

import json
import logging
import math
import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from gemma4._util import Progress, atomic_path, no_progress
from gemma4.infer import plain_path
from gemma4.io.checkpoint import CheckpointError, CheckpointNotFoundError, load_state_streaming
from gemma4.model import FULL, SLIDING, ConfigError, Gemma4Config, Gemma4ForCausalLM, build_model
from gemma4.model.config import LIMITS
from gemma4.quant import QuantWeight

log = logging.getLogger("gemma4")

__all__ = [
    "GGUFError", "GGUFFile", "TensorInfo", "load_gguf", "save_gguf", "config_from_gguf", "gguf_to_hf",
    "hf_to_gguf", "dequantize",
]


class GGUFError(CheckpointError):
    """A GGUF file that cannot be read as a Gemma model; the message names the file and the problem."""


# ----------------------------------------------------------------------------- low-level format
def _gguf():
    """The ``gguf`` package (constants, block (de)quantizers, writer), imported on first use."""
    try:
        import gguf
    except ImportError:
        raise GGUFError("reading or writing GGUF needs the `gguf` package (pip install gguf)") from None
    return gguf


_MAGIC = b"GGUF"
# GGUF metadata value types (gguf.GGUFValueType): id -> struct format for scalars.
_SCALAR = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_NUMPY = {0: np.uint8, 1: np.int8, 2: np.uint16, 3: np.int16, 4: np.uint32, 5: np.int32, 6: np.float32,
          7: np.bool_, 10: np.uint64, 11: np.int64, 12: np.float64}
_STRING, _ARRAY = 8, 9
_MAX_ARRAY_DEPTH = 4  # arrays of arrays are legal; deeper nesting only ever comes from a corrupt file
_MAX_ALIGN = 1 << 20
_U32, _U64 = struct.Struct("<I"), struct.Struct("<Q")

# Tensor types read without gguf.quants (id -> (numpy dtype of the raw data, torch dtype)).
_F32, _F16, _Q8_0, _F64, _BF16 = 0, 1, 8, 28, 30
_INTEGER_TYPES = {24: "I8", 25: "I16", 26: "I32", 27: "I64"}


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # torch order (slowest dimension first): ggml's ne reversed
    qtype: int  # gguf.GGMLQuantizationType value
    offset: int  # absolute byte offset in the file
    nbytes: int

    @property
    def type_name(self) -> str:
        try:
            return _gguf().GGMLQuantizationType(self.qtype).name
        except ValueError:
            return f"type {self.qtype}"


class _Truncated(Exception):
    pass


class GGUFFile:
    """A GGUF file's metadata (``fields``: key -> python value), tensor table and raw tensor bytes.

    ``value_types`` keeps each key's GGUF type (and array element type) so metadata can be copied to
    another file unchanged."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_file():
            raise CheckpointNotFoundError(f"no GGUF file at {self.path}")
        self.size = self.path.stat().st_size
        if self.size < 24:
            raise GGUFError(f"{self.path} is {self.size} bytes long: too short for a GGUF header (truncated?)")
        try:
            with open(self.path, "rb") as f:
                self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except (OSError, ValueError) as e:
            raise GGUFError(f"cannot read {self.path}: {e}") from None
        self.fields: dict[str, Any] = {}
        self.value_types: dict[str, tuple[int, int | None]] = {}
        self.tensors: dict[str, TensorInfo] = {}
        self._pos = 0
        try:
            self._parse()
        except (_Truncated, struct.error):
            self._mm.close()
            raise GGUFError(
                f"{self.path} ends inside its header (at byte {self._pos} of {self.size}): the file is truncated"
            ) from None
        except GGUFError:
            self._mm.close()
            raise

    # -- header parsing
    def _take(self, n: int) -> int:
        p = self._pos
        if p + n > self.size:
            raise _Truncated
        self._pos = p + n
        return p

    def _u32(self) -> int:
        return _U32.unpack_from(self._mm, self._take(4))[0]

    def _u64(self) -> int:
        return _U64.unpack_from(self._mm, self._take(8))[0]

    def _bytes(self) -> bytes:
        n = self._u64()
        p = self._take(n)
        return self._mm[p:p + n]

    def _str(self) -> str:
        return self._bytes().decode("utf-8", errors="replace")

    def _value(self, vtype: int, depth: int = 0) -> Any:
        if vtype in _SCALAR:
            fmt = _SCALAR[vtype]
            v = struct.unpack_from(fmt, self._mm, self._take(struct.calcsize(fmt)))[0]
            # float32 metadata (eps 1e-6, softcap 30.0): the shortest decimal that rounds to it, not
            # its exact binary value 9.99999997e-07.
            return float(str(np.float32(v))) if vtype == 6 else v
        if vtype == _STRING:
            return self._str()
        if vtype == _ARRAY:
            etype, n = self._u32(), self._u64()
            if etype in _NUMPY:
                item = np.dtype(_NUMPY[etype]).itemsize
                p = self._take(n * item)
                return np.frombuffer(self._mm, dtype=_NUMPY[etype], count=n, offset=p).tolist()
            if etype == _STRING:
                return self._str_array(n)
            if etype == _ARRAY and depth >= _MAX_ARRAY_DEPTH:
                raise GGUFError(f"{self.path}: metadata arrays nested deeper than {_MAX_ARRAY_DEPTH} levels at byte "
                                f"{self._pos} (corrupt file?)")
            if etype not in (_ARRAY,) and etype not in _SCALAR:
                raise GGUFError(f"{self.path}: unknown metadata array element type {etype} at byte {self._pos}")
            if n > self.size:  # every element takes at least one byte
                raise _Truncated
            return [self._value(etype, depth + 1) for _ in range(n)]
        raise GGUFError(f"{self.path}: unknown metadata value type {vtype} at byte {self._pos} (corrupt file?)")

    def _str_array(self, n: int) -> list[str]:
        # The hot loop of the header (262k vocabulary entries): plain struct reads on the map.
        mm, size, pos, unpack = self._mm, self.size, self._pos, _U64.unpack_from
        out = []
        for _ in range(n):
            if pos + 8 > size:
                self._pos = pos
                raise _Truncated
            ln = unpack(mm, pos)[0]
            pos += 8
            if pos + ln > size:
                self._pos = pos
                raise _Truncated
            out.append(mm[pos:pos + ln].decode("utf-8", errors="replace"))
            pos += ln
        self._pos = pos
        return out

    def _parse(self) -> None:
        gguf = _gguf()
        magic = self._mm[self._take(4):4]
        if magic != _MAGIC:
            raise GGUFError(f"{self.path} is not a GGUF file (starts with {magic!r}, expected b'GGUF')")
        self.version = self._u32()
        if self.version not in (2, 3):
            hint = " (big-endian files are not supported)" if self.version > 0xFFFF else ""
            raise GGUFError(f"{self.path}: unsupported GGUF version {self.version}{hint}; versions 2 and 3 are read")
        n_tensors, n_kv = self._u64(), self._u64()
        if n_tensors > self.size or n_kv > self.size:
            raise GGUFError(f"{self.path}: header claims {n_tensors} tensors / {n_kv} keys: corrupt file")
        for _ in range(n_kv):
            key = self._str()
            vtype = self._u32()
            etype = None
            if vtype == _ARRAY:
                etype = _U32.unpack_from(self._mm, self._pos)[0] if self._pos + 4 <= self.size else None
            self.fields[key] = self._value(vtype)
            self.value_types[key] = (vtype, etype)
        infos = []
        for _ in range(n_tensors):
            name = self._str()
            n_dims = self._u32()
            if n_dims > 8:
                raise GGUFError(f"{self.path}: tensor {name!r} claims {n_dims} dimensions: corrupt file")
            ne = [self._u64() for _ in range(n_dims)]
            qtype, rel = self._u32(), self._u64()
            infos.append((name, tuple(reversed(ne)), qtype, rel))
        align = self.fields.get("general.alignment", 32)
        # llama.cpp's rule: a power of two (tensor data is placed at multiples of it).
        if isinstance(align, bool) or not isinstance(align, int) or not 0 < align <= _MAX_ALIGN or align & (align - 1):
            raise GGUFError(f"{self.path}: general.alignment {align!r} is not a power of two in 1..{_MAX_ALIGN}")
        data_start = -(-self._pos // align) * align
        expected = 0  # where the next tensor must start: the previous one's end, padded to the alignment
        for name, shape, qtype, rel in infos:
            if name in self.tensors:
                raise GGUFError(f"{self.path}: tensor {name!r} appears twice")
            n = math.prod(shape)  # python ints: a product of hostile dimensions cannot wrap around
            try:
                block, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(qtype)]
            except (ValueError, KeyError):
                raise GGUFError(f"{self.path}: tensor {name!r} has unknown tensor type id {qtype}") from None
            if shape and shape[-1] % block:
                raise GGUFError(f"{self.path}: tensor {name!r} rows of {shape[-1]} are not a multiple of the "
                                f"{block}-element blocks of its type")
            nbytes = n // block * type_size
            if rel != expected:
                raise GGUFError(f"{self.path}: tensor {name!r} starts at data offset {rel}, but the layout puts it "
                                f"at {expected} (corrupt tensor table?)")
            info = TensorInfo(name, shape, qtype, data_start + rel, nbytes)
            if info.offset + info.nbytes > self.size:
                raise GGUFError(
                    f"{self.path} is truncated: tensor {name!r} needs bytes up to {info.offset + info.nbytes} "
                    f"but the file has {self.size}"
                )
            expected = -(-(rel + nbytes) // align) * align
            self.tensors[name] = info

    # -- access
    def get(self, key: str, default: Any = None) -> Any:
        return self.fields.get(key, default)

    @property
    def architecture(self) -> str | None:
        return self.fields.get("general.architecture")

    def raw(self, name: str) -> np.ndarray:
        """The tensor's stored bytes as a read-only uint8 view of the file (no copy)."""
        t = self.tensors[name]
        return np.frombuffer(self._mm, dtype=np.uint8, count=t.nbytes, offset=t.offset)

    def load(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Dequantize one tensor into a new torch tensor of ``dtype`` (default: float32, or the
        stored dtype for F16/BF16/F64)."""
        t = self.tensors[name]
        return dequantize(self.raw(name), t.qtype, t.shape, dtype, what=f"tensor {name!r} in {self.path}")


# ----------------------------------------------------------------------------- dequantization
_CHUNK_ELEMS = 1 << 22  # dequantize ~4M elements at a time: bounded scratch memory for any tensor


def dequantize(raw: np.ndarray, qtype: int, shape: tuple[int, ...], dtype: torch.dtype | None = None,
               what: str = "tensor") -> torch.Tensor:
    """Stored bytes (uint8) of one tensor -> torch tensor of ``shape``.

    Rows are decoded in chunks straight into the output, so a 262k x 640 Q8_0 embedding needs only
    the output plus a few MB of scratch."""
    gguf = _gguf()
    shape = tuple(int(s) for s in shape)
    n = int(np.prod(shape, dtype=np.int64)) if shape else 1
    if qtype in _INTEGER_TYPES:
        raise GGUFError(f"{what} has integer type {_INTEGER_TYPES[qtype]}, which is not a weight type")
    if qtype in (_F32, _F16, _F64, _BF16):
        native = {_F32: (np.float32, torch.float32), _F16: (np.float16, torch.float16),
                  _F64: (np.float64, torch.float64), _BF16: (np.int16, torch.bfloat16)}[qtype]
        t = torch.from_numpy(np.array(raw.view(native[0]), copy=True))
        if qtype == _BF16:
            t = t.view(torch.bfloat16)
        t = t.reshape(shape)
        return t if dtype is None or t.dtype == dtype else t.to(dtype)
    qt = gguf.GGMLQuantizationType(qtype)
    block, type_size = gguf.GGML_QUANT_SIZES[qt]
    if qtype != _Q8_0:
        try:
            gguf.quants.dequantize(np.zeros((1, type_size), np.uint8), qt)
        except NotImplementedError:
            raise GGUFError(f"{what} has tensor type {qt.name}, which gguf {_gguf_version()} cannot dequantize") from None
    out = torch.empty(n, dtype=dtype or torch.float32)
    blocks = raw.reshape(-1, type_size)  # [n/block, type_size]
    step = max(1, _CHUNK_ELEMS // block)
    for b0 in range(0, blocks.shape[0], step):
        chunk = blocks[b0:b0 + step]
        if qtype == _Q8_0:
            q, d = q8_0_blocks(chunk)  # value = d * q (float32 product, as gguf does)
            vals = (q.float() * d.float()).reshape(-1)
        else:
            # One flat row per call: gguf.quants loops in Python over groups of 16 *rows*, so handing it
            # a chunk as a single row keeps the decode vectorised (20x faster on the 270M model).
            vals = torch.from_numpy(np.ascontiguousarray(gguf.quants.dequantize(chunk.reshape(1, -1), qt)).reshape(-1))
        out[b0 * block:b0 * block + vals.numel()] = vals
    return out.reshape(shape)


def q8_0_blocks(raw) -> tuple[torch.Tensor, torch.Tensor]:
    """Raw Q8_0 bytes (numpy or torch uint8, n_blocks * 34) -> (codes int8 [n_blocks, 32], scales float16
    [n_blocks, 1]), copied out: each block is a float16 scale d, then 32 int8 codes q; its values d * q."""
    c = raw if isinstance(raw, torch.Tensor) else torch.from_numpy(np.array(raw, dtype=np.uint8, copy=True))
    c = c.reshape(-1, 34)
    return c[:, 2:].contiguous().view(torch.int8), c[:, :2].contiguous().view(torch.float16)


def _gguf_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("gguf")
    except PackageNotFoundError:
        return "(unknown version)"


# ----------------------------------------------------------------------------- name mapping
# One table, used in both directions. Per-layer entries are suffixes after "blk.N." / "model.layers.N.".
_BLOCK_NAMES = [
    ("attn_q.weight", "self_attn.q_proj.weight"),
    ("attn_k.weight", "self_attn.k_proj.weight"),
    ("attn_v.weight", "self_attn.v_proj.weight"),
    ("attn_output.weight", "self_attn.o_proj.weight"),
    ("attn_q.bias", "self_attn.q_proj.bias"),
    ("attn_k.bias", "self_attn.k_proj.bias"),
    ("attn_v.bias", "self_attn.v_proj.bias"),
    ("attn_output.bias", "self_attn.o_proj.bias"),
    ("attn_q_norm.weight", "self_attn.q_norm.weight"),
    ("attn_k_norm.weight", "self_attn.k_norm.weight"),
    ("attn_norm.weight", "input_layernorm.weight"),
    ("post_attention_norm.weight", "post_attention_layernorm.weight"),
    ("ffn_norm.weight", "pre_feedforward_layernorm.weight"),
    ("post_ffw_norm.weight", "post_feedforward_layernorm.weight"),
    ("ffn_gate.weight", "mlp.gate_proj.weight"),
    ("ffn_up.weight", "mlp.up_proj.weight"),
    ("ffn_down.weight", "mlp.down_proj.weight"),
    # Gemma 4 mixture of experts (26B-A4B): router, experts, and the three extra norms.
    ("pre_ffw_norm_2.weight", "pre_feedforward_layernorm_2.weight"),
    ("post_ffw_norm_1.weight", "post_feedforward_layernorm_1.weight"),
    ("post_ffw_norm_2.weight", "post_feedforward_layernorm_2.weight"),
    ("ffn_gate_inp.weight", "router.proj.weight"),
    ("ffn_gate_inp.scale", "router.scale"),
    ("ffn_down_exps.scale", "router.per_expert_scale"),
    ("ffn_gate_up_exps.weight", "experts.gate_up_proj"),
    ("ffn_down_exps.weight", "experts.down_proj"),
    # Gemma 4 layer scalar and per-layer embeddings (E2B/E4B).
    ("layer_output_scale.weight", "layer_scalar"),
    ("inp_gate.weight", "per_layer_input_gate.weight"),
    ("proj.weight", "per_layer_projection.weight"),
    ("post_norm.weight", "post_per_layer_input_norm.weight"),
]
_TOP_NAMES = [
    ("token_embd.weight", "model.embed_tokens.weight"),
    ("output_norm.weight", "model.norm.weight"),
    ("output.weight", "lm_head.weight"),
    ("per_layer_token_embd.weight", "model.embed_tokens_per_layer.weight"),
    ("per_layer_model_proj.weight", "model.per_layer_model_projection.weight"),
    ("per_layer_proj_norm.weight", "model.per_layer_projection_norm.weight"),
]
_G2H_BLOCK = dict(_BLOCK_NAMES)
_H2G_BLOCK = {h: g for g, h in _BLOCK_NAMES}
_G2H_TOP = dict(_TOP_NAMES)
_H2G_TOP = {h: g for g, h in _TOP_NAMES}
# Derived from the config, never loaded (the RoPE table is rebuilt from rope_parameters).
_DERIVED = {"rope_freqs.weight"}


def gguf_to_hf(name: str) -> str | None:
    """llama.cpp tensor name -> our (Hugging Face) parameter name; None for derived tensors;
    KeyError for a name this model has no place for."""
    if name in _DERIVED:
        return None
    if name in _G2H_TOP:
        return _G2H_TOP[name]
    if name.startswith("blk."):
        idx, _, rest = name[4:].partition(".")
        if idx.isdigit() and rest in _G2H_BLOCK:
            return f"model.layers.{idx}.{_G2H_BLOCK[rest]}"
    raise KeyError(name)


def hf_to_gguf(name: str) -> str:
    """Inverse of ``gguf_to_hf``."""
    if name in _H2G_TOP:
        return _H2G_TOP[name]
    if name.startswith("model.layers."):
        idx, _, rest = name[len("model.layers."):].partition(".")
        if idx.isdigit() and rest in _H2G_BLOCK:
            return f"blk.{idx}.{_H2G_BLOCK[rest]}"
    raise KeyError(name)


def _norm_shift(hf_name: str, config: Gemma4Config) -> float:
    """What llama.cpp added to a stored tensor: Gemma 3 norms hold ``1 + w`` (its RMSNorm multiplies by
    ``1 + w``, and llama.cpp's converter folds the 1 in); Gemma 4 norms are stored as they are.
    Only the scaled Gemma-3-style norms (offset 1) are shifted."""
    return config.norm_offset if (hf_name.endswith("norm.weight") and config.is_gemma3) else 0.0


# ----------------------------------------------------------------------------- config
_SUPPORTED_ARCHS = ("gemma3", "gemma4")


def _int_value(g: "GGUFFile", key: str, v: Any, lo: int, hi: int) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or v != v or v in (float("inf"), float("-inf")) \
            or int(v) != v or not lo <= int(v) <= hi:
        raise GGUFError(f"{g.path}: {key} is {v!r}, expected an integer in {lo}..{hi}")
    return int(v)


def _per_layer(g: "GGUFFile", value: Any, n: int, key: str, lo: int, hi: int) -> list[int]:
    if isinstance(value, list):
        if len(value) != n:
            raise GGUFError(f"{g.path}: {key} has {len(value)} entries but the model has {n} layers")
        return [_int_value(g, key, v, lo, hi) for v in value]
    return [_int_value(g, key, value, lo, hi)] * n


def config_from_gguf(g: GGUFFile) -> Gemma4Config:
    """Build the config from llama.cpp's architecture keys (``gemma3.*`` / ``gemma4.*``).

    Every value is checked for type and range (``LIMITS``) before it is used: a hostile header gives
    a GGUFError naming the key, never a huge allocation or a Python error from deep inside."""
    try:
        return _config_from_gguf(g)
    except ConfigError as e:
        raise GGUFError(f"{g.path}: the header describes an invalid model: {e}") from None


def _config_from_gguf(g: GGUFFile) -> Gemma4Config:
    arch = g.architecture
    if arch not in _SUPPORTED_ARCHS:
        raise GGUFError(
            f"{g.path}: unsupported architecture {arch!r} (general.architecture); this loader reads "
            f"{' and '.join(_SUPPORTED_ARCHS)} files"
        )

    def key(name: str, default: Any = KeyError) -> Any:
        k = f"{arch}.{name}"
        if k in g.fields:
            return g.fields[k]
        if default is KeyError:
            raise GGUFError(f"{g.path}: required key {k!r} is missing")
        return default

    def ikey(name: str, default: Any = KeyError, lo: int = 1, hi: int = 1 << 24) -> Any:
        v = key(name, default)
        return v if v is None else _int_value(g, f"{arch}.{name}", v, lo, hi)

    def fkey(name: str, default: Any = KeyError, positive: bool = True) -> float | None:
        v = key(name, default)
        if v is None:
            return None
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or (positive and v <= 0):
            raise GGUFError(f"{g.path}: {arch}.{name} is {v!r}, expected a positive finite number")
        return float(v)

    def plist(name: str, default: Any, n: int, lo: int, hi: int) -> list[int]:
        return _per_layer(g, key(name, default), n, f"{arch}.{name}", lo, hi)

    def token_id(name: str, default: int | None) -> int | None:
        v = g.get(f"tokenizer.ggml.{name}", default)
        return v if v is None else _int_value(g, f"tokenizer.ggml.{name}", v, 0, LIMITS["vocab_size"])

    n = ikey("block_count", hi=LIMITS["num_hidden_layers"])
    hidden = ikey("embedding_length", hi=LIMITS["hidden_size"])
    if "token_embd.weight" in g.tensors:
        vocab = g.tensors["token_embd.weight"].shape[0]
    else:  # a vocab-only file still describes the architecture
        tokens = g.get("tokenizer.ggml.tokens")
        vocab = ikey("vocab_size", 0, lo=0, hi=LIMITS["vocab_size"]) or (len(tokens) if isinstance(tokens, list) else 0) or 262_144
    heads = plist("attention.head_count", KeyError, n, 1, LIMITS["num_attention_heads"])
    if len(set(heads)) != 1:
        raise GGUFError(f"{g.path}: per-layer query head counts {sorted(set(heads))} are not supported")
    kv = plist("attention.head_count_kv", heads[0], n, 1, LIMITS["num_key_value_heads"])
    ff = plist("feed_forward_length", KeyError, n, 1, LIMITS["intermediate_size"])
    window = ikey("attention.sliding_window", None, lo=0, hi=LIMITS["sliding_window"])
    eos = _eos_ids(g)
    common = dict(
        vocab_size=vocab, hidden_size=hidden, num_hidden_layers=n, num_attention_heads=heads[0],
        rms_norm_eps=fkey("attention.layer_norm_rms_epsilon", 1e-6),
        max_position_embeddings=ikey("context_length", 131_072, hi=LIMITS["max_position_embeddings"]),
        tie_word_embeddings="output.weight" not in g.tensors,
        bos_token_id=token_id("bos_token_id", 2), eos_token_id=eos,
        pad_token_id=token_id("padding_token_id", 0),
        final_logit_softcapping=fkey("final_logit_softcapping", None, positive=False) or None,
        sliding_window=window or 512,
    )
    pattern = key("attention.sliding_window_pattern", None)
    if isinstance(pattern, list):
        if len(pattern) != n or not all(isinstance(p, (bool, int)) for p in pattern):
            raise GGUFError(f"{g.path}: {arch}.attention.sliding_window_pattern must be {n} booleans, one per layer")
    elif pattern is not None:
        pattern = _int_value(g, f"{arch}.attention.sliding_window_pattern", pattern, 0, LIMITS["num_hidden_layers"])
    if arch == "gemma3":
        head_dim = ikey("attention.key_length", max(hidden // heads[0], 1), hi=LIMITS["head_dim"])
        if isinstance(pattern, list):
            layer_types = [SLIDING if s else FULL for s in pattern]
        elif window:
            # llama.cpp's Gemma 3: every 6th layer global when the file has a sliding window at all.
            every = pattern or 6
            layer_types = [FULL if (i + 1) % every == 0 else SLIDING for i in range(n)]
        else:
            layer_types = [FULL] * n
        # llama.cpp scales queries by 1/sqrt(head_dim), except 27B (62 layers): 1/sqrt(hidden/heads).
        qpas = fkey("attention.query_pre_attn_scalar", None) or (hidden // heads[0] if n == 62 else head_dim)
        scaling = None
        if key("rope.scaling.type", "none") not in ("none", None):
            st = key("rope.scaling.type")
            if st != "linear":  # (any other value, of any type, is refused here)
                raise GGUFError(f"{g.path}: rope scaling type {st!r} is not supported (only linear)")
            scaling = {"rope_type": "linear", "factor": fkey("rope.scaling.factor", 1.0)}
        if len(set(ff)) != 1 or len(set(kv)) != 1:
            raise GGUFError(f"{g.path}: per-layer feed-forward or key/value head counts in a gemma3 file")
        cfg = Gemma4Config(
            model_type="gemma3_text", intermediate_size=ff[0], num_key_value_heads=kv[0], head_dim=head_dim,
            layer_types=layer_types, query_pre_attn_scalar=float(qpas) if float(qpas) != int(qpas) else int(qpas),
            rope_theta=fkey("rope.freq_base", 1_000_000.0),
            rope_local_base_freq=fkey("rope.freq_base_swa", 10_000.0),
            rope_scaling=scaling, attn_logit_softcapping=fkey("attn_logit_softcapping", None, positive=False) or None,
            **common,
        )
        return cfg

    # ---- gemma4
    if isinstance(pattern, list):
        layer_types = [SLIDING if s else FULL for s in pattern]
    else:
        every = pattern or 6
        layer_types = [FULL if (i + 1) % every == 0 else SLIDING for i in range(n)]
    if len(layer_types) != n:
        raise GGUFError(f"{g.path}: sliding_window_pattern has {len(layer_types)} entries for {n} layers")
    full_dim = ikey("attention.key_length", hi=LIMITS["head_dim"])
    swa_dim = ikey("attention.key_length_swa", full_dim, hi=LIMITS["head_dim"])
    shared = ikey("attention.shared_kv_layers", 0, lo=0, hi=n)
    first_shared = n - shared
    # K=V full layers have no attn_v tensor (the value is the pre-norm key projection).
    k_eq_v = any(
        layer_types[i] == FULL and f"blk.{i}.attn_k.weight" in g.tensors and f"blk.{i}.attn_v.weight" not in g.tensors
        for i in range(first_shared)
    )
    swa_kv = [kv[i] for i in range(n) if layer_types[i] == SLIDING] or kv
    full_kv = [kv[i] for i in range(n) if layer_types[i] == FULL] or kv
    base_ff = ff[0]
    double_wide = shared > 0 and any(ff[i] == 2 * base_ff for i in range(first_shared, n))
    experts = ikey("expert_count", 0, lo=0, hi=LIMITS["num_experts"])
    ple = ikey("embedding_length_per_layer_input", 0, lo=0, hi=LIMITS["hidden_size_per_layer_input"])
    ple_vocab = g.tensors["per_layer_token_embd.weight"].shape[0] if "per_layer_token_embd.weight" in g.tensors else vocab
    full_rope = {"rope_type": "default", "rope_theta": fkey("rope.freq_base", 1_000_000.0)}
    if "rope_freqs.weight" in g.tensors:
        if g.tensors["rope_freqs.weight"].shape != (full_dim // 2,):
            raise GGUFError(f"{g.path}: rope_freqs.weight has shape {list(g.tensors['rope_freqs.weight'].shape)}, "
                            f"expected [{full_dim // 2}] (half of {arch}.attention.key_length)")
        factors = g.load("rope_freqs.weight", torch.float32)
        n_rot = int((factors < 1e10).sum())
        full_rope = {**full_rope, "rope_type": "proportional", "partial_rotary_factor": 2 * n_rot / full_dim}
    rope = {SLIDING: {"rope_type": "default", "rope_theta": fkey("rope.freq_base_swa", 10_000.0)}, FULL: full_rope}
    cfg = Gemma4Config(
        model_type="gemma4_text", intermediate_size=base_ff, num_key_value_heads=swa_kv[0], head_dim=swa_dim,
        global_head_dim=full_dim, num_global_key_value_heads=full_kv[0] if k_eq_v else None,
        layer_types=layer_types, attention_k_eq_v=k_eq_v, num_kv_shared_layers=shared,
        use_double_wide_mlp=double_wide, hidden_size_per_layer_input=ple, vocab_size_per_layer_input=ple_vocab,
        enable_moe_block=experts > 0, num_experts=experts or None,
        top_k_experts=ikey("expert_used_count", hi=LIMITS["top_k_experts"]) if experts else None,
        moe_intermediate_size=ikey("expert_feed_forward_length", hi=LIMITS["moe_intermediate_size"]) if experts else None,
        rope_parameters=rope, **common,
    )
    # Geometry the legacy fields cannot say (e.g. fewer global KV heads without K=V): per_layer_config.
    want = [(full_dim if t == FULL else swa_dim, kv[i]) for i, t in enumerate(layer_types)]
    if [(cfg.layer_head_dim(i), cfg.layer_kv_heads(i)) for i in range(n)] != want:
        plc = {str(i): {"head_dim": d, "num_key_value_heads": k} for i, (d, k) in enumerate(want)
               if (d, k) != (swa_dim, swa_kv[0])}
        cfg = cfg.replace(per_layer_config=plc)
    for i in range(n):
        if cfg.layer_intermediate_size(i) != ff[i]:
            raise GGUFError(f"{g.path}: layer {i} feed-forward length {ff[i]} does not fit the Gemma 4 layout "
                            f"(base {base_ff}, double-wide only on KV-sharing layers)")
    return cfg


def _opt_float(v: Any) -> float | None:
    return float(v) if v else None


def _eos_ids(g: GGUFFile) -> int | list[int]:
    """End-of-sequence ids: the file's eos, plus the end-of-turn token (eot id, else found by name:
    Gemma 3 ``<end_of_turn>``, Gemma 4 ``<turn|>``), so generation stops at the end of a turn."""
    eos = _int_value(g, "tokenizer.ggml.eos_token_id", g.get("tokenizer.ggml.eos_token_id", 1), 0, LIMITS["vocab_size"])
    eot = g.get("tokenizer.ggml.eot_token_id")
    if eot is None:
        tokens = g.get("tokenizer.ggml.tokens")
        tokens = tokens if isinstance(tokens, list) else []
        eot = next((tokens.index(t) for t in ("<end_of_turn>", "<turn|>") if t in tokens), None)
    else:
        eot = _int_value(g, "tokenizer.ggml.eot_token_id", eot, 0, LIMITS["vocab_size"])
    return [eos, eot] if eot is not None and eot != eos else eos


# ----------------------------------------------------------------------------- loading
def _default_dtype(g: GGUFFile) -> torch.dtype:
    """dtype=None: a float file keeps its embedding's dtype; quantized files dequantize to float32."""
    return {_F16: torch.float16, _BF16: torch.bfloat16}.get(g.tensors["token_embd.weight"].qtype, torch.float32)


def _check_types(g: GGUFFile, names) -> None:
    gguf = _gguf()
    for qtype in sorted({g.tensors[n].qtype for n in names}):
        if qtype in (_F32, _F16, _BF16, _F64, _Q8_0):
            continue
        who = next(n for n in names if g.tensors[n].qtype == qtype)
        if qtype in _INTEGER_TYPES:
            raise GGUFError(f"{g.path}: tensor {who!r} has integer type {_INTEGER_TYPES[qtype]}, not a weight type")
        qt = gguf.GGMLQuantizationType(qtype)
        try:
            gguf.quants.dequantize(np.zeros((1, gguf.GGML_QUANT_SIZES[qt][1]), np.uint8), qt)
        except NotImplementedError:
            raise GGUFError(
                f"{g.path}: tensor {who!r} has type {qt.name}, which gguf {_gguf_version()} cannot dequantize"
            ) from None


def _items(g: GGUFFile, cfg: Gemma4Config, dtype: torch.dtype) -> Iterator[tuple[str, Any]]:
    for name in g.tensors:
        try:
            hf = gguf_to_hf(name)
        except KeyError:
            raise GGUFError(f"{g.path}: tensor {name!r} has no place in a Gemma text model") from None
        if hf is None:
            continue
        shift = _norm_shift(hf, cfg)

        def load(name=name, shift=shift):
            if not shift:
                return g.load(name, dtype)
            # Undo the stored 1+w in float32, then round once to the target dtype.
            return (g.load(name, torch.float32) - shift).to(dtype)

        yield hf, load


def load_gguf(path: str | os.PathLike, dtype: torch.dtype | None = None,
              device: str | torch.device = "cpu", progress: Progress | None = None) -> Gemma4ForCausalLM:
    """Load a llama.cpp Gemma 3 / Gemma 4 GGUF file as a ``Gemma4ForCausalLM`` (text decoder).

    Quantized tensors are dequantized one at a time into ``dtype`` (default: float32 for quantized
    files, the stored dtype for F16/BF16 files)."""
    g = GGUFFile(path)
    if "token_embd.weight" not in g.tensors:
        what = "a vocab-only file" if "tokenizer.ggml.tokens" in g.fields and not g.tensors else "not a language model"
        raise GGUFError(f"{g.path}: no token_embd.weight tensor ({what}): there are no weights to load")
    cfg = config_from_gguf(g)
    _check_types(g, [n for n in g.tensors if n not in _DERIVED])
    dtype = dtype or _default_dtype(g)
    model = build_model(cfg, device="meta")
    load_state_streaming(model, _items(g, cfg, dtype), dtype=dtype, device=device, source=str(g.path),
                         progress=progress)
    return model.eval()


# ----------------------------------------------------------------------------- writing
# Output tensor types: name -> (GGMLQuantizationType value, llama.cpp general.file_type).
FILE_TYPES = {"f32": (_F32, 0), "f16": (_F16, 1), "bf16": (_BF16, 32), "q8_0": (_Q8_0, 7)}


def _tensor_type(t: torch.Tensor, ftype: str) -> int:
    """llama.cpp's convention: 1-D tensors (norms, scales) stay F32; matrices take the file type.
    Q8_0 needs rows that split into 32-element blocks; other rows stay F32 (exact)."""
    want = FILE_TYPES[ftype][0]
    if t.dim() < 2 or want == _F32:
        return _F32
    if want == _Q8_0 and t.shape[-1] % 32:
        return _F32
    return want


def _encode(t: torch.Tensor, qtype: int) -> np.ndarray:
    """A torch tensor -> the bytes GGUF stores for ``qtype`` (numpy, torch shape order)."""
    t = t.detach().cpu()
    if qtype == _F32:
        return t.float().contiguous().numpy()
    if qtype == _F16:
        return t.to(torch.float16).contiguous().numpy()
    if qtype == _BF16:
        return t.to(torch.bfloat16).contiguous().view(torch.int16).numpy()
    if qtype == _Q8_0:
        gguf = _gguf()
        flat = t.float().contiguous().view(-1).numpy()
        out = np.empty(flat.size // 32 * 34, np.uint8)
        step = _CHUNK_ELEMS  # a multiple of 32: Q8_0 blocks never straddle two chunks
        for i in range(0, flat.size, step):
            part = flat[i:i + step]
            out[i // 32 * 34:(i + part.size) // 32 * 34] = gguf.quants.quantize(part.reshape(1, -1), gguf.GGMLQuantizationType.Q8_0).reshape(-1)
        return out
    raise GGUFError(f"cannot write tensor type {qtype}")


# Quantized models export their own codes: int4 (asymmetric, a scale and a zero per group of 32..256
# inputs) is exactly Q4_1's grid (w = d * q + m per 32 weights) with d = scale, m = zero - 8 * scale,
# the same 4-bit codes, and d, m rounded to fp16 (bf16 scales are exact in fp16; m is one rounding).
# int8 (symmetric, one scale per output row, codes in -127..127) is Q8_0 (an fp16 scale per 32 weights)
# with every block of a row given the row's scale: the same codes, the bf16 scale exact in fp16. A row
# scale below fp16's normal range would lose bits, so such a tensor is re-rounded to Q8_0 from its
# dequantized values instead (Q8_0's own rounding).
_Q4_1 = 3
_Q4_1_BYTES = 20  # fp16 d, fp16 m, 16 bytes of nibbles per 32 weights
_FILE_TYPE_OF = {_Q4_1: 3, _Q8_0: 7, _BF16: 32}  # llama.cpp general.file_type: MOSTLY_Q4_1, MOSTLY_Q8_0, MOSTLY_BF16


def _encode_q4_1(mod) -> np.ndarray:
    """An :class:`~gemma4.quant.Int4Weight` [*lead, N, K] as Q4_1 blocks, row by row (its own codes)."""
    codes = mod.codes()  # [*lead, N, K] uint8 in 0..15
    g = mod.group_size
    sz = mod.scales_zeros.float()  # [*lead, K/g, N, 2]
    sz = sz.movedim(-3, -2)  # [*lead, N, K/g, 2]
    reps = g // 32
    d = sz[..., 0].repeat_interleave(reps, dim=-1)  # [*lead, N, K/32]: each group covers g/32 blocks
    m = sz[..., 1].repeat_interleave(reps, dim=-1) - 8.0 * d
    blocks = codes.reshape(-1, 32)  # [B, 32]: rows are whole blocks (K % 32 == 0)
    qs = (blocks[:, :16] | (blocks[:, 16:] << 4)).to(torch.uint8)  # element j low nibble, j + 16 high
    dm = torch.stack([d.reshape(-1), m.reshape(-1)], -1).to(torch.float16).view(torch.uint8)  # [B, 4]
    return torch.cat([dm, qs], -1).reshape(-1).numpy()


_F16_TINY = 2.0 ** -14  # smallest normal fp16


def _encode_q8_0_rows(mod) -> np.ndarray | None:
    """An :class:`~gemma4.quant.Int8Weight` [*lead, N, K] as Q8_0 blocks holding its own codes (and, grouped,
    its own scales), or None where a row scale is too small for fp16 (then the caller re-rounds)."""
    q = mod.qweight
    if mod.group_size:  # grouped int8 is Q8_0's own layout: codes and float16 scales as they are
        blocks = q.reshape(-1, 32)  # [B, 32]
        d = mod.scales.reshape(-1, 1).contiguous()  # [B, 1] float16
        return torch.cat([d.view(torch.uint8), blocks.view(torch.uint8)], -1).reshape(-1).numpy()
    s = mod.scales.float()  # [*lead, N, K] int8, [*lead, N]
    live = q.abs().amax(-1) > 0  # all-zero rows carry a placeholder scale; any d reproduces them
    if bool(((s < _F16_TINY) & live).any()) or bool((s > 65504).any()):
        return None
    d = s.to(torch.float16).masked_fill(~live, 0)  # bf16 -> fp16 is exact in the normal range
    blocks = q.reshape(-1, 32)  # [B, 32]: rows are whole blocks (K % 32 == 0)
    dd = d[..., None].expand(*d.shape, mod.in_features // 32).reshape(-1, 1)  # [B, 1] the row's scale
    return torch.cat([dd.contiguous().view(torch.uint8), blocks.view(torch.uint8)], -1).reshape(-1).numpy()


def _quantized_modules(model) -> dict[str, Any]:
    """{module name: QuantWeight} for a model quantized by gemma4.quant (empty for a float model)."""
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantWeight)}


def _quant_type(mod) -> int | None:
    """The GGUF type a quantized module is written as, or None (written dequantized in the file type)."""
    if mod.scheme == "bf16":
        return _BF16  # the values it holds, as they are
    if mod.in_features % 32:
        return None
    if mod.scheme == "int4":
        return _Q4_1 if mod.group_size % 32 == 0 else None
    return _Q8_0


def _nbytes(shape: tuple[int, ...], qtype: int) -> int:
    gguf = _gguf()
    block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(qtype)]
    return int(np.prod(shape, dtype=np.int64)) // block * size


def _has_gguf_name(hf: str) -> bool:
    try:
        hf_to_gguf(hf)
    except KeyError:
        return False
    return True


def _write_metadata(w, cfg: Gemma4Config, ftype: str, file_type: int | None = None) -> None:
    gguf = _gguf()
    arch, n = w.arch, cfg.num_hidden_layers
    w.add_file_type(FILE_TYPES[ftype][1] if file_type is None else file_type)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(n)
    w.add_vocab_size(cfg.vocab_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_sliding_window(cfg.sliding_window)
    if cfg.final_logit_softcapping:
        w.add_final_logit_softcapping(cfg.final_logit_softcapping)
    swa = [t == SLIDING for t in cfg.layer_types]
    kv = [cfg.layer_kv_heads(i) for i in range(n)]
    ff = [cfg.layer_intermediate_size(i) for i in range(n)]
    if cfg.is_gemma3:
        if len(set(kv)) != 1 or len(set(ff)) != 1:
            raise GGUFError("gemma3 GGUF cannot hold per-layer key/value heads or feed-forward sizes")
        if cfg.attn_logit_softcapping:
            w.add_attn_logit_softcapping(cfg.attn_logit_softcapping)
        w.add_feed_forward_length(ff[0])
        w.add_head_count_kv(kv[0])
        w.add_key_length(cfg.head_dim)
        w.add_value_length(cfg.head_dim)
        full, local = cfg.rope(FULL), cfg.rope(SLIDING)
        w.add_rope_freq_base(float(full.get("rope_theta", 1_000_000.0)))
        w.add_rope_freq_base_swa(float(local.get("rope_theta", 10_000.0)))
        if full.get("rope_type", "default") == "linear" and full.get("factor"):
            w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            w.add_rope_scaling_factor(float(full["factor"]))
        # llama.cpp assumes "every 6th layer global" for gemma3; other patterns are spelled out.
        if cfg.layer_types != [FULL if (i + 1) % 6 == 0 else SLIDING for i in range(n)]:
            w.add_sliding_window_pattern(swa)
        default_qpas = cfg.hidden_size // cfg.num_attention_heads if n == 62 else cfg.head_dim
        if cfg.query_pre_attn_scalar and cfg.query_pre_attn_scalar != default_qpas:
            w.add_float32(f"{arch}.attention.query_pre_attn_scalar", float(cfg.query_pre_attn_scalar))
        return

    # ---- gemma4: the keys llama.cpp's converter writes
    dims = {t: {cfg.layer_head_dim(i) for i in range(n) if cfg.layer_types[i] == t} for t in (SLIDING, FULL)}
    if any(len(d) > 1 for d in dims.values()):
        raise GGUFError(f"GGUF holds one head dim per layer type; this model has {dims}")
    full_dim = next(iter(dims[FULL] or dims[SLIDING]))
    swa_dim = next(iter(dims[SLIDING] or dims[FULL]))
    w.add_feed_forward_length(ff if len(set(ff)) > 1 else ff[0])
    w.add_head_count_kv(kv if len(set(kv)) > 1 else kv[0])
    w.add_key_length(full_dim)
    w.add_value_length(full_dim)
    w.add_key_length_swa(swa_dim)
    w.add_value_length_swa(swa_dim)
    w.add_sliding_window_pattern(swa)
    w.add_shared_kv_layers(cfg.num_kv_shared_layers)
    w.add_embedding_length_per_layer_input(cfg.hidden_size_per_layer_input or 0)
    full, local = cfg.rope(FULL), cfg.rope(SLIDING)
    for t, p in ((FULL, full), (SLIDING, local)):
        if p.get("rope_type", "default") not in ("default", "proportional") or (p.get("factor") not in (None, 1, 1.0)):
            raise GGUFError(f"the {t} RoPE {p} cannot be written to a gemma4 GGUF (default or proportional, no factor)")
    w.add_rope_freq_base(float(full.get("rope_theta", 1_000_000.0)))
    w.add_rope_freq_base_swa(float(local.get("rope_theta", 10_000.0)))
    w.add_rope_dimension_count(full_dim)
    w.add_rope_dimension_count_swa(swa_dim)
    if cfg.enable_moe_block:
        w.add_expert_count(cfg.num_experts)
        w.add_expert_used_count(cfg.top_k_experts)
        w.add_expert_feed_forward_length(cfg.moe_intermediate_size)


def _rope_freqs(cfg: Gemma4Config) -> torch.Tensor | None:
    """llama.cpp's encoding of proportional RoPE: a frequency divisor per pair, 1 for rotated pairs,
    1e30 (frequency ~0, an identity rotation) for the rest."""
    p = cfg.rope(FULL)
    if cfg.is_gemma3 or FULL not in cfg.layer_types or p.get("rope_type") != "proportional":
        return None
    d = next(cfg.layer_head_dim(i) for i, t in enumerate(cfg.layer_types) if t == FULL)
    n_rot = int(p.get("partial_rotary_factor", 1.0) * d // 2)
    return torch.tensor([1.0] * n_rot + [1e30] * (d // 2 - n_rot), dtype=torch.float32)


def _copy_tokenizer(w, src: GGUFFile) -> None:
    """Copy a GGUF's ``tokenizer.*`` keys unchanged (types included)."""
    for k, v in src.fields.items():
        if not k.startswith("tokenizer."):
            continue
        vtype, etype = src.value_types[k]
        gguf = _gguf()
        w.add_key_value(k, v, gguf.GGUFValueType(vtype), sub_type=gguf.GGUFValueType(etype) if etype is not None else None)


def _vocab_from_tokenizer_json(w, path: Path) -> None:
    """A Hugging Face BPE ``tokenizer.json`` (Gemma 3/4: byte fallback, merges) as llama.cpp's
    ``gemma4`` tokenizer keys: tokens, types, merges and the special token ids."""
    try:
        j = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise GGUFError(f"cannot read the vocabulary in {path}: {e}") from None
    model = j.get("model") or {}
    if model.get("type") != "BPE" or not model.get("merges"):
        raise GGUFError(f"{path}: only BPE vocabularies with merges can be written to GGUF (found {model.get('type')!r})")
    vocab = dict(model["vocab"])
    added = {t["content"]: t for t in j.get("added_tokens", [])}
    for t in added.values():
        vocab.setdefault(t["content"], t["id"])
    n = max(vocab.values()) + 1
    tokens = [f"[PAD{i}]" for i in range(n)]
    types = [5] * n  # UNUSED for holes in the id space
    for tok, i in vocab.items():
        tokens[i] = tok
        a = added.get(tok)
        if a is not None:
            types[i] = 3 if a.get("special") else 4  # CONTROL / USER_DEFINED
        elif len(tok) == 6 and tok.startswith("<0x") and tok.endswith(">"):
            types[i] = 6  # BYTE (byte fallback)
        else:
            types[i] = 1  # NORMAL
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    w.add_tokenizer_model("gemma4")
    w.add_token_list(tokens)
    w.add_token_scores([0.0] * n)
    w.add_token_types(types)
    w.add_token_merges(merges)
    ids = {name: vocab.get(tok) for name, tok in
           (("bos", "<bos>"), ("eos", "<eos>"), ("pad", "<pad>"), ("unk", "<unk>"))}
    for name, add in (("bos", w.add_bos_token_id), ("eos", w.add_eos_token_id), ("pad", w.add_pad_token_id),
                      ("unk", w.add_unk_token_id)):
        if ids[name] is not None:
            add(ids[name])
    w.add_add_bos_token(True)
    w.add_add_space_prefix(False)


def save_gguf(model: Gemma4ForCausalLM, path: str | os.PathLike, ftype: str = "f32",
              vocab_from: str | os.PathLike | GGUFFile | None = None, name: str | None = None,
              progress: Progress | None = None) -> Path:
    """Write ``model`` as a llama.cpp-style GGUF (options below, in :func:`_save_gguf`). A model on the CPU fast
    path (what generation leaves) is written from its plain modules, restored while writing."""
    with plain_path(model):
        return _save_gguf(model, path, ftype, vocab_from, name, progress)


def _save_gguf(model: Gemma4ForCausalLM, path: str | os.PathLike, ftype: str = "f32",
              vocab_from: str | os.PathLike | GGUFFile | None = None, name: str | None = None,
              progress: Progress | None = None) -> Path:
    """Write ``model`` as a llama.cpp-style GGUF (architecture ``gemma4``, or ``gemma3`` for Gemma 3
    configs), tensor by tensor, atomically (temp file + rename).

    ftype: f32 (exact), f16, bf16, or q8_0 (matrices whose rows are a multiple of 32). 1-D tensors
    (norms, scales) are always F32. A quantized model (``gemma4.quantize``, GPTQ, GGUF-native) keeps its
    quantization: int4 matrices are written as Q4_1 (the same codes; scale and zero rounded to fp16),
    int8 ones as Q8_0 (the same codes and scales); ``ftype`` then applies to the float matrices left. ``vocab_from``: a GGUF whose ``tokenizer.*`` keys are copied, or a
    BPE ``tokenizer.json`` written as llama.cpp's ``gemma4`` tokenizer keys."""
    gguf = _gguf()
    ftype = ftype.lower()
    if ftype not in FILE_TYPES:
        raise ValueError(f"unknown GGUF tensor type {ftype!r}; choose one of {', '.join(FILE_TYPES)}")
    cfg = model.config
    path = Path(path)
    arch = "gemma3" if cfg.is_gemma3 else "gemma4"
    state = model.state_dict()
    if cfg.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    # A quantized module stands for one float weight: drop its buffers (codes, scales, the empty weight
    # placeholder) and write the weight it holds under the float weight's name.
    quant = _quantized_modules(model)
    qsource: dict[str, Any] = {}  # hf weight name -> quantized module
    for mname, mod in quant.items():
        for b in list(state):
            if b.startswith(mname + ".") and "." not in b[len(mname) + 1:]:
                del state[b]
        hf = f"{mname}.weight" if _has_gguf_name(f"{mname}.weight") else mname
        qsource[hf] = mod
    plan: list[tuple[str, str, int, tuple[int, ...]]] = []  # (gguf name, hf name, qtype, shape)
    for hf in list(state) + list(qsource):
        try:
            gname = hf_to_gguf(hf)
        except KeyError:
            raise GGUFError(f"tensor {hf!r} has no GGUF name (an extra module this writer does not know)") from None
        if hf in qsource:
            mod = qsource[hf]
            shape = (*mod.lead, mod.out_features, mod.in_features)
            qtype = _quant_type(mod) or _tensor_type(torch.empty(shape, device="meta"), ftype)
        else:
            t = state[hf]
            if t.is_meta:
                raise GGUFError(f"tensor {hf!r} has no data (meta device): load the weights before saving")
            qtype, shape = _tensor_type(t, ftype), tuple(t.shape)
        plan.append((gname, hf, qtype, shape))
    if qsource:  # name the file after what most of its weights are
        counts = {q: sum(1 for _, hf, qt, _ in plan if hf in qsource and qt == q) for q in _FILE_TYPE_OF}
        file_type = _FILE_TYPE_OF[max(counts, key=counts.get)] if any(counts.values()) else None
    else:
        file_type = None
    rope = _rope_freqs(cfg)
    if rope is not None:
        plan.insert(0, ("rope_freqs.weight", "", _F32, tuple(rope.shape)))

    with atomic_path(path) as tmp:
        w = gguf.GGUFWriter(str(tmp), arch)
        w.add_name(name or ("Gemma 3" if cfg.is_gemma3 else "Gemma 4"))
        _write_metadata(w, cfg, ftype, file_type)
        if vocab_from is not None and Path(str(getattr(vocab_from, "path", vocab_from))).suffix == ".json":
            _vocab_from_tokenizer_json(w, Path(vocab_from))
        elif vocab_from is not None:
            _copy_tokenizer(w, vocab_from if isinstance(vocab_from, GGUFFile) else GGUFFile(vocab_from))
        else:
            eos = cfg.eos_token_id if isinstance(cfg.eos_token_id, list) else [cfg.eos_token_id]
            if cfg.bos_token_id is not None:
                w.add_bos_token_id(cfg.bos_token_id)
            if eos and eos[0] is not None:
                w.add_eos_token_id(eos[0])
            if len(eos) > 1:
                w.add_eot_token_id(eos[1])
            if cfg.pad_token_id is not None:
                w.add_pad_token_id(cfg.pad_token_id)
        for gname, _, qtype, shape in plan:
            qt = gguf.GGMLQuantizationType(qtype)
            nbytes = _nbytes(shape, qtype)
            if qtype in (_Q8_0, _Q4_1):
                per_block = 34 if qtype == _Q8_0 else _Q4_1_BYTES
                w.add_tensor_info(gname, shape[:-1] + (shape[-1] // 32 * per_block,), np.dtype(np.uint8), nbytes,
                                  raw_dtype=qt)
            else:
                w.add_tensor_info(gname, shape, np.dtype(np.float32), nbytes, raw_dtype=qt)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for gname, hf, qtype, _ in (progress or no_progress)(plan, f"writing {path.name}"):
            if not hf:
                t = rope
            elif hf in qsource:
                mod = qsource[hf]
                data = _encode_q4_1(mod) if qtype == _Q4_1 else _encode_q8_0_rows(mod) if qtype == _Q8_0 else None
                w.write_tensor_data(data if data is not None else _encode(mod.dequantize(torch.float32), qtype))
                continue
            else:
                t = state[hf]
                shift = _norm_shift(hf, cfg)
                if shift:
                    t = t.float() + shift  # llama.cpp's gemma3 convention: store 1 + w
            w.write_tensor_data(_encode(t, qtype))
        w.close()
    return path
