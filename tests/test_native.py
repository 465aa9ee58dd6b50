"""The optional compiled kernels (gemma4.quant.native): every ISA path this CPU can run against an exact
model of what they compute (activations rounded to int8 per 32-input block), odd shapes, threads; the
switch that turns them off; and a quantized model that runs them."""

import platform

import pytest
import torch

import quant_tiny
from gemma4.quant import native
from gemma4.quant.rtn import Int4Linear, Int8Linear, int4_dequant, int8_dequant, quantize


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            return set(next((ln for ln in f if ln.startswith("flags")), "").split())
    except OSError:
        return set()


def _variants() -> list[str]:
    out = ["native", "generic"]
    if platform.machine() in ("x86_64", "AMD64") and {"avx2", "fma"} <= _cpu_flags():
        out.append("avx2")
    return out


# Without a C compiler the package runs on PyTorch's kernels (tested everywhere else); with one, every
# build must succeed and pass its self-check.
needs_cc = pytest.mark.skipif(native._compiler() is None, reason="no C compiler: the kernels cannot be built here")


def _built(variant: str) -> None:
    assert native.isa(variant) is not None, f"the {variant} build failed (see the gemma4 log)"


def _round8(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Blocks [.., 32] -> (int8 values as float32, scale), as the C code rounds one pass."""
    amax = v.abs().amax(-1, keepdim=True)
    # float32 127 / amax as the C code divides (torch's scalar / tensor rounds differently: reciprocal first)
    inv = torch.where(amax > 0, torch.full_like(amax, 127.0).div(amax), torch.zeros_like(amax))
    return torch.round(v * inv).clamp(-127, 127), amax / 127.0


def _act_blocks(x: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """x [M, K] -> the two passes [(int8 values [M, K/32, 32] as float64, block scales [M, K/32, 1])]:
    the value, then the residual."""
    xb = x.float().reshape(x.shape[0], -1, 32)
    a1, d1 = _round8(xb)
    a2, d2 = _round8(xb - d1 * a1)
    return [(a1.double(), d1.double()), (a2.double(), d2.double())]


def _ref_int8(x, q, s):
    w = q.double().reshape(q.shape[0], -1, 32)
    out = 0
    for a, d in _act_blocks(x):
        dots = torch.einsum("mbk,nbk->mnb", a, w)  # exact integers
        out = out + (dots * d.squeeze(-1)[:, None, :]).sum(-1)
    return out * s.double()[None]


def _ref_int4(x, codes, sz, g):
    n, k = codes.shape
    s = sz[..., 0].double().repeat_interleave(g // 32, 1)  # [N, K/32] per block
    z = sz[..., 1].double().repeat_interleave(g // 32, 1)
    qc = codes.double().reshape(n, -1, 32) - 8.0
    out = x.double().reshape(x.shape[0], -1, 32).sum(-1) @ z.T  # [M, K/32] block sums
    for a, d in _act_blocks(x):
        dots = torch.einsum("mbk,nbk->mnb", a, qc)
        out = out + (dots * d.squeeze(-1)[:, None, :] * s[None]).sum(-1)
    return out


@needs_cc
@pytest.mark.parametrize("variant", _variants())
@pytest.mark.parametrize("m,n,k,g", [(1, 64, 640, 32), (3, 37, 160, 32), (9, 21, 2112, 64), (2, 8, 1152, 128),
                                     (1, 5, 512, 256), (4, 130, 96, 32)])
@pytest.mark.parametrize("threads", [1, 2])
def test_kernels_compute_int8_activation_dot_products_exactly(variant, m, n, k, g, threads):
    _built(variant)
    gen = torch.Generator().manual_seed(n * k + m)
    x = torch.randn(m, k, generator=gen) * torch.rand(1, k, generator=gen) * 3  # uneven blocks
    x[0, :32] = 0.0  # an all-zero block
    q = torch.randint(-127, 128, (n, k), generator=gen, dtype=torch.int8)
    s = (torch.rand(n, generator=gen) * 0.01 + 1e-4).to(torch.bfloat16)
    y = native.int8_matmul(x, q, s, variant=variant, threads=threads, checked=True)
    ref = _ref_int8(x, q, s)
    assert y.dtype == torch.float32 and y.shape == (m, n)
    assert float((y.double() - ref).norm() / ref.norm()) < 1e-5
    # bf16 rows in and out, no converted copies: the float32 result of the rounded input, rounded
    xb = x.to(torch.bfloat16)
    yb = native.int8_matmul(xb, q, s, variant=variant, threads=threads, checked=True)
    assert yb.dtype == torch.bfloat16
    assert torch.equal(yb, native.int8_matmul(xb.float(), q, s, variant=variant, checked=True).to(torch.bfloat16))
    assert native.int8_matmul(xb, q, s, out_dtype=torch.float32, variant=variant, checked=True).dtype == torch.float32
    codes = torch.randint(0, 16, (n, k), generator=gen, dtype=torch.uint8)
    sz = (torch.randn(n, k // g, 2, generator=gen) * 0.02).to(torch.bfloat16)
    packed = (codes[:, 0::2] | (codes[:, 1::2] << 4)).contiguous()  # the portable nibble order
    y4 = native.int4_matmul(x, packed, sz, g, variant=variant, threads=threads, checked=True)
    ref4 = _ref_int4(x, codes, sz, g)
    # float32 sums of terms that largely cancel (the -8 offset of the codes against the zeros): bound the
    # error by the size of the terms, not of the result
    terms = _ref_int4(x.abs(), torch.full_like(codes, 15), sz.abs(), g).abs()
    assert float(((y4.double() - ref4).abs() / terms).max()) < 1e-5
    y4b = native.int4_matmul(xb, packed, sz, g, variant=variant, threads=threads, checked=True)
    assert torch.equal(y4b, native.int4_matmul(xb.float(), packed, sz, g, variant=variant, checked=True).to(torch.bfloat16))


@needs_cc
@pytest.mark.parametrize("variant", _variants())
@pytest.mark.parametrize("m,n,k,g", [(16, 37, 160, 32), (29, 70, 640, 64), (40, 33, 1024, 256)])
@pytest.mark.parametrize("threads", [1, 2])
def test_prefill_rows_multiply_float32_activations_by_the_dequantized_weights(variant, m, n, k, g, threads):
    """From 16 rows an AVX-512 build runs the packed float32 GEMM (prefill): the activations as they are,
    against exactly the weights dequantize() gives; the other builds keep the int8-activation rows."""
    _built(variant)
    gen = torch.Generator().manual_seed(n * k + m)
    x = torch.randn(m, k, generator=gen)
    q = torch.randint(-127, 128, (n, k), generator=gen, dtype=torch.int8)
    s = (torch.rand(n, generator=gen) * 0.01 + 1e-4).to(torch.bfloat16)
    codes = torch.randint(0, 16, (n, k), generator=gen, dtype=torch.uint8)
    sz = (torch.randn(n, k // g, 2, generator=gen) * 0.02).to(torch.bfloat16)
    packed = (codes[:, 0::2] | (codes[:, 1::2] << 4)).contiguous()
    y8 = native.int8_matmul(x, q, s, variant=variant, threads=threads, checked=True)
    y4 = native.int4_matmul(x, packed, sz, g, variant=variant, threads=threads, checked=True)
    if native.isa(variant) != "AVX512-VNNI":
        assert float((y8.double() - _ref_int8(x, q, s)).norm() / _ref_int8(x, q, s).norm()) < 1e-5
        return
    w8 = int8_dequant(q, s, torch.float32)
    w4 = int4_dequant(codes, sz.transpose(0, 1), g, torch.float32)  # the module layout [K/g, N, 2]
    for y, w in ((y8, w8), (y4, w4)):
        ref = x.double() @ w.double().T
        terms = x.double().abs() @ w.double().abs().T  # float32 rounding of k terms: bounded by their size
        assert float(((y.double() - ref).abs() / terms).max()) < 1e-6 * k ** 0.5
    xb = x.to(torch.bfloat16)
    assert torch.equal(native.int8_matmul(xb, q, s, variant=variant, threads=threads, checked=True),
                       native.int8_matmul(xb.float(), q, s, variant=variant, checked=True).to(torch.bfloat16))


def _ref_int8_grouped(x, q, sg):
    """As _ref_int8, with a float16 weight scale per 32-input block: each block's sum scaled by it."""
    w = q.double().reshape(q.shape[0], -1, 32)
    out = 0
    for a, d in _act_blocks(x):
        dots = torch.einsum("mbk,nbk->mnb", a, w)
        out = out + (dots * d.squeeze(-1)[:, None, :] * sg.double()[None]).sum(-1)
    return out


@needs_cc
@pytest.mark.parametrize("variant", _variants())
@pytest.mark.parametrize("m,n,k", [(1, 64, 640), (3, 37, 160), (2, 21, 96), (17, 33, 160), (40, 70, 640)])
@pytest.mark.parametrize("threads", [1, 2])
def test_grouped_int8_kernels(variant, m, n, k, threads):
    """int8 codes with a float16 scale per 32 inputs (GGUF's Q8_0 layout): decode rows are the block-exact
    integer sums times both scales (K = 160 and 96: a last 64-input chunk with one block, whose neighbour's
    scale must not be read); from 16 rows an AVX-512 build multiplies the dequantized weights in float32."""
    _built(variant)
    gen = torch.Generator().manual_seed(n * k + m + 1)
    x = torch.randn(m, k, generator=gen) * torch.rand(1, k, generator=gen) * 3
    x[0, :32] = 0.0
    q = torch.randint(-127, 128, (n, k), generator=gen, dtype=torch.int8)
    sg = (torch.rand(n, k // 32, generator=gen) * 0.01 + 1e-4).to(torch.float16)
    sg[0, -1] = 0.0  # an all-zero block scale
    y = native.int8_matmul(x, q, sg, variant=variant, threads=threads, checked=True)
    assert y.dtype == torch.float32 and y.shape == (m, n)
    w = int8_dequant(q, sg, torch.float32)
    assert torch.equal(w, (q.float().view(n, -1, 32) * sg.float()[..., None]).view(n, k))
    if m >= 16 and native.isa(variant) == "AVX512-VNNI":
        ref = x.double() @ w.double().T
        terms = x.double().abs() @ w.double().abs().T
        assert float(((y.double() - ref).abs() / terms).max()) < 1e-6 * k ** 0.5
    else:
        ref = _ref_int8_grouped(x, q, sg)
        assert float((y.double() - ref).norm() / ref.norm()) < 1e-5
    xb = x.to(torch.bfloat16)
    assert torch.equal(native.int8_matmul(xb, q, sg, variant=variant, threads=threads, checked=True),
                       native.int8_matmul(xb.float(), q, sg, variant=variant, checked=True).to(torch.bfloat16))


@needs_cc
def test_kernels_reject_shapes_they_cannot_run():
    _built("native")
    with pytest.raises(ValueError, match="int8_matmul"):
        native.int8_matmul(torch.randn(1, 48), torch.zeros(4, 48, dtype=torch.int8), torch.ones(4, dtype=torch.bfloat16),
                           checked=True)
    for bad in (torch.ones(4, 2, dtype=torch.bfloat16), torch.ones(4, 3, dtype=torch.float16),
                torch.ones(4, dtype=torch.float16)):  # grouped scales are float16 [N, K/32]; row scales bf16 [N]
        with pytest.raises(ValueError, match="int8_matmul"):
            native.int8_matmul(torch.randn(1, 64), torch.zeros(4, 64, dtype=torch.int8), bad, checked=True)
    with pytest.raises(ValueError, match="int4_matmul"):
        native.int4_matmul(torch.randn(1, 64), torch.zeros(4, 32, dtype=torch.uint8),
                           torch.ones(4, 1, 2, dtype=torch.bfloat16), 48, checked=True)


def test_switch_off_falls_back_to_pytorch(monkeypatch):
    monkeypatch.setenv("GEMMA4_NATIVE", "0")
    assert not native.available()
    lin = Int4Linear(64, 64, 32)
    lin.set_from_float(torch.randn(64, 64))
    assert not lin.kernel_tensors()[0]
    x = torch.randn(2, 64)
    assert torch.allclose(lin(x), x @ lin.dequantize().T, rtol=0.05, atol=0.05)


@needs_cc
def test_quantized_layers_and_model_use_the_kernels_when_built(monkeypatch):
    monkeypatch.delenv("GEMMA4_NATIVE", raising=False)
    assert native.available()
    torch.manual_seed(0)
    x = torch.randn(3, 640)
    for lin in (Int8Linear(96, 640), Int4Linear(96, 640, 32)):
        lin.set_from_float(torch.randn(96, 640) * 0.05)
        assert lin.kernel_ready() and lin.kernel_tensors()[0]
        w = lin.dequantize()
        assert float((lin(x) - x @ w.T).norm() / (x @ w.T).norm()) < 0.01  # the int8 activation rounding
    # A model: cached decode equals the full forward, and the top tokens match the float weights'.
    ids = torch.randint(0, 320, (1, 10), generator=torch.Generator().manual_seed(0))
    for scheme, gs in (("int8", None), ("int4", 32)):
        m = quantize(quant_tiny.model("ple"), scheme, gs)
        with torch.no_grad():
            y = m(ids)
            cache = m.new_cache()
            steps = [m(ids[:, :6], cache=cache)] + [m(ids[:, t:t + 1], cache=cache) for t in range(6, 10)]
        assert float((torch.cat(steps, 1) - y).norm() / y.norm()) < 1e-3  # attention sums in another order
