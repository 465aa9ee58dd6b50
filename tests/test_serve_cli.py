"""`gemma4 serve` as a user runs it: a subprocess on a tiny checkpoint, bound to 127.0.0.1 by default."""

from __future__ import annotations

import os

import httpx
import pytest

pytest.importorskip("uvicorn")
psutil = pytest.importorskip("psutil")

import gemma4  # noqa: E402
from gemma4.cli.serve import _loopback  # noqa: E402
from gemma4.io import assets  # noqa: E402
from gemma4.text import load_tokenizer  # noqa: E402
from cli_tiny import free_port, running_server  # noqa: E402
from test_cache import tiny_model  # noqa: E402


def test_loopback_detection():
    assert _loopback("127.0.0.1") and _loopback("localhost") and _loopback("::1")
    assert not _loopback("0.0.0.0") and not _loopback("192.168.1.5") and not _loopback("example.org")


def test_gemma4_serve_subprocess(tmp_path):
    tok = load_tokenizer(assets.gemma4_vocab_gguf())
    model = tiny_model("dense", vocab_size=tok.vocab_size, max_position_embeddings=512,
                       bos_token_id=tok.bos_id, eos_token_id=tok.eos_id)
    ckpt = tmp_path / "tiny-gemma4"
    gemma4.save_pretrained(model, ckpt)
    tok.save(ckpt / "tokenizer.json")
    port = free_port()
    env = dict(os.environ, GEMMA4_API_KEY="sk-cli-test")  # the key from the environment, not argv
    with running_server(["serve", str(ckpt), "--port", str(port), "--max-batch", "2", "--threads", "1"], port,
                        env) as (proc, base):
        listening = [c.laddr for c in psutil.Process(proc.pid).net_connections(kind="inet") if c.status == "LISTEN"]
        assert listening and all(a.ip == "127.0.0.1" for a in listening), listening
        h = {"Authorization": "Bearer sk-cli-test"}
        assert httpx.get(base + "/v1/models", headers=h).json()["data"][0]["id"] == "tiny-gemma4"
        assert httpx.get(base + "/v1/models").status_code == 401
        r = httpx.post(base + "/v1/completions", headers=h, timeout=60,
                       json={"model": "tiny-gemma4", "prompt": "Hello", "max_tokens": 3, "temperature": 0,
                             "ignore_eos": True})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3


def test_adapter_is_merged_into_a_float_base(tmp_path):
    import torch

    from cli_tiny import char_checkpoint
    from gemma4.cli.serve import load_for_serving
    from gemma4.infer import generate
    from gemma4.train import add_lora, save_adapter

    ckpt = char_checkpoint(tmp_path / "ckpt")
    base = gemma4.load_pretrained(ckpt)
    add_lora(base, r=4)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in base.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)  # B starts at zero: give the adapter an effect
    save_adapter(base, tmp_path / "adapter")
    prompt = [2, 40, 41, 42, 43]
    want = generate(base, [prompt], 8, stop_token_ids=())[0]
    plain = generate(gemma4.load_pretrained(ckpt), [prompt], 8, stop_token_ids=())[0]
    m, tok, how, _ = load_for_serving(str(ckpt), adapter=tmp_path / "adapter", pack=True)
    assert "merged" in how and tok is not None
    assert generate(m, [prompt], 8, stop_token_ids=())[0] == want != plain
