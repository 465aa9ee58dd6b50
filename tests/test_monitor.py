"""Latency monitor and the `gemma4 generate` command."""

from __future__ import annotations

import io
import json

import pytest
import torch
from rich.console import Console
from typer.testing import CliRunner

import gemma4
from gemma4.cli.generate import latency_table
from gemma4.cli import app
from gemma4.infer.generate import generate
from gemma4.infer.monitor import CATEGORIES, LatencyMonitor, classify
from test_cache import tiny_model


def _prompts(b, t):
    return torch.randint(3, 256, (b, t), generator=torch.Generator().manual_seed(0)).tolist()


@pytest.mark.parametrize("kind,present,absent", [("ple", {"attention", "mlp", "ple", "head"}, {"moe"}),
                                                 ("moe", {"attention", "mlp", "moe", "head"}, {"ple"})])
def test_monitor_numbers_are_sane(kind, present, absent):
    m = tiny_model(kind, scale=1.0)
    prompts = _prompts(2, 24)
    plain = generate(m, prompts, 10, stop_token_ids=())
    with LatencyMonitor(m, breakdown=True) as mon:
        out = generate(m, prompts, 10, stop_token_ids=(), monitor=mon)
    assert out == plain  # monitoring changes nothing
    r = mon.report()
    assert r["prompt_tokens"] == 48 and r["batch"] == 2 and r["decode_steps"] == 9
    assert 0 < r["ttft_s"] < 10 and r["prefill_tok_s"] > 0
    assert r["decode_tok_s"] == pytest.approx(2 * r["decode_steps_s"])
    for phase in ("prefill", "decode"):
        b = r["breakdown"][phase]
        secs = b["seconds"]
        assert set(secs) == set(CATEGORIES)
        assert all(secs[c] > 0 for c in present), secs
        assert all(secs[c] == 0 for c in absent), secs
        wall = r["prefill_s"] if phase == "prefill" else r["decode_s"]
        # the hooked parts add up to at most the forward time, which is at most the wall time
        assert sum(v for c, v in secs.items() if c != "other") <= b["forward_s"] * 1.0001
        assert b["forward_s"] <= wall * 1.0001
    layers = r["per_layer"]["decode"]
    assert sorted(layers) == list(range(m.config.num_hidden_layers))
    # hooks and the head wrapper are gone after the with-block
    assert "logits" not in m.__dict__
    assert all(not mod._forward_hooks and not mod._forward_pre_hooks for mod in m.modules())
    text = io.StringIO()
    Console(file=text, width=120).print(latency_table(mon, per_layer=True))
    assert "decode tok/s" in text.getvalue() and "attention" in text.getvalue()


def test_monitor_without_breakdown_and_classification():
    m = tiny_model("dense")
    mon = LatencyMonitor()
    generate(m, _prompts(1, 5), 4, stop_token_ids=(), monitor=mon)
    r = mon.report()
    assert r["decode_steps"] == 3 and "breakdown" not in r
    assert classify("model.layers.12.self_attn") == ("attention", 12)
    assert classify("model.layers.3.experts") == ("moe", 3)
    assert classify("model.layers.3.self_attn.q_proj") is None  # inside a timed module: not double counted
    with pytest.raises(RuntimeError, match="not seen a generation"):
        LatencyMonitor().report()


# ----------------------------------------------------------------------------- CLI
@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpt")
    gemma4.save_pretrained(tiny_model("gemma3", scale=1.0), d)
    return d


def test_cli_generate_ids(checkpoint):
    r = CliRunner().invoke(app, ["generate", "--model", str(checkpoint), "--ids", "2 40 41 42", "-n", "6"])
    assert r.exit_code == 0, r.output
    ids = [int(x) for x in r.stdout.split()]
    m = gemma4.load_pretrained(checkpoint)
    assert ids == generate(m, [[2, 40, 41, 42]], 6)[0]


def test_cli_generate_stats_and_json(checkpoint):
    r = CliRunner().invoke(app, ["generate", "--model", str(checkpoint), "--ids", "2 40 41", "-n", "5", "--stats"])
    assert r.exit_code == 0, r.output
    assert "TTFT" in r.stdout and "decode tok/s" in r.stdout and "attention" in r.stdout and "head" in r.stdout
    r = CliRunner().invoke(app, ["generate", "--model", str(checkpoint), "--ids", "2 40 41", "-n", "5", "--json",
                                 "--stats", "--temperature", "0.8", "--top-k", "20", "--seed", "3"])
    assert r.exit_code == 0, r.output
    obj = json.loads(r.stdout)
    assert len(obj["ids"]) <= 5 and obj["stats"]["decode_steps"] == len(obj["ids"]) - 1


def test_cli_generate_bad_input(checkpoint):
    run = CliRunner().invoke
    r = run(app, ["generate", "--model", str(checkpoint), "--ids", "2 999"])
    assert r.exit_code != 0 and "out-of-vocabulary" in r.output
    r = run(app, ["generate", "--model", str(checkpoint), "--ids", "2 5", "--top-p", "0"])
    assert r.exit_code != 0 and "top_p" in r.output
    r = run(app, ["generate", "--model", str(checkpoint), "hello"])  # no tokenizer in this checkpoint
    assert r.exit_code != 0 and "--ids" in r.output


def test_cli_generate_text_with_tokenizer(tmp_path):
    from gemma4.text.tokenizer import Tokenizer, build_from_vocab

    gemma4.save_pretrained(tiny_model("gemma3", scale=1.0), tmp_path)
    # A 256-token character vocabulary matching the tiny model's vocab size.
    toks = ["<pad>", "<eos>", "<bos>", "<unk>"] + [chr(c) for c in range(0x21, 0x21 + 252)]
    Tokenizer(build_from_vocab(toks, [3, 3, 3, 2] + [1] * 252, merges=[])).save(tmp_path / "tokenizer.json")
    r = CliRunner().invoke(app, ["generate", "--model", str(tmp_path), "hello", "-n", "8", "--json"])
    assert r.exit_code == 0, r.output
    obj = json.loads(r.stdout)
    assert obj["prompt_ids"][0] == 2 and len(obj["prompt_ids"]) == 6 and isinstance(obj["text"], str)
    r = CliRunner().invoke(app, ["generate", "--model", str(tmp_path), "hello", "-n", "8"])
    assert r.exit_code == 0, r.output
