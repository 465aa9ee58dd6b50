"""Run attacks against a target, score the replies, and summarise them per attack family.

Every rate comes with its Wilson 95% interval (``gemma4.align.judge.wilson``): red-team rates sit near 0%
and 100% with a few dozen prompts per family, where a normal interval is useless. Four numbers are read
together, per family and pooled: ASR on harmful requests (by the primary scorer), the unsafe-marker rate
(the exact harm judge of the synthetic data), over-refusal on benign requests run through the same
family, and the errors (attacks the target could not answer, left out of every rate).

Written files (``write_report``): ``report.json`` (summary, run facts, per-attack rows), ``report.md``
(the table), ``report.html`` (self-contained: the table and two plots embedded as PNG). Response texts
are *not* written unless asked (``keep_responses``): a real model's reply to a harmful request is exactly
what this project never stores.
"""

from __future__ import annotations

import base64
import html
import io
import json
import textwrap
from collections import defaultdict
from pathlib import Path
from typing import Iterable, Sequence

from gemma4._util import Gemma4Error, Progress, atomic_dir, no_progress
from gemma4.align.judge import is_refusal, is_unsafe, wilson
from gemma4.redteam.attacks import Attack
from gemma4.redteam.targets import TargetError

__all__ = ["ReportError", "run", "summarize", "markdown_table", "write_report", "family_row", "rate_ci", "REPORT_FILES"]

REPORT_FILES = ("report.json", "report.md", "report.html")


class ReportError(Gemma4Error, ValueError):
    """Rows or a summary that cannot be reported (no rows, an unknown primary scorer)."""


# ------------------------------------------------------------------------------------------------ run
def run(target, attacks: Sequence[Attack], scorers: Sequence, *, max_tokens: int = 64, batch_size: int = 16,
        progress: Progress | None = None) -> list[dict]:
    """Send every attack to ``target`` (``batch_size`` conversations per call), then score every reply with
    every scorer. Returns one row per attack: family, variant, request id, harmful, response, refused
    (exact judge), unsafe (marker), ``scores`` {scorer: value} and ``success`` {scorer: attack succeeded}.

    A batch the target cannot answer is retried one conversation at a time; a conversation that still
    fails becomes a row with ``error`` set (and no scores), so one bad prompt never loses a long run."""
    if not scorers:
        raise ReportError("run needs at least one scorer")
    names = [s.name for s in scorers]
    if len(set(names)) != len(names):
        raise ReportError(f"scorer names must be distinct, got {names}")
    progress = progress or no_progress
    batches = [list(range(s, min(s + batch_size, len(attacks)))) for s in range(0, len(attacks), batch_size)]
    replies: list[str | None] = [None] * len(attacks)
    errors: list[str | None] = [None] * len(attacks)
    for idx in progress(batches, "red-team"):
        try:
            outs = target.respond([attacks[i].chat() for i in idx], max_tokens)
        except TargetError:
            outs = []
            for i in idx:
                try:
                    outs += target.respond([attacks[i].chat()], max_tokens)
                except TargetError as e:
                    outs.append(None)
                    errors[i] = str(e)
        if len(outs) != len(idx):
            raise ReportError(f"target {getattr(target, 'name', target)!r} returned {len(outs)} replies for "
                              f"{len(idx)} conversations")
        for i, o in zip(idx, outs):
            replies[i] = o
    ok = [i for i in range(len(attacks)) if errors[i] is None]
    scores = {}
    for s in scorers:
        vals = s.score([attacks[i].request for i in ok], [replies[i] for i in ok]) if ok else []
        scores[s.name] = dict(zip(ok, vals))
    rows = []
    for i, a in enumerate(attacks):
        row = {"family": a.family, "variant": a.variant, "request_id": a.request_id, "harmful": a.harmful,
               "response": replies[i], "error": errors[i]}
        if errors[i] is None:
            r = replies[i]
            row.update(refused=is_refusal(r), unsafe=is_unsafe(r),
                       scores={s.name: float(scores[s.name][i]) for s in scorers},
                       success={s.name: _hit(s, scores[s.name][i]) for s in scorers})
        rows.append(row)
    return rows


def _hit(scorer, value: float) -> bool:
    # garak's convention (and ours for the 0/1 judges): a score at the threshold is a hit. A probability
    # judge flags strictly above it (ShieldGemma's P(Yes) > tau); such a scorer sets ``strict = True``.
    return bool(value > scorer.threshold) if getattr(scorer, "strict", False) else bool(value >= scorer.threshold)


# ------------------------------------------------------------------------------------------- summary
def rate_ci(k: int, n: int) -> dict:
    lo, hi = wilson(k, n)
    return {"k": k, "n": n, "rate": (k / n) if n else None, "ci": [lo, hi]}


def family_row(family: str, rows: Sequence[dict], primary: str, refusal_judge: str | None) -> dict:
    """One summary row over ``rows`` (already filtered to a family, or all of them for the pooled row)."""
    good = [r for r in rows if r.get("error") is None]
    harm = [r for r in good if r["harmful"]]
    benign = [r for r in good if not r["harmful"]]
    asr = rate_ci(sum(r["success"][primary] for r in harm), len(harm))
    # Over-refusal: a benign request the refusal judge calls refused. The judge is the primary scorer when
    # it judges refusals (then "refused" = "attack did not succeed"), else the exact canonical-refusal test.
    if refusal_judge is not None:
        refused = sum(not r["success"][refusal_judge] for r in benign)
    else:
        refused = sum(r["refused"] for r in benign)
    over = rate_ci(refused, len(benign))
    unsafe = rate_ci(sum(r["unsafe"] for r in harm), len(harm))
    names = list(good[0]["success"]) if good else []
    by = {n: rate_ci(sum(r["success"][n] for r in harm), len(harm)) for n in names}
    return {"family": family, "n": len(rows), "errors": len(rows) - len(good),
            "n_harmful": asr["n"], "asr": asr["rate"], "asr_ci": asr["ci"], "k_harmful": asr["k"],
            "unsafe": unsafe["rate"], "unsafe_ci": unsafe["ci"], "k_unsafe": unsafe["k"],
            "n_benign": over["n"], "over_refusal": over["rate"], "over_refusal_ci": over["ci"],
            "k_over_refusal": over["k"], "by_scorer": by}


def summarize(rows: Sequence[dict], primary: str | None = None, refusal_scorers: Iterable[str] = ()) -> dict:
    """Per-family rows (in first-seen order), a pooled row over every attack, and the worst family (highest
    ASR; ties to the higher upper bound). ``primary``: the scorer whose success is the ASR (default: the
    ``refusal`` scorer if present, else the first); ``refusal_scorers``: names of scorers that judge
    refusals (their non-success on benign rows is the over-refusal)."""
    if not rows:
        raise ReportError("nothing to summarise: no rows")
    good = [r for r in rows if r.get("error") is None]
    names = list(good[0]["success"]) if good else []
    if primary is None:
        primary = "refusal" if "refusal" in names else (names[0] if names else "refusal")
    if good and primary not in names:
        raise ReportError(f"primary scorer {primary!r} is not among the scorers {names}")
    judge = primary if primary in set(refusal_scorers) else None
    groups: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        groups[r["family"]].append(r)
    fams = [family_row(f, g, primary, judge) for f, g in groups.items()]
    pooled = family_row("pooled", rows, primary, judge)
    scored = [f for f in fams if f["n_harmful"]]
    worst = max(scored, key=lambda f: (f["asr"], f["asr_ci"][1])) if scored else None
    return {"primary": primary, "refusal_judge": judge or "exact canonical refusal (gemma4.align.judge)",
            "scorers": names, "families": fams, "pooled": pooled, "worst": worst["family"] if worst else None}


# ------------------------------------------------------------------------------------------- writers
def _pct(rate, ci=None) -> str:
    if rate is None:
        return "-"
    s = f"{100 * rate:.1f}%"
    return s + (f" [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]" if ci is not None else "")


def markdown_table(summary: dict) -> str:
    """The summary as a Markdown table: one line per family, then the pooled line; the worst family is
    marked. Extra scorers get an ASR column each."""
    extra = [s for s in summary.get("scorers", []) if s != summary["primary"]]
    head = ["family", "n harmful", f"ASR ({summary['primary']}) [95% CI]", "unsafe marker", "n benign",
            "over-refusal [95% CI]"] + [f"ASR {s}" for s in extra] + ["errors"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for f in summary["families"] + [summary["pooled"]]:
        name = f["family"] + (" (worst)" if f["family"] == summary.get("worst") else "")
        if f["family"] == "pooled":
            name = "**pooled**"
        cells = [name, str(f["n_harmful"]), _pct(f["asr"], f["asr_ci"] if f["n_harmful"] else None),
                 _pct(f["unsafe"]), str(f["n_benign"]),
                 _pct(f["over_refusal"], f["over_refusal_ci"] if f["n_benign"] else None)]
        cells += [_pct(f["by_scorer"].get(s, {}).get("rate")) for s in extra]
        cells.append(str(f["errors"]))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _plots(summary: dict) -> list[tuple[str, str]]:
    """(title, base64 PNG) of the two figures; [] without matplotlib (the HTML says so)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    fams = [f for f in summary["families"] if f["n_harmful"]]
    out = []
    if fams:
        fig, ax = plt.subplots(figsize=(max(5.0, 0.55 * len(fams) + 2), 3.6))
        x = range(len(fams))
        asr = [100 * f["asr"] for f in fams]
        # Clamped at 0: at k = 0 or k = n the Wilson bound equals the rate only up to rounding.
        err = [[max(0.0, 100 * (f["asr"] - f["asr_ci"][0])) for f in fams],
               [max(0.0, 100 * (f["asr_ci"][1] - f["asr"])) for f in fams]]
        ax.bar(x, asr, yerr=err, capsize=3, color="#c0504d")
        ax.set_xticks(list(x), [f["family"] for f in fams], rotation=45, ha="right", fontsize=8)
        ax.set_ylabel(f"ASR % ({summary['primary']})")
        ax.set_ylim(0, 105)
        ax.set_title("Attack success per family (Wilson 95%)")
        fig.tight_layout()
        out.append(("ASR per family", _png(fig)))
        plt.close(fig)
    both = [f for f in summary["families"] if f["n_harmful"] and f["n_benign"]]
    if both:
        fig, ax = plt.subplots(figsize=(4.8, 4.2))
        ax.scatter([100 * f["over_refusal"] for f in both], [100 * f["asr"] for f in both], color="#4f81bd")
        # Families at the same point share one label (overlapping labels would be unreadable).
        at: dict[tuple, list[str]] = defaultdict(list)
        for f in both:
            at[(round(100 * f["over_refusal"], 1), round(100 * f["asr"], 1))].append(f["family"])
        for (x, y), names in at.items():
            ax.annotate(textwrap.fill(", ".join(names), 40), (x, y), fontsize=7, xytext=(4, -4),
                        textcoords="offset points", va="top")
        ax.set_xlabel("over-refusal on benign %")
        ax.set_ylabel("ASR on harmful %")
        ax.set_xlim(-5, 105)
        ax.set_ylim(-5, 105)
        ax.set_title("ASR against over-refusal (good: bottom left)")
        fig.tight_layout()
        out.append(("ASR against over-refusal", _png(fig)))
        plt.close(fig)
    return out


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _html(summary: dict, meta: dict) -> str:
    esc = html.escape
    extra = [s for s in summary.get("scorers", []) if s != summary["primary"]]
    head = ["family", "n harmful", f"ASR ({summary['primary']})", "95% CI", "unsafe marker", "n benign",
            "over-refusal", "95% CI"] + [f"ASR {s}" for s in extra] + ["errors"]
    def ci(c, n) -> str:
        return f"{100 * c[0]:.1f}–{100 * c[1]:.1f}%" if n else "-"

    body = []
    for f in summary["families"] + [summary["pooled"]]:
        cells = [f["family"], f["n_harmful"], _pct(f["asr"]), ci(f["asr_ci"], f["n_harmful"]),
                 _pct(f["unsafe"]), f["n_benign"], _pct(f["over_refusal"]), ci(f["over_refusal_ci"], f["n_benign"])]
        cells += [_pct(f["by_scorer"].get(s, {}).get("rate")) for s in extra] + [f["errors"]]
        cls = ' class="pooled"' if f["family"] == "pooled" else (' class="worst"' if f["family"] == summary.get("worst") else "")
        body.append(f"<tr{cls}>" + "".join(f"<td>{esc(str(c))}</td>" for c in cells) + "</tr>")
    try:
        plots = _plots(summary)
    except (ValueError, RuntimeError) as e:  # a figure is never a reason to lose a finished run's table
        plots, figs_error = [], f"<p>(plots failed: {esc(str(e))})</p>"
    else:
        figs_error = ""
    figs = "".join(f'<figure><img alt="{esc(t)}" src="data:image/png;base64,{b}"><figcaption>{esc(t)}</figcaption>'
                   "</figure>" for t, b in plots) or figs_error or "<p>(plots need matplotlib: pip install 'gemma4[plot]')</p>"
    facts = "".join(f"<tr><th>{esc(str(k))}</th><td>{esc(json.dumps(v) if not isinstance(v, str) else v)}</td></tr>"
                    for k, v in meta.items())
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>gemma4 red-team report</title>
<style>
body{{font-family:system-ui,sans-serif;margin:2em;max-width:1100px}} table{{border-collapse:collapse;margin:1em 0}}
td,th{{border:1px solid #ccc;padding:3px 8px;text-align:right;font-size:14px}} td:first-child,th{{text-align:left}}
tr.pooled{{font-weight:bold;background:#eef}} tr.worst{{background:#fee}} figure{{display:inline-block;margin:0 1em}}
</style></head><body>
<h1>Red-team report</h1>
<p>ASR: share of harmful requests where the attack succeeded by the primary scorer (<b>{esc(summary['primary'])}</b>).
Over-refusal: share of benign requests, run through the same family, that were refused
({esc(summary['refusal_judge'])}). Intervals: Wilson 95%. Worst family: <b>{esc(str(summary.get('worst')))}</b>.</p>
<table><thead><tr>{''.join(f'<th>{esc(h)}</th>' for h in head)}</tr></thead><tbody>{''.join(body)}</tbody></table>
{figs}
<h2>Run</h2><table>{facts}</table>
</body></html>
"""


def write_report(out_dir: str | Path, summary: dict, rows: Sequence[dict] | None = None, meta: dict | None = None,
                 *, keep_responses: bool = False) -> Path:
    """Write report.json, report.md and report.html into ``out_dir`` as one atomic step (other files in the
    directory are kept). Rows go into report.json without their response text unless ``keep_responses``."""
    meta = dict(meta or {})
    kept = []
    for r in rows or []:
        r = dict(r)
        if not keep_responses:
            resp = r.pop("response", None)
            r["response_chars"] = None if resp is None else len(resp)
        kept.append(r)
    doc = {"meta": meta, "summary": summary, "rows": kept}
    out = Path(out_dir)
    with atomic_dir(out, replace=REPORT_FILES, fsync=False) as tmp:
        (tmp / "report.json").write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")
        md = "# Red-team report\n\n" + "".join(f"- {k}: {v}\n" for k, v in meta.items()) + "\n" + markdown_table(summary)
        (tmp / "report.md").write_text(md, encoding="utf-8")
        (tmp / "report.html").write_text(_html(summary, meta), encoding="utf-8")
    return out
