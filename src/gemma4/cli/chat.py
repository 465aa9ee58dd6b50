"""`gemma4 chat`: a conversation with a model in the terminal.

Each turn renders the whole conversation in the model's own turn format (:func:`gemma4.render_chat`:
Gemma 4 ``<|turn>`` or Gemma 3 ``<start_of_turn>``, chosen from the vocabulary) and streams the reply
(:func:`gemma4.stream`). Tools are off (nothing is declared to the model). Line editing and history come
from Python's ``readline`` where the platform has it; no other dependency."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer

from gemma4._util import atomic_write_text, cache_dir
from gemma4.cli._common import (DTYPE_HELP, CliError, check_device, check_model, check_text, dtype_option,
                                find_tokenizer, load_model, timings_line)
from gemma4.cli.generate import ATTN_HELP, NO_TOKENIZER, chat_style, encode_chat, sampling_params, stream_chat_reply
from gemma4.model.attention import ATTENTION_BACKENDS

COMMANDS = {
    "/reset": "forget the conversation (the system prompt stays)",
    "/save FILE": "write the conversation to FILE as JSON",
    "/system TEXT": "replace the system prompt (and start over)",
    "/think, /no-think": "let a Gemma 4 model think before answering, or not",
    "/help": "this list",
    "/exit": "leave (also /quit or Ctrl-D)",
}


def _history_file() -> Path:
    return cache_dir() / "chat_history"


def _setup_readline() -> None:
    """Arrow-key editing and a history across sessions, on a terminal only (never in pipes or tests)."""
    if not sys.stdin.isatty():
        return
    try:
        import readline
    except ImportError:  # Windows without pyreadline: plain input() still works
        return
    hist = _history_file()
    try:
        hist.parent.mkdir(parents=True, exist_ok=True)
        if hist.is_file():
            readline.read_history_file(hist)
        readline.set_history_length(1000)
    except OSError:
        return
    import atexit

    atexit.register(lambda: _save_history(readline, hist))


def _save_history(readline, hist: Path) -> None:
    try:
        readline.write_history_file(hist)
    except OSError:
        pass


def _fit(tok, messages: list[dict], think: bool, limit: int) -> tuple[list[int], int]:
    """Prompt ids of the conversation, dropping the oldest exchanges (never the system prompt or the
    last user turn) until it fits ``limit`` tokens. Returns (ids, turns dropped)."""
    dropped = 0
    while True:
        ids = encode_chat(tok, messages, think)
        first = 1 if messages and messages[0]["role"] == "system" else 0
        if len(ids) <= limit or len(messages) - first <= 1:
            return ids, dropped
        del messages[first:first + 2]  # the oldest user turn and its reply
        dropped += 1


def register(app: typer.Typer) -> None:
    @app.command("chat")
    def chat_cmd(
        model: str = typer.Argument(..., help="Checkpoint directory, .gguf file or short name (gemma3-270m)."),
        system: Optional[str] = typer.Option(None, "--system", "-s", help="System prompt."),
        think: bool = typer.Option(False, "--think/--no-think", help="Let a Gemma 4 model think before answering "
                                   "(shown between [thinking] markers)."),
        max_new_tokens: int = typer.Option(512, "--max-new-tokens", "-n", min=1, help="Most tokens per reply."),
        temperature: float = typer.Option(0.7, help="0 = greedy."),
        top_k: int = typer.Option(64, help="Keep the k most likely tokens (0 = off)."),
        top_p: float = typer.Option(0.95, help="Nucleus sampling mass (1 = off)."),
        min_p: float = typer.Option(0.0, help="Drop tokens below min_p x the top probability (0 = off)."),
        repetition_penalty: float = typer.Option(1.0, help="> 1 discourages repeats (1 = off)."),
        seed: Optional[int] = typer.Option(None, help="Random seed for reproducible sampling."),
        dtype: Optional[str] = typer.Option(None, help=DTYPE_HELP + ". Default: as stored; a quantized GGUF runs "
                                            "quantized: --dtype float32 for full precision."),
        device: str = typer.Option("cpu", help="cpu, cuda, cuda:1, mps, ..."),
        attn: Optional[str] = typer.Option(None, "--attn", help=ATTN_HELP),
        threads: Optional[int] = typer.Option(None, min=1, help="CPU threads (torch.set_num_threads)."),
        timings: bool = typer.Option(False, "--timings/--no-timings", help="A timings line after each reply."),
    ):
        """Chat with a model: type a message, read the streamed reply. /help lists the commands
        (/reset, /save FILE, /exit). Tools are off. A base (not chat-tuned) model such as gemma3-270m
        answers in the chat format but was never taught to follow it: expect rambling."""
        torch_dtype = dtype_option(dtype)
        if attn is not None and attn not in ATTENTION_BACKENDS:
            raise typer.BadParameter(f"--attn {attn!r}: choose one of {', '.join(ATTENTION_BACKENDS)}")
        check_model(model)
        check_device(device)
        if system is not None:
            check_text(system, "system prompt")
        if threads:
            import torch

            torch.set_num_threads(threads)
        params = sampling_params(temperature, top_k, top_p, min_p, repetition_penalty, seed)
        tok = find_tokenizer(model)
        if tok is None:
            raise CliError(NO_TOKENIZER.format(model=model).replace(", or pass the prompt as token ids with --ids", ""))
        style = chat_style(tok)
        if think and style != "gemma4":
            typer.echo("note: --think needs the Gemma 4 format; this vocabulary is Gemma 3's: ignored", err=True)
            think = False
        m, load_s, how = load_model(model, dtype=torch_dtype, device=device, attn=attn)
        limit = m.config.max_position_embeddings - max_new_tokens
        if limit < 16:
            raise typer.BadParameter(f"--max-new-tokens {max_new_tokens} leaves no room for a prompt in the "
                                     f"model's context of {m.config.max_position_embeddings} tokens")
        _setup_readline()
        interactive = sys.stdin.isatty()
        typer.echo(f"{model}: {style} chat format, weights {how}, loaded in {load_s:.1f} s. "
                   "Type /help for commands, /exit to leave.", err=True)
        messages: list[dict] = [{"role": "system", "content": system}] if system else []
        out = sys.stdout
        while True:
            try:
                line = input("> " if interactive else "")
            except EOFError:
                if interactive:
                    out.write("\n")
                break
            except KeyboardInterrupt:  # at the prompt Ctrl-C clears the line, as in a shell
                out.write("\n")
                continue
            line = line.strip()
            if not line:
                continue
            if line.startswith("/"):
                cmd, _, arg = line.partition(" ")
                arg = arg.strip()
                if cmd in ("/exit", "/quit"):
                    break
                if cmd == "/reset":
                    messages = [m_ for m_ in messages if m_["role"] == "system"]
                    typer.echo("(conversation cleared)", err=True)
                elif cmd == "/save":
                    if not arg:
                        typer.echo("usage: /save FILE", err=True)
                        continue
                    path = Path(arg).expanduser()
                    if path.is_dir():
                        typer.echo(f"/save {arg}: is a directory; give a file name", err=True)
                        continue
                    obj = {"model": model, "format": style, "thinking": think, "messages": messages}
                    try:
                        atomic_write_text(path, json.dumps(obj, ensure_ascii=False, indent=2) + "\n")
                    except OSError as e:
                        typer.echo(f"/save {arg}: {e.strerror or e}", err=True)
                        continue
                    typer.echo(f"(saved {len(messages)} messages to {path})", err=True)
                elif cmd == "/system":
                    messages = ([{"role": "system", "content": arg}] if arg else [])
                    typer.echo("(system prompt " + ("set" if arg else "removed") + "; conversation cleared)", err=True)
                elif cmd in ("/think", "/no-think"):
                    if style != "gemma4":
                        typer.echo("(thinking needs the Gemma 4 format)", err=True)
                    else:
                        think = cmd == "/think"
                        typer.echo(f"(thinking {'on' if think else 'off'})", err=True)
                elif cmd == "/help":
                    for k, v in COMMANDS.items():
                        typer.echo(f"  {k:<18} {v}", err=True)
                else:
                    typer.echo(f"unknown command {cmd}; /help lists them", err=True)
                continue
            try:
                check_text(line, "message")
            except CliError as e:
                typer.echo(f"error: {e}", err=True)
                continue
            messages.append({"role": "user", "content": line})
            ids, dropped = _fit(tok, messages, think, limit)
            if dropped:
                typer.echo(f"(the conversation outgrew the context: dropped the {dropped} oldest exchange(s))", err=True)
            reply = stream_chat_reply(m, tok, ids, max_new_tokens, params, out)
            messages.append({"role": "assistant", "content": reply.parsed.content})
            if reply.interrupted:
                typer.echo("(reply interrupted)", err=True)
            if timings:
                typer.echo(timings_line(reply.report), err=True)
