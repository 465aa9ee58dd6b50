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
import struct
from pathlib import Path
from typing import Iterable, Sequence

from tokenizers import AddedToken, Regex, decoders, models, normalizers
from tokenizers import Tokenizer as _Backend

from gemma4._util import Gemma4Error, atomic_path
from gemma4.io import GGUFFile, resolve_path

__all__ = ["Tokenizer", "load_tokenizer"]

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
            raise KeyError(f"unknown token {name!r}: it is not in this tokenizer's vocabulary "
                           f"({self.vocab_size} tokens)")
        return token_id

    def id_to_token(self, token_id: int) -> str:
        token = self.backend.id_to_token(int(token_id))
        if token is None:
            raise KeyError(f"token id {token_id} is outside the vocabulary (size {self.vocab_size})")
        return token

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, family={self.family!r}, source={self.source!r})"

    # ------------------------------------------------------------------------------------------ encode
    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"encode expects str, got {type(text).__name__}")
        ids = self.backend.encode(text, add_special_tokens=False).ids
        return self._with_bos(ids, add_bos)

    def encode_batch(self, texts: Sequence[str], add_bos: bool = True) -> list[list[int]]:
        texts = list(texts)
        for t in texts:
            if not isinstance(t, str):
                raise TypeError(f"encode_batch expects a list of str, got an item of type {type(t).__name__}")
        encs = self.backend.encode_batch(texts, add_special_tokens=False)
        return [self._with_bos(e.ids, add_bos) for e in encs]

    def tokenize(self, text: str) -> list[str]:
        """The pieces (token strings) of `text`, without `<bos>`."""
        return self.backend.encode(text, add_special_tokens=False).tokens

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Ids (without `<bos>`) and the character span of `text` each token covers."""
        enc = self.backend.encode(text, add_special_tokens=False)
        return enc.ids, enc.offsets

    def _with_bos(self, ids: list[int], add_bos: bool) -> list[int]:
        if not add_bos:
            return list(ids)
        if self.bos_id is None:
            raise ValueError("this tokenizer has no <bos> token; call encode(..., add_bos=False)")
        return [self.bos_id, *ids]

    # ------------------------------------------------------------------------------------------ decode
    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        ids = [int(i) for i in ids]
        n = self.vocab_size
        bad = [i for i in ids if not 0 <= i < n]
        if bad:
            raise ValueError(f"token id {bad[0]} is outside the vocabulary (size {n})")
        return self.backend.decode(ids, skip_special_tokens=skip_special_tokens)

    def decode_batch(self, batch: Iterable[Iterable[int]], skip_special_tokens: bool = False) -> list[str]:
        return [self.decode(ids, skip_special_tokens) for ids in batch]

    def save(self, path: str | Path) -> None:
        """Write the backend as a `tokenizer.json`, atomically (a crash leaves the old file or the new one)."""
        with atomic_path(path) as tmp:
            self.backend.save(str(tmp))


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
        raise ValueError(f"vocabulary has {len(tokens)} tokens but {len(types)} token types")
    if unigram:
        if scores is None:
            raise ValueError("a Unigram vocabulary needs scores")
        unk = _unk_token(tokens, types)
        model = models.Unigram([(t, float(s)) for t, s in zip(tokens, scores)],
                               unk_id=tokens.index(unk) if unk else None, byte_fallback=byte_fallback)
    elif merges is not None:
        pairs = []
        for m in merges:
            a, sep, b = m.partition(" ") if isinstance(m, str) else (m[0], " ", m[1])
            if not sep:
                raise ValueError(f"malformed merge {m!r}: expected two pieces separated by one space")
            pairs.append((a, b))
        model = _bpe(tokens, pairs, types, byte_fallback)
    elif scores is not None:
        model = _bpe(tokens, _merges_from_scores(tokens, [float(s) for s in scores], types), types,
                     byte_fallback)
    else:
        raise ValueError("a BPE vocabulary needs either merges or scores")
    return _gemma_backend(model, tokens, types, space_prefix=space_prefix, sp_normalizer=sp_normalizer)


# ================================================================================================ GGUF

def _from_gguf(path: Path) -> Tokenizer:
    meta = GGUFFile(path).fields  # the one GGUF reader (gemma4.io.gguf)
    kind = meta.get("tokenizer.ggml.model")
    if kind is None or "tokenizer.ggml.tokens" not in meta:
        raise ValueError(f"{path}: GGUF file has no tokenizer vocabulary (no tokenizer.ggml.* keys)")
    tokens = meta["tokenizer.ggml.tokens"]
    types = meta.get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens)
    merges = meta.get("tokenizer.ggml.merges")
    scores = meta.get("tokenizer.ggml.scores")
    if kind == "gemma4" or (kind == "gpt2" and merges and "<0x00>" in tokens):
        if not merges:
            raise ValueError(f"{path}: tokenizer model {kind!r} needs tokenizer.ggml.merges, which is missing")
        backend = build_from_vocab(tokens, types, merges=merges,
                                   space_prefix=meta.get("tokenizer.ggml.add_space_prefix", False))
    elif kind == "llama":
        if scores is None:
            raise ValueError(f"{path}: SentencePiece-style ('llama') vocabulary without tokenizer.ggml.scores")
        # llama.cpp adds a leading space for this model type unless the file says otherwise.
        backend = build_from_vocab(tokens, types, scores=scores,
                                   space_prefix=meta.get("tokenizer.ggml.add_space_prefix", True))
    else:
        raise ValueError(f"{path}: unsupported GGUF tokenizer model {kind!r} (supported: 'gemma4', 'llama')")

    def name(key):
        i = meta.get(f"tokenizer.ggml.{key}_token_id")
        return tokens[i] if i is not None and 0 <= i < len(tokens) else None

    return Tokenizer(backend, bos_token=name("bos"), eos_token=name("eos"), pad_token=name("padding"),
                     unk_token=name("unknown") or _unk_token(tokens, types),
                     chat_template=meta.get("tokenizer.chat_template"), source=str(path))


# ================================================================================== SentencePiece .model


def _varint(buf: bytes, off: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if off >= len(buf):
            raise ValueError("truncated protobuf varint")
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
            raise ValueError(f"unsupported protobuf wire type {wire}")
        if off > len(buf):
            raise ValueError("truncated protobuf message")
        yield field, wire, value


def _signed32(v: int) -> int:
    v &= 0xFFFFFFFF
    return v - (1 << 32) if v >= 1 << 31 else v


def _from_sentencepiece(path: Path) -> Tokenizer:
    data = path.read_bytes()
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
    except (ValueError, UnicodeDecodeError, struct.error) as e:
        raise ValueError(f"{path}: not a valid SentencePiece model file ({e})") from None
    if not tokens:
        raise ValueError(f"{path}: not a SentencePiece model file (no pieces found)")
    model_type = trainer[3]
    if model_type not in (1, 2):
        raise ValueError(f"{path}: SentencePiece model type {model_type} is not supported (1=Unigram, 2=BPE)")

    steps = []
    if norm[2]:
        steps.append(normalizers.Precompiled(norm[2]))
    if norm[4]:  # SentencePiece trims the ends and collapses inner runs of spaces
        steps += [normalizers.Strip(left=True, right=True), normalizers.Replace(Regex(" {2,}"), " ")]
    if not norm[5]:
        raise ValueError(f"{path}: SentencePiece models without whitespace escaping are not supported")
    sp_norm = None if not steps else (steps[0] if len(steps) == 1 else normalizers.Sequence(steps))
    backend = build_from_vocab(tokens, types, scores=scores, unigram=model_type == 1,
                               byte_fallback=bool(trainer[35]), space_prefix=bool(norm[3]), sp_normalizer=sp_norm)

    def name(i):
        return tokens[i] if 0 <= i < len(tokens) else None

    return Tokenizer(backend, bos_token=name(trainer[41]), eos_token=name(trainer[42]),
                     pad_token=name(trainer[43]), unk_token=name(trainer[40]), source=str(path))


# ============================================================================================== public


def _from_json(path: Path) -> Tokenizer:
    try:
        backend = _Backend.from_file(str(path))
    except Exception as e:
        raise ValueError(f"{path}: not a valid tokenizer.json ({e})") from None
    # A Hugging Face checkpoint keeps special token names and the chat template next to tokenizer.json.
    names = {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>"}
    template = None
    cfg_path = path.parent / "tokenizer_config.json"
    if cfg_path.is_file():
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
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
        template = jinja.read_text(encoding="utf-8")
    return Tokenizer(backend, chat_template=template, source=str(path), **names)


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
        raise FileNotFoundError(f"{path}: no tokenizer.json, tokenizer.model or single .gguf file in this directory")
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer file not found: {path}")
    with open(path, "rb") as f:
        head = f.read(4)
    if head == b"GGUF" or path.suffix == ".gguf":
        return _from_gguf(path)
    if path.suffix == ".json" or head[:1] == b"{":
        return _from_json(path)
    return _from_sentencepiece(path)
