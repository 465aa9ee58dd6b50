"""`gemma4 classify`: the ShieldGemma-style safety classifier built on our model (issue 15).

``train`` fine-tunes a checkpoint into a classifier directory, ``score`` prints P(violation) for one
prompt (and response), ``calibrate`` measures ECE/Brier on labeled data, draws the reliability diagram and
can fit the temperature into the classifier's ``classifier.json``."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer

from gemma4.cli._common import check_model, check_output

classify_app = typer.Typer(help="Safety classifier: P(a text violates a policy) from one forward pass of a model "
                                "(train it, score with it, calibrate it).", no_args_is_help=True)

_DATA_HELP = ('JSONL, one {"prompt": ..., "response": ... (optional), "label": true/false} per line; label = the '
              "prompt (or, with a response, the response) violates the policy.")


def _policy_help() -> str:
    from gemma4.align.classifier import POLICIES

    return f"A policy name ({', '.join(POLICIES)}) or your own policy text."


@classify_app.command("train")
def train_cmd(
    model: str = typer.Argument(..., help="Checkpoint directory, .gguf file or short name to start from."),
    data: Path = typer.Argument(..., help=_DATA_HELP),
    out: Path = typer.Argument(..., help="Classifier directory to write (checkpoint + tokenizer + classifier.json)."),
    policy: str = typer.Option("dangerous", help=_policy_help()),
    steps: int = typer.Option(60, min=1, help="Optimizer steps."),
    lr: float = typer.Option(1e-4, min=0.0, help="Peak learning rate (AdamW, cosine decay)."),
    batch_size: int = typer.Option(8, min=1, help="Labeled items per step."),
    threshold: float = typer.Option(0.5, min=0.0, max=1.0, help="Flag when P(violation) is above this."),
    seed: int = typer.Option(0, help="Seed of the data order."),
    dtype: str = typer.Option("float32", help="Compute dtype: float32 or bfloat16 (autocast over float32 weights)."),
):
    """Fine-tune MODEL to answer 'Yes'/'No' to "does this violate the policy?" (loss on the answer token only)
    and write the classifier directory OUT."""
    import torch

    from gemma4.align.classifier import read_labeled, train_classifier
    from gemma4.cli._common import find_tokenizer
    from gemma4.io import load_pretrained

    check_model(model)
    out = check_output(out, model)
    rows = read_labeled(data)
    tok = find_tokenizer(model)
    if tok is None:
        raise typer.BadParameter(f"no tokenizer found for {model}: the classifier needs one")
    m = load_pretrained(model, dtype=torch.float32, trainable=True)
    every = max(1, steps // 10)

    def show(rec: dict) -> None:
        if rec["step"] % every == 0 or rec["step"] == steps:
            typer.echo(f"step {rec['step']}/{steps} loss {rec['loss']:.4f}", err=True)

    clf = train_classifier(m, tok, rows, steps=steps, lr=lr, batch_size=batch_size, policy=policy,
                           threshold=threshold, seed=seed, dtype=dtype, out=out / "run", on_step=show)
    clf.save(out)
    pos = sum(r[2] for r in rows)
    typer.echo(f"wrote {out} ({len(rows)} labeled rows, {pos} violating; policy {clf.policy_name or 'custom'})")


@classify_app.command("score")
def score_cmd(
    classifier: Path = typer.Argument(..., help="Classifier directory (from `gemma4 classify train`)."),
    prompt: str = typer.Argument(..., help="The user's prompt."),
    response: Optional[str] = typer.Option(None, "--response", "-r", help="The model's reply: score the reply "
                                           "instead of the prompt."),
    as_json: bool = typer.Option(False, "--json", help="Print {score, flagged, threshold} as JSON."),
):
    """Print P(violation) of PROMPT (or of --response to it) under the classifier's policy."""
    from gemma4.align.classifier import SafetyClassifier

    clf = SafetyClassifier.load(classifier)
    p = clf.score([prompt], [response])[0]
    if as_json:
        typer.echo(json.dumps({"score": p, "flagged": p > clf.threshold, "threshold": clf.threshold}))
    else:
        typer.echo(f"{p:.4f}")


@classify_app.command("calibrate")
def calibrate_cmd(
    classifier: Path = typer.Argument(..., help="Classifier directory."),
    data: Path = typer.Argument(..., help=_DATA_HELP + " Use held-out data, not the training set."),
    plot: Optional[Path] = typer.Option(None, "--plot", help="Write the reliability diagram (PNG) here."),
    fit: bool = typer.Option(False, "--fit-temperature", help="Fit one temperature on the logit difference "
                             "(minimum NLL on DATA) and store it in classifier.json."),
    bins: int = typer.Option(10, min=1, help="Equal-width bins of P(violation) for ECE and the plot."),
    as_json: bool = typer.Option(False, "--json", help="Print the calibration result as JSON."),
):
    """Measure how well P(violation) matches the labels of DATA: ECE (the count-weighted gap between
    confidence and the fraction violating per bin), MCE and Brier score."""
    from gemma4._util import atomic_write_text
    from gemma4.align.classifier import (CLASSIFIER_FILE, SafetyClassifier, calibrate, fit_temperature, nll,
                                         probability, read_labeled, reliability_plot)

    if plot is not None:
        check_output(plot, kind="file")
    clf = SafetyClassifier.load(classifier)
    rows = read_labeled(data)
    prompts, responses, labels = [r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows]
    margins = clf.margins(prompts, responses)
    result = {"before": None}
    if fit:
        before = calibrate([probability(m, clf.temperature) for m in margins], labels, bins)
        result["before"] = {"ece": before["ece"], "brier": before["brier"], "temperature": clf.temperature,
                            "nll": nll(margins, labels, clf.temperature)}
        clf.temperature = fit_temperature(margins, labels)
        atomic_write_text(Path(classifier) / CLASSIFIER_FILE, json.dumps(clf.config(), indent=2) + "\n")
    cal = calibrate([probability(m, clf.temperature) for m in margins], labels, bins)
    result.update(cal, temperature=clf.temperature, nll=nll(margins, labels, clf.temperature))
    if plot is not None:
        reliability_plot(cal, plot)
    if as_json:
        typer.echo(json.dumps(result))
        return
    if result["before"]:
        b = result["before"]
        typer.echo(f"before: temperature {b['temperature']:.3f}, ECE {b['ece']:.4f}, Brier {b['brier']:.4f}, "
                   f"NLL {b['nll']:.4f}")
        typer.echo(f"fitted temperature {clf.temperature:.3f} (stored in {Path(classifier) / CLASSIFIER_FILE})")
    typer.echo(f"n={cal['n']}  ECE {cal['ece']:.4f}  MCE {cal['mce']:.4f}  Brier {cal['brier']:.4f}  "
               f"NLL {result['nll']:.4f}  temperature {clf.temperature:.3f}")
    typer.echo("bin            n   confidence  fraction violating")
    for lo, hi, conf, frac, k in cal["bins"]:
        if k:
            typer.echo(f"[{lo:.2f}, {hi:.2f})  {k:5d}   {conf:.3f}       {frac:.3f}")
    if plot is not None:
        typer.echo(f"wrote {plot}", err=True)
    sys.stdout.flush()


def register(app: typer.Typer) -> None:
    app.add_typer(classify_app, name="classify")
