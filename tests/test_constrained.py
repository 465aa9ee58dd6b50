"""Constrained objectives: the Lagrange multiplier's dual ascent, the Lagrangian objective on the loop,
GRPO advantages (per-component z-scores) and a GRPO-Lagrangian step, and the Safe RLHF cost model."""

import copy
import json
import math

import pytest
import torch

from gemma4.train import make_trainable
from gemma4.train.constrained import (ConstraintError, GRPOLagrangianObjective, LagrangeMultiplier,
                                      LagrangianObjective, group_zscore, grpo_advantages, mean_cost,
                                      pairwise_cost, refusal_cost)
from gemma4.train.cost_model import (CostModel, CostModelError, cost_model_loss, load_cost_model,
                                     save_cost_model)
from gemma4.train.loop import TrainConfig, Trainer, read_log
from gemma4.train.preference import Pairs, precompute_reference
from train_tiny import HELP, REFUSE, tiny_model, token_prompts, token_responses


# ----------------------------------------------------------------------------- multiplier
def test_multiplier_rises_decays_and_clamps():
    m = LagrangeMultiplier(init=1.0, lr=2.0, threshold=0.05, max_value=50.0)
    assert m.value == 1.0
    m.update(0.55)  # violated by 0.5 nats: log λ += 2 * 0.5
    assert m.log_lambda == pytest.approx(1.0) and m.value == pytest.approx(math.e)
    m.update(0.05)  # exactly at the threshold: no move
    assert m.log_lambda == pytest.approx(1.0)
    m.update(0.0)  # satisfied: decays by 2 * 0.05
    assert m.log_lambda == pytest.approx(0.9)
    for _ in range(20):
        m.update(3.0)
    assert m.value == pytest.approx(50.0)  # clamped at λ_max
    for _ in range(1000):
        m.update(0.0)
    assert m.value == pytest.approx(1e-4)  # and floored at λ_min
    fixed = LagrangeMultiplier(init=2.0, fixed=True)
    fixed.update(10.0)
    assert fixed.value == pytest.approx(2.0)
    with pytest.raises(ConstraintError, match="lambda_init"):
        LagrangeMultiplier(init=100.0, max_value=50.0)
    with pytest.raises(ConstraintError, match="not finite"):
        m.update(float("nan"))


def test_lagrangian_objective_logs_dual_every_step_and_lowers_cost(tmp_path):
    ref = tiny_model("ple6", seed=5)
    policy = make_trainable(copy.deepcopy(ref))
    benign = token_prompts(8, 0)
    pairs = precompute_reference(ref, Pairs(token_responses(benign, HELP), token_responses(benign, REFUSE)))
    harm_tr, harm_val = token_responses(token_prompts(8, 1), REFUSE), token_responses(token_prompts(6, 2), REFUSE)
    mult = LagrangeMultiplier(threshold=0.05, lr=0.1)  # small η: the random model's J ≈ 5.5 would clamp at once
    obj = LagrangianObjective(pairs, harm_tr, harm_val, multiplier=mult, batch_size=4, cost_batch_size=4)
    with torch.no_grad():
        j0 = float(refusal_cost(policy, harm_val).mean())
    cfg = TrainConfig(steps=6, lr=3e-3, dtype="float32", plot=False, checkpoints=False)
    Trainer(policy, None, cfg, tmp_path, objective=obj).fit()
    log = read_log(tmp_path / "train_log.jsonl")
    for k in ("loss_help", "j_tr", "j_val", "lambda", "log_lambda", "reward_acc"):
        assert all(k in r for r in log), k
    # The random model's refusal NLL is far above d: λ rises every step by η·(J_val − d).
    assert log[0]["lambda"] == 1.0
    assert log[0]["log_lambda"] == pytest.approx(0.1 * (log[0]["j_val"] - 0.05))
    assert log[1]["lambda"] == pytest.approx(math.exp(log[0]["log_lambda"]))
    assert log[-1]["j_val"] < j0  # the constraint cost falls on held-out prompts
    with pytest.raises(ConstraintError, match="cost_val"):
        LagrangianObjective(pairs, harm_tr, None)
    # dual from training prompts (the ablation) needs no validation rows
    o2 = LagrangianObjective(pairs, harm_tr, None, dual="train", batch_size=4, cost_batch_size=4,
                             multiplier=LagrangeMultiplier(lr=0.1))
    with torch.no_grad():
        _, logs = o2.loss(policy, o2.next_batch())
    assert "log_lambda" in o2.after_step(policy, 1, logs) and o2.mult.log_lambda == pytest.approx(0.1 * (logs["j_tr"] - 0.05))


def test_pairwise_cost_starts_at_log2_keeps_its_gradient_and_drives_the_dual(tmp_path):
    """The pairwise cost (refusal ≻ an answer, sigmoid DPO loss against the reference) is log 2 where the
    policy is the reference, and its gradient does not vanish once the refusal is near-certain, where the
    refusal NLL's does."""
    ref = tiny_model("ple6", seed=5)
    policy = make_trainable(copy.deepcopy(ref))
    harm = token_prompts(6, 1)
    cost_pairs = precompute_reference(ref, Pairs(token_responses(harm, REFUSE), token_responses(harm, HELP)))
    assert mean_cost(policy, cost_pairs, batch_size=4) == pytest.approx(math.log(2), abs=1e-5)
    pairwise_cost(policy, cost_pairs).mean().backward()
    assert sum(float(p.grad.norm()) for p in policy.parameters() if p.grad is not None) > 0
    with pytest.raises(ConstraintError, match="reference"):
        pairwise_cost(policy, Pairs(token_responses(harm, REFUSE), token_responses(harm, HELP)))

    benign = token_prompts(8, 0)
    pairs = precompute_reference(ref, Pairs(token_responses(benign, HELP), token_responses(benign, REFUSE)))
    val_prompts = token_prompts(6, 2)
    val = precompute_reference(ref, Pairs(token_responses(val_prompts, REFUSE), token_responses(val_prompts, HELP)))
    mult = LagrangeMultiplier(threshold=0.6, lr=2.0)
    obj = LagrangianObjective(pairs, cost_pairs, val, multiplier=mult, batch_size=4, cost_batch_size=4)
    policy.zero_grad(set_to_none=True)
    cfg = TrainConfig(steps=3, lr=3e-3, dtype="float32", plot=False, checkpoints=False)
    Trainer(policy, None, cfg, tmp_path, objective=obj).fit()
    log = read_log(tmp_path / "train_log.jsonl")
    assert log[0]["j_tr"] == pytest.approx(math.log(2), abs=1e-4)  # the first step's policy is the reference
    assert log[0]["log_lambda"] == pytest.approx(2.0 * (log[0]["j_val"] - 0.6))
    with pytest.raises(ConstraintError, match="both"):
        LagrangianObjective(pairs, cost_pairs, token_responses(token_prompts(6, 2), REFUSE))


# ----------------------------------------------------------------------------- GRPO
def test_group_zscore_per_component_and_zero_std():
    r = torch.tensor([[1.0, 0.0, 1.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    c = torch.tensor([[0.0, 0.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
    z = group_zscore(r)
    assert torch.allclose(z[0], torch.tensor([1.0, -1.0, 1.0, -1.0])) and bool((z[1] == 0).all())
    a = grpo_advantages(r, c, lam=2.0)
    zc = (c[1] - 0.25) / c[1].std(unbiased=False)
    assert torch.allclose(a[0], z[0])  # no cost variation: reward only
    assert torch.allclose(a[1], -2.0 * zc)  # no reward variation: −λ·Z_C only
    # Components are z-scored before combining: scaling the costs changes nothing.
    assert torch.allclose(grpo_advantages(r, 100 * c, 2.0), a)
    assert not torch.isnan(grpo_advantages(torch.zeros(3, 4), torch.zeros(3, 4), 1.0)).any()
    with pytest.raises(ConstraintError):
        grpo_advantages(r, c[:1], 1.0)


def test_grpo_lagrangian_step_on_the_loop(tmp_path):
    ref = tiny_model("ple6", seed=7)
    policy = make_trainable(copy.deepcopy(ref))
    prompts = token_prompts(4, 3)
    harmful = [True, False, True, False]

    def score(i, text):  # reward on benign prompts: the text has an "a"; cost on harmful: it has no "b"
        return (0.0, float("b" not in text)) if harmful[i] else (float("a" in text), 0.0)

    decode = lambda ids: "".join("ab"[t % 2] for t in ids)
    obj = GRPOLagrangianObjective(policy, ref, prompts, score, decode, constrained=harmful, group_size=4,
                                  prompts_per_step=2, max_new_tokens=5, stop_token_ids=[1],
                                  multiplier=LagrangeMultiplier(threshold=0.0, lr=1.0))
    batch = obj.next_batch()
    assert batch["ids"].shape[0] == 8 and batch["adv"].shape == (8,)
    # Same weights: the ratio is 1, the KL 0; the loss is the mean negative advantage (≈ 0 by z-scoring).
    with torch.no_grad():
        loss, logs = obj.loss(policy, batch)
    assert logs["kl"] == pytest.approx(0.0, abs=1e-6) and logs["clip_frac"] == 0.0
    assert loss.item() == pytest.approx(-float(batch["adv"].mean()), abs=1e-5)
    obj._costs = []
    cfg = TrainConfig(steps=3, lr=1e-3, dtype="float32", plot=False, checkpoints=False)
    Trainer(policy, None, cfg, tmp_path, objective=obj).fit()
    log = read_log(tmp_path / "train_log.jsonl")
    assert len(log) == 3 and all(k in log[0] for k in ("reward", "cost", "lambda", "log_lambda", "kl"))
    with pytest.raises(ConstraintError, match="group_size"):
        GRPOLagrangianObjective(policy, ref, prompts, score, decode, group_size=1)


# ----------------------------------------------------------------------------- cost model
def test_cost_model_loss_signs():
    safe_unsafe = torch.tensor([False, False])
    unsafer = torch.tensor([True, True])
    c_s = torch.zeros(2, requires_grad=True)
    c_u = torch.zeros(2, requires_grad=True)
    loss, logs = cost_model_loss(c_s, c_u, safe_unsafe, unsafer)
    assert loss.item() == pytest.approx(3 * math.log(2))
    loss.backward()
    assert bool((c_s.grad > 0).all()) and bool((c_u.grad < 0).all())  # descent: safe down, unsafe up
    # Both unsafe, at 0: the safer one's sign term (up) and pair term (down) cancel; the unsafer rises.
    c1, c2 = torch.zeros(1, requires_grad=True), torch.zeros(1, requires_grad=True)
    cost_model_loss(c1, c2, torch.tensor([True]), torch.tensor([True]))[0].backward()
    assert c1.grad.item() == pytest.approx(0.0) and c2.grad.item() == pytest.approx(-1.0)


def test_cost_model_fits_toy_set_and_round_trips(tmp_path):
    torch.manual_seed(0)
    cm = CostModel.from_causal_lm(tiny_model("ple6", seed=3)).train()
    g = torch.Generator().manual_seed(0)
    n, t = 16, 6
    base = torch.randint(100, 380, (n, t), generator=g)
    safe, unsafe = base.clone(), base.clone()
    safe[:, -2] = 40  # the safe response carries token 40, the unsafe one token 41, near the end
    unsafe[:, -2] = 41
    mask = torch.ones(n, t, dtype=torch.long)
    mask[::2, -1] = 0  # right padding on half the rows: the cost is read at the last real token
    opt = torch.optim.AdamW(cm.parameters(), lr=3e-3)
    for _ in range(50):
        loss, logs = cost_model_loss(cm(safe, mask), cm(unsafe, mask), torch.zeros(n, dtype=torch.bool),
                                     torch.ones(n, dtype=torch.bool))
        opt.zero_grad()
        loss.backward()
        opt.step()
    cm.eval()
    with torch.no_grad():
        cs, cu = cm(safe, mask), cm(unsafe, mask)
    assert bool((cs < 0).all()) and bool((cu > 0).all()), (cs, cu)  # zero is the boundary
    out = save_cost_model(cm, tmp_path / "cm")
    back = load_cost_model(out)
    with torch.no_grad():
        assert torch.equal(back(safe, mask), cs)
    d = json.loads((out / "config.json").read_text())
    d.pop("cost_model")
    (out / "config.json").write_text(json.dumps(d))
    with pytest.raises(CostModelError, match="not a cost model"):
        load_cost_model(out)
