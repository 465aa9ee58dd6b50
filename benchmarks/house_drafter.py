"""A trained MTP drafter for the house model, and whether it pays (issue 16 item 5).

1. Training data: the house model's own greedy continuations (`gemma4.train.drafter.greedy_rows`) of
   prompts cut from the 39 *training* plays (BOS + 31 corpus tokens, then 160 greedy tokens). On these
   rows the next tokens are exactly what greedy verification accepts.
2. Training: `gemma4.train.Trainer` with `gemma4.train.drafter.DrafterObjective` (the drafter predicts
   the target's next tokens from its hidden state and K/V, draft steps unrolled), fp32, one thread.
   The drafter: `drafter_config_for(house config, ...)` (default one full-attention layer reading the
   target's full-layer K/V, hidden 128, MLP 512), head initialised from the target's embedding.
   Saved in the drafter file format (`gemma4.io.save_drafter`) to `<cache>/house/shakespeare-tiny-drafter/`
   with `house_recipe.json`; reused while the recipe is unchanged (`--retrain` forces).
3. Benchmark: prompts from the *held-out* plays (BOS + 31 tokens), 128 new tokens, greedy, no stop
   token. `gemma4.generate`-path decoding (`gemma4.infer.stream`, the target on the CPU fast path as by
   default) plain vs with `drafter=` at several draft lengths k; the output must be identical (asserted).
   Timing: one thread, same process, rounds interleaved (plain, k=2, k=3, ... per prompt per round),
   decode time from the first token to the last (`LatencyMonitor`: the prefill, the same for both, is
   excluded); medians over prompts x rounds. Also the cost of each piece (one target decode step, one
   verification forward of k + 1 tokens, one drafter step) to say what the speed-up would need.

    python benchmarks/house_drafter.py                 # train (or reuse) + benchmark
    python benchmarks/house_drafter.py --retrain --steps 400
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from gemma4._util import atomic_write_text
from gemma4.infer import LatencyMonitor, stream
from gemma4.infer.fast_path import use_fast_path
from gemma4.io import load_drafter, load_pretrained, save_drafter
from gemma4.io.assets import cache_dir
from gemma4.io.house import HELDOUT_PLAYS, house_model_dir, shakespeare_texts
from gemma4.text import load_tokenizer
from gemma4.train import TrainConfig, Trainer
from gemma4.train.drafter import DrafterObjective, drafter_config_for, drafter_loss, greedy_rows, new_drafter

HERE = Path(__file__).resolve().parent
DRAFTER_DIR = "shakespeare-tiny-drafter"


@dataclass
class Recipe:
    layer_types: tuple = ("full_attention",)
    hidden_size: int = 128
    intermediate_size: int = 512
    prompt_len: int = 32  # BOS + 31 corpus tokens
    new_tokens: int = 160  # greedy tokens per training row (rows of 192)
    rows: int = 1024
    steps: int = 100
    batch_size: int = 16
    lr: float = 3e-3
    warmup_steps: int = 25
    unroll: int = 3  # draft steps trained per slot
    seed: int = 1234


def _fingerprint(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def corpus_prompts(tok, texts: dict[str, str], names, n: int, length: int, seed: int) -> torch.Tensor:
    """[n, length] prompts: BOS + (length - 1) tokens at seeded random offsets in the plays ``names``."""
    ids = [tok.encode(texts[name], add_bos=False) for name in names]
    g = torch.Generator().manual_seed(seed)
    out = torch.empty(n, length, dtype=torch.long)
    for r in range(n):
        doc = ids[int(torch.randint(len(ids), (1,), generator=g))]
        s = int(torch.randint(len(doc) - length, (1,), generator=g))
        out[r, 0] = tok.bos_id
        out[r, 1:] = torch.tensor(doc[s : s + length - 1])
    return out


def train_drafter(target, tok, texts, recipe: Recipe, work: Path) -> tuple[object, dict]:
    train_names = [n for n in sorted(texts) if n not in HELDOUT_PLAYS]
    t0 = time.perf_counter()
    prompts = corpus_prompts(tok, texts, train_names, recipe.rows, recipe.prompt_len, recipe.seed)
    rows = greedy_rows(target, prompts, recipe.new_tokens, batch_size=128)
    t_data = time.perf_counter() - t0
    print(f"training rows: {rows.shape[0]} x {rows.shape[1]} greedy continuations in {t_data:.1f} s", flush=True)
    # A few rows held back to report the drafter's accuracy on rows it never trained on.
    held, train = rows[:64], rows[64:]
    cfg = drafter_config_for(target.config, recipe.layer_types, hidden_size=recipe.hidden_size,
                             intermediate_size=recipe.intermediate_size)
    drafter = new_drafter(cfg, target, seed=recipe.seed)
    obj = DrafterObjective(target, train, first_slot=recipe.prompt_len - 1, steps=recipe.unroll,
                           batch_size=recipe.batch_size, seed=recipe.seed)
    hvalid = torch.arange(rows.shape[1])[None].expand(held.shape[0], -1) >= recipe.prompt_len - 1

    def held_eval():
        with torch.no_grad():
            _, logs = drafter_loss(drafter.eval(), target, held, hvalid, steps=recipe.unroll)
        drafter.train()
        return {k: round(v, 4) for k, v in logs.items() if k != "tokens"}

    before = held_eval()
    tcfg = TrainConfig(steps=recipe.steps, lr=recipe.lr, warmup_steps=recipe.warmup_steps, min_lr_ratio=0.1,
                       weight_decay=0.0, dtype="float32", seed=recipe.seed, plot=True, checkpoints=False)
    every = max(1, recipe.steps // 10)

    def show(rec):
        if rec["step"] % every == 0 or rec["step"] == 1:
            accs = " ".join(f"acc{j + 1} {rec.get(f'acc_step{j + 1}', 0):.3f}" for j in range(recipe.unroll))
            print(f"  step {rec['step']} loss {rec['loss']:.4f} {accs} ETA {rec.get('eta_s', 0):.0f}s", flush=True)

    t1 = time.perf_counter()
    result = Trainer(drafter, None, tcfg, work / "run", objective=obj, on_step=show).fit()
    t_train = time.perf_counter() - t1
    after = held_eval()
    facts = {"data_seconds": round(t_data, 1), "train_seconds": round(t_train, 1), "train_rows": int(train.shape[0]),
             "row_len": int(rows.shape[1]), "final_train_loss": result.final_loss,
             "drafter_parameters": sum(p.numel() for p in drafter.parameters()),
             "heldback_rows_before": before, "heldback_rows_after": after}
    print(f"trained in {t_train:.0f} s; held-back rows: before {before} after {after}", flush=True)
    for p in drafter.parameters():
        p.requires_grad_(False)
    return drafter.eval(), facts


def get_drafter(target, tok, texts, recipe: Recipe, retrain: bool) -> tuple[Path, dict]:
    dst = cache_dir() / "house" / DRAFTER_DIR
    fp = _fingerprint({"recipe": asdict(recipe), "target": target.config.to_dict(),
                       "target_bytes": (house_model_dir() / "model.safetensors").stat().st_size})
    old = dst / "house_recipe.json"
    if not retrain and old.is_file() and json.loads(old.read_text()).get("fingerprint") == fp:
        print(f"reusing {dst} (recipe {fp}); --retrain trains again", flush=True)
        return dst, json.loads(old.read_text())["results"]
    dst.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(dir=dst.parent, prefix=".drafter-"))
    try:
        drafter, facts = train_drafter(target, tok, texts, recipe, work)
        out = work / "drafter"
        save_drafter(drafter, out)
        for extra in ("train_log.jsonl", "loss_curve.png"):
            if (work / "run" / extra).is_file():
                shutil.copy(work / "run" / extra, out / extra)
        atomic_write_text(out / "house_recipe.json",
                          json.dumps({"fingerprint": fp, "recipe": asdict(recipe), "results": facts}, indent=2))
        if dst.exists():
            shutil.rmtree(dst)
        shutil.move(str(out), str(dst))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return dst, facts


def run_once(target, prompt: list[int], n: int, drafter=None, k: int = 0, **sampling):
    """(tokens, decode seconds after the first token, stats or None); ``sampling``: stream's keywords."""
    mon = LatencyMonitor()
    kw = dict(drafter=drafter, num_draft_tokens=k) if drafter is not None else {}
    g = stream(target, [prompt], n, stop_token_ids=(), monitor=mon, **kw, **sampling)
    for _ in g:
        pass
    rep = mon.report()
    return g.tokens[0], rep["decode_s"], getattr(g, "stats", None)


def _slots(cache, t: int) -> dict:
    """The slots of the keys the producer layers return for ``t`` new tokens, by layer type."""
    return {lt: c.key_slots(t, torch.device("cpu")) for lt, c in
            ((lt, cache.first_of_type(lt)) for lt in ("sliding_attention", "full_attention")) if c is not None}


@torch.no_grad()
def piece_costs(target, drafter, prompt: list[int], ks, reps: int = 30) -> dict:
    """Median seconds of one target decode step, one drafter step, and one verification forward of
    k + 1 tokens (K/V exported, as speculative decoding runs it), on a cache holding the prompt + 64
    tokens."""
    ids = torch.tensor([prompt])
    cache = target.new_cache(slack=max(ks) + 1)
    h, kv = target.model.forward_export_kv(ids, cache=cache, keep_last=1)
    tok = torch.tensor([[int(target.logits(h)[0, -1].argmax())]])
    for _ in range(64):  # a realistic context length
        slots = _slots(cache, 1)
        h, kv = target.model.forward_export_kv(tok, cache=cache, keep_last=1)
        tok = torch.tensor([[int(target.logits(h)[0, -1].argmax())]])
    p = cache.length - 1
    pos = torch.tensor([[p + 1]])

    def timed(fn):
        ts = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
        return statistics.median(ts)

    def draft():
        emb = drafter.input_embeds(target, tok, h[:, -1:])
        dl, _ = drafter(emb, kv, pos, key_slots=slots, last_slot=p)
        torch.isfinite(dl).all().item()  # what speculative decoding checks per step
        int(dl[0, -1].argmax())

    def step(t):
        def fn():
            logits = target(t, cache=cache)[0, -1]
            int(logits.argmax())
            cache.rollback(t.shape[1])
        return fn

    def verify(t):
        def fn():
            hh, _ = target.model.forward_export_kv(t, cache=cache, keep_last=t.shape[1])
            target.logits(hh)[0].argmax(-1).tolist()
            cache.rollback(t.shape[1])
        return fn

    out = {"drafter_step_s": timed(draft), "target_step_s": timed(step(tok))}
    for k in ks:
        out[f"verify_k{k}_s"] = timed(verify(tok.repeat(1, k + 1)))
    return out


def sampled_run(target, drafter, prompts, n: int, k: int, rounds: int, temperature: float = 0.8, top_k: int = 40) -> dict:
    """Speculative *sampling* (output follows the target's distribution; tokens differ from plain sampling,
    so nothing to assert): acceptance and decode speed against plain sampling, seeds per prompt and round."""
    st = {"drafted": 0, "accepted": 0, "rounds": 0, "new_tokens": 0}
    plain, spec = [[] for _ in prompts], [[] for _ in prompts]
    for r in range(rounds):
        for i, p in enumerate(prompts):
            kw = dict(temperature=temperature, top_k=top_k, seed=1000 * r + i)
            _, dt, _ = run_once(target, p, n, **kw)
            plain[i].append(dt)
            _, dt, s = run_once(target, p, n, drafter, k, **kw)
            spec[i].append(dt)
            for key in st:
                st[key] += getattr(s, key)
    runs = rounds * len(prompts)
    med_p = statistics.median([t for v in plain for t in v])
    med_s = statistics.median([t for v in spec for t in v])
    return {"k": k, "temperature": temperature, "top_k": top_k, **st,
            "acceptance_rate": st["accepted"] / max(st["drafted"], 1),
            "tokens_per_target_forward": (st["new_tokens"] - runs) / max(st["rounds"], 1),
            "plain_tok_s": (n - 1) / med_p, "spec_tok_s": (n - 1) / med_s,
            "speedup_vs_plain": statistics.median([statistics.median(plain[i]) / statistics.median(spec[i])
                                                   for i in range(len(prompts))])}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--retrain", action="store_true")
    ap.add_argument("--steps", type=int, default=None, help="Override the drafter's training steps.")
    ap.add_argument("--rows", type=int, default=None, help="Override the number of training rows.")
    ap.add_argument("--layers", default=None, help="Drafter layer types, comma separated (S/F), e.g. F or S,F.")
    ap.add_argument("--unroll", type=int, default=None)
    ap.add_argument("--ks", default="1,2,3,4,6", help="Draft lengths to benchmark.")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--train-only", action="store_true")
    ap.add_argument("--sample-k", type=int, default=3, help="Draft length of the sampled run (0: skip it).")
    ap.add_argument("--json", type=Path, default=HERE / "results" / "house_drafter.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    recipe = Recipe()
    if args.steps:
        recipe.steps = args.steps
    if args.rows:
        recipe.rows = args.rows
    if args.unroll:
        recipe.unroll = args.unroll
    if args.layers:
        m = {"S": "sliding_attention", "F": "full_attention"}
        recipe.layer_types = tuple(m[x.strip().upper()] for x in args.layers.split(","))
    d = house_model_dir("house-shakespeare")
    tok = load_tokenizer(d / "tokenizer.json")
    texts = shakespeare_texts()
    target = load_pretrained(d, dtype=torch.float32)
    ddir, facts = get_drafter(target, tok, texts, recipe, args.retrain)
    res = {"target": str(d), "drafter": str(ddir), "recipe": asdict(recipe), "training": facts, "threads": 1}
    if args.train_only:
        atomic_write_text(args.json, json.dumps(res, indent=2, default=str) + "\n")
        return 0
    drafter = load_drafter(ddir, dtype=torch.float32)
    for p in drafter.parameters():
        p.requires_grad_(False)
    use_fast_path(target)  # what the first generate call does anyway; done before timing
    ks = [int(x) for x in args.ks.split(",")]
    prompts = corpus_prompts(tok, texts, sorted(HELDOUT_PLAYS), args.prompts, recipe.prompt_len, seed=7).tolist()
    n = args.new
    # Identity and acceptance (also the warm-up).
    plain_out = [run_once(target, p, n)[0] for p in prompts]
    acc = {}
    for k in ks:
        st = {"drafted": 0, "accepted": 0, "rounds": 0, "new_tokens": 0}
        for p, want in zip(prompts, plain_out):
            got, _, s = run_once(target, p, n, drafter, k)
            assert got == want, f"speculative output differs from plain greedy decoding (k={k})"
            for key in st:
                st[key] += getattr(s, key)
        acc[k] = {**st, "acceptance_rate": st["accepted"] / max(st["drafted"], 1),
                  "tokens_per_target_forward": (st["new_tokens"] - len(prompts)) / max(st["rounds"], 1)}
        print(f"k={k}: identical to plain greedy on {len(prompts)} prompts; acceptance "
              f"{100 * acc[k]['acceptance_rate']:.1f}%, {acc[k]['tokens_per_target_forward']:.2f} tokens per target forward",
              flush=True)
    # Timing: interleaved rounds.
    times: dict[str, list[list[float]]] = {"plain": [[] for _ in prompts], **{f"k{k}": [[] for _ in prompts] for k in ks}}
    for r in range(args.rounds):
        for i, p in enumerate(prompts):
            order = ["plain"] + [f"k{k}" for k in ks]
            if r % 2:
                order.reverse()
            for name in order:
                if name == "plain":
                    _, dt, _ = run_once(target, p, n)
                else:
                    _, dt, _ = run_once(target, p, n, drafter, int(name[1:]))
                times[name][i].append(dt)
    med = {name: statistics.median([t for per in v for t in per]) for name, v in times.items()}
    # Per prompt: median over rounds, then the ratio to plain; the median of those ratios.
    ratio = {name: statistics.median([statistics.median(times["plain"][i]) / statistics.median(v[i]) for i in range(len(prompts))])
             for name, v in times.items()}
    costs = piece_costs(target, drafter, prompts[0], ks)
    sampled = sampled_run(target, drafter, prompts, n, args.sample_k, args.rounds) if args.sample_k else None
    rows = []
    for name in times:
        k = None if name == "plain" else int(name[1:])
        row = {"decoder": name, "k": k, "decode_s_median": med[name], "decode_tok_s": (n - 1) / med[name],
               "speedup_vs_plain": ratio[name]}
        if k is not None:
            a = acc[k]
            row.update(acceptance_rate=a["acceptance_rate"], tokens_per_target_forward=a["tokens_per_target_forward"])
            # Time model: one verification + k drafter steps per round, per committed token.
            per_round = costs[f"verify_k{k}_s"] + k * costs["drafter_step_s"]
            row["model_speedup"] = a["tokens_per_target_forward"] * costs["target_step_s"] / per_round
        rows.append(row)
    res.update(prompts=len(prompts), prompt_len=recipe.prompt_len, new_tokens=n, rounds=args.rounds,
               identical_to_plain=True, costs_s=costs, rows=rows, acceptance=acc, sampled=sampled)
    print(f"\n{len(prompts)} held-out prompts x {args.rounds} rounds, {n} new tokens, 1 thread; decode time after the first token")
    print("| decoder | acceptance | tokens / target forward | decode tok/s (median) | speed-up vs plain (median of prompts) | cost model |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        a = f"{100 * r['acceptance_rate']:.1f}%" if r["k"] else "-"
        tpf = f"{r['tokens_per_target_forward']:.2f}" if r["k"] else "1.00"
        mdl = f"{r['model_speedup']:.2f}x" if r["k"] else "-"
        print(f"| {r['decoder']} | {a} | {tpf} | {r['decode_tok_s']:.1f} | {r['speedup_vs_plain']:.2f}x | {mdl} |")
    if sampled:
        print(f"sampled (temperature {sampled['temperature']}, top-k {sampled['top_k']}), k={sampled['k']}: acceptance "
              f"{100 * sampled['acceptance_rate']:.1f}%, {sampled['tokens_per_target_forward']:.2f} tokens per target forward, "
              f"plain {sampled['plain_tok_s']:.1f} tok/s, speculative {sampled['spec_tok_s']:.1f} tok/s, "
              f"speed-up {sampled['speedup_vs_plain']:.2f}x")
    print("piece costs (median s): " + ", ".join(f"{k} {1e3 * v:.2f} ms" for k, v in costs.items()))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.json, json.dumps(res, indent=2, default=str) + "\n")
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
