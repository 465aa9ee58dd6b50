"""What an attack is sent to: a model in this process, or any OpenAI-compatible chat endpoint.

A target answers a batch of conversations: ``respond(conversations, max_tokens) -> list[str]``, one
reply text per conversation, in order. Decoding is greedy (temperature 0) everywhere, so a report is
reproducible and two targets serving the same weights give the same replies. A reply that is a tool call
comes back as text (``[tool call NAME]``) so the scorers see that the model did not refuse.
"""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol, Sequence, runtime_checkable
from urllib.parse import urlsplit

from gemma4._util import Gemma4Error
from gemma4.infer import generate
from gemma4.text.chat import ChatError, parse_response

__all__ = ["Target", "TargetError", "ModelTarget", "OpenAITarget", "reply_text"]


class TargetError(Gemma4Error, RuntimeError):
    """A target that cannot answer: an unreachable endpoint, an HTTP error, a conversation the model's
    chat format cannot render. The message names the URL or the conversation."""


@runtime_checkable
class Target(Protocol):
    name: str

    def respond(self, conversations: Sequence[Sequence[dict]], max_tokens: int) -> list[str]: ...


def reply_text(content: str | None, tool_calls: Sequence[str] = ()) -> str:
    """The text the scorers judge: the answer, then one ``[tool call NAME]`` per call the model made."""
    parts = [content.strip()] if content and content.strip() else []
    parts += [f"[tool call {name}]" for name in tool_calls]
    return " ".join(parts)


# ------------------------------------------------------------------------------------------ in-process
class ModelTarget:
    """Greedy decoding of a loaded model through :func:`gemma4.infer.generate`, prompts in the model's
    own chat format (``Tokenizer.encode_chat``: tool turns included, control tokens only from the
    template), stopping at the end of the model's turn.

    A conversation longer than the context less ``max_tokens`` is cut from the left, keeping ``<bos>``
    and the tail (the request and the turn opener sit at the end); ``truncated`` counts those."""

    def __init__(self, model, tokenizer, *, batch_size: int = 8, name: str = "model"):
        if tokenizer.family not in ("gemma4", "gemma3"):
            raise TargetError("the tokenizer has no chat turn tokens (<|turn> or <start_of_turn>): a red-team "
                              "target needs a Gemma 4 or Gemma 3 chat vocabulary")
        self.model, self.tokenizer, self.name = model, tokenizer, name
        self.style = tokenizer.family
        self.batch_size = max(1, int(batch_size))
        self.truncated = 0

    def encode(self, messages: Sequence[dict], max_tokens: int, index: int = 0) -> list[int]:
        try:
            ids = self.tokenizer.encode_chat(_native_messages(messages), style=self.style)
        except ChatError as e:
            raise TargetError(f"conversation {index}: the {self.style} chat format cannot render it: {e}") from None
        room = self.model.config.max_position_embeddings - max_tokens
        if room < 8:
            raise TargetError(f"--max-tokens {max_tokens} leaves no room for a prompt in the model's context of "
                              f"{self.model.config.max_position_embeddings} tokens")
        if len(ids) > room:
            self.truncated += 1
            ids = ids[:1] + ids[len(ids) - room + 1:]
        return ids

    def respond(self, conversations: Sequence[Sequence[dict]], max_tokens: int) -> list[str]:
        prompts = [self.encode(c, max_tokens, i) for i, c in enumerate(conversations)]
        # Similar lengths share a batch: left padding is compute spent on nothing.
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        out: list[str] = [""] * len(prompts)
        for s in range(0, len(order), self.batch_size):
            idx = order[s:s + self.batch_size]
            new = generate(self.model, [prompts[i] for i in idx], max_tokens, tokenizer=self.tokenizer)
            for i, toks in zip(idx, new):
                out[i] = self._text(toks)
        return out

    def _text(self, tokens: list[int]) -> str:
        raw = self.tokenizer.decode(tokens)
        try:
            parsed = parse_response(raw)
        except ChatError:  # an unfinished tool call cut by max_tokens: keep the text before it
            return raw.split("<|tool_call>")[0].strip()
        return reply_text(parsed.content, [c.name for c in parsed.tool_calls])


def _native_messages(messages: Sequence[dict]) -> list[dict]:
    """OpenAI spelling -> what the chat renderer reads: tool-call arguments as a dict, not a JSON string."""
    out = []
    for m in messages:
        m = dict(m)
        if m.get("tool_calls"):
            calls = []
            for c in m["tool_calls"]:
                fn = dict(c["function"])
                if isinstance(fn.get("arguments"), str):
                    try:
                        fn["arguments"] = json.loads(fn["arguments"] or "{}")
                    except json.JSONDecodeError:
                        pass  # rendered verbatim
                calls.append({**c, "function": fn})
            m["tool_calls"] = calls
        out.append(m)
    return out


# ------------------------------------------------------------------------------------------ over HTTP
def _api_base(url: str) -> str:
    """``http://host:port`` or ``http://host:port/v1`` (or any other prefix) -> the base the OpenAI
    routes hang from; a bare host gets ``/v1``, which is where OpenAI-compatible servers put them."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise TargetError(f"{url}: not an http(s):// URL")
    base = url.rstrip("/")
    return base + "/v1" if parts.path in ("", "/") else base


def _openai_messages(messages: Sequence[dict]) -> list[dict]:
    """Our messages in OpenAI's wire form: tool-call arguments as a JSON string."""
    out = []
    for m in messages:
        m = dict(m)
        if m.get("tool_calls"):
            m["tool_calls"] = [{**c, "function": {**c["function"], "arguments": c["function"]["arguments"]
                                                  if isinstance(c["function"].get("arguments"), str)
                                                  else json.dumps(c["function"].get("arguments") or {})}}
                               for c in m["tool_calls"]]
        if m.get("content") is None:
            m["content"] = ""
        out.append(m)
    return out


class OpenAITarget:
    """Any OpenAI-compatible ``/v1/chat/completions`` endpoint (``gemma4 serve``, vLLM, llama.cpp's server,
    a hosted API), temperature 0. Conversations are sent ``concurrency`` at a time (a batching server
    decodes them together). One retry, after a short pause, on a connection error, 429 or 5xx; then a
    :class:`TargetError` naming the URL. ``model=None`` asks ``/v1/models`` for the served model."""

    def __init__(self, base_url: str, model: str | None = None, api_key: str | None = None, *,
                 concurrency: int = 4, timeout: float = 300.0, retries: int = 1, transport=None):
        try:
            import httpx
        except ImportError:
            raise TargetError("an http(s) target needs httpx: pip install httpx") from None
        self.base = _api_base(base_url)
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._client = httpx.Client(timeout=timeout, headers=headers, transport=transport)
        self._httpx = httpx
        self.concurrency = max(1, int(concurrency))
        self.retries = max(0, int(retries))
        self.model = model or self._served_model()
        self.name = f"{self.model} @ {self.base}"

    def close(self) -> None:
        self._client.close()

    def _request(self, method: str, route: str, body: dict | None = None) -> dict:
        url = self.base + route
        httpx = self._httpx
        for attempt in range(self.retries + 1):
            last = attempt == self.retries
            try:
                r = self._client.request(method, url, json=body)
            except httpx.HTTPError as e:
                if last:
                    raise TargetError(f"{url}: {type(e).__name__}: {e}") from None
                time.sleep(1.0)
                continue
            if r.status_code == 429 or r.status_code >= 500:
                if not last:
                    time.sleep(float(r.headers.get("retry-after", 1.0)) if r.headers.get("retry-after", "").isdigit()
                               else 1.0)
                    continue
            if r.status_code != 200:
                raise TargetError(f"{url}: HTTP {r.status_code}: {_error_message(r)}")
            try:
                return r.json()
            except ValueError:
                raise TargetError(f"{url}: the reply is not JSON: {r.text[:200]!r}") from None
        raise AssertionError("unreachable")

    def _served_model(self) -> str:
        data = self._request("GET", "/models").get("data") or []
        if not data or not isinstance(data[0], dict) or "id" not in data[0]:
            raise TargetError(f"{self.base}/models lists no model; pass the model name")
        return data[0]["id"]

    def _one(self, messages: Sequence[dict], max_tokens: int) -> str:
        body = {"model": self.model, "messages": _openai_messages(messages), "temperature": 0,
                "max_tokens": max_tokens}
        reply = self._request("POST", "/chat/completions", body)
        try:
            msg = reply["choices"][0]["message"]
        except (KeyError, IndexError, TypeError):
            raise TargetError(f"{self.base}/chat/completions: no choices[0].message in the reply") from None
        calls = [c.get("function", {}).get("name", "?") for c in msg.get("tool_calls") or []]
        return reply_text(msg.get("content"), calls)

    def respond(self, conversations: Sequence[Sequence[dict]], max_tokens: int) -> list[str]:
        if self.concurrency == 1 or len(conversations) <= 1:
            return [self._one(c, max_tokens) for c in conversations]
        with ThreadPoolExecutor(self.concurrency) as pool:
            return list(pool.map(lambda c: self._one(c, max_tokens), conversations))


def _error_message(r) -> str:
    try:
        err = r.json().get("error")
        msg = err.get("message") if isinstance(err, dict) else err
        if msg:
            return " ".join(str(msg).split())[:300]
    except (ValueError, AttributeError):
        pass
    return " ".join(r.text.split())[:300] or r.reason_phrase
