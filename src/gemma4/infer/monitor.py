"""Latency monitoring: time to first token, prefill and decode throughput, and where the time goes.

The per-component breakdown uses forward pre/post hooks on the model's submodules (no model code
changes) plus a timing wrapper around ``model.logits`` for the output head; everything is removed
on :meth:`LatencyMonitor.detach`. Components: attention (``self_attn``, including the KV-cache
writes), mlp (the dense MLP), moe (router + experts + their norms), ple (per-layer-embedding
lookups, projections and norms), norms (the other RMSNorms), embed, head (output projection and
soft-cap), and "other": the rest of the forward (masks, RoPE tables, residual adds, gating products).
Hooks cost about a microsecond each; leave ``breakdown=False`` for the cleanest throughput numbers.

Usage::

    with LatencyMonitor(model, breakdown=True) as mon:
        gemma4.generate(model, prompts, 64, monitor=mon)
    print(mon.report())  # `gemma4 generate --stats` draws it as tables
"""

from __future__ import annotations

import re
import time
from collections import defaultdict

import torch

CATEGORIES = ("attention", "mlp", "moe", "ple", "norms", "embed", "head", "other")

_LAYER = re.compile(r"^model\.layers\.(\d+)\.(\w+)$")
_LAYER_CATEGORY = {
    "self_attn": "attention",
    "mlp": "mlp",
    "router": "moe", "experts": "moe", "pre_feedforward_layernorm_2": "moe",
    "post_feedforward_layernorm_1": "moe", "post_feedforward_layernorm_2": "moe",
    "per_layer_input_gate": "ple", "per_layer_projection": "ple", "post_per_layer_input_norm": "ple",
    "input_layernorm": "norms", "post_attention_layernorm": "norms",
    "pre_feedforward_layernorm": "norms", "post_feedforward_layernorm": "norms",
}
_MODEL_CATEGORY = {
    "model.embed_tokens": "embed",
    "model.embed_tokens_per_layer": "ple", "model.per_layer_model_projection": "ple",
    "model.per_layer_projection_norm": "ple",
    "model.norm": "norms",
}


def classify(name: str) -> tuple[str, int | None] | None:
    """Module name -> (category, layer index or None), or None for modules not timed on their own."""
    m = _LAYER.match(name)
    if m:
        cat = _LAYER_CATEGORY.get(m.group(2))
        return (cat, int(m.group(1))) if cat else None
    cat = _MODEL_CATEGORY.get(name)
    return (cat, None) if cat else None


class LatencyMonitor:
    """Collects timings from a generation run (pass it as ``monitor=`` to :func:`gemma4.infer.generate`)."""

    def __init__(self, model=None, breakdown: bool = False):
        self.model = model
        self.breakdown = breakdown and model is not None
        self._handles: list = []
        self._patched_logits = False
        self.reset()

    # ------------------------------------------------------------------ lifecycle
    def reset(self) -> None:
        self.phase = "prefill"
        self.t_start = self.t_first = self.t_end = None
        self.prompt_tokens = 0
        self.batch = 0
        self.decode_steps = 0
        # seconds[phase][category]; per_layer[phase][layer][category]
        self.seconds = {"prefill": defaultdict(float), "decode": defaultdict(float)}
        self.per_layer = {"prefill": defaultdict(lambda: defaultdict(float)), "decode": defaultdict(lambda: defaultdict(float))}
        self.forward_seconds = {"prefill": 0.0, "decode": 0.0}

    def __enter__(self) -> "LatencyMonitor":
        self.attach()
        return self

    def __exit__(self, *exc) -> None:
        self.detach()

    def attach(self) -> None:
        if not self.breakdown or self._handles:
            return
        model = self.model
        sync = model.device.type == "cuda"
        starts: dict[int, float] = {}

        def now() -> float:
            if sync:
                torch.cuda.synchronize()
            return time.perf_counter()

        def pre(mod, _inp):
            starts[id(mod)] = now()

        def post_for(cat: str, layer: int | None):
            def post(mod, _inp, _out):
                dt = now() - starts.pop(id(mod))
                self.seconds[self.phase][cat] += dt
                if layer is not None:
                    self.per_layer[self.phase][layer][cat] += dt
            return post

        def body_post(mod, _inp, _out):
            self.forward_seconds[self.phase] += now() - starts.pop(id(mod))

        for name, mod in model.named_modules():
            c = classify(name)
            if c is not None:
                self._handles.append(mod.register_forward_pre_hook(pre))
                self._handles.append(mod.register_forward_hook(post_for(*c)))
        body = model.model
        self._handles.append(body.register_forward_pre_hook(pre))
        self._handles.append(body.register_forward_hook(body_post))

        # The head is a method (tied embedding), not a module: time it with an instance-level wrapper.
        original = model.logits

        def timed_logits(h):
            t0 = now()
            out = original(h)
            dt = now() - t0
            self.seconds[self.phase]["head"] += dt
            self.forward_seconds[self.phase] += dt
            return out

        model.logits = timed_logits
        self._patched_logits = True

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        if self._patched_logits:
            del self.model.logits  # the instance attribute; the class method shows through again
            self._patched_logits = False

    # ------------------------------------------------------------------ events (called by generation)
    def start(self, prompt_tokens: int, batch: int) -> None:
        self.reset()
        self.prompt_tokens, self.batch = prompt_tokens, batch
        self.t_start = time.perf_counter()

    def first_token(self) -> None:
        if self.model is not None and self.model.device.type == "cuda":
            torch.cuda.synchronize()
        self.t_first = time.perf_counter()
        self.phase = "decode"

    def token(self) -> None:
        self.decode_steps += 1

    def finish(self) -> None:
        self.t_end = time.perf_counter()

    # ------------------------------------------------------------------ results
    def report(self) -> dict:
        """Plain numbers: seconds, tokens per second, and the breakdown (seconds per category)."""
        if self.t_start is None or self.t_first is None:
            raise RuntimeError("the monitor has not seen a generation run yet (pass monitor= to generate)")
        end = self.t_end if self.t_end is not None else time.perf_counter()
        prefill_s = self.t_first - self.t_start
        decode_s = end - self.t_first
        out = {
            "batch": self.batch,
            "prompt_tokens": self.prompt_tokens,
            "ttft_s": prefill_s,
            "prefill_s": prefill_s,
            "prefill_tok_s": self.prompt_tokens / prefill_s if prefill_s > 0 else float("nan"),
            "decode_steps": self.decode_steps,
            "decode_s": decode_s,
            # per sequence (steps per second) and over the batch (tokens per second)
            "decode_steps_s": self.decode_steps / decode_s if decode_s > 0 and self.decode_steps else float("nan"),
            "decode_tok_s": self.batch * self.decode_steps / decode_s if decode_s > 0 and self.decode_steps else float("nan"),
        }
        if self.breakdown:
            bd = {}
            for phase in ("prefill", "decode"):
                secs = dict(self.seconds[phase])
                timed = sum(secs.values())
                secs["other"] = max(0.0, self.forward_seconds[phase] - timed)
                wall = prefill_s if phase == "prefill" else decode_s
                bd[phase] = {
                    "seconds": {c: secs.get(c, 0.0) for c in CATEGORIES},
                    "forward_s": self.forward_seconds[phase],
                    "outside_forward_s": max(0.0, wall - self.forward_seconds[phase]),  # sampling, loop
                }
            out["breakdown"] = bd
            out["per_layer"] = {ph: {i: dict(d) for i, d in sorted(self.per_layer[ph].items())} for ph in ("prefill", "decode")}
        return out
