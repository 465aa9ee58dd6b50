"""Speculative decoding on tiny random models: acceptance rate, tokens per target forward, and
whether the output equals plain greedy decoding (it must, always).

No trained drafter weights are reachable here, so acceptance rates are those of random or
perturbed drafters: they check the machinery (a draft equal to the target must accept 100%),
not the speed-up a trained MTP drafter would give.

    python benchmarks/speculative.py
"""

from __future__ import annotations

import copy
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from gemma4 import Gemma4Config, build_model, init_random_  # noqa: E402
from gemma4.model.drafter import DrafterConfig, build_drafter  # noqa: E402
from gemma4.infer.speculative import greedy_decode, speculative_generate  # noqa: E402
from tiny import DENSE, PLE  # noqa: E402

S, F = "sliding_attention", "full_attention"
NEW = 64


def _model(d, seed, **kw):
    return init_random_(build_model(Gemma4Config.from_dict({**d, **kw})), seed=seed, std=0.15)


def _perturbed(m, noise):
    p = copy.deepcopy(m)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for w in p.parameters():
            if w.dim() > 1:
                w.add_(torch.randn(w.shape, generator=g) * noise)
    return p


def main() -> None:
    torch.set_num_threads(1)
    prompt = torch.randint(3, 256, (12,), generator=torch.Generator().manual_seed(0)).tolist()
    ple, dense = _model(PLE, 1), _model(DENSE, 3)
    dcfg = DrafterConfig(text_config=dict(vocab_size=256, hidden_size=32, num_hidden_layers=2, layer_types=[S, F],
                                          num_attention_heads=4, num_key_value_heads=1, head_dim=16, global_head_dim=32,
                                          intermediate_size=64, sliding_window=8, hidden_size_per_layer_input=0,
                                          max_position_embeddings=256, final_logit_softcapping=None),
                         backbone_hidden_size=48, use_ordered_embeddings=True, num_centroids=16, centroid_intermediate_top_k=4)
    mtp = init_random_(build_drafter(dcfg), seed=2, std=0.15)
    cases = [
        ("ple target + random MTP drafter", ple, dict(drafter=mtp)),
        ("dense target + itself as draft", dense, dict(draft_model=dense)),
        ("dense target + perturbed copy (0.01)", dense, dict(draft_model=_perturbed(dense, 0.01))),
        ("dense target + 2-layer random draft", dense,
         dict(draft_model=_model(DENSE, 4, num_hidden_layers=2, layer_types=[S, F], hidden_size=32, intermediate_size=48))),
    ]
    rows = []
    for name, target, kw in cases:
        t0 = time.perf_counter()
        want = greedy_decode(target, prompt, NEW)
        t_plain = time.perf_counter() - t0
        for k in (2, 4):
            t0 = time.perf_counter()
            res = speculative_generate(target, prompt, NEW, num_draft_tokens=k, **kw)
            dt = time.perf_counter() - t0
            rows.append({"case": name, "k": k, "identical_to_greedy": res.tokens == want, **res.stats.as_dict(),
                         "seconds": dt, "plain_greedy_seconds": t_plain})
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"speculative decoding, {NEW} new tokens, prompt 12, 1 thread (tiny random models)")
    for c in ("case", "k", "identical", "acceptance", "tokens/target fwd", "target fwds", "s", "plain greedy s"):
        t.add_column(c, justify="right")
    for r in rows:
        t.add_row(r["case"], str(r["k"]), str(r["identical_to_greedy"]), f"{100 * r['acceptance_rate']:.1f}%",
                  f"{r['tokens_per_round']:.2f}", str(r["rounds"] + 1), f"{r['seconds']:.3f}", f"{r['plain_greedy_seconds']:.3f}")
    Console(width=160).print(t)
    out = Path(__file__).with_name("speculative.json")
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"command": "python benchmarks/speculative.py", "rows": rows}, indent=2))
    os.replace(tmp, out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
