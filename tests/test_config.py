import json
import time

import pytest
import torch

import gemma4
from gemma4 import ConfigError, Gemma4Config
from gemma4.model.config import FULL, SLIDING
from gemma4.model.decoder import count_params

# Text-decoder parameter counts (spec 4.2, transformers on the meta device; published: 31B 30.7B,
# 26B-A4B 25.2B total, E2B 5.1B with towers / 4.63B text, E4B 8B with towers, 12B ~12B).
EXPECTED = {"e2b": 4_628_569_344, "e4b": 7_463_013_376, "31b": 30_697_345_280,
            "26b-a4b": 25_233_141_760, "12b": 11_907_350_272}


@pytest.mark.parametrize("name", list(EXPECTED))
def test_preset_builds_on_meta_fast_and_counts_match(name):
    t0 = time.perf_counter()
    m = gemma4.build_model(Gemma4Config.from_preset(name), device="meta")
    assert time.perf_counter() - t0 < 2.0
    n = count_params(m)
    assert n == EXPECTED[name]
    assert round(n / 1e9, 2) == {"e2b": 4.63, "e4b": 7.46, "31b": 30.70, "26b-a4b": 25.23, "12b": 11.91}[name]


def test_preset_geometry():
    e2b = Gemma4Config.from_preset("e2b")
    assert e2b.describe_layers() == "SSSSF" * 7
    assert [i for i, m in enumerate(e2b.kv_sharing_modes) if m == "store"] == [13, 14]
    assert e2b.layer_intermediate_size(14) == 6144 and e2b.layer_intermediate_size(15) == 12288
    assert e2b.layer_head_dim(4) == 512 and e2b.layer_kv_heads(4) == 1  # no K=V: global KV heads unused
    c31 = Gemma4Config.from_preset("31b")
    assert c31.layer_kv_heads(5) == 4 and c31.layer_kv_heads(0) == 16 and c31.layer_k_eq_v(5)
    assert Gemma4Config.from_preset("e4b").kv_sharing_modes[22:24] == ["store", "store"]
    with pytest.raises(KeyError, match="unknown preset"):
        Gemma4Config.from_preset("70b")


def test_legacy_and_per_layer_forms_agree(tmp_path):
    base = dict(model_type="gemma4_text", num_hidden_layers=6, hidden_size=64, intermediate_size=128,
                num_attention_heads=4, num_key_value_heads=2, head_dim=16, attention_k_eq_v=True,
                hidden_size_per_layer_input=0, vocab_size=100)
    legacy = Gemma4Config.from_dict(dict(base, global_head_dim=32, num_global_key_value_heads=1))
    per_layer = Gemma4Config.from_dict(dict(base, per_layer_config={"5": {"head_dim": 32, "num_key_value_heads": 1}}))
    for c in (legacy, per_layer):
        assert [c.layer_head_dim(i) for i in range(6)] == [16] * 5 + [32]
        assert [c.layer_kv_heads(i) for i in range(6)] == [2] * 5 + [1]
    # transformers' default when neither form is present: full layers use head_dim 512.
    assert Gemma4Config.from_dict(base).layer_head_dim(5) == 512


def test_multimodal_config_reads_text_config(tmp_path):
    text = dict(num_hidden_layers=4, hidden_size=32, intermediate_size=64, num_attention_heads=2,
                num_key_value_heads=1, head_dim=8, global_head_dim=16, vocab_size=50)
    outer = {"architectures": ["Gemma4ForConditionalGeneration"], "model_type": "gemma4", "text_config": text,
             "vision_config": {"hidden_size": 768}, "image_token_id": 258880}
    p = tmp_path / "config.json"
    p.write_text(json.dumps(outer))
    c = Gemma4Config.from_json(p)
    assert c.model_type == "gemma4_text" and c.num_hidden_layers == 4
    assert c.layer_types == [SLIDING, SLIDING, SLIDING, FULL]  # derived, last forced full


def test_layer_types_derived_and_last_forced_full():
    c = Gemma4Config(num_hidden_layers=8, hidden_size_per_layer_input=0)
    assert c.describe_layers() == "SSSSSFSF"
    c = Gemma4Config(num_hidden_layers=3, layer_types=[SLIDING] * 3, hidden_size_per_layer_input=0)
    assert c.layer_types[-1] == FULL
    g3 = Gemma4Config(model_type="gemma3_text", num_hidden_layers=8, query_pre_attn_scalar=16)
    assert g3.describe_layers() == "SSSSSFSS"  # Gemma 3 does not force the last layer


def test_unknown_keys_rejected_by_name():
    with pytest.raises(ConfigError, match="unknown config key.*hiden_size.*num_layers"):
        Gemma4Config.from_dict({"hiden_size": 3, "num_layers": 2})
    # transformers' bookkeeping keys are fine
    Gemma4Config.from_dict({"transformers_version": "5.5", "architectures": ["X"], "dtype": "bfloat16",
                            "hidden_size_per_layer_input": 0})


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(num_attention_heads=6, num_key_value_heads=4), "not a multiple of its 4 key/value heads"),
        (dict(num_global_key_value_heads=3, attention_k_eq_v=True, num_attention_heads=8, num_key_value_heads=2),
         "layer 5: num_attention_heads=8 is not a multiple of its 3"),
        (dict(layer_types=[SLIDING] * 4 + [FULL], num_kv_shared_layers=3), "layer_types has 5 entries"),
        (dict(layer_types=[SLIDING, SLIDING, SLIDING, FULL, FULL, FULL], num_kv_shared_layers=3),
         "type 'full_attention' .* have no producer"),
        (dict(enable_moe_block=True, num_experts=4), "top_k_experts"),
        (dict(enable_moe_block=True, num_experts=4, top_k_experts=8, moe_intermediate_size=8), "exceeds num_experts"),
        (dict(hidden_activation="relu"), "hidden_activation 'relu'"),
        (dict(layer_types=["global"] + ["sliding_attention"] * 5), "unknown type"),
        (dict(hidden_size=0), "hidden_size must be a positive integer"),
        (dict(per_layer_config={"9": {"head_dim": 8}}), "per_layer_config names layer 9"),
    ],
)
def test_inconsistent_configs_are_clear_errors(changes, message):
    base = dict(num_hidden_layers=6, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                num_key_value_heads=2, head_dim=8, global_head_dim=16, hidden_size_per_layer_input=0)
    with pytest.raises(ConfigError, match=message):
        Gemma4Config.from_dict({**base, **changes})


def test_config_json_round_trip(tmp_path):
    for name in ("e2b", "26b-a4b", "gemma3-270m"):
        c = Gemma4Config.from_preset(name)
        c.to_json(tmp_path / f"{name}.json")
        assert Gemma4Config.from_json(tmp_path / f"{name}.json") == c


def test_transformers_reads_our_config(tmp_path):
    import transformers

    c = Gemma4Config.from_preset("e2b")
    (tmp_path / "config.json").write_text(json.dumps(c.to_dict()))
    hf = transformers.AutoConfig.from_pretrained(str(tmp_path))
    assert hf.num_kv_shared_layers == 20 and hf.per_layer_config[4].head_dim == 512
    assert hf.layer_types == c.layer_types


def test_embed_scale_rounded_to_weight_dtype():
    c = Gemma4Config(num_hidden_layers=1, hidden_size=1536, intermediate_size=8, num_attention_heads=1,
                     num_key_value_heads=1, head_dim=8, global_head_dim=8, vocab_size=4,
                     hidden_size_per_layer_input=0)
    m = gemma4.build_model(c, dtype=torch.bfloat16)
    with torch.no_grad():
        m.model.embed_tokens.weight.fill_(1.0)
        assert m.model.embed(torch.tensor([[0]]))[0, 0, 0].item() == 39.25  # sqrt(1536)=39.19 in bf16
