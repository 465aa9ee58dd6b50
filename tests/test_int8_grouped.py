"""Grouped int8 (a float16 scale per 32 inputs of a row: GGUF's Q8_0 layout): a Q8_0 GGUF loads into it
with its codes and scales as stored, exports back to the same bytes, saves and loads through safetensors
in any model dtype, and runs the CPU fast path; GPTQ refuses it. (Kernels: tests/test_native.py; the
quantizer and module: tests/test_quant.py; the one-call decode step: tests/test_decode_stack.py.)"""

import numpy as np
import pytest
import torch

import quant_tiny
from gemma4 import load_pretrained, quantize, save_pretrained
from gemma4.infer import use_fast_path
from gemma4.io.gguf import GGUFFile, gguf_to_hf, save_gguf
from gemma4.io.gguf_native import gguf_native_model
from gemma4.model.size import quantized_bytes
from gemma4.quant.gptq import gptq_quantize
from gemma4.quant.rtn import Int8Weight, QuantizationError, model_nbytes
from test_native import needs_cc

IDS = torch.randint(0, 320, (1, 14), generator=torch.Generator().manual_seed(0))


def _q8_0_blocks(g: GGUFFile, name: str) -> tuple[np.ndarray, np.ndarray]:
    """(codes int8 [.., K], scales float16 [.., K/32]) as the file stores them."""
    t = g.tensors[name]
    raw = np.asarray(g.raw(name)).reshape(-1, 34)
    k = t.shape[-1]
    return raw[:, 2:].copy().view(np.int8).reshape(-1, k), raw[:, :2].copy().view(np.float16).reshape(-1, k // 32)


@pytest.mark.parametrize("kind", ["gemma3", "moe"])
def test_q8_0_gguf_loads_exactly_and_exports_the_same_bytes(kind, tmp_path):
    m = quant_tiny.model(kind)
    src = save_gguf(m, tmp_path / "q8.gguf", ftype="q8_0")
    g = GGUFFile(src)
    q8 = [n for n, t in g.tensors.items() if t.type_name == "Q8_0"]
    assert "token_embd.weight" in q8 and len(q8) > 8
    loaded = gguf_native_model(src, dtype=torch.float32)
    assert loaded.config.quantization["scheme"] == "int8" and loaded.config.quantization["group_size"] == 32
    q8 = [n for n in q8 if "gate_inp" not in n]  # the MoE router stays in float (top-k is sensitive)
    for name in q8:
        hf = gguf_to_hf(name)
        mod = loaded.get_submodule(hf[: -len(".weight")] if hf.endswith(".weight") else hf)
        assert isinstance(mod, Int8Weight) and mod.group_size == 32, name
        codes, scales = _q8_0_blocks(g, name)
        assert np.array_equal(mod.qweight.reshape(-1, mod.in_features).numpy(), codes), name
        assert np.array_equal(mod.scales.reshape(-1, mod.in_features // 32).numpy(), scales), name
    # Memory: the file's own bytes (1 + 2/32 per weight), not the dequantized model.
    per = {n: quantized_bytes(t.shape[-2], t.shape[-1], "int8", 32, lead=int(np.prod(t.shape[:-2])))
           for n, t in g.tensors.items() if n in q8}
    assert per == {n: g.tensors[n].nbytes for n in q8}
    # Exported again: every Q8_0 tensor byte for byte.
    back = GGUFFile(save_gguf(loaded, tmp_path / "again.gguf"))
    for name in q8:
        assert back.tensors[name].type_name == "Q8_0"
        assert np.array_equal(np.asarray(back.raw(name)), np.asarray(g.raw(name))), name
    # The same weights computed in float32 (the file dequantized) agree with the quantized model.
    ref = load_pretrained(src, dtype=torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(IDS), ref(IDS), rtol=0, atol=2e-3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_saves_and_loads_with_float16_scales_in_any_model_dtype(dtype, tmp_path):
    m = quantize(quant_tiny.model("gemma3"), "int8", 32).to(dtype)
    lin = m.model.layers[0].mlp.up_proj
    assert lin.scales.dtype == torch.float16 and lin.scales.shape == (lin.out_features, lin.in_features // 32)
    save_pretrained(m, tmp_path)
    back = load_pretrained(tmp_path)
    assert back.dtype == dtype and back.config.quantization == m.config.quantization
    blin = back.model.layers[0].mlp.up_proj
    assert blin.scales.dtype == torch.float16 and torch.equal(blin.scales, lin.scales)  # never rounded through bf16
    assert model_nbytes(back) == model_nbytes(m)
    with torch.no_grad():
        assert torch.equal(back(IDS), m(IDS))


@needs_cc
def test_fast_path_fuses_and_matches_the_modules():
    m = quantize(quant_tiny.model("gemma3"), "int8", 32)
    with torch.no_grad():
        ref = m(IDS)
        fast = use_fast_path(m)
        assert fast.model.decode_stack is not None  # fused q/k/v and gate/up, all grouped int8
        # float32 ops in another order upstream can move an activation across an int8 rounding step
        # (tests/test_native_ops.py): the same bound as for the other int8 forms
        torch.testing.assert_close(fast(IDS), ref, rtol=0, atol=5e-3)


def test_gptq_and_bad_group_sizes_refused():
    m = quant_tiny.model("gemma3")
    with pytest.raises(QuantizationError, match="GPTQ int8 rounds per output row"):
        gptq_quantize(m, "int8", 32, calib_ids=IDS)
    with pytest.raises(QuantizationError, match="int8 group_size"):
        Int8Weight(8, 64, group_size=64)
    with pytest.raises(QuantizationError, match="too large for a float16"):
        quantize(_huge(quant_tiny.model("gemma3")), "int8", 32)


def _huge(m):
    with torch.no_grad():
        m.model.layers[0].mlp.up_proj.weight[0, 0] = 1e7
    return m


def test_cli_quantize_int8_with_group_size_32(tmp_path):
    from typer.testing import CliRunner

    from cli_tiny import char_checkpoint, no_traceback
    from gemma4.cli import app

    ck = char_checkpoint(tmp_path / "ck")
    r = CliRunner().invoke(app, ["quantize", str(ck), str(tmp_path / "q"), "--scheme", "int8", "--group-size", "32"])
    no_traceback(r)
    assert r.exit_code == 0 and "int8-g32 (rtn)" in r.output, r.output
    q = load_pretrained(tmp_path / "q")
    assert q.config.quantization["group_size"] == 32 and q.model.layers[0].mlp.up_proj.scales.dtype == torch.float16
    r = CliRunner().invoke(app, ["quantize", str(ck), str(tmp_path / "q2"), "--scheme", "int8", "--group-size", "64"])
    no_traceback(r)
    assert r.exit_code != 0 and "int8 group_size" in r.output
