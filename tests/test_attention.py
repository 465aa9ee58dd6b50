"""Attention backends: exact ones agree with eager; the experimental ones agree with their own
reference forms and give the same answer cached and uncached."""

from __future__ import annotations

import pytest
import torch

import gemma4.model.attention as att
from gemma4 import Gemma4Config, build_model, init_random_
from gemma4.model.attention import ATTENTION_BACKENDS, AttnContext, eager_attention
from gemma4.model.decoder import build_mask
from tiny import DENSE, PLE, randomize_

# (B, N heads, K kv heads, T new, past, D, window, left-padding of row 0, softcap)
SHAPES = [
    (1, 4, 4, 1, 0, 16, None, 0, None),
    (2, 4, 2, 37, 0, 16, None, 0, None),
    (2, 8, 1, 50, 0, 32, 24, 0, None),
    (2, 4, 2, 29, 11, 16, None, 5, None),
    (3, 4, 1, 64, 9, 16, 16, 7, None),
    (2, 4, 2, 1, 40, 16, 8, 3, None),  # one decode step behind a padded prefix
    (2, 4, 2, 20, 0, 16, None, 4, 50.0),  # soft-capped scores (Gemma 3 style)
]


def _case(B, N, K, T, past, D, window, pad, softcap, seed=0):
    g = torch.Generator().manual_seed(seed)
    S = past + T
    q, k, v = (torch.randn(B, h, n, D, generator=g) for h, n in ((N, T), (K, S), (K, S)))
    qs, ks = torch.arange(past, past + T), torch.arange(S)
    pm = None
    if pad:
        pm = torch.ones(B, S, dtype=torch.long)
        pm[0, :pad] = 0
    mask = build_mask(qs, ks, window, pm)
    rows = torch.ones(B, T, dtype=torch.bool)  # real query rows (padding rows may differ by design)
    if pad:
        rows[0, : max(0, pad - past)] = False
    return q, k, v, mask, AttnContext("t", window, qs, ks), rows


def _diff(a, b, rows):
    return (a - b).abs().permute(0, 2, 1, 3)[rows].max().item()


def test_backends_registered():
    assert {"eager", "sdpa", "block_sparse", "linear"} <= set(ATTENTION_BACKENDS)


@pytest.mark.parametrize("shape", SHAPES)
def test_sdpa_matches_eager(shape):
    q, k, v, mask, ctx, rows = _case(*shape)
    sc = 1.0 if shape[-1] is None else 0.25
    ref = eager_attention(q, k, v, mask, sc, shape[-1], ctx)
    out = ATTENTION_BACKENDS["sdpa"](q, k, v, mask, sc, shape[-1], ctx)
    assert _diff(out, ref, torch.ones_like(rows)) <= 1e-5


@pytest.mark.parametrize("shape", SHAPES)
def test_block_sparse_fast_path_matches_masked_eager(shape):
    """The gathered-block path equals eager attention under the same (token-level) pattern, and on
    sliding layers equals plain eager attention: it is exact there."""
    q, k, v, mask, ctx, rows = _case(*shape)
    softcap = shape[-1]
    fast = att.BlockSparse(block=8, local=2, global_blocks=1, stride=3, min_fast=1)
    slow = att.BlockSparse(block=8, local=2, global_blocks=1, stride=3, min_fast=10**9)
    a, b = fast(q, k, v, mask, 1.0, softcap, ctx), slow(q, k, v, mask, 1.0, softcap, ctx)
    assert _diff(a, b, rows) <= 1e-5
    if ctx.window is not None:
        assert _diff(a, eager_attention(q, k, v, mask, 1.0, softcap, ctx), rows) <= 1e-5
    else:
        pat = fast.pattern(ctx.q_slots, ctx.k_slots)[None, None]
        assert _diff(a, eager_attention(q, k, v, mask & pat, 1.0, softcap, ctx), rows) <= 1e-5


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("chunk", [8, 16])
def test_linear_chunked_matches_quadratic(shape, chunk):
    """The chunked prefix-sum form equals the explicit masked kernel matrix, windows included
    (window 24 with chunk 16 makes the chunk shrink to a divisor, 12)."""
    q, k, v, mask, ctx, rows = _case(*shape)
    a = att.LinearAttention(chunk=chunk, min_fast=1)(q, k, v, mask, 1.0, None, ctx)
    b = att.LinearAttention(chunk=chunk, min_fast=10**9)(q, k, v, mask, 1.0, None, ctx)
    assert torch.isfinite(a).all()
    assert _diff(a, b, rows) <= 1e-5


def _tiny(kind, seed=0, std=0.15):
    d = {"dense": DENSE, "ple": PLE}[kind]
    return init_random_(build_model(Gemma4Config.from_dict(dict(d, max_position_embeddings=512))), seed=seed, std=std)


@pytest.mark.parametrize("kind", ["dense", "ple"])
def test_model_sdpa_matches_eager_with_padding(kind):
    """Whole model, left-padded batch, weights randomized like the transformers reference models
    (q/k norm scales 0.125-0.375). With every norm scale in 0.5-1.5 the random stacks amplify the
    per-op ~1e-6 differences up to ~1e-4 in the logits, padding or not."""
    m = randomize_(build_model(Gemma4Config.from_dict(dict({"dense": DENSE, "ple": PLE}[kind]))), 0)
    ids = torch.randint(3, 256, (2, 30), generator=torch.Generator().manual_seed(1))
    am = torch.ones(2, 30, dtype=torch.long)
    am[1, :9] = 0
    with torch.no_grad():
        ref = m.set_attention_backend("eager")(ids, attention_mask=am)
        out = m.set_attention_backend("sdpa")(ids, attention_mask=am)
    # Relative to the logit scale: SDPA and eager sum in different orders, and which order depends on the
    # CPU's vector width (AVX-512 machines measured <= 1e-5 absolute, AVX2 ones 1.05e-5 at |logit| ~ 4).
    assert (out - ref)[am.bool()].abs().max().item() <= 1e-5 * max(1.0, ref.abs().max().item())


@pytest.mark.parametrize("backend", ["block_sparse", "linear"])
def test_experimental_backends_cached_decode_matches_full_forward(backend):
    """Prefill 150 tokens (fast paths, with min_fast 128 the default) then 12 cached decode steps
    (ring caches, general paths): equal to one uncached forward with the same backend."""
    m = _tiny("ple").set_attention_backend(backend)
    if backend == "block_sparse":
        bs = att.BlockSparse(block=16, local=2, global_blocks=1, stride=4)
        att.register("block_sparse_test", bs)
        m.set_attention_backend("block_sparse_test")
    ids = torch.randint(3, 256, (1, 162), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = m(ids)[0]
        cache = m.new_cache()
        steps = [m(ids[:, :150], cache=cache, keep_last=1)[0, -1]]
        for i in range(150, 162):
            steps.append(m(ids[:, i : i + 1], cache=cache)[0, -1])
    got = torch.stack(steps[:-1])
    assert torch.isfinite(got).all()
    # Relative to the logit scale, as above (cached and uncached paths reduce in different orders).
    assert (got - full[149:161]).abs().max().item() <= 1e-4 * max(1.0, full.abs().max().item())
    ATTENTION_BACKENDS.pop("block_sparse_test", None)


def test_block_sparse_pattern_reaches_every_block_through_strides():
    bs = att.BlockSparse(block=4, local=2, global_blocks=1, stride=3)
    pat = bs.pattern(torch.tensor([40]), torch.arange(41))[0]
    blocks = sorted({int(s) // 4 for s in torch.nonzero(pat).flatten()})
    assert blocks == [0, 2, 5, 8, 9, 10]  # global 0, strided 2/5/8, local 9/10
