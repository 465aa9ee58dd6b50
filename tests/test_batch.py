"""Continuous batching (gemma4.infer.batch): every request gets what generate gives it alone."""

from __future__ import annotations

import threading

import pytest
import torch

from gemma4.infer.batch import BatchEngine, BatchError, QueueFullError
from gemma4.infer.generate import generate
from gemma4.infer.sampling import SamplingParams
from test_cache import KINDS, tiny_model


def _prompts(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 256, (n,), generator=g).tolist() for n in lengths]


@pytest.fixture(scope="module")
def g3():
    return tiny_model("gemma3", scale=1.0)


def _drive(engine, schedule, new_tokens, **kw):
    """Submit schedule[(step, prompt)] at the given engine steps; run to the end; return the requests."""
    reqs, i, step = {}, 0, 0
    order = sorted(range(len(schedule)), key=lambda j: schedule[j][0])
    while True:
        while i < len(order) and schedule[order[i]][0] <= step:
            j = order[i]
            reqs[j] = engine.submit(schedule[j][1], new_tokens[j], **kw)
            i += 1
        worked = engine.step()
        step += 1
        if not worked and i == len(order):
            break
        assert step < 2000
    return [reqs[j] for j in range(len(schedule))]


@pytest.mark.parametrize("kind", KINDS)
def test_joining_rows_equal_generate_alone(kind):
    m = tiny_model(kind, scale=1.0)
    # Prompt lengths straddle the sliding window (8) and the prefill chunk (5); requests join while
    # others decode, some in the middle of another's chunked prefill, and the batch (3) is smaller
    # than the number of requests so rows leave and are reused.
    prompts = _prompts([3, 17, 9, 26, 1, 12], seed=KINDS.index(kind))
    starts = [0, 0, 2, 5, 6, 11]
    new = [20, 9, 14, 6, 11, 16]
    eng = BatchEngine(m, max_batch=3, prefill_chunk=5, stop_token_ids=())
    reqs = _drive(eng, list(zip(starts, prompts)), new)
    for p, n, r in zip(prompts, new, reqs):
        assert r.finish_reason == "length"
        assert r.tokens == generate(m, [p], n, stop_token_ids=(), prefill_chunk=5)[0]
    assert eng.idle and eng.cache.nbytes() == 0  # the pool is released once idle


def test_stop_token_and_row_reuse(g3):
    prompts = _prompts([4, 10, 7], seed=3)
    free = [generate(g3, [p], 12, stop_token_ids=())[0] for p in prompts]
    stop = free[0][3]
    eng = BatchEngine(g3, max_batch=2, prefill_chunk=4)
    reqs = _drive(eng, [(0, p) for p in prompts], [12] * 3, stop_token_ids=[stop])
    for f, r in zip(free, reqs):
        cut = f.index(stop) + 1 if stop in f else 12
        assert r.tokens == f[:cut]
        assert r.finish_reason == ("stop" if stop in f else "length")


def test_sampling_with_seed_matches_generate_and_ignores_the_batch(g3):
    prompts = _prompts([5, 11, 8], seed=4)
    params = [SamplingParams(temperature=0.9, top_k=40, top_p=0.95, seed=s) for s in (1, 2, 3)]
    eng = BatchEngine(g3, max_batch=3, prefill_chunk=4, stop_token_ids=())
    reqs = [eng.submit(p, 10, sp) for p, sp in zip(prompts, params)]
    eng.run_until_idle()
    for p, sp, r in zip(prompts, params, reqs):
        assert r.tokens == generate(g3, [p], 10, params=sp, stop_token_ids=(), prefill_chunk=4)[0]
    # Repetition penalty goes through the same sampler.
    sp = SamplingParams(repetition_penalty=1.5)
    r = eng.submit(prompts[0], 10, sp)
    eng.run_until_idle()
    assert r.tokens == generate(g3, [prompts[0]], 10, params=sp, stop_token_ids=(), prefill_chunk=4)[0]


def test_cancel_frees_the_row_and_others_continue(g3):
    prompts = _prompts([6, 9, 4], seed=5)
    eng = BatchEngine(g3, max_batch=2, prefill_chunk=8, stop_token_ids=())
    a, b, c = (eng.submit(p, 15) for p in prompts)
    for _ in range(4):
        eng.step()
    a.cancel()
    eng.run_until_idle()
    assert a.finish_reason == "cancelled" and len(a.tokens) < 15
    for p, r in ((prompts[1], b), (prompts[2], c)):
        assert r.finish_reason == "length"
        assert r.tokens == generate(g3, [p], 15, stop_token_ids=(), prefill_chunk=8)[0]


def test_prompt_logprobs_equal_a_full_forward(g3):
    p = _prompts([13], seed=6)[0]
    eng = BatchEngine(g3, max_batch=2, prefill_chunk=5, stop_token_ids=())
    r = eng.submit(p, 2, prompt_logprobs=3, logprobs=2)
    eng.run_until_idle()
    with torch.no_grad():
        lp = torch.log_softmax(g3(torch.tensor([p])).float(), -1)[0]  # [T,V]
    ref = lp[:-1].gather(1, torch.tensor(p[1:])[:, None])[:, 0]
    assert r.prompt_token_logprobs[0] is None and len(r.prompt_token_logprobs) == len(p)
    torch.testing.assert_close(torch.tensor(r.prompt_token_logprobs[1:]), ref, atol=1e-4, rtol=0)
    top = lp[3].topk(3)
    assert [i for i, _ in r.prompt_top_logprobs[4]] == top.indices.tolist()
    # The first generated token's logprob is the last prompt position's distribution.
    assert r.token_logprobs[0] == pytest.approx(float(lp[-1, r.tokens[0]]), abs=1e-4)
    assert len(r.top_logprobs[0]) == 2


def test_max_new_tokens_zero_and_context_cap(g3):
    eng = BatchEngine(g3, max_batch=2, stop_token_ids=())
    r = eng.submit([2, 5, 6], 0, prompt_logprobs=0)
    r2 = eng.submit(_prompts([250])[0], 50)  # context 256: 7 tokens fit
    eng.run_until_idle()
    assert r.finish_reason == "length" and r.tokens == [] and len(r.prompt_token_logprobs) == 3
    assert r2.finish_reason == "length" and len(r2.tokens) == 256 - 250 + 1


def test_bad_requests_and_full_queue(g3):
    eng = BatchEngine(g3, max_batch=1, max_queue=2)
    with pytest.raises(BatchError, match="empty"):
        eng.submit([], 4)
    with pytest.raises(BatchError, match="out-of-vocabulary"):
        eng.submit([1, 999], 4)
    with pytest.raises(BatchError, match="max_new_tokens"):
        eng.submit([1], -1)
    with pytest.raises(BatchError, match="context"):
        eng.submit([3] * 300, 1)
    eng.submit([3, 4], 2)
    eng.submit([3, 4], 2)
    with pytest.raises(QueueFullError, match="full"):
        eng.submit([3, 4], 2)
    eng.run_until_idle()
    with pytest.raises(BatchError, match="attention backend"):
        BatchEngine(tiny_model("gemma3").set_attention_backend("linear"))


def test_background_thread_and_events(g3):
    prompts = _prompts([5, 8, 3, 12], seed=7)
    seen: dict[int, list] = {}
    lock = threading.Lock()

    def on_event(req, kind):
        with lock:
            seen.setdefault(req.id, []).append((kind, len(req.tokens)))

    eng = BatchEngine(g3, max_batch=2, prefill_chunk=4, stop_token_ids=()).start()
    try:
        reqs = [eng.submit(p, 6, on_event=on_event) for p in prompts]
        assert all(r.wait(30) for r in reqs)
    finally:
        eng.stop()
    for p, r in zip(prompts, reqs):
        assert r.tokens == generate(g3, [p], 6, stop_token_ids=(), prefill_chunk=4)[0]
        assert seen[r.id] == [("token", i) for i in range(1, 7)] + [("done", 6)]
        assert r.t_submit <= r.t_first <= r.t_done


def test_timeout_and_listener_errors(g3):
    eng = BatchEngine(g3, max_batch=1, stop_token_ids=())

    def bad(req, kind):
        raise RuntimeError("listener bug")

    r = eng.submit([3, 4, 5], 5, on_event=bad)
    t = eng.submit([3, 4, 5], 5, timeout=1e-6)
    eng.run_until_idle()
    assert r.finish_reason == "length" and len(r.tokens) == 5
    assert t.finish_reason == "timeout" and t.tokens == []


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_quantized_and_cpu_packed_models(scheme):
    from gemma4 import quantize
    from gemma4.infer import use_fast_path

    m = tiny_model("dense", scale=1.0, hidden_size=64)  # int4 groups of 32 need input dims divisible by 32
    quantize(m, scheme, group_size=32 if scheme == "int4" else None)
    use_fast_path(m)  # fused/packed modules replace the plain ones; the engine only calls the layers
    prompts = _prompts([3, 17, 9, 12], seed=1)
    eng = BatchEngine(m, max_batch=3, prefill_chunk=5, stop_token_ids=())
    reqs = [eng.submit(p, 10) for p in prompts]
    eng.run_until_idle()
    for p, r in zip(prompts, reqs):
        assert r.tokens == generate(m, [p], 10, stop_token_ids=(), prefill_chunk=5)[0]


@pytest.mark.parametrize("kind", ["dense", "ple", "gemma3"])
def test_requests_arriving_together_are_prefilled_as_one_batch(kind):
    m = tiny_model(kind, scale=1.0)
    # Lengths around the sliding window (8), all within one chunk (16): one left-padded prefill forward.
    prompts = _prompts([9, 3, 16, 12, 1], seed=8)
    params = [SamplingParams(), SamplingParams(repetition_penalty=1.3), SamplingParams(temperature=0.8, seed=5),
              SamplingParams(), SamplingParams()]
    eng = BatchEngine(m, max_batch=4, prefill_chunk=16, stop_token_ids=())
    calls = []
    inner = eng._prefill_group
    eng._prefill_group = lambda group: (calls.append(len(group)), inner(group))
    reqs = [eng.submit(p, 12, sp) for p, sp in zip(prompts, params)]
    eng.run_until_idle()
    assert calls and calls[0] >= 2  # the batched path ran
    for p, sp, r in zip(prompts, params, reqs):
        assert r.tokens == generate(m, [p], 12, params=sp, stop_token_ids=(), prefill_chunk=16)[0]
