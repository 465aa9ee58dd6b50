"""Every CLI error is one `error:` line naming the thing at fault, a non-zero exit status and no traceback;
--debug or GEMMA4_DEBUG=1 adds the traceback. Issue 11 item 6, issue 12 "dead ends"."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

import gemma4
from cli_tiny import char_checkpoint, one_error_line
from gemma4.cli import app, main

runner = CliRunner()


def run(*args, **kw):
    return runner.invoke(app, [str(a) for a in args], **kw)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return char_checkpoint(tmp_path_factory.mktemp("ckpt"))


@pytest.fixture(scope="module")
def bare(tmp_path_factory):
    """A checkpoint with no tokenizer."""
    d = tmp_path_factory.mktemp("bare")
    import quant_tiny

    gemma4.save_pretrained(quant_tiny.model("gemma3"), d)
    return d


def _digest(d: Path) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.iterdir()) if p.is_file()}


def test_unknown_model_names_the_valid_ones():
    line = one_error_line(run("info", "e2x"))
    assert "'e2x'" in line and "did you mean 'e2b'" in line
    for name in gemma4.PRESETS:
        assert name in line
    line = one_error_line(run("generate", "-m", "gemma3-207m", "hello"))
    assert "did you mean 'gemma3-270m'" in line
    line = one_error_line(run("memory", "./no/such/dir"))
    assert "./no/such/dir" in line and "no such file" in line


def test_text_file_as_model(tmp_path):
    f = tmp_path / "notes.txt"
    f.write_text("hello")
    for cmd in (["generate", "-m", f, "hi"], ["chat", f], ["info", f], ["quantize", f, tmp_path / "q"],
                ["eval", f, f]):
        line = one_error_line(run(*cmd))
        assert "notes.txt" in line and "not a checkpoint" in line, (cmd, line)


def test_truncated_checkpoints(tmp_path, ckpt):
    d = tmp_path / "trunc"
    d.mkdir()
    for f in ckpt.iterdir():
        (d / f.name).write_bytes(f.read_bytes())
    st = d / "model.safetensors"
    st.write_bytes(st.read_bytes()[: st.stat().st_size // 2])
    line = one_error_line(run("generate", "-m", d, "--ids", "2 5 6", "-n", "2"))
    assert "model.safetensors" in line
    g = tmp_path / "t.gguf"
    assert run("convert", ckpt, g).exit_code == 0
    g.write_bytes(g.read_bytes()[:5000])
    line = one_error_line(run("generate", "-m", g, "--ids", "2 5 6", "-n", "2"))
    assert "t.gguf" in line


def test_bad_option_values(ckpt):
    line = one_error_line(run("generate", "-m", ckpt, "hi", "--device", "nonsense"))
    assert "--device" in line and "nonsense" in line
    line = one_error_line(run("generate", "-m", ckpt, "hi", "--threads", "-1"))
    assert "--threads" in line and "greater than or equal to 1" in line and "gemma4 generate --help" in line
    line = one_error_line(run("generate", "-m", ckpt, "hi", "-n", "x"))
    assert "--max-new-tokens" in line
    line = one_error_line(run("generate", "-m", ckpt, "hi", "--attn", "magic"))
    assert "magic" in line and "sdpa" in line
    line = one_error_line(run("generate", "-m", ckpt, "hi", "--dtype", "float13"))
    assert "float13" in line and "bfloat16" in line
    line = one_error_line(run("nosuchcommand"))
    assert "nosuchcommand" in line


def test_invalid_utf8_prompt(tmp_path, ckpt):
    # A byte that is not UTF-8 on the command line reaches Python as a lone surrogate (surrogateescape).
    line = one_error_line(run("generate", "-m", ckpt, "caf\udce9"))
    assert "UTF-8" in line and "0xe9" in line
    f = tmp_path / "p.txt"
    f.write_bytes(b"caf\xe9 au lait")
    line = one_error_line(run("generate", "-m", ckpt, "--file", f))
    assert "p.txt" in line and "UTF-8" in line and "0xe9" in line
    line = one_error_line(run("generate", "-m", ckpt, "-", input=b"\xff\xfe"))
    assert "standard input" in line
    line = one_error_line(run("generate", "-m", ckpt, "--file", tmp_path / "missing.txt"))
    assert "missing.txt" in line and "no such file" in line


def test_prompt_sources(ckpt, bare):
    line = one_error_line(run("generate", "-m", ckpt))
    assert "no prompt" in line and "--file" in line and "--ids" in line
    line = one_error_line(run("generate", "-m", ckpt, "hi", "--ids", "2 3"))
    assert "a prompt argument and --ids" in line
    line = one_error_line(run("generate", "-m", bare, "hi"))
    assert "has no tokenizer" in line and "tokenizer.json" in line and "--ids" in line


def test_outputs_never_replace_the_input(tmp_path, ckpt):
    src = tmp_path / "src"
    src.mkdir()
    for f in ckpt.iterdir():
        (src / f.name).write_bytes(f.read_bytes())
    before = _digest(src)
    for cmd in ("convert", "quantize"):
        line = one_error_line(run(cmd, src, src))
        assert "is the input" in line, line
        line = one_error_line(run(cmd, src, f"{src}/../{src.name}"))  # the same directory spelled differently
        assert "is the input" in line, line
    assert _digest(src) == before
    f = tmp_path / "a_file"
    f.write_text("x")
    for cmd in ("convert", "quantize"):
        line = one_error_line(run(cmd, src, f))
        assert "a_file" in line and "existing file" in line
    line = one_error_line(run("convert", src, tmp_path / "a_file" / "x.gguf"))
    assert "a_file" in line and "not a directory" in line


def test_plot_without_matplotlib(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    r = run("memory", "e2b", "--plot", tmp_path / "m.png")
    assert r.exit_code != 0 and "pip install 'gemma4[plot]'" in r.output
    assert "weights total" not in r.output  # checked before any work
    data = Path(__file__).parent / "data" / "english.txt"
    r = run("tokens", "analyze", data, "--plot", tmp_path / "t.png", "-t", "gemma3")
    assert r.exit_code != 0 and "pip install 'gemma4[plot]'" in r.output and "Traceback" not in r.output


def test_debug_shows_the_traceback(monkeypatch):
    r = run("info", "e2x", "--debug")
    assert r.exit_code == 1 and "Traceback" in r.output and "error: unknown model 'e2x'" in r.output
    monkeypatch.setenv("GEMMA4_DEBUG", "1")
    r = run("info", "e2x")
    assert "Traceback" in r.output


def test_unexpected_errors_are_one_line_too(monkeypatch):
    import gemma4.cli.info as info_mod

    def boom(spec):
        raise RuntimeError("synthetic\nfailure")

    monkeypatch.setattr(info_mod, "load_config", boom)
    line = one_error_line(run("info", "e2b"))
    assert "unexpected RuntimeError: synthetic failure" in line and "--debug" in line


def test_version_and_main_entry(capsys):
    r = run("--version")
    assert r.exit_code == 0 and r.output.startswith(f"gemma4 {gemma4.__version__}")
    assert main(["info", "e2x"]) == 1
    assert "error: unknown model 'e2x'" in capsys.readouterr().err


def test_help_flags_have_no_type():
    """No flag reads as if it took a value: not the command's own flags, not --help itself, at any depth."""
    for argv in (("--help",), ("generate", "--help"), ("align", "--help")):
        r = run(*argv)
        assert r.exit_code == 0, r.output
        assert "<bool>" not in r.output, argv
    r = run("generate", "--help")
    assert any("--stats" in ln for ln in r.output.splitlines())


def test_real_process():
    """The installed entry point: `python -m gemma4` exits 1 with one line on stderr, nothing on stdout."""
    env = dict(os.environ, GEMMA4_DEBUG="")
    p = subprocess.run([sys.executable, "-m", "gemma4", "info", "e2x"], capture_output=True, text=True, env=env,
                       timeout=120)
    assert p.returncode == 1 and p.stdout == ""
    assert p.stderr.count("\n") == 1 and p.stderr.startswith("error: unknown model 'e2x'"), p.stderr
