"""The fused float32 decode ops of gemma4.quant.native (RMSNorm, q/k norm + RoPE, one-row attention over a
cache, gated GELU) against the PyTorch code they replace, on every ISA build this CPU runs; a float32
quantized model on the fast path (which calls them) against the plain model over cached decoding; and the
sampler's block argmax against torch.argmax."""

import copy

import pytest
import torch
import torch.nn.functional as F

import quant_tiny
from gemma4.infer import fast_path
from gemma4.infer.generate import decode_step, prefill
from gemma4.infer.sampling import argmax
from gemma4.model.attention import eager_attention
from gemma4.model.decoder import apply_rope
from gemma4.quant import native
from gemma4.quant.rtn import quantize
from test_native import _variants, needs_cc

pytestmark = needs_cc


def _rms(x, eps, scale=None):
    y = x * torch.pow(x.pow(2).mean(-1, keepdim=True) + eps, -0.5)
    return y if scale is None else y * scale


@pytest.mark.parametrize("variant", _variants())
@pytest.mark.parametrize("dim", [640, 37, 16])
def test_rmsnorm_matches_the_module(variant, dim):
    g = torch.Generator().manual_seed(dim)
    x = torch.randn(3, 5, dim, generator=g) * 3
    w = torch.randn(dim, generator=g)
    for scale in (w, None):
        ref = _rms(x, 1e-6, scale)
        y = native.rmsnorm(x, scale, 1e-6, variant=variant)
        assert y.shape == x.shape and y.dtype == torch.float32
        torch.testing.assert_close(y, ref, rtol=2e-6, atol=2e-6)
    # many rows, two threads (the row loop is split)
    x = torch.randn(300, dim, generator=g)
    torch.testing.assert_close(native.rmsnorm(x, w, 1e-5, threads=2, variant=variant), _rms(x, 1e-5, w),
                               rtol=2e-6, atol=2e-6)


@pytest.mark.parametrize("variant", _variants())
def test_gelu_mul_matches_pytorch(variant):
    g = torch.Generator().manual_seed(1)
    for inter in (2048, 45):
        gu = torch.randn(2, 3, 2 * inter, generator=g) * 4
        gu[0, 0, :8] = torch.tensor([0.0, -0.0, 1e-8, -1e-8, 30.0, -30.0, 100.0, -100.0])
        ref = F.gelu(gu[..., :inter], approximate="tanh") * gu[..., inter:]
        y = native.gelu_mul(gu, inter, variant=variant)
        torch.testing.assert_close(y, ref, rtol=3e-6, atol=1e-6)


@pytest.mark.parametrize("variant", _variants())
@pytest.mark.parametrize("d, nq, nk, nv", [(256, 4, 1, 1), (64, 8, 2, 2), (32, 3, 3, 0)])
def test_qk_norm_rope_matches_norm_then_rope(variant, d, nq, nk, nv):
    g = torch.Generator().manual_seed(d + nq)
    rows = 5
    width = (nq + nk + nv) * d + 7  # a row stride wider than the heads
    buf = torch.randn(rows, width, generator=g) * 2
    scale = torch.randn(nq + nk, d, generator=g)
    cos, sin = torch.randn(rows, d, generator=g), torch.randn(rows, d, generator=g)
    for v_eps in (1e-6, None):
        out = buf.clone()
        native.qk_norm_rope_(out, nq + nk, nv, d, scale, 1e-6, cos, sin, v_eps, variant=variant)
        qk = buf[:, : (nq + nk) * d].view(rows, nq + nk, d)
        ref = apply_rope((_rms(qk, 1e-6) * scale)[None], cos[None, :, None], sin[None, :, None])[0]
        torch.testing.assert_close(out[:, : (nq + nk) * d].view(rows, nq + nk, d), ref, rtol=1e-5, atol=1e-5)
        v = buf[:, (nq + nk) * d : (nq + nk + nv) * d].view(rows, nv, d)
        vref = _rms(v, 1e-6) if v_eps is not None else v
        torch.testing.assert_close(out[:, (nq + nk) * d : (nq + nk + nv) * d].view(rows, nv, d), vref,
                                   rtol=2e-6, atol=2e-6)
        assert torch.equal(out[:, (nq + nk + nv) * d :], buf[:, (nq + nk + nv) * d :])  # the rest untouched


@pytest.mark.parametrize("variant", _variants())
@pytest.mark.parametrize("b, n, kh, s, d, dv", [(1, 4, 1, 300, 256, 256), (2, 8, 2, 37, 64, 64),
                                                (2, 6, 2, 9, 40, 24), (3, 3, 3, 1, 16, 16)])
@pytest.mark.parametrize("softcap", [None, 20.0])
def test_attention_decode_matches_eager(variant, b, n, kh, s, d, dv, softcap):
    g = torch.Generator().manual_seed(s + d)
    # queries as rows of a wider projection, keys/values as the live prefix of a larger cache buffer
    q = torch.randn(b, n * d + 11, generator=g)[:, : n * d].view(b, n, d)
    k = torch.randn(b, kh, s + 5, d, generator=g)[:, :, :s]
    v = torch.randn(b, kh, s + 5, dv, generator=g)[:, :, :s]
    masks = [None, torch.rand(1, 1, 1, s, generator=g) > 0.3, torch.rand(b, 1, 1, s, generator=g) > 0.5]
    for mask in masks:
        if mask is not None:
            mask[..., -1] = True  # a decode row always sees its own key
        ref = eager_attention(q[:, :, None], k, v, mask, 0.125, softcap, None)[:, :, 0]
        for threads in (1, 2):
            out = native.attention_decode(q, k, v, mask, 0.125, softcap, threads=threads, variant=variant)
            torch.testing.assert_close(out, ref, rtol=1e-5, atol=2e-6)


def test_fused_ops_reject_what_they_cannot_run():
    x = torch.randn(2, 64)
    with pytest.raises(ValueError, match="float32"):
        native.rmsnorm(x.bfloat16(), None, 1e-6)
    with pytest.raises(ValueError, match="2 \\* 10"):
        native.gelu_mul(x, 10)
    with pytest.raises(ValueError, match="unsupported shapes"):
        native.qk_norm_rope_(x, 2, 0, 32, torch.ones(3, 32), 1e-6, torch.ones(2, 32), torch.ones(2, 32))
    q, k = torch.randn(1, 4, 16), torch.randn(1, 3, 5, 16)
    with pytest.raises(ValueError, match="unsupported"):  # 4 query heads over 3 KV heads
        native.attention_decode(q, k, k, None, 1.0, None)
    with pytest.raises(ValueError, match="mask"):
        native.attention_decode(q, k[:, :2], k[:, :2], torch.ones(1, 1, 1, 4, dtype=torch.bool), 1.0, None)


def _decode_logits(model, ids, steps):
    """Logits of a 12-token prefill then ``steps`` cached decode steps, teacher-forced on ``ids``."""
    cache = model.new_cache()
    out = [prefill(model, ids[:, :12], cache)]
    for i in range(steps):
        out.append(decode_step(model, ids[:, 12 + i], cache))
    return torch.stack(out, 1)


@pytest.mark.parametrize("kind", ["gemma3", "ple", "dense", "moe"])
@pytest.mark.parametrize("scheme, group", [("int8", None), ("int4", 32), ("bf16", None), (None, None)])
def test_float32_fast_path_runs_the_fused_ops_and_matches_the_plain_model(kind, scheme, group, monkeypatch):
    """Quantized (bf16 weights included): q/k/v are one kernel call, so its attention takes every fused op; the logits then differ
    from the plain model's by up to ~3e-3 (of logits ~1.5-3.4), because a last-bit difference upstream
    can move an activation across an int8 rounding step in the next matmul. Float32 weights (oneDNN
    linears, separate q/k/v): RMSNorm and the gated GELU, within ~2e-5."""
    calls = {}
    native.available()  # the self-check calls the ops itself: run it before they are counted
    for name in ("rmsnorm", "qk_norm_rope_", "attention_decode", "gelu_mul", "decode_layers"):
        fn = getattr(native, name)

        def counted(*a, _fn=fn, _name=name, **kw):
            calls[_name] = calls.get(_name, 0) + 1
            return _fn(*a, **kw)

        monkeypatch.setattr(native, name, counted)
    m = quant_tiny.model(kind)
    if scheme:
        quantize(m, scheme, group)
    ids = torch.randint(0, 320, (1, 40), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = _decode_logits(m, ids, 28)  # the sliding window is 8: the ring wraps (masked decode)
        fast = fast_path.use_fast_path(copy.deepcopy(m))
        out = _decode_logits(fast, ids, 28)
    if scheme and kind in ("gemma3", "ple"):  # these decode through the one-call stack (DecodeStack)
        assert set(calls) == {"rmsnorm", "qk_norm_rope_", "gelu_mul", "decode_layers"}, calls
        torch.testing.assert_close(out, ref, rtol=0, atol=1e-4 if scheme == "bf16" else 5e-3)
    elif scheme:
        assert set(calls) == {"rmsnorm", "qk_norm_rope_", "attention_decode", "gelu_mul"}, calls
        # bf16 weights: float32 products of the same values, no activation rounding: float32 noise only.
        torch.testing.assert_close(out, ref, rtol=0, atol=1e-4 if scheme == "bf16" else 5e-3)
    else:
        assert set(calls) == {"rmsnorm", "gelu_mul"}, calls
        torch.testing.assert_close(out, ref, rtol=0, atol=1e-4)
    assert torch.equal(argmax(out), argmax(ref))


def test_bf16_fast_path_keeps_pytorch_ops(monkeypatch):
    """bf16 activations: the plain model's own ops (bit-identical results), never the float32 C ops."""
    for name in ("rmsnorm", "qk_norm_rope_", "attention_decode", "gelu_mul"):
        monkeypatch.setattr(native, name, lambda *a, **k: pytest.fail("a float32 op ran on bf16 activations"))
    m = quant_tiny.model("gemma3")
    quantize(m, "int8", None)
    m = m.to(torch.bfloat16)
    ids = torch.randint(0, 320, (1, 20), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        fast = fast_path.use_fast_path(copy.deepcopy(m))
        _decode_logits(fast, ids, 6)


def test_block_argmax_is_torch_argmax():
    g = torch.Generator().manual_seed(0)
    for trial in range(60):
        x = torch.randn(3, 262144, generator=g)
        if trial % 3 == 0:
            x[:, 5::7] = x.max()  # ties across blocks: the first one wins
        if trial % 5 == 0:
            x[1, 1000 + trial] = float("nan")
        if trial % 7 == 0:
            x = x.round()
        if trial % 11 == 0:
            x[2] = float("-inf")
        assert torch.equal(argmax(x), x.argmax(-1)), trial
    for shape in [(5,), (2, 4096), (2, 1000), (262144,)]:
        x = torch.randn(shape, generator=g)
        assert torch.equal(argmax(x), x.argmax(-1)), shape
