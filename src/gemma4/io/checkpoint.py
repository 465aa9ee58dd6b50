"""Checkpoints: Hugging Face safetensors directories (single file or sharded), GGUF files, hub ids.

``load_pretrained`` builds the model on the meta device and streams tensors in one by one, so the
weights are never held twice. Only safetensors and GGUF are read: never pickle.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import Iterator

import torch

from gemma4._util import Gemma4Error, atomic_save_safetensors, atomic_write_text, dtype_name, release_free_heap
from gemma4.model import Gemma4Config, Gemma4ForCausalLM, build_model
from gemma4.quant import to_kernel_layout, prepare_quantized

log = logging.getLogger("gemma4")

_TOWER_PREFIXES = (
    "model.vision_tower.", "model.audio_tower.", "model.embed_vision.", "model.embed_audio.",
    "vision_tower.", "audio_tower.", "multi_modal_projector.", "model.multi_modal_projector.",
    "embed_vision.", "embed_audio.",
)
_LM_PREFIXES = (("model.language_model.", "model."), ("language_model.model.", "model."), ("language_model.", ""))
_CONSUMER_DEAD = re.compile(r"^model\.layers\.(\d+)\.self_attn\.(k_proj|v_proj|k_norm|v_norm)\.weight$")


class CheckpointError(Gemma4Error, ValueError):
    """A checkpoint that does not match its config; the message names the tensor or file."""


# ----------------------------------------------------------------------------- key mapping
def map_key(key: str, config: Gemma4Config) -> str | None:
    """Checkpoint key -> our parameter name, or None for tensors we deliberately skip (vision/audio
    towers, the dead k/v tensors of KV-sharing layers, a stored copy of the tied head)."""
    if key.startswith(_TOWER_PREFIXES):
        return None
    for old, new in _LM_PREFIXES:
        if key.startswith(old):
            key = new + key[len(old):]
            break
    if key in ("lm_head.weight", "language_model.lm_head.weight") and config.tie_word_embeddings:
        return None
    m = _CONSUMER_DEAD.match(key)
    if m and config.kv_sharing_modes[int(m.group(1))] == "reuse":
        return None
    return key


# ----------------------------------------------------------------------------- file helpers
def safetensors_files(directory: Path) -> list[Path]:
    index = directory / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index} is not a valid safetensors index: {e}") from None
        files = sorted(set(weight_map.values()))
        missing = [f for f in files if not (directory / f).exists()]
        if missing:
            raise CheckpointError(f"{index} lists shard(s) that do not exist: {', '.join(missing)}")
        return [directory / f for f in files]
    single = directory / "model.safetensors"
    if single.exists():
        return [single]
    shards = sorted(directory.glob("model-*.safetensors"))
    if shards:
        return shards
    raise CheckpointError(f"no model.safetensors, model.safetensors.index.json or model-*.safetensors in {directory}")


_ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}


def read_safetensors_header(f: Path) -> tuple[int, dict]:
    """(offset of the data section, {key: {dtype, shape, data_offsets}}), with the file size checked
    against the header so a truncated file is reported before any tensor is read."""
    size = f.stat().st_size
    with open(f, "rb") as fh:
        raw = fh.read(8)
        n = int.from_bytes(raw, "little") if len(raw) == 8 else -1
        if n < 2 or n > size - 8:
            raise CheckpointError(f"cannot read {f}: header of {n} bytes in a {size}-byte file (truncated or not safetensors?)")
        try:
            header = json.loads(fh.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"cannot read {f}: corrupt header ({e})") from None
    header.pop("__metadata__", None)
    end = max((v["data_offsets"][1] for v in header.values()), default=0)
    if 8 + n + end > size:
        raise CheckpointError(f"{f} is truncated: its header describes {8 + n + end} bytes, the file has {size}")
    for k, v in header.items():
        if v.get("dtype") not in _ST_DTYPES:
            raise CheckpointError(f"tensor {k!r} in {f} has unsupported dtype {v.get('dtype')!r}")
    return 8 + n, header


def iter_safetensors(files: list[Path]) -> Iterator[tuple[str, "callable"]]:
    """Yields (key, loader) pairs; a loader reads one tensor when called.

    Tensors are read with plain file reads into fresh (aligned) memory rather than mmapped: a mapped
    file's pages count towards the process's memory while it is open, which would hold a second copy
    of the weights until the end of the load."""
    for f in files:
        base, header = read_safetensors_header(f)
        with open(f, "rb") as fh:
            for key, info in header.items():
                def load(fh=fh, info=info, key=key, f=f):
                    start, end = info["data_offsets"]
                    buf = torch.empty(end - start, dtype=torch.uint8)
                    fh.seek(base + start)
                    if fh.readinto(buf.numpy()) != end - start:
                        raise CheckpointError(f"cannot read tensor {key!r} from {f}: file truncated")
                    return buf.view(_ST_DTYPES[info["dtype"]]).reshape(info["shape"])
                yield key, load


def stored_dtype(files: list[Path], key_suffix: str = "embed_tokens.weight") -> torch.dtype | None:
    """The stored dtype of the first tensor whose key ends in ``key_suffix`` (by default the token
    embedding): what ``dtype=None`` loads as."""
    for f in files:
        _, header = read_safetensors_header(f)
        for k, v in header.items():
            if k.endswith(key_suffix):
                return _ST_DTYPES[v["dtype"]]
    return None


# ----------------------------------------------------------------------------- loading
def _set_tensor(model: torch.nn.Module, name: str, value: torch.Tensor) -> None:
    mod_name, _, leaf = name.rpartition(".")
    mod = model.get_submodule(mod_name) if mod_name else model
    if leaf in mod._parameters:
        mod._parameters[leaf] = torch.nn.Parameter(value, requires_grad=False)
    else:
        mod._buffers[leaf] = value


def load_state_streaming(model: Gemma4ForCausalLM, items, *, dtype: torch.dtype | None, device, source: str) -> None:
    """Assign tensors from ``items`` ((key, loader) pairs) into a meta-built model, checking names and shapes."""
    cfg = model.config
    expected = dict(model.state_dict(keep_vars=True))
    seen: set[str] = set()
    skipped_towers = 0
    for key, load in items:
        name = map_key(key, cfg)
        if name is None:
            skipped_towers += key.startswith(_TOWER_PREFIXES)
            continue
        if name not in expected:
            raise CheckpointError(f"unexpected tensor {key!r} in {source}: the config builds no such parameter")
        if name in seen:
            raise CheckpointError(f"tensor {key!r} appears twice in {source}")
        t = load()
        want = expected[name]
        if tuple(t.shape) != tuple(want.shape):
            raise CheckpointError(
                f"tensor {key!r} has shape {list(t.shape)} in {source} but the config expects {list(want.shape)}"
            )
        if want.is_floating_point():
            t = t.to(device=device, dtype=dtype or want.dtype)
        else:
            if t.dtype != want.dtype:
                raise CheckpointError(f"tensor {key!r} has dtype {t.dtype} but {want.dtype} is expected")
            t = t.to(device)
        if t.data_ptr() % 64:
            # safetensors hands out views into the mmapped file at whatever offset the header left.
            # Unaligned weights take slower (and differently rounding) SIMD paths: own an aligned copy.
            t = t.clone()
        _set_tensor(model, name, t)
        seen.add(name)
    if skipped_towers:
        log.info("skipped %d vision/audio tower tensors (text model only)", skipped_towers)
    missing = sorted(set(expected) - seen)
    if missing:
        more = f" (and {len(missing) - 8} more)" if len(missing) > 8 else ""
        raise CheckpointError(f"missing tensor(s) in {source}: {', '.join(missing[:8])}{more}")


def load_safetensors_dir(p: Path, dtype: torch.dtype | None = None, device: str | torch.device = "cpu") -> Gemma4ForCausalLM:
    """Load a checkpoint directory (config.json + safetensors). ``dtype=None`` keeps the stored dtype."""
    config = Gemma4Config.from_json(p / "config.json")
    files = safetensors_files(p)
    dtype = dtype or stored_dtype(files) or torch.float32
    model = build_model(config, device="meta")
    if config.quantization:
        prepare_quantized(model, config.quantization)
    load_state_streaming(model, iter_safetensors(files), dtype=dtype, device=device, source=str(p))
    if config.quantization:
        # Every buffer was just read by the loader and is held by nothing else, so int4 tables can be
        # repacked over themselves (the load never holds a table twice); this also trims the heap.
        to_kernel_layout(model, in_place=True)
    else:
        release_free_heap()
    return model.eval()


# ----------------------------------------------------------------------------- saving
def save_pretrained(model: Gemma4ForCausalLM, directory: str | os.PathLike, max_shard_bytes: int = 4 << 30) -> Path:
    """Write config.json + model.safetensors (or shards + index), each file atomically."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for k, v in state.items():
        nb = v.numel() * v.element_size()
        if shards[-1] and size + nb > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = v
        size += nb
    meta = {"format": "pt"}
    if len(shards) == 1:
        atomic_save_safetensors(shards[0], d / "model.safetensors", meta)
    else:
        n = len(shards)
        weight_map = {}
        for i, sh in enumerate(shards):
            name = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            atomic_save_safetensors(sh, d / name, meta)
            weight_map.update({k: name for k in sh})
        total = sum(v.numel() * v.element_size() for v in state.values())
        atomic_write_text(d / "model.safetensors.index.json",
                          json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    cfg = model.config.to_dict()
    cfg["dtype"] = dtype_name(model.dtype)
    atomic_write_text(d / "config.json", json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    return d
