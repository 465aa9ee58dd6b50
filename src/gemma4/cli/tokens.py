"""`gemma4 tokens analyze|train`: how a tokenizer splits your text, and a domain tokenizer to compare."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from gemma4.cli._common import CliError, need_matplotlib
from gemma4.text.analysis import Report, analyze, compare_reports, plot_pieces, read_text_file, resolve_tokenizer, train_bpe


tokens_app = typer.Typer(
    help="Measure how a tokenizer splits your text (fertility, compression, byte fallback) and train a "
         "domain tokenizer to compare against.",
    no_args_is_help=True,
)

_TOKENIZER_HELP = ("Tokenizer: 'gemma4' (default: the Gemma 4 vocabulary, fetched and cached on first use), "
                   "'gemma3' (the Gemma 3 vocabulary from the Gemma 3 270M GGUF), or a path to a "
                   "tokenizer.json, tokenizer.model, .gguf file or a directory holding one.")


def _fail(msg: str) -> None:
    Console(stderr=True, soft_wrap=True).print(f"[bold red]error:[/] {escape(msg)}", highlight=False, markup=True)
    raise typer.Exit(2)


def _plot_ready(plot: Path) -> None:
    try:
        need_matplotlib("--plot")
    except CliError as e:
        _fail(str(e))
    if Path(plot).is_dir():
        _fail(f"--plot {plot}: is a directory; give a .png file name")


def _read_all(files: Sequence[Path]) -> dict[str, str]:
    texts = {}
    for f in files:
        name = Path(f).name if Path(f).name not in texts else str(f)
        texts[name] = read_text_file(f)
    return texts


def _fmt(v: float | None, pct: bool = False) -> str:
    if v is None:
        return "-"
    return f"{v * 100:.2f}%" if pct else f"{v:.3f}"


def _print_report(report: Report, top: int) -> None:
    con = Console()
    con.print(f"[bold]Tokenizer:[/] {report.tokenizer}")
    for title, groups in (("Per file / domain", report.files), ("Per script", report.scripts)):
        t = Table(title=title)
        t.add_column("name", overflow="fold")
        # Short headers keep the table readable in an 80-column terminal (see the module docstring).
        for col in ("words", "tokens", "fertility", "bytes/tok", "chars/tok", "byte fb", "1-piece"):
            t.add_column(col, justify="right")
        rows = list(groups.values()) + ([report.total] if groups is report.files else [])
        for st in rows:
            t.add_row(st.name, str(st.words), str(st.tokens), _fmt(st.fertility), _fmt(st.bytes_per_token),
                      _fmt(st.chars_per_token), _fmt(st.byte_fallback_share, True), _fmt(st.single_token_share, True))
        con.print(t)
    t = Table(title=f"Words split into the most pieces (top {top})")
    t.add_column("word")
    t.add_column("pieces", justify="right")
    t.add_column("split")
    for word, pieces in report.total.most_split(top):
        t.add_row(word, str(len(pieces)), " | ".join(pieces))
    con.print(t)


def _with_tokens(cmp: dict, a: Report, b: Report) -> dict:
    """Add total token counts to a comparison: the number a user pays for (context, compute). Fertility
    leaves whitespace-only pieces out, so it can improve while the token count grows."""
    def row(sa, sb):
        ta, tb = (sa.tokens if sa else None), (sb.tokens if sb else None)
        return {"a": ta, "b": tb, "change_pct": (tb - ta) / ta * 100 if ta and tb is not None else None}

    cmp["total"]["tokens"] = row(a.total, b.total)
    for k in cmp["files"]:
        cmp["files"][k]["tokens"] = row(a.files.get(k), b.files.get(k))
    for k in cmp["scripts"]:
        cmp["scripts"][k]["tokens"] = row(a.scripts.get(k), b.scripts.get(k))
    return cmp


def _print_comparison(cmp: dict, title: str) -> None:
    con = Console()
    tot = cmp["total"]["tokens"]
    if tot["change_pct"] is not None:
        more = tot["b"] > tot["a"]
        verdict = ("B needs MORE tokens for the same text" if more else
                   "B needs fewer tokens for the same text" if tot["b"] < tot["a"] else "the same number of tokens")
        con.print(f"[bold]tokens:[/] A {tot['a']:,}, B {tot['b']:,} ({tot['change_pct']:+.1f}%): {verdict}",
                  highlight=False)
    con.print(f"[bold]A:[/] {cmp['a']}\n[bold]B:[/] {cmp['b']}\n(tok = tokens; fert = tokens per word, "
              "whitespace-only pieces left out; fb = byte-fallback share)", highlight=False)
    t = Table(title=title)
    t.add_column("group", overflow="fold", max_width=16)
    for col in ("tok A", "tok B", "Δ tok", "fert A", "fert B", "fb A", "fb B"):
        t.add_column(col, justify="right")
    groups = [("all", cmp["total"])] + list(cmp["files"].items()) + [(f"[{k}]", v) for k, v in cmp["scripts"].items()]
    for name, row in groups:
        fert, fb, tok = row["fertility"], row["byte_fallback_share"], row["tokens"]
        change = "-" if tok["change_pct"] is None else f"{tok['change_pct']:+.1f}%"
        t.add_row(name, "-" if tok["a"] is None else str(tok["a"]), "-" if tok["b"] is None else str(tok["b"]), change,
                  _fmt(fert["a"]), _fmt(fert["b"]), _fmt(fb["a"], True), _fmt(fb["b"], True))
    con.print(t)


_ANALYZE_HELP = ("Tokens per word (fertility), bytes and characters per token, byte-fallback share and the "
                 "most-split words, for each file and each script. Lower fertility and more bytes per token mean "
                 "the vocabulary fits the text better; byte fallback marks characters the vocabulary lacks.")
_TRAIN_HELP = ("Train a domain BPE tokenizer (byte fallback, via `tokenizers`) and show how fertility on held-out "
               "text changes against the base tokenizer. A small domain vocabulary usually splits jargon into "
               "fewer pieces while handling general text worse; this measures by how much.")


@tokens_app.command("analyze", help=_ANALYZE_HELP)
def analyze_cmd(
    files: list[Path] = typer.Argument(..., help="UTF-8 text files; each is reported as its own domain."),
    tokenizer: str = typer.Option("gemma4", "--tokenizer", "-t", help=_TOKENIZER_HELP),
    compare: str | None = typer.Option(None, "--compare", "-c",
                                       help="A second tokenizer (same forms as --tokenizer) shown side by side."),
    top: int = typer.Option(10, help="How many of the most-split words to list."),
    json_out: bool = typer.Option(False, "--json", help="Print machine-readable JSON instead of tables."),
    plot: Path | None = typer.Option(None, "--plot", help="Write a PNG of the pieces-per-word distribution."),
) -> None:
    if plot is not None:
        _plot_ready(plot)
    try:
        texts = _read_all(files)
        report = analyze(resolve_tokenizer(tokenizer), texts, top=top)
        other = analyze(resolve_tokenizer(compare), texts, top=top) if compare else None
    except (ValueError, FileNotFoundError, KeyError) as e:
        _fail(str(e))
    if json_out:
        payload = report.to_dict(top) if other is None else {
            "a": report.to_dict(top), "b": other.to_dict(top),
            "comparison": _with_tokens(compare_reports(report, other), report, other)}
        print(json.dumps(payload, ensure_ascii=False, indent=2))
    else:
        _print_report(report, top)
        if other is not None:
            _print_report(other, top)
            _print_comparison(_with_tokens(compare_reports(report, other), report, other),
                              "A vs B (change = B relative to A)")
    if plot is not None:  # last: the numbers are on screen while it draws
        series = ({f"A: {tokenizer}": report.total, f"B: {compare}": other.total} if other
                  else dict(report.files))
        plot_pieces(series, plot)
        typer.echo(f"plot written to {plot}", err=json_out)


@tokens_app.command("train", help=_TRAIN_HELP)
def train_cmd(
    files: list[Path] = typer.Argument(..., help="UTF-8 training text files from your domain."),
    vocab_size: int = typer.Option(8000, "--vocab-size", "-v", help="Size of the new vocabulary (incl. 260 "
                                                                   "special and byte tokens)."),
    heldout: Path = typer.Option(..., "--heldout", help="Held-out UTF-8 text (not used for training) to "
                                                        "measure fertility on."),
    tokenizer: str = typer.Option("gemma4", "--tokenizer", "-t", help="Base tokenizer to compare against. "
                                  + _TOKENIZER_HELP),
    min_frequency: int = typer.Option(2, help="Merges must occur at least this often in the training text."),
    output: Path | None = typer.Option(None, "--output", "-o", help="Save the trained tokenizer.json here."),
    json_out: bool = typer.Option(False, "--json", help="Print machine-readable JSON instead of tables."),
    plot: Path | None = typer.Option(None, "--plot", help="Write a PNG comparing the pieces-per-word distributions."),
) -> None:
    if plot is not None:
        _plot_ready(plot)
    try:
        train_texts = [read_text_file(f) for f in files]
        held = {Path(heldout).name: read_text_file(heldout)}
        trained = train_bpe(train_texts, vocab_size, min_frequency)
        base_report = analyze(resolve_tokenizer(tokenizer), held)
        new_report = analyze(trained, held)
    except (ValueError, FileNotFoundError, KeyError) as e:
        _fail(str(e))
    if output is not None:
        trained.save(output)
    cmp = _with_tokens(compare_reports(base_report, new_report), base_report, new_report)
    if json_out:
        print(json.dumps({"vocab_size": trained.vocab_size, "base": base_report.to_dict(),
                          "trained": new_report.to_dict(), "comparison": cmp}, ensure_ascii=False, indent=2))
    else:
        _print_comparison(cmp, f"Held-out fertility: base (A) vs trained BPE, {trained.vocab_size} tokens (B)")
    if output is not None:
        typer.echo(f"trained tokenizer saved to {output}", err=json_out)
    if plot is not None:
        plot_pieces({f"base: {tokenizer}": base_report.total, "trained": new_report.total}, plot)
        typer.echo(f"plot written to {plot}", err=json_out)


def register(app: typer.Typer) -> None:
    """Add the `tokens` command group to the main CLI."""
    app.add_typer(tokens_app, name="tokens")
