"""What every command shares: the progress display, the dtype option, finding a checkpoint's tokenizer."""

from __future__ import annotations

import sys
import time
from typing import Iterable, TypeVar

import torch
import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from gemma4._util import DTYPE_CHOICES, parse_dtype
from gemma4.io import resolve_path
from gemma4.text import Tokenizer, load_tokenizer

T = TypeVar("T")

DTYPE_HELP = f"weights/activations dtype: {', '.join(DTYPE_CHOICES)} (also fp32, bf16, fp16)"


def dtype_option(value: str | None) -> torch.dtype | None:
    """Parse a --dtype value with the one dtype table; a bad value is a usage error naming the option."""
    try:
        return parse_dtype(value, "--dtype")
    except ValueError as e:
        raise typer.BadParameter(str(e)) from None


def progress(items: Iterable[T], description: str = "") -> Iterable[T]:
    """The CLI's ``progress=`` for long library calls: a bar on a terminal; elsewhere (a log file, CI)
    a plain line every 10% so the run is visibly alive."""
    items = list(items)
    n = len(items)
    if sys.stderr.isatty():
        cols = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                TimeRemainingColumn())
        with Progress(*cols, transient=True, console=None) as bar:
            task = bar.add_task(description, total=n)
            for item in items:
                yield item
                bar.advance(task)
        return
    t0, step = time.perf_counter(), max(1, n // 10)
    for i, item in enumerate(items, 1):
        yield item
        if i % step == 0 or i == n:
            print(f"{description}: {i}/{n} ({time.perf_counter() - t0:.1f}s)", file=sys.stderr, flush=True)


def find_tokenizer(model_path: str) -> Tokenizer | None:
    """The checkpoint's tokenizer (tokenizer.json / tokenizer.model in the directory, or the GGUF
    vocabulary), or None when there is none (then the CLI works on token ids)."""
    try:
        p = resolve_path(model_path)
    except FileNotFoundError:
        return None
    try:
        if p.is_dir():
            if (p / "tokenizer.json").is_file() or (p / "tokenizer.model").is_file():
                return load_tokenizer(p)
            return None
        if p.suffix == ".gguf":
            return load_tokenizer(p)
    except Exception as e:  # a broken tokenizer file should not hide the model: say so and use ids
        typer.echo(f"warning: could not load the tokenizer from {p}: {e}; working on token ids", err=True)
    return None
