"""`gemma4 info`: a readable summary of an architecture (preset, checkpoint directory or GGUF file)."""

from __future__ import annotations

from collections import Counter

import typer

from rich.console import Console
from rich.table import Table

from gemma4.cli._common import check_model
from gemma4.io import load_config
from gemma4.model import FULL, SLIDING, Gemma4Config, build_model, count_params


def _rope_text(cfg: Gemma4Config, t: str) -> str:
    r = cfg.rope(t)
    s = f"{r.get('rope_type', 'default')} θ={r.get('rope_theta', 10000):g}"
    if r.get("rope_type") == "proportional":
        s += f" p={r.get('partial_rotary_factor', 1.0)}"
    if r.get("factor"):
        s += f" factor={r['factor']}"
    return s


def describe(cfg: Gemma4Config) -> list[tuple[str, str]]:
    rows: list[tuple[str, str]] = []
    family = "Gemma 3" if cfg.is_gemma3 else "Gemma 4"
    rows.append(("family", f"{family} ({cfg.model_type})"))
    rows.append(("layers", f"{cfg.num_hidden_layers}  pattern {cfg.describe_layers()}  (S=sliding, F=full)"))
    rows.append(("hidden / vocab", f"{cfg.hidden_size} / {cfg.vocab_size}"))
    for t, label in ((SLIDING, "sliding"), (FULL, "full")):
        idx = [i for i, lt in enumerate(cfg.layer_types) if lt == t]
        if not idx:
            continue
        i = idx[0]
        kv = Counter(cfg.layer_kv_heads(j) for j in idx)
        extra = "  K=V (no v_proj)" if cfg.layer_k_eq_v(i) else ""
        win = f"  window {cfg.sliding_window}" if t == SLIDING else ""
        rows.append((f"{label} layers ({len(idx)})",
                     f"{cfg.num_attention_heads} q heads, {'/'.join(map(str, kv))} kv heads, head_dim "
                     f"{cfg.layer_head_dim(i)}{win}{extra}"))
        rows.append((f"{label} RoPE", _rope_text(cfg, t)))
    sizes = Counter(cfg.layer_intermediate_size(i) for i in range(cfg.num_hidden_layers))
    rows.append(("MLP width", ", ".join(f"{w} x{n}" for w, n in sorted(sizes.items()))))
    if cfg.enable_moe_block:
        rows.append(("MoE", f"{cfg.num_experts} experts, top-{cfg.top_k_experts}, expert width "
                            f"{cfg.moe_intermediate_size}, beside the dense MLP in every layer"))
    if cfg.hidden_size_per_layer_input:
        rows.append(("per-layer embeddings", f"{cfg.hidden_size_per_layer_input} per layer, table "
                     f"[{cfg.vocab_size_per_layer_input}, {cfg.num_hidden_layers * cfg.hidden_size_per_layer_input}]"))
    if cfg.num_kv_shared_layers:
        modes = cfg.kv_sharing_modes
        producers = [i for i, m in enumerate(modes) if m == "store"]
        rows.append(("KV sharing", f"layers {cfg.first_kv_shared_layer}-{cfg.num_hidden_layers - 1} reuse K/V of "
                     f"producers {producers}"))
    rows.append(("attention scale", f"{cfg.attention_scale:g}" + ("" if cfg.is_gemma3 else "  (q/k norms carry the temperature)")))
    rows.append(("logit soft-cap", str(cfg.final_logit_softcapping)))
    rows.append(("context", str(cfg.max_position_embeddings)))
    n = count_params(build_model(cfg, device="meta"))
    rows.append(("parameters", f"{n:,} ({n / 1e9:.3f} B)"))
    return rows


def register(app: typer.Typer) -> None:
    @app.command()
    def info(model: str = typer.Argument(..., help="A preset (e2b, e4b, 31b, 26b-a4b, 12b, gemma3-270m), a checkpoint directory or a .gguf file.")):
        """Show the architecture: layer pattern, heads and head dims per layer type, window, RoPE, PLE, KV sharing, MoE, parameters."""
        cfg = load_config(check_model(model, presets=True))
        table = Table(title=f"gemma4 info: {model}", show_header=False)
        table.add_column(style="bold cyan")
        table.add_column()
        for k, v in describe(cfg):
            table.add_row(k, v)
        Console().print(table)
