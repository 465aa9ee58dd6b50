"""The compiled decode kernels (gemma4.quant.native) against PyTorch's on the same weights (issue 16).

For Gemma 3 270M's shapes (the tied 262,144 x 640 head and one layer's matrices), int8 per-row, int4-g32 and
bf16 weights: milliseconds per call of our kernel and of PyTorch's (``torch._weight_int8pack_mm`` /
``_weight_int4pack_mm_for_cpu`` with bf16 activations, ``torch.mv`` / ``F.linear`` for bf16), at 1 and 128
rows (decode, prefill) and 1 and 2 threads. Layer shapes are timed over a ring of distinct copies larger
than the caches, so every call reads its weights from memory as a decode step does. Baseline in the same
run: a plain read of the same bytes (``torch.sum`` over them as int64), the memory-bandwidth bound.
Rounds interleave the engines; the best of each is kept.

    python benchmarks/native_kernels.py                # table + results/native_kernels.json
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from gemma4.quant import native
from gemma4.quant.rtn import Int4Weight

HERE = Path(__file__).resolve().parent
SHAPES = {"head 262144x640": (262144, 640), "gate_up 4096x640": (4096, 640), "down 640x2048": (640, 2048)}
RING_BYTES = 160 << 20  # distinct copies per layer shape: more than the 105 MiB L3 of the benchmark machine


def _ring(n: int, k: int, make, itemsize: int = 1) -> list:
    """Distinct copies of a weight, as many as fill RING_BYTES (one of a table that size or larger)."""
    return [make() for _ in range(max(1, RING_BYTES // (n * k * itemsize)))]


def cases(n: int, k: int, rows: int):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(rows, k, generator=g)
    xb = x.to(torch.bfloat16)

    def int8():
        return (torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8),
                (torch.rand(n, generator=g) * 0.01).to(torch.bfloat16))

    def int4(portable: bool = False):
        # Random codes and scales: the speed does not depend on them, and quantizing 160 MB is slow.
        w = Int4Weight(n, k, 32)
        codes = torch.randint(0, 16, (n, k), generator=g, dtype=torch.uint8)
        sz = (torch.randn(k // 32, n, 2, generator=g) * 0.01).to(torch.bfloat16)
        if portable:  # PyTorch's kernel layout: made with the native kernels switched off
            os.environ["GEMMA4_NATIVE"] = "0"
        try:
            w.set_rows(codes, sz)
        finally:
            os.environ.pop("GEMMA4_NATIVE", None)
        return w

    def bf16():
        return torch.randn(n, k, generator=g).to(torch.bfloat16)

    i8, i4, ti4, b16 = _ring(n, k, int8), _ring(n, k, int4), _ring(n, k, lambda: int4(True)), _ring(n, k, bf16, 2)
    reads = _ring(n, k, lambda: torch.randint(-127, 128, (n, k // 8), generator=g, dtype=torch.int64))
    it = {name: iter(()) for name in ("sum", "i8", "i4", "ti4", "b16")}

    def cyc(name, ring):
        try:
            return next(it[name])
        except StopIteration:
            it[name] = iter(ring)
            return next(it[name])

    out = {
        "read int8-sized bytes (bound)": lambda: cyc("sum", reads).sum(),
        "int8 native": lambda: native.int8_matmul(x, *cyc("i8", i8)),
        "int8 torch": lambda: torch._weight_int8pack_mm(xb, *cyc("i8", i8)),
        "int4 native": lambda: (lambda w: native.int4_matmul(x, *w.kernel_tensors()[1:], 32))(cyc("i4", i4)),
        "int4 torch": lambda: cyc("ti4", ti4).matmul(xb),
        "bf16 native": lambda: native.bf16_matmul(x, cyc("b16", b16)),
        "bf16 torch": (lambda: torch.mv(cyc("b16", b16), xb[0])) if rows == 1 else (lambda: F.linear(xb, cyc("b16", b16))),
    }
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "native_kernels.json")
    a = ap.parse_args(argv)
    if not native.available():
        print("gemma4.quant.native is unavailable here (no C compiler, or GEMMA4_NATIVE=0): nothing to compare")
        return 0
    res = {"isa": native.isa(), "rows": []}
    print(f"kernels: {res['isa']}; ms per call, best of {a.rounds} interleaved rounds")
    for threads in [int(t) for t in a.threads.split(",")]:
        torch.set_num_threads(threads)
        for label, (n, k) in SHAPES.items():
            for rows in (1, 128):
                if rows > 1 and n > 100_000:
                    continue  # the head runs on the last position only
                fns = cases(n, k, rows)
                best = {name: float("inf") for name in fns}
                for _ in range(a.rounds):
                    for name, fn in fns.items():
                        t = time.perf_counter()
                        fn()
                        best[name] = min(best[name], time.perf_counter() - t)
                row = {"shape": label, "rows": rows, "threads": threads, "ms": {k: v * 1e3 for k, v in best.items()}}
                res["rows"].append(row)
                cells = "  ".join(f"{k} {v * 1e3:.3f}" for k, v in best.items())
                print(f"{threads}T {label:18} M={rows:<3} {cells}")
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(res, indent=1))
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
