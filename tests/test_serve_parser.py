"""serve.parser: streamed output parses the same as the whole text, for every way of cutting it."""

from __future__ import annotations

import random

import pytest

from gemma4.serve.parser import END_MARKERS, IncrementalDetokenizer, StreamParser
from gemma4.text import chat
from gemma4.text.chat import parse_response

Q = '<|"|>'
OUTPUTS = [
    "Hello world<turn|>",
    "<|channel>thought\nLet me think.\n\nStep 2\n<channel|>The answer is 4.<turn|>",
    f"<|channel>thought\nNeed the weather\n<channel|><|tool_call>call:get_weather{{city:{Q}Paris, FR{Q},days:3}}"
    "<tool_call|><|tool_response>",
    f"<|tool_call>call:a{{x:[1,2.5,{{y:{Q}z, w}}{Q}}}],flag:true,n:null}}<tool_call|><|tool_call>call:b{{}}<tool_call|>",
    "  \n Hi there \n\n",
    "<|channel>thought\n\nA\n\n<channel|>mid <|channel>other\nB<channel|> end\n",
    "<|channel>thought\nstill thinking\n",
    "<|channel>thought<channel|>x",
    "<bos>Hel<bos>lo<bo<bos>s> there<eos>trailing",
    "a < b and <|not a marker> c <tu",
    "<|channel>thought\nabc<turn|>ignored <|tool_call>",
    f"Sure. <|tool_call>call:f{{q:{Q}<|channel>x{Q}}}<tool_call|> Done.<end_of_turn>",
    "",
    "\n\n",
]
BROKEN = [  # parse_response raises on these; streamed and whole must still agree
    "<|tool_call>call:x{oops<tool_call|>after",
    "before <|tool_call>call:x{a:1}",
    "<|tool_call>call:x{a:1}<turn|>",
]


def _run(pieces):
    p = StreamParser()
    deltas = []
    for piece in pieces:
        deltas += p.feed(piece)
    deltas += p.finish()
    return p.result(), deltas


def _check_deltas(res, deltas):
    assert "".join(d.text for d in deltas if d.kind == "content") == res.content
    reasoning = [d.text for d in deltas if d.kind == "reasoning"]
    assert "".join(reasoning) == (res.thinking or "")
    assert [d.call for d in deltas if d.kind == "tool_call"] == res.tool_calls


def test_end_markers_match_chat():
    assert set(END_MARKERS) == set(chat._END_MARKERS)


@pytest.mark.parametrize("text", OUTPUTS + BROKEN)
def test_every_split_point(text):
    whole, deltas = _run([text])
    _check_deltas(whole, deltas)
    if text not in BROKEN:
        assert whole == parse_response(text)
    else:
        with pytest.raises(ValueError):
            parse_response(text)
    for i in range(len(text) + 1):
        res, deltas = _run([text[:i], text[i:]])
        assert res == whole, (i, text[:i])
        _check_deltas(res, deltas)
    res, deltas = _run(list(text))  # one character at a time
    assert res == whole
    _check_deltas(res, deltas)


@pytest.mark.parametrize("text", OUTPUTS)
def test_random_multi_splits(text):
    rng = random.Random(len(text))
    whole = parse_response(text)
    for _ in range(60):
        cuts = sorted(rng.sample(range(len(text) + 1), min(len(text) + 1, rng.randint(1, 6))))
        pieces = [text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)])]
        res, deltas = _run(pieces)
        assert res == whole
        _check_deltas(res, deltas)


def test_tool_call_comes_in_one_delta_and_nothing_leaks():
    text = OUTPUTS[2]
    for i in range(len(text) + 1):
        _, deltas = _run([text[:i], text[i:]])
        calls = [d for d in deltas if d.kind == "tool_call"]
        assert len(calls) == 1 and calls[0].call.arguments == {"city": "Paris, FR", "days": 3}
        for d in deltas:
            assert "<|" not in d.text and "|>" not in d.text  # no markers or <|"|> in text deltas


def test_feed_after_finish_is_an_error():
    p = StreamParser()
    p.finish()
    with pytest.raises(RuntimeError):
        p.feed("x")


class _ToyDecoder:
    """Byte-level decoding where some ids are single UTF-8 bytes (like byte-fallback tokens)."""

    def __init__(self):
        self.pieces = {1: b"Hi", 2: b" ", 3: "é".encode()[:1], 4: "é".encode()[1:], 5: b"!", 6: "€".encode()}

    def __call__(self, ids):
        return b"".join(self.pieces[i] for i in ids).decode("utf-8", errors="replace")


def test_incremental_detokenizer_never_splits_a_character():
    dec = _ToyDecoder()
    ids = [1, 2, 3, 4, 5, 6, 3, 4, 3]
    d = IncrementalDetokenizer(dec)
    pieces = [d.push(i) for i in ids] + [d.flush()]
    assert "".join(pieces) == dec(ids)
    assert all("\ufffd" not in p for p in pieces[:-1])
