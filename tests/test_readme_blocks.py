"""The README's Fine-tune and Serve blocks run as written, with one substitution: a tiny checkpoint (real
Gemma 4 vocabulary, random weights) stands in for the 270M, so the blocks take seconds, not minutes
(tests/test_readme.py runs the other blocks on the real 270M)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

import gemma4
from gemma4.cli import app
from gemma4.io import assets
from gemma4.text import load_tokenizer
from cli_tiny import free_port, running_server
from test_cache import tiny_model

README = Path(__file__).resolve().parents[1] / "README.md"
NAME = "gemma3-270m"  # the README's model; the tiny checkpoint directory takes its name (and served id)


def _section_blocks(heading: str, lang: str) -> list[str]:
    text = README.read_text()
    start = text.index(f"\n## {heading}\n")
    end = text.index("\n## ", start + 1)
    return re.findall(rf"```{lang}\n(.*?)```", text[start:end], re.S)


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    tok = load_tokenizer(assets.gemma4_vocab_gguf())
    d = tmp_path_factory.mktemp("ckpt") / NAME
    # The README's requests carry no max_tokens: a 64-position context keeps their replies short.
    gemma4.save_pretrained(tiny_model("dense", vocab_size=tok.vocab_size, max_position_embeddings=64,
                                      bos_token_id=tok.bos_id, eos_token_id=tok.eos_id), d)
    tok.save(d / "tokenizer.json")
    return d


def test_readme_finetune_block(tiny_ckpt, tmp_path, monkeypatch):
    (tmp_path / "tests").symlink_to(README.parent / "tests")
    monkeypatch.chdir(tmp_path)
    (block,) = _section_blocks("Fine-tune", "sh")
    lines = [ln for ln in block.splitlines() if ln.strip() and not ln.startswith("#")]
    assert [ln.split()[1] for ln in lines] == ["finetune", "generate"]
    for ln in lines:
        argv = [str(tiny_ckpt) if a == NAME else a for a in shlex.split(ln)]
        r = CliRunner().invoke(app, argv[1:])
        assert r.exit_code == 0 and "Traceback" not in r.output, (ln, r.output)
    assert (tmp_path / "run" / "adapter" / "adapter_config.json").is_file()


def test_readme_serve_blocks(tiny_ckpt, capsys):
    pytest.importorskip("uvicorn")
    sh, py = _section_blocks("Serve", "sh"), _section_blocks("Serve", "python")
    lines = " ".join(sh[0].replace("\\\n", " ").splitlines()).split("gemma4 serve", 1)[1]
    serve_cmd, curl = ("gemma4 serve" + lines).split(" curl ", 1)
    serve_argv = shlex.split(serve_cmd.split("#")[0])
    port = free_port()
    argv = [str(tiny_ckpt) if a == NAME else (str(port) if a == "8000" else a) for a in serve_argv[1:]]
    assert argv[0] == "serve" and "--port" in argv
    with running_server([*argv, "--threads", "1"], port):
        # The curl line: its URL and JSON body, sent as curl would send them.
        c = shlex.split("curl " + curl)
        url = next(a for a in c if a.startswith("http")).replace("8000", str(port))
        body = c[c.index("-d") + 1]
        r = httpx.post(url, content=body, headers={"Content-Type": "application/json"}, timeout=60)
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["role"] == "assistant", r.text
        # The Python block, as written, against the same server.
        code = py[0].replace("127.0.0.1:8000", f"127.0.0.1:{port}")
        exec(compile(code, "README.md", "exec"), {})
        assert isinstance(capsys.readouterr().out, str)
