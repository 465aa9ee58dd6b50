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

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

__all__ = ["render_chat", "parse_response", "ParsedResponse", "ToolCall", "STR_DELIM"]

STR_DELIM = '<|"|>'  # Gemma 4 wraps every string value of a tool schema, call or response in this token
BOS = "<bos>"
_STANDARD_SCHEMA_KEYS = ("description", "type", "properties", "required", "nullable")


def render_chat(messages: list[dict], tools: list | None = None, add_generation_prompt: bool = True,
                enable_thinking: bool = False, template: str | Path | None = None, style: str = "gemma4",
                bos_token: str = BOS, **template_vars: Any) -> str:
    """Render a conversation as the prompt text a Gemma model expects (it starts with `<bos>`; encode it
    with `add_bos=False`).

    `template`: a Jinja chat template (its text, or the path of a `.jinja` file) to render instead of the
    built-in renderer; extra keyword arguments become template variables. `style`: the built-in format,
    "gemma4" or "gemma3".
    """
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ValueError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts")
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping) or not isinstance(m.get("role"), str):
            raise ValueError(f"message {i} must be a dict with a string 'role', got {m!r}")
    tools = _normalize_tools(tools)
    if template is not None:
        return _render_jinja(_template_text(template), messages=list(messages), tools=tools,
                             add_generation_prompt=add_generation_prompt, enable_thinking=enable_thinking,
                             bos_token=bos_token, **template_vars)
    if style == "gemma4":
        return _render_gemma4(list(messages), tools, add_generation_prompt, enable_thinking, bos_token)
    if style == "gemma3":
        if tools:
            raise ValueError("the Gemma 3 turn format has no tool declarations; use style='gemma4'")
        return _render_gemma3(list(messages), add_generation_prompt, bos_token)
    raise ValueError(f"unknown chat style {style!r} (expected 'gemma4' or 'gemma3')")


def _normalize_tools(tools):
    """Accept bare function schemas too, wrapping them the way Hugging Face does ({"type": "function",
    "function": {...}}), which is the shape the template reads."""
    if not tools:
        return tools
    out = []
    for t in tools:
        if isinstance(t, Mapping) and "function" not in t and "name" in t:
            t = {"type": "function", "function": dict(t)}
        if not isinstance(t, Mapping) or not isinstance(t.get("function"), Mapping):
            raise ValueError(f"tool must be a function schema dict with a 'name', got {t!r}")
        out.append(t)
    return out


# ================================================================================================ Jinja


def _template_text(template: str | Path) -> str:
    if isinstance(template, Path):
        return template.read_text(encoding="utf-8")
    if "{{" in template or "{%" in template:
        return template
    p = Path(template)
    if p.is_file():
        return p.read_text(encoding="utf-8")
    raise FileNotFoundError(f"chat template {template!r} is neither Jinja text nor an existing file")


def _render_jinja(text: str, **variables: Any) -> str:
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
    return env.from_string(text).render(**variables)


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
    return sorted(mapping.items(), key=lambda kv: kv[0].lower() if isinstance(kv[0], str) else kv[0])


def _is_sequence(value) -> bool:
    return not isinstance(value, (str, Mapping)) and hasattr(value, "__len__") and hasattr(value, "__getitem__")


def _quote(text) -> str:
    return STR_DELIM + _s(text) + STR_DELIM


def _format_argument(arg, escape_keys: bool = True) -> str:
    """A JSON-like value in Gemma 4's tool syntax: strings in <|"|>, bare true/false/numbers."""
    if isinstance(arg, str):
        return _quote(arg)
    if isinstance(arg, bool):
        return "true" if arg else "false"
    if isinstance(arg, Mapping):
        items = [(_quote(k) if escape_keys else _s(k)) + ":" + _format_argument(v, escape_keys)
                 for k, v in _dictsort(arg)]
        return "{" + ",".join(items) + "}"
    if _is_sequence(arg):
        return "[" + ",".join(_format_argument(v, escape_keys) for v in arg) + "]"
    return _s(arg)


def _format_required(items) -> str:
    return "required:[" + ",".join(_quote(x) for x in items) + "]"


def _format_parameters(properties: Mapping) -> str:
    """The `properties:{...}` body of a tool schema. Each property's fields are comma-joined in the
    template's fixed order; the property names themselves are sorted, and names that collide with
    schema keywords (`type`, `description`, ...) are dropped, exactly as the template does."""
    entries = []
    for key, value in _dictsort(properties):
        if key in _STANDARD_SCHEMA_KEYS:
            continue
        parts = []
        if _get(value, "description"):
            parts.append("description:" + _quote(value["description"]))
        kind = _upper(_get(value, "type"))
        if kind == "STRING":
            if _get(value, "enum"):
                parts.append("enum:" + _format_argument(value["enum"]))
        elif kind == "ARRAY":
            items = _get(value, "items")
            if isinstance(items, Mapping) and items:
                parts.append("items:{" + _format_items(items) + "}")
        if _get(value, "nullable"):
            parts.append("nullable:true")
        if kind == "OBJECT":
            props = _get(value, "properties")
            # Without `properties`, the template formats the object schema's own keys as properties.
            parts.append("properties:{" + _format_parameters(props if isinstance(props, Mapping) else value) + "}")
            if _get(value, "required"):
                parts.append(_format_required(value["required"]))
        parts.append("type:" + _quote(kind))
        entries.append(_s(key) + ":{" + ",".join(parts) + "}")
    return ",".join(entries)


def _format_items(items: Mapping) -> str:
    parts = []
    for key, value in _dictsort(items):
        if value is None:
            continue
        if key == "properties":
            parts.append("properties:{" + (_format_parameters(value) if isinstance(value, Mapping) else "") + "}")
        elif key == "required":
            parts.append(_format_required(value))
        elif key == "type":
            upper = value.upper() if isinstance(value, str) else [_upper(v) for v in value]
            parts.append("type:" + _format_argument(upper))
        else:
            parts.append(_s(key) + ":" + _format_argument(value))
    return ",".join(parts)


def _format_declaration(tool: Mapping) -> str:
    fn = tool["function"]
    out = "declaration:" + _s(_get(fn, "name")) + "{description:" + _quote(_get(fn, "description"))
    params = _get(fn, "parameters")
    if params:
        out += ",parameters:{"
        if _get(params, "properties"):
            out += "properties:{" + _format_parameters(params["properties"]) + "},"
        if _get(params, "required"):
            out += _format_required(params["required"]) + ","
        if _get(params, "type"):
            out += "type:" + _quote(_upper(params["type"])) + "}"
    if "response" in fn:
        resp = fn["response"]
        out += ",response:{"
        if _get(resp, "description"):
            out += "description:" + _quote(resp["description"]) + ","
        if _upper(_get(resp, "type")) == "OBJECT":
            out += "type:" + _quote(_upper(resp["type"])) + "}"
    return (out + "}").strip()


def _strip_thinking(text: str) -> str:
    """Drop `<|channel>...<channel|>` blocks from a past model turn (the model never sees old thoughts)."""
    kept = []
    for part in text.split("<channel|>"):
        kept.append(part.split("<|channel>")[0] if "<|channel>" in part else part)
    return "".join(kept).strip()


def _tool_response_block(name, response) -> str:
    if isinstance(response, Mapping):
        body = ",".join(_s(k) + ":" + _format_argument(v, escape_keys=False) for k, v in _dictsort(response))
        return "<|tool_response>response:" + _s(name) + "{" + body + "}<tool_response|>"
    return ("<|tool_response>response:" + _s(name) + "{value:" + _format_argument(response, escape_keys=False)
            + "}<tool_response|>")


def _tool_call_block(call: Mapping) -> str:
    fn = call["function"]
    args = fn.get("arguments")
    if isinstance(args, Mapping):
        body = ",".join(_s(k) + ":" + _format_argument(v, escape_keys=False) for k, v in _dictsort(args))
    elif isinstance(args, str):
        body = args  # an already-serialized argument string is inserted verbatim
    else:
        body = ""
    return "<|tool_call>call:" + _s(fn["name"]) + "{" + body + "}<tool_call|>"


# ============================================================================================== Gemma 4


def _render_gemma4(messages, tools, add_generation_prompt, enable_thinking, bos) -> str:
    out = [bos]
    prev_type = None  # what the last rendered piece was; decides whether a model turn prompt follows
    loop = messages
    first = messages[0]
    if enable_thinking or tools or first["role"] in ("system", "developer"):
        out.append("<|turn>system\n")
        if enable_thinking:
            out.append("<|think|>\n")
            prev_type = "think"
        if first["role"] in ("system", "developer"):
            out.append(_system_text(first.get("content")))
            loop = messages[1:]
        if tools:
            for tool in tools:
                out.append("<|tool>" + _format_declaration(tool) + "<tool|>")
            prev_type = "tool"
        out.append("<turn|>\n")

    last_user = max((i for i, m in enumerate(loop) if m["role"] == "user"), default=-1)
    for i, msg in enumerate(loop):
        if msg["role"] == "tool":
            continue  # rendered inside the model turn that made the call (see below)
        prev_type = None
        role = "model" if msg["role"] == "assistant" else msg["role"]
        prev_role = next((loop[j]["role"] for j in range(i - 1, -1, -1) if loop[j]["role"] != "tool"), None)
        # Consecutive assistant messages (e.g. call, then answer after the tool ran) share one model turn.
        if not (role == "model" and prev_role == "assistant"):
            out.append("<|turn>" + role + "\n")

        tool_calls = msg.get("tool_calls")
        thinking = msg.get("reasoning") or msg.get("reasoning_content")
        # Thoughts are kept only while the model is still working on the latest user request with tools.
        if thinking and i > last_user and tool_calls:
            out.append("<|channel>thought\n" + _s(thinking) + "\n<channel|>")
        if tool_calls:
            out.extend(_tool_call_block(c) for c in tool_calls)
            prev_type = "tool_call"

        responded = False
        if msg.get("tool_responses"):  # Gemma-native: responses attached to the assistant message
            for r in msg["tool_responses"]:
                name = r["name"] if isinstance(r, Mapping) and "name" in r else "unknown"
                out.append(_tool_response_block(name, _get(r, "response")))
                responded, prev_type = True, "tool_response"
        elif tool_calls:  # OpenAI style: the following role="tool" messages answer the calls
            for follow in loop[i + 1:]:
                if follow["role"] != "tool":
                    break
                name = follow.get("name")
                for c in tool_calls:
                    if c.get("id") == follow.get("tool_call_id"):
                        name = c["function"]["name"]
                if name is None:
                    raise ValueError("tool message has neither a 'name' nor a 'tool_call_id' matching a call")
                out.append(_tool_response_block(name, _tool_body(follow.get("content"))))
                responded, prev_type = True, "tool_response"

        content = msg.get("content")
        if isinstance(content, str):
            out.append(_strip_thinking(content) if role == "model" else content.strip())
        elif _is_sequence(content):
            for item in content:
                kind = item.get("type")
                if kind == "text":
                    text = _s(item.get("text", ""))
                    out.append(_strip_thinking(text) if role == "model" else text.strip())
                elif kind in ("image", "audio", "video"):
                    out.append(f"<|{kind}|>")
                    prev_type = kind

        if prev_type == "tool_call" and not responded:
            out.append("<|tool_response>")  # the prompt stops where the tool's result must be inserted
        elif not (responded and not content):
            out.append("<turn|>\n")

    if add_generation_prompt and prev_type not in ("tool_response", "tool_call"):
        out.append("<|turn>model\n")
        if not enable_thinking:
            out.append("<|channel>thought\n<channel|>")  # the 31B template's empty thought when thinking is off
    return "".join(out)


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


def _render_gemma3(messages, add_generation_prompt, bos) -> str:
    """Gemma 3: `<start_of_turn>user\\n...<end_of_turn>\\n`; a system message is prepended to the first
    user turn; roles must alternate user/model."""
    prefix = ""
    if messages[0]["role"] == "system":
        content = messages[0].get("content")
        prefix = (content if isinstance(content, str) else _s(content[0].get("text", ""))) + "\n\n"
        messages = messages[1:]
    out = [bos]
    for i, msg in enumerate(messages):
        if (msg["role"] == "user") != (i % 2 == 0):
            raise ValueError("Gemma 3 conversations must alternate user/assistant/user/assistant/... "
                             f"(message {i} has role {msg['role']!r})")
        role = "model" if msg["role"] == "assistant" else msg["role"]
        out.append("<start_of_turn>" + role + "\n" + (prefix if i == 0 else ""))
        content = msg.get("content")
        if isinstance(content, str):
            out.append(content.strip())
        elif _is_sequence(content):
            for item in content:
                if item.get("type") == "image":
                    out.append("<start_of_image>")
                elif item.get("type") == "text":
                    out.append(_s(item.get("text", "")).strip())
        out.append("<end_of_turn>\n")
    if add_generation_prompt:
        out.append("<start_of_turn>model\n")
    return "".join(out)


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
        raise TypeError(f"parse_response expects the decoded text, got {type(text).__name__}")
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
                raise ValueError(f"unterminated tool call (no <tool_call|>): {text[tc:tc + 80]!r}")
            calls.append(_parse_call(text[tc + len("<|tool_call>"):end]))
            pos = end + len("<tool_call|>")
    thinking = "\n".join(t.strip("\n") for t in thoughts) if thoughts else None
    return ParsedResponse(content="".join(answer).strip(), thinking=thinking, tool_calls=calls)


def _parse_call(body: str) -> ToolCall:
    if not body.startswith("call:") or "{" not in body:
        raise ValueError(f"malformed tool call {body!r}: expected 'call:NAME{{...}}'")
    name, brace, rest = body[len("call:"):].partition("{")
    parser = _ValueParser("{" + rest)
    args = parser.parse_object()
    if parser.pos != len(parser.text):
        raise ValueError(f"malformed tool call {body!r}: unexpected text after the arguments")
    return ToolCall(name=name.strip(), arguments=args)


class _ValueParser:
    """Reads Gemma 4 tool values: {key:value,...}, [v,...], <|"|>string<|"|>, true/false, numbers."""

    def __init__(self, text: str):
        self.text, self.pos = text, 0

    def fail(self, what: str):
        raise ValueError(f"malformed tool arguments: {what} at position {self.pos} of {self.text!r}")

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
        return out

    def parse_list(self) -> list:
        self.expect("[")
        out = []
        while not self.peek("]"):
            out.append(self.parse_value())
            if not self.peek("]"):
                self.expect(",")
        self.pos += 1
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
