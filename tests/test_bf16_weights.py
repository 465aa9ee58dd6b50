"""bf16 weights with float32 activations (the "bf16" scheme of gemma4.quant, a BF16 GGUF's default form):
the native kernel's row-blocked prefill against its one-row decode and float64, the modules against a
float32 model holding the same bf16-rounded weights, save/load and GGUF round trips, and the default load
of a BF16 GGUF."""

import copy

import pytest
import torch

import quant_tiny
from gemma4 import load_pretrained, load_tokenizer, save_pretrained
from gemma4.infer import fast_path
from gemma4.io.gguf import GGUFFile, save_gguf
from gemma4.io.gguf_native import gguf_is_bf16, gguf_is_quantized, gguf_weight_form
from gemma4.io.load import gguf_form
from gemma4.quant import (Bf16Embedding, Bf16Linear, QuantExperts, QuantizationError, dequantize_model, gptq_quantize,
                          native, quantize)
from gemma4.quant.rtn import quantization_targets
from test_native import _variants, needs_cc

IDS = torch.randint(0, 320, (2, 14), generator=torch.Generator().manual_seed(5))


def _rounded(kind):
    """A float32 tiny model, and a copy whose weights were rounded to bf16 (what the bf16 scheme holds)."""
    m = quant_tiny.model(kind)
    ref = copy.deepcopy(m)
    with torch.no_grad():  # the matrices and tables the scheme stores (quantization_targets); norms stay float32
        for name in quantization_targets(ref):
            for p in ref.get_submodule(name).parameters():
                p.copy_(p.to(torch.bfloat16))
    return m, ref


@needs_cc
@pytest.mark.parametrize("variant", _variants())
@pytest.mark.parametrize("m, n, k", [(13, 10, 37), (6, 8, 640), (8, 32, 16), (30, 70, 100), (7, 12, 1024),
                                     (25, 33, 2048), (1, 5, 48)])
@pytest.mark.parametrize("threads", [1, 2])
def test_bf16_matmul_rows_and_blocks(variant, m, n, k, threads):
    """Float32 sums of exact products (bf16 weight x float32 activation) for every row count: the one-row
    (decode) path below 8 rows, where each row gives the bits it gives alone; the packed GEMM (prefill,
    AVX-512) from 8, with partial panels and row blocks, and bf16 output the float32 result rounded."""
    g = torch.Generator().manual_seed(m * n + k)
    x, w = torch.randn(m, k, generator=g), torch.randn(n, k, generator=g).to(torch.bfloat16)
    y = native.bf16_matmul(x, w, threads=threads, variant=variant)
    ref = x.double() @ w.double().T
    # float32 rounding of a k-term sum of terms ~1 (|ref| up to ~4 sqrt(k)): well under 1e-6 * k
    torch.testing.assert_close(y.double(), ref, rtol=0, atol=1e-6 * k)
    if m < 8:
        rows = torch.cat([native.bf16_matmul(x[i : i + 1], w, threads=threads, variant=variant) for i in range(m)])
        assert torch.equal(y, rows)
    yb = native.bf16_matmul(x, w, threads=threads, variant=variant, out_dtype=torch.bfloat16)
    assert torch.equal(yb, y.to(torch.bfloat16))
    xb = x.to(torch.bfloat16)  # bf16 rows in: the same as their float32 values
    assert torch.equal(native.bf16_matmul(xb, w, threads=threads, variant=variant, out_dtype=torch.float32),
                       native.bf16_matmul(xb.float(), w, threads=threads, variant=variant))


@pytest.mark.parametrize("kind", ["gemma3", "ple", "moe", "dense"])
def test_bf16_scheme_computes_the_float32_function_of_the_rounded_weights(kind):
    m, ref = _rounded(kind)
    quantize(m, "bf16")
    assert m.config.quantization["scheme"] == "bf16" and m.dtype == torch.float32
    assert isinstance(m.model.embed_tokens, Bf16Embedding) and m.lm_head is None
    assert any(isinstance(x, Bf16Linear) for x in m.modules())
    if kind == "moe":
        assert isinstance(m.model.layers[0].experts, QuantExperts)
    with torch.no_grad():
        torch.testing.assert_close(m(IDS), ref(IDS), rtol=0, atol=1e-4)
    # Half the weight memory of float32: the tables are bf16, the norms stay float32.
    q = m.model.layers[0].mlp.down_proj.qweight
    assert q.dtype == torch.bfloat16 and m.float().model.layers[0].mlp.down_proj.qweight.dtype == torch.bfloat16


def test_bf16_scheme_without_the_kernels(monkeypatch):
    monkeypatch.setenv("GEMMA4_NATIVE", "0")
    assert not native.available()
    m, ref = _rounded("gemma3")
    quantize(m, "bf16")
    with torch.no_grad():
        torch.testing.assert_close(m(IDS), ref(IDS), rtol=0, atol=1e-4)
        assert fast_path.use_fast_path(m).fast_path  # nothing to pack: the modules stay, still correct
        torch.testing.assert_close(m(IDS), ref(IDS), rtol=0, atol=1e-4)


@needs_cc
def test_bf16_scheme_fast_path_prefill_and_decode_match_the_plain_model():
    m, _ = _rounded("gemma3")
    quantize(m, "bf16")
    fast = fast_path.use_fast_path(copy.deepcopy(m))
    assert type(fast.lm_head).__name__ == "QuantPackedHead"
    assert type(fast.model.layers[0].self_attn).__name__ == "FusedQKVAttention"
    with torch.no_grad():
        torch.testing.assert_close(fast(IDS), m(IDS), rtol=0, atol=1e-4)
    fast_path.use_plain_path(fast)
    assert fast.state_dict().keys() == m.state_dict().keys()
    for k, v in m.state_dict().items():
        assert torch.equal(fast.state_dict()[k], v), k


def test_bf16_scheme_saves_loads_and_exports(tmp_path):
    m, ref = _rounded("gemma3")
    quantize(m, "bf16")
    save_pretrained(m, tmp_path / "ck")
    back = load_pretrained(tmp_path / "ck")
    assert back.config.quantization == m.config.quantization
    assert back.model.layers[1].self_attn.q_proj.qweight.dtype == torch.bfloat16
    with torch.no_grad():
        torch.testing.assert_close(back(IDS), m(IDS), rtol=0, atol=1e-5)
    plain = dequantize_model(copy.deepcopy(m))  # back to ordinary modules: the rounded weights themselves
    assert plain.config.quantization is None
    for k, v in ref.state_dict().items():
        assert torch.equal(plain.state_dict()[k], v), k
    # Written to GGUF as BF16 matrices, the values as they are; read back as a float32 model.
    save_gguf(m, tmp_path / "m.gguf", ftype="f32")
    g = GGUFFile(tmp_path / "m.gguf")
    assert g.tensors["blk.0.attn_q.weight"].type_name == "BF16" and g.tensors["token_embd.weight"].type_name == "BF16"
    f32 = load_pretrained(tmp_path / "m.gguf", dtype=torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(f32(IDS), ref(IDS), rtol=0, atol=1e-4)


def test_gptq_refuses_bf16():
    m = quant_tiny.model("gemma3")
    with pytest.raises(QuantizationError, match="bf16"):
        gptq_quantize(m, "bf16", None, calib_ids=IDS)
    with pytest.raises(QuantizationError, match="group_size"):
        quantize(m, "bf16", 32)


@needs_cc
@pytest.mark.parametrize("kind", ["gemma3", "ple"])
def test_bf16_gguf_loads_as_bf16_weights_with_float32_activations(kind, tmp_path):
    """The default load of a BF16 GGUF: no float copy of the model, norms read exactly, and the function of
    the float32 load of the same file."""
    src = quant_tiny.model(kind)
    path = save_gguf(src, tmp_path / "m-bf16.gguf", ftype="bf16")
    assert gguf_is_bf16(path) and not gguf_is_quantized(path) and gguf_weight_form(path) == "bf16"
    assert gguf_form(path, None, "cpu", False) == "bf16" and gguf_form(path, None, "cpu", True) is None
    m = load_pretrained(path)
    assert m.config.quantization["scheme"] == "bf16" and m.dtype == torch.float32
    assert m.model.embed_tokens.qweight.dtype == torch.bfloat16
    f32 = load_pretrained(path, dtype=torch.float32)
    for name, p in f32.named_parameters():  # the float tensors (norms, scalars) as the file holds them
        if p.dim() == 1:
            assert torch.equal(dict(m.named_parameters())[name], p), name
    with torch.no_grad():
        torch.testing.assert_close(m(IDS), f32(IDS), rtol=0, atol=1e-4)
        fast_path.use_fast_path(m)
        torch.testing.assert_close(m(IDS), f32(IDS), rtol=0, atol=1e-4)
    bf16 = load_pretrained(path, dtype=torch.bfloat16)  # asked for: the bf16 model, as before
    assert bf16.config.quantization is None and bf16.dtype == torch.bfloat16


def test_cli_quantize_bf16_and_convert_a_bf16_gguf(tmp_path):
    from typer.testing import CliRunner

    from cli_tiny import char_checkpoint, no_traceback
    from gemma4.cli import app

    def run(*args):
        r = CliRunner().invoke(app, [str(a) for a in args])
        no_traceback(r)
        assert r.exit_code == 0, r.output
        return r

    ckpt = char_checkpoint(tmp_path / "ck")
    r = run("quantize", ckpt, tmp_path / "q", "--scheme", "bf16")
    assert r.stdout.startswith("bf16 (rtn)")
    q = load_pretrained(tmp_path / "q")
    assert q.config.quantization["scheme"] == "bf16" and q.dtype == torch.float32  # float32 compute by default
    text = run("generate", "-m", tmp_path / "q", "--ids", "2 5 6", "-n", "6", "--no-timings").stdout
    # BF16 GGUF -> safetensors: a plain bf16 checkpoint, as stored (not the bf16-weight inference form).
    run("convert", ckpt, tmp_path / "m.gguf", "--type", "bf16")
    run("convert", tmp_path / "m.gguf", tmp_path / "back")
    back = load_pretrained(tmp_path / "back")
    assert back.config.quantization is None and back.dtype == torch.bfloat16
    # The GGUF's default form (bf16 weights, float32 compute) decodes what the bf16 checkpoint does.
    ids = run("generate", "-m", tmp_path / "m.gguf", "--ids", "2 5 6", "-n", "6", "--no-timings").stdout.split()
    assert load_tokenizer(ckpt).decode([int(i) for i in ids]) == text.strip("\n")
