"""Gemma tokenizers on top of the `tokenizers` library.

`load_tokenizer(path)` accepts
* a `tokenizer.json` (Hugging Face `tokenizers` format),
* a SentencePiece `tokenizer.model` (BPE or Unigram; converted in memory),
* a directory holding either of those,
* a `.gguf` file: the vocabulary stored in its metadata. Gemma 4 GGUFs (`tokenizer.ggml.model = "gemma4"`)
  carry BPE merges; Gemma 3 GGUFs (`"llama"`, SentencePiece style) carry per-token scores instead, from
  which equivalent merges are derived.

Gemma's scheme in both generations: no pre-splitting into words, spaces become "▁" before BPE, characters
missing from the vocabulary fall back to `<0xXX>` byte tokens, and control/user-defined tokens such as
`<|turn>` are matched verbatim in the text before BPE sees it.
"""

from __future__ import annotations

import json
import re
import struct
import threading
from pathlib import Path
from typing import Any, Iterable, Sequence

from tokenizers import AddedToken, Regex, decoders, models, normalizers
from tokenizers import Tokenizer as _Backend

from gemma4._util import Gemma4Error, atomic_path
from gemma4.io import GGUFFile, resolve_path
from gemma4.text.chat import ChatPrompt, ChatSegment, render_chat_segments

__all__ = ["Tokenizer", "load_tokenizer", "TokenizerError", "UnknownTokenError"]


class TokenizerError(Gemma4Error, ValueError):
    """A tokenizer file that cannot be read, or input a tokenizer cannot take; the message names the file
    or the value."""


class TokenizerTypeError(TokenizerError, TypeError):
    """A value of the wrong type (bytes instead of text, a non-integer token id)."""


class UnknownTokenError(TokenizerError, KeyError):
    """A token spelling or id that is not in the vocabulary."""

    def __str__(self) -> str:  # KeyError would print the message with quotes around it
        return str(self.args[0]) if self.args else ""


class TokenizerNotFoundError(TokenizerError, FileNotFoundError):
    """No tokenizer file where one was named."""


# Added tokens that are part of the chat format even where a file types them "user defined" rather than
# "control": Gemma 4's <|tool_call>, <|"|>, <|channel> ... (every <|x> / <x|> / <|x|>), and Gemma 3's
# image markers. Text from users, tools and documents never becomes one of these (see encode_segments).
_STRUCTURAL = re.compile(r"<\|.*>|<.*\|>", re.S)
_GEMMA3_STRUCTURAL = frozenset({"<start_of_turn>", "<end_of_turn>", "<start_of_image>", "<end_of_image>", "[multimodal]"})

# Token types shared by GGUF (`tokenizer.ggml.token_type`) and SentencePiece (`SentencePiece.Type`).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# Stop tokens by family: end of text, end of turn, and (Gemma 4) the start of a tool response, where the
# caller must run the tool and feed its result back.
_STOP_TOKEN_NAMES = {
    "gemma4": ("<eos>", "<turn|>", "<|tool_response>"),
    "gemma3": ("<eos>", "<end_of_turn>"),
}


class Tokenizer:
    """Text <-> token ids for a Gemma model, wrapping a `tokenizers.Tokenizer` (see `.backend`).

    The backend never adds special tokens itself; `encode` prepends `<bos>` on request so that callers
    decide explicitly (chat prompts rendered as text already start with `<bos>`).
    """

    def __init__(self, backend: _Backend, *, bos_token: str | None = "<bos>", eos_token: str | None = "<eos>",
                 pad_token: str | None = "<pad>", unk_token: str | None = "<unk>",
                 chat_template: str | None = None, source: str | None = None):
        self.backend = backend
        self.chat_template = chat_template
        self.source = source
        lookup = backend.token_to_id  # (a full get_vocab() copy costs 0.25 s for 262k tokens)
        self.bos_id = lookup(bos_token) if bos_token else None
        self.eos_id = lookup(eos_token) if eos_token else None
        self.pad_id = lookup(pad_token) if pad_token else None
        self.unk_id = lookup(unk_token) if unk_token else None
        # Byte-fallback pieces are spelled <0x00>..<0xFF>; analysis tools count them.
        self.byte_token_ids = frozenset(
            i for i in (lookup(f"<0x{b:02X}>") for b in range(256)) if i is not None)
        if lookup("<|turn>") is not None:
            self.family = "gemma4"
        elif lookup("<start_of_turn>") is not None:
            self.family = "gemma3"
        else:
            self.family = None
        names = _STOP_TOKEN_NAMES.get(self.family, (eos_token,))
        self.stop_token_ids = [lookup(n) for n in names if n and lookup(n) is not None]
        added = backend.get_added_tokens_decoder()
        control = {i: t.content for i, t in added.items()
                   if t.special or _STRUCTURAL.fullmatch(t.content) or t.content in _GEMMA3_STRUCTURAL}
        self.control_token_ids: frozenset[int] = frozenset(control)
        self.control_tokens: frozenset[str] = frozenset(control.values())
        self._benign_added = [t for i, t in sorted(added.items()) if i not in control]
        self._text_backend: _Backend | None = None
        self._lock = threading.Lock()

    # ------------------------------------------------------------------------------------------ info
    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    @property
    def special_tokens(self) -> dict[str, int]:
        """Every token matched verbatim in text (control and user-defined tokens), name -> id."""
        return {t.content: i for i, t in self.backend.get_added_tokens_decoder().items()}

    def token_to_id(self, name: str) -> int:
        """Id of a token by its exact spelling, e.g. `"<turn|>"` or `"▁the"`."""
        token_id = self.backend.token_to_id(name) if isinstance(name, str) else None
        if token_id is None:
            raise UnknownTokenError(f"unknown token {name!r}: it is not in this tokenizer's vocabulary "
                                    f"({self.vocab_size} tokens)")
        return token_id

    def id_to_token(self, token_id: int) -> str:
        i = _token_id(token_id)
        token = self.backend.id_to_token(i) if 0 <= i < self.vocab_size else None
        if token is None:
            raise UnknownTokenError(f"token id {token_id} is outside the vocabulary (size {self.vocab_size})")
        return token

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, family={self.family!r}, source={self.source!r})"

    # ------------------------------------------------------------------------------------------ encode
    # Control-token hygiene. A control token (<bos>, <|turn>, <turn|>, <|tool_call>, <|"|>, Gemma 3's
    # <start_of_turn> ... see `control_tokens`) must only ever come from the chat template; text written by
    # users, tools, documents or system prompts is encoded as text even when it spells a control token
    # ("<turn|>" typed by a user becomes the pieces "<", "turn", "|>"), or it could forge turns.
    #
    # * `encode_chat(messages, ...)` / `encode(render_chat(...))`: the safe way to build a prompt; message
    #   content is plain text, the template's control tokens are real.
    # * `encode_segments(segments)`: the same for pre-split text (ChatSegment: template or content).
    # * `encode(text)` on a plain str: a trusted raw prompt; control-token spellings in it ARE control tokens
    #   (the `tokenizers` library's and llama.cpp's behaviour for raw prompts, and what the CLI's raw prompt,
    #   the completions endpoint and hand-written test prompts need). Pass `allow_special=False` for free
    #   text from anyone else (documents for training, tool output outside a chat).
    # Why a raw str keeps its control tokens by default: the place where untrusted text meets the template,
    # the chat prompt, is protected by construction (render_chat returns a ChatPrompt that encode
    # recognises), while flipping the default for a str would silently turn the control tokens of every
    # existing raw prompt into text; decode(encode(x)) == x either way, so nothing would notice.

    def encode(self, text: str, add_bos: bool = True, *, allow_special: bool | None = None) -> list[int]:
        """Token ids of ``text`` (with ``<bos>`` first unless ``add_bos=False``).

        allow_special: None (default): a ``ChatPrompt`` from ``render_chat`` keeps its message content as
        text; a plain ``str`` is a trusted raw prompt whose control-token spellings become control tokens.
        False: all of ``text`` is plain text (no control token can come out). True: control tokens are
        parsed everywhere, even inside a ChatPrompt's message content (the old, unsafe behaviour)."""
        if not isinstance(text, str):
            raise TokenizerTypeError(f"encode expects str, got {type(text).__name__}")
        if allow_special not in (None, True, False) or isinstance(allow_special, int) and not isinstance(allow_special, bool):
            raise TokenizerTypeError(f"allow_special must be None, True or False, got {allow_special!r}")
        if allow_special is None and isinstance(text, ChatPrompt):
            return self.encode_segments(text.segments, add_bos=add_bos)
        if allow_special is False:
            return self.encode_segments([ChatSegment(text, False)], add_bos=add_bos)
        ids = self.backend.encode(str(text), add_special_tokens=False).ids
        return self._with_bos(ids, add_bos)

    def encode_batch(self, texts: Sequence[str], add_bos: bool = True, *,
                     allow_special: bool | None = None) -> list[list[int]]:
        if isinstance(texts, str):
            raise TokenizerTypeError("encode_batch expects a list of str, not one str")
        texts = list(texts)
        for t in texts:
            if not isinstance(t, str):
                raise TokenizerTypeError(f"encode_batch expects a list of str, got an item of type {type(t).__name__}")
        if allow_special is not None or any(isinstance(t, ChatPrompt) for t in texts):
            return [self.encode(t, add_bos, allow_special=allow_special) for t in texts]
        encs = self.backend.encode_batch(texts, add_special_tokens=False)
        return [self._with_bos(e.ids, add_bos) for e in encs]

    def encode_chat(self, messages: list[dict], tools: list | None = None, *, add_generation_prompt: bool = True,
                    enable_thinking: bool = False, style: str | None = None, template=None,
                    **template_vars: Any) -> list[int]:
        """Render a conversation and encode it, with control tokens only from the template.

        The ids start with ``<bos>`` (the template writes it). ``style``: "gemma4" or "gemma3" (default: this
        tokenizer's family); ``template``: a Jinja chat template instead of the built-in renderer (then the
        control-token spellings found in the messages are protected, see ``render_chat_segments``).
        Equal to ``encode(render_chat(...), add_bos=False, allow_special=True)`` whenever no message text
        spells a control token."""
        style = style or (self.family if self.family in ("gemma3", "gemma4") else "gemma4")
        bos = self.id_to_token(self.bos_id) if self.bos_id is not None else ""
        segments = render_chat_segments(messages, tools, add_generation_prompt, enable_thinking, template, style,
                                        bos, control_tokens=self.control_tokens, **template_vars)
        return self.encode_segments(segments)

    def encode_segments(self, segments: Iterable[ChatSegment | tuple], add_bos: bool = False, *,
                        return_offsets: bool = False):
        """Encode text pieces of which some are template (control tokens parsed) and some content (always
        plain text): ``ChatSegment(text, template, message)`` or ``(text, template)`` pairs.

        When no content spells a control token the result is exactly the encoding of the joined text (so
        prompts tokenize the way the model was trained). Otherwise the text is cut at the template's control
        tokens and every stretch in between, content included, is encoded as text, with a copy of the
        vocabulary that matches no control token.

        ``return_offsets=True`` returns ``(ids, offsets)``: each token's (start, end) character span in the
        joined text (``<bos>`` added by ``add_bos`` gets (0, 0)), so a caller can map tokens back to segments
        and messages (e.g. to mark the assistant's tokens as training targets)."""
        segs = []
        for seg in segments:
            text, template = seg[0], seg[1]
            if not isinstance(text, str):
                raise TokenizerTypeError(f"segment text must be str, got {type(text).__name__}")
            segs.append((text, bool(template)))
        full = "".join(t for t, _ in segs)
        enc = self.backend.encode(full, add_special_tokens=False)
        content, pos = [], 0
        for text, template in segs:
            if not template and text:
                content.append((pos, pos + len(text)))
            pos += len(text)
        if not self._control_in(enc, content):
            ids, offsets = list(enc.ids), [tuple(o) for o in enc.offsets]
        else:  # slow path: some content spells a control token
            ids, offsets = [], []
            run: list[str] = []
            run_start = pos = 0

            def flush() -> None:
                text = "".join(run)
                i, o = self._plain(text)
                ids.extend(i)
                offsets.extend((a + run_start, b + run_start) for a, b in o)
                run.clear()

            for text, template in segs:
                if template:
                    t_enc = self.backend.encode(text, add_special_tokens=False)
                    cut = 0
                    for tid, (a, b) in zip(t_enc.ids, t_enc.offsets):
                        if tid in self.control_token_ids:
                            run.append(text[cut:a])
                            flush()
                            ids.append(tid)
                            offsets.append((pos + a, pos + b))
                            cut, run_start = b, pos + b
                    run.append(text[cut:])
                else:
                    run.append(text)
                pos += len(text)
            flush()
        if add_bos:
            ids = self._with_bos(ids, True)
            offsets = [(0, 0), *offsets]
        return (ids, offsets) if return_offsets else ids

    def _control_in(self, enc, ranges: list[tuple[int, int]]) -> bool:
        """Whether any control token of ``enc`` covers a character of the content ``ranges``."""
        if not ranges:
            return False
        import bisect

        starts = [a for a, _ in ranges]
        for tid, (a, b) in zip(enc.ids, enc.offsets):
            if tid in self.control_token_ids:
                k = bisect.bisect_right(starts, b - 1) - 1  # the last content range starting before b
                if k >= 0 and ranges[k][1] > a:
                    return True
        return False

    def _plain(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """``text`` as plain text (control-token spellings become ordinary pieces): ids and offsets."""
        if not text:
            return [], []
        enc = self.backend.encode(text, add_special_tokens=False)
        if not any(i in self.control_token_ids for i in enc.ids):
            return list(enc.ids), [tuple(o) for o in enc.offsets]
        enc = self._text().encode(text, add_special_tokens=False)
        bad = [i for i in enc.ids if i in self.control_token_ids]
        if bad:  # only a vocabulary whose merges build a control token could get here
            raise TokenizerError(f"this vocabulary's merges build the control token "
                                 f"{self.backend.id_to_token(bad[0])!r} from plain text; cannot encode it as text")
        return list(enc.ids), [tuple(o) for o in enc.offsets]

    def _text(self) -> _Backend:
        """The same model, normalizer and pre-tokenizer, knowing only the harmless added tokens (Gemma 3's
        whitespace runs and HTML tags, ...). Shares the model with ``backend``: built in microseconds."""
        with self._lock:
            if self._text_backend is None:
                tk = _Backend(self.backend.model)
                for attr in ("normalizer", "pre_tokenizer", "decoder"):
                    v = getattr(self.backend, attr)
                    if v is not None:
                        setattr(tk, attr, v)
                tk.add_tokens(self._benign_added)
                self._text_backend = tk
            return self._text_backend

    def tokenize(self, text: str) -> list[str]:
        """The pieces (token strings) of `text`, without `<bos>`."""
        if not isinstance(text, str):
            raise TokenizerTypeError(f"tokenize expects str, got {type(text).__name__}")
        return self.backend.encode(text, add_special_tokens=False).tokens

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Ids (without `<bos>`) and the character span of `text` each token covers."""
        if not isinstance(text, str):
            raise TokenizerTypeError(f"encode_with_offsets expects str, got {type(text).__name__}")
        enc = self.backend.encode(text, add_special_tokens=False)
        return enc.ids, enc.offsets

    def _with_bos(self, ids: list[int], add_bos: bool) -> list[int]:
        if not add_bos:
            return list(ids)
        if self.bos_id is None:
            raise TokenizerError("this tokenizer has no <bos> token; call encode(..., add_bos=False)")
        return [self.bos_id, *ids]

    # ------------------------------------------------------------------------------------------ decode
    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        if isinstance(ids, (str, bytes)):
            raise TokenizerTypeError(f"decode expects token ids, got {type(ids).__name__}")
        ids = [_token_id(i) for i in ids]
        n = self.vocab_size
        bad = [i for i in ids if not 0 <= i < n]
        if bad:
            raise TokenizerError(f"token id {bad[0]} is outside the vocabulary (size {n})")
        return self.backend.decode(ids, skip_special_tokens=skip_special_tokens)

    def decode_batch(self, batch: Iterable[Iterable[int]], skip_special_tokens: bool = False) -> list[str]:
        return [self.decode(ids, skip_special_tokens) for ids in batch]

    def save(self, path: str | Path) -> None:
        """Write the backend as a `tokenizer.json`, atomically (a crash leaves the old file or the new one)."""
        with atomic_path(path) as tmp:
            self.backend.save(str(tmp))


def _token_id(value) -> int:
    """An int token id (numpy / torch integer scalars too); never a float, bool or string."""
    if isinstance(value, bool) or not hasattr(value, "__index__"):
        raise TokenizerTypeError(f"token ids are integers, got {value!r:.50}")
    return value.__index__()


# ============================================================================================ building


def _gemma_backend(model, tokens: Sequence[str], types: Sequence[int], *, space_prefix: bool = False,
                   sp_normalizer=None) -> _Backend:
    """Wrap a BPE/Unigram model with Gemma's normalizer, decoder and verbatim-matched tokens."""
    tk = _Backend(model)
    steps = [sp_normalizer] if sp_normalizer is not None else []
    if space_prefix:
        steps.append(normalizers.Prepend(" "))
    steps.append(normalizers.Replace(" ", "▁"))
    tk.normalizer = steps[0] if len(steps) == 1 else normalizers.Sequence(steps)
    decode_steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if space_prefix:
        decode_steps.append(decoders.Strip(" ", 1, 0))
    tk.decoder = decoders.Sequence(decode_steps)
    # Control tokens (<bos>, <|turn>, ...) are "special": `decode(skip_special_tokens=True)` drops them.
    # User-defined ones (<|tool_call>, <|"|>, Gemma 3's "<table>" or space runs) are kept when decoding.
    # normalized=False: they are matched against the raw text, before spaces turn into "▁".
    added = [AddedToken(tokens[i], special=(types[i] == CONTROL), normalized=False)
             for i in range(len(tokens)) if types[i] in (CONTROL, USER_DEFINED)]
    tk.add_tokens(added)
    return tk


def _merges_from_scores(tokens: Sequence[str], scores: Sequence[float], types: Sequence[int]):
    """BPE merges equivalent to SentencePiece's score-driven BPE.

    SentencePiece merges, at each step, the adjacent pair whose concatenation is the highest-scoring
    vocabulary piece. Listing every split (a, b) of every normal piece, ordered by the piece's score,
    gives a rank-based merge list that makes the same choices.
    """
    mergeable = {t for t, ty in zip(tokens, types) if ty == NORMAL}
    order = sorted((i for i, ty in enumerate(types) if ty == NORMAL), key=lambda i: (-scores[i], i))
    merges = []
    for i in order:
        piece = tokens[i]
        if len(piece) > _MAX_PIECE:
            # Real pieces are short (Gemma 3: at most 16 characters); every split of a huge one would cost
            # quadratic time, so a file with such a piece is refused rather than ground through.
            raise TokenizerError(f"vocabulary piece {i} is {len(piece)} characters long (more than {_MAX_PIECE})")
        for k in range(1, len(piece)):
            a, b = piece[:k], piece[k:]
            if a in mergeable and b in mergeable:
                merges.append((a, b))
    return merges


def _unk_token(tokens, types) -> str | None:
    for t, ty in zip(tokens, types):
        if ty == UNKNOWN:
            return t
    return "<unk>" if "<unk>" in tokens else None


def _bpe(tokens, merges, types, byte_fallback=True):
    vocab = {}
    for i, t in enumerate(tokens):
        vocab.setdefault(t, i)  # a duplicated spelling keeps its first id, like llama.cpp
    return models.BPE(vocab=vocab, merges=merges, unk_token=_unk_token(tokens, types), fuse_unk=True,
                      byte_fallback=byte_fallback)


def build_from_vocab(tokens: Sequence[str], types: Sequence[int], *, merges=None, scores=None,
                     space_prefix: bool = False, unigram: bool = False, byte_fallback: bool = True,
                     sp_normalizer=None) -> _Backend:
    """A backend from a raw vocabulary: BPE with `merges`, BPE derived from `scores`, or Unigram."""
    tokens, types = list(tokens), [int(t) for t in types]
    if len(tokens) != len(types):
        raise TokenizerError(f"vocabulary has {len(tokens)} tokens but {len(types)} token types")
    if unigram:
        if scores is None:
            raise TokenizerError("a Unigram vocabulary needs scores")
        unk = _unk_token(tokens, types)
        model = models.Unigram([(t, float(s)) for t, s in zip(tokens, scores)],
                               unk_id=tokens.index(unk) if unk else None, byte_fallback=byte_fallback)
    elif merges is not None:
        pairs = []
        for m in merges:
            a, sep, b = m.partition(" ") if isinstance(m, str) else (m[0], " ", m[1])
            if not sep:
                raise TokenizerError(f"malformed merge {m!r:.80}: expected two pieces separated by one space")
            pairs.append((a, b))
        model = _bpe(tokens, pairs, types, byte_fallback)
    elif scores is not None:
        model = _bpe(tokens, _merges_from_scores(tokens, [float(s) for s in scores], types), types,
                     byte_fallback)
    else:
        raise TokenizerError("a BPE vocabulary needs either merges or scores")
    return _gemma_backend(model, tokens, types, space_prefix=space_prefix, sp_normalizer=sp_normalizer)


# ================================================================================================ GGUF

def _from_gguf(path: Path) -> Tokenizer:
    meta = GGUFFile(path).fields  # the one GGUF reader (gemma4.io.gguf)

    def get(key: str, kind, default=None, what: str = ""):
        v = meta.get(key, default)
        if v is not None and not kind(v):
            raise TokenizerError(f"{path}: {key} is {v!r:.80} ({type(v).__name__}), expected {what}")
        return v

    def str_list(v):
        return isinstance(v, list) and all(isinstance(x, str) for x in v)

    def int_list(v):
        return isinstance(v, list) and all(isinstance(x, int) and not isinstance(x, bool) for x in v)

    def num_list(v):
        return isinstance(v, list) and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v)

    kind = get("tokenizer.ggml.model", lambda v: isinstance(v, str), what="a string")
    tokens = get("tokenizer.ggml.tokens", str_list, what="a list of strings")
    if kind is None or tokens is None:
        raise TokenizerError(f"{path}: GGUF file has no tokenizer vocabulary (no tokenizer.ggml.* keys)")
    if not tokens:
        raise TokenizerError(f"{path}: tokenizer.ggml.tokens is empty")
    types = get("tokenizer.ggml.token_type", int_list, what="a list of integers") or [NORMAL] * len(tokens)
    merges = get("tokenizer.ggml.merges", str_list, what="a list of strings")
    scores = get("tokenizer.ggml.scores", num_list, what="a list of numbers")
    if scores is not None and len(scores) != len(tokens):
        raise TokenizerError(f"{path}: {len(scores)} scores for {len(tokens)} tokens")
    space = get("tokenizer.ggml.add_space_prefix", lambda v: isinstance(v, bool), what="true or false")
    template = get("tokenizer.chat_template", lambda v: isinstance(v, str), what="a string")
    if kind == "gemma4" or (kind == "gpt2" and merges and "<0x00>" in tokens):
        if not merges:
            raise TokenizerError(f"{path}: tokenizer model {kind!r} needs tokenizer.ggml.merges, which is missing")
        backend = _build(path, lambda: build_from_vocab(tokens, types, merges=merges, space_prefix=bool(space)))
    elif kind == "llama":
        if scores is None:
            raise TokenizerError(f"{path}: SentencePiece-style ('llama') vocabulary without tokenizer.ggml.scores")
        # llama.cpp adds a leading space for this model type unless the file says otherwise.
        backend = _build(path, lambda: build_from_vocab(tokens, types, scores=scores,
                                                         space_prefix=True if space is None else space))
    else:
        raise TokenizerError(f"{path}: unsupported GGUF tokenizer model {kind!r} (supported: 'gemma4', 'llama')")

    def name(key):
        i = meta.get(f"tokenizer.ggml.{key}_token_id")
        ok = isinstance(i, int) and not isinstance(i, bool) and 0 <= i < len(tokens)
        return tokens[i] if ok else None

    return _build(path, lambda: Tokenizer(backend, bos_token=name("bos"), eos_token=name("eos"),
                                          pad_token=name("padding"), unk_token=name("unknown") or _unk_token(tokens, types),
                                          chat_template=template, source=str(path)))


def _build(path: Path, fn):
    """Run a `tokenizers` construction step on data from a file, turning its failures (including the
    Rust panics pyo3 raises as BaseException) into a TokenizerError naming the file."""
    try:
        return fn()
    except TokenizerError as e:
        raise TokenizerError(f"{path}: {e}") from None
    except (KeyboardInterrupt, SystemExit, GeneratorExit):
        raise
    except BaseException as e:  # noqa: BLE001 - pyo3's PanicException derives from BaseException
        raise TokenizerError(f"{path}: cannot build a tokenizer from this vocabulary: {type(e).__name__}: "
                             f"{str(e)[:200]}") from None


# ================================================================================== SentencePiece .model


_MAX_PIECE = 1024


def _varint(buf: bytes, off: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if off >= len(buf):
            raise TokenizerError("truncated protobuf varint")
        if shift > 63:
            raise TokenizerError("protobuf varint longer than 10 bytes")
        b = buf[off]
        off += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, off
        shift += 7


def _proto_fields(buf: bytes):
    """Yield (field number, wire type, value) of one protobuf message (enough of the wire format for
    SentencePiece's model file; avoids depending on the `protobuf` package)."""
    off = 0
    while off < len(buf):
        tag, off = _varint(buf, off)
        field, wire = tag >> 3, tag & 7
        if wire == 0:
            value, off = _varint(buf, off)
        elif wire == 1:
            value, off = buf[off:off + 8], off + 8
        elif wire == 2:
            n, off = _varint(buf, off)
            value, off = buf[off:off + n], off + n
        elif wire == 5:
            value, off = buf[off:off + 4], off + 4
        else:
            raise TokenizerError(f"unsupported protobuf wire type {wire}")
        if off > len(buf):
            raise TokenizerError("truncated protobuf message")
        yield field, wire, value


def _signed32(v: int) -> int:
    v &= 0xFFFFFFFF
    return v - (1 << 32) if v >= 1 << 31 else v


def _from_sentencepiece(path: Path) -> Tokenizer:
    try:
        data = path.read_bytes()
    except OSError as e:
        raise TokenizerError(f"cannot read {path}: {e}") from None
    tokens, scores, types = [], [], []
    trainer = {3: 1, 35: 0, 40: 0, 41: 1, 42: 2, 43: -1}  # model_type UNIGRAM, no byte fallback, ids
    norm = {1: "", 2: b"", 3: 1, 4: 1, 5: 1}  # name, charsmap, dummy prefix, strip extra ws, escape ws
    try:
        for field, _, value in _proto_fields(data):
            if field == 1:  # SentencePiece piece
                piece, score, ty = "", 0.0, NORMAL
                for f, _, v in _proto_fields(value):
                    if f == 1:
                        piece = v.decode("utf-8")
                    elif f == 2:
                        score = struct.unpack("<f", v)[0]
                    elif f == 3:
                        ty = v
                tokens.append(piece)
                scores.append(score)
                types.append(ty)
            elif field == 2:
                for f, _, v in _proto_fields(value):
                    if f in trainer:
                        trainer[f] = _signed32(v)
            elif field == 3:
                for f, _, v in _proto_fields(value):
                    if f in norm:
                        norm[f] = v.decode("utf-8") if f == 1 else v
    except (TokenizerError, UnicodeDecodeError, struct.error, AttributeError, TypeError) as e:
        raise TokenizerError(f"{path}: not a valid SentencePiece model file ({e})") from None
    if not tokens:
        raise TokenizerError(f"{path}: not a SentencePiece model file (no pieces found)")
    model_type = trainer[3]
    if model_type not in (1, 2):
        raise TokenizerError(f"{path}: SentencePiece model type {model_type} is not supported (1=Unigram, 2=BPE)")

    steps = []
    if norm[2]:
        steps.append(normalizers.Precompiled(norm[2]))
    if norm[4]:  # SentencePiece trims the ends and collapses inner runs of spaces
        steps += [normalizers.Strip(left=True, right=True), normalizers.Replace(Regex(" {2,}"), " ")]
    if not norm[5]:
        raise TokenizerError(f"{path}: SentencePiece models without whitespace escaping are not supported")
    sp_norm = None if not steps else (steps[0] if len(steps) == 1 else normalizers.Sequence(steps))
    backend = _build(path, lambda: build_from_vocab(tokens, types, scores=scores, unigram=model_type == 1,
                                                     byte_fallback=bool(trainer[35]), space_prefix=bool(norm[3]),
                                                     sp_normalizer=sp_norm))

    def name(i):
        return tokens[i] if 0 <= i < len(tokens) else None

    return _build(path, lambda: Tokenizer(backend, bos_token=name(trainer[41]), eos_token=name(trainer[42]),
                                          pad_token=name(trainer[43]), unk_token=name(trainer[40]), source=str(path)))


# ============================================================================================== public


def _from_json(path: Path) -> Tokenizer:
    try:
        backend = _Backend.from_file(str(path))
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as e:  # noqa: BLE001 - pyo3's PanicException derives from BaseException
        raise TokenizerError(f"{path}: not a valid tokenizer.json ({type(e).__name__}: {str(e)[:200]})") from None
    # A Hugging Face checkpoint keeps special token names and the chat template next to tokenizer.json.
    names = {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>"}
    template = None
    cfg_path = path.parent / "tokenizer_config.json"
    if cfg_path.is_file():
        try:
            cfg = json.loads(cfg_path.read_bytes().decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
            raise TokenizerError(f"{cfg_path} is not valid JSON: {e}") from None
        if not isinstance(cfg, dict):
            raise TokenizerError(f"{cfg_path} holds a JSON {type(cfg).__name__}, not an object")
        for k in names:
            v = cfg.get(k)
            if isinstance(v, dict):
                v = v.get("content")
            if isinstance(v, str):
                names[k] = v
        if isinstance(cfg.get("chat_template"), str):
            template = cfg["chat_template"]
    jinja = path.parent / "chat_template.jinja"
    if jinja.is_file():
        try:
            template = jinja.read_bytes().decode("utf-8")
        except UnicodeDecodeError as e:
            raise TokenizerError(f"{jinja} is not UTF-8 text: {e}") from None
    return _build(path, lambda: Tokenizer(backend, chat_template=template, source=str(path), **names))


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load a tokenizer from a `tokenizer.json`, a SentencePiece `.model`, a `.gguf`, a checkpoint
    directory, or anything ``load_pretrained`` accepts by name (``"gemma3-270m"``, a hub id)."""
    path = resolve_path(path)
    if path.is_dir():
        for name in ("tokenizer.json", "tokenizer.model"):
            if (path / name).is_file():
                return load_tokenizer(path / name)
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return load_tokenizer(ggufs[0])
        raise TokenizerNotFoundError(f"{path}: no tokenizer.json, tokenizer.model or single .gguf file in this directory")
    if not path.is_file():
        raise TokenizerNotFoundError(f"tokenizer file not found: {path}")
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError as e:
        raise TokenizerError(f"cannot read {path}: {e}") from None
    if head == b"GGUF" or path.suffix == ".gguf":
        return _from_gguf(path)
    if path.suffix == ".json" or head[:1] == b"{":
        return _from_json(path)
    return _from_sentencepiece(path)
