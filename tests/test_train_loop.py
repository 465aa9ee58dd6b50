"""The training loop: exact gradient accumulation, schedule, log/plot/held-out perplexity, bf16 autocast,
and resuming after `kill -9` to the identical loss curve."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from gemma4.train import make_trainable
from gemma4.train.data import encode_text, pack
from gemma4.train.loop import TrainConfig, TrainError, Trainer, lr_at, read_log
from train_tiny import tiny_model, tiny_tokenizer

HERE = Path(__file__).parent


def _data(n_docs=48, seq_len=24):
    tok = tiny_tokenizer()
    docs = [encode_text(tok, "the and of to "[: 3 + (i * 7) % 12] * (1 + i % 4) + str(i)) for i in range(n_docs)]
    return pack(docs, seq_len)


def _whole_batches(data, k):
    rows = len(data) - len(data) % k  # whole batches per epoch, so both runs see the same rows in order
    return type(data)(*(t[:rows] for t in (data.input_ids, data.labels, data.position_ids, data.segment_ids)))


def test_accumulated_gradient_equals_big_batch_gradient():
    """One step: per-parameter gradients of 8 accumulated rows == those of the batch of 8 (fp32 roundoff)."""
    from gemma4.train import causal_lm_loss

    b = _data().rows(slice(0, 8))
    model = make_trainable(tiny_model("moe", seed=2))
    n = int((b["labels"][:, 1:] != -100).sum())

    def grads(parts):
        model.zero_grad(set_to_none=True)
        for r in parts:
            causal_lm_loss(model, b["input_ids"][r], b["labels"][r], position_ids=b["position_ids"][r],
                           segment_ids=b["segment_ids"][r], num_targets=n).backward()
        return {k: p.grad.clone() for k, p in model.named_parameters()}

    big, acc = grads([slice(0, 8)]), grads([slice(i, i + 1) for i in range(8)])
    for k in big:
        rel = ((big[k] - acc[k]).norm() / big[k].norm().clamp_min(1e-30)).item()
        assert rel <= 1e-5, (k, rel)


def test_accumulation_equals_one_big_batch(tmp_path):
    """batch 8 x 1 step == batch 1 x 8 accumulation steps: losses and gradient norms within 1e-5 over 20
    steps (fp32). Weights start at std 0.01: at std 0.05 this 10-layer random net is chaotic under Adam
    (the gradients still agree to ~6e-7 per step, but Adam's sign-like first steps amplify that
    roundoff until losses differ by 1e-2); at 0.01 the run is smooth, as a pretrained model's is."""
    data = _whole_batches(_data(), 8)
    runs = []
    for bs, acc in ((8, 1), (1, 8)):
        model = make_trainable(tiny_model("ple6", seed=2, std=0.01))
        cfg = TrainConfig(steps=20, lr=1e-3, warmup_steps=3, batch_size=bs, grad_accum=acc, dtype="float32",
                          max_grad_norm=1.0, plot=False, seed=1)
        runs.append(Trainer(model, data, cfg, tmp_path / f"b{bs}").fit().history)
    big, acc = runs
    assert len(big) == len(acc) == 20
    for a, b in zip(big, acc):
        assert abs(a["loss"] - b["loss"]) <= 1e-5, (a["step"], a["loss"], b["loss"])
        assert abs(a["grad_norm"] - b["grad_norm"]) <= 1e-5 * max(1.0, a["grad_norm"]), (a["step"], a["grad_norm"], b["grad_norm"])
        assert a["tokens"] == b["tokens"]
    assert big[-1]["loss"] < big[0]["loss"] - 0.5  # and it learns


def test_schedule_warmup_then_cosine():
    cfg = TrainConfig(steps=11, lr=1.0, warmup_steps=2, min_lr_ratio=0.1)
    lrs = [lr_at(s, cfg) for s in range(11)]
    assert lrs[0] == 0.5 and lrs[1] == 1.0 and lrs[2] == 1.0
    assert all(a >= b for a, b in zip(lrs[2:], lrs[3:]))
    assert abs(lrs[-1] - 0.1) < 1e-12


def test_log_plot_heldout_and_bf16(tmp_path):
    data = _data(24, 24)
    held = _data(6, 24)
    model = make_trainable(tiny_model("moe", seed=3))
    seen = []
    cfg = TrainConfig(steps=6, lr=3e-3, batch_size=2, eval_every=3, save_every=0)  # bf16 autocast default
    res = Trainer(model, data, cfg, tmp_path, heldout=held, on_step=seen.append).fit()
    log = read_log(tmp_path / "train_log.jsonl")
    assert [r["step"] for r in log] == [1, 2, 3, 4, 5, 6] and seen == res.history
    for r in log:
        assert {"step", "loss", "lr", "grad_norm", "tokens", "tok_per_s", "eta_s"} <= set(r)
    assert [r["step"] for r in log if "eval_ppl" in r] == [3, 6]
    assert res.eval_ppl == pytest.approx(torch.tensor(res.eval_loss).exp().item())
    assert all(p.dtype == torch.float32 for p in model.parameters())  # master weights stay fp32
    png = tmp_path / "loss_curve.png"
    assert res.plot == png and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step-000006"


def test_refusals():
    with pytest.raises(TrainError, match="float16 is refused"):
        TrainConfig(dtype="float16").validate()
    model = tiny_model("dense")  # frozen: nothing to train
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(TrainError, match="no trainable parameter"):
        Trainer(model, _data(), TrainConfig(), "/tmp/unused")
    model = make_trainable(tiny_model("dense").to(torch.bfloat16))
    with pytest.raises(TrainError, match="float32 master weights"):
        Trainer(model, _data(), TrainConfig(), "/tmp/unused")


CHILD = textwrap.dedent("""
    import os, sys, time, torch
    torch.set_num_threads(1)
    sys.path.insert(0, {tests!r})
    from test_train_loop import run
    slow = os.environ.get("SLOW_AFTER")
    def on_step(rec):
        if slow and rec["step"] >= int(slow):
            time.sleep(30)  # the parent kills us here
    run(sys.argv[1], sys.argv[2] == "resume", on_step)
""")


def run(out, resume=False, on_step=None):
    model = make_trainable(tiny_model("ple6", seed=4))
    cfg = TrainConfig(steps=8, lr=3e-3, warmup_steps=2, batch_size=2, grad_accum=2, save_every=3,
                      dtype="float32", plot=False, seed=7)
    return Trainer(model, _data(), cfg, out, on_step=on_step).fit(resume=resume)


def _child(out, mode, env=None):
    code = CHILD.format(tests=str(HERE))
    return subprocess.Popen([sys.executable, "-c", code, str(out), mode], env={**os.environ, **(env or {})},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


@pytest.mark.slow
def test_kill9_then_resume_reproduces_the_loss_curve(tmp_path):
    killed = _child(tmp_path / "run", "fresh", {"SLOW_AFTER": "5"})
    log = tmp_path / "run" / "train_log.jsonl"
    deadline = time.time() + 60
    while time.time() < deadline:  # wait until step 5 is logged (checkpoint 3 is on disk), then kill -9
        if log.exists() and any(json.loads(ln)["step"] == 5 for ln in log.read_text().splitlines() if ln.strip()):
            break
        assert killed.poll() is None, killed.stderr.read().decode()
        time.sleep(0.05)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text().strip() == "step-000003"
    assert max(r["step"] for r in read_log(log)) == 5  # steps 4-5 were logged but not checkpointed

    run(tmp_path / "run", resume=True)  # a fresh model in this process (also 1 thread) continues the run
    run(tmp_path / "ref")  # the uninterrupted reference
    a, b = read_log(tmp_path / "ref" / "train_log.jsonl"), read_log(log)
    assert [r["step"] for r in b] == list(range(1, 9))
    for x, y in zip(a, b):
        for k in ("loss", "grad_norm", "lr", "tokens"):
            assert x[k] == y[k], (x["step"], k, x[k], y[k])  # identical, not close
    # The final trainable weights are identical too.
    from safetensors.torch import load_file

    wa = load_file(str(tmp_path / "ref" / "checkpoints" / "step-000008" / "trainable.safetensors"))
    wb = load_file(str(tmp_path / "run" / "checkpoints" / "step-000008" / "trainable.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_init_weights_small_model_options():
    """embed_std re-scales only the token embedding; unit_attention_logits starts q_norm and k_norm at
    head_dim^(-1/4), so logits of RMS-normed q and k have unit variance; everything else is the plain init."""
    import gemma4
    from gemma4.train.run import init_weights_
    from train_tiny import tiny_config

    plain = init_weights_(gemma4.build_model(tiny_config()), seed=3)
    unit = init_weights_(gemma4.build_model(tiny_config()), seed=3, embed_std=0.1, unit_attention_logits=True)
    a, b = plain.state_dict(), unit.state_dict()
    changed = {k for k in a if not torch.equal(a[k], b[k])}
    assert "model.embed_tokens.weight" in changed
    torch.testing.assert_close(b["model.embed_tokens.weight"], a["model.embed_tokens.weight"] * 5.0)  # 0.1 / 0.02
    for k in changed - {"model.embed_tokens.weight"}:
        assert k.endswith(("q_norm.weight", "k_norm.weight")), k
        torch.testing.assert_close(b[k], torch.full_like(b[k], b[k].numel() ** -0.25))
    assert sum(k.endswith("q_norm.weight") for k in changed) == len(unit.model.layers)
    attn = unit.model.layers[0].self_attn
    with torch.no_grad():
        q = attn.q_norm(torch.randn(20000, attn.head_dim))
        k = attn.k_norm(torch.randn(20000, attn.head_dim))
    assert abs(float((q * k).sum(-1).var()) - 1.0) < 0.1
