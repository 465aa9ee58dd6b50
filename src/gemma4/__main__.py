"""`python -m gemma4 ...` is the `gemma4` command (what `torchrun -m gemma4 ...` runs)."""

from gemma4.cli import app

app(prog_name="gemma4")
