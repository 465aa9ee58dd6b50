import pytest
import torch

import quant_tiny
from gemma4 import load_pretrained, save_pretrained
from gemma4.quant.gptq import awq_scale, gptq_matrix, gptq_quantize, layer_output_error
from gemma4.quant.rtn import (Int4Linear, Int8Embedding, Int8Linear, QuantizationError, int4_dequant, int8_dequant,
                          quantize, quantize_int4_tensor, quantize_int8_tensor)


def _data(n=64, k=128, t=600, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.05
    x = torch.randn(t, k, generator=g) @ torch.randn(k, k, generator=g) * 0.3  # correlated inputs
    return w, x


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("gs", [32, 64])
def test_matrix_int4_format_and_lower_output_error(act_order, gs):
    w, x = _data()
    codes, sz = gptq_matrix(w, x.t() @ x, "int4", gs, act_order=act_order, damp=0.01)
    rc, rsz = quantize_int4_tensor(w, gs)
    assert codes.dtype == torch.uint8 and codes.shape == rc.shape and int(codes.max()) <= 15
    assert sz.dtype == torch.bfloat16 and sz.shape == rsz.shape
    e_gptq = layer_output_error(w, int4_dequant(codes, sz, gs, torch.float32), x)
    e_rtn = layer_output_error(w, int4_dequant(rc, rsz, gs, torch.float32), x)
    assert e_gptq < 0.9 * e_rtn


def test_matrix_int8_and_bad_input():
    w, x = _data()
    q, s = gptq_matrix(w, x.t() @ x, "int8", damp=0.01)
    rq, rs = quantize_int8_tensor(w)
    assert q.dtype == torch.int8 and torch.equal(s, rs)
    assert layer_output_error(w, int8_dequant(q, s, torch.float32), x) < layer_output_error(w, int8_dequant(rq, rs, torch.float32), x)
    with pytest.raises(QuantizationError, match="Hessian shape"):
        gptq_matrix(w, torch.eye(64), "int4", 32)
    with pytest.raises(QuantizationError, match="calib_ids"):
        gptq_quantize(quant_tiny.model("gemma3"), calib_ids=torch.rand(2, 8))
    with pytest.raises(QuantizationError, match="already quantized"):
        gptq_quantize(quantize(quant_tiny.model("gemma3"), "int8"), calib_ids=torch.zeros(1, 8, dtype=torch.long))


def _calib(n=4, t=48, seed=1):
    return torch.randint(0, 320, (n, t), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("kind", ["gemma3", "ple"])
def test_model_round_trip(tmp_path, kind):
    ids = _calib()
    m = gptq_quantize(quant_tiny.model(kind), "int4", 32, calib_ids=ids)
    assert isinstance(m.model.layers[0].self_attn.q_proj, Int4Linear)
    assert m.config.quantization["scheme"] == "int4"
    ref = m(ids[:1, :16])
    save_pretrained(m, tmp_path / "q")
    back = load_pretrained(tmp_path / "q")
    assert torch.equal(back(ids[:1, :16]), ref)


def test_layer_output_error_lower_than_rtn():
    """On the calibration tokens, a first-layer linear (same input for both: float embeddings) has a lower
    output error after GPTQ than after RTN, and the whole model's logits are closer to the float ones."""
    ids = _calib()
    flt = quant_tiny.model("gemma3")
    x = {}
    def grab(mod, inp, out):
        x["x"] = inp[0].reshape(-1, inp[0].shape[-1])

    hk = flt.model.layers[0].mlp.down_proj.register_forward_hook(grab)
    ref = flt(ids)
    hk.remove()
    g = gptq_quantize(quant_tiny.model("gemma3"), "int4", 32, calib_ids=ids, embeddings=False)
    r = quantize(quant_tiny.model("gemma3"), "int4", 32, embeddings=False)
    w = flt.model.layers[0].mlp.down_proj.weight
    e_g = layer_output_error(w, g.model.layers[0].mlp.down_proj.dequantize(), x["x"])
    e_r = layer_output_error(w, r.model.layers[0].mlp.down_proj.dequantize(), x["x"])
    assert e_g < 0.9 * e_r
    assert (g(ids) - ref).norm() < (r(ids) - ref).norm()


def test_mixed_int8_embedding():
    ids = _calib()
    m = gptq_quantize(quant_tiny.model("gemma3"), "int4", 32, calib_ids=ids, embedding_scheme="int8")
    assert isinstance(m.model.embed_tokens, Int8Embedding) and m.lm_head is None  # tied: the table is the head
    assert torch.isfinite(m(ids[:1, :8])).all()


def _outliers(m, seed=3):
    """Give a few input channels of every norm feeding linears large activations, as Gemma's norms do
    (random tiny weights have none, and AWQ would rightly leave them alone)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in m.model.layers:
            for norm in (layer.input_layernorm, layer.pre_feedforward_layernorm):
                idx = torch.randperm(norm.weight.shape[0], generator=g)[:4]
                norm.weight[idx] = (norm.weight[idx] + norm.offset) * 25 - norm.offset
    return m


@pytest.mark.parametrize("kind", ["gemma3", "dense", "ple", "moe"])
def test_awq_folds_keep_the_float_model(kind):
    ids = _calib()
    m = _outliers(quant_tiny.model(kind))
    ref = m(ids)
    before = [(l.input_layernorm.weight + l.input_layernorm.offset).abs() for l in m.model.layers]
    chosen = awq_scale(m, ids, 32)
    # norm multipliers only grow (s <= 1): Gemma 3's stored w of 1 + w must not cancel when cast to bf16
    for l, b in zip(m.model.layers, before):
        assert ((l.input_layernorm.weight + l.input_layernorm.offset).abs() >= b * (1 - 1e-6)).all()
    assert len(chosen) == 3 * m.config.num_hidden_layers
    assert any(a > 0 for a in chosen.values())
    out = m(ids)
    assert (out - ref).abs().max() <= 1e-4 * ref.abs().max()


def test_awq_lowers_int4_error_and_stacks_with_gptq(tmp_path):
    ids = _calib()
    flt = _outliers(quant_tiny.model("gemma3"))
    ref = flt(ids)
    rtn = quantize(_outliers(quant_tiny.model("gemma3")), "int4", 32, embeddings=False)
    a = _outliers(quant_tiny.model("gemma3"))
    awq_scale(a, ids, 32)
    quantize(a, "int4", 32, embeddings=False)
    assert (a(ids) - ref).norm() < 0.9 * (rtn(ids) - ref).norm()
    g = gptq_quantize(_outliers(quant_tiny.model("gemma3")), "int4", 32, calib_ids=ids, awq=True,
                      embedding_scheme="int8", int8_modules="v_proj")
    assert (g(ids) - ref).norm() < (rtn(ids) - ref).norm()
    # the int8 table and v_proj under an int4 body are recorded overrides: the model saves and loads
    ov = dict(g.config.quantization["overrides"])
    assert ov.pop("model.embed_tokens") == {"scheme": "int8", "group_size": None}
    assert sorted(ov) == [f"model.layers.{i}.self_attn.v_proj" for i in range(4)]
    assert isinstance(g.model.layers[0].self_attn.v_proj, Int8Linear)
    out = g(ids[:1, :16])
    save_pretrained(g, tmp_path / "q")
    back = load_pretrained(tmp_path / "q")
    assert isinstance(back.model.embed_tokens, Int8Embedding)
    assert torch.equal(back(ids[:1, :16]), out)


def test_awq_bad_input():
    with pytest.raises(QuantizationError, match="calib_ids"):
        awq_scale(quant_tiny.model("gemma3"), [[1, 2]])
    with pytest.raises(QuantizationError, match="already quantized"):
        awq_scale(quantize(quant_tiny.model("gemma3"), "int8"), torch.zeros(1, 8, dtype=torch.long))
    with pytest.raises(QuantizationError, match="group_size must be one of"):
        awq_scale(quant_tiny.model("gemma3"), torch.zeros(1, 8, dtype=torch.long), 48)


def test_cli_quantize_awq_gptq(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    import gemma4.cli.quant as cg
    from gemma4.cli import app

    class Tok:  # the tiny checkpoint has no tokenizer: bytes of the text as ids < 320
        def encode(self, text):
            return [3 + b for b in text.encode("utf-8")]

    src = tmp_path / "src"
    save_pretrained(_outliers(quant_tiny.model("gemma3")), src)
    (tmp_path / "calib.txt").write_text("The quick brown fox jumps over the lazy dog. " * 40)
    r = CliRunner().invoke(app, ["quantize", str(src), str(tmp_path / "bad"), "--method", "gptq"])
    assert r.exit_code != 0 and "no tokenizer" in " ".join(r.output.replace("│", " ").split())
    monkeypatch.setattr(cg, "find_tokenizer", lambda path: Tok())
    r = CliRunner().invoke(app, ["quantize", str(src), str(tmp_path / "q"), "--method", "awq-gptq", "--embedding-scheme",
                                 "int8", "--calib-text", str(tmp_path / "calib.txt"), "--calib-tokens", "1024",
                                 "--int8-modules", "v_proj"])
    assert r.exit_code == 0, r.output
    q = load_pretrained(tmp_path / "q")
    assert q.config.quantization["overrides"]["model.embed_tokens"]["scheme"] == "int8"
    assert isinstance(q.model.layers[0].mlp.up_proj, Int4Linear)
    assert isinstance(q.model.layers[0].self_attn.v_proj, Int8Linear)
    r = CliRunner().invoke(app, ["quantize", str(src), str(tmp_path / "bad"), "--method", "magic"])
    assert r.exit_code != 0 and "unknown method" in r.output
