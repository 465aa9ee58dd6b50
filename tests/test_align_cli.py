"""`gemma4 align sft | dpo | lagrangian | eval` end to end on a tiny Gemma 4 with a chat BPE: each stage
writes a loadable OUT/model and a train_log.jsonl with its own keys, eval reports the exact-judge rates
as JSON, and bad inputs are one `error:` line."""

import json

import pytest
import torch
from typer.testing import CliRunner

import gemma4
from gemma4.align.data import build
from gemma4.align.judge import REFUSAL
from gemma4.cli import app
from gemma4.model import FULL, SLIDING
from gemma4.text.analysis import train_chat_bpe
from gemma4.train.loop import read_log
from gemma4.train.run import init_weights_

runner = CliRunner()
CONTROL = 16  # chat control tokens appended by train_chat_bpe; <turn|> is the second of them


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def _config(vocab: int) -> gemma4.Gemma4Config:
    """benchmarks/alignment.py's tiny_config, narrower (hidden 32) and 2 layers: seconds per stage."""
    return gemma4.Gemma4Config.from_dict(dict(
        model_type="gemma4_text", vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        layer_types=[SLIDING, FULL], num_attention_heads=2, num_key_value_heads=1, head_dim=16, global_head_dim=32,
        num_global_key_value_heads=1, attention_k_eq_v=True, sliding_window=32, max_position_embeddings=256,
        hidden_size_per_layer_input=4, vocab_size_per_layer_input=vocab, final_logit_softcapping=30.0,
        tie_word_embeddings=True,
        rope_parameters={SLIDING: {"rope_type": "default", "rope_theta": 10_000.0},
                         FULL: {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1e6}},
        pad_token_id=0, eos_token_id=[1, vocab - CONTROL + 1], bos_token_id=2))


def _keep(path, pick) -> None:
    """Keep a few lines of one data file: the CLI reads whatever the directory holds, and encoding the
    full 2000-example train split three times would take most of this test's time budget."""
    lines = path.read_text(encoding="utf-8").splitlines()
    path.write_text("".join(ln + "\n" for ln in pick(lines)), encoding="utf-8")


def _by_kind(n):
    def pick(lines):
        out = []
        for kind in ("harmful", "benign", "borderline"):
            out += [ln for ln in lines if json.loads(ln)["kind"] == kind][:n]
        return out
    return pick


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("align_cli")
    data = root / "data"
    r = run("align", "data", data, "--no-sources")
    assert r.exit_code == 0, r.output
    _keep(data / "train.jsonl", _by_kind(8))
    _keep(data / "val_redteam.jsonl", _by_kind(4))
    _keep(data / "knowledge_train.jsonl", lambda ls: ls[:8])
    ds = build(0, sources=False)
    train = ds.splits["train"][:200]
    tok = train_chat_bpe([e.prompt for e in train] + [e.helpful for e in train] + [REFUSAL] * 5, 400,
                         root / "tok.json")
    torch.manual_seed(0)
    model = init_weights_(gemma4.build_model(_config(tok.vocab_size)), seed=0)
    base = root / "base"
    gemma4.save_pretrained(model, base)
    tok.save(base / "tokenizer.json")
    return root, data, base


def test_stages_and_eval(setup):
    root, data, base = setup
    small = ("--steps", 2, "--batch-size", 4)
    r = run("align", "sft", base, data, "--out", root / "sft", *small, "--lr", 1e-3)
    assert r.exit_code == 0, r.output
    assert "sft: 2 steps" in r.output
    log = read_log(root / "sft" / "train_log.jsonl")
    assert [x["step"] for x in log] == [1, 2] and all("nll" in x for x in log)
    sft = root / "sft" / "model"
    assert (sft / "config.json").is_file() and (sft / "model.safetensors").is_file()
    assert (sft / "tokenizer.json").is_file()
    r = run("align", "sft", base, data, "--out", root / "sft_drills", *small, "--copy-drills", 6, "--json",
            "--as-generated")
    assert r.exit_code == 0, r.output
    assert json.loads(r.output.strip().splitlines()[-1])["copy_drills"] == 6

    r = run("align", "dpo", sft, data, "--out", root / "dpo", *small, "--loss", "ipo", "--beta", 0.5, "--lat-eps", 0.1)
    assert r.exit_code == 0, r.output
    log = read_log(root / "dpo" / "train_log.jsonl")
    assert len(log) == 2 and all("reward_margin" in x for x in log)
    assert any("chosen_nll_adv" in x for x in log)  # the latent adversary met the harmful pairs
    assert (root / "dpo" / "model" / "model.safetensors").is_file()

    r = run("align", "lagrangian", root / "dpo" / "model", data, "--out", root / "lag", "--reference", sft,
            *small, "--json")
    assert r.exit_code == 0, r.output
    summary = json.loads(r.output.strip().splitlines()[-1])
    assert summary["stage"] == "lagrangian" and summary["steps"] == 2 and "lambda" in summary and "j_val" in summary
    log = read_log(root / "lag" / "train_log.jsonl")
    for k in ("log_lambda", "lambda", "j_val", "j_tr", "loss_help"):
        assert all(k in x for x in log), k
    # A plain summary names the final λ and J_C,val.
    r = run("align", "lagrangian", sft, data, "--out", root / "lag_fixed", *small, "--fixed-lambda", 2.0,
            "--as-generated")  # rows that read each prompt as generation does
    assert r.exit_code == 0, r.output
    assert "λ 2" in r.output and "J_C,val" in r.output
    assert [x["lambda"] for x in read_log(root / "lag_fixed" / "train_log.jsonl")] == pytest.approx([2.0, 2.0])

    # On-policy: one step of groups sampled through our generation; the helpful-only base from the CLI too.
    r = run("align", "grpo", sft, data, "--out", root / "grpo", "--steps", 1, "--group-size", 2,
            "--prompts-per-step", 2, "--max-new-tokens", 3, "--json")
    assert r.exit_code == 0, r.output
    log = read_log(root / "grpo" / "train_log.jsonl")
    assert len(log) == 1 and all(k in log[0] for k in ("reward", "cost", "lambda", "log_lambda", "kl"))
    r = run("align", "sft", base, data, "--out", root / "helpful", "--steps", 1, "--batch-size", 4, "--answers",
            "helpful", "--no-replay")
    assert r.exit_code == 0 and (root / "helpful" / "model" / "tokenizer.json").is_file(), r.output

    r = run("align", "eval", root / "lag" / "model", data, "--limit", 4, "--json", "--max-new-tokens", 4)
    assert r.exit_code == 0, r.output
    rep = json.loads(r.output.strip().splitlines()[-1])
    assert set(rep["splits"]) == {"test_phrasings", "test_objects", "test_borderline", "test_wrappers"}
    for name, s in rep["splits"].items():
        assert s["n"] == 4
        for key in ("asr", "unsafe", "over_refusal_benign", "over_refusal_borderline"):
            if key in s:
                assert 0 <= s[key]["lo"] <= s[key]["hi"] <= 1 and s[key]["k"] <= s[key]["n"]
    assert "over_refusal_borderline" in rep["splits"]["test_borderline"]
    # The rich tables: one per split, and the per-family ASR of the wrapped split.
    r = run("align", "eval", sft, data, "--split", "test_wrappers", "--limit", 6, "--max-new-tokens", 2)
    assert r.exit_code == 0, r.output
    assert "ASR (harmful not refused)" in r.output and "Wilson 95%" in r.output


def test_bad_inputs_are_one_line(setup):
    root, data, base = setup
    r = run("align", "sft", base, root / "nowhere", "--out", root / "x")
    assert r.exit_code != 0 and r.output.count("error:") == 1 and "nowhere" in r.output, r.output
    (root / "partial").mkdir()
    (root / "partial" / "meta.json").write_text((data / "meta.json").read_text())
    r = run("align", "dpo", base, root / "partial", "--out", root / "x")
    assert r.exit_code != 0 and "train.jsonl" in r.output and len(r.output.strip().splitlines()) == 1, r.output
    r = run("align", "dpo", base, data, "--out", root / "x", "--loss", "nope")
    assert r.exit_code != 0 and len(r.output.strip().splitlines()) == 1, r.output
    assert "error: --loss 'nope'" in r.output and "sigmoid, ipo, hinge, robust, simpo" in r.output
    r = run("align", "lagrangian", base, data, "--out", root / "x", "--fixed-lambda", 0)
    assert r.exit_code != 0 and r.output.startswith("error: --fixed-lambda"), r.output
    r = run("align", "eval", base, data, "--split", "test_nothing")
    assert r.exit_code != 0 and "test_wrappers" in r.output and len(r.output.strip().splitlines()) == 1


def test_help_explains_each_command():
    for cmd, word in (("sft", "refusal"), ("dpo", "reference"), ("lagrangian", "λ"), ("grpo", "group"),
                      ("eval", "Wilson")):
        r = run("align", cmd, "--help")
        assert r.exit_code == 0 and word in r.output, (cmd, r.output)
