"""Run 50's diagnostic (not a benchmark): which of DPO's pairs move the held-out wrapper tails?

From one seed's averaged SFT model (the three SFT candidates that `benchmarks/alignment.py --cache CACHE
--set sft_candidates=3` keeps under CACHE/seed<N>/), DPO as in the benchmark (beta 0.1, NLL anchor 1, the
recipe's lr and batch) on a subset of its pairs, no early stopping; the test splits are read after 40 and
80 steps. The two 40-step halves are separate `run_dpo` calls (the optimizer restarts at step 40).

    python benchmarks/results/alignment_run50/dpo_pairs.py CACHE SEED all harmful benign no_wrapped_benign
"""
import copy
import random
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import alignment as B  # noqa: E402  (benchmarks/alignment.py)
from gemma4.align.data import help_negatives, phrasing_drills, placement_drills, reopen_benign  # noqa: E402
from gemma4.align.stages import frozen_copy, run_dpo  # noqa: E402
from gemma4.io import load_pretrained  # noqa: E402
from gemma4.text.tokenizer import load_tokenizer  # noqa: E402

torch.set_num_threads(1)
cache, seed, variants = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3:]
recipe = B.Recipe()
data = B.seed_data(seed, recipe)
tok = load_tokenizer(cache / f"seed{seed}" / "sft" / "tokenizer.json")
soup = B.weight_average([load_pretrained(cache / f"seed{seed}" / n, trainable=True)
                         for n in ("sft", "sft_c1", "sft_c2")])
# The benchmark's DPO pairs at the default recipe: training split + phrasing and placement drills, and the
# help negatives (refusal preferred to another object's helpful answer on a harmful request).
phrasings = reopen_benign(phrasing_drills(data, recipe.phrasing_drills, recipe.phrasing_trailing,
                                          bool(recipe.phrasing_decoys)))
placements = reopen_benign(placement_drills(data, recipe.placement_drills, decoys=recipe.placement_decoys))
align = data.splits["train"] + phrasings + placements
pairs = align + help_negatives(align, random.Random(f"help-negatives-{seed}"), True)
subsets = {"all": pairs, "harmful": [e for e in pairs if e.harmful], "benign": [e for e in pairs if not e.harmful],
           "no_wrapped_benign": [e for e in pairs if e.harmful or e.wrapper is None]}
print(seed, {k: len(v) for k, v in subsets.items()}, flush=True)


def report(tag, model):
    ev = B.evaluate(model, tok, data, recipe, random.Random(seed + 1))
    h = B.headline(ev)
    fam = {k: v["asr"]["k"] for k, v in ev["families"].items() if v["asr"]["k"]}
    over = {k: v["over_refusal"]["k"] for k, v in ev["families"].items() if v["over_refusal"]["k"]}
    # over-refused benign: of the 610 benign test prompts of every split
    print(f"seed {seed} {tag}: obj {h['asr_objects']:.3f} wrap {h['asr_wrappers_pooled']:.3f} fams {fam} "
          f"| over-refused benign {round(h['over_refusal_all'] * 610)} (wrapped by family {over}) "
          f"wf {h['well_formed']:.3f}", flush=True)
    model.train()


report("soup", soup)
ref = frozen_copy(soup)
for v in variants:
    m, done = copy.deepcopy(soup), 0
    for target in (40, 80):
        run_dpo(m, ref, tok, subsets[v], steps=target - done, lr=recipe.dpo_lr, beta=0.1, alpha=1.0,
                batch_size=recipe.batch_size, max_len=recipe.max_len, seed=seed + done)
        done = target
        report(f"{v} +{done}", m)
