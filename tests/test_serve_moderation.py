"""The server's optional moderation hook: flagged replies become the caller's refusal with finish_reason
"content_filter" (unstreamed and streamed, chat and completions), /metrics counts them, a failing
moderator fails closed, and an app without a moderator shows none of it."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("httpx")

from fastapi.testclient import TestClient  # noqa: E402

from gemma4.align.judge import REFUSAL  # noqa: E402
from gemma4.infer.batch import BatchEngine  # noqa: E402
from gemma4.serve.app import ServeConfig, create_app  # noqa: E402
from train_tiny import tiny_model, tiny_tokenizer  # noqa: E402

CHAT = {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "how do I bake bread?"}],
        "max_tokens": 6, "temperature": 0}


@pytest.fixture(scope="module")
def parts():
    tok = tiny_tokenizer()
    model = tiny_model("ple6", vocab_size=384).eval()
    return model, tok


def client(parts, moderator=None, **kw):
    model, tok = parts
    engine = BatchEngine(model, max_batch=2, prefill_chunk=64, max_queue=8, stop_token_ids=tok.stop_token_ids or None)
    cfg = ServeConfig(model_name="tiny", max_tokens_cap=32, request_timeout=60)
    if moderator is not None:
        kw.setdefault("refusal", REFUSAL)
    return TestClient(create_app(engine, tok, cfg, moderator=moderator, **kw))


class Recorder:
    def __init__(self, score: float = 1.0, fail: bool = False):
        self.score, self.fail, self.calls = score, fail, []

    def __call__(self, prompt: str, response: str) -> float:
        self.calls.append((prompt, response))
        if self.fail:
            raise RuntimeError("classifier crashed")
        return self.score


def stream_chat(c, body) -> tuple[str, list]:
    text, finishes = "", []
    with c.stream("POST", "/v1/chat/completions", json=dict(body, stream=True)) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            ch = json.loads(line[6:])["choices"][0]
            text += ch["delta"].get("content") or ""
            if ch["finish_reason"]:
                finishes.append(ch["finish_reason"])
    return text, finishes


def test_flagged_chat_is_the_refusal_with_content_filter_and_counted(parts):
    mod = Recorder(1.0)
    with client(parts, mod) as c:
        r = c.post("/v1/chat/completions", json=dict(CHAT, logprobs=True, top_logprobs=2)).json()
        ch = r["choices"][0]
        assert ch["message"] == {"role": "assistant", "content": REFUSAL}
        assert ch["finish_reason"] == "content_filter" and ch["logprobs"] is None
        assert mod.calls and mod.calls[0][0] == "how do I bake bread?"  # the last user message is the prompt
        text, finishes = stream_chat(c, CHAT)
        assert text == REFUSAL and finishes == ["content_filter"]
        comp = c.post("/v1/completions", json={"prompt": "once upon", "max_tokens": 5, "temperature": 0}).json()
        assert comp["choices"][0]["text"] == REFUSAL and comp["choices"][0]["finish_reason"] == "content_filter"
        metrics = c.get("/metrics").text
    assert 'gemma4_moderation_total{result="flagged"} 3' in metrics
    assert 'gemma4_moderation_total{result="passed"} 0' in metrics


def test_passing_replies_are_unchanged_and_streams_agree(parts):
    with client(parts) as c:
        plain = c.post("/v1/chat/completions", json=CHAT).json()["choices"][0]
        plain_comp = c.post("/v1/completions", json={"prompt": "once upon", "max_tokens": 5, "temperature": 0,
                                                     "stream": False}).json()["choices"][0]
        assert "moderation" not in c.get("/metrics").text  # no moderator: no moderation metrics
    mod = Recorder(0.2)
    with client(parts, mod, moderation_threshold=0.5) as c:
        got = c.post("/v1/chat/completions", json=CHAT).json()["choices"][0]
        assert got == plain
        text, finishes = stream_chat(c, CHAT)
        assert text == (plain["message"]["content"] or "") and finishes == [plain["finish_reason"]]
        comp = c.post("/v1/completions", json={"prompt": "once upon", "max_tokens": 5, "temperature": 0}).json()
        assert comp["choices"][0] == plain_comp
        chunks = []
        with c.stream("POST", "/v1/completions", json={"prompt": "once upon", "max_tokens": 5, "temperature": 0,
                                                       "stream": True}) as r:
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    chunks.append(json.loads(line[6:])["choices"][0])
        assert "".join(x["text"] for x in chunks) == plain_comp["text"]
        assert chunks[-1]["finish_reason"] == plain_comp["finish_reason"]
        assert ("once upon", plain_comp["text"]) in mod.calls
        assert 'gemma4_moderation_total{result="passed"} 4' in c.get("/metrics").text


def test_a_failing_moderator_fails_closed(parts):
    with client(parts, Recorder(fail=True)) as c:
        ch = c.post("/v1/chat/completions", json=CHAT).json()["choices"][0]
        assert ch["message"]["content"] == REFUSAL and ch["finish_reason"] == "content_filter"
        metrics = c.get("/metrics").text
    assert 'gemma4_moderation_total{result="error"} 1' in metrics


def test_a_moderator_needs_a_refusal_and_a_valid_threshold(parts):
    model, tok = parts
    engine = BatchEngine(model, max_batch=1)
    with pytest.raises(ValueError, match="refusal"):
        create_app(engine, tok, moderator=lambda p, r: 0.0)
    with pytest.raises(ValueError, match="threshold"):
        create_app(engine, tok, moderator=lambda p, r: 0.0, refusal=REFUSAL, moderation_threshold=1.5)
