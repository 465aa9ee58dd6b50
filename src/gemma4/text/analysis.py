"""How well does a tokenizer fit a text? Fertility, compression and byte fallback, per file and per script.

Definitions (every number is computed from one tokenization of each whole file, without `<bos>`):
* word: a maximal run of non-whitespace characters (so a CJK sentence without spaces is one "word";
  look at chars/token for those scripts);
* pieces of a word: the tokens whose character span overlaps the word (a token that spans two words
  counts for the first); tokens covering only whitespace belong to no word;
* fertility: pieces per word, averaged over words (1.0 = every word is a single token);
* bytes/token and chars/token: UTF-8 bytes and characters of the text per token (higher = better compression);
* byte fallback: share of tokens that are raw `<0xXX>` bytes, i.e. characters the vocabulary lacks.
A word's script is the Unicode script most of its letters belong to (digits / symbols when it has none).

CLI: `gemma4 tokens analyze FILE...` and `gemma4 tokens train FILE... --heldout FILE` (see `--help`).
"""

from __future__ import annotations

import bisect
import json
import re
import unicodedata
from collections import Counter
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Mapping, Sequence

from gemma4._util import atomic_write_text
from gemma4.io import assets
from gemma4.io.house import CONTROL_TOKENS
from gemma4.text.tokenizer import Tokenizer, load_tokenizer

__all__ = ["Stats", "Report", "analyze", "compare_reports", "read_text_file", "train_bpe", "plot_pieces",
           "register"]

_WORD = re.compile(r"\S+")


@dataclass
class Stats:
    """Counts for one group of text (a file, a script, or everything)."""

    name: str
    words: int = 0
    tokens: int = 0
    word_tokens: int = 0
    chars: int = 0
    bytes: int = 0
    byte_tokens: int = 0
    pieces_hist: Counter = field(default_factory=Counter)  # pieces per word -> number of words
    split_words: dict = field(default_factory=dict)  # word -> its pieces (for the most-split list)

    @property
    def fertility(self) -> float:
        return self.word_tokens / self.words if self.words else 0.0

    @property
    def bytes_per_token(self) -> float:
        return self.bytes / self.tokens if self.tokens else 0.0

    @property
    def chars_per_token(self) -> float:
        return self.chars / self.tokens if self.tokens else 0.0

    @property
    def byte_fallback_share(self) -> float:
        return self.byte_tokens / self.tokens if self.tokens else 0.0

    @property
    def single_token_share(self) -> float:
        return self.pieces_hist.get(1, 0) / self.words if self.words else 0.0

    def most_split(self, n: int = 10) -> list[tuple[str, list[str]]]:
        ranked = sorted(self.split_words.items(), key=lambda kv: (-len(kv[1]), kv[0]))
        return ranked[:n]

    def to_dict(self, top: int = 10) -> dict:
        return {
            "name": self.name, "words": self.words, "tokens": self.tokens, "chars": self.chars, "bytes": self.bytes,
            "fertility": round(self.fertility, 4), "bytes_per_token": round(self.bytes_per_token, 4),
            "chars_per_token": round(self.chars_per_token, 4),
            "byte_fallback_share": round(self.byte_fallback_share, 4),
            "single_token_word_share": round(self.single_token_share, 4),
            "pieces_per_word_histogram": {str(k): v for k, v in sorted(self.pieces_hist.items())},
            "most_split_words": [{"word": w, "pieces": p} for w, p in self.most_split(top)],
        }

    def _add_word(self, word: str, pieces: list[str], n_byte: int) -> None:
        self.words += 1
        self.word_tokens += len(pieces)
        self.tokens += len(pieces)
        self.chars += len(word)
        self.bytes += len(word.encode("utf-8"))
        self.byte_tokens += n_byte
        self.pieces_hist[len(pieces)] += 1
        if len(pieces) > 1:
            self.split_words.setdefault(word, pieces)


@dataclass
class Report:
    tokenizer: str
    files: dict[str, Stats]
    scripts: dict[str, Stats]
    total: Stats

    def to_dict(self, top: int = 10) -> dict:
        return {"tokenizer": self.tokenizer, "total": self.total.to_dict(top),
                "files": {k: v.to_dict(top) for k, v in self.files.items()},
                "scripts": {k: v.to_dict(top) for k, v in self.scripts.items()}}


# ------------------------------------------------------------------------------------------- scripts

_SCRIPT_ALIASES = {"CJK": "Han", "HIRAGANA": "Kana", "KATAKANA": "Kana", "HANGUL": "Hangul",
                   "FULLWIDTH": "Latin", "MODIFIER": "Latin"}


@lru_cache(maxsize=65536)
def char_script(ch: str) -> str:
    """A coarse Unicode script for one character, from its character name ("CYRILLIC SMALL LETTER A")."""
    cat = unicodedata.category(ch)
    if cat[0] == "L":
        first = unicodedata.name(ch, "UNKNOWN").split(" ")[0]
        return _SCRIPT_ALIASES.get(first, first.title())
    if cat[0] == "N":
        return "Digits"
    if cat in ("So", "Sk", "Cs") or cat == "Cn":
        return "Symbols/emoji"
    return "Punctuation"


def word_script(word: str) -> str:
    letters = Counter(char_script(c) for c in word if unicodedata.category(c)[0] == "L")
    if letters:
        return letters.most_common(1)[0][0]
    kinds = Counter(char_script(c) for c in word)
    for kind in ("Digits", "Symbols/emoji"):
        if kinds[kind]:
            return kind
    return "Punctuation"


# ------------------------------------------------------------------------------------------ analysis


def analyze(tokenizer: Tokenizer, texts_by_name: Mapping[str, str], top: int = 10) -> Report:
    """Tokenize each named text once and gather per-file, per-script and overall statistics."""
    if not texts_by_name:
        raise ValueError("nothing to analyze: no texts given")
    files: dict[str, Stats] = {}
    scripts: dict[str, Stats] = {}
    total = Stats("all")
    for name, text in texts_by_name.items():
        if not isinstance(text, str):
            raise TypeError(f"{name}: expected text (str), got {type(text).__name__}")
        if not text.strip():
            raise ValueError(f"{name}: empty text (nothing to tokenize)")
        ids, offsets = tokenizer.encode_with_offsets(text)
        pieces = tokenizer.backend.encode(text, add_special_tokens=False).tokens
        byte_ids = tokenizer.byte_token_ids
        words = [(m.start(), m.end()) for m in _WORD.finditer(text)]
        ends = [e for _, e in words]
        per_word: list[list[int]] = [[] for _ in words]
        for k, (s, e) in enumerate(offsets):
            w = bisect.bisect_right(ends, s)  # first word ending after the token starts
            if w < len(words) and words[w][0] < max(e, s + 1):
                per_word[w].append(k)
        stats = files[name] = Stats(name)
        for (s, e), toks in zip(words, per_word):
            if not toks:  # cannot happen for non-empty words; guard against odd offsets
                continue
            word = text[s:e]
            word_pieces = [pieces[k] for k in toks]
            n_byte = sum(ids[k] in byte_ids for k in toks)
            script = word_script(word)
            group = scripts.setdefault(script, Stats(script))
            for target in (stats, group, total):
                target._add_word(word, word_pieces, n_byte)
        # File and overall totals also count whitespace-only tokens and all characters.
        extra_tokens = len(ids) - stats.word_tokens
        extra_bytes = sum(ids[k] in byte_ids for k in range(len(ids))) - stats.byte_tokens
        for target in (stats, total):
            target.tokens += extra_tokens
            target.byte_tokens += extra_bytes
        stats_chars, stats_bytes = len(text), len(text.encode("utf-8"))
        total.chars += stats_chars - stats.chars
        total.bytes += stats_bytes - stats.bytes
        stats.chars, stats.bytes = stats_chars, stats_bytes
    return Report(tokenizer.source or "tokenizer", files, dict(sorted(scripts.items())), total)


def compare_reports(a: Report, b: Report) -> dict:
    """Side-by-side numbers per file and per script; `change` is B relative to A, in percent."""
    def row(sa: Stats | None, sb: Stats | None):
        out = {}
        for metric in ("fertility", "bytes_per_token", "chars_per_token", "byte_fallback_share"):
            va = getattr(sa, metric) if sa else None
            vb = getattr(sb, metric) if sb else None
            change = (vb - va) / va * 100 if va and vb is not None else None
            out[metric] = {"a": va, "b": vb, "change_pct": change}
        return out

    return {
        "a": a.tokenizer, "b": b.tokenizer,
        "total": row(a.total, b.total),
        "files": {k: row(a.files.get(k), b.files.get(k)) for k in a.files},
        "scripts": {k: row(a.scripts.get(k), b.scripts.get(k)) for k in sorted(set(a.scripts) | set(b.scripts))},
    }


def read_text_file(path: str | Path) -> str:
    """UTF-8 text of a file, with errors that name the file and the offending byte."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: invalid UTF-8 at byte {e.start} ({data[e.start:e.start + 4]!r}); "
                         "convert the file to UTF-8 first") from None
    if not text.strip():
        raise ValueError(f"{path}: empty text (nothing to tokenize)")
    return text


# ------------------------------------------------------------------------------------------- training


def train_bpe(texts: Sequence[str], vocab_size: int, min_frequency: int = 2,
              split_punctuation: bool = False) -> Tokenizer:
    """Train a Gemma-style BPE (spaces as '▁', byte fallback) on domain text with `tokenizers`.

    Unlike Gemma's own tokenizer, training splits words at spaces so merges stay within words; rare
    characters outside the learned alphabet fall back to the 256 `<0xXX>` byte tokens.
    ``split_punctuation``: punctuation never merges with the letters before it ("▁bin," is "▁bin" + ","),
    as SentencePiece's script split keeps it apart in Gemma's own vocabulary. Without it a word that
    the corpus often shows before a comma gets a "word," piece, so the same word is one token in a
    sentence's middle and another before a comma.
    """
    from tokenizers import Regex, decoders, models, normalizers, pre_tokenizers, trainers
    from tokenizers import Tokenizer as Backend

    specials = ["<pad>", "<eos>", "<bos>", "<unk>"] + [f"<0x{b:02X}>" for b in range(256)]
    if vocab_size < len(specials) + 40:
        raise ValueError(f"vocab size {vocab_size} is too small: {len(specials)} ids are reserved for special "
                         f"and byte tokens; use at least {len(specials) + 40}")
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise ValueError("no training text (all inputs are empty)")
    backend = Backend(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    backend.normalizer = normalizers.Replace(" ", "▁")
    splits = [pre_tokenizers.Split(Regex(r"\n+|\t+"), behavior="isolated"),
              pre_tokenizers.Split("▁", behavior="merged_with_next")]
    # A run of punctuation, with the space before it if any, is a word of its own; apostrophes stay in
    # their word ("can't").
    if split_punctuation:
        splits.append(pre_tokenizers.Split(Regex(r"▁?[^\w▁\s']+"), behavior="isolated"))
    backend.pre_tokenizer = pre_tokenizers.Sequence(splits)
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=specials,
                                  limit_alphabet=1000, show_progress=False)
    backend.train_from_iterator(texts, trainer=trainer)
    # The trainer can only reserve ids for the <0xXX> byte pieces by making them special added tokens, but
    # they are ordinary text pieces (byte fallback for rare characters), not control tokens: drop their
    # added-token entries; they keep their ids in the BPE vocabulary.
    spec = json.loads(backend.to_str())
    spec["added_tokens"] = [t for t in spec["added_tokens"] if not _BYTE_PIECE.fullmatch(t["content"])]
    backend = Backend.from_str(json.dumps(spec))
    return Tokenizer(backend, source=f"trained BPE ({backend.get_vocab_size()} tokens)")


_BYTE_PIECE = re.compile(r"<0x[0-9A-F]{2}>")


def train_chat_bpe(texts: Sequence[str], vocab_size: int, path: str | Path,
                   split_punctuation: bool = False) -> Tokenizer:
    """A domain BPE (:func:`train_bpe`) with Gemma 4's chat control tokens appended after its pieces,
    saved to ``path`` (tokenizer.json) and loaded back, so that the chat format, the training data path
    and generation's stop tokens work on a small model exactly as on a real Gemma 4. ``vocab_size``
    counts the control tokens (the house model's eos list expects them right after the pieces);
    ``split_punctuation`` as in :func:`train_bpe`."""
    tok = train_bpe(list(texts), vocab_size - len(CONTROL_TOKENS), split_punctuation=split_punctuation)
    tok.backend.add_special_tokens(list(CONTROL_TOKENS))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tok.save(path)
    # add_special_tokens re-registers the byte pieces as added tokens on save: drop those entries again
    # (see train_bpe) so text with a rare character is not taken for a control token.
    spec = json.loads(path.read_text(encoding="utf-8"))
    spec["added_tokens"] = [t for t in spec["added_tokens"] if not _BYTE_PIECE.fullmatch(t["content"])]
    atomic_write_text(path, json.dumps(spec, ensure_ascii=False))
    return load_tokenizer(path)


# ----------------------------------------------------------------------------------------------- plot


def plot_pieces(series: Mapping[str, Stats], out: str | Path, max_pieces: int = 10) -> Path:
    """Bar chart of the pieces-per-word distribution (share of words), one series per entry."""
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    out = Path(out)
    xs = list(range(1, max_pieces + 1))
    width = 0.8 / max(len(series), 1)
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for i, (label, st) in enumerate(series.items()):
        counts = [st.pieces_hist.get(x, 0) for x in xs[:-1]]
        counts.append(sum(v for k, v in st.pieces_hist.items() if k >= max_pieces))  # last bar: max_pieces+
        shares = [c / st.words * 100 if st.words else 0 for c in counts]
        ax.bar([x + (i - (len(series) - 1) / 2) * width for x in xs], shares, width=width,
               label=f"{label} (fertility {st.fertility:.2f})")
    ax.set_xticks(xs, [str(x) for x in xs[:-1]] + [f"{max_pieces}+"])
    ax.set_xlabel("pieces per word")
    ax.set_ylabel("% of words")
    ax.set_title("How many tokens does a word become?")
    ax.legend(fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


@lru_cache(maxsize=4)
def resolve_tokenizer(spec: str | None) -> Tokenizer:
    if spec in (None, "", "gemma4"):
        return load_tokenizer(assets.gemma4_vocab_gguf())
    if spec == "gemma3":
        return load_tokenizer(assets.gemma3_270m_gguf())
    return load_tokenizer(spec)
