"""`gemma4 convert`: safetensors directory <-> GGUF file, tokenizer included."""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path

import torch
import typer

from gemma4.cli._common import check_model, check_output, dtype_option, progress
from gemma4.infer import use_plain_path
from gemma4.io import (FILE_TYPES, GGUFError, GGUFFile, gguf_is_bf16, load_pretrained, resolve_path, save_gguf,
                       save_pretrained)
from gemma4.text import load_tokenizer

log = logging.getLogger("gemma4")


def register(app: typer.Typer) -> None:
    @app.command("convert")
    def convert(
        src: str = typer.Argument(..., help="checkpoint directory (safetensors), .gguf file, or short name"),
        dst: str = typer.Argument(..., help="output: a path ending in .gguf, else a safetensors directory"),
        type_: str = typer.Option(None, "--type", "-t", help="GGUF tensor type of float matrices: f32, f16, bf16 or "
                                  "q8_0 (default: the model's float dtype). A quantized checkpoint keeps its own "
                                  "quantization: int4 -> Q4_1, int8 -> Q8_0"),
        dtype: str = typer.Option(None, "--dtype", help="load dtype: float32, bfloat16 or float16 (default: as "
                                  "stored, float32 for quantized GGUF)"),
    ) -> None:
        """Convert between Hugging Face safetensors checkpoints and GGUF (Gemma 4 / Gemma 3 architecture).

        The tokenizer travels with the weights: tokenizer.json into a GGUF's vocabulary, a GGUF's vocabulary
        out as tokenizer.json."""
        torch_dtype = dtype_option(dtype)
        if type_ is not None and type_.lower() not in FILE_TYPES:
            raise typer.BadParameter(f"unknown GGUF type {type_!r}; choose one of {', '.join(FILE_TYPES)}")
        to_gguf = dst.endswith(".gguf")
        if type_ is not None and not to_gguf:
            raise typer.BadParameter("--type applies to .gguf outputs; use --dtype for safetensors")
        check_model(src)
        src_path = resolve_path(src)
        check_output(dst, src_path, kind="file" if to_gguf else "dir")
        if torch_dtype is None and src_path.suffix == ".gguf" and gguf_is_bf16(src_path):
            # As stored: a plain bf16 model (load_pretrained's default would be its bf16-weight, float32
            # compute form, which saves as a "bf16" quantized checkpoint other tools do not read).
            torch_dtype = torch.bfloat16
        t0 = time.perf_counter()
        model = use_plain_path(load_pretrained(src_path, dtype=torch_dtype))
        t1 = time.perf_counter()
        if to_gguf:
            ft = type_ or {torch.bfloat16: "bf16", torch.float16: "f16"}.get(model.dtype, "f32")
            vocab = src_path if src_path.suffix == ".gguf" else (src_path / "tokenizer.json")
            if not vocab.is_file() or (vocab.suffix == ".gguf" and "tokenizer.ggml.tokens" not in GGUFFile(vocab).fields):
                vocab = None
            try:
                save_gguf(model, dst, ftype=ft, vocab_from=vocab, progress=progress)
            except GGUFError as e:
                if vocab is None or str(vocab) not in str(e):
                    raise
                # the weights can still be written: a GGUF without a vocabulary, and say why
                typer.echo(f"warning: {e}; writing the GGUF without a vocabulary", err=True)
                vocab = None
                save_gguf(model, dst, ftype=ft, vocab_from=None, progress=progress)
            q = model.config.quantization or {}
            what = f"GGUF ({ft.lower()}" + (f", {q['scheme']} kept as {'Q4_1' if q['scheme'] == 'int4' else 'Q8_0'}"
                                            if q.get("scheme") else "") + ")"
            what += f" + vocabulary from {vocab.name}" if vocab else ""
            if vocab is None:
                typer.echo(f"note: the GGUF carries no vocabulary (none usable in {src_path})", err=True)
        else:
            save_pretrained(model, dst)
            what = f"safetensors ({str(model.dtype).removeprefix('torch.')})"
            what += carry_tokenizer(src_path, Path(dst))
        t2 = time.perf_counter()
        n = sum(p.numel() for p in model.state_dict().values())
        typer.echo(f"{src} -> {dst}: {what}, {n / 1e6:.1f}M stored values, "
                   f"{model.config.num_hidden_layers} layers; load {t1 - t0:.1f}s, write {t2 - t1:.1f}s")


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                    "chat_template.jinja", "generation_config.json")


def carry_tokenizer(src: Path, dst: Path) -> str:
    """Give a converted safetensors directory its tokenizer: the GGUF vocabulary as tokenizer.json,
    or the source directory's tokenizer files. Returns a note for the summary line."""
    if src.is_dir():
        if src.resolve() == dst.resolve():
            return ""
        copied = [f for f in _TOKENIZER_FILES if (src / f).is_file()]
        for f in copied:
            shutil.copyfile(src / f, dst / f)
        return f" + {', '.join(copied)}" if copied else ""
    if "tokenizer.ggml.tokens" not in GGUFFile(src).fields:
        return ""
    try:
        load_tokenizer(src).save(dst / "tokenizer.json")
    except Exception as e:  # the weights are written; a vocabulary we cannot convert is only a warning
        log.warning("could not write tokenizer.json from %s: %s", src, e)
        return " (tokenizer not converted)"
    return " + tokenizer.json"
