"""Progress on the two waits a newcomer sees before the first token: loading a checkpoint and prefilling a
long prompt (issue 12). The library takes any ``Progress`` (items, description) -> items; the CLI gives a
bar on a terminal and, in logs, plain lines only when the work is slow."""

import torch

from gemma4 import load_pretrained
from gemma4.infer import generate
from gemma4.io.gguf import save_gguf
from tests.tiny import write_hf_checkpoint


class Recorder:
    def __init__(self):
        self.calls, self.ticks = [], 0

    def __call__(self, items, description=""):
        items = list(items)
        self.calls.append((description, len(items)))
        for x in items:
            yield x
            self.ticks += 1


def test_load_progress_ticks_once_per_tensor(tmp_path):
    d = tmp_path / "m"
    write_hf_checkpoint("ple", d)
    rec = Recorder()
    m = load_pretrained(d, progress=rec)
    n = len(m.state_dict())
    assert rec.calls == [("loading m", n)] and rec.ticks == n
    ref = load_pretrained(d)
    assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), ref.state_dict().values()))
    g = save_gguf(ref, tmp_path / "m.gguf", "f32")
    rec = Recorder()
    load_pretrained(g, progress=rec)
    assert rec.calls and rec.calls[0][0] == "loading m.gguf" and rec.ticks >= 1


def test_prefill_progress_per_chunk_same_tokens(tmp_path):
    write_hf_checkpoint("dense", tmp_path / "m")
    m = load_pretrained(tmp_path / "m")
    prompt = [list(range(3, 103))]
    rec = Recorder()
    out = generate(m, prompt, 5, prefill_chunk=32, progress=rec)
    assert rec.calls == [("prefill 100 tokens", 4)] and rec.ticks == 4
    assert out == generate(m, prompt, 5, prefill_chunk=32) == generate(m, prompt, 5, prefill_chunk=None)


def test_cli_progress_is_silent_for_quick_work_in_logs(capsys):
    from gemma4.cli._common import progress, slow_progress

    assert list(slow_progress(range(5), "loading x")) == list(range(5))
    assert capsys.readouterr().err == ""  # under a second: no lines in a log
    assert list(progress(range(5), "quantize")) == list(range(5))
    assert "quantize: 5/5" in capsys.readouterr().err


def test_cli_generate_long_prompt_prefills_in_chunks(tmp_path):
    """`gemma4 generate` on a prompt spanning several prefill chunks: same text as one-chunk prefill."""
    from typer.testing import CliRunner

    from cli_tiny import char_checkpoint
    from gemma4.cli import app

    ckpt = str(char_checkpoint(tmp_path / "m"))
    prompt = "abcdefgh" * 8  # 64 characters: 8 chunks of 8
    out = []
    for chunk in ("8", "512"):
        r = CliRunner().invoke(app, ["generate", "-m", ckpt, prompt, "-n", "4", "--prefill-chunk", chunk,
                                     "--no-timings"])
        assert r.exit_code == 0, r.output
        out.append(r.stdout)
    assert out[0] == out[1] and out[0].startswith(prompt)
