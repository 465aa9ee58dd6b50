"""`gemma4 params`, `gemma4 memory` and `gemma4 quantize`."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import typer
from rich.console import Console
from rich.table import Table

from gemma4.cli._common import (CliError, dtype_option, check_model, check_output, find_tokenizer, need_matplotlib,
                                progress, read_text_arg)
from gemma4.cli.convert import carry_tokenizer
from gemma4.infer import use_plain_path
from gemma4.io import gguf_is_quantized, gguf_native_model, load_config, load_pretrained, resolve_path, save_pretrained
from gemma4.model import FULL, PRESETS, SLIDING, Gemma4Config, estimate_memory
from gemma4.model.size import TOWER_PARAMS, count_parameters, parse_tokens, published_comparison
from gemma4.quant import QuantizationError, calibration_ids, gptq_quantize, model_nbytes, quantize


def _b(n: float) -> str:
    return f"{n / 1e9:.3f} B" if n >= 1e8 else f"{n / 1e6:.2f} M"


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def _config(preset_or_path: str):
    return load_config(check_model(preset_or_path, presets=True))


def _stored_weights(preset_or_path: str) -> tuple[str | None, int | None, str]:
    """The weight format a checkpoint holds (so `memory` of an int4 checkpoint prices int4), or
    (None, None, "") for presets and float checkpoints."""
    if preset_or_path.lower() in PRESETS and not Path(preset_or_path).exists():
        return None, None, ""  # a preset is an architecture: priced at --quant (bf16 by default)
    try:
        p = resolve_path(preset_or_path)
    except FileNotFoundError:
        return None, None, ""
    if p.suffix == ".gguf":
        if gguf_is_quantized(p):
            return "int8", None, ("the quantized GGUF runs as int8 with its Q4_K matrices as int4 (what `gemma4 "
                                  "generate` does by default): slightly less than this int8 figure")
        return None, None, ""
    cfg = _config(str(p))
    q = cfg.quantization or {}
    if q.get("scheme") in ("int8", "int4"):
        return q["scheme"], q.get("group_size"), f"the checkpoint stores {q['scheme']} weights"
    return None, None, ""


def params_table(preset_or_path: str):

    cfg = _config(preset_or_path)
    c = count_parameters(cfg)
    t = Table(title=f"parameters of {preset_or_path} (text decoder)")
    t.add_column("part")
    t.add_column("parameters", justify="right")
    t.add_column("share", justify="right")
    rows = [("total", c.total), ("token embedding (tied head)", c.embedding)]
    if c.lm_head:
        rows.append(("output head (untied)", c.lm_head))
    if c.ple_table:
        rows += [("PLE table (lookup)", c.ple_table), ("PLE projection", c.ple_projection), ("PLE in layers", c.ple_layers)]
    for typ, name in ((SLIDING, "sliding"), (FULL, "full")):
        n = c.layers_by_type[typ]
        if n:
            rows.append((f"attention, {n} {name} layers", c.attention[typ]))
            rows.append((f"MLP, {name} layers", c.mlp[typ]))
            if c.moe[typ]:
                rows.append((f"MoE, {name} layers", c.moe[typ]))
    rows += [("norms", c.norms), ("effective (total - PLE table)", c.effective),
             ("non-embedding", c.non_embedding)]
    if c.num_experts:
        rows += [("experts", c.experts), (f"active per token (top {c.top_k}/{c.num_experts})", c.active_per_token)]
    key = preset_or_path.lower()
    if key in TOWER_PARAMS:
        tw = TOWER_PARAMS[key]
        rows.append(("+ vision/audio towers (spec count, not built here)", round(sum(tw.values()))))
        rows.append(("total with towers", c.total + round(sum(tw.values()))))
    for name, n in rows:
        t.add_row(name, _b(n), f"{100 * n / c.total:.1f}%")
    cmp = published_comparison(key, c) if key in PRESETS else []
    return t, c, cmp


def register(app: typer.Typer) -> None:
    @app.command("params")
    def params_cmd(
        preset_or_path: str = typer.Argument(..., help=f"preset ({', '.join(PRESETS)}), checkpoint dir or .gguf"),
        json_out: bool = typer.Option(False, "--json", help="print JSON instead of a table"),
    ) -> None:
        """Parameter counts: total, embedding, PLE table, per layer type, MoE active per token."""
        check_model(preset_or_path, presets=True)

        t, c, cmp = params_table(preset_or_path)
        if json_out:
            typer.echo(json.dumps({"counts": c.as_dict(), "published": cmp}, indent=2))
            return
        con = Console()
        con.print(t)
        for r in cmp:
            mark = "reproduced" if r["reproduced"] else "NOT reproduced"
            con.print(f"published {r['figure']}: {r['published'] / 1e9:.1f}B, ours ({r['ours_is']}) "
                      f"{r['ours'] / 1e9:.3f}B: {mark}" + (f" — {r['note']}" if r["note"] else ""))

    @app.command("memory")
    def memory_cmd(
        preset_or_path: str = typer.Argument(..., help="preset, checkpoint dir or .gguf"),
        context: str = typer.Option("32k", help="tokens in the cache (4096, 32k, 128k)"),
        batch: int = typer.Option(1, help="sequences"),
        quant: str = typer.Option(None, help="weights: fp32, bf16, fp16, int8, int4 (default: what a quantized "
                                  "checkpoint stores, else bf16)"),
        group_size: int = typer.Option(None, help="int4 group size (default: the checkpoint's, else 32)"),
        kv_dtype: str = typer.Option(None, help="KV cache dtype (default: the activation dtype)"),
        prefill_chunk: int = typer.Option(512, help="tokens per prefill forward"),
        plot: Path = typer.Option(None, help="PNG: memory against context for every preset and precision"),
        json_out: bool = typer.Option(False, "--json"),
    ) -> None:
        """Memory of running a model at a context length: weights, KV cache by layer type, activations."""

        cfg = _config(preset_or_path)
        stored, stored_gs, why = (None, None, "") if quant is not None else _stored_weights(preset_or_path)
        quant = quant or stored or "bf16"
        group_size = group_size or stored_gs or 32
        if plot is not None:
            need_matplotlib("--plot")
        try:
            ctx = parse_tokens(context)
            e = estimate_memory(cfg, ctx, batch, quant, kv_dtype, group_size=group_size, prefill_chunk=prefill_chunk)
        except ValueError as err:
            raise typer.BadParameter(str(err)) from None
        e.config_name = preset_or_path
        if ctx > cfg.max_position_embeddings:
            typer.echo(f"warning: --context {ctx} exceeds the model's maximum of {cfg.max_position_embeddings} "
                       "tokens (it was not trained that long)", err=True)
        if json_out:
            typer.echo(json.dumps(e.as_dict(), indent=2))
        else:
            t = Table(title=f"{preset_or_path}: {e.weight_dtype} weights, {e.kv_dtype} KV, context {ctx}, batch {batch}")
            t.add_column("item")
            t.add_column("bytes", justify="right")
            for part, nb in e.weights.items():
                t.add_row(f"weights: {part}", _gib(nb))
            t.add_row("[b]weights total", _gib(e.weights_total))
            for typ, name in ((SLIDING, "sliding"), (FULL, "full")):
                if e.kv_layers[typ]:
                    t.add_row(f"KV {name} ({e.kv_layers[typ]} layers with a cache)", _gib(e.kv_by_type[typ]))
            t.add_row("KV allocated (full layers grow in chunks)", _gib(e.kv_reserved))
            if e.k_eq_v_saving:
                t.add_row("K=V: a shared-K/V cache would save (ours stores both)", _gib(e.k_eq_v_saving))
            t.add_row(f"activations (prefill chunk {e.prefill_chunk})", _gib(e.activations))
            t.add_row("[b]total", _gib(e.total))
            if e.offloadable:
                t.add_row("of which may stay off the accelerator (PLE table)", _gib(e.offloadable))
                t.add_row("[b]accelerator total", _gib(e.accelerator_total))
            Console().print(t)
            if why:
                typer.echo(f"note: {why}")
            for n in e.notes:
                typer.echo(f"note: {n}")
        if plot is not None:  # after the table: the plot takes seconds
            out = plot_memory(plot, batch=batch, group_size=group_size)
            typer.echo(f"wrote {out}")

    @app.command("quantize")
    def quantize_cmd(
        src: str = typer.Argument(..., help="checkpoint dir, .gguf or short name"),
        dst: Path = typer.Argument(..., help="output directory (config.json + model.safetensors)"),
        scheme: str = typer.Option("int4", help="int8, int4, bf16 (weights stored as bf16, computed in float32), or "
                                   "gguf-native (a GGUF's Q4_K blocks kept as int4-g32, the other matrices int8)"),
        group_size: int = typer.Option(None, help="int4 group size (32, 64, 128, 256; default 32); with int8, 32 gives "
                                       "a float16 scale per 32 inputs (GGUF's Q8_0 layout) instead of one per row"),
        dtype: str = typer.Option(None, help="dtype of the unquantized tensors and of the activations (bf16, fp32; "
                                  "default bf16, fp32 with --scheme bf16)"),
        no_embeddings: bool = typer.Option(False, "--no-embeddings", help="keep embedding/head and PLE table in float"),
        method: str = typer.Option("rtn", help="rtn (round to nearest, no data), gptq (error-aware, calibrated), or "
                                   "awq-gptq (activation-aware scales, then GPTQ; int4's best quality)"),
        embedding_scheme: str = typer.Option("same", help="'same', or 'int8' to keep the tied embedding/head table "
                                             "at int8 under an int4 body (gptq/awq-gptq)"),
        int8_modules: str = typer.Option("", help="comma-separated layer linears kept at int8 under an int4 body "
                                          "(gptq/awq-gptq), e.g. k_proj,v_proj: like Q4_K_M's higher-precision attn_v"),
        calib_text: Path = typer.Option(None, help="calibration text file for gptq/awq-gptq (default: Python's "
                                        "reference documentation prose, pydoc_data)"),
        calib_tokens: int = typer.Option(16384, help="calibration tokens for gptq/awq-gptq (rows of 512)"),
    ) -> None:
        """Quantize a checkpoint's weights (int8 per channel / int4 group-wise / bf16) and save it.

        rtn needs no data and takes seconds. gptq and awq-gptq read calibration text through the checkpoint's tokenizer and take minutes.

        Gemma 3 270M, perplexity over bf16 on text it has not memorized (Alice in Wonderland) / on one it has (the US Constitution): int4-g32 rtn +35% / +80%; with --embedding-scheme int8: gptq +14% / +47%, awq-gptq +7.7% / +42%, +6.6% / +34% adding --int8-modules k_proj,v_proj; int8 gptq -0.1% / +0.8%."""

        dt = dtype_option(dtype or ("fp32" if scheme == "bf16" else "bf16"))  # the one dtype table
        check_model(src)
        src_path = resolve_path(src)
        check_output(dst, src_path)
        if scheme == "gguf-native":
            if src_path.suffix != ".gguf":
                raise typer.BadParameter(f"--scheme gguf-native reads a .gguf file; {src} is not one")
            model = gguf_native_model(src_path, dtype=dt)
            save_pretrained(model, dst)
            tok_note = carry_tokenizer(src_path, Path(dst))
            typer.echo(f"gguf-native: {len(model.gguf_native['q4k_int4'])} Q4_K matrices kept as int4-g32, the rest int8: "
                       f"{_gib(model_nbytes(model))}; saved to {dst}{tok_note}")
            return
        if method not in ("rtn", "gptq", "awq-gptq"):
            raise typer.BadParameter(f"unknown method {method!r}; choose rtn, gptq or awq-gptq")
        if embedding_scheme not in ("same", "int8"):
            raise typer.BadParameter(f"--embedding-scheme must be 'same' or 'int8', got {embedding_scheme!r}")
        mods = tuple(m.strip() for m in int8_modules.split(",") if m.strip())
        if method == "rtn" and (embedding_scheme != "same" or mods):
            raise typer.BadParameter("--embedding-scheme int8 and --int8-modules go with --method gptq or awq-gptq")
        calib = None
        if method != "rtn":
            tok = find_tokenizer(src)
            if tok is None:
                raise typer.BadParameter(f"--method {method} tokenizes calibration text, and {src} has no tokenizer "
                                         "(put tokenizer.json beside it, or use --method rtn)")
            text = read_text_arg(str(calib_text), "--calib-text") if calib_text else None
            try:
                calib = calibration_ids(tok, text, n_tokens=calib_tokens)
            except QuantizationError as err:
                raise typer.BadParameter(str(err)) from None
        model = use_plain_path(load_pretrained(src_path, dtype=torch.float32))
        if model.config.quantization:
            q = model.config.quantization
            raise CliError(f"{src} is already quantized ({q.get('scheme')}); quantize a float checkpoint")
        before = model_nbytes(model)
        gs = (group_size or 32) if scheme == "int4" else group_size
        try:
            if calib is None:
                quantize(model, scheme, gs, embeddings=not no_embeddings, progress=progress)
            else:
                gptq_quantize(model, scheme, gs, calib_ids=calib, embeddings=not no_embeddings,
                              embedding_scheme=None if embedding_scheme == "same" else embedding_scheme,
                              awq=method == "awq-gptq", int8_modules=mods, progress=progress)
        except QuantizationError as err:
            raise typer.BadParameter(str(err)) from None
        model.to(dt)
        save_pretrained(model, dst)
        tok_note = carry_tokenizer(src_path, Path(dst))
        typer.echo(f"{scheme}{'-g' + str(gs) if gs else ''} ({method}): {_gib(before)} (fp32) -> "
                   f"{_gib(model_nbytes(model))}; saved to {dst}{tok_note}")


def plot_memory(path: Path, batch: int = 1, group_size: int = 32, presets=None, contexts=None) -> Path:
    """Total memory (weights + KV + prefill activations) against context, one panel per preset, one
    line per weight precision (KV in the activation dtype)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    presets = presets or [p for p in PRESETS]
    contexts = contexts or [2**k for k in range(10, 19)]
    precisions = ["fp32", "bf16", "int8", "int4"]
    cols = 3
    rows = -(-len(presets) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.6 * rows), squeeze=False)
    for ax, name in zip(axes.flat, presets):
        cfg = Gemma4Config.from_preset(name)
        for prec in precisions:
            ys = [estimate_memory(cfg, c, batch, prec, group_size=group_size).total / 2**30 for c in contexts]
            ax.plot(contexts, ys, marker=".", label=prec if prec != "int4" else f"int4-g{group_size}")
        kv = [estimate_memory(cfg, c, batch, "bf16").kv_reserved / 2**30 for c in contexts]
        ax.plot(contexts, kv, "k--", lw=1, label="KV alone (bf16)")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title(name)
        ax.set_xlabel("context (tokens)")
        ax.set_ylabel("GiB")
        ax.grid(alpha=0.3, which="both")
        max_ctx = cfg.max_position_embeddings
        ax.axvline(max_ctx, color="gray", lw=0.8, ls=":")
    for ax in list(axes.flat)[len(presets):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=8)
    fig.suptitle(f"gemma4 memory estimate (batch {batch}; total = weights + KV + prefill activations)")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
    return path
