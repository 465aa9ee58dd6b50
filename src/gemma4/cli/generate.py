"""`gemma4 generate`: run a checkpoint on a prompt from the command line, streaming the output."""

from __future__ import annotations

import json
import sys
from typing import Optional

import torch
import typer
from rich.console import Console, Group
from rich.table import Table

from gemma4.cli._common import DTYPE_HELP, dtype_option, find_tokenizer
from gemma4.infer import GenerationError, LatencyMonitor, SamplingError, SamplingParams, stream, use_fast_path
from gemma4.infer.monitor import CATEGORIES
from gemma4.io import load_pretrained

def latency_table(mon: LatencyMonitor, per_layer: bool = False):
    """A rich renderable: summary line plus the component breakdown (and optionally per layer)."""
    r = mon.report()
    summary = Table(title="generation latency", show_header=True)
    for col in ("TTFT", "prefill tok/s", "decode tok/s", "prompt tokens", "decode steps", "batch"):
        summary.add_column(col, justify="right")
    summary.add_row(f"{r['ttft_s'] * 1e3:.1f} ms", f"{r['prefill_tok_s']:.1f}", f"{r['decode_tok_s']:.2f}",
                    str(r["prompt_tokens"]), str(r["decode_steps"]), str(r["batch"]))
    parts = [summary]
    if "breakdown" in r:
        steps = max(r["decode_steps"], 1)
        t = Table(title="where the time goes (forward hooks)")
        t.add_column("component")
        t.add_column("prefill ms", justify="right")
        t.add_column("prefill %", justify="right")
        t.add_column("decode ms/step", justify="right")
        t.add_column("decode %", justify="right")
        pre, dec = r["breakdown"]["prefill"], r["breakdown"]["decode"]
        pw = max(r["prefill_s"], 1e-12)
        dw = max(r["decode_s"], 1e-12)
        rows = [(c, pre["seconds"][c], dec["seconds"][c]) for c in CATEGORIES]
        rows.append(("outside forward (sampling, loop)", pre["outside_forward_s"], dec["outside_forward_s"]))
        for name, a, b in rows:
            if a == 0 and b == 0:
                continue
            t.add_row(name, f"{a * 1e3:.2f}", f"{100 * a / pw:.1f}", f"{b * 1e3 / steps:.3f}", f"{100 * b / dw:.1f}")
        parts.append(t)
        if per_layer:
            lt = Table(title="decode ms/step by layer")
            lt.add_column("layer", justify="right")
            cats = [c for c in ("attention", "mlp", "moe", "ple", "norms") if any(
                c in d for d in r["per_layer"]["decode"].values())]
            for c in cats:
                lt.add_column(c, justify="right")
            for i, d in r["per_layer"]["decode"].items():
                lt.add_row(str(i), *[f"{d.get(c, 0.0) * 1e3 / steps:.3f}" for c in cats])
            parts.append(lt)
    return Group(*parts)


class _TextStreamer:
    """Prints the text of newly generated ids, holding back an incomplete UTF-8 character."""

    def __init__(self, tokenizer, out):
        self.tok, self.out = tokenizer, out
        self.ids: list[int] = []
        self.printed = 0

    def put(self, token: int, final: bool = False) -> None:
        self.ids.append(token)
        self.flush(final)

    def flush(self, final: bool = False) -> None:
        text = self.tok.decode(self.ids, skip_special_tokens=True)
        if not final and text.endswith("\ufffd"):
            return  # a multi-byte character split across tokens: wait for the rest
        self.out.write(text[self.printed:])
        self.out.flush()
        self.printed = len(text)


def register(app: typer.Typer) -> None:
    @app.command("generate")
    def generate_cmd(
        prompt: Optional[str] = typer.Argument(None, help="Prompt text (needs a tokenizer next to the checkpoint)."),
        model: str = typer.Option(..., "--model", "-m", help="Checkpoint directory, .gguf file or short name."),
        ids: Optional[str] = typer.Option(None, "--ids", help='Prompt as token ids, e.g. "2 651 1234".'),
        max_new_tokens: int = typer.Option(64, "--max-new-tokens", "-n", help="Most tokens to generate."),
        temperature: float = typer.Option(0.0, help="0 = greedy."),
        top_k: int = typer.Option(0, help="Keep the k most likely tokens (0 = off)."),
        top_p: float = typer.Option(1.0, help="Nucleus sampling mass (1 = off)."),
        min_p: float = typer.Option(0.0, help="Drop tokens below min_p x the top probability (0 = off)."),
        repetition_penalty: float = typer.Option(1.0, help="> 1 discourages repeats (1 = off)."),
        seed: Optional[int] = typer.Option(None, help="Random seed for reproducible sampling."),
        stop: list[str] = typer.Option([], "--stop", help="Stop string (repeatable; needs a tokenizer)."),
        no_bos: bool = typer.Option(False, "--no-bos", help="Do not prepend <bos> to a text prompt."),
        dtype: Optional[str] = typer.Option(None, help=DTYPE_HELP + " (default: the checkpoint's)."),
        device: str = typer.Option("cpu", help="cpu, cuda, ..."),
        prefill_chunk: int = typer.Option(512, help="Prompt tokens per prefill forward."),
        threads: Optional[int] = typer.Option(None, help="torch.set_num_threads."),
        no_pack: bool = typer.Option(False, "--no-pack", help="Keep plain weights (skip the oneDNN CPU fast path)."),
        stats: bool = typer.Option(False, "--stats", help="Print latency and the per-component breakdown."),
        as_json: bool = typer.Option(False, "--json", help="Print one JSON object (ids, text, stats) instead of streaming."),
    ):
        """Generate a continuation of a prompt, streamed as it is produced."""


        if threads:
            torch.set_num_threads(threads)
        torch_dtype = dtype_option(dtype)
        if (prompt is None) == (ids is None):
            raise typer.BadParameter("give either a text prompt or --ids (not both)")
        try:
            params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                                    repetition_penalty=repetition_penalty, seed=seed)
        except SamplingError as e:
            raise typer.BadParameter(str(e)) from None

        tok = find_tokenizer(model)
        if ids is not None:
            try:
                prompt_ids = [int(x) for x in ids.replace(",", " ").split()]
            except ValueError:
                raise typer.BadParameter(f"--ids must be integers separated by spaces, got {ids!r}") from None
        else:
            if tok is None:
                raise typer.BadParameter(f"no tokenizer found for {model}; pass the prompt as token ids with --ids")
            prompt_ids = tok.encode(prompt, add_bos=not no_bos)
        if stop and tok is None:
            raise typer.BadParameter("--stop needs a tokenizer next to the checkpoint")

        m = load_pretrained(model, dtype=torch_dtype, device=device)
        if not no_pack:

            use_fast_path(m)  # no-op off CPU or where oneDNN cannot run the dtype
        mon = LatencyMonitor(m, breakdown=stats)
        with mon:
            try:
                g = stream(m, [prompt_ids], max_new_tokens, params=params, stop_strings=stop or None,
                           tokenizer=tok, prefill_chunk=prefill_chunk, monitor=mon)
            except GenerationError as e:
                raise typer.BadParameter(str(e)) from None
            text_out = _TextStreamer(tok, sys.stdout) if (tok is not None and not as_json) else None
            for step in g:
                t = step[0]
                if t is None:
                    continue
                if as_json:
                    continue
                if text_out is not None:
                    text_out.put(t, final=g.done)
                else:
                    sys.stdout.write(f"{t} ")
                    sys.stdout.flush()
        if not as_json:
            sys.stdout.write("\n")
        out_ids = g.tokens[0]
        if as_json:
            obj = {"prompt_ids": prompt_ids, "ids": out_ids, "finish_reason": g.finish_reasons[0]}
            if tok is not None:
                obj["text"] = tok.decode(out_ids, skip_special_tokens=True)
            if stats:
                r = mon.report()
                r.pop("per_layer", None)
                obj["stats"] = r
            typer.echo(json.dumps(obj))
            return
        if stats:
            Console(file=sys.stdout, width=110).print(latency_table(mon))
        else:
            typer.echo(f"[{len(out_ids)} tokens, {g.finish_reasons[0]}]", err=True)
