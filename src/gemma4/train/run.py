"""Whole training runs, as the command line starts them: `pretrain` (random init from a config) and
`finetune` (full, LoRA or QLoRA from a checkpoint).

A run directory holds ``run.json`` (the settings), ``data_report.json`` (what was read, bad lines),
``train_log.jsonl``, ``loss_curve.png``, ``checkpoints/`` (resumable) and the result: ``model/`` (a
checkpoint directory with its tokenizer) or ``adapter/`` (PEFT format).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from gemma4._util import atomic_write_text
from gemma4.io import load_pretrained, resolve_path, save_pretrained
from gemma4.model import PRESETS, Gemma4Config, build_model
from gemma4.quant import quantize
from gemma4.text import load_tokenizer
from gemma4.train.data import DataError, DataReport, Packed, pack, read_documents, split_heldout
from gemma4.train.distributed import DistContext, from_env, full
from gemma4.train.lora import DEFAULT_TARGETS, adapter_state, add_lora, checkpoint_prefix, save_adapter
from gemma4.train.loop import TrainConfig, TrainError, Trainer, TrainResult


@dataclass
class RunOptions:
    steps: int = 100
    lr: float = 2e-4
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    batch_size: int = 1
    grad_accum: int = 1
    seq_len: int = 512
    seed: int = 0
    dtype: str = "bfloat16"
    max_grad_norm: float = 1.0
    eval_fraction: float = 0.05
    eval_every: int = 0
    eval_batches: int = 0
    save_every: int = 0
    gradient_checkpointing: bool = False
    lora_rank: int = 0  # 0 = full fine-tuning
    lora_alpha: float | None = None  # default 2 * rank
    lora_dropout: float = 0.0
    targets: tuple[str, ...] | None = None
    quant: str | None = None  # QLoRA: "int8" or "int4" (the base is quantized after loading)
    group_size: int | None = None
    plot: bool = True

    def train_config(self) -> TrainConfig:
        return TrainConfig(steps=self.steps, lr=self.lr, min_lr_ratio=self.min_lr_ratio, warmup_steps=self.warmup_steps,
                           weight_decay=self.weight_decay, batch_size=self.batch_size, grad_accum=self.grad_accum,
                           max_grad_norm=self.max_grad_norm, dtype=self.dtype, seed=self.seed,
                           eval_every=self.eval_every, eval_batches=self.eval_batches, save_every=self.save_every,
                           gradient_checkpointing=self.gradient_checkpointing, plot=self.plot)


def prepare_data(data, tokenizer, opts: RunOptions, *, eval_data=None, pad_id: int = 0,
                 vocab_size: int | None = None) -> tuple[Packed, Packed | None, DataReport]:
    """Read, split and pack the training (and held-out) data; bad lines are in the report."""
    report = DataReport()
    docs, report = read_documents(data, tokenizer, report=report)
    if vocab_size is not None and tokenizer.vocab_size > vocab_size:
        raise DataError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model's vocab_size is {vocab_size}")
    if eval_data is not None:
        train_docs, _ = docs, None
        held_docs, _ = read_documents(eval_data, tokenizer)
    else:
        train_docs, held_docs = split_heldout(docs, opts.eval_fraction, opts.seed)
    train = pack(train_docs, opts.seq_len, pad_id, report=report)
    held = pack(held_docs, opts.seq_len, pad_id) if held_docs else None
    return train, held, report


def init_weights_(model, seed: int = 0, std: float = 0.02, *, embed_std: float | None = None,
                  unit_attention_logits: bool = False):
    """Initialization for pretraining from scratch: matrices (embeddings included) N(0, std); norm
    scales at identity (1, or 0 where the norm multiplies by 1 + w); layer scalars, router scales and
    per-expert scales 1.

    Two options for small models trained from scratch (both measured in ``benchmarks/alignment.py``: a
    0.97M model learnt to copy a made-up name into its answer only with both):

    ``embed_std``: std of the token embedding table. The embedding is multiplied by sqrt(hidden_size)
    and every layer adds a post-normed output of RMS ~1, so at std 0.02 and hidden 128 the token's own
    vector (RMS 0.23) is soon outweighed by what the layers add, and later layers no longer see which
    token sits where. 1/sqrt(hidden_size) gives it RMS 1.

    ``unit_attention_logits``: Gemma 4 attends with scale 1 and learns the temperature inside
    q_norm/k_norm. With both norms at identity the logits q·k have std sqrt(head_dim) (5.7-8 here): a
    near one-hot, random attention whose gradient reaches one or two keys. Starting both norm scales at
    head_dim^(-1/4) gives unit-variance logits, the 1/sqrt(d) of standard attention; training is free to
    sharpen them from there."""
    g = torch.Generator().manual_seed(seed)
    norms = set()
    with torch.no_grad():
        for name, mod in model.named_modules():
            offset = getattr(mod, "offset", None)
            w = getattr(mod, "weight", None)
            if offset is not None and isinstance(w, torch.Tensor):
                scale = w.numel() ** -0.25 if unit_attention_logits and name.endswith(("q_norm", "k_norm")) else 1.0
                w.fill_(scale - 1.0 if offset else scale)
                norms.add(f"{name}.weight")
        for name, p in list(model.named_parameters()) + list(model.named_buffers()):
            if not p.is_floating_point() or name in norms:
                continue
            if p.dim() >= 2:
                s = embed_std if embed_std is not None and name.endswith("embed_tokens.weight") else std
                p.copy_(torch.empty(p.shape).normal_(0, s, generator=g))
            elif name.endswith(".bias"):
                p.zero_()
            else:
                p.fill_(1.0)  # layer_scalar, router scale, per_expert_scale
    return model


def _write_json(path: Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, default=str) + "\n")


def _run(model, tokenizer, data, out: Path, opts: RunOptions, *, eval_data, resume: bool, run_info: dict,
         on_step, on_report, dist: DistContext | None) -> tuple[Trainer, TrainResult, DataReport]:
    main = dist is None or dist.is_main
    train, held, report = prepare_data(data, tokenizer, opts, eval_data=eval_data,
                                       pad_id=tokenizer.pad_id or 0, vocab_size=model.config.vocab_size)
    run_info = {**run_info, "train_rows": len(train), "seq_len": opts.seq_len}
    if main:
        out.mkdir(parents=True, exist_ok=True)
        _write_json(out / "data_report.json", {**report.to_dict(), "train_rows": len(train),
                                               "heldout_rows": len(held) if held is not None else 0})
        _write_json(out / "run.json", {**run_info, "world_size": dist.world if dist else 1, "options": asdict(opts)})
        if on_report is not None:
            on_report(report, train, held)
    trainer = Trainer(model, train, opts.train_config(), out, heldout=held, run_info=run_info,
                      on_step=on_step if main else None, dist=dist)
    result = trainer.fit(resume=resume)
    return trainer, result, report


def _save_model(model, out: Path, tok, dist: DistContext | None) -> None:
    """``out`` as a checkpoint directory with the tokenizer. Under FSDP the whole tensors are gathered on
    every rank and rank 0 writes them from a plain (unsharded) model."""
    if dist is None:
        save_pretrained(model.eval(), out)
        tok.save(out / "tokenizer.json")
        return
    state = {n: full(t).detach().cpu() for n, t in list(model.named_parameters()) + list(model.named_buffers())}
    if dist.is_main:
        plain = build_model(model.config, dtype=torch.float32)
        plain.load_state_dict(state, strict=False)
        save_pretrained(plain, out)
        tok.save(out / "tokenizer.json")
    dist.barrier()


def pretrain(config: str | Path, data, out, *, tokenizer, opts: RunOptions | None = None, eval_data=None,
             resume: bool = False, on_step: Callable | None = None, on_report: Callable | None = None) -> TrainResult:
    """Train a model from random weights: ``config`` is a preset name or a config.json path; the
    result is ``out/model`` (config.json, model.safetensors, tokenizer.json)."""
    opts = opts or RunOptions()
    cfg = Gemma4Config.from_preset(str(config)) if str(config).lower() in PRESETS else Gemma4Config.from_json(config)
    tok = load_tokenizer(tokenizer) if isinstance(tokenizer, (str, Path)) else tokenizer
    torch.manual_seed(opts.seed)
    model = init_weights_(build_model(cfg, dtype=torch.float32), seed=opts.seed).train()
    for p in model.parameters():
        p.requires_grad_(True)
    out = Path(out)
    run_info = {"kind": "pretrain", "config": str(config)}
    dist = from_env()
    _, result, _ = _run(model, tok, data, out, opts, eval_data=eval_data, resume=resume, run_info=run_info,
                        on_step=on_step, on_report=on_report, dist=dist)
    _save_model(model, out / "model", tok, dist)
    return result


def finetune(model_path: str | Path, data, out, *, tokenizer=None, opts: RunOptions | None = None, eval_data=None,
             resume: bool = False, on_step: Callable | None = None, on_report: Callable | None = None) -> TrainResult:
    """Fine-tune a checkpoint: full (``opts.lora_rank == 0``), LoRA, or QLoRA (``opts.quant``). The
    result is ``out/model`` (full) or ``out/adapter`` (PEFT format, loads with peft and `load_adapter`)."""
    opts = opts or RunOptions()
    lora = opts.lora_rank > 0
    if opts.quant and not lora:
        raise TrainError("--quant (QLoRA) needs --lora-rank: a quantized base cannot be trained directly")
    tok = (load_tokenizer(tokenizer) if isinstance(tokenizer, (str, Path))
           else tokenizer if tokenizer is not None else load_tokenizer(resolve_path(model_path)))
    # Full fine-tuning keeps float32 master weights; a frozen LoRA base may stay in bf16 (half the memory)
    # since autocast runs its matmuls in bf16 anyway.
    base_dtype = torch.bfloat16 if (lora and opts.dtype in ("bfloat16", "bf16")) else torch.float32
    torch.manual_seed(opts.seed)
    model = load_pretrained(model_path, dtype=base_dtype, trainable=not lora)
    if model.config.quantization and not lora:
        raise TrainError(f"{model_path} is quantized ({model.config.quantization.get('scheme')}): its integer "
                         "weights cannot be trained; use --lora-rank (QLoRA over it) or fine-tune the float checkpoint")
    if lora:
        if opts.quant and not model.config.quantization:
            quantize(model, opts.quant, opts.group_size, embeddings=True)
        add_lora(model, list(opts.targets) if opts.targets else list(DEFAULT_TARGETS), r=opts.lora_rank,
                 alpha=opts.lora_alpha if opts.lora_alpha is not None else 2.0 * opts.lora_rank,
                 dropout=opts.lora_dropout)
        model.train()
    out = Path(out)
    run_info = {"kind": "lora" if lora else "full", "base": str(model_path), "quant": opts.quant,
                "lora_rank": opts.lora_rank, "targets": list(opts.targets) if opts.targets else None}
    dist = from_env()
    _, result, _ = _run(model, tok, data, out, opts, eval_data=eval_data, resume=resume, run_info=run_info,
                        on_step=on_step, on_report=on_report, dist=dist)
    if lora:
        base = str(resolve_path(model_path))
        state = adapter_state(model, checkpoint_prefix(base))  # collective under FSDP
        if dist is None or dist.is_main:
            save_adapter(model, out / "adapter", base_model=base, state=state)
        if dist is not None:
            dist.barrier()
    else:
        _save_model(model, out / "model", tok, dist)
    return result
