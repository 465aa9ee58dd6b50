"""The `gemma4` command line. Each tool module adds its own commands through `register(app)`."""

from __future__ import annotations

import typer

app = typer.Typer(
    help="Gemma 4 in plain PyTorch: inspect architectures, run, measure and compress models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

# Command modules (one line each; a module's `register(app)` adds its commands).
