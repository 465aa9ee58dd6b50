"""generate / stream / sample_next: batching, sampling, stopping, bad input."""

from __future__ import annotations

import math

import pytest
import torch

import gemma4
from gemma4.infer.generate import GenerationError, NonFiniteLogitsError, generate, stream
from gemma4.infer.sampling import SamplingError, SamplingParams, sample_next, seen_mask
from test_cache import KINDS, tiny_model


def _prompts(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 256, (n,), generator=g).tolist() for n in lengths]


@pytest.fixture(scope="module")
def dense():
    # Gemma 3 kind at full scale: its greedy output varies most (random models love repeating a token).
    return tiny_model("gemma3", scale=1.0)


# ----------------------------------------------------------------------------- batching
@pytest.mark.parametrize("kind", KINDS)
def test_left_padded_batch_rows_equal_single_runs(kind):
    m = tiny_model(kind, scale=1.0)
    # Lengths straddle the sliding window (8) so padding, window and ring interact.
    prompts = _prompts([3, 17, 9, 26], seed=KINDS.index(kind))
    batch = generate(m, prompts, 24, stop_token_ids=(), prefill_chunk=7)
    for p, row in zip(prompts, batch):
        assert row == generate(m, [p], 24, stop_token_ids=())[0]
    assert [len(r) for r in batch] == [24] * 4


def test_prompt_forms(dense):
    p = _prompts([6])[0]
    ref = generate(dense, [p], 5, stop_token_ids=())
    assert generate(dense, p, 5, stop_token_ids=()) == ref  # one id list
    assert generate(dense, torch.tensor(p), 5, stop_token_ids=()) == ref  # 1-D tensor
    assert generate(dense, torch.tensor([p, p]), 5, stop_token_ids=()) == ref * 2  # [B, T]
    assert gemma4.generate(dense, [p], 5, stop_token_ids=()) == ref  # package export


def test_stream_yields_each_step_and_none_after_a_row_stops(dense):
    prompts = _prompts([4, 10], seed=1)
    free = generate(dense, prompts, 12, stop_token_ids=())
    k = next(i for i in range(1, 12) if free[0][i] not in free[0][:i])
    stop = free[0][k]  # row 0 stops at its (k+1)-th token
    g = stream(dense, prompts, 12, stop_token_ids=[stop])
    steps = list(g)
    assert len(steps) == max(len(r) for r in g.tokens)
    assert [s[0] for s in steps[: k + 1]] == free[0][: k + 1]
    first_stop_1 = free[1].index(stop) + 1 if stop in free[1] else 12
    assert all(s[0] is None for s in steps[k + 1:])
    assert g.tokens[0] == free[0][: k + 1] and g.finish_reasons[0] == "stop_token"
    assert g.tokens[1] == free[1][:first_stop_1]


def test_prefill_computes_last_position_logits_only(dense):
    shapes = []
    original = dense.logits
    dense.logits = lambda h: (shapes.append(tuple(h.shape)), original(h))[1]
    try:
        generate(dense, _prompts([40, 33]), 3, stop_token_ids=(), prefill_chunk=16)
    finally:
        del dense.logits
    assert shapes == [(2, 1, 48)] * 3  # one prefill head call on one position, then one per step


# ----------------------------------------------------------------------------- sample_next
def test_greedy_is_argmax():
    logits = torch.randn(5, 100, generator=torch.Generator().manual_seed(0))
    assert torch.equal(sample_next(logits, SamplingParams()), logits.argmax(-1))


def _freq(logits_row, params, n=4000, seed=0):
    logits = logits_row.expand(n, -1)
    g = torch.Generator().manual_seed(seed)
    out = sample_next(logits, params, g)
    return torch.bincount(out, minlength=logits.shape[-1]).float() / n


def test_temperature():
    row = torch.tensor([[0.0, math.log(2.0), -50.0]])
    f = _freq(row, SamplingParams(temperature=1.0))
    assert abs(f[1] - 2 / 3) < 0.03 and f[2] == 0
    f = _freq(row, SamplingParams(temperature=1000.0))  # nearly uniform over all three
    assert all(abs(x - 1 / 3) < 0.04 for x in f.tolist())
    f = _freq(row, SamplingParams(temperature=0.01))
    assert f[1] == 1.0


PROBS = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()


def test_top_k():
    f = _freq(PROBS, SamplingParams(temperature=1.0, top_k=2))
    assert f[2] == 0 and f[3] == 0 and abs(f[0] - 0.625) < 0.03


@pytest.mark.parametrize("top_p,kept", [(0.5, 1), (0.7, 2), (0.8, 2), (0.81, 3), (0.96, 4)])
def test_top_p(top_p, kept):
    f = _freq(PROBS, SamplingParams(temperature=1.0, top_p=top_p), n=2000)
    assert (f > 0).sum().item() == kept


def test_min_p():
    f = _freq(PROBS, SamplingParams(temperature=1.0, min_p=0.25))  # limit 0.125: drops the 0.05 token
    assert f[3] == 0 and (f[:3] > 0).all()
    f = _freq(PROBS, SamplingParams(temperature=1.0, min_p=0.7))  # limit 0.35: only the top token
    assert f[0] == 1.0


def test_repetition_penalty():
    logits = torch.tensor([[2.0, 1.9, -1.0, -1.5]])
    p = SamplingParams(repetition_penalty=2.0)
    assert sample_next(logits, p, history=torch.tensor([[0]])).item() == 1  # 2.0 -> 1.0 < 1.9
    assert sample_next(logits, p, history=torch.tensor([[-1, -1]])).item() == 0  # padding entries ignored
    # negative logits are multiplied: token 2 (-1 -> -2) falls below token 3 (-1.5)
    masked = torch.tensor([[-9.0, -9.0, -1.0, -1.5]])
    assert sample_next(masked, p, history=torch.tensor([[2]])).item() == 3
    seen = seen_mask(torch.tensor([[0, 0, -1]]), 4)
    assert seen.tolist() == [[True, False, False, False]]
    assert sample_next(logits, p, history=seen).item() == 1


def test_repetition_penalty_in_generation_discourages_repeats(dense):
    p = _prompts([10], seed=4)
    plain = generate(dense, p, 30, stop_token_ids=())[0]
    pen = generate(dense, p, 30, stop_token_ids=(), repetition_penalty=5.0)[0]
    assert pen != plain
    assert len(set(pen)) >= len(set(plain))


def test_seed_reproducible(dense):
    p = _prompts([5, 9], seed=2)
    kw = dict(temperature=1.5, top_k=50, top_p=0.95, stop_token_ids=())
    a = generate(dense, p, 16, seed=11, **kw)
    assert generate(dense, p, 16, seed=11, **kw) == a
    assert generate(dense, p, 16, seed=12, **kw) != a


def test_stop_strings_with_fake_decode(dense):
    p = _prompts([7], seed=3)
    free = generate(dense, p, 20, stop_token_ids=())[0]

    def decode(ids):
        return "".join(chr(ord("a") + i % 26) for i in ids)

    text = decode(free)
    target = text[8:11]  # stop string made of tokens 9..11
    first = text.find(target)
    g = stream(dense, p, 20, stop_token_ids=(), stop_strings=[target, "zzzzzzzz"], tokenizer=decode)
    list(g)
    assert g.tokens[0] == free[: first + len(target)] and g.finish_reasons == ["stop_string"]

    class Tok:  # an object with .decode works as well
        def decode(self, ids):
            return decode(ids)

    assert generate(dense, p, 20, stop_token_ids=(), stop_strings=target, tokenizer=Tok()) == [g.tokens[0]]


def test_max_tokens_and_default_eos(dense):
    p = _prompts([5])
    g = stream(dense, p, 9, stop_token_ids=())
    list(g)
    assert len(g.tokens[0]) == 9 and g.finish_reasons == ["length"]
    assert generate(dense, p, 0) == [[]]
    free = g.tokens[0]
    cfg = dense.config
    old = cfg.eos_token_id
    cfg.eos_token_id = [free[3]]  # default stop ids come from the config
    try:
        assert generate(dense, p, 9) == [free[: free.index(free[3]) + 1]]
    finally:
        cfg.eos_token_id = old


# ----------------------------------------------------------------------------- invalid values / bad input
@pytest.mark.parametrize("kw,field", [
    (dict(temperature=-0.1), "temperature"), (dict(temperature=float("nan")), "temperature"),
    (dict(top_k=-1), "top_k"), (dict(top_k=2.5), "top_k"), (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.1), "top_p"), (dict(min_p=-0.1), "min_p"), (dict(min_p=1.5), "min_p"),
    (dict(repetition_penalty=0.0), "repetition_penalty"), (dict(seed=-3), "seed"), (dict(temperature="hot"), "temperature"),
])
def test_invalid_sampling_values(kw, field):
    with pytest.raises(SamplingError, match=field):
        SamplingParams(**kw)


def test_bad_generation_arguments(dense):
    p = _prompts([4])
    with pytest.raises(GenerationError, match="max_new_tokens"):
        generate(dense, p, -1)
    with pytest.raises(GenerationError, match="not both"):
        generate(dense, p, 3, params=SamplingParams(), temperature=1.0)
    with pytest.raises(GenerationError, match="tokenizer"):
        generate(dense, p, 3, stop_strings=["x"])
    with pytest.raises(GenerationError, match="prefill_chunk"):
        generate(dense, p, 3, prefill_chunk=0)
    with pytest.raises(SamplingError, match="top_p"):
        generate(dense, p, 3, top_p=2.0)


def test_bad_prompts(dense):
    with pytest.raises(GenerationError, match="prompt 1 is empty"):
        generate(dense, [[5, 6], []], 3)
    with pytest.raises(GenerationError, match="no prompts"):
        generate(dense, [], 3)
    with pytest.raises(GenerationError, match=r"prompt 0 has out-of-vocabulary token id\(s\) \[256\]"):
        generate(dense, [[5, 256]], 3)
    with pytest.raises(GenerationError, match="out-of-vocabulary"):
        generate(dense, [[-1, 5]], 3)
    with pytest.raises(GenerationError, match="257 tokens but the model's context"):
        generate(dense, [[5] * 257], 3)
    with pytest.raises(GenerationError, match="integer ids"):
        generate(dense, torch.rand(1, 4), 3)


def test_generation_stops_at_the_context(dense):
    g = stream(dense, [[5] * 250], 20, stop_token_ids=())
    list(g)
    # positions 0..255: the last fed token sits at 255, so 256 - 250 + 1 = 7 new tokens fit
    assert len(g.tokens[0]) == 7 and g.finish_reasons == ["context"]


def test_nan_logits_name_the_layer():
    m = tiny_model("dense")
    with torch.no_grad():
        m.model.layers[3].mlp.down_proj.weight[0, 0] = float("nan")
    with pytest.raises(NonFiniteLogitsError, match=r"model\.layers\.3\.mlp\.down_proj \(layer 3"):
        generate(m, _prompts([6]), 4)


# ----------------------------------------------------------------------------- CPU fast path
@pytest.mark.parametrize("kind", ["ple", "moe"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_weights_compute_the_same_and_unpack(kind, dtype):
    from gemma4.infer.fast_path import FastRMSNorm, PackedLinear, PackedMLP, available, use_fast_path, use_plain_path

    # CPU decoding packs float32 by default and the speed results rest on it: it must run on any CPU
    # torch build. oneDNN's bf16 needs AVX512-core or AVX2-VNNI-2; on plain AVX2 (CI's machine) a bf16
    # model must keep the plain path untouched instead.
    m = tiny_model(kind, scale=1.0, dtype=dtype)
    if dtype == torch.bfloat16 and not available(dtype):
        use_fast_path(m)
        assert not m.fast_path and type(m.model.layers[0].mlp) is not PackedMLP
        return
    assert available(dtype), f"oneDNN cannot run {dtype} here"
    state = {k: v.clone() for k, v in m.state_dict().items()}
    prompts = _prompts([5, 12], seed=6)
    ids = torch.tensor([prompts[1]])
    with torch.no_grad():
        ref = m(ids).float()
    plain = generate(m, prompts, 10, stop_token_ids=())
    use_fast_path(m)
    layer = m.model.layers[0]
    assert isinstance(layer.mlp, PackedMLP) and isinstance(layer.self_attn.q_proj, PackedLinear)
    assert isinstance(layer.input_layernorm, FastRMSNorm) and isinstance(m.lm_head, PackedLinear)
    with torch.no_grad():
        got = m(ids).float()
    # Same function. float32 differs by summation order only. bf16 is bit-identical where the CPU has
    # native bf16 dot products (AVX512-BF16); on AVX2 oneDNN emulates them and rounds intermediate sums
    # differently, up to one bf16 step (2^-8 relative) of the largest logit.
    tol = 1e-5 if dtype == torch.float32 else 2.0**-7
    assert (got - ref).abs().max().item() <= tol * ref.abs().max().item()
    assert generate(m, prompts, 10, stop_token_ids=()) == plain
    use_plain_path(m)
    assert m.lm_head is None
    after = m.state_dict()
    assert after.keys() == state.keys() and all(torch.equal(after[k], state[k]) for k in state)


def test_run_inside_the_window_equals_the_ring_cache():
    # generate() swaps the sliding rings for plain caches when prompt + new tokens fit in the window;
    # the tokens must be those of the ring-cache decode loop.
    from gemma4.infer.generate import decode_step, prefill

    m = tiny_model("ple", scale=1.0, sliding_window=64)
    prompt = _prompts([20], seed=9)[0]
    out = generate(m, [prompt], 30, stop_token_ids=())[0]
    cache = m.new_cache()
    with torch.no_grad():
        tok = prefill(m, torch.tensor([prompt]), cache).argmax(-1)
        ref = [tok.item()]
        for _ in range(29):
            tok = decode_step(m, tok, cache).argmax(-1)
            ref.append(tok.item())
    assert out == ref
