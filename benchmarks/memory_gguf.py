"""Memory of the two ways big tables stay out of RAM (issue 16 item 3).

1. A quantized GGUF loaded in its quantized form (``gguf_native_model``: Q4_K kept as int4-g32, the rest
   int8), streamed tensor by tensor into the quantized modules. Goal: peak RSS above the baseline
   <= 1.25 x the file size, through the load and a short generate (whose first call packs the model for
   the CPU fast path). The dequantized float32 load (``load_pretrained``) is the comparison.
2. The PLE table of a safetensors checkpoint read through a memory map (``load_pretrained``'s default),
   against a full load (``map_ple=False``), on an E2B checkpoint written to disk (the ``e2b`` preset,
   random bf16 weights; written once into ``--cache``).

Every configuration runs in a fresh process, one thread. The baseline is the process's RSS after
``import torch, gemma4``; peaks are VmHWM from /proc/self/status (which counts the touched pages of a
memory-mapped file too). Prints a table, writes ``benchmarks/results/memory_gguf.json``.

    python benchmarks/memory_gguf.py                  # both parts
    python benchmarks/memory_gguf.py --skip-e2b       # the GGUF part only (seconds, not minutes)
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

CHILD = r"""
import json, sys, time
import torch, gemma4
torch.set_num_threads(1)

def status():
    out = {}
    for line in open("/proc/self/status"):
        k, _, v = line.partition(":")
        if k in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
            out[k] = int(v.split()[0]) * 1024
    return out

mode, path, new = sys.argv[1], sys.argv[2], int(sys.argv[3])
base = status()
t0 = time.perf_counter()
if mode == "gguf-native":
    from gemma4.io import gguf_native_model
    m = gguf_native_model(path, dtype=torch.bfloat16)
elif mode == "gguf-fp32":
    m = gemma4.load_pretrained(path, dtype=torch.float32)
elif mode == "ple-mmap":
    m = gemma4.load_pretrained(path)
elif mode == "ple-full":
    m = gemma4.load_pretrained(path, map_ple=False)
else:
    raise SystemExit(f"unknown mode {mode}")
load_s = time.perf_counter() - t0
loaded = status()
ids = [2, 818, 5279, 529, 7001, 563, 496, 1401]  # 8 token ids (the 270M's "The capital of France is a city")
t0 = time.perf_counter()
out = gemma4.generate(m, [ids], new, temperature=0.0)  # the first call packs the model (CPU fast path)
gen_s = time.perf_counter() - t0
end = status()
print(json.dumps({"mode": mode, "base": base, "loaded": loaded, "end": end, "load_s": load_s, "gen_s": gen_s,
                  "new_tokens": new, "tokens": out[0]}))
"""


def run_child(mode: str, path: Path, new: int) -> dict:
    p = subprocess.run([sys.executable, "-c", CHILD, mode, str(path), str(new)], capture_output=True, text=True,
                       timeout=3600)
    if p.returncode:
        raise SystemExit(f"{mode} failed:\n{p.stderr[-4000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


WRITER = r"""
import json, sys
import torch
from gemma4 import Gemma4Config, build_model
from gemma4._util import atomic_dir, atomic_save_safetensors, atomic_write_text
from gemma4.io.checkpoint import INDEX_NAME

out, preset, shard_bytes = sys.argv[1], sys.argv[2], int(sys.argv[3])
cfg = Gemma4Config.from_preset(preset)
meta = build_model(cfg, dtype=torch.bfloat16, device="meta")
names = [(k, tuple(v.shape)) for k, v in meta.state_dict().items() if k != "lm_head.weight"]
g = torch.Generator().manual_seed(0)
block = torch.empty(1 << 22, dtype=torch.bfloat16).normal_(0, 0.02, generator=g)

def fill(shape):
    # Small tensors: N(0, 0.02) matrices, vectors (norms, scalars) in [0.5, 1.5]. Tables of more than
    # 4M weights are tiled from one random 4M block: random enough for memory measurements, and it
    # writes 10 GB in seconds instead of minutes.
    n = 1
    for s in shape:
        n *= s
    if len(shape) <= 1:
        return torch.empty(shape, dtype=torch.bfloat16).uniform_(0.5, 1.5, generator=g)
    if n <= block.numel():
        return torch.empty(shape, dtype=torch.bfloat16).normal_(0, 0.02, generator=g)
    t = torch.empty(n, dtype=torch.bfloat16)
    for i in range(0, n, block.numel()):
        t[i:i + block.numel()] = block[: min(block.numel(), n - i)]
    return t.view(shape)

shards, cur, size = [], [], 0
for k, shape in names:
    nb = 2
    for s in shape:
        nb *= s
    if cur and size + nb > shard_bytes:
        shards.append(cur)
        cur, size = [], 0
    cur.append((k, shape))
    size += nb
shards.append(cur)
weight_map, total = {}, 0
with atomic_dir(out) as tmp:
    for i, sh in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {k: fill(shape) for k, shape in sh}  # one shard in memory at a time
        atomic_save_safetensors(tensors, tmp / fname, {"format": "pt"})
        weight_map.update({k: fname for k in tensors})
        total += sum(t.numel() * 2 for t in tensors.values())
        del tensors
    atomic_write_text(tmp / INDEX_NAME, json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    c = cfg.to_dict()
    c["dtype"] = "bfloat16"
    atomic_write_text(tmp / "config.json", json.dumps(c, indent=2, sort_keys=True) + "\n")
print(total)
"""


def e2b_checkpoint(cache: Path) -> Path:
    d = cache / "e2b-random-bf16"
    if not (d / "config.json").exists():
        print(f"writing a random-weight E2B checkpoint (bf16) to {d} ...", flush=True)
        p = subprocess.run([sys.executable, "-c", WRITER, str(d), "e2b", str(2 << 30)], capture_output=True,
                           text=True, timeout=3600)
        if p.returncode:
            raise SystemExit(f"writing the E2B checkpoint failed:\n{p.stderr[-4000:]}")
    return d


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--new-tokens", default="4,16",
                    help="greedy tokens generated after the GGUF loads, comma-separated: one gguf-native run each")
    ap.add_argument("--e2b-new-tokens", type=int, default=4)
    ap.add_argument("--skip-e2b", action="store_true")
    ap.add_argument("--skip-fp32", action="store_true", help="skip the dequantized float32 GGUF load")
    ap.add_argument("--cache", default=str(Path.home() / ".cache" / "gemma4" / "bench-memory"))
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "memory_gguf.json"))
    args = ap.parse_args()

    from gemma4.io.assets import gemma3_270m_gguf

    mib = 2 ** 20
    rows = []
    gguf = gemma3_270m_gguf()
    size = gguf.stat().st_size
    news = [int(x) for x in args.new_tokens.split(",")]
    runs = [("gguf-native", n) for n in news] + ([] if args.skip_fp32 else [("gguf-fp32", news[-1])])
    for mode, n in runs:
        r = run_child(mode, gguf, n)
        r.update(file=str(gguf), file_bytes=size)
        rows.append(r)
    if not args.skip_e2b:
        d = e2b_checkpoint(Path(args.cache))
        files = sorted(d.glob("*.safetensors"))
        size_e2b = sum(f.stat().st_size for f in files)
        for mode in ("ple-mmap", "ple-full"):
            r = run_child(mode, d, args.e2b_new_tokens)
            r.update(file=str(d), file_bytes=size_e2b)
            rows.append(r)

    print(f"{'configuration':14} {'new':>4} {'file MiB':>9} {'base MiB':>9} {'held MiB':>9} {'peak load':>10} "
          f"{'peak +gen':>10} {'peak/file':>9} {'end RSS':>8} {'end file':>9} {'load s':>7} {'gen s':>6}")
    for r in rows:
        b = r["base"]["VmRSS"]
        held = (r["loaded"]["VmRSS"] - b) / mib
        pl = (r["loaded"]["VmHWM"] - b) / mib
        pg = (r["end"]["VmHWM"] - b) / mib
        r["summary"] = {"held_mib": held, "peak_load_mib": pl, "peak_mib": pg,
                        "peak_over_file": pg * mib / r["file_bytes"],
                        "end_rss_mib": (r["end"]["VmRSS"] - b) / mib,
                        # mapped file pages resident at the end, beyond the shared libraries already mapped at baseline
                        "end_file_mib": (r["end"]["RssFile"] - r["base"]["RssFile"]) / mib}
        print(f"{r['mode']:14} {r['new_tokens']:4d} {r['file_bytes'] / mib:9.0f} {b / mib:9.0f} {held:9.0f} "
              f"{pl:10.0f} {pg:10.0f} "
              f"{r['summary']['peak_over_file']:9.2f} {r['summary']['end_rss_mib']:8.0f} "
              f"{r['summary']['end_file_mib']:9.0f} {r['load_s']:7.1f} {r['gen_s']:6.1f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"threads": 1, "goal": "gguf-native peak above baseline <= 1.25 x file size",
                               "goal_mib": 1.25 * size / mib, "rows": rows}, indent=2) + "\n")
    print(f"goal for gguf-native: peak above baseline <= 1.25 x {size / mib:.0f} MiB = {1.25 * size / mib:.1f} MiB")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
