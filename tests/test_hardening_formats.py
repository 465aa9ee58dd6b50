"""Config and GGUF hardening (issue 11): wrong types, hostile sizes and header values are named errors
raised before anything is allocated."""

import json
import time

import gguf
import numpy as np
import pytest

import gemma4
from gemma4 import ConfigError, Gemma4Config, Gemma4Error
from gemma4.io.gguf import GGUFError, GGUFFile, config_from_gguf, load_gguf
import quant_tiny

BASE = quant_tiny.KINDS["dense"]


# ------------------------------------------------------------------------------------------ config
@pytest.mark.parametrize("field,value,message", [
    ("model_type", 123, "model_type must be a string"),
    ("rms_norm_eps", "x", "rms_norm_eps must be a number"),
    ("rms_norm_eps", -1, "rms_norm_eps must be a number"),
    ("rms_norm_eps", float("nan"), "rms_norm_eps must be a number"),
    ("tie_word_embeddings", "no", "tie_word_embeddings must be true or false"),
    ("attention_k_eq_v", 1, "attention_k_eq_v must be true or false"),
    ("query_pre_attn_scalar", -4, "query_pre_attn_scalar must be a positive"),
    ("final_logit_softcapping", "30", "final_logit_softcapping must be a positive"),
    ("head_dim", 2**33, "head_dim must be a positive integer <= 16384"),
    ("num_hidden_layers", 10**8, "num_hidden_layers must be a positive integer <= 1024"),
    ("vocab_size", 2**40, "vocab_size must be"),
    ("vocab_size", 12.0, "vocab_size must be"),
    ("hidden_size", True, "hidden_size must be"),
    ("global_head_dim", 2**31, "global_head_dim must be"),
    ("max_position_embeddings", -5, "max_position_embeddings must be"),
    ("eos_token_id", "1", "eos_token_id must be"),
    ("eos_token_id", [1, -2], "eos_token_id must be"),
    ("pad_token_id", 1.5, "pad_token_id must be"),
    ("layer_types", "sliding", "layer_types must be"),
    ("layer_types", ["x"] * 5000, "layer_types must be"),
    ("rope_parameters", [1], "rope_parameters must be an object"),
    ("rope_parameters", {"full_attention": {"rope_theta": -1}}, "rope_theta must be a positive"),
    ("rope_parameters", {"full_attention": {"partial_rotary_factor": 3}}, "partial_rotary_factor"),
    ("per_layer_config", {"x": {}}, "per_layer_config key 'x'"),
    ("per_layer_config", {"1": {"head_dim": 2**40}}, r"per_layer_config\[1\].head_dim"),
    ("per_layer_config", {"1": 5}, r"per_layer_config\[1\] must be an object"),
    ("hidden_activation", ["gelu"], "hidden_activation must be a string"),
    ("quantization", "int8", "quantization must be an object"),
])
def test_config_types_and_sizes(field, value, message):
    t = time.perf_counter()
    with pytest.raises(ConfigError, match=message):
        Gemma4Config.from_dict({**BASE, field: value})
    assert time.perf_counter() - t < 1.0  # refused before any per-layer work


@pytest.mark.parametrize("content,message", [
    ("[1, 2]", "holds a JSON list"),
    ('"text"', "holds a JSON str"),
    (b"\xff\xfe{", "not UTF-8"),
    ("{", "not valid JSON"),
    ('{"model_type": 123}', "model_type must be a string"),
    ('{"text_config": {}, "model_type": 5}', "model_type must be a string"),
])
def test_config_json_errors_name_the_file(tmp_path, content, message):
    p = tmp_path / "config.json"
    p.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(ConfigError, match=message) as e:
        Gemma4Config.from_json(tmp_path)
    assert str(p) in str(e.value)


def test_rope_table_is_never_huge_on_meta():
    t = time.perf_counter()
    with pytest.raises(ConfigError, match="head_dim"):
        gemma4.build_model(Gemma4Config.from_dict({**BASE, "head_dim": 2**33}), device="meta")
    assert time.perf_counter() - t < 1.0


# ------------------------------------------------------------------------------------------ GGUF
@pytest.fixture(scope="module")
def good(tmp_path_factory):
    d = tmp_path_factory.mktemp("g")
    return GGUFFile(gemma4.save_gguf(quant_tiny.model("gemma3"), d / "good.gguf"))


def _rewrite(good: GGUFFile, path, overrides=None, drop=(), alignment=None):
    """Copy ``good`` with some metadata replaced: overrides = {key: (value, GGUFValueType, subtype)}."""
    overrides = overrides or {}
    w = gguf.GGUFWriter(str(path), good.architecture)
    if alignment is not None:
        w.data_alignment = alignment
    for k, v in good.fields.items():
        if k in ("general.architecture", "GGUF.version") or k in drop or k in overrides:
            continue
        vt, et = good.value_types[k]
        w.add_key_value(k, v, gguf.GGUFValueType(vt), sub_type=gguf.GGUFValueType(et) if et is not None else None)
    for k, (v, vt, *et) in overrides.items():
        w.add_key_value(k, v, vt, sub_type=et[0] if et else None)
    for name in good.tensors:
        w.add_tensor(name, good.load(name).numpy())  # (the fixture's tensors are all F32)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


U32, F32, STR, ARR = gguf.GGUFValueType.UINT32, gguf.GGUFValueType.FLOAT32, gguf.GGUFValueType.STRING, gguf.GGUFValueType.ARRAY


@pytest.mark.parametrize("overrides,message", [
    ({"general.alignment": (7, U32)}, "general.alignment 7 is not a power of two"),
    ({"general.alignment": (0, U32)}, "general.alignment 0 is not a power of two"),
    ({"general.alignment": ("32", STR)}, "general.alignment '32' is not a power of two"),
    ({"gemma3.block_count": (2**31, U32)}, r"gemma3.block_count is 2147483648, expected an integer in 1..1024"),
    ({"gemma3.attention.key_length": (2**31, U32)}, "gemma3.attention.key_length is 2147483648"),
    ({"gemma3.attention.head_count": (0, U32)}, "gemma3.attention.head_count is 0"),
    ({"gemma3.attention.head_count": ("4", STR)}, "gemma3.attention.head_count is '4'"),
    ({"gemma3.embedding_length": (-1.5, F32)}, "gemma3.embedding_length is -1.5"),
    ({"gemma3.attention.layer_norm_rms_epsilon": ("x", STR)}, "layer_norm_rms_epsilon is 'x'"),
    ({"gemma3.feed_forward_length": ([1, 2], ARR, U32)}, "feed_forward_length has 2 entries"),
    ({"tokenizer.ggml.eos_token_id": ("x", STR)}, "tokenizer.ggml.eos_token_id is 'x'"),
    ({"gemma3.context_length": (2**40, gguf.GGUFValueType.UINT64)}, "context_length"),
    ({"gemma3.attention.sliding_window_pattern": ([1, 0], ARR, U32)}, "sliding_window_pattern must be 4 booleans"),
])
def test_gguf_header_values(good, tmp_path, overrides, message):
    p = _rewrite(good, tmp_path / "bad.gguf", overrides)
    t = time.perf_counter()
    with pytest.raises(GGUFError, match=message):
        load_gguf(p)
    assert time.perf_counter() - t < 2.0


def test_gguf_tensor_offsets_must_follow_the_layout(good, tmp_path):
    data = bytearray(good.path.read_bytes())
    # The second tensor's relative offset sits right after its name, dims and type in the tensor table.
    name = list(good.tensors)[1].encode()
    at = data.index(name) + len(name)
    n_dims = int.from_bytes(data[at:at + 4], "little")
    off_at = at + 4 + 8 * n_dims + 4
    data[off_at:off_at + 8] = (int.from_bytes(data[off_at:off_at + 8], "little") + 32).to_bytes(8, "little")
    p = tmp_path / "shifted.gguf"
    p.write_bytes(bytes(data))
    with pytest.raises(GGUFError, match="layout puts it at"):
        GGUFFile(p)


def test_gguf_nested_arrays_and_huge_counts(tmp_path):
    import struct

    def header(kvs: bytes, n_kv: int) -> bytes:
        return b"GGUF" + struct.pack("<IQQ", 3, 0, n_kv) + kvs

    def key(name: bytes) -> bytes:
        return struct.pack("<Q", len(name)) + name

    # an array of arrays of arrays ... 100 deep
    deep = key(b"x") + struct.pack("<I", 9) + (struct.pack("<IQ", 9, 1) * 100) + struct.pack("<IQ", 4, 0)
    p = tmp_path / "deep.gguf"
    p.write_bytes(header(deep, 1) + b"\0" * 64)
    with pytest.raises(GGUFError, match="nested deeper"):
        GGUFFile(p)
    # an array claiming 2^62 elements of 8 bytes
    huge = key(b"y") + struct.pack("<IIQ", 9, 10, 2**62)
    p.write_bytes(header(huge, 1) + b"\0" * 64)
    with pytest.raises(GGUFError, match="truncated"):
        GGUFFile(p)
    # unknown value and element types
    p.write_bytes(header(key(b"z") + struct.pack("<I", 77), 1) + b"\0" * 64)
    with pytest.raises(GGUFError, match="unknown metadata value type 77"):
        GGUFFile(p)
    p.write_bytes(header(key(b"z") + struct.pack("<IIQ", 9, 77, 3), 1) + b"\0" * 64)
    with pytest.raises(GGUFError, match="unknown metadata array element type 77"):
        GGUFFile(p)


def test_tensor_dimension_products_cannot_wrap(good, tmp_path):
    """Dimensions whose product wraps around in int64 must not pass the file-size check."""
    data = bytearray(good.path.read_bytes())
    name = b"token_embd.weight"
    at = data.index(name) + len(name)
    assert int.from_bytes(data[at:at + 4], "little") == 2
    data[at + 4:at + 12] = (2**32).to_bytes(8, "little")
    data[at + 12:at + 20] = (2**32).to_bytes(8, "little")  # 2^64 elements: 0 in int64
    p = tmp_path / "wrap.gguf"
    p.write_bytes(bytes(data))
    with pytest.raises(GGUFError):
        GGUFFile(p)


def test_all_errors_are_package_errors(good, tmp_path):
    assert issubclass(GGUFError, Gemma4Error) and issubclass(ConfigError, Gemma4Error)
    cfg = config_from_gguf(good)
    assert cfg.num_hidden_layers == 4


# ------------------------------------------------------------------------------------------ sampling
def test_sampling_settings_that_used_to_crash():
    import torch

    from gemma4 import SamplingError, SamplingParams
    from gemma4.infer.sampling import sample_next

    for kw in ({"temperature": 1e-45}, {"temperature": -1}, {"temperature": 0.7, "seed": 2**64}, {"seed": -1}):
        with pytest.raises(SamplingError):
            SamplingParams(**kw)
    assert issubclass(SamplingError, Gemma4Error)
    p = SamplingParams(temperature=1e-4, seed=2**64 - 1)
    logits = torch.tensor([[30.0, -30.0, 29.0]])
    assert sample_next(logits, p, p.make_generator()).item() == 0


def test_preset_and_dtype_names_are_named_errors():
    from gemma4 import parse_dtype

    with pytest.raises(ConfigError, match="unknown preset 'nope'"):
        Gemma4Config.from_preset("nope")
    with pytest.raises(KeyError):  # still a KeyError for older except clauses
        Gemma4Config.from_preset("nope")
    with pytest.raises(Gemma4Error, match="unknown dtype 'int3'"):
        parse_dtype("int3")
