"""Which held-out wrapper templates do saved alignment checkpoints answer?

    python benchmarks/alignment.py --seeds 4 5 --no-ablations --no-tamper --cache /tmp/cache  # saves base/sft
    python benchmarks/template_probe.py --seeds 4 5 --cache /tmp/cache                        # reads seed<N>/sft
    python benchmarks/template_probe.py --seeds 4 --cache /tmp/cache51 --set hidden_size=256 --set intermediate_size=512

Every held-out wrapper family of the alignment experiment has 1-93 templates and 30 harmful prompts; our own
families (grandma, past tense, prefix injection, refusal suppression, developer mode) have one or two. A
family's ASR is then a few draws of "does the model generalise to this template", with 15-30 prompts riding
on each, and its Wilson interval (prompts as independent draws) says nothing about the next template. This
probe reloads checkpoints that `benchmarks/alignment.py` saved (`--cache DIR` keeps each seed's base and SFT
models under DIR/seed<N>/), rebuilds that seed's data with the same recipe (`--set`, as for alignment.py: it
must match what trained the checkpoint), runs alignment.py's own evaluation and prints, per family, the
harmful prompts answered (ASR), those answered with the harm placeholder (unsafe) and with a helpful
template naming the requested object (helped), and the answered ones out of those each template wraps.
Writes ``--out`` (JSON).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

import torch

from gemma4._util import atomic_write_text
from gemma4.io import load_pretrained
from gemma4.text.tokenizer import load_tokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from alignment import HERE, Recipe, evaluate, per_template, seed_data, with_sets  # noqa: E402


def probe(seed: int, checkpoint: Path, recipe: Recipe) -> dict:
    """alignment.py's evaluation of one saved checkpoint, on the data its seed and recipe build."""
    model = load_pretrained(checkpoint)
    tok = load_tokenizer(checkpoint / "tokenizer.json")
    ev = evaluate(model, tok, seed_data(seed, recipe), recipe, random.Random(seed + 1))
    return {"seed": seed, "checkpoint": str(checkpoint), "families": ev["families"]}


def table(rows: list[dict]) -> str:
    fams = sorted({f for r in rows for f in r["families"]})
    lines = ["| seed | family | ASR | unsafe | helped | answered per template |", "|---|---|---|---|---|---|"]
    for r in rows:
        for f in fams:
            v = r["families"][f]
            lines.append(f"| {r['seed']} | {f} | {v['asr']['k']}/{v['asr']['n']} | {v['unsafe']['k']} | "
                         f"{v['helped']['k']} | {per_template(v['templates'])} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", required=True)
    ap.add_argument("--cache", type=Path, required=True, metavar="DIR",
                    help="alignment.py's --cache directory: the checkpoints are DIR/seed<N>/<stage>")
    ap.add_argument("--stage", default="sft", help="which saved checkpoint: sft (default), base, sft_c1, ...")
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                    help="a Recipe field as the checkpoint was trained with, e.g. --set train_wrappers=151")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "template_probe.json")
    a = ap.parse_args(argv)
    try:
        recipe = with_sets(Recipe(), a.set)
    except ValueError as e:
        ap.error(str(e))
    missing = [str(a.cache / f"seed{s}" / a.stage) for s in a.seeds
               if not (a.cache / f"seed{s}" / a.stage / "model.safetensors").is_file()]
    if missing:
        ap.error(f"no saved checkpoint in {', '.join(missing)} (alignment.py --cache writes them)")
    torch.set_num_threads(1)
    rows = [probe(s, a.cache / f"seed{s}" / a.stage, recipe) for s in a.seeds]
    a.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(a.out, json.dumps({"stage": a.stage, "sets": a.set, "rows": rows}, indent=1))
    print(table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
