"""GGUF: round trips for every tiny kind, block dequantization against an independent decoder, bad files."""

import struct

import gguf
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import gemma4
from gemma4.model.config import FULL
from gemma4.io.gguf import GGUFError, GGUFFile, config_from_gguf, dequantize, gguf_to_hf, hf_to_gguf, load_gguf, save_gguf
from tiny import hf_model, write_hf_checkpoint

KINDS = ["dense", "ple", "moe", "gemma3"]
IDS = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(1))
Q = gguf.GGMLQuantizationType


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    out = {}
    for kind in KINDS:
        d = tmp_path_factory.mktemp(kind)
        write_hf_checkpoint(kind, d)
        out[kind] = d
    return out


def _logits(m):
    with torch.no_grad():
        return m.set_attention_backend("eager")(IDS)


def _same_geometry(a, b):
    n = a.num_hidden_layers
    assert a.layer_types == b.layer_types
    assert a.kv_sharing_modes == b.kv_sharing_modes
    for i in range(n):
        assert (a.layer_head_dim(i), a.layer_kv_heads(i), a.layer_k_eq_v(i), a.layer_intermediate_size(i)) == \
               (b.layer_head_dim(i), b.layer_kv_heads(i), b.layer_k_eq_v(i), b.layer_intermediate_size(i)), i
    for t in set(a.layer_types):
        ra, rb = a.rope(t), b.rope(t)
        assert ra.get("rope_type", "default") == rb.get("rope_type", "default")
        assert float(ra["rope_theta"]) == float(rb["rope_theta"])
        assert ra.get("partial_rotary_factor", 1.0) == rb.get("partial_rotary_factor", 1.0)
    for f in ("vocab_size", "hidden_size", "num_attention_heads", "sliding_window", "rms_norm_eps",
              "final_logit_softcapping", "hidden_size_per_layer_input", "num_experts", "top_k_experts",
              "moe_intermediate_size", "attention_scale", "norm_offset", "tie_word_embeddings"):
        assert getattr(a, f) == getattr(b, f), f


@pytest.mark.parametrize("kind", KINDS)
def test_f32_round_trip(kind, ckpts, tmp_path):
    """safetensors -> GGUF (f32) -> model: same config geometry, same weights, same logits."""
    src = gemma4.load_pretrained(ckpts[kind])
    path = save_gguf(src, tmp_path / "m.gguf")
    g = GGUFFile(path)
    assert g.architecture == ("gemma3" if kind == "gemma3" else "gemma4")
    assert {g.tensors[n].qtype for n in g.tensors} == {Q.F32}
    back = load_gguf(path)
    _same_geometry(src.config, back.config)
    a, b = src.state_dict(), back.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        if kind == "gemma3" and k.endswith("norm.weight"):
            # Gemma 3 files hold 1+w (llama.cpp's convention): w -> 1+w -> w loses the low bits of small w.
            torch.testing.assert_close(b[k], a[k], rtol=0, atol=2.4e-7)  # half an ulp of 1+w <= 2.5
        else:
            assert torch.equal(a[k], b[k]), k
    if kind == "gemma3":
        torch.testing.assert_close(_logits(back), _logits(src), rtol=0, atol=1e-5)
    else:
        assert torch.equal(_logits(back), _logits(src))


def test_gemma3_norms_are_stored_as_one_plus_w(ckpts, tmp_path):
    src = gemma4.load_pretrained(ckpts["gemma3"])
    g = GGUFFile(save_gguf(src, tmp_path / "g3.gguf"))
    stored = g.load("blk.0.attn_norm.weight")
    torch.testing.assert_close(stored, src.model.layers[0].input_layernorm.weight + 1.0)
    assert torch.equal(g.load("blk.0.ffn_up.weight"), src.model.layers[0].mlp.up_proj.weight)  # not shifted


def test_gemma4_proportional_rope_written_as_llama_cpp_rope_freqs(ckpts, tmp_path):
    src = gemma4.load_pretrained(ckpts["dense"])
    g = GGUFFile(save_gguf(src, tmp_path / "d.gguf"))
    f = g.load("rope_freqs.weight")
    d = src.config.layer_head_dim(src.config.layer_types.index(FULL))
    n_rot = int(src.config.rope(FULL)["partial_rotary_factor"] * d / 2)
    assert f.shape == (d // 2,) and (f[:n_rot] == 1).all() and (f[n_rot:] > 1e29).all()
    assert g.get("gemma4.attention.sliding_window_pattern") == [t != FULL for t in src.config.layer_types]
    assert g.get("gemma4.attention.key_length") == d and g.get("gemma4.attention.key_length_swa") == src.config.head_dim


def test_bf16_round_trip_is_exact(ckpts, tmp_path):
    src = gemma4.load_pretrained(ckpts["moe"], dtype=torch.bfloat16)
    path = save_gguf(src, tmp_path / "b.gguf", ftype="bf16")
    assert GGUFFile(path).tensors["blk.0.attn_q.weight"].qtype == Q.BF16
    back = load_gguf(path)
    assert back.dtype == torch.bfloat16
    for k, v in src.state_dict().items():
        assert torch.equal(v, back.state_dict()[k]), k


def test_q8_0_write_and_read(ckpts, tmp_path):
    src = gemma4.load_pretrained(ckpts["ple"])
    path = save_gguf(src, tmp_path / "q.gguf", ftype="q8_0")
    g = GGUFFile(path)
    assert g.tensors["blk.0.ffn_down.weight"].qtype == Q.Q8_0  # rows of 64: two Q8_0 blocks
    assert g.tensors["blk.0.ffn_up.weight"].qtype == Q.F32  # rows of 48 do not split into blocks: kept exact
    back = load_gguf(path)
    for k, v in src.state_dict().items():
        w = back.state_dict()[k]
        if v.dim() == 2 and v.shape[-1] % 32 == 0:
            # Q8_0: per 32-block scale amax/127 (rounded to float16): at most half a step plus 127 x
            # the scale's float16 rounding (2^-11 relative).
            step = v.abs().reshape(-1, 32).amax(-1, keepdim=True) / 127
            assert ((w.reshape(-1, 32) - v.reshape(-1, 32)).abs() <= step * (0.5 + 127 * 2**-11)).all(), k
        else:
            assert torch.equal(v, w), k


def test_name_mapping_is_one_table_both_ways():
    for hf in ["model.embed_tokens.weight", "model.norm.weight", "model.layers.7.self_attn.q_norm.weight",
               "model.layers.3.experts.gate_up_proj", "model.layers.3.router.per_expert_scale",
               "model.layers.2.layer_scalar", "model.layers.0.per_layer_projection.weight"]:
        assert gguf_to_hf(hf_to_gguf(hf)) == hf
    assert hf_to_gguf("model.layers.4.pre_feedforward_layernorm.weight") == "blk.4.ffn_norm.weight"
    assert gguf_to_hf("rope_freqs.weight") is None
    with pytest.raises(KeyError):
        gguf_to_hf("blk.0.ssm_conv1d.weight")


# ----------------------------------------------------------------------------- dequantization
def _f16_bytes(x: float) -> bytes:
    return np.float16(x).tobytes()


def _ref_q8_0(b: bytes) -> list[float]:
    d = float(np.frombuffer(b[:2], np.float16)[0])
    return [d * q for q in np.frombuffer(b[2:34], np.int8).tolist()]


def _ref_q5_0(b: bytes) -> list[float]:
    d = float(np.frombuffer(b[:2], np.float16)[0])
    qh = struct.unpack("<I", b[2:6])[0]
    qs = b[6:22]
    y = [0.0] * 32
    for j in range(16):
        h0 = ((qh >> j) & 1) << 4
        h1 = ((qh >> (j + 16)) & 1) << 4
        y[j] = d * (((qs[j] & 0xF) | h0) - 16)
        y[j + 16] = d * (((qs[j] >> 4) | h1) - 16)
    return y


def _scale_min_k4(j: int, q: bytes) -> tuple[int, int]:
    if j < 4:
        return q[j] & 63, q[j + 4] & 63
    return (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4), (q[j + 4] >> 4) | ((q[j] >> 6) << 4)


def _ref_q4_k(b: bytes) -> list[float]:
    d = float(np.frombuffer(b[0:2], np.float16)[0])
    dmin = float(np.frombuffer(b[2:4], np.float16)[0])
    scales, qs = b[4:16], b[16:144]
    y = []
    for k in range(4):  # 64 values per step: low nibbles with sub-block 2k, high with 2k+1
        q = qs[32 * k:32 * k + 32]
        sc, m = _scale_min_k4(2 * k, scales)
        y += [d * sc * (v & 0xF) - dmin * m for v in q]
        sc, m = _scale_min_k4(2 * k + 1, scales)
        y += [d * sc * (v >> 4) - dmin * m for v in q]
    return y


def _ref_q6_k(b: bytes) -> list[float]:
    ql, qh = b[0:128], b[128:192]
    sc = np.frombuffer(b[192:208], np.int8).tolist()
    d = float(np.frombuffer(b[208:210], np.float16)[0])
    y = [0.0] * 256
    for half in range(2):
        L, H, S, o = ql[64 * half:], qh[32 * half:], sc[8 * half:], 128 * half
        for l in range(32):
            i = l // 16
            q1 = ((L[l] & 0xF) | (((H[l] >> 0) & 3) << 4)) - 32
            q2 = ((L[l + 32] & 0xF) | (((H[l] >> 2) & 3) << 4)) - 32
            q3 = ((L[l] >> 4) | (((H[l] >> 4) & 3) << 4)) - 32
            q4 = ((L[l + 32] >> 4) | (((H[l] >> 6) & 3) << 4)) - 32
            y[o + l] = d * S[i] * q1
            y[o + l + 32] = d * S[i + 2] * q2
            y[o + l + 64] = d * S[i + 4] * q3
            y[o + l + 96] = d * S[i + 6] * q4
    return y


def _random_blocks(qtype, n_blocks, rng):
    """Random block bytes with finite, moderate float16 scales in the scale fields."""
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    raw = bytearray(rng.integers(0, 256, n_blocks * size, dtype=np.uint8).tobytes())
    for i in range(n_blocks):
        o = i * size
        if qtype in (Q.Q8_0, Q.Q5_0):
            raw[o:o + 2] = _f16_bytes(rng.uniform(-0.05, 0.05))
        elif qtype == Q.Q4_K:
            raw[o:o + 2] = _f16_bytes(rng.uniform(0.001, 0.01))
            raw[o + 2:o + 4] = _f16_bytes(rng.uniform(0.001, 0.01))
        elif qtype == Q.Q6_K:
            raw[o + 208:o + 210] = _f16_bytes(rng.uniform(-0.01, 0.01))
    return bytes(raw)


@pytest.mark.parametrize("qtype,ref", [(Q.Q8_0, _ref_q8_0), (Q.Q5_0, _ref_q5_0), (Q.Q4_K, _ref_q4_k), (Q.Q6_K, _ref_q6_k)])
def test_block_dequantization_matches_independent_decoder(qtype, ref):
    rng = np.random.default_rng(int(qtype))
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    rows, cols = 3, 2 * 256
    raw = _random_blocks(qtype, rows * cols // block, rng)
    got = dequantize(np.frombuffer(raw, np.uint8), int(qtype), (rows, cols))
    want = [v for i in range(rows * cols // block) for v in ref(raw[i * size:(i + 1) * size])]
    torch.testing.assert_close(got.reshape(-1), torch.tensor(want, dtype=torch.float32), rtol=1e-6, atol=1e-7)
    bf = dequantize(np.frombuffer(raw, np.uint8), int(qtype), (rows, cols), torch.bfloat16)
    assert bf.dtype == torch.bfloat16 and torch.equal(bf, got.to(torch.bfloat16))


def test_chunked_dequantization_matches_gguf_package(monkeypatch):
    """Chunk boundaries (and the Q8_0 torch fast path) give exactly gguf.quants' values."""
    import gemma4.io.gguf as gio

    monkeypatch.setattr(gio, "_CHUNK_ELEMS", 1000)  # not a multiple of any block: exercises the rounding
    rng = np.random.default_rng(0)
    for qtype in (Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_1, Q.Q2_K, Q.Q3_K, Q.Q5_K, Q.Q4_K, Q.Q6_K):
        block, size = gguf.GGML_QUANT_SIZES[qtype]
        raw = np.frombuffer(_random_blocks(qtype, 12, rng), np.uint8)
        with np.errstate(all="ignore"):  # random bytes: some float16 scales are inf/nan
            want = gguf.quants.dequantize(raw.reshape(2, -1), qtype)
        with np.errstate(all="ignore"):
            got = dequantize(raw, int(qtype), (2, 6 * block))
        finite = np.isfinite(want)
        assert np.array_equal(got.numpy()[finite], want[finite]), qtype.name


def test_float_types():
    x = torch.randn(4, 64)
    for qtype, arr, dt in [(Q.F32, x.numpy(), torch.float32), (Q.F16, x.half().numpy(), torch.float16),
                           (Q.BF16, x.bfloat16().view(torch.int16).numpy(), torch.bfloat16)]:
        raw = np.frombuffer(arr.tobytes(), np.uint8)
        got = dequantize(raw, int(qtype), (4, 64))
        assert got.dtype == dt and torch.equal(got, x.to(dt))
        assert torch.equal(dequantize(raw, int(qtype), (4, 64), torch.float32), x.to(dt).float())


# ----------------------------------------------------------------------------- bad input
def _write(path, arch="gemma4", tensors=(), keys=None):
    w = gguf.GGUFWriter(str(path), arch)
    for k, v in (keys or {}).items():
        w.add_uint32(k, v)
    for name, arr, raw in tensors:
        w.add_tensor(name, arr, raw_dtype=raw)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_unsupported_architecture(tmp_path):
    p = _write(tmp_path / "llama.gguf", arch="llama", tensors=[("token_embd.weight", np.zeros((8, 4), np.float32), None)])
    with pytest.raises(GGUFError, match="unsupported architecture 'llama'"):
        load_gguf(p)


def test_unsupported_tensor_type(ckpts, tmp_path):
    src = gemma4.load_pretrained(ckpts["gemma3"])
    good = GGUFFile(save_gguf(src, tmp_path / "g.gguf"))
    # Rewrite the file with one matrix stored as Q8_K, a type gguf cannot dequantize.
    w = gguf.GGUFWriter(str(tmp_path / "bad.gguf"), "gemma3")
    for k, v in good.fields.items():
        if k.startswith("gemma3.") or k.startswith("tokenizer."):
            vt, et = good.value_types[k]
            w.add_key_value(k, v, gguf.GGUFValueType(vt), sub_type=gguf.GGUFValueType(et) if et is not None else None)
    for name, t in good.tensors.items():
        if name == "blk.1.ffn_up.weight":
            rows, cols = t.shape
            nb = cols // 256 * gguf.GGML_QUANT_SIZES[Q.Q8_K][1]
            w.add_tensor(name, np.zeros((rows, nb), np.uint8), raw_dtype=Q.Q8_K)
        else:
            w.add_tensor(name, good.load(name).numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(GGUFError, match=r"blk\.1\.ffn_up\.weight.*Q8_K"):
        load_gguf(tmp_path / "bad.gguf")


def test_truncated_files(ckpts, tmp_path):
    p = save_gguf(gemma4.load_pretrained(ckpts["dense"]), tmp_path / "d.gguf")
    data = p.read_bytes()
    (tmp_path / "cut_data.gguf").write_bytes(data[:-100])
    with pytest.raises(GGUFError, match="truncated: tensor"):
        load_gguf(tmp_path / "cut_data.gguf")
    (tmp_path / "cut_header.gguf").write_bytes(data[:300])
    with pytest.raises(GGUFError, match="truncated"):
        load_gguf(tmp_path / "cut_header.gguf")
    (tmp_path / "tiny.gguf").write_bytes(b"GGUF")
    with pytest.raises(GGUFError, match="too short"):
        load_gguf(tmp_path / "tiny.gguf")
    (tmp_path / "junk.gguf").write_bytes(b"PK\x03\x04" + bytes(100))
    with pytest.raises(GGUFError, match="not a GGUF file"):
        gemma4.load_pretrained(tmp_path / "junk.gguf")


def test_unknown_and_missing_tensors(tmp_path):
    emb = np.zeros((8, 4), np.float32)
    keys = {"gemma3.block_count": 1, "gemma3.embedding_length": 4, "gemma3.feed_forward_length": 8,
            "gemma3.attention.head_count": 1, "gemma3.attention.key_length": 4}
    p = _write(tmp_path / "u.gguf", "gemma3", [("token_embd.weight", emb, None), ("blk.0.ssm_a", emb, None)], keys)
    with pytest.raises(GGUFError, match="blk.0.ssm_a"):
        load_gguf(p)
    p = _write(tmp_path / "m.gguf", "gemma3", [("token_embd.weight", emb, None)], keys)
    with pytest.raises(gemma4.CheckpointError, match="missing tensor"):
        load_gguf(p)
    p = _write(tmp_path / "k.gguf", "gemma3", [("token_embd.weight", emb, None)], {"gemma3.block_count": 1})
    with pytest.raises(GGUFError, match="gemma3.embedding_length"):
        load_gguf(p)


def test_convert_cli_round_trip(ckpts, tmp_path):
    from gemma4.cli import app

    runner = CliRunner()
    r = runner.invoke(app, ["convert", str(ckpts["ple"]), str(tmp_path / "ple.gguf")])
    assert r.exit_code == 0, r.output
    assert "f32" in r.output
    r = runner.invoke(app, ["convert", str(tmp_path / "ple.gguf"), str(tmp_path / "back")])
    assert r.exit_code == 0, r.output
    a = gemma4.load_pretrained(ckpts["ple"]).state_dict()
    b = gemma4.load_pretrained(tmp_path / "back").state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    r = runner.invoke(app, ["convert", str(ckpts["ple"]), str(tmp_path / "x.gguf"), "--type", "q4_k"])
    assert r.exit_code != 0 and "q4_k" in r.output


def _tiny_tokenizer_json(path):
    """A Gemma-style BPE vocabulary (specials, byte fallback, a few merges) that fits the tiny models' 256 ids."""
    from tokenizers import Tokenizer, decoders, normalizers
    from tokenizers.models import BPE

    vocab = {t: i for i, t in enumerate(["<pad>", "<eos>", "<bos>", "<unk>"])}
    for b in range(256 - 4 - 40):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    for t in ["▁", "a", "c", "h", "t", "s", "▁c", "▁h", "at", "▁cat", "▁hat", "▁hats"]:
        vocab[t] = len(vocab)
    merges = [("▁", "c"), ("▁", "h"), ("a", "t"), ("▁c", "at"), ("▁h", "at"), ("▁hat", "s")]
    tok = Tokenizer(BPE(vocab, merges, byte_fallback=True, unk_token="<unk>"))
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    tok.save(str(path))


def test_convert_carries_the_vocabulary(ckpts, tmp_path):
    """dir (tokenizer.json) -> GGUF (llama.cpp tokenizer keys) -> dir (tokenizer.json): same token ids."""
    from gemma4.cli import app
    from gemma4 import load_tokenizer as tokenizer_for

    src = tmp_path / "src"
    src.mkdir()
    for f in ckpts["gemma3"].iterdir():
        (src / f.name).write_bytes(f.read_bytes())
    _tiny_tokenizer_json(src / "tokenizer.json")
    runner = CliRunner()
    r = runner.invoke(app, ["convert", str(src), str(tmp_path / "v.gguf")])
    assert r.exit_code == 0 and "vocabulary from tokenizer.json" in r.output, r.output
    g = GGUFFile(tmp_path / "v.gguf")
    assert g.get("tokenizer.ggml.model") == "gemma4" and g.get("tokenizer.ggml.bos_token_id") == 2
    r = runner.invoke(app, ["convert", str(tmp_path / "v.gguf"), str(tmp_path / "w.gguf"), "-t", "f16"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["convert", str(tmp_path / "w.gguf"), str(tmp_path / "back")])
    assert r.exit_code == 0 and "tokenizer.json" in r.output, r.output
    text = " hats cat hat ch\u00e9"
    ref = tokenizer_for(src)
    want = ref.encode(text)
    # <bos> ▁hats ▁cat ▁hat ▁c h, then "é" as two byte-fallback tokens
    assert [ref.id_to_token(i) for i in want] == ["<bos>", "▁hats", "▁cat", "▁hat", "▁c", "h", "<0xC3>", "<0xA9>"]
    for p in (tmp_path / "v.gguf", tmp_path / "w.gguf", tmp_path / "back"):
        assert tokenizer_for(p).encode(text) == want, p


def test_name_table_agrees_with_gguf_package():
    """Our one mapping table against gguf's own Hugging Face -> llama.cpp name map."""
    for arch, kind in ((gguf.MODEL_ARCH.GEMMA4, "moe"), (gguf.MODEL_ARCH.GEMMA4, "ple"), (gguf.MODEL_ARCH.GEMMA3, "gemma3")):
        tm = gguf.get_tensor_name_map(arch, 16)
        m = gemma4.build_model(_tiny_config(kind), device="meta")
        for name in m.state_dict():
            if name.endswith(("router.scale", "router.per_expert_scale")):
                continue  # llama.cpp's converter renames these two by hand (ffn_gate_inp.scale, ffn_down_exps.scale)
            stem, suffix = (name[:-len(".weight")], ".weight") if name.endswith(".weight") else (name, ".weight")
            assert tm.get_name(stem) + suffix == hf_to_gguf(name), name


def _tiny_config(kind):
    return gemma4.Gemma4Config.from_dict(hf_model(kind).config.to_dict())


def test_architecture_keys_of_a_real_llama_cpp_gemma4_file():
    """llama.cpp's Gemma 4 vocab file carries the 26B-A4B hyperparameters: they must read as that preset."""
    from gemma4.io.assets import gemma4_vocab_gguf

    g = GGUFFile(gemma4_vocab_gguf())
    cfg, ref = config_from_gguf(g), gemma4.Gemma4Config.from_preset("26b-a4b")
    for i in range(ref.num_hidden_layers):
        assert (cfg.layer_types[i], cfg.layer_head_dim(i), cfg.layer_kv_heads(i), cfg.layer_intermediate_size(i)) == \
               (ref.layer_types[i], ref.layer_head_dim(i), ref.layer_kv_heads(i), ref.layer_intermediate_size(i))
    for f in ("vocab_size", "hidden_size", "num_attention_heads", "sliding_window", "rms_norm_eps",
              "final_logit_softcapping", "num_experts", "top_k_experts", "moe_intermediate_size",
              "hidden_size_per_layer_input", "num_kv_shared_layers", "max_position_embeddings"):
        assert getattr(cfg, f) == getattr(ref, f), f
    for t in ("sliding_attention", "full_attention"):
        assert float(cfg.rope(t)["rope_theta"]) == float(ref.rope(t)["rope_theta"])
    with pytest.raises(GGUFError, match="vocab-only"):
        load_gguf(gemma4_vocab_gguf())
