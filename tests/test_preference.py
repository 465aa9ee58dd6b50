"""Preference objectives: response log-probs (values and gradients against a full-logits reference), the
DPO loss family against hand-written formulas, metrics, and the Trainer driven by a custom objective."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from gemma4.train import make_trainable
from gemma4.train.data import encode_text, pack
from gemma4.train.loop import TrainConfig, TrainError, Trainer, read_log
from gemma4.train.preference import (DPOObjective, Pairs, PreferenceError, Responses, dpo_step,
                                     precompute_reference, preference_loss, sequence_logprobs, token_logprobs)
from train_tiny import tiny_model, tiny_tokenizer


def _rows(seed=0, n=4, vocab=384):
    g = torch.Generator().manual_seed(seed)
    rows, masks = [], []
    for i in range(n):
        p, r = 3 + i % 3, 2 + (i * 2) % 5  # prompt and response lengths differ per row
        rows.append(torch.randint(3, vocab, (p + r,), generator=g).tolist())
        masks.append([False] * p + [True] * r)
    return Responses.from_lists(rows, masks, pad_id=0)


def _naive(model, r: Responses):
    """Full logits, log_softmax, gather, mask, one row at a time (no padding in sight)."""
    out = []
    for i in range(len(r)):
        n = int(r.lengths[i])
        ids = r.input_ids[i : i + 1, :n]
        lp = torch.log_softmax(model(ids).float(), -1)[0, :-1].gather(1, ids[0, 1:, None])[:, 0]
        out.append((lp * r.response_mask[i, 1:n].float()).sum())
    return torch.stack(out)


def test_sequence_logprobs_values_and_gradients_match_full_logits():
    model = make_trainable(tiny_model("ple", seed=1))
    r = _rows()
    # chunk=3 forces several head chunks (and checkpoint recomputation) inside one batch.
    lp, ntok = sequence_logprobs(model, r.input_ids, r.response_mask, chunk=3)
    assert ntok.tolist() == r.response_mask.sum(1).tolist()
    w = torch.tensor([1.0, -2.0, 0.5, 3.0])
    (lp * w).sum().backward()
    ours = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    ref = _naive(model, r)
    (ref * w).sum().backward()
    assert torch.allclose(lp.detach(), ref.detach(), atol=1e-5, rtol=1e-5)
    for k, p in model.named_parameters():
        if p.grad is None:
            continue
        rel = ((ours[k] - p.grad).norm() / p.grad.norm().clamp_min(1e-12)).item()
        assert rel < 1e-4, (k, rel)


def test_token_logprobs_zero_outside_response_and_softcap_applied():
    model = tiny_model("dense", seed=0)
    model.config.final_logit_softcapping = 0.5  # a cap that binds on this toy's small logits
    r = _rows(seed=3)
    with torch.no_grad():
        tl = token_logprobs(model, r.input_ids, r.response_mask)
        capped = _naive(model, r)
        model.config.final_logit_softcapping = None
        plain = _naive(model, r)
    assert bool((tl[~r.response_mask] == 0).all()) and bool((tl[r.response_mask] < 0).all())
    assert torch.allclose(tl.sum(1), capped, atol=1e-5)
    assert not torch.allclose(tl.sum(1), plain, atol=1e-2)


def test_responses_reject_bad_masks():
    with pytest.raises(PreferenceError, match="first token"):
        Responses.from_lists([[5, 6, 7]], [[True, True, True]])
    with pytest.raises(PreferenceError, match="no response token"):
        Responses.from_lists([[5, 6, 7]], [[False, False, False]])


def _lps():
    pc = torch.tensor([-3.0, -5.0, -2.0, -7.0])
    pr = torch.tensor([-4.0, -4.5, -6.0, -7.5])
    rc = torch.tensor([-3.5, -5.0, -3.0, -6.0])
    rr = torch.tensor([-3.5, -4.0, -5.0, -8.0])
    return pc, pr, rc, rr


def _sig(x):
    return 1.0 / (1.0 + math.exp(-x))


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "hinge", "robust", "simpo"])
@pytest.mark.parametrize("eps", [0.0, 0.2])
def test_preference_loss_matches_formulas(loss_type, eps):
    pc, pr, rc, rr = _lps()
    beta, gamma = 0.3, 0.4
    nc, nr = torch.tensor([2, 3, 4, 5]), torch.tensor([3, 3, 2, 6])
    if eps and loss_type in ("ipo", "hinge", "simpo"):  # no smoothed form: refused, never ignored
        with pytest.raises(PreferenceError, match="label_smoothing applies"):
            preference_loss(pc, pr, rc, rr, beta=beta, loss_type=loss_type, label_smoothing=eps,
                            chosen_tokens=nc, rejected_tokens=nr)
        return
    loss, cr, rj = preference_loss(pc, pr, rc, rr, beta=beta, loss_type=loss_type, label_smoothing=eps,
                                   chosen_tokens=nc, rejected_tokens=nr, simpo_gamma=gamma)
    for i in range(4):
        z = (pc[i] - rc[i] - (pr[i] - rr[i])).item()
        if loss_type == "sigmoid":
            want = -(1 - eps) * math.log(_sig(beta * z)) - eps * math.log(_sig(-beta * z))
        elif loss_type == "ipo":
            want = (z - 1 / (2 * beta)) ** 2
        elif loss_type == "hinge":
            want = max(0.0, 1 - beta * z)
        elif loss_type == "robust":
            want = (-(1 - eps) * math.log(_sig(beta * z)) + eps * math.log(_sig(-beta * z))) / (1 - 2 * eps)
        else:
            want = -math.log(_sig(beta * (pc[i].item() / nc[i].item() - pr[i].item() / nr[i].item()) - gamma))
        assert loss[i].item() == pytest.approx(want, rel=1e-5, abs=1e-6), (loss_type, i)
    if loss_type != "simpo":
        assert torch.allclose(cr, beta * (pc - rc)) and torch.allclose(rj, beta * (pr - rr))


def test_preference_loss_rejects_bad_settings():
    pc, pr, rc, rr = _lps()
    with pytest.raises(PreferenceError, match="loss_type"):
        preference_loss(pc, pr, rc, rr, loss_type="kto")
    with pytest.raises(PreferenceError, match="label_smoothing"):
        preference_loss(pc, pr, rc, rr, label_smoothing=0.5)
    with pytest.raises(PreferenceError, match="reference"):
        preference_loss(pc, pr, None, None)
    with pytest.raises(PreferenceError, match="simpo"):
        preference_loss(pc, pr, None, None, loss_type="simpo")


def _pairs(n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(3, 384, (4 + i % 3,), generator=g).tolist() for i in range(n)]
    good = [p + [50, 51, 52, 1] for p in prompts]
    bad = [p + [90, 91, 1] for p in prompts]
    mk = lambda rows, plens: Responses.from_lists(rows, [[False] * k + [True] * (len(r) - k)
                                                          for r, k in zip(rows, plens)])
    plens = [len(p) for p in prompts]
    return Pairs(mk(good, plens), mk(bad, plens))


def test_dpo_step_metrics_and_reward_accuracy():
    model = tiny_model("ple", seed=0)
    pairs = precompute_reference(model, _pairs())
    # Policy == reference: every implicit reward is 0, the loss is log 2, no pair is "won".
    with torch.no_grad():
        loss, logs = dpo_step(model, pairs, beta=0.1, alpha=0.0)
    assert loss.item() == pytest.approx(math.log(2), abs=1e-5)
    assert logs["reward_acc"] == 0.0 and abs(logs["reward_margin"]) < 1e-5
    # Shift the reference: rows where ref_rejected went up by more than ref_chosen count as won.
    shifted = Pairs(pairs.chosen, pairs.rejected, pairs.ref_chosen - torch.tensor([1., 1, 1, -1, -1, -1]),
                    pairs.ref_rejected)
    with torch.no_grad():
        _, logs = dpo_step(model, shifted, beta=0.1, alpha=1.0)
    assert logs["reward_acc"] == pytest.approx(0.5)
    assert logs["nll_chosen"] > 0 and logs["logp_chosen"] < 0


def test_trainer_driven_by_dpo_objective_logs_fields_and_raises_margin(tmp_path):
    ref = tiny_model("ple6", seed=4)
    policy = make_trainable(tiny_model("ple6", seed=4))
    pairs = precompute_reference(ref, _pairs(8))
    obj = DPOObjective(pairs, beta=0.5, alpha=0.1, batch_size=4)
    cfg = TrainConfig(steps=8, lr=3e-3, dtype="float32", plot=False, checkpoints=False)
    res = Trainer(policy, None, cfg, tmp_path, objective=obj).fit()
    log = read_log(tmp_path / "train_log.jsonl")
    assert len(log) == 8 and not (tmp_path / "checkpoints").exists()
    for k in ("loss", "lr", "grad_norm", "reward_acc", "reward_margin", "logp_chosen", "logp_rejected", "nll_chosen"):
        assert k in log[0], k
    assert log[-1]["reward_margin"] > log[0]["reward_margin"] + 0.1
    assert res.history[-1]["loss"] < log[0]["loss"]


class _Counting:
    """A custom objective: plain response NLL, with an after_step hook and a state."""

    def __init__(self, rows):
        self.rows, self.after, self.n = rows, [], 0

    def next_batch(self):
        self.n += 1
        return self.rows

    def loss(self, model, batch):
        lp, nt = sequence_logprobs(model, batch.input_ids, batch.response_mask)
        return -lp.sum() / nt.sum(), {"custom": 1.5, "tokens": 10}

    def after_step(self, model, step, rec):
        self.after.append((step, rec["custom"]))
        return {"dual": step * 2.0}

    def state(self):
        return {"n": self.n}

    def load_state(self, st):
        self.n = st["n"]


def test_custom_objective_hooks_accumulation_and_checkpoint_state(tmp_path):
    obj = _Counting(_rows())
    cfg = TrainConfig(steps=3, lr=1e-3, dtype="float32", plot=False, grad_accum=2)
    res = Trainer(make_trainable(tiny_model("ple6")), None, cfg, tmp_path, objective=obj).fit()
    assert obj.n == 6 and obj.after == [(1, 1.5), (2, 1.5), (3, 1.5)]
    log = read_log(tmp_path / "train_log.jsonl")
    assert [r["dual"] for r in log] == [2.0, 4.0, 6.0] and [r["tokens"] for r in log] == [20, 20, 20]
    st = json.loads((tmp_path / "checkpoints" / "step-000003" / "state.json").read_text())
    assert st["data"] == {"n": 6}
    assert res.steps == 3


def test_lm_path_unchanged_and_objective_checks(tmp_path):
    """The packed next-token path gives the same records with or without the objective code present
    (its fields and values are those of a run through the public loss)."""
    tok = tiny_tokenizer()
    data = pack([encode_text(tok, "the and of to " * (1 + i % 3) + str(i)) for i in range(16)], 16)
    cfg = TrainConfig(steps=2, lr=1e-3, dtype="float32", plot=False, batch_size=2, seed=0)
    hist = Trainer(make_trainable(tiny_model("ple6", seed=2)), data, cfg, tmp_path / "a").fit().history
    assert set(hist[0]) == {"step", "loss", "lr", "grad_norm", "tokens", "tokens_total", "epoch", "elapsed_s",
                            "tok_per_s", "eta_s"}
    from gemma4.train import causal_lm_loss
    from gemma4.train.data import BatchStream
    m = make_trainable(tiny_model("ple6", seed=2))
    b = BatchStream(data, 2, seed=0).next()
    want = causal_lm_loss(m, b["input_ids"], b["labels"], position_ids=b["position_ids"],
                          segment_ids=b["segment_ids"]).item()
    assert hist[0]["loss"] == pytest.approx(want, rel=1e-6)
    with pytest.raises(TrainError, match="no training data"):
        Trainer(m, None, cfg, tmp_path / "b")
