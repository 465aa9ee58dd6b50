"""The training loop: AdamW, warmup + cosine, clipping, exact gradient accumulation, bf16 autocast
over float32 master weights, a JSONL log, held-out perplexity, resumable checkpoints.

Drawing (the progress bar) is the command line's job: the loop reports each step to ``on_step``.

Besides next-token loss on packed rows, any objective can drive the same loop (DPO, the constrained
stages in `gemma4.train.preference` / `gemma4.train.constrained`): an object with ``next_batch()``,
``loss(model, batch) -> (loss, logs)``, optionally ``after_step(model, step, record) -> dict`` (run
after the optimizer step, e.g. a dual update) and ``state()`` / ``load_state(state)`` for checkpoints.
Its logs join each step's record in ``train_log.jsonl``.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from gemma4._util import Gemma4Error, atomic_path, atomic_write_text
from gemma4.train import state as ckpt
from gemma4.train.data import BatchStream, Packed, iterate_rows, perplexity
from gemma4.train.distributed import DistContext, LossModule, full, like, shard
from gemma4.train.kernels import use_training_kernels
from gemma4.train.loss import IGNORE


class TrainError(Gemma4Error, ValueError):
    """Bad training settings or a run that cannot continue; the message names the setting."""


@dataclass
class TrainConfig:
    steps: int = 100
    lr: float = 2e-4
    min_lr_ratio: float = 0.1  # the cosine ends at lr * min_lr_ratio
    warmup_steps: int = 0
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    batch_size: int = 1
    grad_accum: int = 1
    max_grad_norm: float = 1.0  # 0 = no clipping (the norm is still logged)
    dtype: str = "bfloat16"  # compute dtype under autocast; "float32" = no autocast
    seed: int = 0
    eval_every: int = 0  # steps; 0 = only at the end (when there is held-out data)
    eval_batches: int = 0  # 0 = every held-out row
    save_every: int = 0  # steps; 0 = only at the end
    keep_checkpoints: int = 2
    gradient_checkpointing: bool = False
    plot: bool = True
    checkpoints: bool = True  # False: no checkpoints/ at all (short runs whose caller keeps the model)

    def validate(self) -> None:
        checks = [
            (self.steps >= 1, "steps must be >= 1"), (self.lr > 0, "lr must be > 0"),
            (self.batch_size >= 1, "batch_size must be >= 1"), (self.grad_accum >= 1, "grad_accum must be >= 1"),
            (0 <= self.warmup_steps <= self.steps, "warmup_steps must be within [0, steps]"),
            (0 <= self.min_lr_ratio <= 1, "min_lr_ratio must be within [0, 1]"),
            (self.max_grad_norm >= 0, "max_grad_norm must be >= 0"),
        ]
        for ok, msg in checks:
            if not ok:
                raise TrainError(msg)
        if self.dtype in ("float16", "fp16", "half"):
            raise TrainError("dtype float16 is refused: Gemma 4's backward overflows in fp16 (NaN gradient norm "
                             "at step 1); use bfloat16 (autocast, float32 master weights) or float32")
        if self.dtype not in ("bfloat16", "bf16", "float32", "fp32"):
            raise TrainError(f"unknown dtype {self.dtype!r}: use bfloat16 or float32")


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate for optimizer step ``step`` (0-based): linear warmup from lr/warmup to lr, then a
    cosine from lr down to lr * min_lr_ratio at the last step."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(1, cfg.steps - cfg.warmup_steps - 1)
    frac = min(1.0, (step - cfg.warmup_steps) / span)
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + (cfg.lr - floor) * 0.5 * (1.0 + math.cos(math.pi * frac))


def _autocast(model, cfg: TrainConfig):
    dev = next(model.parameters()).device.type
    enabled = cfg.dtype in ("bfloat16", "bf16")
    return torch.autocast(dev, dtype=torch.bfloat16, enabled=enabled)


@dataclass
class TrainResult:
    steps: int
    final_loss: float
    eval_loss: float | None
    eval_ppl: float | None
    tokens: int
    seconds: float
    log: Path
    plot: Path | None = None
    history: list[dict] = field(default_factory=list)


class Trainer:
    """Trains the parameters of ``model`` that require grad on packed rows.

    ``out``: the run directory (``train_log.jsonl``, ``loss_curve.png``, ``checkpoints/``).
    ``run_info``: JSON-able facts about the run stored in each checkpoint (and checked on resume)."""

    def __init__(self, model, train: Packed, cfg: TrainConfig, out: str | Path, *, heldout: Packed | None = None,
                 run_info: dict | None = None, on_step: Callable[[dict], None] | None = None,
                 dist: DistContext | None = None, objective=None):
        cfg.validate()
        if objective is not None and dist is not None:
            raise TrainError("a custom objective runs in one process; torchrun (FSDP) trains next-token loss only")
        if objective is None and train is None:
            raise TrainError("no training data: give packed rows or an objective")
        self.objective = objective
        self.model, self.cfg, self.out = model, cfg, Path(out)
        self.dist = dist
        if cfg.gradient_checkpointing:
            model.gradient_checkpointing_enable()
        use_training_kernels(model)
        # The module the loop calls: the model with its loss; under torchrun, FSDP2-sharded.
        self.loss_module = shard(model, dist) if dist is not None else LossModule(model)
        self.heldout, self.on_step = heldout, on_step
        self.run_info = run_info or {}
        self.named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if not self.named:
            raise TrainError("the model has no trainable parameter (call make_trainable or add LoRA adapters)")
        for n, p in self.named:
            if p.dtype not in (torch.float32, torch.float64):
                # Master weights are float32: AdamW updates of 1e-5 relative vanish in bf16's 8 bits.
                raise TrainError(f"trainable parameter {n} is {p.dtype}; training keeps float32 master weights "
                                 "(load the model in float32, or train LoRA factors over a bf16 base)")
        self.names = [n for n, _ in self.named]
        decay = [p for n, p in self.named if p.dim() >= 2 and cfg.weight_decay]
        no_decay = [p for n, p in self.named if not (p.dim() >= 2 and cfg.weight_decay)]
        groups = [g for g in ({"params": decay, "weight_decay": cfg.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}) if g["params"]]
        # The optimizer's parameter order is the groups' order: keep names in that order too.
        order = {id(p): n for n, p in self.named}
        self.names = [order[id(p)] for g in groups for p in g["params"]]
        # The fused AdamW: one pass over each parameter instead of one per op (lerp, mul, addcmul, sqrt,
        # addcdiv...), 4.2 s of a 12.8 s full fine-tuning step of the 270M on one CPU thread otherwise.
        # transformers' Trainer defaults to it too. Sharded (FSDP) parameters keep the per-op version.
        fused = dist is None and all(p.device.type in ("cpu", "cuda") for _, p in self.named)
        self.opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, fused=True if fused else None)
        # Under torchrun each stream item is a global micro-batch (batch_size rows per rank).
        self.world = dist.world if dist is not None else 1
        self.stream = BatchStream(train, cfg.batch_size * self.world, seed=cfg.seed) if objective is None else None
        self.step = 0
        self.tokens = 0
        self.log_path = self.out / "train_log.jsonl"
        self.ckpt_root = self.out / "checkpoints"

    # ------------------------------------------------------------------------------------------ state
    @property
    def is_main(self) -> bool:
        return self.dist is None or self.dist.is_main

    def _barrier(self) -> None:
        if self.dist is not None:
            self.dist.barrier()

    def save(self) -> Path:
        state = {
            "data": self._data_state(), "tokens": self.tokens, "config": _jsonable(asdict(self.cfg)),
            "run": self.run_info, "lr": lr_at(self.step - 1, self.cfg) if self.step else 0.0,
        }
        # Whole tensors (gathered from the shards under FSDP: every rank takes part), written by rank 0.
        params = {n: full(p.detach()) for n, p in self.named}
        opt = ckpt.optimizer_state(self.opt, self.names, gather=full)
        path = self.ckpt_root / f"step-{self.step:06d}"
        if self.is_main:
            path = ckpt.save_checkpoint(self.ckpt_root, self.step, params=params, optimizer=opt,
                                        param_names=self.names, state=state, keep=self.cfg.keep_checkpoints)
        self._barrier()
        return path

    def resume(self) -> bool:
        """Continue from the newest checkpoint in ``out``; False when there is none."""
        d = ckpt.latest_checkpoint(self.ckpt_root)
        if d is None:
            return False
        st, params, opt_t, rng = ckpt.load_checkpoint(d)
        if st.get("run", {}) != _jsonable(self.run_info):
            raise TrainError(f"{d}: the checkpoint is from another run ({st.get('run')}), not {self.run_info}")
        mine = dict(self.named)
        missing = [n for n in mine if n not in params]
        if missing or len(params) != len(mine):
            raise TrainError(f"{d / 'trainable.safetensors'}: parameters differ from this run's "
                             f"(missing {missing[:3]}, {len(params)} stored vs {len(mine)})")
        with torch.no_grad():
            for n, p in mine.items():
                p.copy_(like(params[n].to(p.dtype), p))
        ckpt.load_optimizer_state(self.opt, self.names, st["param_names"], opt_t, st["optimizer"], str(d), place=like)
        if self.stream is not None:
            self.stream.load_state(st["data"])
        elif hasattr(self.objective, "load_state"):
            self.objective.load_state(st["data"])
        ckpt.restore_rng(rng)
        self.step, self.tokens = int(st["step"]), int(st["tokens"])
        # Log lines written after this checkpoint belong to the lost part of the run: drop them.
        if self.is_main and self.log_path.exists():
            kept = [ln for ln in self.log_path.read_text(encoding="utf-8").splitlines()
                    if ln.strip() and json.loads(ln).get("step", 0) <= self.step]
            atomic_write_text(self.log_path, "".join(k + "\n" for k in kept))
        self._barrier()
        return True

    def _data_state(self) -> dict:
        if self.stream is not None:
            return self.stream.state()
        return self.objective.state() if hasattr(self.objective, "state") else {}

    # ------------------------------------------------------------------------------------------ steps
    def train_step(self) -> dict:
        if self.objective is not None:
            return self._objective_step()
        cfg, model = self.cfg, self.model
        lr = lr_at(self.step, cfg)
        for g in self.opt.param_groups:
            g["lr"] = lr
        batches = [self.stream.next() for _ in range(cfg.grad_accum)]
        # One normalizer for the whole step: sum of token losses / all target tokens of all micro-batches,
        # so accumulating k micro-batches gives the gradient of their concatenation (not k means averaged).
        n_targets = sum(int((b["labels"][:, 1:] != IGNORE).sum()) for b in batches)
        if n_targets == 0:
            raise TrainError(f"step {self.step + 1}: no target token in {cfg.grad_accum} micro-batch(es)")
        total = 0.0
        tokens = 0
        for b in batches:
            if self.dist is not None:
                b = self.dist.rows(b)
            b = {k: v.to(self._device) for k, v in b.items()}
            with _autocast(model, cfg):
                loss = self.loss_module(b["input_ids"], b["labels"], b["position_ids"], b["segment_ids"],
                                        num_targets=n_targets)
            # FSDP averages gradients over ranks; the step's gradient is their sum.
            (loss * self.world if self.world > 1 else loss).backward()
            total += loss.item()
            tokens += int((b["segment_ids"] != 0).sum())
        if self.dist is not None:
            total, tokens = self.dist.all_sum(total), int(self.dist.all_sum(tokens))
        params = [p for _, p in self.named]
        if cfg.max_grad_norm > 0:
            gn = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        else:
            gn = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
        gn = float(full(gn))
        if not math.isfinite(total) or not math.isfinite(gn):
            raise TrainError(f"step {self.step + 1}: loss {total} / gradient norm {gn} is not finite")
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.step += 1
        self.tokens += tokens
        return {"step": self.step, "loss": total, "lr": lr, "grad_norm": gn, "tokens": tokens,
                "tokens_total": self.tokens, "epoch": round(self.stream.epoch + self.stream.cursor / len(self.stream.data), 4)}

    def _objective_step(self) -> dict:
        """One optimizer step of a custom objective: ``grad_accum`` batches, each loss divided by
        ``grad_accum`` (the objective's losses are means), then clipping, the step and ``after_step``."""
        cfg, model, obj = self.cfg, self.model, self.objective
        lr = lr_at(self.step, cfg)
        for g in self.opt.param_groups:
            g["lr"] = lr
        total, tokens, parts = 0.0, 0, []
        for _ in range(cfg.grad_accum):
            batch = obj.next_batch()
            with _autocast(model, cfg):
                loss, logs = obj.loss(model, batch)
            (loss / cfg.grad_accum).backward()
            total += loss.item() / cfg.grad_accum
            logs = dict(logs)
            tokens += int(logs.pop("tokens", 0))
            parts.append(logs)
        params = [p for _, p in self.named]
        if cfg.max_grad_norm > 0:
            gn = float(torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm))
        else:
            gn = float(torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None]))
        if not math.isfinite(total) or not math.isfinite(gn):
            raise TrainError(f"step {self.step + 1}: loss {total} / gradient norm {gn} is not finite")
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.step += 1
        self.tokens += tokens
        rec = {"step": self.step, "loss": total, "lr": lr, "grad_norm": gn, "tokens": tokens,
               "tokens_total": self.tokens}
        # Each logged field is its mean over the step's micro-batches.
        for k in parts[0]:
            vals = [p[k] for p in parts if k in p]
            rec[k] = sum(vals) / len(vals) if all(isinstance(v, (int, float)) for v in vals) else vals[-1]
        after = getattr(obj, "after_step", None)
        if after is not None:
            rec.update(after(model, self.step, rec) or {})
        return rec

    @torch.no_grad()
    def evaluate(self) -> tuple[float, float]:
        """(mean token loss, perplexity) on the held-out rows."""
        if self.heldout is None or not len(self.heldout):
            raise TrainError("no held-out data to evaluate")
        was = self.model.training
        self.model.eval()
        nll, n = 0.0, 0
        try:
            for i, b in enumerate(iterate_rows(self.heldout, self.cfg.batch_size)):
                if self.cfg.eval_batches and i >= self.cfg.eval_batches:
                    break
                k = int((b["labels"][:, 1:] != IGNORE).sum())
                if not k:
                    continue
                b = {name: v.to(self._device) for name, v in b.items()}
                # Under FSDP every rank runs every held-out row (the forward is collective).
                with _autocast(self.model, self.cfg):
                    loss = self.loss_module(b["input_ids"], b["labels"], b["position_ids"], b["segment_ids"],
                                            num_targets=1)
                nll += float(loss)
                n += k
        finally:
            self.model.train(was)
        return nll / max(n, 1), perplexity(nll, n)

    @property
    def _device(self) -> torch.device:
        return self.named[0][1].device

    def fit(self, resume: bool = False) -> TrainResult:
        cfg = self.cfg
        if self.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
        self._barrier()
        resumed = self.resume() if resume else False
        if not resumed and self.is_main and self.log_path.exists():
            self.log_path.unlink()  # a fresh run (or nothing to resume) starts a fresh log
        self.model.train()
        t0 = time.perf_counter()
        start_step, start_tokens = self.step, self.tokens
        history: list[dict] = []
        rec: dict = {}
        eval_loss = eval_ppl = None
        with (open(self.log_path, "a", encoding="utf-8") if self.is_main else open(os.devnull, "w")) as log:
            while self.step < cfg.steps:
                rec = self.train_step()
                rec["elapsed_s"] = round(time.perf_counter() - t0, 3)
                done = self.step - start_step
                rec["tok_per_s"] = round((self.tokens - start_tokens) / max(rec["elapsed_s"], 1e-9), 1)
                rec["eta_s"] = round(rec["elapsed_s"] / done * (cfg.steps - self.step), 1)
                last = self.step == cfg.steps
                if self.heldout is not None and len(self.heldout) and (
                        last or (cfg.eval_every and self.step % cfg.eval_every == 0)):
                    eval_loss, eval_ppl = self.evaluate()
                    rec["eval_loss"], rec["eval_ppl"] = eval_loss, eval_ppl
                log.write(json.dumps(rec) + "\n")
                log.flush()
                history.append(rec)
                if self.on_step is not None:  # every rank (a display should draw on rank 0 only)
                    self.on_step(rec)
                if cfg.checkpoints and (last or (cfg.save_every and self.step % cfg.save_every == 0)):
                    self.save()
        plot = None
        if cfg.plot and self.is_main:
            plot = plot_log(self.log_path, self.out / "loss_curve.png")
        return TrainResult(self.step, rec.get("loss", float("nan")), eval_loss, eval_ppl, self.tokens,
                           time.perf_counter() - t0, self.log_path, plot, history)


def _jsonable(x):
    return json.loads(json.dumps(x, default=str))


def read_log(path: str | Path) -> list[dict]:
    return [json.loads(ln) for ln in Path(path).read_text(encoding="utf-8").splitlines() if ln.strip()]


def plot_log(log_path: str | Path, out: str | Path) -> Path | None:
    """Training (and held-out) loss against step as a PNG; None when matplotlib is not installed
    (``pip install 'gemma4[plot]'``)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    recs = read_log(log_path)
    if not recs:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["step"] for r in recs], [r["loss"] for r in recs], label="train loss", lw=1)
    ev = [r for r in recs if "eval_loss" in r]
    if ev:
        ax.plot([r["step"] for r in ev], [r["eval_loss"] for r in ev], "o-", label="held-out loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("mean token cross-entropy")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out = Path(out)
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    return out
