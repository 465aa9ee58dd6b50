"""lm-evaluation-harness's `local-completions` model against `gemma4 serve` on 127.0.0.1.

lm-eval scores multiple-choice answers by loglikelihood: it tokenizes (context, continuation) through the
server's /tokenize (its "remote" tokenizer backend, auto-detected from /tokenizer_info), sends the token ids
to /v1/completions with ``echo=True, logprobs=1, max_tokens=1`` and sums the prompt's token logprobs after
the context. Every number it gets back must equal a plain forward of our model in this process on the same
token ids (to 1e-4), both through lm-eval's task pipeline (a tiny local task in tests/data/lmeval_task/) and
through its LM class called directly (empty context, trailing spaces, batched requests).

Two properties of lm-eval's remote backend that users of a Gemma server should know (measured here, not
asserted): it never adds BOS (its /tokenize calls send add_special_tokens=false, and add_bos_token only
affects the huggingface backend), so contexts are scored without Gemma's BOS; and with
tokenized_requests=False it sends text, our /v1/completions prepends BOS, and lm-eval's slice of the echoed
logprobs (by its own BOS-less context length) is then off by one token - silently wrong sums (e.g. -25.58
instead of -12.41). Keep the default tokenized_requests=True, as these tests do.

Offline: lm-eval reads the task's documents with `datasets` from a local JSONL (HF_*_OFFLINE set, caches
under the test's tmp dir) and never loads a Hugging Face tokenizer (the remote backend needs none).
"""

from __future__ import annotations

import os
import socket
import threading
import time
from pathlib import Path

import pytest
import torch

# Before lm_eval (and the `datasets` it imports) read their configuration: no hub, ever.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

uvicorn = pytest.importorskip("uvicorn")
lm_eval = pytest.importorskip("lm_eval")  # the `bench`/`test` extra; the only reason this file may skip

from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.models.openai_completions import LocalCompletionsAPI  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

from gemma4.infer.batch import BatchEngine  # noqa: E402
from gemma4.io import assets  # noqa: E402
from gemma4.serve.app import ServeConfig, create_app  # noqa: E402
from gemma4.text.tokenizer import load_tokenizer  # noqa: E402
from test_cache import tiny_model  # noqa: E402

KEY = "sk-lmeval-0123456789"
NAME = "tiny-gemma4"
TASK_DIR = Path(__file__).parent / "data" / "lmeval_task"
TASK = "gemma4_tiny_mc"
TOL = 1e-4


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server():
    tok = load_tokenizer(assets.gemma4_vocab_gguf())
    model = tiny_model("dense", vocab_size=tok.vocab_size, max_position_embeddings=2048, pad_token_id=0,
                       bos_token_id=tok.bos_id, eos_token_id=tok.eos_id)
    engine = BatchEngine(model, max_batch=4, prefill_chunk=64, max_queue=16, stop_token_ids=tok.stop_token_ids)
    cfg = ServeConfig(model_name=NAME, api_key=KEY, max_tokens_cap=64, default_max_tokens=16, request_timeout=30)
    app = create_app(engine, tok, cfg)
    port = _free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on"))
    th = threading.Thread(target=srv.run, daemon=True)
    th.start()
    t0 = time.time()
    while not srv.started:
        assert time.time() - t0 < 20, "server did not start"
        time.sleep(0.05)
    yield dict(url=f"http://127.0.0.1:{port}/v1/completions", tok=tok, model=model)
    srv.should_exit = True
    th.join(10)


@pytest.fixture()
def lm(server, monkeypatch):
    # local-completions sends `Authorization: Bearer $OPENAI_API_KEY`; the remote tokenizer uses auth_token.
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    m = LocalCompletionsAPI(base_url=server["url"], model=NAME, tokenizer_backend="auto", auth_token=KEY,
                            max_retries=1, timeout=60, max_length=2048)
    assert m.tokenizer_backend == "remote", "lm-eval did not detect the server's tokenizer endpoints"
    return m


# ----------------------------------------------------------------------------- the in-process reference
def _encode_pair(tok, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """What a causal LM in lm-eval feeds for (context, continuation), written against our tokenizer: the
    context's trailing whitespace moves to the continuation, the whole is encoded once and split after the
    context's own encoding; an empty context becomes BOS. No BOS otherwise (the remote backend adds none)."""
    if context == "":
        cont = tok.encode(continuation, add_bos=False)
        return ([tok.bos_id], cont) if cont[0] != tok.bos_id else (cont[:1], cont[1:])
    n = len(context) - len(context.rstrip())
    if n:
        context, continuation = context[:-n], context[-n:] + continuation
    whole = tok.encode(context + continuation, add_bos=False)
    ctx = tok.encode(context, add_bos=False)
    return ctx, whole[len(ctx):]


@torch.no_grad()
def _reference(model, ctx: list[int], cont: list[int]) -> tuple[float, bool]:
    """Sum of the continuation's token logprobs given the context, from one plain forward."""
    ids = torch.tensor([ctx + cont])
    logp = torch.log_softmax(model(ids).float(), -1)[0]  # [T, V]
    rows = logp[len(ctx) - 1: len(ctx) - 1 + len(cont)]  # row i predicts cont[i]
    target = torch.tensor(cont)
    ll = rows.gather(1, target[:, None]).sum().item()
    return ll, bool((rows.argmax(-1) == target).all())


# ----------------------------------------------------------------------------- tests
def test_local_task_matches_in_process(server, lm, tmp_path, monkeypatch):
    tok, model = server["tok"], server["model"]
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets"))
    monkeypatch.chdir(TASK_DIR)  # the task's data_files path is relative to it
    # include_defaults=False: indexing lm-eval's thousands of bundled task files costs seconds, and only
    # our local task is wanted.
    manager = TaskManager(include_path=str(TASK_DIR), include_defaults=False)
    out = lm_eval.simple_evaluate(model=lm, tasks=[TASK], task_manager=manager, bootstrap_iters=0,
                                  log_samples=True, random_seed=0)
    samples = out["samples"][TASK]
    assert len(samples) == 6
    n_req, correct, worst = 0, 0, 0.0
    for s in samples:
        ours = []
        for (context, continuation), resp in zip(s["arguments"], s["resps"]):
            ll, greedy = resp[0]
            ref_ll, ref_greedy = _reference(model, *_encode_pair(tok, context, continuation))
            worst = max(worst, abs(ll - ref_ll))
            assert abs(ll - ref_ll) <= TOL, (context, continuation, ll, ref_ll)
            assert greedy == ref_greedy, (context, continuation)
            ours.append(ref_ll)
            n_req += 1
        correct += int(max(range(len(ours)), key=ours.__getitem__) == s["target"])
    assert n_req == 18
    # The task's metric is the same as the one computed from the in-process numbers.
    assert out["results"][TASK]["acc,none"] == pytest.approx(correct / len(samples))
    print(f"lm-eval: {n_req} loglikelihoods, max |server - in-process| = {worst:.2e}, acc = {correct}/{len(samples)}")


@pytest.mark.parametrize("batch_size", [1, 3])
def test_loglikelihood_requests_match_in_process(server, lm, batch_size):
    tok, model = server["tok"], server["model"]
    lm._batch_size = batch_size  # >1: lm-eval sends a list of token-id prompts in one request
    pairs = [
        ("The capital of France is", " Paris"),
        ("The capital of France is ", "Paris"),  # trailing space moves into the continuation
        ("", "Once upon a time"),  # empty context: lm-eval conditions on BOS (its remote prefix token)
        ("Zähle: eins, zwei,", " drei, vier, fünf"),
        ("def add(a, b):\n    return", " a + b\n"),
        ("1 2 3 4 5 6 7 8 9", " 10"),
        ("<start_of_turn>user", " hi"),  # control-token text: lm-eval and the server see the same ids
    ]
    reqs = [Instance(request_type="loglikelihood", doc={}, arguments=p, idx=i) for i, p in enumerate(pairs)]
    got = lm.loglikelihood(reqs, disable_tqdm=True)
    assert len(got) == len(pairs)
    for (context, continuation), (ll, greedy) in zip(pairs, got):
        ctx, cont = _encode_pair(tok, context, continuation)
        if context:  # lm-eval's own split (through the server's /tokenize) is the one we reproduce
            assert lm._encode_pair(context, continuation) == (ctx, cont)
        ref_ll, ref_greedy = _reference(model, ctx, cont)
        assert ll < 0
        assert abs(ll - ref_ll) <= TOL, (context, continuation, ll, ref_ll)
        assert greedy == ref_greedy


def test_remote_tokenizer_round_trip(server, lm):
    """The remote tokenizer lm-eval builds from our endpoints agrees with ours, special ids included."""
    tok = server["tok"]
    assert lm.eot_token_id == tok.eos_id and lm.prefix_token_id == tok.bos_id
    for text in ["Hello, world!", "  spaces\tand\nnewlines", "日本語のテキスト", "émoji 🙂"]:
        ids = lm.tok_encode(text)
        assert ids == tok.encode(text, add_bos=False)
        assert lm.tokenizer.decode(ids) == text
