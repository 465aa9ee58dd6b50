"""Optional compiled kernels, with the pure-PyTorch path as fallback: matmuls for int8, int4 and bf16
weights, and the small fused float32 ops of a decode step (RMSNorm, q/k norm + RoPE, one-row attention
over a KV cache, the gated GELU: see the end of this file); and, for training, one-pass forward and
backward of the gated GELU and RMSNorm and the online-softmax block of the fused cross-entropy, on float32
or bf16 activations (used by :mod:`gemma4.train.kernels` and :mod:`gemma4.train.loss`).

PyTorch's weight-only CPU kernels turn every weight into a float before multiplying, so one decode
step is compute-bound (~5 GB/s of weights on one core) instead of bound by memory bandwidth. The
kernels in ``_native.c`` round the activation rows to int8 in 32-input blocks (llama.cpp's scheme for its
Q8_0 activations, here in two passes: the value, then its residual) and multiply integers (AVX512-VNNI ``vpdpbusd``, or AVX2
``pmaddubsw``, or portable C), reading the weights in the formats :mod:`gemma4.quant.rtn` already keeps:
int8 per output row (or with a float16 scale per 32 inputs: GGUF's Q8_0 layout), and int4 in the portable
nibble order with its (scale, zero) pairs. :func:`decode_layers` runs every layer of a decoded token in one
call (see :class:`gemma4.infer.fast_path.DecodeStack`).

The C file is compiled on first use with the system C compiler (``cc -O3 -march=native -fopenmp``)
into the cache (``$GEMMA4_CACHE/native``) and loaded with ctypes; ctypes releases the GIL during the
call. A self-check against the float reference runs once per process before the kernels are used. No
compiler, a failed build or a failed check leaves :func:`available` False and every caller on PyTorch's
kernels. ``GEMMA4_NATIVE=0`` turns the kernels off.

Numerics: each 32-input block of activations is x ~= d1 * q1 + d2 * q2 (q1 int8 with scale amax / 127, q2
the int8 rounding of the residual), ~15 bits relative to the block's largest input, where one pass keeps
~7: on the 112-position top-1 measure of Gemma 3 270M (benchmarks/vs_llamacpp.py) int8 weights score 102
with one pass and 106 with two (104 with bf16 activations through PyTorch's kernels). Products are exact
integers within a block and float32 across blocks. That is the decode path (one row at a time, bound by
reading the weights). Prefill (16 rows and more; bf16 weights from 8) on an AVX-512 build is compute-bound
instead: a packed float32 GEMM dequantizes a panel of 32 weight rows once (exactly the values
:func:`gemma4.quant.rtn.int8_dequant` / ``int4_dequant`` give) and multiplies the activations as they are,
~1.7x the integer rows at 128 tokens here, and the reference's numerics (float32 activations).
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

from gemma4._util import cache_dir

log = logging.getLogger("gemma4")

__all__ = ["available", "activation_dtype", "isa", "int8_matmul", "int4_matmul", "bf16_matmul", "build",
           "rmsnorm", "qk_norm_rope_", "attention_decode", "gelu_mul", "gelu_mul_fwd", "gelu_mul_bwd",
           "rmsnorm_fwd", "rmsnorm_bwd", "ce_block_", "MAX_HEAD_DIM",
           "G4Linear", "G4Layer", "decode_layers"]

_SRC = Path(__file__).with_name("_native.c")
ISAS = {"native": ["-march=native"], "avx2": ["-mavx2", "-mfma", "-mf16c"], "generic": []}
_ISA_NAMES = {0: "portable C", 1: "AVX2", 2: "AVX512-VNNI"}
_FLAGS_VERSION = "2"  # bump when the compile command changes (part of the cached library's name)
_LIBS: dict[str, ctypes.CDLL | None] = {}
_CHECKED: dict[str, bool] = {}


def _cpu_tag() -> str:
    """What -march=native compiles for: the CPU's flags (a cache built on another CPU is not reused)."""
    flags = ""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        pass
    return hashlib.sha256((platform.machine() + flags).encode()).hexdigest()[:12]


def _compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")


def build(variant: str = "native") -> Path | None:
    """Compile ``_native.c`` for ``variant`` (a key of :data:`ISAS`) into the cache, once; returns the
    shared library's path, or None (no compiler, or the build failed: logged)."""
    cc = _compiler()
    if cc is None:
        log.info("gemma4.quant.native: no C compiler; using PyTorch's kernels")
        return None
    src = _SRC.read_bytes()
    key = hashlib.sha256(src + " ".join([cc, *ISAS[variant], _FLAGS_VERSION]).encode()).hexdigest()[:16]
    tag = _cpu_tag() if variant == "native" else platform.machine()
    out = cache_dir() / "native" / f"g4native-{variant}-{tag}-{key}.so"
    if out.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    # Built under a temporary name and renamed: two processes building at once never load half a file.
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    # -ffp-contract=off: the scalar rounding of the activations must not fuse into FMAs (every ISA path,
    # and the tests' reference, then round identically); the vector loops use FMAs explicitly.
    cmd = [cc, "-O3", "-ffp-contract=off", "-fPIC", "-shared", "-fopenmp", *ISAS[variant], str(_SRC), "-o", tmp, "-lm"]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as e:
        os.unlink(tmp)
        log.info("gemma4.quant.native: %s failed (%s); using PyTorch's kernels", cc, e)
        return None
    if r.returncode != 0:
        os.unlink(tmp)
        log.info("gemma4.quant.native: build failed; using PyTorch's kernels:\n%s", r.stderr[-2000:])
        return None
    os.replace(tmp, out)
    return out


def _load(variant: str) -> ctypes.CDLL | None:
    if variant in _LIBS:
        return _LIBS[variant]
    lib = None
    path = build(variant)
    if path is not None:
        try:
            lib = ctypes.CDLL(str(path))
        except OSError as e:
            log.info("gemma4.quant.native: cannot load %s (%s)", path, e)
    if lib is not None:
        p, i64, c_int = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
        lib.g4_isa.restype = c_int
        lib.g4_linear_i8.argtypes = [p, c_int, i64, i64, p, p, i64, i64, p, c_int, c_int]
        lib.g4_linear_i4.argtypes = [p, c_int, i64, i64, p, p, i64, i64, p, c_int, c_int]
        lib.g4_linear_bf16.argtypes = [p, c_int, i64, i64, p, i64, p, c_int, c_int]
        lib.g4_linear_i8.restype = lib.g4_linear_i4.restype = lib.g4_linear_bf16.restype = c_int
        f32 = ctypes.c_float
        lib.g4_rmsnorm.argtypes = [p, i64, i64, p, f32, p, c_int]
        lib.g4_rmsnorm.restype = None
        lib.g4_qk_norm_rope.argtypes = [p, i64, i64, i64, i64, i64, p, f32, p, p, f32]
        lib.g4_qk_norm_rope.restype = None
        lib.g4_attn_decode.argtypes = [p, i64, i64, i64, i64, p, i64, i64, i64, p, i64, i64, i64, i64, i64, i64,
                                       p, i64, f32, f32, p, c_int]
        lib.g4_attn_decode.restype = c_int
        lib.g4_gelu_mul.argtypes = [p, i64, i64, p]
        lib.g4_gelu_mul.restype = None
        lib.g4_gelu_mul_fwd.argtypes = [p, p, i64, c_int, p, c_int]
        lib.g4_gelu_mul_fwd.restype = None
        lib.g4_gelu_mul_bwd.argtypes = [p, p, p, i64, c_int, p, p, c_int]
        lib.g4_gelu_mul_bwd.restype = None
        lib.g4_rmsnorm_fwd.argtypes = [p, i64, i64, c_int, p, f32, f32, p, p, c_int]
        lib.g4_rmsnorm_fwd.restype = None
        lib.g4_rmsnorm_bwd.argtypes = [p, p, i64, i64, c_int, p, f32, p, p, p, c_int]
        lib.g4_rmsnorm_bwd.restype = c_int
        lib.g4_ce_block.argtypes = [p, c_int, i64, i64, f32, p, p, p, p, c_int, c_int]
        lib.g4_ce_block.restype = None
        lib.g4_decode_layers.argtypes = [p, i64, p, i64, i64, c_int]
        lib.g4_decode_layers.restype = c_int
    _LIBS[variant] = lib
    return lib


def _enabled() -> bool:
    return os.environ.get("GEMMA4_NATIVE", "1").lower() not in ("0", "false", "no", "off")


def isa(variant: str = "native") -> str | None:
    """The instruction set the compiled kernels use ("AVX512-VNNI", "AVX2", "portable C"), or None."""
    lib = _load(variant)
    return None if lib is None else _ISA_NAMES.get(lib.g4_isa(), "?")


def _self_check(variant: str) -> bool:
    """Every kernel against the float reference on a small random case: a miscompiled or misdetected
    build must never reach a model."""
    g = torch.Generator().manual_seed(0)
    n, k = 48, 160  # a 32-input tail past the 128-input chunks; rows not a multiple of 4
    x = torch.randn(2, k, generator=g)
    q = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
    s = (torch.rand(n, generator=g) * 0.01 + 1e-3).to(torch.bfloat16)
    ref = x @ (q.float() * s.float()[:, None]).T
    codes = torch.randint(0, 16, (n, k), generator=g, dtype=torch.uint8)
    sz = (torch.randn(n, k // 32, 2, generator=g) * 0.01).to(torch.bfloat16)
    w4 = (codes.float().reshape(n, k // 32, 32) - 8) * sz[..., :1].float() + sz[..., 1:].float()
    ref4 = x @ w4.reshape(n, k).T
    packed = (codes[:, 0::2] | (codes[:, 1::2] << 4)).contiguous()
    y = int8_matmul(x, q, s, variant=variant, checked=True)
    sg = (torch.rand(n, k // 32, generator=g) * 0.01 + 1e-3).to(torch.float16)  # a scale per 32 inputs
    refq = x @ (q.float().view(n, k // 32, 32) * sg.float()[..., None]).view(n, k).T
    yq = int8_matmul(x, q, sg, variant=variant, checked=True)
    y4 = int4_matmul(x, packed, sz, 32, variant=variant, checked=True)
    xg = torch.randn(17, k, generator=g)  # 17 rows: the prefill GEMM of an AVX-512 build
    yg = int8_matmul(xg, q, s, variant=variant, checked=True)
    y4g = int4_matmul(xg, packed, sz, 32, variant=variant, checked=True)
    ygq = int8_matmul(xg, q, sg, variant=variant, checked=True)
    refg, ref4g = xg @ (q.float() * s.float()[:, None]).T, xg @ w4.reshape(n, k).T
    refgq = xg @ (q.float().view(n, k // 32, 32) * sg.float()[..., None]).view(n, k).T
    ok = all(bool(torch.isfinite(v).all()) and float((v - r).norm() / r.norm()) < 0.02
             for v, r in ((y, ref), (y4, ref4), (yg, refg), (y4g, ref4g), (yq, refq), (ygq, refgq)))
    # The fused float32 ops: no rounding of their own, so a tight bound.
    w = torch.randn(k, generator=g)
    xr = x * torch.pow(x.pow(2).mean(-1, keepdim=True) + 1e-6, -0.5) * w
    gu = torch.randn(2, 2 * k, generator=g)
    gref = torch.nn.functional.gelu(gu[:, :k], approximate="tanh") * gu[:, k:]
    q3, kv = torch.randn(2, 4, 32, generator=g), torch.randn(2, 2, 7, 32, generator=g)
    p = torch.softmax((q3.view(2, 2, 2, 32) @ kv.transpose(-1, -2)) * 0.25, dim=-1)  # [B,K,G,S]
    aref = (p @ kv).view(2, 4, 32)
    wb = torch.randn(n + 5, k, generator=g).to(torch.bfloat16)  # a partial panel of 32 rows
    xb = torch.randn(9, k, generator=g)  # 9 rows: the GEMM (prefill) path; 2 rows: the one-row path
    fused = ((bf16_matmul(x, wb, variant=variant, checked=True), x @ wb.float().T),
             (bf16_matmul(xb, wb, variant=variant, checked=True), xb @ wb.float().T),
             (rmsnorm(x, w, 1e-6, variant=variant, checked=True), xr),
             (gelu_mul(gu, k, variant=variant, checked=True), gref),
             (attention_decode(q3, kv, kv, None, 0.25, None, variant=variant, checked=True), aref))
    ok = ok and all(float((v - r).abs().max()) <= 1e-4 * float(r.abs().max()) for v, r in fused)
    if not ok:
        log.warning("gemma4.quant.native: self-check failed for the %s build; using PyTorch's kernels", variant)
    return ok


def available(variant: str = "native") -> bool:
    """True when the compiled kernels are built, loaded and checked (and not turned off)."""
    if "GEMMA4_NATIVE" in os.environ and not _enabled():
        return False
    if variant not in _CHECKED:
        _CHECKED[variant] = False  # a failure inside the check leaves it off
        _CHECKED[variant] = _load(variant) is not None and _self_check(variant)
    return _CHECKED[variant]


def activation_dtype() -> torch.dtype:
    """The float dtype a quantized model computes in on the CPU by default (a quantized GGUF loaded by
    ``load_pretrained``): float32 with these kernels, bf16 without.

    Why float32 here: the kernels read float32 rows as they are, so the activations between the matmuls
    (norms, RoPE, attention, residuals) can keep the reference's precision for free, and the eager
    attention then runs on float32 GEMMs, which decode faster here than bf16 ones (oneDNN builds a new
    bf16 primitive, and caches it, for every new key length). PyTorch's weight-only kernels take bf16
    activations only (float32 ones are 10-30x slower), hence bf16 without these kernels."""
    return torch.float32 if available() else torch.bfloat16


def _io(x: torch.Tensor, out_dtype: torch.dtype | None) -> tuple[torch.Tensor, int, torch.dtype]:
    """The kernels read float32 or bf16 rows as they are (no converted copy) and write either."""
    if x.dtype not in (torch.float32, torch.bfloat16):
        x = x.float()
    out = out_dtype or x.dtype
    if out not in (torch.float32, torch.bfloat16):
        raise ValueError(f"native kernels write float32 or bfloat16, not {out}")
    return x.contiguous(), int(x.dtype == torch.bfloat16), out


def _ready(variant: str, checked: bool) -> ctypes.CDLL:
    """The loaded library. ``checked=True``: the caller already knows :func:`available` (a layer packed for
    these kernels, or the self-check itself), so the per-call check is skipped."""
    if not checked and not available(variant):
        raise RuntimeError("gemma4.quant.native: kernels unavailable")
    lib = _load(variant)
    assert lib is not None
    return lib


def int8_matmul(x: torch.Tensor, q: torch.Tensor, scales: torch.Tensor, *, out_dtype: torch.dtype | None = None,
                threads: int | None = None, variant: str = "native", checked: bool = False) -> torch.Tensor:
    """x [M, K] @ (q int8 [N, K] * scales)^T -> [M, N] in ``out_dtype`` (default x's: float32 or bf16);
    K % 32 == 0. ``scales``: bf16 [N] (one per row), or float16 [N, K/32] (one per 32 inputs of a row:
    GGUF's Q8_0 layout). The quantized input (~2 bytes per element) lives in scratch memory freed on
    return. From 16 rows (AVX-512 builds) the float32 GEMM of the dequantized weights instead (module
    docstring)."""
    lib = _ready(variant, checked)
    m, k = x.shape
    n = q.shape[0]
    grouped = scales.dim() == 2
    if (k % 32 or q.shape[1] != k or q.dtype != torch.int8
            or scales.shape != ((n, k // 32) if grouped else (n,))
            or scales.dtype != (torch.float16 if grouped else torch.bfloat16)):
        raise ValueError(f"int8_matmul: unsupported shapes/dtypes x {tuple(x.shape)} q {tuple(q.shape)} {q.dtype} "
                         f"scales {tuple(scales.shape)} {scales.dtype}")
    x, xbf16, out = _io(x, out_dtype)
    q, scales = q.contiguous(), scales.contiguous()
    y = torch.empty(m, n, dtype=out)
    rc = lib.g4_linear_i8(x.data_ptr(), xbf16, m, k, q.data_ptr(), scales.data_ptr(), 32 if grouped else 0, n,
                          y.data_ptr(), int(out == torch.bfloat16), threads or torch.get_num_threads())
    if rc:
        raise MemoryError(f"int8_matmul: no memory for the quantized activations ({m} x {k})")
    return y


def int4_matmul(x: torch.Tensor, codes: torch.Tensor, sz_rows: torch.Tensor, group_size: int, *,
                out_dtype: torch.dtype | None = None, threads: int | None = None, variant: str = "native",
                checked: bool = False) -> torch.Tensor:
    """x [M, K] @ W^T -> [M, N] in ``out_dtype`` (default x's: float32 or bf16) for int4 W: ``codes`` uint8 [N, K/2] in the portable nibble
    order (input 2i low, 2i+1 high), ``sz_rows`` bf16 [N, K/g, 2] (scale, zero), w = (q - 8) * scale + zero.
    K % 32 == 0 and group_size a multiple of 32."""
    lib = _ready(variant, checked)
    m, k = x.shape
    n = codes.shape[0]
    if (k % 32 or group_size % 32 or k % group_size or tuple(codes.shape) != (n, k // 2)
            or tuple(sz_rows.shape) != (n, k // group_size, 2) or sz_rows.dtype != torch.bfloat16):
        raise ValueError(f"int4_matmul: unsupported shapes x {tuple(x.shape)} codes {tuple(codes.shape)} "
                         f"scales {tuple(sz_rows.shape)} group {group_size}")
    x, xbf16, out = _io(x, out_dtype)
    codes, sz_rows = codes.contiguous(), sz_rows.contiguous()
    y = torch.empty(m, n, dtype=out)
    rc = lib.g4_linear_i4(x.data_ptr(), xbf16, m, k, codes.data_ptr(), sz_rows.data_ptr(), group_size, n,
                          y.data_ptr(), int(out == torch.bfloat16), threads or torch.get_num_threads())
    if rc:
        raise MemoryError(f"int4_matmul: no memory for the quantized activations ({m} x {k})")
    return y


def bf16_matmul(x: torch.Tensor, w: torch.Tensor, *, out_dtype: torch.dtype | None = None,
                threads: int | None = None, variant: str = "native", checked: bool = False) -> torch.Tensor:
    """x [M, K] (float32 or bf16) @ w^T for bf16 w [N, K] -> [M, N] in ``out_dtype`` (default x's), every
    product and sum in float32. Below 8 rows (decode) each row streams the weights on its own; from 8 rows
    (prefill) an AVX-512 build runs a packed GEMM (panels of 32 weight rows widened once)."""
    lib = _ready(variant, checked)
    m, k = x.shape
    n = w.shape[0]
    if w.dtype != torch.bfloat16 or w.dim() != 2 or w.shape[1] != k:
        raise ValueError(f"bf16_matmul: unsupported x {tuple(x.shape)} w {tuple(w.shape)} {w.dtype}")
    x, xbf16, out = _io(x, out_dtype)
    w = w.contiguous()
    y = torch.empty(m, n, dtype=out)
    rc = lib.g4_linear_bf16(x.data_ptr(), xbf16, m, k, w.data_ptr(), n, y.data_ptr(), int(out == torch.bfloat16),
                            threads or torch.get_num_threads())
    if rc:
        raise MemoryError(f"bf16_matmul: no memory for the float32 input ({m} x {k})")
    return y


# ----------------------------------------------------------------------------- fused float32 decode ops
# What a decode step computes between its matmuls, one C call each instead of 5-15 PyTorch calls: at one
# token the arithmetic is a few hundred nanoseconds and PyTorch's dispatch ~4-5 us per call here
# (RMSNorm as 7 tensor ops: 43 us; in C: ~2 us). Float32 only: the fast path uses them when a model
# computes in float32 (bf16 activations keep PyTorch's ops, bit-identical to the plain model).
# ``checked=True``: the caller (a fast-path module) settled dtypes and layouts when it was built, so the
# per-call validation is skipped (it costs as much as the C call).

MAX_HEAD_DIM = 1024  # the C side normalizes a q/k head in a stack buffer of this many floats


def _f32(name: str, *ts: torch.Tensor) -> None:
    for t in ts:
        if t.dtype != torch.float32 or t.device.type != "cpu":
            raise ValueError(f"{name}: float32 CPU tensors only, got {t.dtype} on {t.device}")


def rmsnorm(x: torch.Tensor, scale: torch.Tensor | None, eps: float, *, threads: int | None = None,
            variant: str = "native", checked: bool = False) -> torch.Tensor:
    """RMSNorm over the last dim: x * (mean(x^2) + eps)^-0.5 (* scale [D] when given); float32 in and out.
    As :class:`gemma4.model.RMSNorm` with its scale precomputed (``w`` or ``1 + w``), sums in another order."""
    lib = _ready(variant, checked)
    x = x.contiguous()
    d = x.shape[-1]
    if not checked:
        _f32("rmsnorm", x, *(() if scale is None else (scale,)))
        if scale is not None and (scale.shape != (d,) or not scale.is_contiguous()):
            raise ValueError(f"rmsnorm: scale must be a contiguous [{d}] tensor, got {tuple(scale.shape)}")
    y = torch.empty_like(x)
    lib.g4_rmsnorm(x.data_ptr(), x.numel() // d if d else 0, d, None if scale is None else scale.data_ptr(),
                   eps, y.data_ptr(), threads or torch.get_num_threads())
    return y


def qk_norm_rope_(buf: torch.Tensor, n_qk: int, n_v: int, head_dim: int, scale: torch.Tensor, eps: float,
                  cos: torch.Tensor, sin: torch.Tensor, v_eps: float | None = None, *, variant: str = "native",
                  checked: bool = False) -> None:
    """In place on a fused projection's output ``buf`` [rows, >= (n_qk + n_v) * head_dim] (rows contiguous):
    the ``n_qk`` q/k heads RMS-normed, times ``scale`` [n_qk, head_dim], rotated by half-split RoPE with
    ``cos``/``sin`` [rows, head_dim]; then the ``n_v`` value heads RMS-normed without a scale when
    ``v_eps`` is given (else left alone)."""
    lib = _ready(variant, checked)
    rows = buf.shape[0]
    if not checked:
        _f32("qk_norm_rope_", buf, scale, cos, sin)
    if not checked and (buf.dim() != 2 or buf.stride(1) != 1 or buf.shape[1] < (n_qk + n_v) * head_dim or head_dim % 2
            or head_dim > MAX_HEAD_DIM or tuple(scale.shape) != (n_qk, head_dim) or not scale.is_contiguous()
            or cos.shape != (rows, head_dim) or sin.shape != (rows, head_dim)):
        raise ValueError(f"qk_norm_rope_: unsupported shapes buf {tuple(buf.shape)} scale {tuple(scale.shape)} "
                         f"cos {tuple(cos.shape)} (heads {n_qk}+{n_v} of {head_dim})")
    cos, sin = cos.contiguous(), sin.contiguous()
    lib.g4_qk_norm_rope(buf.data_ptr(), rows, buf.stride(0), n_qk, n_v, head_dim, scale.data_ptr(), eps,
                        cos.data_ptr(), sin.data_ptr(), -1.0 if v_eps is None else v_eps)


def attention_decode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float,
                     softcap: float | None, *, threads: int | None = None, variant: str = "native",
                     checked: bool = False) -> torch.Tensor:
    """Attention of one query per row: q [B, N, D] (heads contiguous; rows may be strided), k [B, K, S, D]
    and v [B, K, S, Dv] (any strides over B, K, S; contiguous over D), ``mask`` bool [B|1, 1, 1, S] or
    None -> [B, N, Dv] float32. Query head n reads KV head n // (N / K), as :func:`gemma4.model.attention.eager_attention`
    (scores times ``scale``, soft-capped when ``softcap``, softmax in float32)."""
    lib = _ready(variant, checked)
    b, n, d = q.shape
    kh, s = k.shape[1], k.shape[2]
    dv = v.shape[-1]
    if not checked:
        _f32("attention_decode", q, k, v)
    if not checked and (q.stride(2) != 1 or q.stride(1) != d or k.shape != (b, kh, s, d) or v.shape[:3] != (b, kh, s)
            or k.stride(3) != 1 or v.stride(3) != 1 or n % kh):
        raise ValueError(f"attention_decode: unsupported q {tuple(q.shape)} k {tuple(k.shape)} v {tuple(v.shape)}")
    mptr, msb = None, 0
    if mask is not None:
        if mask.dtype != torch.bool or mask.dim() != 4 or mask.shape[-1] != s or mask.shape[2] != 1 or mask.shape[0] not in (1, b):
            raise ValueError(f"attention_decode: mask must be bool [B|1, 1, 1, {s}], got {mask.dtype} {tuple(mask.shape)}")
        mask = mask.reshape(mask.shape[0], s).contiguous()  # [B|1, S]
        mptr, msb = mask.data_ptr(), (s if mask.shape[0] > 1 else 0)
    out = torch.empty(b, n, dv)
    rc = lib.g4_attn_decode(q.data_ptr(), q.stride(0), b, n, d, k.data_ptr(), k.stride(0), k.stride(1), k.stride(2),
                            v.data_ptr(), v.stride(0), v.stride(1), v.stride(2), dv, kh, s, mptr, msb, scale,
                            float(softcap or 0.0), out.data_ptr(), threads or torch.get_num_threads())
    if rc:
        raise MemoryError(f"attention_decode: no memory for the scores ({b * n} x {s})")
    return out


def gelu_mul(gu: torch.Tensor, inter: int, *, variant: str = "native", checked: bool = False) -> torch.Tensor:
    """gelu_tanh(gate) * up for ``gu`` [..., 2 * inter] holding gate then up (a fused projection's output)
    -> [..., inter], float32."""
    lib = _ready(variant, checked)
    if not checked:
        _f32("gelu_mul", gu)
    if not checked and gu.shape[-1] != 2 * inter:
        raise ValueError(f"gelu_mul: last dim must be 2 * {inter}, got {gu.shape[-1]}")
    gu = gu.contiguous()
    out = gu.new_empty(*gu.shape[:-1], inter)
    lib.g4_gelu_mul(gu.data_ptr(), gu.numel() // (2 * inter), inter, out.data_ptr())
    return out


def _act_io(name: str, *ts: torch.Tensor) -> int:
    """1 for bf16, 0 for float32: same dtype, shape and CPU contiguity for every tensor, else ValueError."""
    t0 = ts[0]
    if t0.dtype not in (torch.float32, torch.bfloat16) or any(
            t.dtype != t0.dtype or t.shape != t0.shape or t.device.type != "cpu" or not t.is_contiguous() for t in ts):
        raise ValueError(f"{name}: contiguous CPU float32 or bf16 tensors of one shape and dtype, got "
                         + ", ".join(f"{t.dtype} {tuple(t.shape)}" for t in ts))
    return int(t0.dtype == torch.bfloat16)


def gelu_mul_fwd(g: torch.Tensor, u: torch.Tensor, *, threads: int | None = None, variant: str = "native") -> torch.Tensor:
    """gelu_tanh(g) * u elementwise (float32 or bf16, contiguous, same shape): one pass, float32 inside."""
    lib = _ready(variant, False)
    bf = _act_io("gelu_mul_fwd", g, u)
    y = torch.empty_like(g)
    lib.g4_gelu_mul_fwd(g.data_ptr(), u.data_ptr(), g.numel(), bf, y.data_ptr(), threads or torch.get_num_threads())
    return y


def gelu_mul_bwd(g: torch.Tensor, u: torch.Tensor, dy: torch.Tensor, *, threads: int | None = None,
                 variant: str = "native") -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients (dg, du) of ``gelu_tanh(g) * u`` given the output gradient ``dy``: one pass."""
    lib = _ready(variant, False)
    bf = _act_io("gelu_mul_bwd", g, u, dy)
    dg, du = torch.empty_like(g), torch.empty_like(g)
    lib.g4_gelu_mul_bwd(g.data_ptr(), u.data_ptr(), dy.data_ptr(), g.numel(), bf, dg.data_ptr(), du.data_ptr(),
                        threads or torch.get_num_threads())
    return dg, du


def _norm_scale(w: torch.Tensor | None, d: int, name: str) -> torch.Tensor | None:
    if w is None:
        return None
    if w.shape != (d,):
        raise ValueError(f"{name}: the scale must be [{d}], got {tuple(w.shape)}")
    return w.detach().float().contiguous()


def rmsnorm_fwd(x: torch.Tensor, weight: torch.Tensor | None, offset: float, eps: float, *,
                threads: int | None = None, variant: str = "native") -> tuple[torch.Tensor, torch.Tensor]:
    """Training RMSNorm over the last dim of ``x`` (float32 or bf16, contiguous): ``x r (weight + offset)``
    in float32, written in x's dtype; also returns r = 1 / sqrt(mean(x^2) + eps) [rows] for the backward."""
    lib = _ready(variant, False)
    bf = _act_io("rmsnorm_fwd", x)
    d = x.shape[-1]
    w = _norm_scale(weight, d, "rmsnorm_fwd")
    rows = x.numel() // d if d else 0
    y, rstd = torch.empty_like(x), torch.empty(rows)
    lib.g4_rmsnorm_fwd(x.data_ptr(), rows, d, bf, None if w is None else w.data_ptr(), offset, eps, y.data_ptr(),
                       rstd.data_ptr(), threads or torch.get_num_threads())
    return y, rstd


def rmsnorm_bwd(x: torch.Tensor, dy: torch.Tensor, weight: torch.Tensor | None, offset: float, rstd: torch.Tensor,
                want_dw: bool, *, threads: int | None = None, variant: str = "native"
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Gradients of :func:`rmsnorm_fwd`: dx (x's dtype) and, when ``want_dw``, the scale's gradient
    (float32 [d], summed over rows)."""
    lib = _ready(variant, False)
    bf = _act_io("rmsnorm_bwd", x, dy)
    d = x.shape[-1]
    w = _norm_scale(weight, d, "rmsnorm_bwd")
    rows = x.numel() // d if d else 0
    if rstd.shape != (rows,) or rstd.dtype != torch.float32 or not rstd.is_contiguous():
        raise ValueError(f"rmsnorm_bwd: rstd must be float32 [{rows}], got {rstd.dtype} {tuple(rstd.shape)}")
    dx = torch.empty_like(x)
    dw = torch.zeros(d) if want_dw else None
    rc = lib.g4_rmsnorm_bwd(x.data_ptr(), dy.data_ptr(), rows, d, bf, None if w is None else w.data_ptr(), offset,
                            rstd.data_ptr(), dx.data_ptr(), None if dw is None else dw.data_ptr(),
                            threads or torch.get_num_threads())
    if rc:
        raise MemoryError(f"rmsnorm_bwd: no memory for the per-thread buffers ({d} floats)")
    return dx, dw


def ce_block_(x: torch.Tensor, softcap: float | None, m: torch.Tensor, ssum: torch.Tensor, scale: torch.Tensor,
              e: torch.Tensor | None, *, threads: int | None = None, variant: str = "native") -> None:
    """One vocabulary block of an online-softmax cross-entropy, in place (see ``g4_ce_block`` in the C
    file): ``x`` [c, nb] the block's matmul output (with ``softcap``: tanh(x / cap) already), float32 or
    bf16; ``m``, ``ssum``, ``scale`` float32 [c] (running max and sum updated, the old-to-new rescale
    written); ``e`` [c, nb] (float32 or bf16, or None): exp(logit - m), times the cap's derivative."""
    lib = _ready(variant, False)
    xbf = _act_io("ce_block_", x)
    c, nb = x.shape
    for name, t in (("m", m), ("ssum", ssum), ("scale", scale)):
        if t.dtype != torch.float32 or t.numel() != c or not t.is_contiguous():
            raise ValueError(f"ce_block_: {name} must be contiguous float32 with {c} elements")
    ebf = _act_io("ce_block_", e) if e is not None else 0
    if e is not None and e.shape != x.shape:
        raise ValueError(f"ce_block_: e must be {tuple(x.shape)}, got {tuple(e.shape)}")
    lib.g4_ce_block(x.data_ptr(), xbf, c, nb, float(softcap or 0.0), m.data_ptr(), ssum.data_ptr(), scale.data_ptr(),
                    None if e is None else e.data_ptr(), ebf, threads or torch.get_num_threads())


# ----------------------------------------------------------------------------- one decode step in one call
class G4Linear(ctypes.Structure):
    """A linear layer's weights as ``g4_decode_layers`` reads them (mirrors ``g4_lin`` in _native.c)."""
    _fields_ = [("w", ctypes.c_void_p), ("aux", ctypes.c_void_p), ("n", ctypes.c_int64), ("k", ctypes.c_int64),
                ("group", ctypes.c_int64), ("kind", ctypes.c_int64)]
    KINDS = {"bf16": 0, "int8": 1, "int4": 2}


class G4Layer(ctypes.Structure):
    """One decoder layer for ``g4_decode_layers`` (mirrors ``g4_layer`` in _native.c): weights, norm scales
    and shapes fixed when built; the cache slot, mask, RoPE rows (and per-layer input rows) set before every
    step. A KV-sharing consumer reads its producer's cache; per-layer inputs are Gemma 4 E2B/E4B's."""
    _fields_ = [("qkv", G4Linear), ("o", G4Linear), ("gate_up", G4Linear), ("down", G4Linear),
                ("norm", ctypes.c_void_p * 4), ("qk_scale", ctypes.c_void_p), ("scalar", ctypes.c_void_p),
                ("heads", ctypes.c_int64), ("kv_heads", ctypes.c_int64), ("head_dim", ctypes.c_int64),
                ("inter", ctypes.c_int64),
                ("eps", ctypes.c_float), ("qk_eps", ctypes.c_float), ("v_eps", ctypes.c_float),
                ("scale", ctypes.c_float), ("softcap", ctypes.c_float), ("_pad", ctypes.c_float),
                ("k_cache", ctypes.c_void_p), ("v_cache", ctypes.c_void_p), ("cap", ctypes.c_int64),
                ("slot", ctypes.c_int64), ("keys", ctypes.c_int64), ("mask", ctypes.c_void_p),
                ("mask_stride", ctypes.c_int64), ("cos", ctypes.c_void_p), ("sin", ctypes.c_void_p),
                ("consumer", ctypes.c_int64), ("ple_gate", G4Linear), ("ple_proj", G4Linear),
                ("ple_norm", ctypes.c_void_p), ("ple_eps", ctypes.c_float), ("_pad2", ctypes.c_float),
                ("ple", ctypes.c_void_p), ("ple_stride", ctypes.c_int64)]


def decode_layers(layers: ctypes.Array, h: torch.Tensor, *, threads: int | None = None, variant: str = "native",
                  checked: bool = False) -> None:
    """Run the decoder layers ``layers`` (an array of :class:`G4Layer`) on ``h`` [B, H] (float32, contiguous;
    updated in place) for one decoded token: the ops of the fast path's modules, in their order, in one call.
    The caller (:class:`gemma4.infer.fast_path.DecodeStack`) fills the structs from modules it checked and
    points every layer at its cache slot; nothing here can re-check those pointers."""
    lib = _ready(variant, checked)
    if not checked:
        _f32("decode_layers", h)
        if h.dim() != 2 or not h.is_contiguous():
            raise ValueError(f"decode_layers: h must be a contiguous [B, H] tensor, got {tuple(h.shape)}")
    if lib.g4_decode_layers(ctypes.addressof(layers), len(layers), h.data_ptr(), h.shape[0], h.shape[1],
                            threads or torch.get_num_threads()):
        raise MemoryError(f"decode_layers: no memory for the scratch of {h.shape[0]} rows")
