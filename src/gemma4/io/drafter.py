"""Drafter ("assistant") checkpoints: a ``gemma4_assistant`` directory in the transformers layout."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from gemma4.io.checkpoint import (CheckpointError, iter_safetensors, load_state_streaming, safetensors_files,
                                  save_pretrained, stored_dtype)
from gemma4.model.drafter import DrafterConfig, Gemma4Drafter, build_drafter


def load_drafter(path: str | os.PathLike, dtype: torch.dtype | None = None, device: str | torch.device = "cpu") -> Gemma4Drafter:
    """Load a ``gemma4_assistant`` checkpoint directory (config.json + safetensors)."""
    p = Path(path).expanduser()
    if not p.is_dir():
        raise FileNotFoundError(f"no drafter checkpoint directory at {p}")
    config = DrafterConfig.from_json(p / "config.json")
    files = safetensors_files(p)
    dtype = dtype or stored_dtype(files, "pre_projection.weight") or torch.float32
    model = build_drafter(config, device="meta")
    load_state_streaming(model, iter_safetensors(files), dtype=dtype, device=device, source=str(p))
    if model.masked_embedding is not None:
        order = model.masked_embedding.token_ordering
        if not torch.equal(torch.sort(order).values, torch.arange(order.numel(), device=order.device)):
            raise CheckpointError(f"masked_embedding.token_ordering in {p} is not a permutation of the vocabulary")
    return model.eval()


def save_drafter(model: Gemma4Drafter, directory: str | os.PathLike) -> Path:
    """Write config.json + model.safetensors in the transformers layout (atomically)."""
    return save_pretrained(model, directory)
