"""The drafter objective (gemma4.train.drafter) on a tiny random PLE/KV-sharing target: training lowers
its loss, the row-wide training forward equals the drafter's own decoding forward, and a trained drafter,
saved and loaded in the drafter file format, keeps greedy output identical to plain decoding."""

from __future__ import annotations

import torch

from gemma4 import Gemma4Config, build_model, init_random_
from gemma4.infer.speculative import greedy_decode, speculative_generate
from gemma4.io import load_drafter, save_drafter
from gemma4.train import TrainConfig, Trainer
from gemma4.train.drafter import (DrafterObjective, drafter_config_for, drafter_loss, greedy_rows, new_drafter,
                                  unrolled_drafts)
from tiny import PLE

S, F = "sliding_attention", "full_attention"
PROMPT = 6


def _target():
    t = init_random_(build_model(Gemma4Config.from_dict(PLE)), seed=1, std=0.15).eval()
    for p in t.parameters():
        p.requires_grad_(False)
    return t


def _rows(target, n=32, new=26, seed=0):
    g = torch.Generator().manual_seed(seed)
    prompts = torch.randint(3, 256, (n, PROMPT), generator=g)
    return greedy_rows(target, prompts, new, batch_size=16)


def test_row_forward_matches_decoding_forward():
    # Slot p of the training forward must be what Gemma4Drafter.forward computes when decoding with the
    # target's K/V up to slot p (step 1; step 2 reads step 1's projected state).
    target = _target()
    d = new_drafter(drafter_config_for(target.config, (S, F), hidden_size=32, intermediate_size=64), target, seed=3).eval()
    ids = _rows(target, n=1, new=18)
    with torch.no_grad():
        h, kv = target.model.forward_export_kv(ids)
        rows = unrolled_drafts(d, target, ids, h, kv, steps=2)
        for p in (2, 9, 20):
            pos = torch.tensor([[p + 1]])
            e = d.input_embeds(target, ids[:, p + 1 : p + 2], h[:, p : p + 1])
            lg, hn = d(e, kv, pos, last_slot=p)
            torch.testing.assert_close(lg[0, 0], rows[0][0, p], atol=2e-5, rtol=1e-4)
            e2 = d.input_embeds(target, ids[:, p + 2 : p + 3], hn)
            lg2, _ = d(e2, kv, pos, last_slot=p)
            torch.testing.assert_close(lg2[0, 0], rows[1][0, p], atol=2e-5, rtol=1e-4)


def test_training_lowers_loss_and_greedy_output_stays_identical(tmp_path):
    torch.manual_seed(0)
    target = _target()
    rows = _rows(target)
    d = new_drafter(drafter_config_for(target.config, (S, F), hidden_size=32, intermediate_size=64), target, seed=3)
    obj = DrafterObjective(target, rows, first_slot=PROMPT - 1, steps=2, batch_size=8, seed=0)
    with torch.no_grad():
        before, _ = drafter_loss(d, target, rows, obj.valid, steps=2)
    cfg = TrainConfig(steps=40, lr=1e-2, warmup_steps=4, dtype="float32", plot=False, checkpoints=False)
    result = Trainer(d, None, cfg, tmp_path / "run", objective=obj).fit()
    with torch.no_grad():
        after, logs = drafter_loss(d.eval(), target, rows, obj.valid, steps=2)
    assert after.item() < 0.7 * before.item(), (before.item(), after.item())
    assert result.history[-1]["acc_step1"] > result.history[0]["acc_step1"]
    for p in d.parameters():
        p.requires_grad_(False)
    save_drafter(d, tmp_path / "drafter")
    loaded = load_drafter(tmp_path / "drafter")
    prompt = torch.randint(3, 256, (PROMPT,), generator=torch.Generator().manual_seed(7)).tolist()
    want = greedy_decode(target, prompt, 24)
    for k in (1, 3):
        res = speculative_generate(target, prompt, 24, drafter=loaded, num_draft_tokens=k)
        assert res.tokens == want
    # The trained drafter is right more often than chance on the target's own greedy continuations.
    assert logs["acc_step1"] > 0.2
