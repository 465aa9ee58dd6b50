import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import gemma4
from gemma4 import CheckpointError, ConfigError
from tiny import write_hf_checkpoint


@pytest.fixture(scope="module")
def ple_ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("ple")
    write_hf_checkpoint("ple", d)
    return d


@pytest.fixture(scope="module")
def dense_ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("dense")
    write_hf_checkpoint("dense", d)
    return d


IDS = torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(0))


def _logits(path, **kw):
    with torch.no_grad():
        return gemma4.load_pretrained(path, **kw)(IDS)


def _copy(src, dst, mutate_state=None, mutate_config=None):
    dst.mkdir(parents=True, exist_ok=True)
    cfg = json.loads((src / "config.json").read_text())
    state = load_file(str(src / "model.safetensors"))
    if mutate_state:
        state = mutate_state(state)
    if mutate_config:
        cfg = mutate_config(cfg)
    save_file(state, str(dst / "model.safetensors"), metadata={"format": "pt"})
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def test_consumer_layers_have_no_kv_projections(ple_ckpt):
    m = gemma4.load_pretrained(ple_ckpt)
    for i, layer in enumerate(m.model.layers):
        consumer = m.config.kv_sharing_modes[i] == "reuse"
        assert hasattr(layer.self_attn, "k_proj") != consumer


def test_dead_kv_tensors_of_shared_layers_are_ignored(ple_ckpt, tmp_path):
    """Released E2B/E4B files still carry k/v/k_norm tensors for KV-sharing layers: accept and skip them."""
    def add_dead(state):
        for i in range(6, 10):
            p = f"model.layers.{i}.self_attn."
            state[p + "k_proj.weight"] = torch.randn(16, 48)
            state[p + "v_proj.weight"] = torch.randn(16, 48)
            state[p + "k_norm.weight"] = torch.randn(16)
        return state

    d = _copy(ple_ckpt, tmp_path / "dead", add_dead)
    assert torch.equal(_logits(d), _logits(ple_ckpt))


def test_multimodal_layout_takes_language_model_and_skips_towers(dense_ckpt, tmp_path, caplog):
    def to_mm(state):
        out = {k.replace("model.", "model.language_model.", 1): v for k, v in state.items()}
        out["model.vision_tower.encoder.layers.0.mlp.gate_proj.linear.weight"] = torch.randn(4, 4)
        out["model.embed_vision.embedding_projection.weight"] = torch.randn(48, 4)
        out["model.audio_tower.output_proj.bias"] = torch.randn(4)
        return out

    def mm_config(cfg):
        return {"architectures": ["Gemma4ForConditionalGeneration"], "model_type": "gemma4", "text_config": cfg,
                "vision_config": {"hidden_size": 4}, "audio_config": None, "image_token_id": 258880}

    d = _copy(dense_ckpt, tmp_path / "mm", to_mm, mm_config)
    with caplog.at_level("INFO", logger="gemma4"):
        out = _logits(d)
    assert torch.equal(out, _logits(dense_ckpt))
    assert "skipped 3 vision/audio tower tensors" in caplog.text


def test_sharded_transformers_checkpoint(tmp_path):
    hf = write_hf_checkpoint("moe", tmp_path / "x")
    hf.save_pretrained(str(tmp_path / "sharded"), max_shard_size="100KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    assert torch.equal(_logits(tmp_path / "sharded"), _logits(tmp_path / "x"))


@pytest.mark.parametrize("shard", [None, 50_000])
def test_save_round_trip_is_bit_exact(ple_ckpt, tmp_path, shard):
    m = gemma4.load_pretrained(ple_ckpt)
    kw = {} if shard is None else {"max_shard_bytes": shard}
    gemma4.save_pretrained(m, tmp_path / "out", **kw)
    if shard:
        assert len(list((tmp_path / "out").glob("model-*-of-*.safetensors"))) > 1
    m2 = gemma4.load_pretrained(tmp_path / "out")
    a, b = m.state_dict(), m2.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a)
    assert m2.config == m.config
    assert not list((tmp_path / "out").glob("*.tmp"))  # atomic writes leave no temp files


def test_dtype_is_kept_or_converted(ple_ckpt, tmp_path):
    assert gemma4.load_pretrained(ple_ckpt).dtype == torch.float32
    m = gemma4.load_pretrained(ple_ckpt, dtype=torch.bfloat16)
    assert m.dtype == torch.bfloat16 and m.model.layers[0].layer_scalar.dtype == torch.bfloat16
    gemma4.save_pretrained(m, tmp_path / "bf16")
    assert gemma4.load_pretrained(tmp_path / "bf16").dtype == torch.bfloat16


def test_missing_unexpected_and_misshaped_tensors_are_named(dense_ckpt, tmp_path):
    def drop(s):
        del s["model.layers.3.mlp.up_proj.weight"]
        return s

    with pytest.raises(CheckpointError, match=r"missing tensor\(s\).*model.layers.3.mlp.up_proj.weight"):
        gemma4.load_pretrained(_copy(dense_ckpt, tmp_path / "a", drop))

    def extra(s):
        s["model.layers.5.self_attn.v_proj.weight"] = torch.zeros(32, 48)  # K=V layer has no v_proj
        return s

    with pytest.raises(CheckpointError, match=r"unexpected tensor 'model.layers.5.self_attn.v_proj.weight'"):
        gemma4.load_pretrained(_copy(dense_ckpt, tmp_path / "b", extra))

    def reshape(s):
        s["model.layers.0.self_attn.q_proj.weight"] = torch.zeros(32, 48)
        return s

    with pytest.raises(CheckpointError, match=r"'model.layers.0.self_attn.q_proj.weight' has shape \[32, 48\].*\[64, 48\]"):
        gemma4.load_pretrained(_copy(dense_ckpt, tmp_path / "c", reshape))


def test_config_weights_mismatch_names_the_tensor(dense_ckpt, tmp_path):
    d = _copy(dense_ckpt, tmp_path / "m", mutate_config=lambda c: {**c, "intermediate_size": 80})
    with pytest.raises(CheckpointError, match=r"mlp.*shape .*96.*80"):
        gemma4.load_pretrained(d)


def test_truncated_safetensors(dense_ckpt, tmp_path):
    d = _copy(dense_ckpt, tmp_path / "t")
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"model.safetensors.*truncated"):
        gemma4.load_pretrained(d)


def test_unknown_config_key_in_checkpoint(dense_ckpt, tmp_path):
    d = _copy(dense_ckpt, tmp_path / "u", mutate_config=lambda c: {**c, "num_expertz": 4})
    with pytest.raises(ConfigError, match="num_expertz"):
        gemma4.load_pretrained(d)


def test_pickle_and_missing_paths_refused(tmp_path):
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04not really")
    with pytest.raises(CheckpointError, match="pickle files are never loaded"):
        gemma4.load_pretrained(tmp_path / "pytorch_model.bin")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        gemma4.load_pretrained(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        gemma4.load_pretrained(tmp_path / "nope")


def test_hub_id_without_network_is_a_clear_error(monkeypatch):
    import huggingface_hub

    def offline(*a, **k):
        raise OSError("network unreachable")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(FileNotFoundError, match="could not fetch 'google/gemma-4-e2b-it'"):
        gemma4.load_pretrained("google/gemma-4-e2b-it")
