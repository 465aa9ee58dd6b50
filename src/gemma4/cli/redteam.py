"""`gemma4 redteam`: attack a model or an OpenAI-compatible endpoint and report success rates (issue 15)."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    pass
