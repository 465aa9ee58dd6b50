"""Leaf utilities every package may use: the base error, atomic file writes, the one dtype table,
handing freed heap back to the OS. Imports nothing from gemma4."""

from __future__ import annotations

import ctypes
import functools
import os
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Callable, Iterable, Iterator, TypeVar

import torch
from safetensors.torch import save_file


class Gemma4Error(Exception):
    """Base of every error the package raises on purpose (bad input, bad files, bad arguments).

    Catch this one to tell "the user gave us something wrong" from a bug. Subclasses also derive from
    the builtin that fits (ValueError, FileNotFoundError, ...) so older ``except`` clauses keep working."""


# ----------------------------------------------------------------------------- dtypes
# The one table of dtype spellings. Every command, loader and estimator accepts these names.
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32, "fp32": torch.float32, "f32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "f16": torch.float16, "half": torch.float16,
}
DTYPE_CHOICES = ("float32", "bfloat16", "float16")  # canonical spellings, shown in help and errors


def parse_dtype(name: str | torch.dtype | None, what: str = "dtype") -> torch.dtype | None:
    """``"bf16"`` / ``"bfloat16"`` / ``torch.bfloat16`` -> torch.bfloat16; None stays None."""
    if name is None or isinstance(name, torch.dtype):
        return name
    key = str(name).lower().removeprefix("torch.")
    if key not in DTYPES:
        raise ValueError(f"unknown {what} {name!r}; use one of {', '.join(DTYPE_CHOICES)}")
    return DTYPES[key]


def dtype_name(dtype: torch.dtype) -> str:
    """torch.bfloat16 -> "bfloat16" (the config.json spelling)."""
    return str(dtype).removeprefix("torch.")


# ----------------------------------------------------------------------------- atomic writes
def _umask_mode() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path`` in one rename, on any
    error (or KeyboardInterrupt) it is removed and ``path`` is untouched. A crash at any point leaves
    either the old file or the new one, never a mix."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, _umask_mode())  # mkstemp creates 0600; the final file gets the usual permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def atomic_write_stream(path: str | os.PathLike, src: IO[bytes]) -> None:
    """Copy a binary stream into ``path`` atomically, 1 MiB at a time."""
    with atomic_path(path) as tmp, open(tmp, "wb") as out:
        while block := src.read(1 << 20):
            out.write(block)


def atomic_save_safetensors(tensors: dict[str, torch.Tensor], path: str | os.PathLike,
                            metadata: dict[str, str] | None = None) -> None:
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


# ----------------------------------------------------------------------------- progress
T = TypeVar("T")
# Long library calls (conversion, quantization, training) take ``progress=``: a callable that wraps an
# iterable with a description and yields its items. The library never draws anything itself; the CLI
# passes one that draws a bar on a terminal and prints periodic plain lines otherwise.
Progress = Callable[[Iterable[T], str], Iterable[T]]


def no_progress(items: Iterable[T], description: str = "") -> Iterable[T]:
    return items


# ----------------------------------------------------------------------------- memory
@functools.cache
def _malloc_trim():
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None).malloc_trim  # glibc only (musl has none)
    except (OSError, AttributeError):
        return None
    fn.argtypes, fn.restype = [ctypes.c_size_t], ctypes.c_int
    return fn


def release_free_heap() -> None:
    """Hand freed C-heap memory back to the OS (glibc ``malloc_trim(0)``; a no-op elsewhere).

    glibc only shrinks its heap from the top, and after a large block is freed it raises its mmap
    threshold so that later blocks up to 32 MiB come from that heap too. Loading frees many such
    blocks (dtype conversions, the int4 repack's temporaries) between tensors that stay: without a
    trim that memory stays resident (60-100 MiB after loading the int4 270M model)."""
    fn = _malloc_trim()
    if fn is not None:
        fn(0)
