"""`gemma4 generate`: run a checkpoint on a prompt from the command line, streaming the output."""

from __future__ import annotations

import io
import json
import sys
from typing import Optional

import torch
import typer
from rich.console import Console, Group
from rich.table import Table

from gemma4.cli._common import (DTYPE_HELP, CliError, check_context, check_device, check_model, check_text,
                                dtype_option, find_tokenizer, load_model, read_text_arg, slow_progress, timings_line)
from gemma4.infer import GenerationError, LatencyMonitor, SamplingError, SamplingParams, stream
from gemma4.infer.monitor import CATEGORIES
from gemma4.model.attention import ATTENTION_BACKENDS
from gemma4.io import load_drafter, load_pretrained, resolve_path
from gemma4.train import load_adapter

def latency_table(mon: LatencyMonitor, per_layer: bool = False):
    """A rich renderable: summary line plus the component breakdown (and optionally per layer)."""
    r = mon.report()
    summary = Table(title="generation latency", show_header=True)
    for col in ("TTFT", "prefill tok/s", "decode tok/s", "prompt tok", "steps", "batch"):  # fits 80 columns
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
        rows.append(("outside forward", pre["outside_forward_s"], dec["outside_forward_s"]))  # sampling, loop
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


ATTN_HELP = f"Attention backend: {', '.join(ATTENTION_BACKENDS)} (block_sparse and linear approximate)."
NO_TOKENIZER = ("{model} has no tokenizer (no tokenizer.json / tokenizer.model beside it, no vocabulary in the GGUF); "
                "copy one into the directory, or pass the prompt as token ids with --ids")


def prefill_progress(n_prompt: int, chunk: int | None):
    """A progress for the prefill when the prompt spans several chunks (a long prompt is otherwise
    seconds of silence before the first token); None for prompts that prefill in one forward."""
    return slow_progress if chunk and n_prompt > chunk else None


def sampling_params(temperature, top_k, top_p, min_p, repetition_penalty, seed) -> SamplingParams:
    try:
        return SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                              repetition_penalty=repetition_penalty, seed=seed)
    except SamplingError as e:
        raise typer.BadParameter(str(e)) from None


def chat_style(tok) -> str:
    """The turn format a tokenizer's vocabulary was made for."""
    if tok.family in ("gemma4", "gemma3"):
        return tok.family
    raise CliError("this tokenizer has no chat turn tokens (<|turn> or <start_of_turn>); --chat and `gemma4 chat` "
                   "need a Gemma 4 or Gemma 3 vocabulary")


def encode_chat(tok, messages: list[dict], think: bool) -> list[int]:
    """The prompt ids of a conversation in the model's own turn format, ready for the model's reply.

    :meth:`gemma4.Tokenizer.encode_chat`: control tokens come only from the template, so a user who types
    ``<end_of_turn>`` gets those characters as text, never a turn boundary."""
    return tok.encode_chat(messages, enable_thinking=think, style=chat_style(tok))


def register(app: typer.Typer) -> None:
    @app.command("generate")
    def generate_cmd(
        prompt: Optional[str] = typer.Argument(None, help="Prompt text, or - to read it from standard input "
                                               "(needs a tokenizer beside the checkpoint)."),
        model: str = typer.Option(..., "--model", "-m", help="Checkpoint directory, .gguf file or short name "
                                  "(gemma3-270m)."),
        file: Optional[str] = typer.Option(None, "--file", "-f", help="Read the prompt from this UTF-8 file."),
        ids: Optional[str] = typer.Option(None, "--ids", help='Prompt as token ids, e.g. "2 651 1234".'),
        chat: bool = typer.Option(False, "--chat", help="Treat the prompt as one user turn in the model's chat "
                                  "format and print the reply (one turn; `gemma4 chat` for a conversation)."),
        system: Optional[str] = typer.Option(None, "--system", help="System prompt (with --chat)."),
        think: bool = typer.Option(False, "--think/--no-think", help="Let a Gemma 4 model think before "
                                   "answering (with --chat)."),
        max_new_tokens: int = typer.Option(64, "--max-new-tokens", "-n", min=1, help="Most tokens to generate."),
        temperature: float = typer.Option(0.0, help="0 = greedy."),
        top_k: int = typer.Option(0, help="Keep the k most likely tokens (0 = off)."),
        top_p: float = typer.Option(1.0, help="Nucleus sampling mass (1 = off)."),
        min_p: float = typer.Option(0.0, help="Drop tokens below min_p x the top probability (0 = off)."),
        repetition_penalty: float = typer.Option(1.0, help="> 1 discourages repeats (1 = off)."),
        seed: Optional[int] = typer.Option(None, help="Random seed for reproducible sampling."),
        stop: list[str] = typer.Option([], "--stop", help="Stop string (repeatable; needs a tokenizer)."),
        no_bos: bool = typer.Option(False, "--no-bos", help="Do not prepend <bos> to a text prompt."),
        echo: bool = typer.Option(True, "--echo/--no-echo", help="Print the prompt before the continuation."),
        timings: bool = typer.Option(True, "--timings/--no-timings", help="Print a timings line (load, prefill "
                                     "and decode speed) on stderr at the end."),
        dtype: Optional[str] = typer.Option(None, help=DTYPE_HELP + ". Default: as stored; a quantized GGUF runs "
                                            "quantized (Q4_K as int4, the rest int8): --dtype float32 for full precision."),
        device: str = typer.Option("cpu", help="cpu, cuda, cuda:1, mps, ..."),
        attn: Optional[str] = typer.Option(None, "--attn", help=ATTN_HELP),
        prefill_chunk: int = typer.Option(512, min=1, help="Prompt tokens per prefill forward."),
        threads: Optional[int] = typer.Option(None, min=1, help="CPU threads (torch.set_num_threads)."),
        no_pack: bool = typer.Option(False, "--no-pack", help="Keep plain weights (skip the oneDNN CPU fast path)."),
        draft: Optional[str] = typer.Option(None, "--draft", help="Speculative decoding: an MTP drafter checkpoint "
                                            "(gemma4_assistant) or a smaller Gemma model with the same vocabulary. "
                                            "Greedy output is identical to plain decoding."),
        draft_tokens: int = typer.Option(4, "--draft-tokens", min=1, help="Tokens drafted per round (with --draft)."),
        adapter: Optional[str] = typer.Option(None, "--adapter", help="A LoRA adapter directory (PEFT format, from "
                                              "`gemma4 finetune --lora-rank`) applied to the model before generating."),
        stats: bool = typer.Option(False, "--stats", help="Print latency and the per-component breakdown."),
        as_json: bool = typer.Option(False, "--json", help="Print one JSON object (ids, text, stats) instead of streaming."),
    ):
        """Generate a continuation of a prompt (or, with --chat, a reply), streamed as it is produced.

        The prompt comes from the argument, from standard input (-) or from --file; a timings line follows."""
        torch_dtype = dtype_option(dtype)
        if attn is not None and attn not in ATTENTION_BACKENDS:
            raise typer.BadParameter(f"--attn {attn!r}: choose one of {', '.join(ATTENTION_BACKENDS)}")
        sources = [n for n, v in (("a prompt argument", prompt), ("--file", file), ("--ids", ids)) if v is not None]
        if not sources:
            raise typer.BadParameter("no prompt: give the text as an argument, - to read standard input, "
                                     "--file PATH, or token ids with --ids")
        if len(sources) > 1:
            raise typer.BadParameter(f"give one prompt source, not {' and '.join(sources)}")
        if chat and ids is not None:
            raise typer.BadParameter("--chat takes text (the user's turn), not --ids")
        if system is not None and not chat:
            raise typer.BadParameter("--system goes with --chat")
        check_model(model)
        check_device(device)
        if threads:
            torch.set_num_threads(threads)
        params = sampling_params(temperature, top_k, top_p, min_p, repetition_penalty, seed)
        if prompt == "-":
            text = read_text_arg("-")
        elif file is not None:
            text = read_text_arg(file, "--file")
        else:
            text = None if prompt is None else check_text(prompt)

        tok = find_tokenizer(model)
        if ids is not None:
            try:
                prompt_ids = [int(x) for x in ids.replace(",", " ").split()]
            except ValueError:
                raise typer.BadParameter(f"--ids must be integers separated by spaces, got {ids!r}") from None
            if not prompt_ids:
                raise typer.BadParameter("--ids is empty")
        else:
            if tok is None:
                raise CliError(NO_TOKENIZER.format(model=model))
            if chat:
                msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}]
                prompt_ids = encode_chat(tok, msgs, think)
            else:
                prompt_ids = tok.encode(text, add_bos=not no_bos)
        if stop and tok is None:
            raise typer.BadParameter("--stop needs a tokenizer next to the checkpoint")

        # An adapter wraps plain linears, so it goes on before the fast path (generation packs afterwards).
        m, load_s, _how = load_model(model, dtype=torch_dtype, device=device, attn=attn,
                                     pack=not no_pack and adapter is None)
        if adapter is not None:
            load_adapter(m, resolve_path(adapter))
        check_context(m, len(prompt_ids), max_new_tokens)
        spec = {}
        if draft is not None:
            if chat or stop:
                raise typer.BadParameter("--draft works with a plain prompt and stop tokens (not --chat or --stop)")
            spec = load_draft(draft, device=device, dtype=torch_dtype)
            spec["num_draft_tokens"] = draft_tokens
        if chat:
            reply = stream_chat_reply(m, tok, prompt_ids, max_new_tokens, params,
                                      io.StringIO() if as_json else sys.stdout, prefill_chunk=prefill_chunk,
                                      stats=stats)
            if as_json:
                obj = {"prompt_ids": prompt_ids, "ids": reply.ids, "finish_reason": reply.finish_reason,
                       "text": reply.parsed.content, "thinking": reply.parsed.thinking,
                       "stats": dict(reply.report, load_s=load_s)}
                obj["stats"].pop("per_layer", None)
                typer.echo(json.dumps(obj))
                return
            if timings:
                typer.echo(timings_line(reply.report, load_s), err=True)
            return
        if echo and text is not None and not as_json:
            sys.stdout.write(text)
            sys.stdout.flush()
        mon = LatencyMonitor(m, breakdown=stats)
        with mon:
            try:
                g = stream(m, [prompt_ids], max_new_tokens, params=params, stop_strings=stop or None,
                           tokenizer=tok, prefill_chunk=prefill_chunk, monitor=mon, fast=not no_pack,
                           progress=None if spec else prefill_progress(len(prompt_ids), prefill_chunk), **spec)
            except GenerationError as e:
                raise typer.BadParameter(str(e)) from None
            text_out = _TextStreamer(tok, sys.stdout) if (tok is not None and not as_json) else None
            for step in g:
                t = step[0]
                if t is None or as_json:
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
            if stats or timings:
                r = mon.report()
                r.pop("per_layer", None)
                r["load_s"] = load_s
                obj["stats"] = r
            typer.echo(json.dumps(obj))
            return
        if stats:
            Console(file=sys.stdout).print(latency_table(mon))  # the terminal width (80 when piped)
        extra = ""
        if spec:
            st = g.stats
            extra = f", {st.acceptance_rate:.0%} of drafts accepted, {st.tokens_per_round:.2f} tokens per target forward"
        typer.echo(f"[{len(out_ids)} tokens, {g.finish_reasons[0]}{extra}]", err=True)
        if timings:
            typer.echo(timings_line(mon.report(), load_s), err=True)


def load_draft(path: str, device: str, dtype) -> dict:
    """``--draft``: an MTP drafter directory (config.json model_type gemma4_assistant) -> drafter=, anything
    else load_pretrained accepts -> draft_model=."""
    p = resolve_path(path)
    cfg = p / "config.json"
    if p.is_dir() and cfg.is_file() and '"gemma4_assistant"' in cfg.read_text(encoding="utf-8", errors="replace"):
        return {"drafter": load_drafter(p, dtype=dtype, device=device)}
    return {"draft_model": load_pretrained(p, dtype=dtype, device=device)}


class ChatReply:
    """One streamed reply: the parsed turn, the generated ids, why it stopped, the latency report."""

    def __init__(self, parsed, ids, finish_reason, report, interrupted=False):
        self.parsed, self.ids, self.finish_reason, self.report = parsed, ids, finish_reason, report
        self.interrupted = interrupted


def stream_chat_reply(model, tok, prompt_ids: list[int], max_new_tokens: int, params: SamplingParams, out, *,
                      prefill_chunk: int = 512, stats: bool = False) -> ChatReply:
    """Generate a model turn and print it as it comes: the answer on ``out``, thinking (Gemma 4) dimmed
    between [thinking] markers. Ctrl-C ends the reply early and keeps what was written."""
    from gemma4.serve.parser import IncrementalDetokenizer, StreamParser

    parser, detok = StreamParser(), IncrementalDetokenizer(lambda ids: tok.decode(ids))
    mon = LatencyMonitor(model, breakdown=stats)
    state = {"in_thought": False}

    def show(deltas):
        for d in deltas:
            if d.kind == "reasoning":
                if not state["in_thought"]:
                    out.write("[thinking] ")
                    state["in_thought"] = True
                out.write(d.text)
            elif d.kind == "content":
                if state["in_thought"]:
                    out.write("\n[/thinking]\n")
                    state["in_thought"] = False
                out.write(d.text)
            out.flush()

    interrupted = False
    with mon:
        g = stream(model, [prompt_ids], max_new_tokens, params=params, tokenizer=tok, prefill_chunk=prefill_chunk,
                   monitor=mon, progress=prefill_progress(len(prompt_ids), prefill_chunk))
        try:
            for step in g:
                if step[0] is not None:
                    show(parser.feed(detok.push(step[0])))
        except KeyboardInterrupt:
            interrupted = True
    show(parser.feed(detok.flush()))
    show(parser.finish())
    if state["in_thought"]:
        out.write("\n[/thinking]\n")
    out.write("\n")
    out.flush()
    reason = "interrupted" if interrupted else g.finish_reasons[0]
    return ChatReply(parser.result(), list(g.tokens[0]), reason, mon.report(), interrupted)
