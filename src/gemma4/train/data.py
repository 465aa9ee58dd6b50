"""Training data: reading, tokenizing, loss masks, packing, held-out split, batches.

Inputs (a file, or a directory of them, read in sorted order):

* ``.jsonl`` with one object per line, either ``{"messages": [...]}`` (a chat, optionally with
  ``"tools"`` and ``"enable_thinking"``) or ``{"text": "..."}`` (plain text);
* ``.txt``: the whole file is one document (pretraining).

Chats are rendered by our chat renderer (`gemma4.text.render_chat`, the same text the model sees at
inference, thinking and tool turns included) and the loss covers only what the model writes: each
model turn's content and its end-of-turn token. Tool results folded into a model turn are excluded.
Each piece is tokenized separately at those boundaries, which is also how inference sees it (the
prompt ends at ``<|turn>model\\n``, the model's tokens start after it). Every document starts with
exactly one ``<bos>``.

Bad lines (invalid JSON, neither key, a chat the renderer rejects, no token to learn) are counted in
a `DataReport` with their file and line number; they are never dropped silently.

Packing puts several documents in one row of ``seq_len`` tokens. Each row carries ``segment_ids``
(attention stays inside a document), ``position_ids`` that restart at 0 for each document, and
labels that are -100 wherever there is nothing to learn, including each document's first token
(no prediction across a document boundary).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from gemma4._util import Gemma4Error
from gemma4.text import render_chat

IGNORE = -100

_SPANS = {
    # family: (model turn opener, turn closer, tool-result block opener, its closer)
    "gemma4": ("<|turn>model\n", "<turn|>", "<|tool_response>", "<tool_response|>"),
    "gemma3": ("<start_of_turn>model\n", "<end_of_turn>", None, None),
}


class DataError(Gemma4Error, ValueError):
    """Training data that cannot be used; the message names the file (and line)."""


@dataclass
class Document:
    ids: list[int]
    targets: list[bool]  # targets[i]: token i is predicted (from position i-1) and counted in the loss
    source: str  # "file:line" or "file"
    kind: str = "text"  # "chat" documents are truncated, not split, when longer than a row


@dataclass
class DataReport:
    files: list[str] = field(default_factory=list)
    documents: int = 0
    chats: int = 0
    texts: int = 0
    tokens: int = 0
    target_tokens: int = 0
    blank_lines: int = 0
    truncated: int = 0  # chats longer than one row, cut at seq_len
    bad: list[tuple[str, str]] = field(default_factory=list)  # (file:line, reason)

    def summary(self) -> str:
        s = (f"{self.documents} documents ({self.chats} chats, {self.texts} texts), {self.tokens} tokens, "
             f"{self.target_tokens} with loss; {len(self.bad)} bad line(s)")
        if self.truncated:
            s += f", {self.truncated} chat(s) truncated to the sequence length"
        for where, why in self.bad[:5]:
            s += f"\n  bad: {where}: {why}"
        if len(self.bad) > 5:
            s += f"\n  ... and {len(self.bad) - 5} more"
        return s

    def to_dict(self) -> dict:
        return {"files": self.files, "documents": self.documents, "chats": self.chats, "texts": self.texts,
                "tokens": self.tokens, "target_tokens": self.target_tokens, "blank_lines": self.blank_lines,
                "truncated": self.truncated, "bad_lines": len(self.bad),
                "bad": [{"where": w, "reason": r} for w, r in self.bad]}


# ----------------------------------------------------------------------------- reading
def data_files(path: str | Path) -> list[Path]:
    p = Path(path)
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.suffix in (".jsonl", ".txt") and f.is_file())
        if not files:
            raise DataError(f"{p}: no .jsonl or .txt files in this directory")
        return files
    if not p.exists():
        raise DataError(f"{p}: no such file or directory")
    if p.suffix not in (".jsonl", ".txt"):
        raise DataError(f"{p}: unsupported data file (expected .jsonl with 'messages' or 'text' per line, or .txt)")
    return [p]


def chat_style(tokenizer) -> str:
    fam = getattr(tokenizer, "family", None)
    return fam if fam in _SPANS else "gemma4"


def encode_chat(tokenizer, messages, *, tools=None, enable_thinking: bool = False, style: str | None = None,
                source: str = "") -> Document:
    """Render a conversation and mark the model's tokens as targets."""
    style = style or chat_style(tokenizer)
    prompt = render_chat(messages, tools=tools, add_generation_prompt=False, enable_thinking=enable_thinking,
                         style=style)
    # Turn boundaries are found in the template's markers only: in the caller's text (contents, and role
    # names) every "<" and ">" is blanked (same length, so positions still match), so a typed
    # "<|turn>model" cannot move a boundary, while "<|turn>" + role "model" + "\n" still reads as an opener.
    masked = "".join(seg.text if seg.template else seg.text.replace("<", "\0").replace(">", "\0")
                     for seg in prompt.segments)
    ids: list[int] = []
    targets: list[bool] = []
    pos = 0  # where the next piece of the rendered text starts
    for piece, is_target in _split_model_spans(masked, style, _generation_prefill(style, enable_thinking)):
        if not piece:
            continue
        if masked.startswith(piece, pos):
            # Control tokens only from the template: the caller's text inside this piece (message content,
            # tool arguments and results) is encoded as plain text, whatever it spells.
            segs = _segments_between(prompt.segments, pos, pos + len(piece))
            pos += len(piece)
        else:  # the generation prompt's prefill, inserted by _split_model_spans: template text
            segs = [(piece, True)]
        t = tokenizer.encode_segments(segs, add_bos=False)
        ids += t
        targets += [is_target] * len(t)
    _check_bos(tokenizer, ids, source)
    if not any(targets):
        raise DataError(f"{source}: the conversation has no assistant turn to learn from")
    return Document(ids, targets, source, kind="chat")


def _segments_between(segments, start: int, end: int) -> list[tuple[str, bool]]:
    """The (text, template) parts of a rendered prompt's segments that fall in characters [start, end)."""
    out, off = [], 0
    for seg in segments:
        s, e = off, off + len(seg.text)
        off = e
        if e <= start or s >= end:
            continue
        out.append((seg.text[max(start, s) - s: min(end, e) - s], seg.template))
    return out


def encode_text(tokenizer, text: str, source: str = "") -> Document:
    # A document is data: whatever it spells ("<bos>", "<turn|>") is text, never a control token.
    ids = tokenizer.encode(text, add_bos=True, allow_special=False)
    _check_bos(tokenizer, ids, source)
    if len(ids) < 2:
        raise DataError(f"{source}: empty text")
    return Document(ids, [False] + [True] * (len(ids) - 1), source)


def _check_bos(tokenizer, ids: list[int], source: str) -> None:
    bos = tokenizer.bos_id
    if bos is None:
        return
    if not ids or ids[0] != bos:
        raise DataError(f"{source}: the document does not start with <bos>")
    if ids.count(bos) != 1:
        raise DataError(f"{source}: the text contains a literal <bos> token ({ids.count(bos)} in all); "
                        "a document must hold exactly one")


def _generation_prefill(style: str, enable_thinking: bool) -> str:
    """What the renderer's generation prompt adds after the model-turn opener ("" if nothing)."""
    opener = _SPANS[style][0]
    prompt = render_chat([{"role": "user", "content": "x"}], add_generation_prompt=True,
                         enable_thinking=enable_thinking, style=style)
    return prompt[prompt.rfind(opener) + len(opener):]


def _split_model_spans(text: str, style: str, prefill: str = "") -> Iterator[tuple[str, bool]]:
    """(piece, is_model_output) pieces of a rendered chat, in order; ``prefill`` is inserted (as prompt)
    at the start of each model turn that does not begin with it or with a thought of its own."""
    opener, closer, tool_open, tool_close = _SPANS[style]
    pos = 0
    while True:
        start = text.find(opener, pos)
        if start < 0:
            yield text[pos:], False
            return
        start += len(opener)
        yield text[pos:start], False
        end = text.find(closer, start)
        end = len(text) if end < 0 else end + len(closer)
        body = text[start:end]
        if prefill and not body.startswith((prefill, "<|channel>")):
            yield prefill, False
        if tool_open:
            # The model writes "<|tool_response>" (it stops there); the tool's result after it is input.
            parts = re.split(f"({re.escape(tool_open)}.*?{re.escape(tool_close)})", body, flags=re.S)
            for part in parts:
                if part.startswith(tool_open) and part.endswith(tool_close):
                    yield tool_open, True
                    yield part[len(tool_open):], False
                else:
                    yield part, True
        else:
            yield body, True
        pos = end


def read_documents(path: str | Path, tokenizer, *, report: DataReport | None = None,
                   style: str | None = None) -> tuple[list[Document], DataReport]:
    """Every document of a file or directory, with a report of what was read and what was bad."""
    report = report or DataReport()
    docs: list[Document] = []
    for f in data_files(path):
        report.files.append(str(f))
        if f.suffix == ".txt":
            try:
                text = f.read_text(encoding="utf-8")
            except UnicodeDecodeError as e:
                report.bad.append((str(f), f"not UTF-8 text ({e.reason} at byte {e.start})"))
                continue
            try:
                docs.append(encode_text(tokenizer, text, str(f)))
                report.texts += 1
            except DataError as e:
                report.bad.append((str(f), str(e).removeprefix(f"{f}: ")))
            continue
        with open(f, "rb") as fh:
            for n, raw in enumerate(fh, 1):
                where = f"{f}:{n}"
                if not raw.strip():
                    report.blank_lines += 1
                    continue
                try:
                    rec = json.loads(raw)
                except (json.JSONDecodeError, UnicodeDecodeError) as e:
                    report.bad.append((where, f"invalid JSON ({e})"))
                    continue
                try:
                    doc = _record(rec, tokenizer, style, where)
                except DataError as e:
                    report.bad.append((where, str(e).removeprefix(f"{where}: ")))
                    continue
                except (ValueError, TypeError, KeyError, AttributeError) as e:
                    report.bad.append((where, f"the chat renderer rejected it: {e}"))
                    continue
                docs.append(doc)
                if "messages" in rec:
                    report.chats += 1
                else:
                    report.texts += 1
    report.documents = len(docs)
    report.tokens = sum(len(d.ids) for d in docs)
    report.target_tokens = sum(sum(d.targets) for d in docs)
    if not docs:
        detail = f" ({len(report.bad)} bad line(s); first: {report.bad[0][0]}: {report.bad[0][1]})" if report.bad else ""
        raise DataError(f"{path}: no usable document{detail}")
    return docs, report


def _record(rec, tokenizer, style, where) -> Document:
    if not isinstance(rec, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(rec).__name__}")
    if "messages" in rec:
        msgs = rec["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise DataError(f"{where}: 'messages' must be a non-empty list")
        return encode_chat(tokenizer, msgs, tools=rec.get("tools"), enable_thinking=bool(rec.get("enable_thinking")),
                           style=style, source=where)
    if "text" in rec:
        if not isinstance(rec["text"], str):
            raise DataError(f"{where}: 'text' must be a string")
        return encode_text(tokenizer, rec["text"], where)
    raise DataError(f"{where}: neither 'messages' nor 'text' in the record (keys: {', '.join(sorted(rec)) or 'none'})")


def split_heldout(docs: Sequence[Document], fraction: float, seed: int = 0) -> tuple[list[Document], list[Document]]:
    """A deterministic held-out share of the documents (at least one when ``fraction > 0``)."""
    if not 0.0 <= fraction < 1.0:
        raise DataError(f"held-out fraction must be in [0, 1), got {fraction}")
    if fraction == 0.0 or len(docs) < 2:
        return list(docs), []
    n = max(1, int(round(len(docs) * fraction)))
    order = torch.randperm(len(docs), generator=torch.Generator().manual_seed(seed)).tolist()
    held = set(order[:n])
    return [d for i, d in enumerate(docs) if i not in held], [d for i, d in enumerate(docs) if i in held]


# ----------------------------------------------------------------------------- packing
@dataclass
class Packed:
    """Rows [R, L]: input_ids, labels (-100 = no loss), position_ids, segment_ids (0 = padding)."""

    input_ids: torch.Tensor
    labels: torch.Tensor
    position_ids: torch.Tensor
    segment_ids: torch.Tensor

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def rows(self, index) -> dict[str, torch.Tensor]:
        return {"input_ids": self.input_ids[index], "labels": self.labels[index],
                "position_ids": self.position_ids[index], "segment_ids": self.segment_ids[index]}

    @property
    def target_tokens(self) -> int:
        return int((self.labels != IGNORE).sum())


def _pieces(doc: Document, seq_len: int, split_long: bool, report: DataReport | None) -> list[tuple[list[int], list[bool]]]:
    if len(doc.ids) <= seq_len:
        return [(doc.ids, doc.targets)]
    if not split_long:  # a chat: keep its beginning (the prompt the answer depends on)
        if report is not None:
            report.truncated += 1
        return [(doc.ids[:seq_len], doc.targets[:seq_len])]
    return [(doc.ids[s : s + seq_len], doc.targets[s : s + seq_len]) for s in range(0, len(doc.ids), seq_len)]


def pack(docs: Iterable[Document], seq_len: int, pad_id: int = 0, *, report: DataReport | None = None) -> Packed:
    """Pack documents into rows in order (next fit: a piece that does not fit starts a new row).
    Texts longer than a row are cut into row-sized pieces; chats are truncated (and counted)."""
    if seq_len < 2:
        raise DataError(f"sequence length must be at least 2, got {seq_len}")
    rows: list[list[tuple[list[int], list[bool]]]] = [[]]
    used = 0
    for doc in docs:
        for ids, tg in _pieces(doc, seq_len, split_long=doc.kind != "chat", report=report):
            if len(ids) < 2 or not any(tg[1:]):
                continue  # a 1-token tail has nothing to predict
            if used + len(ids) > seq_len:
                rows.append([])
                used = 0
            rows[-1].append((ids, tg))
            used += len(ids)
    rows = [r for r in rows if r]
    if not rows:
        raise DataError("no document has a token to learn after packing")
    shape = (len(rows), seq_len)
    input_ids = torch.full(shape, pad_id, dtype=torch.long)
    labels = torch.full(shape, IGNORE, dtype=torch.long)
    position_ids = torch.zeros(shape, dtype=torch.long)
    segment_ids = torch.zeros(shape, dtype=torch.long)
    for r, row in enumerate(rows):
        at = 0
        for seg, (ids, tg) in enumerate(row, 1):
            n = len(ids)
            t = torch.tensor(ids)
            input_ids[r, at : at + n] = t
            lab = torch.where(torch.tensor(tg), t, torch.full_like(t, IGNORE))
            lab[0] = IGNORE  # nothing before a document's first token may predict it
            labels[r, at : at + n] = lab
            position_ids[r, at : at + n] = torch.arange(n)
            segment_ids[r, at : at + n] = seg
            at += n
    return Packed(input_ids, labels, position_ids, segment_ids)


# ----------------------------------------------------------------------------- batches
class BatchStream:
    """Deterministic micro-batches over packed rows: each epoch is a seeded permutation, and the
    position (epoch, cursor) is all the state a resumed run needs to continue with the same rows."""

    def __init__(self, data: Packed, batch_size: int, seed: int = 0, shuffle: bool = True):
        if batch_size < 1:
            raise DataError(f"batch size must be at least 1, got {batch_size}")
        if len(data) < batch_size:
            raise DataError(f"{len(data)} packed row(s) cannot fill a batch of {batch_size}; use a smaller "
                            "--batch-size or --seq-len, or more data")
        self.data, self.batch_size, self.seed, self.shuffle = data, batch_size, seed, shuffle
        self.epoch, self.cursor = 0, 0
        self._order = self._permutation()

    def _permutation(self) -> torch.Tensor:
        n = len(self.data)
        if not self.shuffle:
            return torch.arange(n)
        return torch.randperm(n, generator=torch.Generator().manual_seed(self.seed * 100_003 + self.epoch))

    def next(self) -> dict[str, torch.Tensor]:
        # An epoch's tail shorter than a batch is skipped: every batch has batch_size rows.
        if self.cursor + self.batch_size > len(self.data):
            self.epoch, self.cursor = self.epoch + 1, 0
            self._order = self._permutation()
        idx = self._order[self.cursor : self.cursor + self.batch_size]
        self.cursor += self.batch_size
        return self.data.rows(idx)

    def state(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor, "seed": self.seed, "rows": len(self.data)}

    def load_state(self, st: dict) -> None:
        if st.get("rows") != len(self.data) or st.get("seed") != self.seed:
            raise DataError(f"the checkpoint's data position is for {st.get('rows')} rows with seed "
                            f"{st.get('seed')}, but the data now packs to {len(self.data)} rows with seed "
                            f"{self.seed}: resume with the same data, --seq-len and --seed")
        self.epoch, self.cursor = int(st["epoch"]), int(st["cursor"])
        self._order = self._permutation()

    def epochs_for(self, steps: int, grad_accum: int) -> float:
        return steps * grad_accum * self.batch_size / len(self.data)


def iterate_rows(data: Packed, batch_size: int) -> Iterator[dict[str, torch.Tensor]]:
    """Every row once, in order (evaluation)."""
    for s in range(0, len(data), batch_size):
        yield data.rows(slice(s, s + batch_size))


def perplexity(nll_sum: float, tokens: int) -> float:
    return math.exp(nll_sum / tokens) if tokens else float("nan")
