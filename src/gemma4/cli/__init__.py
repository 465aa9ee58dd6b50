"""The `gemma4` command line: the only package that imports typer and draws with rich. Each command
module adds its commands through ``register(app)``."""

from __future__ import annotations

import typer

from gemma4.cli import convert, generate, info, quant, tokens

app = typer.Typer(
    help="Gemma 4 in plain PyTorch: inspect architectures, run, measure and compress models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def _main() -> None:
    """Gemma 4 in plain PyTorch. Start with `gemma4 info e2b` or `gemma4 generate --model gemma3-270m "Hello"`."""


for _module in (info, generate, convert, tokens, quant):
    _module.register(app)
