"""`gemma4 pretrain`, `gemma4 finetune` (full, LoRA), `gemma4 merge` end to end on tiny models."""

import json

import pytest
import torch

from gemma4.cli import app
from typer.testing import CliRunner

import gemma4
from gemma4.train import load_adapter, read_log
from train_tiny import tiny_config, tiny_model, tiny_tokenizer


APP = app  # the real `gemma4` command: pretrain/finetune/merge are registered there
CHATS = [
    {"messages": [{"role": "user", "content": "Who wrote the play?"}, {"role": "assistant", "content": "the bard"}]},
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "and then"},
                  {"role": "assistant", "content": "to the end of the act"}]},
    {"text": "the and of to the and"},
]


def _run(args):
    res = CliRunner().invoke(APP, [str(a) for a in args])
    assert res.exit_code == 0, (res.output, res.exception)
    return res


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("base")
    gemma4.save_pretrained(tiny_model("ple6", seed=9, std=0.02), d)
    tiny_tokenizer().save(d / "tokenizer.json")
    return d


def test_pretrain_from_config(tmp_path):
    tiny_config("ple6").to_json(tmp_path / "config.json")
    tiny_tokenizer().save(tmp_path / "tok.json")
    (tmp_path / "data.txt").write_text("the and of to " * 200)
    out = tmp_path / "run"
    res = _run(["pretrain", tmp_path / "config.json", tmp_path / "data.txt", "--tokenizer", tmp_path / "tok.json",
                "--out", out, "--steps", 6, "--lr", 3e-3, "--seq-len", 32, "--batch-size", 2, "--json"])
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    log = read_log(out / "train_log.jsonl")
    assert [r["step"] for r in log] == list(range(1, 7)) and summary["steps"] == 6
    assert log[-1]["loss"] < log[0]["loss"]
    m = gemma4.load_pretrained(out / "model")
    assert (out / "model" / "tokenizer.json").exists() and m.config.num_hidden_layers == 6
    # Pretraining init: norm scales start at 1 (identity) -- not the test helpers' random ones.
    assert (out / "loss_curve.png").exists()


def test_finetune_lora_then_merge(base_dir, tmp_path):
    data = tmp_path / "chats.jsonl"
    lines = [json.dumps(r) for r in CHATS * 6] + ["{broken"]
    data.write_text("\n".join(lines) + "\n")
    out = tmp_path / "lora"
    res = _run(["finetune", base_dir, data, "--out", out, "--lora-rank", 4, "--targets", "attention,ple",
                "--steps", 5, "--lr", 5e-3, "--seq-len", 128, "--batch-size", 2, "--dtype", "float32"])
    assert "1 bad line(s)" in res.output and "chats.jsonl:19" in res.output
    report = json.loads((out / "data_report.json").read_text())
    assert report["bad_lines"] == 1 and report["chats"] == 12 and report["texts"] == 6
    cfg = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert cfg["r"] == 4 and cfg["lora_alpha"] == 8.0
    assert set(cfg["target_modules"]) >= {"q_proj", "per_layer_input_gate"}

    merged = tmp_path / "merged"
    _run(["merge", base_dir, out / "adapter", merged])
    ids = torch.tensor([[2, 40, 41, 42, 43, 44]])
    with_adapter = gemma4.load_pretrained(base_dir)
    load_adapter(with_adapter, out / "adapter")
    with torch.no_grad():
        a = with_adapter(ids)
        b = gemma4.load_pretrained(merged)(ids)
        c = gemma4.load_pretrained(base_dir)(ids)
    assert (a - b).abs().max().item() <= 1e-4
    assert (a - c).abs().max().item() > 1e-3  # training moved it
    assert (merged / "tokenizer.json").exists()
    # generate --adapter: the adapter applied at load gives the merged model's greedy tokens
    gen = ["generate", "--ids", "2 40 41 42", "-n", "6", "--json", "--no-timings"]
    r1 = CliRunner().invoke(APP, gen + ["-m", str(base_dir), "--adapter", str(out / "adapter")])
    r2 = CliRunner().invoke(APP, gen + ["-m", str(merged)])
    assert r1.exit_code == 0 and r2.exit_code == 0, (r1.output, r2.output)
    assert json.loads(r1.output.strip().splitlines()[-1])["ids"] == json.loads(r2.output.strip().splitlines()[-1])["ids"]


def test_finetune_full_and_usage_errors(base_dir, tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in CHATS * 4) + "\n")
    _run(["finetune", base_dir, data, "--out", tmp_path / "full", "--steps", 2, "--seq-len", 64, "--save-every", 1])
    assert gemma4.load_pretrained(tmp_path / "full" / "model").config.num_hidden_layers == 6
    assert (tmp_path / "full" / "checkpoints" / "latest").read_text().strip() == "step-000002"
    res = CliRunner().invoke(APP, ["finetune", str(base_dir), str(data), "--out", str(tmp_path / "q"), "--quant", "int4"])
    assert res.exit_code != 0 and "needs --lora-rank" in (res.output + str(res.exception))
    for cmd in ("pretrain", "finetune", "merge"):
        res = CliRunner().invoke(APP, [cmd, "--help"])
        assert res.exit_code == 0 and "Usage" in res.output
