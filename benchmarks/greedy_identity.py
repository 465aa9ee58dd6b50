"""Greedy output of the real Gemma 3 270M (Q4_K_M GGUF, dequantized to fp32) for three prompts, through
the plain Python API (load_pretrained + generate: the CPU fast path at first generation).

Run it on two checkouts and compare the JSON files: the package restructure (issue 10) had to leave these
tokens unchanged.

    python benchmarks/greedy_identity.py benchmarks/results/greedy_270m.json
"""

import json
import sys

import torch

import gemma4

torch.set_num_threads(1)
out_path = sys.argv[1] if len(sys.argv) > 1 else "benchmarks/results/greedy_270m.json"
model = gemma4.load_pretrained("gemma3-270m", dtype=torch.float32)  # the dequantized model, as recorded
tok = gemma4.load_tokenizer("gemma3-270m")
out = {}
for p in ["The capital of France is", "Once upon a time", "def fibonacci(n):"]:
    out[p] = gemma4.generate(model, [tok.encode(p)], max_new_tokens=32)[0]
    print(f"{p!r} -> {tok.decode(out[p])!r}")
with open(out_path, "w") as f:
    json.dump(out, f, indent=1)
