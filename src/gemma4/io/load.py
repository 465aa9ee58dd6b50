"""``load_pretrained``: one entry point for every checkpoint kind (safetensors directory, GGUF file,
short name, hub id)."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from gemma4._util import Progress
from gemma4.infer import plain_path
from gemma4.io import checkpoint
from gemma4.io.checkpoint import CheckpointError, load_safetensors_dir
from gemma4.io.gguf import GGUFFile, config_from_gguf, load_gguf
from gemma4.io.gguf_native import gguf_native_model, gguf_weight_form
from gemma4.io.hub import resolve_path
from gemma4.model import PRESETS, Gemma4Config, Gemma4ForCausalLM
from gemma4.quant import native


def load_pretrained(path: str | os.PathLike, dtype: torch.dtype | None = None, device: str | torch.device = "cpu",
                    *, trainable: bool = False, progress: Progress | None = None,
                    map_ple: bool = True) -> Gemma4ForCausalLM:
    """Load a checkpoint directory (config.json + safetensors), a ``.gguf`` file, a short name or a hub id.

    ``dtype=None`` keeps the checkpoint's own floating dtype. A quantized GGUF (Q4_K_M, Q8_0, ...) with
    ``dtype=None`` on the CPU, for inference, runs in its quantized form, as llama.cpp runs it: Q4_K
    matrices kept as int4 (same codes), the rest int8, float32 activations with the compiled kernels of
    :mod:`gemma4.quant.native` (bf16 without them) (:func:`gemma4.io.gguf_native_model`; about a quarter
    of the float32 model's memory and more than twice its decode speed). Likewise a GGUF of BF16 matrices, where
    those kernels built, keeps its bf16 weights and computes in float32 (llama.cpp's BF16 numerics; the float32
    model's function at half its memory). Pass a ``dtype`` (e.g. ``torch.float32``) for the dequantized model.

    For inference (the default) the model comes back in eval mode with gradients off; its first
    ``generate``/``stream`` call on CPU moves it to the fast path (:func:`gemma4.infer.use_fast_path`:
    weights reordered once for oneDNN's kernels, the same memory, ~2x the decode speed of plain
    ``F.linear``). ``trainable=True`` gives ordinary trainable modules: parameters with ``requires_grad``
    and train mode, which generation never repacks. :func:`save_pretrained` accepts either. ``progress``
    (a :data:`gemma4._util.Progress`) advances per tensor read (and dequantized).

    The PLE table of a safetensors checkpoint (E2B/E4B: 2.3B of E2B's 5.1B parameters) is read through a
    copy-on-write memory map when it is stored in the dtype asked for: only the rows of tokens seen
    become resident (:func:`gemma4.io.checkpoint.load_safetensors_dir`). ``map_ple=False`` reads it into
    memory like every other tensor."""
    p = resolve_path(path)
    if p.is_file() and p.suffix == ".gguf":
        form = gguf_form(p, dtype, device, trainable)
        if form is not None:
            model = gguf_native_model(p, rest="int8" if form == "quantized" else "bf16", progress=progress)
        else:
            model = load_gguf(p, dtype=dtype, device=device, progress=progress)
    elif p.is_file():
        raise CheckpointError(f"{p} is neither a checkpoint directory nor a .gguf file (pickle files are never loaded)")
    else:
        model = load_safetensors_dir(p, dtype=dtype, device=device, progress=progress, map_ple=map_ple)
    if trainable:
        for prm in model.parameters():
            prm.requires_grad_(prm.is_floating_point())
        return model.train()
    return model


def gguf_form(path: Path, dtype: torch.dtype | None, device: str | torch.device, trainable: bool) -> str | None:
    """The form :func:`load_pretrained` gives ``path``: "quantized" (a quantized GGUF in its quantized form),
    "bf16" (a BF16 GGUF as bf16 weights with float32 activations) or None (anything else; see there).
    One header parse (~0.3-0.5 s for Gemma's 262k-token vocabulary)."""
    if path.suffix != ".gguf" or dtype is not None or torch.device(device).type != "cpu" or trainable:
        return None
    form = gguf_weight_form(path)
    return form if form == "quantized" or (form == "bf16" and native.available()) else None


def save_pretrained(model: Gemma4ForCausalLM, directory: str | os.PathLike, **kw) -> Path:
    """Write config.json + safetensors as one unit (see :func:`gemma4.io.checkpoint.save_pretrained`);
    works on whatever :func:`load_pretrained` returns, fast path included."""
    with plain_path(model):
        return checkpoint.save_pretrained(model, directory, **kw)


def load_config(spec: str | os.PathLike) -> Gemma4Config:
    """The configuration behind a preset name (``e2b``), a checkpoint directory, a config.json, a ``.gguf``
    file or a short name, without loading any weights."""
    if str(spec).lower() in PRESETS:
        return Gemma4Config.from_preset(str(spec))
    p = resolve_path(spec)
    if p.suffix == ".gguf":
        return config_from_gguf(GGUFFile(p))
    return Gemma4Config.from_json(p / "config.json" if p.is_dir() else p)
