"""The `gemma4` command line. Each tool module adds its own commands through `register(app)`."""

from __future__ import annotations

import typer

app = typer.Typer(
    help="Gemma 4 in plain PyTorch: inspect architectures, run, measure and compress models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def _main() -> None:
    """Gemma 4 in plain PyTorch. Start with `gemma4 info e2b` or `gemma4 generate --model gemma3-270m "Hello"`."""


# Command modules (one line each; a module's `register(app)` adds its commands).
from gemma4.info import register as _reg_info; _reg_info(app)  # noqa: E402
from gemma4.generate import register as _reg_generate; _reg_generate(app)  # noqa: E402
from gemma4.gguf_io import register as _reg_gguf; _reg_gguf(app)  # noqa: E402
from gemma4.token_analysis import register as _reg_tokens; _reg_tokens(app)  # noqa: E402
from gemma4.cli_quant import register as _reg_quant; _reg_quant(app)  # noqa: E402
