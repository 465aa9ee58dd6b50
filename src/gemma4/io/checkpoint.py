"""Checkpoints: Hugging Face safetensors directories (single file or sharded), GGUF files, hub ids.

``load_pretrained`` builds the model on the meta device and streams tensors in one by one, so the
weights are never held twice. Only safetensors and GGUF are read: never pickle.
"""

from __future__ import annotations

import json
import logging
import math
import mmap
import os
import re
from pathlib import Path
from typing import Iterator

import torch

from gemma4._util import Gemma4Error, Progress, atomic_dir, no_progress, atomic_save_safetensors, atomic_write_text, dtype_name, release_free_heap
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


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """No checkpoint where one was named (path, short name or hub id)."""


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
    if m and int(m.group(1)) < config.num_hidden_layers and config.kv_sharing_modes[int(m.group(1))] == "reuse":
        return None
    return key


# ----------------------------------------------------------------------------- file helpers
INDEX_NAME = "model.safetensors.index.json"
# The names that make up a checkpoint written by ``save_pretrained``: a new save replaces all of them
# (stale shards or an old index never survive next to the new weights); other files in the directory
# (tokenizer, README, sub-directories) are kept.
CHECKPOINT_FILES = ("config.json", "model.safetensors", INDEX_NAME, "model-*.safetensors")
_MAX_HEADER = 100 << 20  # the safetensors format's own limit on the JSON header


def _hub_blobs(directory: Path) -> Path | None:
    """A Hugging Face cache snapshot (``.../snapshots/<rev>/``) holds symlinks into ``.../blobs/``."""
    return directory.parent.parent / "blobs" if directory.parent.name == "snapshots" else None


def checkpoint_file(directory: Path, name: object, what: str = "file") -> Path:
    """``directory / name`` for a file the checkpoint names, refusing anything that would read outside
    the checkpoint: the name must be a plain file name (no separators, no ``..``, not absolute), and a
    symlink must resolve inside the directory (or, for a Hugging Face cache snapshot, its blob store)."""
    if not isinstance(name, str) or not name or name in (".", "..") or "/" in name or "\\" in name \
            or "\0" in name or Path(name).is_absolute() or Path(name).name != name:
        raise CheckpointError(f"{what} name {name!r} in {directory} is not a plain file name in the checkpoint "
                              "directory (paths outside the checkpoint are never read)")
    p = directory / name
    if p.is_symlink():
        real, home = p.resolve(), directory.resolve()
        blobs = _hub_blobs(directory)
        allowed = [home] + ([blobs.resolve()] if blobs is not None else [])
        if not any(real.parent == a for a in allowed):
            raise CheckpointError(f"{p} is a symlink to {real}, outside the checkpoint directory: refused")
    return p


def _read_json(path: Path, what: str):
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{path} is not UTF-8 text ({what}): {e}") from None
    except (json.JSONDecodeError, RecursionError) as e:
        raise CheckpointError(f"{path} is not a valid {what}: {e}") from None
    except OSError as e:
        raise CheckpointError(f"cannot read {path} ({what}): {e}") from None


def read_index(directory: Path) -> dict[str, str]:
    """The weight map of ``model.safetensors.index.json``, checked: tensor name -> shard file name."""
    index = directory / INDEX_NAME
    j = _read_json(checkpoint_file(directory, INDEX_NAME, "index"), "safetensors index")
    weight_map = j.get("weight_map") if isinstance(j, dict) else None
    if not isinstance(weight_map, dict):
        raise CheckpointError(f"{index} is not a valid safetensors index: no 'weight_map' object")
    for k, v in weight_map.items():
        if not isinstance(v, str):
            raise CheckpointError(f"{index}: weight_map[{k!r}] is {v!r}, not a shard file name")
        checkpoint_file(directory, v, f"shard (weight_map[{k!r}] in {INDEX_NAME})")
    return weight_map


def safetensors_files(directory: Path) -> list[Path]:
    index = directory / INDEX_NAME
    if index.exists() or index.is_symlink():
        weight_map = read_index(directory)
        files = sorted(set(weight_map.values()))
        missing = [f for f in files if not (directory / f).is_file()]
        if missing:
            raise CheckpointError(f"{index} lists shard(s) that do not exist: {', '.join(missing)}")
        if not files:
            raise CheckpointError(f"{index} lists no shards")
        return [directory / f for f in files]
    single = directory / "model.safetensors"
    if single.exists() or single.is_symlink():
        return [checkpoint_file(directory, single.name)]
    shards = sorted(directory.glob("model-*.safetensors"))
    if shards:
        return [checkpoint_file(directory, f.name) for f in shards]
    raise CheckpointError(f"no model.safetensors, model.safetensors.index.json or model-*.safetensors in {directory}")


def check_index(directory: Path, files: list[Path]) -> None:
    """Every tensor of the index is in the shard it names, and every shard tensor is in the index (a
    shard left over from another save cannot add or replace weights)."""
    weight_map = read_index(directory)
    where: dict[str, str] = {}
    for f in files:
        for k in read_safetensors_header(f)[1]:
            where[k] = f.name
    for k, shard in weight_map.items():
        if where.get(k) != shard:
            found = f"it is in {where[k]}" if k in where else "no shard holds it"
            raise CheckpointError(f"{directory / INDEX_NAME} puts tensor {k!r} in {shard}, but {found}")
    extra = sorted(set(where) - set(weight_map))
    if extra:
        raise CheckpointError(f"shard {where[extra[0]]} in {directory} holds tensor {extra[0]!r}, which "
                              f"{INDEX_NAME} does not list")


_ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}


def _unique_keys(pairs):
    out = {}
    for k, v in pairs:
        if k in out:
            raise CheckpointError(f"key {k!r} appears twice")
        out[k] = v
    return out


def read_safetensors_header(f: Path) -> tuple[int, dict]:
    """(offset of the data section, {key: {dtype, shape, data_offsets}}), validated the way the
    safetensors library does before any tensor is read: a JSON object of entries with a known dtype,
    a shape of non-negative integers, and ``data_offsets`` that tile the data section exactly (sorted,
    no gaps, no overlap, each span = shape x dtype size), within the file."""
    try:
        size = f.stat().st_size
        with open(f, "rb") as fh:
            raw = fh.read(8)
            n = int.from_bytes(raw, "little") if len(raw) == 8 else -1
            if n < 2 or n > size - 8 or n > _MAX_HEADER:
                raise CheckpointError(f"cannot read {f}: header of {n} bytes in a {size}-byte file "
                                      "(truncated or not safetensors?)")
            text = fh.read(n)
    except OSError as e:
        raise CheckpointError(f"cannot read {f}: {e}") from None
    try:
        header = json.loads(text.decode("utf-8"), object_pairs_hook=_unique_keys)
    except CheckpointError as e:
        raise CheckpointError(f"cannot read {f}: corrupt header ({e})") from None
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise CheckpointError(f"cannot read {f}: corrupt header ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"cannot read {f}: the header is a JSON {type(header).__name__}, not an object")
    meta = header.pop("__metadata__", None)
    if meta is not None and not (isinstance(meta, dict) and all(isinstance(v, str) for v in meta.values())):
        raise CheckpointError(f"{f}: __metadata__ must map names to strings")
    data_size = size - 8 - n
    spans = []
    for k, v in header.items():
        if not isinstance(v, dict):
            raise CheckpointError(f"tensor {k!r} in {f}: header entry is not an object")
        dtype = v.get("dtype")
        if not isinstance(dtype, str) or dtype not in _ST_DTYPES:
            raise CheckpointError(f"tensor {k!r} in {f} has unsupported dtype {dtype!r}")
        shape, offs = v.get("shape"), v.get("data_offsets")
        if not isinstance(shape, list) or len(shape) > 8 or \
                not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d for d in shape):
            raise CheckpointError(f"tensor {k!r} in {f} has an invalid shape {shape!r}")
        if not (isinstance(offs, list) and len(offs) == 2
                and all(isinstance(o, int) and not isinstance(o, bool) for o in offs) and 0 <= offs[0] <= offs[1]):
            raise CheckpointError(f"tensor {k!r} in {f} has invalid data_offsets {offs!r}")
        nbytes = math.prod(shape) * _ST_DTYPES[dtype].itemsize  # python ints: no overflow
        if offs[1] - offs[0] != nbytes:
            raise CheckpointError(f"tensor {k!r} in {f}: data_offsets {offs} span {offs[1] - offs[0]} bytes, but "
                                  f"shape {shape} of {dtype} needs {nbytes}")
        spans.append((offs[0], offs[1], k))
    spans.sort()
    pos = 0
    for a, b, k in spans:
        if a != pos:
            what = "overlaps the previous tensor" if a < pos else f"leaves a gap of {a - pos} bytes"
            raise CheckpointError(f"tensor {k!r} in {f}: data_offsets start at {a}, which {what}")
        pos = b
    if pos > data_size:
        raise CheckpointError(f"{f} is truncated: its header describes {8 + n + pos} bytes, the file has {size}")
    if pos < data_size:
        raise CheckpointError(f"{f}: {data_size - pos} bytes after the last tensor that no header entry covers")
    return 8 + n, header


# Tables read through a memory map instead of into memory: the per-layer embedding (PLE) table, 2.3B of
# E2B's 5.1B parameters, is only gathered from, a few rows per token, so only the pages of the tokens a
# run sees become resident (E2B bf16: 17.5 KiB per token out of 4.4 GiB). Every other weight is read
# into memory: decoding reads all of it at every token anyway.
MAPPED_SUFFIXES = ("embed_tokens_per_layer.weight", "embed_tokens_per_layer.qweight")


def _map_tensor(fh, f: Path, key: str, base: int, info: dict) -> torch.Tensor | None:
    """The tensor as a view of a private (copy-on-write) memory map of its file, or None where it cannot
    be one (empty, or its offset not a multiple of its element size). Writes to it (training) go to
    private pages: the file is never modified. The map lives as long as the tensor."""
    start, end = info["data_offsets"]
    dtype = _ST_DTYPES[info["dtype"]]
    if end == start or (base + start) % dtype.itemsize:
        return None
    try:
        mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_COPY)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot map tensor {key!r} of {f}: {e}") from None
    if len(mm) < base + end:  # read_safetensors_header checked the size; the file shrank since
        raise CheckpointError(f"cannot map tensor {key!r} from {f}: file truncated")
    raw = torch.frombuffer(mm, dtype=torch.uint8, count=end - start, offset=base + start)
    return raw.view(dtype).reshape(info["shape"])


def iter_safetensors(files: list[Path], mapped: tuple[str, ...] = MAPPED_SUFFIXES) -> Iterator[tuple[str, "callable"]]:
    """Yields (key, loader) pairs; a loader reads one tensor when called.

    Tensors are read with plain file reads into fresh (aligned) memory rather than mmapped: a mapped
    file's pages count towards the process's memory while it is open, which would hold a second copy
    of the weights until the end of the load. The exception is a key ending in one of ``mapped`` (the
    PLE table, see ``MAPPED_SUFFIXES``): it comes back as a view of a memory map, resident only where
    touched. If the load then asks for another dtype or device, the conversion is an ordinary copy
    and the map is dropped with the view."""
    for f in files:
        base, header = read_safetensors_header(f)
        with open(f, "rb") as fh:
            for key, info in header.items():
                def load(fh=fh, info=info, key=key, f=f):
                    if key.endswith(mapped):
                        t = _map_tensor(fh, f, key, base, info)
                        if t is not None:
                            return t
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


def load_state_streaming(model: Gemma4ForCausalLM, items, *, dtype: torch.dtype | None, device, source: str,
                         progress: Progress | None = None) -> None:
    """Assign tensors from ``items`` ((key, loader) pairs) into a meta-built model, checking names and shapes.

    ``progress`` advances once per tensor the model expects. It is driven by hand beside ``items``
    rather than wrapped around them: a progress may list what it wraps to learn the total, and listing
    the loaders would run the file reads past their open handles."""
    expected = dict(model.state_dict(keep_vars=True))
    seen: set[str] = set()
    ticks = iter((progress or no_progress)(range(len(expected)), f"loading {Path(source).name}"))
    try:
        _assign_all(model, items, expected, seen, dtype, device, source, ticks)
    except BaseException:
        close = getattr(ticks, "close", None)
        if close is not None:
            close()  # take the bar down with the failed load
        raise
    for _ in ticks:  # tensors the file need not hold (a tied head) still count as done
        pass
    missing = sorted(set(expected) - seen)
    if missing:
        more = f" (and {len(missing) - 8} more)" if len(missing) > 8 else ""
        raise CheckpointError(f"missing tensor(s) in {source}: {', '.join(missing[:8])}{more}")


def _fixed_dtype_names(model) -> set[str]:
    """Buffers whose dtype is part of their format (a quantized weight's scales: float16 for grouped int8,
    bf16 otherwise): loaded in that dtype whatever the model's float dtype, never rounded through it."""
    return {f"{name}.{buf}" for name, m in model.named_modules() for buf in getattr(m, "_fixed_dtype", ())}


def _assign_all(model, items, expected: dict, seen: set, dtype, device, source: str, ticks) -> None:
    cfg = model.config
    skipped_towers = 0
    fixed = _fixed_dtype_names(model)
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
            if not t.is_floating_point():
                # An integer tensor where a float weight belongs is a broken or hostile file, not
                # something to convert value by value.
                raise CheckpointError(f"tensor {key!r} in {source} has integer dtype {t.dtype}; a floating "
                                      f"point weight ({want.dtype}) is expected")
            t = t.to(device=device, dtype=want.dtype if name in fixed else (dtype or want.dtype))
        else:
            if t.dtype != want.dtype:
                raise CheckpointError(f"tensor {key!r} has dtype {t.dtype} but {want.dtype} is expected")
            t = t.to(device)
        if t.data_ptr() % 64 and not name.endswith(MAPPED_SUFFIXES):
            # safetensors hands out views into the mmapped file at whatever offset the header left.
            # Unaligned weights take slower (and differently rounding) SIMD paths: own an aligned copy.
            # (Not the memory-mapped PLE table: it is only gathered from, and copying it is what the map avoids.)
            t = t.clone()
        _set_tensor(model, name, t)
        seen.add(name)
        next(ticks, None)
    if skipped_towers:
        log.info("skipped %d vision/audio tower tensors (text model only)", skipped_towers)


def load_safetensors_dir(p: Path, dtype: torch.dtype | None = None, device: str | torch.device = "cpu",
                         progress: Progress | None = None, *, map_ple: bool = True) -> Gemma4ForCausalLM:
    """Load a checkpoint directory (config.json + safetensors). ``dtype=None`` keeps the stored dtype.

    ``map_ple``: the PLE table (E2B/E4B) becomes a view of a copy-on-write memory map of its file, resident
    only where touched (``MAPPED_SUFFIXES``), when it can be one: stored in the dtype asked for, on the
    CPU. Otherwise (another dtype or device) it is converted into an ordinary copy, as ``map_ple=False``
    always does."""
    config = Gemma4Config.from_json(checkpoint_file(p, "config.json"))
    files = safetensors_files(p)
    if (p / INDEX_NAME).exists():
        check_index(p, files)
    dtype = dtype or stored_dtype(files) or torch.float32
    model = build_model(config, device="meta")
    if config.quantization:
        prepare_quantized(model, config.quantization)
    load_state_streaming(model, iter_safetensors(files, MAPPED_SUFFIXES if map_ple else ()), dtype=dtype,
                         device=device, source=str(p), progress=progress)
    if config.quantization:
        # Every buffer was just read by the loader and is held by nothing else, so int4 tables can be
        # repacked over themselves (the load never holds a table twice); this also trims the heap.
        to_kernel_layout(model, in_place=True)
    else:
        release_free_heap()
    return model.eval()


# ----------------------------------------------------------------------------- saving
def save_pretrained(model: Gemma4ForCausalLM, directory: str | os.PathLike, max_shard_bytes: int = 4 << 30) -> Path:
    """Write config.json + model.safetensors (or shards + index) as one unit.

    The new checkpoint is written into a temporary directory beside ``directory`` and swapped in whole
    (``gemma4._util.atomic_dir``): after a crash at any step ``directory`` holds the old checkpoint or the
    new one, never a mix. Files of an earlier checkpoint (``CHECKPOINT_FILES``: config.json,
    model.safetensors, the index, ``model-*.safetensors`` shards) are dropped; any other file in the
    directory (tokenizer files, a README, sub-directories) is kept."""
    if isinstance(max_shard_bytes, bool) or not isinstance(max_shard_bytes, int) or max_shard_bytes <= 0:
        raise CheckpointError(f"max_shard_bytes must be a positive integer, got {max_shard_bytes!r}")
    d = Path(directory)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    meta_tensors = [k for k, v in state.items() if v.is_meta]
    if meta_tensors:
        raise CheckpointError(f"tensor {meta_tensors[0]!r} has no data (meta device): load the weights before saving")
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
    cfg = model.config.to_dict()
    cfg["dtype"] = dtype_name(model.dtype)
    with atomic_dir(d, replace=CHECKPOINT_FILES) as tmp:
        if len(shards) == 1:
            atomic_save_safetensors(shards[0], tmp / "model.safetensors", meta)
        else:
            n = len(shards)
            weight_map = {}
            for i, sh in enumerate(shards):
                name = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
                atomic_save_safetensors(sh, tmp / name, meta)
                weight_map.update({k: name for k in sh})
            total = sum(v.numel() * v.element_size() for v in state.values())
            atomic_write_text(tmp / INDEX_NAME,
                              json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
        atomic_write_text(tmp / "config.json", json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    return d
