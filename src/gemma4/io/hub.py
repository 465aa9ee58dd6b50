"""Where a checkpoint name points: a local path, a short name of a real checkpoint we can fetch from the
package registries, or a Hugging Face hub id (with the optional ``hub`` extra)."""

from __future__ import annotations

import os
import re
from pathlib import Path

from gemma4.io import assets, house
from gemma4.io.checkpoint import CheckpointNotFoundError

# Short names: real checkpoints fetched from the package registries, and the house models built here
# (python benchmarks/house_model.py; the error names that command when one is not built yet).
NAMED_CHECKPOINTS = {"gemma3-270m": assets.gemma3_270m_gguf,
                     **{name: (lambda n=name: house.house_model_dir(n)) for name in house.HOUSE_NAMES}}


def resolve_path(path: str | os.PathLike) -> Path:
    """Local path, a short name (``gemma3-270m``), or a Hugging Face hub id."""
    s = str(path)
    if s in NAMED_CHECKPOINTS:
        return Path(NAMED_CHECKPOINTS[s]())
    p = Path(s).expanduser()
    if p.exists():
        return p
    if re.fullmatch(r"[\w.-]+/[\w.-]+", s):
        return _from_hub(s)
    raise CheckpointNotFoundError(f"no checkpoint at {s!r} (not a file, directory, short name or hub id)")


def _from_hub(repo_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise CheckpointNotFoundError(
            f"{repo_id!r} is not a local path; to fetch it from the Hugging Face hub install huggingface_hub "
            "(pip install 'gemma4[hub]')"
        ) from None
    try:
        return Path(snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.jinja"]))
    except Exception as e:
        raise CheckpointNotFoundError(f"could not fetch {repo_id!r} from the Hugging Face hub: {e}") from None


