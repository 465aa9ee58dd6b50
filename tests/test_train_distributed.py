"""FSDP2 data parallelism: `torchrun --nproc-per-node 2` on gloo (CPU) gives the losses and gradient norms
of the single-process run with the same global batch, and resumes (sharded) from a checkpoint."""

import os
import shutil
import subprocess
import textwrap
from pathlib import Path

import pytest

from gemma4.train.loop import read_log

HERE = Path(__file__).parent

SCRIPT = textwrap.dedent("""
    import json, sys, torch
    torch.set_num_threads(1)
    sys.path.insert(0, {tests!r})
    from gemma4.train.distributed import from_env
    from test_train_distributed import run

    class Crash(Exception):
        pass

    def on_step(rec):
        if rec["step"] == 3:
            raise Crash  # on every rank, after step 3's log line, before the next checkpoint (step 4)

    ctx = from_env()
    try:
        run(sys.argv[1], per_rank=1, dist=ctx, on_step=on_step)
    except Crash:
        pass
    latest = open(sys.argv[1] + "/checkpoints/latest").read().strip()
    # A fresh model in the same processes, resumed from the sharded run's checkpoint.
    run(sys.argv[1], per_rank=1, dist=ctx, resume=True)
    if ctx.is_main:
        print(json.dumps({{"latest_at_crash": latest}}))
""")


def run(out, per_rank, dist=None, resume=False, on_step=None):
    from gemma4.train import make_trainable
    from gemma4.train.loop import TrainConfig, Trainer
    from test_train_loop import _data
    from train_tiny import tiny_model

    model = make_trainable(tiny_model("ple6", seed=3, std=0.02))
    cfg = TrainConfig(steps=5, lr=1e-3, warmup_steps=1, batch_size=per_rank, grad_accum=2, save_every=2,
                      dtype="float32", plot=False, seed=2)
    return Trainer(model, _data(), cfg, out, dist=dist, on_step=on_step).fit(resume=resume)


@pytest.mark.slow
def test_two_processes_equal_one(tmp_path):
    """Same global batch (2 rows x 2 accumulation steps): 1 process with 2 rows per micro-batch, or 2 FSDP
    ranks with 1 row each. The 2-rank run crashes after step 3 (checkpoint at step 2) and resumes."""
    torchrun = shutil.which("torchrun")
    assert torchrun, "torchrun (installed with torch) is not on PATH"
    script = tmp_path / "child.py"
    script.write_text(SCRIPT.format(tests=str(HERE)))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    child = subprocess.Popen([torchrun, "--standalone", "--nproc-per-node", "2", str(script), str(tmp_path / "dist")],
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    single = run(tmp_path / "single", per_rank=2).history  # meanwhile, in this process
    out, err = child.communicate(timeout=300)
    assert child.returncode == 0, err[-3000:]
    assert '"latest_at_crash": "step-000002"' in out
    dist = read_log(tmp_path / "dist" / "train_log.jsonl")
    assert [r["step"] for r in dist] == list(range(1, 6))
    for a, b in zip(single, dist):
        assert abs(a["loss"] - b["loss"]) <= 1e-5, (a["step"], a["loss"], b["loss"])
        assert abs(a["grad_norm"] - b["grad_norm"]) <= 1e-5 * max(1.0, a["grad_norm"]), (a["step"], a["grad_norm"], b["grad_norm"])
        assert a["tokens"] == b["tokens"]
