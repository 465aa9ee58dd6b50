"""What `gemma4 generate -m gemma3-270m` costs by default (the Q4_K_M GGUF run quantized: Q4_K kept as
int4, the rest int8, bf16 activations) against `--dtype float32` (every tensor dequantized), on 1 thread.

Each configuration runs in a fresh process (so peak RSS is that configuration's alone) doing what the CLI
does: ``gemma4.cli._common.load_model`` then a greedy ``stream`` of 64 tokens. Reported: RSS after
loading, peak RSS of the process (VmHWM: the load's transient included), load seconds, prefill and
decode tokens/s. The median of ``--runs`` runs is reported per configuration.

    python benchmarks/cli_default.py --runs 3      # writes benchmarks/results/cli_default.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

CHILD = r"""
import json, sys, time, torch
torch.set_num_threads(1)
def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024
from gemma4._util import parse_dtype
from gemma4.cli._common import find_tokenizer, load_model
from gemma4.infer import LatencyMonitor, stream
dtype = parse_dtype(sys.argv[1]) if sys.argv[1] != "default" else None
base = status("VmRSS")
tok = find_tokenizer("gemma3-270m")
ids = tok.encode("The capital of France is")
m, load_s, how = load_model("gemma3-270m", dtype=dtype)
held = status("VmRSS")
mon = LatencyMonitor(m)
with mon:
    g = stream(m, [ids], 64, stop_token_ids=(), monitor=mon)
    for _ in g:
        pass
r = mon.report()
print(json.dumps({"how": how, "load_s": load_s, "rss_before_load": base, "rss_after_load": held,
                  "peak_rss": status("VmHWM"), "rss_end": status("VmRSS"), "prefill_tok_s": r["prefill_tok_s"],
                  "decode_tok_s": r["decode_tok_s"], "text": tok.decode(g.tokens[0][:12])}))
"""


def run_one(mode: str) -> dict:
    p = subprocess.run([sys.executable, "-c", CHILD, mode], capture_output=True, text=True, timeout=900)
    if p.returncode:
        raise SystemExit(f"{mode} failed:\n{p.stderr}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "cli_default.json"))
    args = ap.parse_args()
    rows = {}
    for mode in ("default", "float32"):
        runs = [run_one(mode) for _ in range(args.runs)]
        med = {k: statistics.median(r[k] for r in runs) for k in runs[0] if isinstance(runs[0][k], (int, float))}
        med.update(how=runs[0]["how"], text=runs[0]["text"], runs=runs)
        rows[mode] = med
    mib = 2 ** 20
    print(f"{'gemma4 generate -m gemma3-270m':32} {'held MiB':>9} {'peak MiB':>9} {'load s':>7} {'prefill':>8} "
          f"{'decode tok/s':>12}")
    for mode, r in rows.items():
        held = (r["rss_after_load"] - r["rss_before_load"]) / mib
        print(f"{mode:32} {held:9.0f} {r['peak_rss'] / mib:9.0f} {r['load_s']:7.2f} {r['prefill_tok_s']:8.1f} "
              f"{r['decode_tok_s']:12.2f}")
    d, f = rows["default"], rows["float32"]
    print(f"default vs float32: decode {d['decode_tok_s'] / f['decode_tok_s']:.2f}x, "
          f"peak RSS {d['peak_rss'] / f['peak_rss']:.2f}x, weights held "
          f"{(d['rss_after_load'] - d['rss_before_load']) / (f['rss_after_load'] - f['rss_before_load']):.2f}x")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"threads": 1, "new_tokens": 64, "rows": rows}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
