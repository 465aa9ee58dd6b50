"""Gemma chat prompts: rendering conversations to text, and parsing model output back.

`render_chat` has two engines:
* a checkpoint's own Jinja chat template (`template=` text or file), rendered with jinja2 in a sandbox with
  the helpers Hugging Face provides (`raise_exception`, `strftime_now`, `tojson`);
* a built-in Python renderer of Google's Gemma 4 31B-it template (or, with `style="gemma3"`, the Gemma 3
  turn format). It reproduces the template's output exactly, quirks included (keys sorted
  case-insensitively, "standard" schema keys skipped, tool responses folded into the calling model turn),
  because a model is only as good as the prompt format it was trained on. The tests compare the two
  engines on a matrix of conversations.

Messages use the OpenAI/Hugging Face shape: `{"role": "system"|"developer"|"user"|"assistant"|"tool",
"content": str | [{"type": "text"|"image"|"audio"|"video", ...}], "tool_calls": [...],
"reasoning_content": str}`.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, NamedTuple

from gemma4._util import Gemma4Error

__all__ = ["render_chat", "render_chat_segments", "parse_response", "ParsedResponse", "ToolCall", "ChatSegment",
           "ChatPrompt", "ChatError", "STR_DELIM"]

STR_DELIM = '<|"|>'  # Gemma 4 wraps every string value of a tool schema, call or response in this token
BOS = "<bos>"
_STANDARD_SCHEMA_KEYS = ("description", "type", "properties", "required", "nullable")
MAX_DEPTH = 64  # nesting of tool schemas / arguments / parsed tool values (model output is untrusted)


class ChatError(Gemma4Error, ValueError):
    """A conversation that cannot be rendered, or model output that cannot be parsed; the message names
    the message index or the position."""


class ChatTypeError(ChatError, TypeError):
    """A value of the wrong type where a conversation or model output was expected."""


class ChatSegment(NamedTuple):
    """One piece of a rendered prompt.

    ``template`` True: text written by the chat format itself (``<|turn>``, ``<start_of_turn>``, ``\\n``,
    ``<|"|>`` around a tool argument ...): control tokens in it are real control tokens. False: text that
    came from the caller's data (message content, system prompt, tool schemas, call arguments, tool
    results, names): it is always encoded as plain text, so a typed ``<turn|>`` stays five characters.
    ``message``: index of the message the piece renders (None for the prompt's frame)."""

    text: str
    template: bool
    message: int | None = None


class ChatPrompt(str):
    """A rendered chat prompt: a ``str`` (exactly what the model sees) that remembers its segments.

    ``Tokenizer.encode`` recognises it and encodes the content segments as plain text (see
    ``Tokenizer.encode_segments``). Only the unmodified object carries that knowledge: slicing, ``strip``,
    f-strings or ``.format`` give a plain ``str``. ``prompt + "text"`` keeps the segments and marks the
    appended text as template (it was written by the program, not by a user)."""

    segments: tuple[ChatSegment, ...]

    def __new__(cls, segments) -> "ChatPrompt":
        segments = tuple(ChatSegment(*s) for s in segments)
        obj = super().__new__(cls, "".join(s.text for s in segments))
        obj.segments = segments
        return obj

    def __add__(self, other):
        if isinstance(other, ChatPrompt):
            return ChatPrompt(self.segments + other.segments)
        if isinstance(other, str):
            return ChatPrompt(self.segments + (ChatSegment(other, True),))
        return NotImplemented

    def __radd__(self, other):
        if isinstance(other, str):
            return ChatPrompt((ChatSegment(other, True),) + self.segments)
        return NotImplemented

    def __reduce__(self):
        return (ChatPrompt, (self.segments,))


def render_chat(messages: list[dict], tools: list | None = None, add_generation_prompt: bool = True,
                enable_thinking: bool = False, template: str | Path | None = None, style: str = "gemma4",
                bos_token: str = BOS, **template_vars: Any) -> ChatPrompt:
    """Render a conversation as the prompt text a Gemma model expects (it starts with `<bos>`; encode it
    with `add_bos=False`).

    Returns a :class:`ChatPrompt`: a ``str`` that remembers which characters came from the template and
    which from the messages, so that ``tokenizer.encode(prompt, add_bos=False)`` encodes message text as
    plain text (no control tokens from user, tool, document or system text). For token ids directly use
    ``Tokenizer.encode_chat``.

    `template`: a Jinja chat template (its text, or the path of a `.jinja` file) to render instead of the
    built-in renderer; extra keyword arguments become template variables. `style`: the built-in format,
    "gemma4" or "gemma3".
    """
    return ChatPrompt(render_chat_segments(messages, tools, add_generation_prompt, enable_thinking, template,
                                           style, bos_token, **template_vars))


def render_chat_segments(messages: list[dict], tools: list | None = None, add_generation_prompt: bool = True,
                         enable_thinking: bool = False, template: str | Path | None = None, style: str = "gemma4",
                         bos_token: str = BOS, *, control_tokens=None, **template_vars: Any) -> list[ChatSegment]:
    """``render_chat`` as a list of :class:`ChatSegment`: template text and the caller's text kept apart
    (``"".join(s.text for s in segments)`` is the prompt). The pieces a training pipeline needs: each
    segment says which message it renders.

    With a Jinja ``template`` the engine cannot see which characters are whose; instead every
    control-token spelling inside the messages and tools (``control_tokens``, default: the Gemma 3 and
    Gemma 4 spellings) is swapped for a private placeholder before rendering and comes back afterwards as
    a content segment."""
    _check_messages(messages)
    tools = _normalize_tools(tools)
    if template is not None:
        return _render_jinja_segments(_template_text(template), control_tokens, messages=list(messages),
                                      tools=tools, add_generation_prompt=add_generation_prompt,
                                      enable_thinking=enable_thinking, bos_token=bos_token, **template_vars)
    try:
        if style == "gemma4":
            return _render_gemma4(list(messages), tools, add_generation_prompt, enable_thinking, bos_token)
        if style == "gemma3":
            if tools:
                raise ChatError("the Gemma 3 turn format has no tool declarations; use style='gemma4'")
            return _render_gemma3(list(messages), add_generation_prompt, bos_token)
    except RecursionError:
        raise ChatError(f"messages or tools nested too deeply to render (more than {MAX_DEPTH} levels)") from None
    raise ChatError(f"unknown chat style {style!r} (expected 'gemma4' or 'gemma3')")


def _check_messages(messages) -> None:
    """The shape of a conversation, checked up front so that a malformed one is a ChatError naming the
    message, never an AttributeError from inside the renderer."""
    if isinstance(messages, (str, bytes, Mapping)) or not isinstance(messages, (list, tuple)) or not messages:
        raise ChatError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts")
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping) or not isinstance(m.get("role"), str):
            raise ChatError(f"message {i} must be a dict with a string 'role', got {m!r:.200}")
        content = m.get("content")
        if content is not None and not isinstance(content, str):
            if not isinstance(content, (list, tuple)):
                raise ChatError(f"message {i}: content must be a string or a list of parts, got "
                                f"{type(content).__name__}")
            for j, part in enumerate(content):
                if not isinstance(part, Mapping):
                    raise ChatError(f"message {i}: content part {j} must be a dict like {{'type': 'text', "
                                    f"'text': ...}}, got {type(part).__name__}")
        calls = m.get("tool_calls")
        if calls is not None:
            if not isinstance(calls, (list, tuple)):
                raise ChatError(f"message {i}: tool_calls must be a list")
            for j, c in enumerate(calls):
                fn = c.get("function") if isinstance(c, Mapping) else None
                if not isinstance(fn, Mapping) or not isinstance(fn.get("name"), str):
                    raise ChatError(f"message {i}: tool_calls[{j}] must be {{'function': {{'name': str, "
                                    "'arguments': ...}}}")
        responses = m.get("tool_responses")
        if responses is not None and not isinstance(responses, (list, tuple)):
            raise ChatError(f"message {i}: tool_responses must be a list")


def _normalize_tools(tools):
    """Accept bare function schemas too, wrapping them the way Hugging Face does ({"type": "function",
    "function": {...}}), which is the shape the template reads."""
    if not tools:
        return tools
    if isinstance(tools, (str, bytes, Mapping)) or not isinstance(tools, (list, tuple)):
        raise ChatError(f"tools must be a list of function schemas, got {type(tools).__name__}")
    out = []
    for t in tools:
        if isinstance(t, Mapping) and "function" not in t and "name" in t:
            t = {"type": "function", "function": dict(t)}
        if not isinstance(t, Mapping) or not isinstance(t.get("function"), Mapping):
            raise ChatError(f"tool must be a function schema dict with a 'name', got {t!r:.200}")
        out.append(t)
    return out


# ================================================================================================ Jinja


class ChatTemplateNotFoundError(ChatError, FileNotFoundError):
    """A chat template path that does not exist."""


def _template_text(template: str | Path) -> str:
    try:
        if isinstance(template, Path):
            return template.read_text(encoding="utf-8")
        if not isinstance(template, str):
            raise ChatTypeError(f"template must be Jinja text or a path, got {type(template).__name__}")
        if "{{" in template or "{%" in template:
            return template
        p = Path(template)
        if p.is_file():
            return p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ChatError(f"cannot read chat template {template}: {e}") from None
    raise ChatTemplateNotFoundError(f"chat template {template!r} is neither Jinja text nor an existing file")


@functools.lru_cache(maxsize=16)
def _compiled(text: str):
    """A template compiled once (compiling Google's Gemma 4 template takes ~0.3 s; rendering, milliseconds)."""
    import jinja2
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    # Same environment settings as transformers' apply_chat_template, so whitespace handling agrees.
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(text)
    except jinja2.TemplateError as e:
        raise ChatError(f"chat template does not compile: {e}") from None


def _render_jinja(text: str, **variables: Any) -> str:
    import jinja2

    template = _compiled(text)
    try:
        return template.render(**variables)
    except jinja2.TemplateError as e:
        raise ChatError(f"chat template error: {e}") from None
    except RecursionError:
        raise ChatError("chat template recursed too deeply") from None
    except (TypeError, ValueError, KeyError, AttributeError, IndexError, ZeroDivisionError) as e:
        raise ChatError(f"chat template failed on these messages: {type(e).__name__}: {e}") from None


# Control-token spellings of Gemma 3 and Gemma 4 (``<|turn>``, ``<turn|>``, ``<|"|>``, ``<bos>``,
# ``<start_of_turn>``, ...), for the Jinja engine when the caller gives no tokenizer's list.
_GEMMA_CONTROL = re.compile(r"<\|[^<>]{0,64}>|<[^<>]{0,64}\|>|<(?:bos|eos|pad|unk|mask|start_of_turn|end_of_turn|"
                            r"start_of_image|end_of_image|unused\d{1,5})>|\[multimodal\]")
_CANDIDATE = re.compile(r"<[^<>]{1,64}>|\[[^\[\]]{1,64}\]")
_PUA = 0x100000  # Supplementary Private Use Area-B: placeholders for protected spellings
_PUA_END = 0x10FFFE


def _control_finder(control_tokens):
    if control_tokens is None:
        return _GEMMA_CONTROL.finditer
    spellings = frozenset(control_tokens)
    return lambda text: (m for m in _CANDIDATE.finditer(text) if m.group() in spellings)


def _render_jinja_segments(text: str, control_tokens, **variables: Any) -> list[ChatSegment]:
    """Render with Jinja, keeping control-token spellings that sit in the data out of the template's
    reach: each becomes a private-use placeholder character before rendering and a content segment
    afterwards. (Characters of that private-use plane already in the data are protected the same way,
    so they come back unchanged.)"""
    find = _control_finder(control_tokens)
    table: list[str] = []
    index: dict[str, int] = {}

    def placeholder(spelling: str) -> str:
        if spelling not in index:
            if _PUA + len(table) > _PUA_END:
                raise ChatError("too many distinct control-token spellings in the messages")
            index[spelling] = len(table)
            table.append(spelling)
        return chr(_PUA + index[spelling])

    def escape(t: str) -> str:
        return "".join(placeholder(ch) if ord(ch) >= _PUA else ch for ch in t) if max(t, default="\0") >= chr(_PUA) else t

    def hide_str(value: str) -> str:
        out, pos = [], 0
        for m in find(value):
            out.append(escape(value[pos:m.start()]))
            out.append(placeholder(m.group()))
            pos = m.end()
        out.append(escape(value[pos:]))
        return "".join(out)

    def hide(value, depth=0):
        if depth > MAX_DEPTH:
            raise ChatError(f"messages or tools nested deeper than {MAX_DEPTH} levels")
        if isinstance(value, str):
            return hide_str(value)
        if isinstance(value, Mapping):
            return {hide(k, depth + 1): hide(v, depth + 1) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [hide(v, depth + 1) for v in value]
        return value

    # Past thoughts in assistant turns are dropped here, as Gemma 4's template (and the built-in renderer)
    # does, since the template could no longer find the hidden <|channel> markers itself.
    msgs = []
    for m in variables["messages"]:
        if m.get("role") == "assistant":
            m = dict(m)
            c = m.get("content")
            if isinstance(c, str) and "channel" in c:
                m["content"] = _strip_thinking(c)
            elif isinstance(c, (list, tuple)):
                m["content"] = [dict(p, text=_strip_thinking(p["text"])) if p.get("type") == "text"
                                and isinstance(p.get("text"), str) and "channel" in p["text"] else p for p in c]
        msgs.append(m)
    variables["messages"] = hide(msgs)
    if variables.get("tools"):
        variables["tools"] = hide(variables["tools"])
    rendered = _render_jinja(text, **variables)
    if not table:
        return [ChatSegment(rendered, True)]
    segments: list[ChatSegment] = []
    run_start = 0
    for i, ch in enumerate(rendered):
        k = ord(ch) - _PUA
        if 0 <= k < len(table):
            if i > run_start:
                segments.append(ChatSegment(rendered[run_start:i], True))
            segments.append(ChatSegment(table[k], False))
            run_start = i + 1
    if run_start < len(rendered):
        segments.append(ChatSegment(rendered[run_start:], True))
    return segments


# ============================================================== Jinja semantics needed by the renderer


class _Missing:
    """Stands for Jinja's Undefined: falsy, renders as an empty string."""

    def __bool__(self):
        return False

    def __str__(self):
        return ""

    # Jinja's `is sequence` test accepts Undefined (it has a length of 0), so it formats as "[]".
    def __len__(self):
        return 0

    def __getitem__(self, index):
        raise IndexError(index)


MISSING = _Missing()


def _get(obj, key):
    """`obj[key]` as the template sees it: a missing key (or a non-dict) gives MISSING, not an error."""
    if isinstance(obj, Mapping) and key in obj:
        return obj[key]
    return MISSING


def _s(value) -> str:
    """How Jinja prints a value (`{{ value }}`)."""
    return str(value)


def _upper(value) -> str:
    return _s(value).upper()


def _dictsort(mapping: Mapping):
    # Jinja's dictsort default: by key, case-insensitively (stable for ties).
    try:
        return sorted(mapping.items(), key=lambda kv: kv[0].lower() if isinstance(kv[0], str) else kv[0])
    except TypeError:  # (Jinja's dictsort fails the same way)
        raise ChatError(f"cannot sort keys of mixed types {sorted({type(k).__name__ for k in mapping})} in a "
                        "tool schema or arguments") from None


def _is_sequence(value) -> bool:
    return not isinstance(value, (str, Mapping)) and hasattr(value, "__len__") and hasattr(value, "__getitem__")


# Rich text: the renderer builds lists of (text, is_template) pieces so that a prompt knows which of its
# characters came from the template (where control tokens belong) and which from the caller's data
# (message text, names, tool schemas and arguments: always encoded as plain text).
def T(text: str) -> list:
    return [(text, True)]


def C(value) -> list:
    return [(_s(value), False)]


def _join(parts: list[list], sep: str) -> list:
    out: list = []
    for i, p in enumerate(parts):
        if i:
            out += T(sep)
        out += p
    return out


def _quote(text) -> list:
    return T(STR_DELIM) + C(text) + T(STR_DELIM)


def _format_argument(arg, escape_keys: bool = True, depth: int = 0) -> list:
    """A JSON-like value in Gemma 4's tool syntax: strings in <|"|>, bare true/false/numbers."""
    if depth > MAX_DEPTH:
        raise ChatError(f"tool arguments nested deeper than {MAX_DEPTH} levels")
    if isinstance(arg, str):
        return _quote(arg)
    if isinstance(arg, bool):
        return T("true" if arg else "false")
    if isinstance(arg, Mapping):
        items = [(_quote(k) if escape_keys else C(k)) + T(":") + _format_argument(v, escape_keys, depth + 1)
                 for k, v in _dictsort(arg)]
        return T("{") + _join(items, ",") + T("}")
    if _is_sequence(arg):
        return T("[") + _join([_format_argument(v, escape_keys, depth + 1) for v in arg], ",") + T("]")
    return C(arg)


def _format_required(items) -> list:
    return T("required:[") + _join([_quote(x) for x in items], ",") + T("]")


def _format_parameters(properties: Mapping, depth: int = 0) -> list:
    """The `properties:{...}` body of a tool schema. Each property's fields are comma-joined in the
    template's fixed order; the property names themselves are sorted, and names that collide with
    schema keywords (`type`, `description`, ...) are dropped, exactly as the template does."""
    if depth > MAX_DEPTH:
        raise ChatError(f"tool schema nested deeper than {MAX_DEPTH} levels")
    entries = []
    for key, value in _dictsort(properties):
        if key in _STANDARD_SCHEMA_KEYS:
            continue
        parts = []
        if _get(value, "description"):
            parts.append(T("description:") + _quote(value["description"]))
        kind = _upper(_get(value, "type"))
        if kind == "STRING":
            if _get(value, "enum"):
                parts.append(T("enum:") + _format_argument(value["enum"]))
        elif kind == "ARRAY":
            items = _get(value, "items")
            if isinstance(items, Mapping) and items:
                parts.append(T("items:{") + _format_items(items, depth + 1) + T("}"))
        if _get(value, "nullable"):
            parts.append(T("nullable:true"))
        if kind == "OBJECT":
            props = _get(value, "properties")
            # Without `properties`, the template formats the object schema's own keys as properties.
            parts.append(T("properties:{") + _format_parameters(props if isinstance(props, Mapping) else value, depth + 1)
                         + T("}"))
            if _get(value, "required"):
                parts.append(_format_required(value["required"]))
        parts.append(T("type:") + _quote(kind))
        entries.append(C(key) + T(":{") + _join(parts, ",") + T("}"))
    return _join(entries, ",")


def _format_items(items: Mapping, depth: int = 0) -> list:
    parts = []
    for key, value in _dictsort(items):
        if value is None:
            continue
        if key == "properties":
            parts.append(T("properties:{") + (_format_parameters(value, depth + 1) if isinstance(value, Mapping) else [])
                         + T("}"))
        elif key == "required":
            parts.append(_format_required(value))
        elif key == "type":
            upper = value.upper() if isinstance(value, str) else [_upper(v) for v in value]
            parts.append(T("type:") + _format_argument(upper))
        else:
            parts.append(C(key) + T(":") + _format_argument(value))
    return _join(parts, ",")


def _format_declaration(tool: Mapping) -> list:
    fn = tool["function"]
    out = T("declaration:") + C(_get(fn, "name")) + T("{description:") + _quote(_get(fn, "description"))
    params = _get(fn, "parameters")
    if params:
        out += T(",parameters:{")
        if _get(params, "properties"):
            out += T("properties:{") + _format_parameters(params["properties"]) + T("},")
        if _get(params, "required"):
            out += _format_required(params["required"]) + T(",")
        if _get(params, "type"):
            out += T("type:") + _quote(_upper(params["type"])) + T("}")
    if "response" in fn:
        resp = fn["response"]
        out += T(",response:{")
        if _get(resp, "description"):
            out += T("description:") + _quote(resp["description"]) + T(",")
        if _upper(_get(resp, "type")) == "OBJECT":
            out += T("type:") + _quote(_upper(resp["type"])) + T("}")
    return out + T("}")  # (the template strips the declaration: it starts and ends with template text)


def _strip_thinking(text: str) -> str:
    """Drop `<|channel>...<channel|>` blocks from a past model turn (the model never sees old thoughts)."""
    kept = []
    for part in text.split("<channel|>"):
        kept.append(part.split("<|channel>")[0] if "<|channel>" in part else part)
    return "".join(kept).strip()


def _tool_response_block(name, response) -> list:
    if isinstance(response, Mapping):
        body = _join([C(k) + T(":") + _format_argument(v, escape_keys=False) for k, v in _dictsort(response)], ",")
        return T("<|tool_response>response:") + C(name) + T("{") + body + T("}<tool_response|>")
    return (T("<|tool_response>response:") + C(name) + T("{value:") + _format_argument(response, escape_keys=False)
            + T("}<tool_response|>"))


def _tool_call_block(call: Mapping) -> list:
    fn = call["function"]
    args = fn.get("arguments")
    if isinstance(args, Mapping):
        body = _join([C(k) + T(":") + _format_argument(v, escape_keys=False) for k, v in _dictsort(args)], ",")
    elif isinstance(args, str):
        body = C(args)  # an already-serialized argument string is inserted verbatim
    else:
        body = []
    return T("<|tool_call>call:") + C(fn["name"]) + T("{") + body + T("}<tool_call|>")


# ============================================================================================== Gemma 4


class _Out:
    """Collects rendered pieces as ChatSegments, each tagged with the message it renders."""

    def __init__(self):
        self.segments: list[ChatSegment] = []
        self.message: int | None = None

    def add(self, pieces: list) -> None:
        for text, template in pieces:
            if not text:
                continue
            last = self.segments[-1] if self.segments else None
            if last is not None and last.template == template and last.message == self.message:
                self.segments[-1] = ChatSegment(last.text + text, template, self.message)
            else:
                self.segments.append(ChatSegment(text, template, self.message))

    def t(self, text: str) -> None:
        self.add(T(text))

    def c(self, text) -> None:
        self.add(C(text))


def _render_gemma4(messages, tools, add_generation_prompt, enable_thinking, bos) -> list[ChatSegment]:
    out = _Out()
    out.t(bos)
    prev_type = None  # what the last rendered piece was; decides whether a model turn prompt follows
    loop = messages
    offset = 0  # index in `messages` of loop[0]
    first = messages[0]
    if enable_thinking or tools or first["role"] in ("system", "developer"):
        out.t("<|turn>system\n")
        if enable_thinking:
            out.t("<|think|>\n")
            prev_type = "think"
        if first["role"] in ("system", "developer"):
            out.message = 0
            out.c(_system_text(first.get("content")))
            out.message = None
            loop, offset = messages[1:], 1
        if tools:
            for tool in tools:
                out.add(T("<|tool>") + _format_declaration(tool) + T("<tool|>"))
            prev_type = "tool"
        out.t("<turn|>\n")

    last_user = max((i for i, m in enumerate(loop) if m["role"] == "user"), default=-1)
    for i, msg in enumerate(loop):
        if msg["role"] == "tool":
            continue  # rendered inside the model turn that made the call (see below)
        out.message = offset + i
        prev_type = None
        role = "model" if msg["role"] == "assistant" else msg["role"]
        prev_role = next((loop[j]["role"] for j in range(i - 1, -1, -1) if loop[j]["role"] != "tool"), None)
        # Consecutive assistant messages (e.g. call, then answer after the tool ran) share one model turn.
        if not (role == "model" and prev_role == "assistant"):
            out.add(T("<|turn>") + C(role) + T("\n"))

        tool_calls = msg.get("tool_calls")
        thinking = msg.get("reasoning") or msg.get("reasoning_content")
        # Thoughts are kept only while the model is still working on the latest user request with tools.
        if thinking and i > last_user and tool_calls:
            out.add(T("<|channel>thought\n") + C(thinking) + T("\n<channel|>"))
        if tool_calls:
            for c in tool_calls:
                out.add(_tool_call_block(c))
            prev_type = "tool_call"

        responded = False
        if msg.get("tool_responses"):  # Gemma-native: responses attached to the assistant message
            for r in msg["tool_responses"]:
                name = r["name"] if isinstance(r, Mapping) and "name" in r else "unknown"
                out.add(_tool_response_block(name, _get(r, "response")))
                responded, prev_type = True, "tool_response"
        elif tool_calls:  # OpenAI style: the following role="tool" messages answer the calls
            for j, follow in enumerate(loop[i + 1:], start=i + 1):
                if follow["role"] != "tool":
                    break
                name = follow.get("name")
                for c in tool_calls:
                    if c.get("id") == follow.get("tool_call_id"):
                        name = c["function"]["name"]
                if name is None:
                    raise ChatError(f"message {offset + j}: tool message has neither a 'name' nor a 'tool_call_id' "
                                    "matching a call")
                out.message = offset + j
                out.add(_tool_response_block(name, _tool_body(follow.get("content"))))
                out.message = offset + i
                responded, prev_type = True, "tool_response"

        content = msg.get("content")
        if isinstance(content, str):
            out.c(_strip_thinking(content) if role == "model" else content.strip())
        elif _is_sequence(content):
            for item in content:
                kind = item.get("type")
                if kind == "text":
                    text = _s(item.get("text", ""))
                    out.c(_strip_thinking(text) if role == "model" else text.strip())
                elif kind in ("image", "audio", "video"):
                    out.t(f"<|{kind}|>")
                    prev_type = kind

        if prev_type == "tool_call" and not responded:
            out.t("<|tool_response>")  # the prompt stops where the tool's result must be inserted
        elif not (responded and not content):
            out.t("<turn|>\n")

    out.message = None
    if add_generation_prompt and prev_type not in ("tool_response", "tool_call"):
        out.t("<|turn>model\n")
        if not enable_thinking:
            out.t("<|channel>thought\n<channel|>")  # the 31B template's empty thought when thinking is off
    return out.segments


def _system_text(content) -> str:
    if isinstance(content, str):
        return content.strip()
    if _is_sequence(content):  # (the Jinja template would print the list's Python repr here)
        return "".join(_s(p.get("text", "")) for p in content if p.get("type") == "text").strip()
    return _s(content).strip()


def _tool_body(body):
    if _is_sequence(body):  # content parts: the text parts, concatenated
        return "".join(_s(p.get("text", "")) for p in body if isinstance(p, Mapping) and p.get("type") == "text")
    return body


# ============================================================================================== Gemma 3


def _render_gemma3(messages, add_generation_prompt, bos) -> list[ChatSegment]:
    """Gemma 3: `<start_of_turn>user\\n...<end_of_turn>\\n`; a system message is prepended to the first
    user turn; roles must alternate user/model."""
    out = _Out()
    prefix: list = []
    offset = 0
    if messages[0]["role"] == "system":
        content = messages[0].get("content")
        text = content if isinstance(content, str) else _s(content[0].get("text", "")) if content else ""
        prefix = [(text, False, 0), ("\n\n", True, 0)]
        messages, offset = messages[1:], 1
    out.t(bos)
    for i, msg in enumerate(messages):
        if (msg["role"] == "user") != (i % 2 == 0):
            raise ChatError("Gemma 3 conversations must alternate user/assistant/user/assistant/... "
                            f"(message {offset + i} has role {msg['role']!r})")
        role = "model" if msg["role"] == "assistant" else msg["role"]
        out.message = offset + i
        out.add(T("<start_of_turn>") + C(role) + T("\n"))
        if i == 0:
            for text, template, m in prefix:
                out.message = m
                out.add([(text, template)])
            out.message = offset + i
        content = msg.get("content")
        if isinstance(content, str):
            out.c(content.strip())
        elif _is_sequence(content):
            for item in content:
                if item.get("type") == "image":
                    out.t("<start_of_image>")
                elif item.get("type") == "text":
                    out.c(_s(item.get("text", "")).strip())
        out.t("<end_of_turn>\n")
    out.message = None
    if add_generation_prompt:
        out.t("<start_of_turn>model\n")
    return out.segments


# ======================================================================================== parse output


@dataclass
class ToolCall:
    name: str
    arguments: dict


@dataclass
class ParsedResponse:
    """A model turn split into its parts. `content` is the final answer (thinking and calls removed)."""
    content: str
    thinking: str | None = None
    tool_calls: list[ToolCall] = field(default_factory=list)

    def to_message(self) -> dict:
        """The assistant message to append to the conversation (thinking kept as `reasoning_content`)."""
        msg: dict[str, Any] = {"role": "assistant", "content": self.content}
        if self.thinking is not None:
            msg["reasoning_content"] = self.thinking
        if self.tool_calls:
            msg["tool_calls"] = [{"type": "function", "function": {"name": c.name, "arguments": c.arguments}}
                                 for c in self.tool_calls]
        return msg


_END_MARKERS = ("<turn|>", "<eos>", "<|tool_response>", "<end_of_turn>")


def parse_response(text: str) -> ParsedResponse:
    """Split generated text (what follows the prompt) into thinking, answer and tool calls.

    Thinking is the text of `<|channel>thought\\n...<channel|>` blocks; tool calls are
    `<|tool_call>call:NAME{key:value,...}<tool_call|>` with Gemma 4's value syntax (strings between
    `<|"|>` tokens); generation stops at the first end marker (`<turn|>`, `<eos>`, `<|tool_response>`).
    """
    if not isinstance(text, str):
        raise ChatTypeError(f"parse_response expects the decoded text, got {type(text).__name__}")
    text = text.replace(BOS, "")
    cut = min((i for i in (text.find(m) for m in _END_MARKERS) if i >= 0), default=len(text))
    text = text[:cut]

    thoughts, calls, answer = [], [], []
    pos = 0
    while pos < len(text):
        ch = text.find("<|channel>", pos)
        tc = text.find("<|tool_call>", pos)
        nxt = min((i for i in (ch, tc) if i >= 0), default=-1)
        if nxt < 0:
            answer.append(text[pos:])
            break
        answer.append(text[pos:nxt])
        if nxt == ch:
            end = text.find("<channel|>", ch)
            body = text[ch + len("<|channel>"):end if end >= 0 else len(text)]
            # The channel name ("thought") sits on the block's first line.
            label, newline, rest = body.partition("\n")
            thoughts.append(rest if newline and label.strip() == "thought" else body)
            pos = len(text) if end < 0 else end + len("<channel|>")
        else:
            end = text.find("<tool_call|>", tc)
            if end < 0:
                raise ChatError(f"unterminated tool call (no <tool_call|>): {text[tc:tc + 80]!r}")
            calls.append(_parse_call(text[tc + len("<|tool_call>"):end]))
            pos = end + len("<tool_call|>")
    thinking = "\n".join(t.strip("\n") for t in thoughts) if thoughts else None
    return ParsedResponse(content="".join(answer).strip(), thinking=thinking, tool_calls=calls)


def _parse_call(body: str) -> ToolCall:
    if not body.startswith("call:") or "{" not in body:
        raise ChatError(f"malformed tool call {body[:200]!r}: expected 'call:NAME{{...}}'")
    name, brace, rest = body[len("call:"):].partition("{")
    parser = _ValueParser("{" + rest)
    args = parser.parse_object()
    if parser.pos != len(parser.text):
        raise ChatError(f"malformed tool call {body[:200]!r}: unexpected text after the arguments")
    return ToolCall(name=name.strip(), arguments=args)


class _ValueParser:
    """Reads Gemma 4 tool values: {key:value,...}, [v,...], <|"|>string<|"|>, true/false, numbers."""

    def __init__(self, text: str):
        self.text, self.pos, self.depth = text, 0, 0

    def fail(self, what: str):
        raise ChatError(f"malformed tool arguments: {what} at position {self.pos} of {self.text[:200]!r}")

    def enter(self):
        # Model output is untrusted: bound the nesting instead of recursing until Python gives up.
        self.depth += 1
        if self.depth > MAX_DEPTH:
            self.fail(f"values nested deeper than {MAX_DEPTH} levels")

    def peek(self, s: str) -> bool:
        return self.text.startswith(s, self.pos)

    def expect(self, s: str):
        if not self.peek(s):
            self.fail(f"expected {s!r}")
        self.pos += len(s)

    def parse_value(self):
        if self.peek(STR_DELIM):
            return self.parse_string()
        if self.peek("{"):
            return self.parse_object()
        if self.peek("["):
            return self.parse_list()
        start = self.pos
        while self.pos < len(self.text) and self.text[self.pos] not in ",}]":
            self.pos += 1
        return _scalar(self.text[start:self.pos].strip())

    def parse_string(self) -> str:
        self.expect(STR_DELIM)
        end = self.text.find(STR_DELIM, self.pos)
        if end < 0:
            self.fail("unterminated <|\"|> string")
        s, self.pos = self.text[self.pos:end], end + len(STR_DELIM)
        return s

    def parse_object(self) -> dict:
        self.expect("{")
        self.enter()
        out = {}
        while not self.peek("}"):
            if self.peek(STR_DELIM):
                key = self.parse_string()
            else:
                colon = self.text.find(":", self.pos)
                if colon < 0:
                    self.fail("expected 'key:'")
                key, self.pos = self.text[self.pos:colon].strip(), colon
            self.expect(":")
            out[key] = self.parse_value()
            if not self.peek("}"):
                self.expect(",")
        self.pos += 1
        self.depth -= 1
        return out

    def parse_list(self) -> list:
        self.expect("[")
        self.enter()
        out = []
        while not self.peek("]"):
            out.append(self.parse_value())
            if not self.peek("]"):
                self.expect(",")
        self.pos += 1
        self.depth -= 1
        return out


def _scalar(token: str):
    if token == "true":
        return True
    if token == "false":
        return False
    if token in ("null", "None"):
        return None
    for convert in (int, float):
        try:
            return convert(token)
        except ValueError:
            pass
    return token
