"""`gemma4 classify`: the ShieldGemma-style safety classifier built on our model (issue 15)."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    pass
