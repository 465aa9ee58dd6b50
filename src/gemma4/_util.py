"""Leaf utilities every package may use: the base error, atomic file writes, the one dtype table,
handing freed heap back to the OS. Imports nothing from gemma4."""

from __future__ import annotations

import ctypes
import errno
import fnmatch
import functools
import json
import os
import shutil
import stat
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
class DtypeError(Gemma4Error, ValueError):
    """A dtype name that is not one of ``DTYPE_CHOICES`` (or their short spellings)."""


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
        raise DtypeError(f"unknown {what} {name!r}; use one of {', '.join(DTYPE_CHOICES)}")
    return DTYPES[key]


def dtype_name(dtype: torch.dtype) -> str:
    """torch.bfloat16 -> "bfloat16" (the config.json spelling)."""
    return str(dtype).removeprefix("torch.")


# ----------------------------------------------------------------------------- the cache
def cache_dir() -> Path:
    """The cache (downloads, built assets, compiled kernels): `$GEMMA4_CACHE`, else `~/.cache/gemma4`."""
    env = os.environ.get("GEMMA4_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "gemma4"


# ----------------------------------------------------------------------------- atomic writes
class WriteError(Gemma4Error, OSError):
    """A destination that cannot be written as asked (a file where a directory is needed, ...)."""


# Test hook: called with a short label at every step of an atomic write (before each rename, after
# each file, ...). The kill -9 tests set it in a forked child to die at step k; None in normal use.
_WRITE_HOOK: Callable[[str], None] | None = None


def _step(label: str) -> None:
    if _WRITE_HOOK is not None:
        _WRITE_HOOK(label)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _umask_mode() -> int:
    return 0o666 & ~_umask()


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path`` in one rename, on any
    error (or KeyboardInterrupt) it is removed and ``path`` is untouched. A crash at any point leaves
    either the old file or the new one, never a mix."""
    path = Path(path)
    if path.is_dir():
        raise WriteError(f"cannot write the file {path}: a directory of that name exists")
    _make_parent(path)
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        raise WriteError(f"cannot write {path}: {e.strerror or e}") from None
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, _umask_mode())  # mkstemp creates 0600; the final file gets the usual permissions
        _step(f"replace {path.name}")
        os.replace(tmp, path)
        _step(f"replaced {path.name}")
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _make_parent(path: Path) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # a file where a parent directory should be, no permission, read-only disk
        raise WriteError(f"cannot create the directory {path.parent} for {path.name}: {e.strerror or e}") from None


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


# Whole directories. A checkpoint is several files (config, shards, index) that are only meaningful
# together: replacing them one by one lets a crash, or a stale file of an earlier save (an old index
# that still names old shards), produce a mix that loads without error. So the new checkpoint is
# written into a fresh directory beside the target and the two directories are swapped in one step.
_RENAME_EXCHANGE = 2  # linux/fs.h


@functools.cache
def _renameat2():
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2  # glibc >= 2.28
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two directory entries (Linux renameat2 RENAME_EXCHANGE); False if unsupported."""
    fn = _renameat2()
    if fn is None:
        return False
    at_fdcwd = -100
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False  # kernel or filesystem without exchange: use the two-rename fallback
    raise OSError(err, f"cannot swap {a} and {b}: {os.strerror(err)}")


def _link_tree(src: Path, dst: Path) -> None:
    """Give ``dst`` the entries of ``src`` as hard links (copies where links are impossible), so the
    old directory stays intact until the swap and nothing large is copied."""
    if src.is_symlink():
        os.symlink(os.readlink(src), dst)
    elif src.is_dir():
        dst.mkdir()
        for child in src.iterdir():
            _link_tree(child, dst / child.name)
    else:
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)


def _fsync_tree(root: Path) -> None:
    """Flush the new directory's files to disk before it becomes visible: after a power loss the
    swap must not point at empty files. (A kill -9 alone needs no fsync: the page cache survives.)"""
    for dirpath, _, files in os.walk(root):
        for name in files:
            p = os.path.join(dirpath, name)
            if os.path.islink(p):
                continue
            fd = os.open(p, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(dirpath))


def _fsync_dir(d: Path) -> None:
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems cannot fsync a directory
    finally:
        os.close(fd)


@contextmanager
def atomic_dir(path: str | os.PathLike, *, replace: Iterable[str] = ("*",), fsync: bool = True) -> Iterator[Path]:
    """Write a whole directory (a checkpoint) and swap it in as one step.

    Yields an empty temporary directory beside ``path``; write every file of the new version there.
    On success, entries of the existing ``path`` that the new version did not write and whose names
    match none of the ``replace`` glob patterns are carried over (hard links; subdirectories too), and
    then the two directories are exchanged in one ``renameat2(RENAME_EXCHANGE)``; the old version is
    deleted afterwards. On error (or KeyboardInterrupt) the temporary directory is removed and
    ``path`` is untouched.

    ``replace``: the names that belong to the version being written (``"model-*.safetensors"``,
    ``"config.json"``, ...): old files matching them are dropped, so stale shards or an old index
    never sit beside the new checkpoint. Everything else (a README, tokenizer files, a sub-directory
    of training checkpoints) survives. The default ``("*",)`` replaces the whole directory.

    A crash (kill -9, power loss with ``fsync``) at any point leaves ``path`` holding either the old
    version or the new one, complete; at worst a ``.NAME.*.tmp`` directory is left beside it. Where
    the kernel or filesystem cannot exchange two directories (not Linux), the fallback is two
    renames, with a moment in between where ``path`` does not exist (still never a mix)."""
    path = Path(path)
    if path.is_symlink():
        path = path.resolve()  # keep the link; swap the directory it points to
    if path.exists() and not path.is_dir():
        raise WriteError(f"cannot write the directory {path}: a file of that name exists")
    _make_parent(path)
    try:
        tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    except OSError as e:
        raise WriteError(f"cannot write {path}: {e.strerror or e}") from None
    patterns = tuple(replace)
    try:
        yield tmp
        # mkdtemp creates 0700: the new version gets the old directory's permissions, or the usual ones.
        os.chmod(tmp, stat.S_IMODE(path.stat().st_mode) if path.is_dir() else 0o777 & ~_umask())
        if path.is_dir():
            for entry in path.iterdir():
                name = entry.name
                if (tmp / name).exists() or (tmp / name).is_symlink():
                    continue  # the new version wrote it
                if any(fnmatch.fnmatchcase(name, p) for p in patterns):
                    continue  # part of the old version: dropped
                if name.startswith(f".{path.name}.") or (name.startswith(".") and name.endswith(".tmp")):
                    continue  # debris of an interrupted write
                _step(f"carry {name}")
                _link_tree(entry, tmp / name)
        if fsync:
            _fsync_tree(tmp)
        _step("swap")
        if not path.exists():
            os.rename(tmp, path)
            _step("swapped")
        elif _exchange(tmp, path):
            _step("swapped")
            shutil.rmtree(tmp, ignore_errors=True)  # now holds the old version
        else:
            old = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".old.tmp"))
            os.rmdir(old)
            os.rename(path, old)
            _step("moved old")
            os.rename(tmp, path)
            _step("swapped")
            shutil.rmtree(old, ignore_errors=True)
        if fsync:
            _fsync_dir(path.parent)
        _step("cleaned")
    except BaseException:
        if tmp.exists() and tmp != path:
            shutil.rmtree(tmp, ignore_errors=True)
        raise


# ----------------------------------------------------------------------------- progress
T = TypeVar("T")
# Long library calls (conversion, quantization, training) take ``progress=``: a callable that wraps an
# iterable with a description and yields its items. The library never draws anything itself; the CLI
# passes one that draws a bar on a terminal and prints periodic plain lines otherwise.
Progress = Callable[[Iterable[T], str], Iterable[T]]


def no_progress(items: Iterable[T], description: str = "") -> Iterable[T]:
    return items


# ----------------------------------------------------------------------------- JSON lines
def read_jsonl(path: str | os.PathLike, error: type[Exception] = Gemma4Error, what: str = "") -> Iterator[tuple[int, dict]]:
    """(line number, object) for every non-blank line of a JSON-lines file. A line that is not JSON, or
    not a JSON object, raises ``error`` naming ``file:line`` (and ``what`` the file should hold)."""
    p = Path(path)
    if not p.is_file():
        raise error(f"{p}: no such file" + (f" ({what})" if what else ""))
    hint = f"; expected {what}" if what else ""
    with open(p, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise error(f"{p}:{n}: not valid JSON ({e.msg}){hint}") from None
            if not isinstance(rec, dict):
                raise error(f"{p}:{n}: expected a JSON object{hint}")
            yield n, rec


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
