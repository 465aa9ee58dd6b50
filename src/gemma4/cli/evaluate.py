"""`gemma4 eval`: perplexity of a model on a text file.

The text is tokenized once (with <bos>) and cut into windows of ``--context`` tokens; each window is
read from an empty cache in chunks of ``--chunk`` tokens (the cache carries context across chunks), and
every token after a window's first is scored. The output head runs on 128 rows at a time, so memory
stays at one chunk's activations plus a [128, vocab] block of logits."""

from __future__ import annotations

import json
import math
import time
from typing import Optional

import torch
import torch.nn.functional as F
import typer

from gemma4.cli._common import (DTYPE_HELP, CliError, check_device, check_model, dtype_option, find_tokenizer,
                                load_model, progress, read_text_arg)

_HEAD_ROWS = 128


@torch.no_grad()
def window_nll(model, ids: list[int], chunk: int) -> torch.Tensor:
    """NLL (float64 sum per token, [len(ids) - 1]) of each next token of one window."""
    x = torch.tensor([ids], device=model.device)
    cache = model.new_cache()
    out = []
    t = x.shape[1]
    for s in range(0, t - 1, chunk):
        e = min(t - 1, s + chunk)
        h = model.model(x[:, s:e], cache=cache)  # [1, n, H]
        for r in range(0, h.shape[1], _HEAD_ROWS):
            lg = model.logits(h[:, r:r + _HEAD_ROWS]).float()[0]  # [rows, V]
            tgt = x[0, s + r + 1:s + r + 1 + lg.shape[0]]
            out.append(F.cross_entropy(lg, tgt, reduction="none").double())
    return torch.cat(out)


def register(app: typer.Typer) -> None:
    @app.command("eval")
    def eval_cmd(
        model: str = typer.Argument(..., help="Checkpoint directory, .gguf file or short name (gemma3-270m)."),
        file: str = typer.Argument(..., help="UTF-8 text file to score (- for standard input)."),
        context: int = typer.Option(1024, "--context", "-c", min=2, help="Tokens per window (each window starts "
                                    "from an empty cache)."),
        chunk: int = typer.Option(512, min=1, help="Tokens per forward inside a window."),
        max_tokens: Optional[int] = typer.Option(None, min=2, help="Score only the first N tokens of the text."),
        dtype: Optional[str] = typer.Option(None, help=DTYPE_HELP + ". Default: as stored; a quantized GGUF runs "
                                            "quantized: --dtype float32 for full precision."),
        device: str = typer.Option("cpu", help="cpu, cuda, cuda:1, mps, ..."),
        threads: Optional[int] = typer.Option(None, min=1, help="CPU threads (torch.set_num_threads)."),
        json_out: bool = typer.Option(False, "--json", help="Print one JSON object."),
    ):
        """Perplexity of a model on a text file (lower is better), with bits per byte to compare models
        whose tokenizers differ."""
        torch_dtype = dtype_option(dtype)
        check_model(model)
        check_device(device)
        if threads:
            torch.set_num_threads(threads)
        text = read_text_arg(file, "text file")
        tok = find_tokenizer(model)
        if tok is None:
            raise CliError(f"{model} has no tokenizer (tokenizer.json / tokenizer.model beside it, or a GGUF "
                           "vocabulary): eval needs one to read the text")
        ids = tok.encode(text, add_bos=True)
        if max_tokens:
            ids = ids[:max_tokens]
        if len(ids) < 2:
            raise CliError(f"{file}: too short to score (it is {len(ids)} token)")
        m, load_s, how = load_model(model, dtype=torch_dtype, device=device)
        if context > m.config.max_position_embeddings:
            typer.echo(f"warning: --context {context} exceeds the model's maximum of "
                       f"{m.config.max_position_embeddings} tokens", err=True)
        windows = [ids[s:s + context] for s in range(0, len(ids), context)]
        windows = [w for w in windows if len(w) >= 2]
        t0 = time.perf_counter()
        total, n = 0.0, 0
        for w in progress(windows, f"scoring {len(ids)} tokens"):
            nll = window_nll(m, w, chunk)
            total += float(nll.sum())
            n += nll.numel()
        secs = time.perf_counter() - t0
        mean = total / n
        n_bytes = len(text.encode("utf-8"))
        res = {"model": model, "file": file, "weights": how, "tokens_scored": n, "windows": len(windows),
               "context": context, "nll": mean, "perplexity": math.exp(mean),
               "bits_per_byte": total / math.log(2) / n_bytes if n_bytes else None,
               "seconds": secs, "tokens_per_s": n / secs if secs > 0 else None, "load_s": load_s}
        if max_tokens:
            res["bits_per_byte"] = None  # the bytes of a cut text are not the scored ones
        if json_out:
            typer.echo(json.dumps(res))
            return
        bpb = "" if res["bits_per_byte"] is None else f", {res['bits_per_byte']:.4f} bits/byte"
        typer.echo(f"perplexity {res['perplexity']:.4f} (NLL {mean:.4f}{bpb}) over {n} tokens in {len(windows)} "
                   f"window(s) of {context}; {secs:.1f} s, {res['tokens_per_s']:.0f} tok/s; weights {how}")
