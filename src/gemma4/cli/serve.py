"""`gemma4 serve`: the OpenAI-compatible HTTP server (needs the `serve` extra: fastapi, uvicorn)."""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Optional

import typer

from gemma4.cli._common import DTYPE_HELP, check_device, check_model, dtype_option, find_tokenizer, load_model


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def load_for_serving(model: str, *, adapter: Path | None = None, dtype=None, device: str = "cpu", pack: bool = True):
    """The model and tokenizer ``gemma4 serve`` runs: the CLI's loading, then the LoRA adapter (folded
    into a float base so decoding costs what the base does; kept beside a quantized one), then the CPU
    fast path. Returns (model, tokenizer, how it was loaded, load seconds)."""
    from gemma4.infer import use_fast_path

    check_model(model)
    check_device(device)
    m, load_s, how = load_model(model, dtype=dtype, device=device, pack=pack and adapter is None)
    tok = find_tokenizer(model)
    if tok is None:
        raise typer.BadParameter(f"no tokenizer found for {model}: the server needs one (tokenizer.json, "
                                 "tokenizer.model or a GGUF vocabulary)")
    if adapter is not None:
        from gemma4.train import LoRAError, load_adapter, merge_lora

        try:
            load_adapter(m, adapter)
        except LoRAError as e:
            raise typer.BadParameter(f"--adapter {adapter}: {e}") from None
        try:
            merge_lora(m)
            how += f", adapter {adapter} merged"
        except LoRAError:  # a quantized base cannot absorb the update exactly: keep the adapter layers
            how += f", adapter {adapter} applied"
        if pack:
            use_fast_path(m)
    return m, tok, how, load_s


def register(app: typer.Typer) -> None:
    @app.command("serve")
    def serve_cmd(
        model: str = typer.Argument(..., help="Checkpoint directory, .gguf file or short name."),
        adapter: Optional[Path] = typer.Option(None, "--adapter", help="LoRA adapter directory to apply."),
        host: str = typer.Option("127.0.0.1", help="Address to bind (loopback unless you say otherwise)."),
        port: int = typer.Option(8000, help="TCP port."),
        api_key: Optional[str] = typer.Option(None, "--api-key", envvar="GEMMA4_API_KEY",
                                              help="Require 'Authorization: Bearer KEY' (or set GEMMA4_API_KEY)."),
        max_batch: int = typer.Option(8, "--max-batch", help="Requests decoded together."),
        name: Optional[str] = typer.Option(None, "--name", help="Model id clients send (default: the file/dir name)."),
        dtype: Optional[str] = typer.Option(None, help=DTYPE_HELP + " (default: the checkpoint's)."),
        device: str = typer.Option("cpu", help="cpu, cuda, ..."),
        prefill_chunk: int = typer.Option(256, help="Prompt tokens per prefill step (bounds the stall of running requests)."),
        max_queue: int = typer.Option(64, help="Waiting requests before new ones get 429."),
        max_tokens_cap: int = typer.Option(4096, help="Largest max_tokens a request may ask for."),
        max_prompt_tokens: Optional[int] = typer.Option(None, help="Longest prompt accepted (default: the context)."),
        context: Optional[int] = typer.Option(None, help="Cap the context (KV cache) below the model's."),
        timeout: float = typer.Option(600.0, help="Seconds a request may run before it is cut (504)."),
        max_body: int = typer.Option(4 << 20, help="Largest request body in bytes (413 beyond)."),
        threads: Optional[int] = typer.Option(None, help="torch.set_num_threads."),
        no_pack: bool = typer.Option(False, "--no-pack", help="Keep plain weights (skip the oneDNN CPU fast path)."),
        moderate: Optional[Path] = typer.Option(None, "--moderate", help="Classifier directory (from `gemma4 classify "
                                                "train`): score every finished reply and answer the flagged ones "
                                                "with the canonical refusal and finish_reason 'content_filter'. "
                                                "Streamed replies are then held back until scored."),
        moderate_threshold: Optional[float] = typer.Option(None, "--moderate-threshold", min=0.0, max=1.0,
                                                           help="Flag a reply when P(violation) is above this "
                                                           "(default: the classifier's own threshold)."),
    ):
        """Serve MODEL over an OpenAI-compatible HTTP API with continuous batching."""
        try:
            import uvicorn
        except ImportError:
            raise typer.BadParameter("gemma4 serve needs the serve extra: pip install 'gemma4[serve]'") from None
        import torch

        from gemma4.infer.batch import BatchEngine
        from gemma4.serve import ServeConfig, create_app

        if threads:
            torch.set_num_threads(threads)
        if not _loopback(host) and not api_key:
            typer.echo(f"warning: serving on {host} without --api-key: anyone who can reach it can use it", err=True)
        if moderate_threshold is not None and moderate is None:
            raise typer.BadParameter("--moderate-threshold needs --moderate CLASSIFIER_DIR")
        moderation = {}
        if moderate is not None:
            from gemma4.align.classifier import SafetyClassifier
            from gemma4.align.judge import REFUSAL

            clf = SafetyClassifier.load(moderate, device=device, threshold=moderate_threshold)
            moderation = dict(moderator=clf.scorer(), moderation_threshold=clf.threshold, refusal=REFUSAL)
        m, tok, how, load_s = load_for_serving(model, adapter=adapter, dtype=dtype_option(dtype), device=device,
                                               pack=not no_pack)
        engine = BatchEngine(m, max_batch=max_batch, prefill_chunk=prefill_chunk, max_queue=max_queue,
                             stop_token_ids=tok.stop_token_ids or None, max_length=context)
        served = name or Path(str(model).rstrip("/")).stem
        cfg = ServeConfig(model_name=served, api_key=api_key, max_body_bytes=max_body, max_prompt_tokens=max_prompt_tokens,
                          max_tokens_cap=max_tokens_cap, request_timeout=timeout)
        typer.echo(f"serving {served!r} ({how}, loaded in {load_s:.1f} s) on http://{host}:{port}/v1 "
                   f"(batch {max_batch}, context {engine.max_length})", err=True)
        if moderate is not None:
            typer.echo(f"moderating replies with {moderate} (threshold {moderation['moderation_threshold']:g})", err=True)
        uvicorn.run(create_app(engine, tok, cfg, **moderation), host=host, port=port, log_level="info",
                    timeout_graceful_shutdown=5)
