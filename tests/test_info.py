from typer.testing import CliRunner

from gemma4.cli import app
from tiny import write_hf_checkpoint

runner = CliRunner()


def test_info_preset_table():
    r = runner.invoke(app, ["info", "31b"])
    assert r.exit_code == 0, r.output
    for text in ("SSSSSF", "32 q heads, 16 kv heads, head_dim 256", "4 kv heads, head_dim 512", "K=V",
                 "proportional", "30,697,345,280"):
        assert text in r.output


def test_info_checkpoint_dir(tmp_path):
    write_hf_checkpoint("ple", tmp_path)
    r = runner.invoke(app, ["info", str(tmp_path)])
    assert r.exit_code == 0, r.output
    assert "reuse K/V of producers [4, 5]" in r.output and "per-layer embeddings" in r.output


def test_info_bad_target():
    r = runner.invoke(app, ["info", "/nonexistent/gemma4-model"])
    assert r.exit_code != 0
