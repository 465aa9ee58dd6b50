"""Latent adversarial training: the prompt mask, the residual hook (where it acts, and that it leaves),
the PGD attack (inside its ball, on the prompt only, toward the rejected answer) and the objective on the
training loop."""

import pytest
import torch

from gemma4.train.latent import LATDPOObjective, LATError, LATObjective, perturbed, prompt_mask
from gemma4.train.loop import TrainConfig, Trainer
from gemma4.train.preference import (Pairs, PreferenceError, dpo_step, precompute_reference, response_nll,
                                     sequence_logprobs)
from train_tiny import HELP, REFUSE, tiny_model, token_prompts, token_responses


def _pairs(n=8, seed=0):
    prompts = token_prompts(n, seed)
    return Pairs(token_responses(prompts, REFUSE), token_responses(prompts, HELP)), prompts


def test_prompt_mask_is_the_prompt():
    pairs, prompts = _pairs(4)
    m = prompt_mask(pairs.chosen)
    for i, p in enumerate(prompts):
        assert m[i].tolist() == [True] * len(p) + [False] * (m.shape[1] - len(p))


def test_the_hook_moves_the_masked_positions_and_later_ones_only_and_leaves():
    model = tiny_model("ple6", seed=1).eval()
    ids = torch.randint(3, 380, (2, 9), generator=torch.Generator().manual_seed(0))
    clean = model.model(ids)
    delta = torch.randn(2, 9, model.config.hidden_size, generator=torch.Generator().manual_seed(1))
    mask = torch.zeros(2, 9, dtype=torch.bool)
    mask[:, 4] = True
    seen = []
    with perturbed(model, 1, delta, mask, seen):
        out = model.model(ids)
    assert torch.equal(out[:, :4], clean[:, :4])  # causal: nothing before the perturbed position moves
    assert (out[:, 4:] - clean[:, 4:]).abs().amax(-1).min() > 1e-4
    assert seen[0].shape == (2, 9, model.config.hidden_size)
    assert torch.equal(model.model(ids), clean)  # the hook is gone
    with perturbed(model, 1, torch.zeros_like(delta), mask):
        assert torch.equal(model.model(ids), clean)
    with pytest.raises(LATError, match="layer must be in"):
        with perturbed(model, 99, delta, mask):
            pass


def test_the_attack_stays_in_its_ball_on_the_prompt_and_finds_the_rejected_answer():
    model = tiny_model("ple6", seed=2)
    pairs, _ = _pairs(6, seed=3)
    obj = LATObjective(pairs, layer=1, eps=0.5, pgd_steps=5, batch_size=6)
    batch = pairs.rows(torch.arange(6))
    delta, mask, logs = obj.attack(model, batch)
    seen = []
    with perturbed(model, 1, torch.zeros_like(delta), mask, seen):
        sequence_logprobs(model, batch.rejected.input_ids, batch.rejected.response_mask)
    h = seen[0]
    t = h.shape[1]
    norms, radius = delta[:, :t].norm(dim=-1), 0.5 * h.norm(dim=-1)
    assert bool((norms <= radius * (1 + 1e-5) + 1e-6).all())
    assert bool((norms[~mask[:, :t]] == 0).all()) and bool((norms[mask[:, :t]] > 0).all())
    assert logs["adv_rejected_nll"] < logs["adv_rejected_nll_clean"]
    with torch.no_grad():  # the logged numbers are the rejected answer's NLL without and with delta
        clean = response_nll(*sequence_logprobs(model, batch.rejected.input_ids, batch.rejected.response_mask))
    assert logs["adv_rejected_nll_clean"] == pytest.approx(float(clean), rel=1e-5)
    assert not any(p.grad is not None for p in model.parameters())  # the attack leaves no weight gradient


def test_lat_on_the_loop_makes_the_chosen_answer_hold_under_attack(tmp_path):
    model = tiny_model("ple6", seed=4)
    pairs, _ = _pairs(16, seed=5)
    obj = LATObjective(pairs, layer=1, eps=0.3, pgd_steps=3, batch_size=8, seed=1)
    probe = pairs.rows(torch.arange(16))
    d0, m0, _ = obj.attack(model, probe)
    before = float(obj._nll(model, probe.chosen, d0, m0).detach())
    cfg = TrainConfig(steps=30, lr=1e-2, warmup_steps=0, plot=False, checkpoints=False, seed=0)
    hist = Trainer(model, None, cfg, tmp_path, objective=obj).fit().history
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in hist)
    assert {"adv_rejected_nll", "chosen_nll_adv", "chosen_nll"} <= set(hist[-1])
    d1, m1, _ = obj.attack(model, probe)  # a fresh attack on the trained model
    assert float(obj._nll(model, probe.chosen, d1, m1).detach()) < 0.5 * before


@pytest.mark.parametrize("kw, match", [({"eps": 0}, "eps"), ({"pgd_steps": 0}, "pgd_steps"),
                                       ({"pgd_step_size": 1.5}, "pgd_step_size")])
def test_bad_settings_name_themselves(kw, match):
    with pytest.raises(LATError, match=match):
        LATObjective(_pairs(2)[0], **kw)


def test_only_the_attacked_rows_meet_the_adversary():
    """Targeted LAT as published: the adversary sees the harmful rows only, the rest train clean."""
    model = tiny_model("ple6", seed=6)
    pairs, _ = _pairs(8, seed=7)
    attacked = torch.tensor([True, False] * 4)
    obj = LATObjective(pairs, eps=0.2, pgd_steps=2, attacked=attacked, batch_size=8)
    rows, hit = obj.next_batch()
    assert len(rows) == 8 and len(hit) == 4
    def texts(r):
        return {tuple(r.input_ids[i, : r.lengths[i]].tolist()) for i in range(len(r))}

    assert texts(hit.chosen) == texts(pairs.rows(torch.nonzero(attacked)[:, 0]).chosen)
    loss, logs = obj.loss(model, (rows, hit))
    assert {"chosen_nll", "chosen_nll_adv", "adv_rejected_nll"} <= set(logs)
    loss, logs = obj.loss(model, (rows, None))  # a batch with no attacked row: the clean loss alone
    assert "chosen_nll_adv" not in logs and logs["loss"] == pytest.approx(logs["chosen_nll"])
    with pytest.raises(LATError, match="attacked"):
        LATObjective(pairs, attacked=torch.zeros(8, dtype=torch.bool))
    with pytest.raises(LATError, match="attacked"):
        LATObjective(pairs, attacked=torch.ones(3, dtype=torch.bool))


def test_lat_dpo_is_dpo_on_the_batch_plus_the_attacked_rows_refusal_under_attack():
    """DPO with a latent adversary: the clean batch's DPO + anchor, plus NLL(chosen | δ) on the attacked rows
    alone; with no attacked row in the batch, exactly `dpo_step`."""
    model = tiny_model("ple6", seed=8)
    pairs, _ = _pairs(8, seed=9)
    with pytest.raises(PreferenceError, match="reference log-probs"):
        LATDPOObjective(pairs)
    pairs = precompute_reference(tiny_model("ple6", seed=10), pairs, 8)
    attacked = torch.tensor([True, False] * 4)
    obj = LATDPOObjective(pairs, beta=0.2, alpha=0.5, eps=0.3, pgd_steps=2, attacked=attacked, batch_size=8)
    rows, hit = obj.next_batch()
    assert len(hit) == 4
    dpo, dpo_logs = dpo_step(model, rows, beta=0.2, alpha=0.5)
    loss, logs = obj.loss(model, (rows, None))
    assert float(loss.detach()) == pytest.approx(float(dpo.detach()), rel=1e-6) and "chosen_nll_adv" not in logs
    loss, logs = obj.loss(model, (rows, hit))
    assert {"reward_margin", "chosen_nll_adv", "adv_rejected_nll"} <= set(logs)
    assert float(loss.detach()) == pytest.approx(float(dpo.detach()) + logs["chosen_nll_adv"], rel=1e-5)
    assert logs["adv_rejected_nll"] < logs["adv_rejected_nll_clean"]  # the adversary found compliance
