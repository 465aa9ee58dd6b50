"""Incremental reading of a Gemma 4 model turn: text in, content / reasoning / tool-call deltas out.

:class:`StreamParser` gives, for any way the output text is cut into pieces, deltas whose
concatenation equals :func:`gemma4.text.chat.parse_response` on the whole text: the same answer (with
its surrounding whitespace stripped), the same thinking (each thought block stripped of newlines,
blocks joined by a newline) and the same tool calls. A streamed and an unstreamed reply therefore
agree. The parser holds back only what may still turn into a marker (a partial ``<|channel>``,
``<turn|>``...), a trailing run of whitespace, and an unfinished tool call; each tool call is parsed
by ``parse_response`` itself once its closing ``<tool_call|>`` has arrived (the value grammar lives
in one place).

Where ``parse_response`` would raise (a tool call that never closes, or a malformed one), the
parser keeps the raw text as content instead, so nothing the model wrote is lost.

:class:`IncrementalDetokenizer` turns token ids into text pieces whose concatenation is the decoded
text of all ids, without re-decoding everything at each token and without emitting half a UTF-8
character (byte-fallback tokens).
"""

from __future__ import annotations

from dataclasses import dataclass

from gemma4.text.chat import ParsedResponse, ToolCall, parse_response

__all__ = ["Delta", "StreamParser", "IncrementalDetokenizer", "END_MARKERS", "held_suffix"]

BOS = "<bos>"
# Where parse_response cuts the text (tests/test_serve_parser.py checks this list against chat.py's).
END_MARKERS = ("<turn|>", "<eos>", "<|tool_response>", "<end_of_turn>")
CH_OPEN, CH_CLOSE = "<|channel>", "<channel|>"
TC_OPEN, TC_CLOSE = "<|tool_call>", "<tool_call|>"


@dataclass
class Delta:
    """One piece of output: kind "content" or "reasoning" with ``text``, or "tool_call" with ``call``."""

    kind: str
    text: str = ""
    call: ToolCall | None = None


def held_suffix(text: str, markers) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of one of ``markers``."""
    best = 0
    for m in markers:
        for k in range(min(len(m) - 1, len(text)), best, -1):
            if text.endswith(m[:k]):
                best = k
                break
    return best


def _first(text: str, markers) -> tuple[int, str | None]:
    """Earliest occurrence of any marker: (index, marker) or (-1, None)."""
    best, which = -1, None
    for m in markers:
        i = text.find(m)
        if i >= 0 and (best < 0 or i < best):
            best, which = i, m
    return best, which


class StreamParser:
    """Feed decoded output text with :meth:`feed` (any pieces), then call :meth:`finish` once.

    Both return lists of :class:`Delta`. :meth:`result` gives the whole turn as a
    :class:`ParsedResponse` (equal to ``parse_response`` of the concatenated text when that succeeds).
    """

    _ANSWER_STOPS = END_MARKERS + (CH_OPEN, TC_OPEN)
    _CHANNEL_STOPS = END_MARKERS + (CH_CLOSE,)
    _CALL_STOPS = END_MARKERS + (TC_CLOSE,)

    def __init__(self):
        self._bos_tail = ""  # a partial "<bos>" at the end of the input so far
        self._buf = ""  # cleaned text not yet consumed
        self._state = "answer"  # "answer" | "channel" | "call" | "ended"
        self._finished = False
        # answer
        self._answer_started = False
        self._ws = ""  # trailing whitespace of the answer, emitted only if more answer follows
        # thinking
        self._thoughts = 0
        self._label: str | None = ""  # the channel's first line while unread; None once settled
        self._thought_started = False
        self._nl = ""
        # output so far
        self.content: list[str] = []
        self.reasoning: list[str] = []
        self.tool_calls: list[ToolCall] = []

    # ------------------------------------------------------------------------------------------ public
    def feed(self, text: str) -> list[Delta]:
        if self._finished:
            raise RuntimeError("StreamParser.feed after finish()")
        out: list[Delta] = []
        cleaned = self._strip_bos(text, final=False)
        if self._state != "ended":
            self._buf += cleaned
            self._run(out, final=False)
        return out

    def finish(self) -> list[Delta]:
        if self._finished:
            return []
        out: list[Delta] = []
        cleaned = self._strip_bos("", final=True)
        if self._state != "ended":
            self._buf += cleaned
            self._run(out, final=True)
        self._finished = True
        return out

    def result(self) -> ParsedResponse:
        thinking = "".join(self.reasoning) if self._thoughts else None
        return ParsedResponse(content="".join(self.content), thinking=thinking, tool_calls=list(self.tool_calls))

    # ------------------------------------------------------------------------------------------ stages
    def _strip_bos(self, text: str, final: bool) -> str:
        # The same non-overlapping left-to-right removal as str.replace(BOS, "") on the whole text.
        s, parts = self._bos_tail + text, []
        while True:
            i = s.find(BOS)
            if i < 0:
                break
            parts.append(s[:i])
            s = s[i + len(BOS):]
        keep = 0 if final else held_suffix(s, (BOS,))
        parts.append(s[:len(s) - keep])
        self._bos_tail = s[len(s) - keep:]
        return "".join(parts)

    def _run(self, out: list[Delta], final: bool) -> None:
        while self._state != "ended":
            if self._state == "answer":
                i, m = _first(self._buf, self._ANSWER_STOPS)
                if m is None:
                    keep = 0 if final else held_suffix(self._buf, self._ANSWER_STOPS)
                    self._answer(self._buf[:len(self._buf) - keep], out)
                    self._buf = self._buf[len(self._buf) - keep:]
                    return
                self._answer(self._buf[:i], out)
                self._buf = self._buf[i + len(m):]
                if m == CH_OPEN:
                    self._open_thought(out)
                    self._state = "channel"
                elif m == TC_OPEN:
                    self._state = "call"
                else:
                    self._end()
            elif self._state == "channel":
                i, m = _first(self._buf, self._CHANNEL_STOPS)
                if m is None:
                    keep = 0 if final else held_suffix(self._buf, self._CHANNEL_STOPS)
                    self._thought(self._buf[:len(self._buf) - keep], out)
                    self._buf = self._buf[len(self._buf) - keep:]
                    if final:
                        self._close_thought(out)  # an unterminated block runs to the end of the text
                    return
                self._thought(self._buf[:i], out)
                self._close_thought(out)
                self._buf = self._buf[i + len(m):]
                if m == CH_CLOSE:
                    self._state = "answer"
                else:
                    self._end()
            else:  # call
                i, m = _first(self._buf, self._CALL_STOPS)
                if m is None:
                    if final:  # never closed: parse_response would reject it; keep it as text
                        self._answer(TC_OPEN + self._buf, out)
                        self._buf = ""
                    return
                body = self._buf[:i]
                self._buf = self._buf[i + len(m):]
                if m == TC_CLOSE:
                    self._call(body, out)
                    self._state = "answer"
                else:
                    self._answer(TC_OPEN + body, out)
                    self._end()
        return

    def _end(self) -> None:
        self._state = "ended"
        self._buf = ""

    # ------------------------------------------------------------------------------------------ answer
    def _answer(self, s: str, out: list[Delta]) -> None:
        if not s:
            return
        if not self._answer_started:
            s = s.lstrip()
            if not s:
                return
            self._answer_started = True
        s = self._ws + s
        body = s.rstrip()
        self._ws = s[len(body):]
        if body:
            self.content.append(body)
            out.append(Delta("content", body))

    # ------------------------------------------------------------------------------------------ thinking
    def _open_thought(self, out: list[Delta]) -> None:
        if self._thoughts:
            self._emit_reasoning("\n", out)  # blocks are joined by a newline
        self._thoughts += 1
        self._label = ""
        self._thought_started = False
        self._nl = ""

    def _thought(self, s: str, out: list[Delta]) -> None:
        if self._label is not None:
            self._label += s
            label, newline, rest = self._label.partition("\n")
            if not newline:
                return  # the channel name is not known yet
            whole = self._label
            self._label = None
            # "<|channel>thought\n..." carries thinking; any other channel is kept whole.
            s = rest if label.strip() == "thought" else whole
        if not self._thought_started:
            s = s.lstrip("\n")
            if not s:
                return
            self._thought_started = True
        s = self._nl + s
        body = s.rstrip("\n")
        self._nl = s[len(body):]
        if body:
            self._emit_reasoning(body, out)

    def _close_thought(self, out: list[Delta]) -> None:
        if self._label is not None:  # no newline in the block: the whole body is the thought
            body, self._label = self._label, None
            self._thought(body, out)
        self._nl = ""

    def _emit_reasoning(self, s: str, out: list[Delta]) -> None:
        self.reasoning.append(s)
        out.append(Delta("reasoning", s))

    # ------------------------------------------------------------------------------------------ tool calls
    def _call(self, body: str, out: list[Delta]) -> None:
        segment = TC_OPEN + body + TC_CLOSE
        try:
            calls = parse_response(segment).tool_calls
        except ValueError:
            calls = []
        if len(calls) != 1:  # malformed: keep the model's text rather than drop it
            self._answer(segment, out)
            return
        self.tool_calls.append(calls[0])
        out.append(Delta("tool_call", call=calls[0]))


class IncrementalDetokenizer:
    """Token ids in, text pieces out; the pieces concatenate to ``decode(all ids)``.

    Decodes a short window (the previous token(s) plus the new ones) and emits the difference, so
    each token costs O(1) decoding; a window whose text ends in U+FFFD (half of a UTF-8 character
    spelled in byte tokens) waits for the next token."""

    def __init__(self, decode):
        self._decode = decode
        self.ids: list[int] = []
        self._prefix = 0  # window start
        self._read = 0  # ids[_prefix:_read] has been emitted

    def push(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        return self._step(final=False)

    def flush(self) -> str:
        return self._step(final=True)

    def _step(self, final: bool) -> str:
        before = self._decode(self.ids[self._prefix:self._read])
        now = self._decode(self.ids[self._prefix:])
        if len(now) > len(before) and (final or not now.endswith("\ufffd")):
            piece = now[len(before):]
            self._prefix, self._read = self._read, len(self.ids)
            return piece
        if final:
            self._prefix = self._read = len(self.ids)
        return ""
