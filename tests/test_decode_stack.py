"""The one-call decode step of the CPU fast path (gemma4.infer.fast_path.DecodeStack, native.decode_layers):
bit-identical logits to the fast path's modules, which run the same kernels one call at a time, over a
sliding ring that wraps and a full cache that grows, for every weight format, batch rows with padding,
and one and two threads; the steps it must leave to the modules; the models it is not built for."""

import copy

import pytest
import torch

import quant_tiny
from gemma4 import Gemma4Config, build_model, init_random_
from gemma4.infer import fast_path
from gemma4.infer.generate import decode_step, prefill
from gemma4.model.cache import FullCache, SlidingCache
from gemma4.quant import native
from gemma4.quant.rtn import quantize
from test_native import needs_cc

pytestmark = needs_cc

SCHEMES = [("int8", None), ("int8", 32), ("int4", 32), ("bf16", None)]


def _gemma4_sliding_and_full(seed=0):
    """Gemma 4 layers the stack takes: value norms, layer scalars, two head dims (32 sliding, 64 full)."""
    cfg = Gemma4Config.from_dict(dict(quant_tiny.KINDS["dense"], attention_k_eq_v=False))
    m = init_random_(build_model(cfg), seed=seed, std=0.05).float().eval()
    g = torch.Generator().manual_seed(seed + 1)
    for layer in m.model.layers:  # away from 1, so a scalar the stack forgot would show
        layer.layer_scalar.copy_(0.5 + torch.rand(1, generator=g))
    return m


def _model(kind, scheme, group):
    m = _gemma4_sliding_and_full() if kind == "gemma4" else quant_tiny.model(kind)
    quantize(m, scheme, group)
    return fast_path.use_fast_path(m)


def _logits(model, ids, steps, mask=None, stack=True, **cache_kw):
    """Prefill 12 tokens, then ``steps`` teacher-forced decode steps; the stack on or off."""
    saved = model.model.decode_stack
    model.model.decode_stack = saved if stack else None
    try:
        cache = model.new_cache(**cache_kw)
        b = ids.shape[0]
        m = None if mask is None else mask[:, :12]
        out = [prefill(model, ids[:, :12], cache, attention_mask=m)]
        for i in range(steps):
            m = None if mask is None else mask[:, : 13 + i]
            out.append(decode_step(model, ids[:, 12 + i], cache, attention_mask=m))
        assert cache.length == 12 + steps and all(c.length == 12 + steps for c in cache.layers if c is not None)
        return torch.stack(out, 1).view(b, steps + 1, -1)
    finally:
        model.model.decode_stack = saved


def _count_calls(monkeypatch):
    calls = []
    fn = native.decode_layers
    monkeypatch.setattr(native, "decode_layers", lambda *a, **k: (calls.append(1), fn(*a, **k))[1])
    return calls


@pytest.fixture(params=[1, 2], ids=["1T", "2T"])
def threads(request):
    """Run the test at one and at two threads (the kernels share out rows), then back to one."""
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(1)


@pytest.mark.parametrize("kind", ["gemma3", "gemma4"])
@pytest.mark.parametrize("scheme, group", SCHEMES)
def test_stack_is_bit_identical_to_the_modules(kind, scheme, group, threads, monkeypatch):
    """28 steps past a 12-token prefill: the window-8 ring wraps (masked steps), and a full cache growing
    in chunks of 16 reallocates twice under the stack."""
    fast = _model(kind, scheme, group)
    assert fast.model.decode_stack is not None
    calls = _count_calls(monkeypatch)
    ids = torch.randint(0, 320, (1, 40), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        a = _logits(fast, ids, 28, chunk=16)
        assert len(calls) == 28
        b = _logits(fast, ids, 28, stack=False, chunk=16)
    assert len(calls) == 28
    assert torch.equal(a, b)


@pytest.mark.parametrize("scheme, group", SCHEMES)
def test_e2b_shape_per_layer_inputs_and_kv_sharing(scheme, group, threads, monkeypatch):
    """Gemma 4 E2B's shape (per-layer inputs, three KV-sharing consumers reading two producers' caches,
    double-wide consumer MLPs): the stack against the modules, whose consumers rotate q with PyTorch's RoPE
    and attend with the eager backend, and whose per-layer inputs use PyTorch's GELU: the same functions,
    so float32 rounding apart; the greedy tokens agree."""
    fast = _model("ple", scheme, group)
    assert fast.model.decode_stack is not None
    assert [bool(st.consumer) for st in fast.model.decode_stack.layers] == [False] * 3 + [True] * 3
    calls = _count_calls(monkeypatch)
    ids = torch.randint(0, 320, (1, 40), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        a = _logits(fast, ids, 28, chunk=16)
        b = _logits(fast, ids, 28, stack=False, chunk=16)
    assert len(calls) == 28
    torch.testing.assert_close(a, b, rtol=0, atol=1e-4 if scheme == "bf16" else 5e-3)
    assert torch.equal(a.argmax(-1), b.argmax(-1))


@pytest.mark.parametrize("scheme, group", SCHEMES)
def test_stack_takes_padded_batch_rows(scheme, group, monkeypatch):
    """Two left-padded rows (a per-row mask and per-row RoPE positions): the same as the modules."""
    fast = _model("gemma4", scheme, group)
    calls = _count_calls(monkeypatch)
    ids = torch.randint(0, 320, (2, 30), generator=torch.Generator().manual_seed(5))
    mask = torch.ones(2, 30, dtype=torch.long)
    mask[1, :5] = 0
    with torch.no_grad():
        a = _logits(fast, ids, 18, mask=mask)
        b = _logits(fast, ids, 18, mask=mask, stack=False)
    assert len(calls) == 18
    assert torch.equal(a, b)


def test_cache_decode_slot_is_update_without_the_copy():
    """decode_slot hands out the slot update() writes and as many keys as update() returns."""
    for make in (lambda: FullCache(chunk=4), lambda: SlidingCache(5), lambda: SlidingCache(5, slack=2)):
        a, b = make(), make()
        k0 = torch.randn(1, 2, 3, 8)
        a.update(k0, k0)
        b.update(k0, k0)
        for step in range(12):
            k = torch.randn(1, 2, 1, 8)
            ka, va = a.update(k, -k)
            kb, vb, slot, keys = b.decode_slot(1, 2, 8, 8, torch.float32, "cpu")
            kb[:, :, slot], vb[:, :, slot] = k[:, :, 0], -k[:, :, 0]
            assert (a.length, keys) == (b.length, ka.shape[2])
            assert torch.equal(kb[:, :, :keys], ka) and torch.equal(vb[:, :, :keys], va)
    assert SlidingCache(0).decode_slot(1, 2, 8, 8, torch.float32, "cpu") is None


def test_steps_the_stack_leaves_to_the_modules(monkeypatch):
    """Prefill (several tokens), a non-exact attention backend and another cache kind run the modules,
    and a refused step takes no cache slot."""
    fast = _model("gemma3", "int8", None)
    calls = _count_calls(monkeypatch)
    ids = torch.randint(0, 320, (1, 20), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        cache = fast.new_cache()
        prefill(fast, ids[:, :12], cache)
        assert not calls
        fast.set_attention_backend("linear")
        decode_step(fast, ids[:, 12], cache)
        assert not calls and cache.length == 13
        fast.set_attention_backend("eager")
        decode_step(fast, ids[:, 13], cache)
        assert len(calls) == 1 and cache.length == 14
    stack = fast.model.decode_stack
    h = torch.zeros(1, 1, 64)
    assert stack(h, None, {}, {}, type("Other", (), {"layers": [object()] * 4})()) is None
    assert stack(torch.zeros(1, 2, 64), None, {}, {}, cache) is None  # two new tokens
    assert stack(h.double(), None, {}, {}, cache) is None
    assert cache.length == 14


@pytest.mark.parametrize("kind", ["moe", "dense"])
def test_not_built_where_a_layer_differs(kind):
    """MoE, K=V attention: the modules keep those models (the stack is all or nothing)."""
    m = quant_tiny.model(kind)
    quantize(m, "int8", None)
    assert fast_path.use_fast_path(m).model.decode_stack is None


def test_float_weights_and_bf16_activations_keep_the_modules(monkeypatch):
    m = quant_tiny.model("gemma3")
    assert fast_path.use_fast_path(copy.deepcopy(m)).model.decode_stack is None  # float weights: oneDNN linears
    quantize(m, "int8", None)
    fast = fast_path.use_fast_path(m.to(torch.bfloat16))
    calls = _count_calls(monkeypatch)
    ids = torch.randint(0, 320, (1, 14), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():  # bf16 rows are refused at every step: PyTorch's ops, as the plain model
        cache = fast.new_cache()
        prefill(fast, ids[:, :12], cache)
        decode_step(fast, ids[:, 12], cache)
    assert not calls and cache.length == 13


def test_plain_path_drops_the_stack():
    fast = _model("gemma3", "bf16", None)
    assert fast.model.decode_stack is not None
    fast_path.use_plain_path(fast)
    assert fast.model.decode_stack is None
    fast_path.use_fast_path(fast)
    assert fast.model.decode_stack is not None


def test_two_threads_decoding_on_one_model_get_their_own_results():
    """The structs hold each step's cache pointers: concurrent decodes (ctypes releases the GIL) take turns."""
    import threading

    fast = _model("gemma3", "int8", None)
    seqs = [torch.randint(0, 320, (1, 40), generator=torch.Generator().manual_seed(s)) for s in (11, 12)]

    def run(out, j):
        with torch.no_grad():
            out[j] = _logits(fast, seqs[j], 28)

    # Each sequence alone in a thread of its own (a new thread has PyTorch's default thread count, so the
    # reference runs under the same one), then both at once.
    want, got = [None, None], [None, None]
    for j in (0, 1):
        t = threading.Thread(target=run, args=(want, j))
        t.start()
        t.join()
    threads = [threading.Thread(target=run, args=(got, j)) for j in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(torch.equal(g, w) for g, w in zip(got, want))


def test_broadcast_rope_rows_are_left_to_the_modules(monkeypatch):
    """One RoPE row for two batch rows (position_ids [1, T]): the modules broadcast it, the C side would not."""
    fast = _model("gemma3", "int8", None)
    calls = _count_calls(monkeypatch)
    ids = torch.randint(0, 320, (2, 13), generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        cache = fast.new_cache()
        prefill(fast, ids[:, :12], cache)
        y = fast(ids[:, 12:], cache=cache, position_ids=torch.tensor([[12]]))
        ref_cache = fast.new_cache()
        prefill(fast, ids[:, :12], ref_cache)
        ref = fast(ids[:, 12:], cache=ref_cache, position_ids=torch.tensor([[12], [12]]))  # stack: one row each
    assert len(calls) == 1 and cache.length == 13
    torch.testing.assert_close(y, ref, rtol=0, atol=1e-5)  # the modules' broadcast gives the same
