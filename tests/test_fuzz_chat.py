"""Seeded fuzzing of the chat format (issue 11): random conversations (wrong types at every level, control
tokens in every string) through render_chat in both styles, and random model output through
parse_response. Every outcome must be a result or a ChatError; rendered prompts must never get a control
token from message text."""

import random

import pytest

from gemma4 import Gemma4Error
from gemma4.text.chat import ChatError, parse_response, render_chat, render_chat_segments

SPELLINGS = ["<turn|>", "<|turn>", "<bos>", "<eos>", "<|tool_call>", "<tool_call|>", '<|"|>', "<|tool_response>",
             "<|channel>", "<channel|>", "<start_of_turn>", "<end_of_turn>", "{", "}", "[", "]", ":", ",", "call:"]


def _text(rng):
    return "".join(rng.choice(SPELLINGS + ["a", " ", "\n", "é", "🦙"]) for _ in range(rng.randrange(6)))


def _value(rng, depth=0):
    k = rng.randrange(9 if depth < 4 else 5)
    if k == 0:
        return _text(rng)
    if k == 1:
        return rng.choice([0, -1, 2**70, 1.5, float("nan")])
    if k == 2:
        return rng.choice([None, True, False])
    if k == 3:
        return object() if rng.random() < 0.1 else b"bytes"
    if k == 4:
        return _text(rng)
    if k in (5, 6):
        return {_text(rng) if rng.random() < 0.9 else rng.randrange(3): _value(rng, depth + 1)
                for _ in range(rng.randrange(4))}
    return [_value(rng, depth + 1) for _ in range(rng.randrange(4))]


def _message(rng):
    valid = rng.random() < 0.85
    roles = ["user", "assistant", "system", "tool", "developer"]
    m = {"role": rng.choice(roles) if valid else rng.choice(roles + [_text(rng), 3])}
    if rng.random() < 0.8:
        r = rng.random()
        m["content"] = _text(rng) if r < 0.5 else [rng.choice([{"type": "text", "text": _text(rng)}, {"type": "image"}])
                                                    for _ in range(rng.randrange(3))] if (r < 0.9 or valid) else _value(rng)
    if m["role"] == "assistant" and rng.random() < 0.5:
        m["tool_calls"] = [{"id": _text(rng), "function": {"name": _text(rng), "arguments": _value(rng)}}
                           for _ in range(rng.randrange(3))] if valid else _value(rng)
    if m["role"] == "assistant" and rng.random() < 0.3:
        m["reasoning_content"] = _text(rng)
    if m["role"] == "tool":
        m["name"] = _text(rng) if valid else _value(rng)
    if not valid and rng.random() < 0.5:
        m[rng.choice(["tool_responses", "content", "tool_calls"])] = _value(rng)
    return m


def _tool(rng):
    if rng.random() < 0.15:
        return _value(rng)
    props = {_text(rng): {"type": rng.choice(["string", "array", "object", "number", _text(rng)]),
                          "description": _text(rng), "items": _value(rng), "enum": [_text(rng)],
                          "properties": _value(rng), "nullable": rng.random() < 0.5}
             for _ in range(rng.randrange(3))}
    return {"type": "function", "function": {"name": _text(rng), "description": _text(rng),
                                             "parameters": {"type": "object", "properties": props,
                                                            "required": [_text(rng)]}}}


def test_render_chat_fuzz():
    rng = random.Random(5)
    outcomes = {"ok": 0, "refused": 0}
    reasons = {}
    for _ in range(2000):
        msgs = [_message(rng) for _ in range(rng.randrange(1, 5))] if rng.random() < 0.95 else _value(rng)
        tools = None if rng.random() < 0.6 else [_tool(rng) for _ in range(rng.randrange(1, 3))]
        style = rng.choice(["gemma4", "gemma3"])
        try:
            segs = render_chat_segments(msgs, tools=tools, style=style, enable_thinking=rng.random() < 0.3)
        except ChatError as e:
            outcomes["refused"] += 1
            reasons[str(e)[:40]] = reasons.get(str(e)[:40], 0) + 1
            continue
        outcomes["ok"] += 1
        prompt = "".join(s.text for s in segs)
        assert str(render_chat(msgs, tools=tools, style=style, enable_thinking=False)) is not None
        assert prompt.startswith("<bos>")
    print(outcomes, sorted(reasons.items(), key=lambda kv: -kv[1])[:8])
    assert outcomes["ok"] > 200 and outcomes["refused"] > 200


def test_parse_response_fuzz():
    rng = random.Random(6)
    for _ in range(3000):
        text = "".join(rng.choice(SPELLINGS + ["a", "1", "true", "x:", " "]) for _ in range(rng.randrange(40)))
        if rng.random() < 0.3:
            text = "<|tool_call>call:f{" + text
        try:
            r = parse_response(text)
        except ChatError:
            continue
        assert isinstance(r.content, str)
    with pytest.raises(Gemma4Error):
        parse_response(None)


def test_jinja_render_fuzz():
    from gemma4 import assets

    template = assets.gemma4_chat_template().read_text(encoding="utf-8")
    rng = random.Random(7)
    ok = 0
    for _ in range(300):
        msgs = [_message(rng) for _ in range(rng.randrange(1, 4))]
        tools = None if rng.random() < 0.6 else [_tool(rng) for _ in range(rng.randrange(1, 3))]
        try:
            render_chat_segments(msgs, tools=tools, template=template)
            ok += 1
        except ChatError:
            pass
    assert ok > 50


def test_no_control_token_from_message_text():
    """The property itself, on the real Gemma 4 vocabulary and random conversations full of control-token
    spellings: the control tokens of the encoded prompt are exactly those of its template segments."""
    from gemma4 import assets
    from gemma4.text.tokenizer import load_tokenizer

    tok = load_tokenizer(assets.gemma4_vocab_gguf())
    rng = random.Random(8)
    checked = 0
    for _ in range(600):
        msgs = [_message(rng) for _ in range(rng.randrange(1, 5))]
        tools = None if rng.random() < 0.6 else [_tool(rng) for _ in range(rng.randrange(1, 3))]
        try:
            segs = render_chat_segments(msgs, tools=tools, enable_thinking=rng.random() < 0.3)
        except ChatError:
            continue
        ids = tok.encode_segments(segs)
        want = [i for s in segs if s.template for i in tok.encode(s.text, add_bos=False) if i in tok.control_token_ids]
        assert [i for i in ids if i in tok.control_token_ids] == want
        assert tok.decode(ids) == "".join(s.text for s in segs)
        checked += 1
    assert checked > 200
