"""The OpenAI-compatible HTTP API over a :class:`~gemma4.infer.batch.BatchEngine` (FastAPI).

``create_app(engine, tokenizer, ServeConfig(...))`` returns the ASGI app; ``gemma4 serve`` runs it with
uvicorn. Endpoints:

=============================  =================================================================
``GET  /v1/models``            the served model (every OpenAI client lists or checks it)
``POST /v1/chat/completions``  chat with tools, thinking, streaming (openai, garak, chat UIs)
``POST /v1/completions``       raw text / token-id prompts; ``echo`` + ``logprobs`` give the prompt's
                               token log-probs and real top-k (lm-eval ``local-completions``)
``POST /tokenize``             ``{"prompt", "add_special_tokens"}`` -> ``{"tokens", "count", ...}``
``POST /detokenize``           ``{"tokens"}`` -> ``{"prompt"}`` (lm-eval's remote tokenizer)
``GET  /tokenizer_info``       bos/eos/pad tokens, chat template, context length
``GET  /health``, ``/metrics`` liveness; Prometheus text (requests, tokens, queue, TTFT, latency)
``GET  /``                     a small chat page (streaming, folded thinking, stop button)
=============================  =================================================================

Every error is ``{"error": {"message", "type", "param", "code"}}`` with its HTTP status (400 bad
request, 401 missing/wrong API key, 404 unknown model or route, 413 body too large, 429 queue full
with ``Retry-After``, 500 model failure, 504 request timeout). Messages never repeat the API key or
any header.

Prompts: a chat is rendered and encoded by ``Tokenizer.encode_chat`` (one ``<bos>``, from the template;
control tokens typed inside message text stay text, so no one can forge a turn); a raw text prompt gets one BOS unless it already starts with
``<bos>``; token-id prompts are used as given. Streamed and unstreamed chat replies go through the same
:class:`~gemma4.serve.parser.StreamParser`, so they agree for any chunking of the model output.

Moderation (optional, off by default): ``create_app(..., moderator=f, refusal=REFUSAL)`` with
``f(prompt_text, response_text) -> P(violation)`` scores every finished choice (chat: the last user
message against the reply's content, and against its reasoning when there is one; tool-call arguments are
not scored; completions: the prompt against the generated text). A choice scored above ``moderation_threshold`` is answered with ``refusal``
and ``finish_reason: "content_filter"`` (its reasoning, tool calls and logprobs are dropped), and is
counted in ``/metrics`` (``gemma4_moderation_total{result=...}``). A moderator that raises counts as
flagged (fail closed) and is logged. Streaming under moderation is buffered per choice: a choice's chunks
are held until it has finished and been scored, then sent (or replaced by the refusal), so nothing
unscored reaches the client; the cost is that tokens no longer arrive as they are made. The server never
imports a classifier: the caller (``gemma4 serve --moderate``) passes the callable in.
"""

# No `from __future__ import annotations`: FastAPI reads the handlers' annotations (Request) at runtime.

import asyncio
import hmac
import json
import logging
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from gemma4.infer.batch import BatchEngine, BatchError, QueueFullError
from gemma4.infer.sampling import SamplingError, SamplingParams
from gemma4.serve.metrics import Metrics
from gemma4.serve.parser import IncrementalDetokenizer, StreamParser, held_suffix

log = logging.getLogger("gemma4.serve")

__all__ = ["ServeConfig", "create_app", "APIError"]

_ROLES = ("system", "developer", "user", "assistant", "tool")


@dataclass
class ServeConfig:
    """What the server allows. ``max_prompt_tokens`` None = the engine's context."""

    model_name: str = "gemma4"
    api_key: str | None = None
    max_body_bytes: int = 4 << 20
    max_prompt_tokens: int | None = None
    max_tokens_cap: int = 4096
    default_max_tokens: int | None = None  # None = up to the cap and the context
    max_n: int = 8
    max_stop: int = 8
    max_top_logprobs: int = 20
    request_timeout: float = 600.0
    retry_after_s: int = 1
    created: int = field(default_factory=lambda: int(time.time()))


class APIError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def _bad(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


# ============================================================================================ parsing
def _opt(body: dict, key: str, kinds, default=None, *, lo=None, hi=None):
    """body[key] checked against ``kinds`` and the range [lo, hi]; missing or null -> default."""
    v = body.get(key)
    if v is None:
        return default
    if isinstance(v, bool) and bool not in (kinds if isinstance(kinds, tuple) else (kinds,)):
        raise _bad(f"'{key}' must be of type {_kind_name(kinds)}, got a boolean", key)
    if not isinstance(v, kinds):
        raise _bad(f"'{key}' must be of type {_kind_name(kinds)}, got {type(v).__name__}", key)
    if lo is not None and v < lo or hi is not None and v > hi:
        raise _bad(f"'{key}' must be in [{lo}, {hi}], got {v}", key)
    return v


def _kind_name(kinds) -> str:
    kinds = kinds if isinstance(kinds, tuple) else (kinds,)
    names = {int: "integer", float: "number", str: "string", bool: "boolean", list: "array", dict: "object"}
    return " or ".join(dict.fromkeys(names.get(k, k.__name__) for k in kinds))


def _sampling(body: dict, seed_offset: int = 0) -> SamplingParams:
    for key in ("presence_penalty", "frequency_penalty"):
        v = _opt(body, key, (int, float), 0.0)
        if v != 0:
            raise _bad(f"'{key}' is not supported (use 'repetition_penalty')", key, "unsupported_parameter")
    seed = _opt(body, "seed", int)
    kw = dict(temperature=_opt(body, "temperature", (int, float), 1.0, lo=0, hi=2),
              top_p=_opt(body, "top_p", (int, float), 1.0), top_k=_opt(body, "top_k", int, 0),
              min_p=_opt(body, "min_p", (int, float), 0.0),
              repetition_penalty=_opt(body, "repetition_penalty", (int, float), 1.0),
              seed=None if seed is None else seed + seed_offset)
    if kw["top_k"] == -1:  # vLLM's spelling of "off"
        kw["top_k"] = 0
    try:
        return SamplingParams(**kw)
    except SamplingError as e:
        msg = str(e)
        raise _bad(msg, next((k for k in kw if msg.startswith(k)), None)) from None


def _stops(body: dict, cfg: ServeConfig) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise _bad("'stop' must be a non-empty string or a list of non-empty strings", "stop")
    if len(stops) > cfg.max_stop:
        raise _bad(f"'stop' may hold at most {cfg.max_stop} strings, got {len(stops)}", "stop")
    return stops


def _max_tokens(body: dict, cfg: ServeConfig, prompt_len: int, context: int) -> int:
    key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    v = _opt(body, key, int, None, lo=0)
    if v is not None and v > cfg.max_tokens_cap:
        raise _bad(f"'{key}' is {v} but this server allows at most {cfg.max_tokens_cap}", key)
    room = max(context - prompt_len + 1, 0)
    if v is None:
        v = min(cfg.default_max_tokens or cfg.max_tokens_cap, cfg.max_tokens_cap, room)
    return v


def _check_prompt_len(n: int, cfg: ServeConfig, context: int, param: str) -> None:
    limit = min(cfg.max_prompt_tokens or context, context)
    if n > limit:
        raise _bad(f"the prompt has {n} tokens; this server's limit is {limit}", param, "context_length_exceeded")


def _text_parts(content, where: str) -> Any:
    if content is None or isinstance(content, str):
        return content or ""
    if isinstance(content, list):
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise _bad(f"{where}.content[{j}]: only text parts are supported (got {kind!r})", f"{where}.content")
        return content
    raise _bad(f"{where}.content must be a string or a list of text parts", f"{where}.content")


def _messages(raw) -> list[dict]:
    if not isinstance(raw, list) or not raw:
        raise _bad("'messages' must be a non-empty array", "messages")
    out = []
    for i, m in enumerate(raw):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise _bad(f"{where} must be an object", where)
        role = m.get("role")
        if role not in _ROLES:
            raise _bad(f"{where}.role must be one of {', '.join(_ROLES)}", f"{where}.role")
        msg: dict[str, Any] = {"role": role, "content": _text_parts(m.get("content"), where)}
        if role == "assistant":
            # Both spellings are accepted back: Gemma 4 needs its reasoning with the tool calls it made.
            thinking = m.get("reasoning_content") or m.get("reasoning")
            if thinking is not None:
                if not isinstance(thinking, str):
                    raise _bad(f"{where}.reasoning_content must be a string", f"{where}.reasoning_content")
                msg["reasoning_content"] = thinking
            calls = m.get("tool_calls")
            if calls:
                msg["tool_calls"] = [_tool_call_in(c, f"{where}.tool_calls[{j}]") for j, c in enumerate(calls)]
        elif role == "tool":
            if m.get("tool_call_id") is None and m.get("name") is None:
                raise _bad(f"{where}: a tool message needs 'tool_call_id' (or 'name')", f"{where}.tool_call_id")
            msg["tool_call_id"] = m.get("tool_call_id")
            if m.get("name") is not None:
                msg["name"] = m["name"]
        out.append(msg)
    return out


def _tool_call_in(c, where: str) -> dict:
    fn = c.get("function") if isinstance(c, dict) else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
        raise _bad(f"{where} must be {{'type': 'function', 'function': {{'name', 'arguments'}}}}", where)
    args = fn.get("arguments")
    if isinstance(args, str):  # OpenAI sends the arguments as a JSON string; the prompt wants the values
        try:
            args = json.loads(args) if args.strip() else {}
        except json.JSONDecodeError:
            raise _bad(f"{where}.function.arguments is not valid JSON", f"{where}.function.arguments") from None
    if args is None:
        args = {}
    if not isinstance(args, dict):
        raise _bad(f"{where}.function.arguments must be a JSON object", f"{where}.function.arguments")
    return {"id": c.get("id"), "type": "function", "function": {"name": fn["name"], "arguments": args}}


def _tools(body: dict) -> tuple[list | None, str]:
    """(tools for the prompt, forced prefix of the reply) from 'tools' and 'tool_choice'."""
    tools = body.get("tools")
    if tools is not None:
        if not isinstance(tools, list):
            raise _bad("'tools' must be an array", "tools")
        for i, t in enumerate(tools):
            fn = t.get("function") if isinstance(t, dict) else None
            if not isinstance(t, dict) or t.get("type", "function") != "function" or not isinstance(fn, dict) \
                    or not isinstance(fn.get("name"), str) or not fn["name"]:
                raise _bad(f"tools[{i}] must be {{'type': 'function', 'function': {{'name', ...}}}}", f"tools[{i}]")
            if fn.get("parameters") is not None and not isinstance(fn["parameters"], dict):
                raise _bad(f"tools[{i}].function.parameters must be a JSON schema object", f"tools[{i}].function.parameters")
    choice = body.get("tool_choice", "auto")
    names = [t["function"]["name"] for t in tools or []]
    if choice in (None, "auto"):
        return tools or None, ""
    if choice == "none":
        return None, ""  # the model is not shown the tools, so it cannot call them
    if not tools:
        raise _bad("'tool_choice' needs 'tools'", "tool_choice")
    if choice == "required":
        return tools, "<|tool_call>call:"  # the reply starts inside a call; the model names the tool
    if isinstance(choice, dict) and isinstance(choice.get("function"), dict):
        name = choice["function"].get("name")
        if name not in names:
            raise _bad(f"tool_choice names {name!r}, which is not among the tools", "tool_choice")
        return tools, "<|tool_call>call:" + name + "{"
    raise _bad("'tool_choice' must be 'none', 'auto', 'required' or {'type': 'function', 'function': {'name'}}",
               "tool_choice")


def _thinking(body: dict) -> bool:
    kw = body.get("chat_template_kwargs")
    if isinstance(kw, dict) and isinstance(kw.get("enable_thinking"), bool):
        return kw["enable_thinking"]
    if isinstance(body.get("enable_thinking"), bool):
        return body["enable_thinking"]
    th = body.get("thinking")
    if isinstance(th, bool):
        return th
    if isinstance(th, dict):
        return th.get("type") == "enabled"
    effort = body.get("reasoning_effort")
    if isinstance(effort, str):
        return effort not in ("none", "minimal")
    return False


# ============================================================================================ one choice
class _Choice:
    """One engine request's output on the event loop: decoding, stop strings, the chat parser."""

    def __init__(self, index: int, tokenizer, stop_ids, stop_strings: list[str], chat: bool, prefix: str = ""):
        self.index = index
        self.tok = tokenizer
        self.stop_ids = stop_ids
        self.stops = stop_strings
        self.detok = IncrementalDetokenizer(tokenizer.decode)
        self.parser = StreamParser() if chat else None
        self.pending = ""
        self.text: list[str] = []
        self.hit_stop = False
        self.n_tokens = 0
        self.items: list[tuple[int, float | None, list | None]] = []  # (token, logprob, top) per token
        self.finish: str | None = None
        self.req = None
        self.initial = self.parser.feed(prefix) if (self.parser is not None and prefix) else []
        if prefix and self.parser is None:
            self.text.append(prefix)

    def token(self, tok: int, lp, top):
        """-> (new text, parser deltas)."""
        if self.hit_stop:
            return "", []
        self.n_tokens += 1
        self.items.append((tok, lp, top))
        piece = "" if tok in self.stop_ids else self.detok.push(tok)
        return self._text(piece, final=False)

    def done(self, reason: str):
        text, deltas = ("", []) if self.hit_stop else self._text(self.detok.flush(), final=True)
        if self.parser is not None:
            deltas = deltas + self.parser.finish()
        if self.hit_stop or reason == "cancelled":
            self.finish = "stop"
        else:
            self.finish = reason
        if self.parser is not None and self.parser.tool_calls and self.finish == "stop":
            self.finish = "tool_calls"
        return text, deltas

    def _text(self, piece: str, final: bool):
        s = self.pending + piece
        if self.stops:
            hits = [i for i in (s.find(x) for x in self.stops) if i >= 0]
            if hits:
                s, self.hit_stop, self.pending = s[:min(hits)], True, ""
            else:
                keep = 0 if final else held_suffix(s, self.stops)
                s, self.pending = s[:len(s) - keep], s[len(s) - keep:]
        if not s and not (self.hit_stop or final):
            return "", []
        self.text.append(s)
        deltas = self.parser.feed(s) if self.parser is not None and s else []
        return s, deltas


# ============================================================================================ the app
def create_app(engine: BatchEngine, tokenizer, config: ServeConfig | None = None, *, own_engine: bool = True,
               moderator: Callable[[str, str], float] | None = None, moderation_threshold: float = 0.5,
               refusal: str | None = None):
    """The FastAPI app serving ``engine`` (started on app startup and, if ``own_engine``, stopped on shutdown).

    ``moderator``: optional ``(prompt_text, response_text) -> P(violation)``; replies scored above
    ``moderation_threshold`` become ``refusal`` with finish_reason "content_filter" (module docstring)."""
    from contextlib import asynccontextmanager

    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, StreamingResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    cfg = config or ServeConfig()
    metrics = Metrics()
    if moderator is not None and not isinstance(refusal, str):
        raise ValueError("create_app: a moderator needs the refusal text to answer flagged replies with")
    if moderator is not None and not 0.0 <= moderation_threshold <= 1.0:
        raise ValueError(f"create_app: moderation_threshold must be within [0, 1], got {moderation_threshold}")
    # One worker: the classifier's forward passes run one at a time, off the event loop (which keeps
    # answering /health and streaming other requests meanwhile).
    mod_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="gemma4-moderation") if moderator else None
    mod_counts = {"passed": 0, "flagged": 0, "error": 0}
    context = engine.max_length
    bos = tokenizer.id_to_token(tokenizer.bos_id) if tokenizer.bos_id is not None else None
    style = "gemma3" if tokenizer.family == "gemma3" else "gemma4"

    def encode_chat(messages, tools, thinking, forced="", add_generation_prompt=True) -> list[int]:
        # Tokenizer.encode_chat keeps control tokens to the template: a user's literal "<|turn>" stays
        # text (a forged turn would otherwise follow). Its ids start with the template's one <bos>.
        try:
            ids = tokenizer.encode_chat(messages, tools, add_generation_prompt=add_generation_prompt,
                                        enable_thinking=thinking, style=style)
        except (ValueError, KeyError, TypeError) as e:
            raise _bad(f"cannot render the conversation: {e}", "messages") from None
        # The forced start of a reply (tool_choice) is template text; it begins with a control token, so
        # encoding it apart gives the ids of the joined text.
        return ids + (tokenizer.encode(forced, add_bos=False) if forced else [])

    @asynccontextmanager
    async def lifespan(_app):
        engine.start()
        try:
            yield
        finally:
            if own_engine:
                await asyncio.get_running_loop().run_in_executor(None, engine.stop)
            if mod_pool is not None:
                mod_pool.shutdown(wait=False)

    app = FastAPI(title="gemma4", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine, app.state.metrics, app.state.config = engine, metrics, cfg

    def error_response(e: APIError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError):
        # Labelled by route template, not the raw path: clients must not be able to mint label values.
        route = request.scope.get("route")
        metrics.request(getattr(route, "path", "other"), e.status)
        return error_response(e)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e):
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        msg = "no such route" if e.status_code == 404 else ("method not allowed" if e.status_code == 405 else "bad request")
        return error_response(APIError(e.status_code, f"{msg}: {request.method} {request.url.path}", kind))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, e):
        return error_response(_bad("invalid request"))

    @app.exception_handler(Exception)
    async def _crash(request: Request, e: Exception):
        log.exception("unhandled server error")  # details go to the log, never to the client
        return error_response(APIError(500, "internal server error", "server_error"))

    # ------------------------------------------------------------------------------------------ helpers
    def auth(request: Request) -> None:
        if cfg.api_key is None:
            return
        given = request.headers.get("authorization", "")
        token = given[7:].strip() if given[:7].lower() == "bearer " else request.headers.get("x-api-key", "")
        if not hmac.compare_digest(token.encode(), cfg.api_key.encode()):
            raise APIError(401, "missing or invalid API key (send 'Authorization: Bearer <key>')",
                           "authentication_error", code="invalid_api_key")

    async def read_json(request: Request) -> dict:
        auth(request)
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > cfg.max_body_bytes:
            raise APIError(413, f"request body is larger than {cfg.max_body_bytes} bytes", code="request_too_large")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > cfg.max_body_bytes:
                raise APIError(413, f"request body is larger than {cfg.max_body_bytes} bytes", code="request_too_large")
            chunks.append(chunk)
        try:
            body = json.loads(b"".join(chunks))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise _bad("the request body is not valid JSON") from None
        if not isinstance(body, dict):
            raise _bad("the request body must be a JSON object")
        return body

    def check_model(body: dict) -> None:
        name = body.get("model")
        if name is not None and name != cfg.model_name:
            raise APIError(404, f"model {str(name)[:100]!r} does not exist; this server serves {cfg.model_name!r}",
                           "not_found_error", "model", "model_not_found")

    def encode_text(text: str) -> list[int]:
        # One BOS on raw text (Gemma degrades badly without it), none added to text that has it already.
        has = bos is not None and text.startswith(bos)
        return tokenizer.encode(text, add_bos=bos is not None and not has)

    def submit_all(prompts: list[list[int]], n: int, body: dict, max_new: list[int], *, logprobs, prompt_logprobs,
                   choices: list[_Choice], queue: asyncio.Queue, loop) -> list:
        reqs = []
        try:
            for i, (ch, p) in enumerate(zip(choices, [p for p in prompts for _ in range(n)])):
                params = _sampling(body, seed_offset=ch.index % n)
                # ignore_eos (a vLLM extension, for benchmarks): run to max_tokens whatever the model says.
                stop_ids = () if body.get("ignore_eos") is True else None
                reqs.append(engine.submit(p, max_new[i // n], params, stop_token_ids=stop_ids, logprobs=logprobs,
                                          prompt_logprobs=prompt_logprobs,
                                          on_event=_listener(ch.index, queue, loop), timeout=cfg.request_timeout))
                ch.req = reqs[-1]
        except QueueFullError:
            for r in reqs:
                r.cancel()
            raise APIError(429, "the server is busy (request queue full); retry later", "rate_limit_error",
                           code="queue_full", headers={"Retry-After": str(cfg.retry_after_s)}) from None
        except BatchError as e:
            for r in reqs:
                r.cancel()
            raise _bad(str(e)) from None
        return reqs

    def _listener(index: int, queue: asyncio.Queue, loop):
        last = [0.0]

        def on_event(req, kind):  # engine thread: copy what the event loop needs, then hand it over
            now = time.monotonic()
            if kind == "token":
                i = len(req.tokens) - 1
                if i == 0:
                    metrics.first_token(now - req.t_submit)
                else:
                    metrics.next_token(now - last[0])
                last[0] = now
                item = (index, "token", req.tokens[i], req.token_logprobs[i] if req.logprobs is not None else None,
                        req.top_logprobs[i] if req.logprobs else None)
            else:
                metrics.finished(req.finish_reason, len(req.prompt), len(req.tokens),
                                 (req.t_done - req.t_submit) if req.t_done else None)
                item = (index, "done", req.finish_reason, None, None)
            try:
                loop.call_soon_threadsafe(queue.put_nowait, item)
            except RuntimeError:  # the event loop is gone (shutdown)
                pass

        return on_event

    async def events(queue: asyncio.Queue, reqs, request: Request, poll_disconnect: bool):
        """Yield engine events until every request is done; a client that leaves cancels its requests."""
        left = len(reqs)
        try:
            while left:
                try:
                    item = await asyncio.wait_for(queue.get(), timeout=0.5)
                except asyncio.TimeoutError:
                    if poll_disconnect and await request.is_disconnected():
                        return
                    continue
                if item[1] == "done":
                    left -= 1
                yield item
        finally:
            for r in reqs:
                if not r.done:
                    r.cancel()

    def token_str(t: int) -> str:
        return tokenizer.decode([t])

    def chat_logprob_entry(tok, lp, top) -> dict:
        s = token_str(tok)
        return {"token": s, "logprob": lp, "bytes": list(s.encode("utf-8")),
                "top_logprobs": [{"token": token_str(i), "logprob": v, "bytes": list(token_str(i).encode("utf-8"))}
                                 for i, v in (top or [])]}

    async def collect(queue: asyncio.Queue, reqs, request: Request, choices) -> None:
        """Run an unstreamed request to its end: every token into its choice (a choice that hits a stop
        string cancels its row), every finish checked for an error to answer with."""
        async for item in events(queue, reqs, request, poll_disconnect=True):
            ch = choices[item[0]]
            if item[1] == "token":
                ch.token(item[2], item[3], item[4])
                if ch.hit_stop:
                    ch.req.cancel()
            else:
                ch.done(item[2])
                err = finish_error(item[2], ch.req)
                if err is not None:
                    raise err

    def finish_error(reason: str, req) -> APIError | None:
        if reason == "timeout":
            return APIError(504, f"the request took longer than {cfg.request_timeout:g} s", "timeout_error", code="timeout")
        if reason == "error":
            return APIError(500, "the model failed on this request", "server_error", code="model_error")
        return None

    # ------------------------------------------------------------------------------------------ routes
    @app.get("/health")
    async def health():
        alive = engine._thread is not None and engine._thread.is_alive()
        return JSONResponse({"status": "ok" if alive else "engine stopped"}, status_code=200 if alive else 503)

    @app.get("/metrics")
    async def metrics_route(request: Request):
        auth(request)
        text = metrics.render(engine)
        if moderator is not None:
            text += "".join(["# HELP gemma4_moderation_total Finished choices scored by the moderator, by result.\n",
                             "# TYPE gemma4_moderation_total counter\n"]
                            + [f'gemma4_moderation_total{{result="{k}"}} {v}\n' for k, v in mod_counts.items()])
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")

    # ------------------------------------------------------------------------------------------ moderation
    async def flagged(prompt_text: str, *texts: str) -> bool:
        """Score each non-empty text against the prompt; True when any is above the threshold. Runs on the
        moderation thread; a failure counts as flagged (fail closed: an unscored reply is never sent)."""
        loop = asyncio.get_running_loop()
        try:
            hit = False
            for t in texts:
                if t:
                    p = await loop.run_in_executor(mod_pool, moderator, prompt_text, t)
                    hit = hit or float(p) > moderation_threshold
        except Exception:  # noqa: BLE001 - any moderator failure must still block the reply
            log.exception("the moderator failed; the reply is withheld")
            mod_counts["error"] += 1
            hit = True
        mod_counts["flagged" if hit else "passed"] += 1
        return hit

    def last_user_text(messages: list[dict]) -> str:
        for m in reversed(messages):
            if m["role"] == "user":
                c = m["content"]
                return c if isinstance(c, str) else "".join(part["text"] for part in c)
        return ""

    def model_card() -> dict:
        return {"id": cfg.model_name, "object": "model", "created": cfg.created, "owned_by": "gemma4",
                "max_model_len": context}

    @app.get("/v1/models")
    async def models(request: Request):
        auth(request)
        metrics.request("/v1/models", 200)
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{name:path}")
    async def model_info(name: str, request: Request):
        auth(request)
        if name != cfg.model_name:
            raise APIError(404, f"model {name[:100]!r} does not exist", "not_found_error", "model", "model_not_found")
        return model_card()

    @app.get("/tokenizer_info")
    @app.get("/v1/tokenizer_info")
    async def tokenizer_info(request: Request):
        auth(request)
        name = lambda i: tokenizer.id_to_token(i) if i is not None else None  # noqa: E731
        return {"tokenizer_class": "gemma4.Tokenizer", "bos_token": name(tokenizer.bos_id),
                "eos_token": name(tokenizer.eos_id), "pad_token": name(tokenizer.pad_id),
                "unk_token": name(tokenizer.unk_id), "bos_token_id": tokenizer.bos_id,
                "eos_token_id": tokenizer.eos_id, "pad_token_id": tokenizer.pad_id,
                "stop_token_ids": sorted(engine.stop_token_ids), "vocab_size": tokenizer.vocab_size,
                "model_max_length": context, "max_model_len": context, "add_bos_token": bos is not None,
                "chat_template": tokenizer.chat_template, "family": tokenizer.family}

    @app.post("/tokenize")
    @app.post("/v1/tokenize")
    async def tokenize(request: Request):
        body = await read_json(request)
        add = body.get("add_special_tokens", body.get("add_special", True))
        if not isinstance(add, bool):
            raise _bad("'add_special_tokens' must be a boolean", "add_special_tokens")
        if body.get("messages") is not None:
            tools, _ = _tools(body)
            ids = encode_chat(_messages(body["messages"]), tools, _thinking(body),
                              add_generation_prompt=body.get("add_generation_prompt", True) is not False)
        else:
            text = body.get("prompt", body.get("content", body.get("text")))
            if not isinstance(text, str):
                raise _bad("'prompt' must be a string", "prompt")
            ids = encode_text(text) if add else tokenizer.encode(text, add_bos=False)
        out = {"count": len(ids), "max_model_len": context, "tokens": ids}
        if body.get("return_token_strs"):
            out["token_strs"] = [tokenizer.id_to_token(i) for i in ids]
        return out

    @app.post("/detokenize")
    @app.post("/v1/detokenize")
    async def detokenize(request: Request):
        body = await read_json(request)
        ids = body.get("tokens")
        if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
            raise _bad("'tokens' must be an array of token ids", "tokens")
        try:
            text = tokenizer.decode(ids)
        except ValueError as e:
            raise _bad(str(e), "tokens") from None
        return {"prompt": text, "content": text}

    # ------------------------------------------------------------------------------------------ chat
    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await read_json(request)
        check_model(body)
        messages = _messages(body.get("messages"))
        tools, forced = _tools(body)
        if style == "gemma3" and (tools or forced):
            raise _bad("this model's chat format (Gemma 3) has no tool calling", "tools")
        thinking = _thinking(body)
        prompt = encode_chat(messages, tools, thinking, forced)
        _check_prompt_len(len(prompt), cfg, context, "messages")
        n = _opt(body, "n", int, 1, lo=1, hi=cfg.max_n)
        stream = _opt(body, "stream", bool, False)
        include_usage = bool((body.get("stream_options") or {}).get("include_usage")) if stream else False
        want_lp = _opt(body, "logprobs", bool, False)
        top_n = _opt(body, "top_logprobs", int, 0, lo=0, hi=cfg.max_top_logprobs)
        stops = _stops(body, cfg)
        max_new = _max_tokens(body, cfg, len(prompt), context)
        _sampling(body)  # validate before anything is queued
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        choices = [_Choice(i, tokenizer, engine.stop_token_ids, stops, chat=True, prefix=forced) for i in range(n)]
        reqs = submit_all([prompt], n, body, [max_new], logprobs=top_n if want_lp else None, prompt_logprobs=None,
                          choices=choices, queue=queue, loop=loop)
        cid, created = "chatcmpl-" + uuid.uuid4().hex[:24], int(time.time())
        metrics.request("/v1/chat/completions", 200)

        def usage() -> dict:
            c = sum(ch.n_tokens for ch in choices)
            return {"prompt_tokens": len(prompt), "completion_tokens": c, "total_tokens": len(prompt) + c}

        def delta_json(d, index: int) -> dict:
            if d.kind == "content":
                return {"content": d.text}
            if d.kind == "reasoning":
                return {"reasoning": d.text, "reasoning_content": d.text}
            calls_seen[index] += 1
            return {"tool_calls": [_tool_call_out(d.call, calls_seen[index] - 1)]}

        calls_seen = [0] * n
        asked = last_user_text(messages) if moderator is not None else ""

        if not stream:
            await collect(queue, reqs, request, choices)
            if any(ch.finish is None for ch in choices):
                return JSONResponse({}, status_code=499)  # the client left
            out_choices = []
            for ch in choices:
                res = ch.parser.result()
                if moderator is not None and await flagged(asked, res.content, res.thinking):
                    out_choices.append({"index": ch.index, "message": {"role": "assistant", "content": refusal},
                                        "logprobs": None, "finish_reason": "content_filter"})
                    continue
                msg: dict[str, Any] = {"role": "assistant", "content": res.content if (res.content or not res.tool_calls) else None}
                if res.thinking:
                    msg["reasoning"] = msg["reasoning_content"] = res.thinking
                if res.tool_calls:
                    msg["tool_calls"] = [_tool_call_out(c, k) for k, c in enumerate(res.tool_calls)]
                lp = {"content": [chat_logprob_entry(*it) for it in ch.items]} if want_lp else None
                out_choices.append({"index": ch.index, "message": msg, "logprobs": lp, "finish_reason": ch.finish})
            return {"id": cid, "object": "chat.completion", "created": created, "model": cfg.model_name,
                    "system_fingerprint": None, "choices": out_choices, "usage": usage()}

        def chunk(index: int, delta: dict, finish=None, logprobs=None) -> str:
            c = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": cfg.model_name,
                 "system_fingerprint": None,
                 "choices": [{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}]}
            if include_usage:
                c["usage"] = None
            return "data: " + json.dumps(c, ensure_ascii=False) + "\n\n"

        held: list[list[str]] = [[] for _ in range(n)]  # moderation: each choice's chunks until it is scored

        async def sse():
            try:
                for ch in choices:
                    yield chunk(ch.index, {"role": "assistant", "content": ""})
                    for d in ch.initial:
                        if moderator is not None:
                            held[ch.index].append(chunk(ch.index, delta_json(d, ch.index)))
                        else:
                            yield chunk(ch.index, delta_json(d, ch.index))
                async for item in events(queue, reqs, request, poll_disconnect=False):
                    ch = choices[item[0]]
                    if item[1] == "token":
                        _, deltas = ch.token(item[2], item[3], item[4])
                        if ch.hit_stop:
                            ch.req.cancel()
                        lp = {"content": [chat_logprob_entry(item[2], item[3], item[4])]} if want_lp else None
                    else:
                        _, deltas = ch.done(item[2])
                        lp = None
                        err = finish_error(item[2], ch.req)
                        if err is not None:
                            held[ch.index].clear()
                            yield "data: " + json.dumps(err.body()) + "\n\n"
                            continue
                    out = [chunk(ch.index, delta_json(d, ch.index), logprobs=lp if j == 0 else None)
                           for j, d in enumerate(deltas)]
                    if not deltas and lp is not None:
                        out.append(chunk(ch.index, {}, logprobs=lp))
                    if moderator is None:
                        for s in out:
                            yield s
                        if item[1] == "done":
                            yield chunk(ch.index, {}, finish=ch.finish)
                        continue
                    held[ch.index] += out
                    if item[1] == "done":
                        res = ch.parser.result()
                        if await flagged(asked, res.content, res.thinking):
                            held[ch.index].clear()
                            yield chunk(ch.index, {"content": refusal})
                            yield chunk(ch.index, {}, finish="content_filter")
                        else:
                            for s in held[ch.index]:
                                yield s
                            held[ch.index].clear()
                            yield chunk(ch.index, {}, finish=ch.finish)
                if include_usage:
                    yield "data: " + json.dumps({"id": cid, "object": "chat.completion.chunk", "created": created,
                                                 "model": cfg.model_name, "system_fingerprint": None, "choices": [],
                                                 "usage": usage()}) + "\n\n"
                yield "data: [DONE]\n\n"
            finally:
                for r in reqs:
                    if not r.done:
                        r.cancel()

        return StreamingResponse(sse(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    # ------------------------------------------------------------------------------------------ completions
    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await read_json(request)
        check_model(body)
        raw = body.get("prompt")
        prompts: list[list[int]] = []
        if isinstance(raw, str):
            prompts = [encode_text(raw)]
        elif isinstance(raw, list) and raw and all(isinstance(p, str) for p in raw):
            prompts = [encode_text(p) for p in raw]
        elif isinstance(raw, list) and raw and all(isinstance(t, int) and not isinstance(t, bool) for t in raw):
            prompts = [list(raw)]
        elif isinstance(raw, list) and raw and all(isinstance(p, list) and p and all(
                isinstance(t, int) and not isinstance(t, bool) for t in p) for p in raw):
            prompts = [list(p) for p in raw]
        else:
            raise _bad("'prompt' must be a string, a list of strings, a list of token ids or a list of such lists",
                       "prompt")
        for i, p in enumerate(prompts):
            if not p:
                raise _bad(f"prompt {i} is empty", "prompt")
            bad = [t for t in p if not 0 <= t < tokenizer.vocab_size]
            if bad:
                raise _bad(f"prompt {i} has token id {bad[0]} outside the vocabulary [0, {tokenizer.vocab_size})", "prompt")
            _check_prompt_len(len(p), cfg, context, "prompt")
        if body.get("suffix"):
            raise _bad("'suffix' is not supported", "suffix", "unsupported_parameter")
        best_of = _opt(body, "best_of", int, None)
        n = _opt(body, "n", int, 1, lo=1, hi=cfg.max_n)
        if best_of is not None and best_of != n:
            raise _bad("'best_of' other than 'n' is not supported", "best_of", "unsupported_parameter")
        if n * len(prompts) > cfg.max_n * 4:
            raise _bad(f"too many choices ({n} x {len(prompts)} prompts); the limit is {cfg.max_n * 4}", "prompt")
        stream = _opt(body, "stream", bool, False)
        include_usage = bool((body.get("stream_options") or {}).get("include_usage")) if stream else False
        echo = _opt(body, "echo", bool, False)
        k = _opt(body, "logprobs", int, None, lo=0, hi=cfg.max_top_logprobs)
        stops = _stops(body, cfg)
        max_new = [_max_tokens(body, cfg, len(p), context) for p in prompts]
        _sampling(body)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        choices = [_Choice(i, tokenizer, engine.stop_token_ids, stops, chat=False) for i in range(n * len(prompts))]
        reqs = submit_all(prompts, n, body, max_new, logprobs=k, prompt_logprobs=k if (echo and k is not None) else None,
                          choices=choices, queue=queue, loop=loop)
        cid, created = "cmpl-" + uuid.uuid4().hex[:24], int(time.time())
        metrics.request("/v1/completions", 200)

        def usage() -> dict:
            p = sum(len(x) for x in prompts)
            c = sum(ch.n_tokens for ch in choices)
            return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}

        def logprobs_of(ch: _Choice, with_prompt: bool, offset0: int = 0) -> dict | None:
            if k is None:
                return None
            toks, lps, tops = [], [], []
            if with_prompt:
                r = ch.req
                toks += r.prompt
                lps += r.prompt_token_logprobs
                tops += [None if t is None else {token_str(i): v for i, v in t} for t in r.prompt_top_logprobs]
            for tok, lp, top in ch.items:
                toks.append(tok)
                lps.append(lp)
                tops.append({token_str(i): v for i, v in (top or [])})
            strs = [token_str(t) for t in toks]
            offsets, pos = [], offset0
            for s in strs:
                offsets.append(pos)
                pos += len(s)
            return {"tokens": strs, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}

        def prompt_text(ch: _Choice) -> str:
            i = ch.index // n
            return raw[i] if isinstance(raw, list) and isinstance(raw[i], str) else (
                raw if isinstance(raw, str) else tokenizer.decode(prompts[i], skip_special_tokens=True))

        if not stream:
            await collect(queue, reqs, request, choices)
            if any(ch.finish is None for ch in choices):
                return JSONResponse({}, status_code=499)
            out = []
            for ch in choices:
                head = tokenizer.decode(prompts[ch.index // n]) if echo else ""
                if moderator is not None and await flagged(prompt_text(ch), "".join(ch.text)):
                    out.append({"index": ch.index, "text": head + refusal, "logprobs": None,
                                "finish_reason": "content_filter"})
                    continue
                out.append({"index": ch.index, "text": head + "".join(ch.text), "logprobs": logprobs_of(ch, echo),
                            "finish_reason": ch.finish})
            return {"id": cid, "object": "text_completion", "created": created, "model": cfg.model_name,
                    "system_fingerprint": None, "choices": out, "usage": usage()}

        def chunk(index: int, text: str, finish=None, logprobs=None) -> str:
            c = {"id": cid, "object": "text_completion", "created": created, "model": cfg.model_name,
                 "system_fingerprint": None,
                 "choices": [{"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}]}
            if include_usage:
                c["usage"] = None
            return "data: " + json.dumps(c, ensure_ascii=False) + "\n\n"

        held_text: list[list[str]] = [[] for _ in choices]  # moderation: chunks held until the choice is scored

        async def sse():
            try:
                if echo:
                    for ch in choices:
                        yield chunk(ch.index, tokenizer.decode(prompts[ch.index // n]))
                async for item in events(queue, reqs, request, poll_disconnect=False):
                    ch = choices[item[0]]
                    if item[1] == "token":
                        text, _ = ch.token(item[2], item[3], item[4])
                        if ch.hit_stop:
                            ch.req.cancel()
                        lp = None
                        if k is not None:
                            top = {token_str(i): v for i, v in (item[4] or [])}
                            lp = {"tokens": [token_str(item[2])], "token_logprobs": [item[3]], "top_logprobs": [top],
                                  "text_offset": [0]}
                        if text or lp is not None:
                            if moderator is not None:
                                held_text[ch.index].append(chunk(ch.index, text, logprobs=lp))
                            else:
                                yield chunk(ch.index, text, logprobs=lp)
                    else:
                        err = finish_error(item[2], ch.req)
                        if err is not None:
                            if moderator is not None:
                                held_text[ch.index].clear()
                            yield "data: " + json.dumps(err.body()) + "\n\n"
                            continue
                        text, _ = ch.done(item[2])
                        if moderator is None:
                            yield chunk(ch.index, text, finish=ch.finish)
                        elif await flagged(prompt_text(ch), "".join(ch.text)):
                            held_text[ch.index].clear()
                            yield chunk(ch.index, refusal, finish="content_filter")
                        else:
                            for s in held_text[ch.index]:
                                yield s
                            held_text[ch.index].clear()
                            yield chunk(ch.index, text, finish=ch.finish)
                if include_usage:
                    yield "data: " + json.dumps({"id": cid, "object": "text_completion", "created": created,
                                                 "model": cfg.model_name, "choices": [], "usage": usage()}) + "\n\n"
                yield "data: [DONE]\n\n"
            finally:
                for r in reqs:
                    if not r.done:
                        r.cancel()

        return StreamingResponse(sse(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    # ------------------------------------------------------------------------------------------ chat page
    @app.get("/")
    async def index():
        from gemma4.serve.page import PAGE

        return HTMLResponse(PAGE, headers={"Content-Security-Policy": "default-src 'self'; script-src 'unsafe-inline'; "
                                           "style-src 'unsafe-inline'", "X-Content-Type-Options": "nosniff"})

    return app


def _tool_call_out(call, k: int) -> dict:
    return {"index": k, "id": "call_" + uuid.uuid4().hex[:24], "type": "function",
            "function": {"name": call.name, "arguments": json.dumps(call.arguments, ensure_ascii=False)}}
