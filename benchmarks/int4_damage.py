"""Where int4 loses perplexity: per-token NLL added by int4-g32 weights, by how confident bf16 was.

On the real Gemma 3 270M, for each evaluation text (benchmarks/data: the US Constitution, which the model
has largely memorized, and two chapters of Alice in Wonderland, which it has not), the tokens are split
into four buckets by the bf16 model's own NLL (its quartiles: the 50th, 75th and 90th percentiles), and
the table gives, per bucket, the mean NLL added by the quantized model and the bucket's share of all added
NLL. The quantized model is int4-g32 round-to-nearest with the embedding/head table at int8 (seconds to
build; the calibrated recipes of benchmarks/gptq.py shrink the damage but need minutes each).

    python benchmarks/int4_damage.py        # writes benchmarks/results/int4_damage.json
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import torch  # noqa: E402

from quant import token_nll  # noqa: E402


def buckets(ref: torch.Tensor, new: torch.Tensor) -> list[dict]:
    cuts = torch.quantile(ref, torch.tensor([0.5, 0.75, 0.9])).tolist()
    edges = [float("-inf"), *cuts, float("inf")]
    added = new - ref
    rows = []
    for lo, hi in zip(edges[:-1], edges[1:]):
        m = (ref > lo) & (ref <= hi)
        rows.append({"bf16_nll_range": [lo, hi], "tokens": int(m.sum()), "bf16_nll": ref[m].mean().item(),
                     "bf16_p_median": ref[m].neg().exp().median().item(), "added_nll": added[m].mean().item(),
                     "share_of_added": (added[m].sum() / added.sum()).item()})
    return rows


def main() -> None:
    torch.set_num_threads(2)
    import gemma4
    from gemma4 import assets
    from gemma4.quant.rtn import quantize

    tok = gemma4.load_tokenizer(assets.gemma3_270m_gguf())
    base = gemma4.load_pretrained("gemma3-270m", dtype=torch.float32)
    bf = copy.deepcopy(base).to(torch.bfloat16)
    q = base
    quantize(q, "int4", 32, overrides={"model.embed_tokens": {"scheme": "int8"}})
    q.to(torch.bfloat16)
    res = {"quantized": "int4-g32 RTN, int8 embedding/head", "texts": {}}
    print("| text | bf16 NLL bucket | tokens | median bf16 p | added NLL | share of added |")
    print("|---|---|---|---|---|---|")
    for name, fn in (("constitution", "us_constitution.txt"), ("alice", "alice_ch8_9.txt")):
        ids = torch.tensor([tok.encode((HERE / "data" / fn).read_text(encoding="utf-8"))])
        (ref, _), (new, _) = token_nll(bf, ids), token_nll(q, ids)
        rows = buckets(ref, new)
        res["texts"][name] = {"tokens": ids.shape[1], "bf16_ppl": ref.mean().exp().item(),
                              "quant_ppl": new.mean().exp().item(), "buckets": rows}
        for r in rows:
            lo, hi = r["bf16_nll_range"]
            print(f"| {name} (ppl {ref.mean().exp():.2f} -> {new.mean().exp():.2f}) | ({lo:.2f}, {hi:.2f}] | "
                  f"{r['tokens']} | {r['bf16_p_median']:.2f} | {r['added_nll']:+.3f} | {100 * r['share_of_added']:.0f}% |",
                  flush=True)
    out = HERE / "results" / "int4_damage.json"
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(res, indent=2))
    tmp.replace(out)


if __name__ == "__main__":
    main()
