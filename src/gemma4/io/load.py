"""``load_pretrained``: one entry point for every checkpoint kind (safetensors directory, GGUF file,
short name, hub id)."""

from __future__ import annotations

import os

import torch

from gemma4.io.checkpoint import CheckpointError, load_safetensors_dir
from gemma4.io.gguf import GGUFFile, config_from_gguf, load_gguf
from gemma4.io.hub import resolve_path
from gemma4.model import PRESETS, Gemma4Config, Gemma4ForCausalLM


def load_pretrained(path: str | os.PathLike, dtype: torch.dtype | None = None, device: str | torch.device = "cpu") -> Gemma4ForCausalLM:
    """Load a checkpoint directory (config.json + safetensors), a ``.gguf`` file, a short name or a hub id.

    ``dtype=None`` keeps the checkpoint's own floating dtype."""
    p = resolve_path(path)
    if p.is_file() and p.suffix == ".gguf":
        return load_gguf(p, dtype=dtype, device=device)
    if p.is_file():
        raise CheckpointError(f"{p} is neither a checkpoint directory nor a .gguf file (pickle files are never loaded)")
    return load_safetensors_dir(p, dtype=dtype, device=device)


def load_config(spec: str | os.PathLike) -> Gemma4Config:
    """The configuration behind a preset name (``e2b``), a checkpoint directory, a config.json, a ``.gguf``
    file or a short name, without loading any weights."""
    if str(spec).lower() in PRESETS:
        return Gemma4Config.from_preset(str(spec))
    p = resolve_path(spec)
    if p.suffix == ".gguf":
        return config_from_gguf(GGUFFile(p))
    return Gemma4Config.from_json(p / "config.json" if p.is_dir() else p)
