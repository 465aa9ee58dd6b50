"""Resumable training checkpoints: safetensors + JSON only (no pickle), written atomically.

A checkpoint is a directory ``<out>/checkpoints/step-NNNNNN/``:

* ``trainable.safetensors``: every trainable tensor by parameter name (the whole model for full
  fine-tuning, the LoRA factors for an adapter run);
* ``optimizer.safetensors``: AdamW's moments and step counts, keyed ``<param name>.<state key>``;
* ``rng.safetensors``: the torch RNG states (CPU and, where present, each CUDA device);
* ``state.json``: step, scheduler settings, the data stream position, optimizer hyper-parameters,
  the parameter order, and what run this is.

The directory is written under a temporary name and renamed into place, then ``latest`` (a small
text file naming it) is replaced atomically: a crash at any moment leaves the previous checkpoint
complete and ``latest`` pointing at a complete directory.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from gemma4._util import Gemma4Error, atomic_dir, atomic_write_text

FORMAT = "gemma4-train-checkpoint/1"


class TrainStateError(Gemma4Error, ValueError):
    """A training checkpoint that is missing, incomplete or for another run; names the file."""


def _save(tensors: dict[str, torch.Tensor], path: Path) -> None:
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(path))
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def save_checkpoint(root: Path, step: int, *, params: dict[str, torch.Tensor], optimizer: tuple[dict, dict],
                    param_names: list[str], state: dict, keep: int = 2) -> Path:
    """Write ``root/step-NNNNNN`` atomically, point ``root/latest`` at it, keep the newest ``keep``.
    ``optimizer``: what :func:`optimizer_state` returns."""
    root = Path(root)
    name = f"step-{step:06d}"
    # The step directory is written aside and swapped in whole (gemma4._util.atomic_dir), so a crash
    # leaves the previous checkpoint or this one, never a mix; re-saving a step replaces it whole.
    with atomic_dir(root / name) as tmp:
        _save(params, tmp / "trainable.safetensors")
        opt_tensors, opt_json = optimizer
        _save(opt_tensors, tmp / "optimizer.safetensors")
        rng = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            for i, s in enumerate(torch.cuda.get_rng_state_all()):
                rng[f"cuda.{i}"] = s
        _save(rng, tmp / "rng.safetensors")
        full = {"format": FORMAT, "step": step, "param_names": param_names, "optimizer": opt_json, **state}
        (tmp / "state.json").write_text(json.dumps(full, indent=2) + "\n", encoding="utf-8")
    final = root / name
    atomic_write_text(root / "latest", name + "\n")
    _prune(root, keep)
    return final


def _prune(root: Path, keep: int) -> None:
    steps = sorted(p for p in root.glob("step-*") if p.is_dir())
    for old in steps[: max(0, len(steps) - keep)]:
        shutil.rmtree(old, ignore_errors=True)
    for stale in root.glob(".step-*.tmp"):  # temporaries of a run killed mid-write
        shutil.rmtree(stale, ignore_errors=True)


def latest_checkpoint(root: Path) -> Path | None:
    pointer = Path(root) / "latest"
    if not pointer.exists():
        return None
    d = Path(root) / pointer.read_text(encoding="utf-8").strip()
    if not (d / "state.json").exists():
        raise TrainStateError(f"{pointer} names {d.name}, which is not a complete checkpoint")
    return d


def load_checkpoint(d: Path) -> tuple[dict, dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(state.json, trainable tensors, optimizer tensors, rng tensors)."""
    d = Path(d)
    try:
        state = json.loads((d / "state.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise TrainStateError(f"cannot read {d / 'state.json'}: {e}") from None
    if state.get("format") != FORMAT:
        raise TrainStateError(f"{d / 'state.json'}: format {state.get('format')!r}, expected {FORMAT!r}")
    out = []
    for f in ("trainable.safetensors", "optimizer.safetensors", "rng.safetensors"):
        try:
            out.append(load_file(str(d / f)))
        except Exception as e:  # safetensors raises its own error types for truncated files
            raise TrainStateError(f"cannot read {d / f}: {e}") from None
    return state, out[0], out[1], out[2]


# ----------------------------------------------------------------------------- optimizer state
def optimizer_state(opt: torch.optim.Optimizer, names: list[str], gather=lambda t: t) -> tuple[dict[str, torch.Tensor], dict]:
    """An optimizer's state as tensors keyed by parameter name + JSON for the rest. ``gather`` turns a
    sharded tensor into the whole one (every rank calls it, in the same order)."""
    sd = opt.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict] = {}
    for idx, st in sd["state"].items():
        pname = names[idx]
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"{pname}.{k}"] = gather(v)
            else:
                scalars.setdefault(pname, {})[k] = v
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in sd["param_groups"]]
    return tensors, {"param_groups": groups, "scalars": scalars}


def load_optimizer_state(opt: torch.optim.Optimizer, names: list[str], saved_names: list[str],
                         tensors: dict[str, torch.Tensor], meta: dict, source: str, place=None) -> None:
    """Inverse of :func:`optimizer_state`; ``place(tensor, param)`` lays a whole state tensor out like its
    parameter (a rank's shard under FSDP)."""
    if list(saved_names) != list(names):
        diff = sorted(set(saved_names) ^ set(names))[:4]
        raise TrainStateError(f"{source}: the checkpoint trains other parameters than this run "
                              f"(e.g. {', '.join(diff) or 'a different order'})")
    state: dict[int, dict] = {}
    params = [p for g in opt.param_groups for p in g["params"]]
    for i, pname in enumerate(names):
        st = {k.removeprefix(pname + "."): v for k, v in tensors.items() if k.rsplit(".", 1)[0] == pname}
        if place is not None:
            st = {k: (place(v, params[i]) if v.shape == params[i].shape else v) for k, v in st.items()}
        st.update(meta.get("scalars", {}).get(pname, {}))
        if st:
            state[i] = st
    groups = []
    for g in meta["param_groups"]:
        g = dict(g)
        if "betas" in g:
            g["betas"] = tuple(g["betas"])
        groups.append(g)
    opt.load_state_dict({"state": state, "param_groups": groups})


def restore_rng(rng: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(rng["cpu"])
    cuda = [rng[k] for k in sorted(k for k in rng if k.startswith("cuda."))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
