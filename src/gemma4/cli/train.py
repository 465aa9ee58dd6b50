"""`gemma4 pretrain`, `gemma4 finetune`, `gemma4 merge`: training runs and adapters.

The library does the work (`gemma4.train.run`); this module parses options, draws the progress bar
(loss, tokens/s, ETA) and prints the summary."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import List, Optional

import torch
import typer
from rich.console import Console

from gemma4.cli._common import CliError, StepBar, check_model, check_output

_DATA_HELP = ("Training data: a .jsonl file (one {\"messages\": [...]} chat or {\"text\": \"...\"} per line), a .txt "
              "file (one document), or a directory of them. Chats learn only the model's turns.")
_DTYPE_HELP = ("Compute dtype: bfloat16 (default: bf16 autocast over float32 master weights) or float32. float16 "
               "is refused (Gemma 4's backward overflows in fp16).")


def _relaunch(nproc: int | None) -> None:
    """``--nproc N`` (N > 1) outside torchrun: run this same command line under
    ``torchrun --standalone --nproc-per-node N`` and exit with its status."""
    if not nproc or nproc <= 1 or "WORLD_SIZE" in os.environ:
        return
    import subprocess

    args, skip = [], False
    for a in sys.argv[1:]:
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            args.append(a)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", sys.argv[0], *args]
    raise typer.Exit(subprocess.call(cmd))


def _rank0() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def _report(console: Console):
    def show(report, train, held):
        console.print(f"data: {report.summary()}")
        console.print(f"packed: {len(train)} training row(s)" + (f", {len(held)} held-out row(s)" if held is not None else
                                                                    ", no held-out data"))
    return show


def _options(**kw):
    from gemma4.train.run import RunOptions

    if kw.get("targets"):
        kw["targets"] = tuple(t.strip() for item in kw["targets"] for t in item.split(",") if t.strip())
    else:
        kw["targets"] = None
    return RunOptions(**kw)


def _summary(console: Console, result, out: Path, what: Path, as_json: bool) -> None:
    if int(os.environ.get("RANK", "0")) != 0:
        return  # under torchrun, rank 0 reports
    info = {"steps": result.steps, "final_loss": result.final_loss, "eval_loss": result.eval_loss,
            "eval_ppl": result.eval_ppl, "tokens": result.tokens, "seconds": round(result.seconds, 2),
            "log": str(result.log), "plot": str(result.plot) if result.plot else None, "output": str(what)}
    if as_json:
        typer.echo(json.dumps(info))
        return
    ev = f", held-out loss {result.eval_loss:.4f} (perplexity {result.eval_ppl:.2f})" if result.eval_loss is not None else ""
    console.print(f"trained {result.steps} steps, final loss {result.final_loss:.4f}{ev}; {result.tokens} tokens "
                  f"in {result.seconds:.1f} s")
    console.print(f"wrote {what} (log {result.log}" + (f", plot {result.plot})" if result.plot else ")"))


def register(app: typer.Typer) -> None:
    common = dict(
        out=typer.Option(..., "--out", "-o", help="Run directory: log, plot, checkpoints and the result."),
        steps=typer.Option(100, min=1, help="Optimizer steps."),
        lr=typer.Option(2e-4, min=0.0, help="Peak learning rate (AdamW)."),
        warmup=typer.Option(0, "--warmup", min=0, help="Linear warmup steps, then a cosine to lr * --min-lr-ratio."),
        min_lr_ratio=typer.Option(0.1, min=0.0, max=1.0, help="Where the cosine ends, as a share of --lr."),
        weight_decay=typer.Option(0.0, min=0.0, help="AdamW weight decay (matrices only)."),
        batch_size=typer.Option(1, min=1, help="Packed rows per micro-batch."),
        grad_accum=typer.Option(1, min=1, help="Micro-batches per optimizer step (exactly a batch of "
                                "batch-size x grad-accum rows)."),
        seq_len=typer.Option(512, min=2, help="Tokens per packed row (documents never attend to each other)."),
        seed=typer.Option(0, help="Seed for initialization, the held-out split and the data order."),
        resume=typer.Option(False, "--resume", help="Continue from the newest checkpoint in --out (same data "
                            "and options): the loss curve continues exactly."),
        eval_data=typer.Option(None, "--eval", help="Held-out data (same formats); default: 5% of the documents."),
        eval_every=typer.Option(0, min=0, help="Held-out perplexity every N steps (0: at the end only)."),
        save_every=typer.Option(0, min=0, help="Checkpoint every N steps (0: at the end only)."),
        dtype=typer.Option("bfloat16", help=_DTYPE_HELP),
        grad_clip=typer.Option(1.0, min=0.0, help="Clip the gradient norm to this (0: no clipping)."),
        checkpointing=typer.Option(False, "--gradient-checkpointing", help="Recompute layers in backward "
                                   "(less memory, ~30% more compute)."),
        threads=typer.Option(None, min=1, help="CPU threads (torch.set_num_threads)."),
        json_out=typer.Option(False, "--json", help="Print the summary as one JSON object."),
        nproc=typer.Option(None, "--nproc", min=1, help="Data-parallel processes (FSDP2; gloo on CPU, nccl on "
                           "GPUs): relaunches this command under torchrun. Same as `torchrun --nproc-per-node N "
                           "-m gemma4 ...`; the global batch is batch-size x grad-accum x N rows."),
    )

    @app.command("pretrain")
    def pretrain_cmd(
        config: str = typer.Argument(..., help="A preset (e2b, gemma3-270m, ...) or a config.json."),
        data: str = typer.Argument(..., help=_DATA_HELP),
        tokenizer: str = typer.Option(..., "--tokenizer", "-t", help="tokenizer.json / tokenizer.model / .gguf "
                                      "(e.g. from `gemma4 tokens train`); its size must fit the config's vocab_size."),
        out: Path = common["out"], steps: int = common["steps"], lr: float = common["lr"],
        warmup: int = common["warmup"], min_lr_ratio: float = common["min_lr_ratio"],
        weight_decay: float = common["weight_decay"], batch_size: int = common["batch_size"],
        grad_accum: int = common["grad_accum"], seq_len: int = common["seq_len"], seed: int = common["seed"],
        resume: bool = common["resume"], eval_data: Optional[str] = common["eval_data"],
        eval_every: int = common["eval_every"], save_every: int = common["save_every"], dtype: str = common["dtype"],
        grad_clip: float = common["grad_clip"], checkpointing: bool = common["checkpointing"],
        threads: Optional[int] = common["threads"], json_out: bool = common["json_out"],
        nproc: Optional[int] = common["nproc"],
    ):
        """Train a Gemma 4 model from random weights (a preset's or config.json's architecture) on your text.
        Writes OUT/model (config.json, model.safetensors, tokenizer.json), OUT/train_log.jsonl and OUT/loss_curve.png."""
        from gemma4.train.run import pretrain

        check_model(config, presets=True, what="config")
        out = check_output(out)
        _relaunch(nproc)
        if threads:
            torch.set_num_threads(threads)
        opts = _options(steps=steps, lr=lr, warmup_steps=warmup, min_lr_ratio=min_lr_ratio, weight_decay=weight_decay,
                        batch_size=batch_size, grad_accum=grad_accum, seq_len=seq_len, seed=seed, dtype=dtype,
                        max_grad_norm=grad_clip, eval_every=eval_every, save_every=save_every,
                        gradient_checkpointing=checkpointing)
        console = Console(stderr=True, soft_wrap=True)
        with StepBar("train", steps, console, show=_rank0()) as bar:
            result = pretrain(config, data, out, tokenizer=tokenizer, opts=opts, eval_data=eval_data, resume=resume,
                              on_step=bar.step, on_report=_report(console))
        _summary(console, result, out, out / "model", json_out)

    @app.command("finetune")
    def finetune_cmd(
        model: str = typer.Argument(..., help="Checkpoint directory, .gguf file or short name (gemma3-270m)."),
        data: str = typer.Argument(..., help=_DATA_HELP),
        out: Path = common["out"],
        lora_rank: int = typer.Option(0, "--lora-rank", "-r", min=0, help="LoRA rank; 0 = full fine-tuning."),
        lora_alpha: Optional[float] = typer.Option(None, "--lora-alpha", help="LoRA alpha (default 2 x rank)."),
        lora_dropout: float = typer.Option(0.0, "--lora-dropout", min=0.0, max=1.0, help="Dropout on the LoRA input."),
        targets: Optional[List[str]] = typer.Option(None, "--targets", help="Modules to adapt: short names "
                                                    "(q_proj,v_proj), groups (attention, mlp, ple, all-linear), "
                                                    "MoE expert tensors (experts, experts.gate_up_proj, "
                                                    "experts.down_proj) or full paths. Default: attention and "
                                                    "MLP projections."),
        quant: Optional[str] = typer.Option(None, "--quant", help="QLoRA: quantize the frozen base to int8 or int4 "
                                            "first (needs --lora-rank)."),
        group_size: Optional[int] = typer.Option(None, help="int4 group size for --quant int4 (default 32)."),
        tokenizer: Optional[str] = typer.Option(None, "--tokenizer", "-t", help="Tokenizer (default: the checkpoint's)."),
        steps: int = common["steps"], lr: float = common["lr"],
        warmup: int = common["warmup"], min_lr_ratio: float = common["min_lr_ratio"],
        weight_decay: float = common["weight_decay"], batch_size: int = common["batch_size"],
        grad_accum: int = common["grad_accum"], seq_len: int = common["seq_len"], seed: int = common["seed"],
        resume: bool = common["resume"], eval_data: Optional[str] = common["eval_data"],
        eval_every: int = common["eval_every"], save_every: int = common["save_every"], dtype: str = common["dtype"],
        grad_clip: float = common["grad_clip"], checkpointing: bool = common["checkpointing"],
        threads: Optional[int] = common["threads"], json_out: bool = common["json_out"],
        nproc: Optional[int] = common["nproc"],
    ):
        """Fine-tune a checkpoint on your data: full fine-tuning, LoRA (--lora-rank) or QLoRA (--lora-rank with
        --quant). Writes OUT/model (full) or OUT/adapter (PEFT format: adapter_config.json +
        adapter_model.safetensors), OUT/train_log.jsonl and OUT/loss_curve.png."""
        from gemma4.train.run import finetune

        check_model(model)
        out = check_output(out, model)
        if quant not in (None, "int8", "int4"):
            raise CliError(f"--quant {quant!r}: use int8 or int4")
        if quant and not lora_rank:
            raise CliError("--quant (QLoRA) needs --lora-rank: the quantized base stays frozen")
        _relaunch(nproc)
        if threads:
            torch.set_num_threads(threads)
        opts = _options(steps=steps, lr=lr, warmup_steps=warmup, min_lr_ratio=min_lr_ratio, weight_decay=weight_decay,
                        batch_size=batch_size, grad_accum=grad_accum, seq_len=seq_len, seed=seed, dtype=dtype,
                        max_grad_norm=grad_clip, eval_every=eval_every, save_every=save_every,
                        gradient_checkpointing=checkpointing, lora_rank=lora_rank, lora_alpha=lora_alpha,
                        lora_dropout=lora_dropout, targets=targets, quant=quant, group_size=group_size)
        console = Console(stderr=True, soft_wrap=True)
        with StepBar("train", steps, console, show=_rank0()) as bar:
            result = finetune(model, data, out, tokenizer=tokenizer, opts=opts, eval_data=eval_data, resume=resume,
                              on_step=bar.step, on_report=_report(console))
        _summary(console, result, out, out / ("adapter" if lora_rank else "model"), json_out)

    @app.command("merge")
    def merge_cmd(
        model: str = typer.Argument(..., help="The base checkpoint the adapter was trained on (float weights)."),
        adapter: Path = typer.Argument(..., help="Adapter directory (adapter_config.json + adapter_model.safetensors; "
                                       "ours or PEFT's)."),
        out: Path = typer.Argument(..., help="Output checkpoint directory."),
        dtype: Optional[str] = typer.Option(None, help="Output dtype (default: the base's own)."),
    ):
        """Fold a LoRA adapter into its base model: a plain checkpoint that needs no adapter to run."""
        from gemma4._util import parse_dtype
        from gemma4.cli._common import find_tokenizer
        from gemma4.io import load_pretrained, save_pretrained
        from gemma4.train.lora import load_adapter, merge_lora

        check_model(model)
        out = check_output(out, model)
        torch_dtype = parse_dtype(dtype, "--dtype")
        base = load_pretrained(model)
        stored = base.dtype
        base = base.float()  # merge in float32, then round once to the output dtype
        paths = load_adapter(base, adapter)
        merge_lora(base)
        base = base.to(torch_dtype or stored)
        save_pretrained(base, out)
        tok = find_tokenizer(model)
        if tok is not None:
            tok.save(Path(out) / "tokenizer.json")
        Console(stderr=True, soft_wrap=True).print(f"merged {len(paths)} adapted module(s) into {out}")
