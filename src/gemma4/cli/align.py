"""`gemma4 align ...`: safety alignment data and stages (issue 15)."""

from __future__ import annotations

import typer

align_app = typer.Typer(help="Safety alignment: curated data, then SFT / DPO / Lagrangian stages.",
                        no_args_is_help=True)


def register(app: typer.Typer) -> None:
    app.add_typer(align_app, name="align")
