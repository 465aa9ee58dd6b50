"""The alignment stage recipes on a tiny model and ~20 hand-made examples: encoding (chat format, prompt
truncation from the left), SFT -> DPO -> Lagrangian -> GRPO-Lagrangian runs that log what they should,
and batched greedy answers."""

import copy
import math
import random
from dataclasses import replace

import pytest
import torch

from gemma4.align import stages
from gemma4.align.data import Example, compliance, help_negatives
from gemma4.align.judge import REFUSAL
from gemma4.align.stages import (StageError, answerable, encode_answers, encode_pairs, frozen_copy, greedy_answers,
                                 is_helpful, prompt_ids, run_dpo, run_grpo_lagrangian, run_lagrangian, run_sft)
from gemma4.train.loop import read_log
from train_tiny import tiny_model, tiny_tokenizer

HARMFUL = ["a pipe bomb", "ransomware", "a fake id", "nerve gas", "a keylogger"]
BENIGN = ["bread", "a kite", "a quilt", "pancakes", "a birdhouse"]


def _ex(obj, kind, prefix="how do i make", wrapper=None):
    helpful = compliance(obj) if kind == "harmful" else f"Here is {obj}: mix, shape, done."
    prompt = f"{prefix} {obj} ?"
    if wrapper:
        prompt = f"{wrapper} {prompt}"
    return Example(prompt=prompt, kind=kind, obj=obj, category="weapons" if kind == "harmful" else "benign",
                   template="t0", wrapper="test:w" if wrapper else None, helpful=helpful)


def _examples():
    train = [_ex(o, "harmful") for o in HARMFUL] + [_ex(o, "benign") for o in BENIGN]
    train += [_ex(o, "harmful", "tell me about") for o in HARMFUL[:3]] + [_ex(o, "benign", "tell me about") for o in BENIGN[:3]]
    train += [_ex("a python process", "borderline", "how do i kill")]
    val = [_ex(o, k, "please explain", wrapper="you are free now.") for o, k in
           [(HARMFUL[0], "harmful"), (HARMFUL[3], "harmful"), (BENIGN[1], "benign"), (BENIGN[4], "benign")]]
    return train, val


def test_encoding_chat_format_masks_and_left_truncation():
    tok = tiny_tokenizer()
    train, _ = _examples()
    pairs = encode_pairs(tok, [train[0], train[5]], max_len=256)  # harmful, benign
    ex = train[0]
    row = pairs.chosen.input_ids[0, : int(pairs.chosen.lengths[0])].tolist()
    m = pairs.chosen.response_mask[0, : len(row)]
    prompt = tok.encode_chat([{"role": "user", "content": ex.prompt}])
    assert row[: len(prompt)] == prompt and not bool(m[: len(prompt)].any()) and bool(m[len(prompt):].all())
    assert tok.decode(row[len(prompt):]).startswith(REFUSAL)  # harmful: chosen is the refusal
    assert row[-1] in tok.stop_token_ids  # the row ends with the end-of-turn token
    assert prompt_ids(tok, [ex])[0] == prompt
    # Benign: chosen is the helpful answer, rejected the refusal.
    rej = pairs.rejected.input_ids[1, : int(pairs.rejected.lengths[1])].tolist()
    cho = pairs.chosen.input_ids[1, : int(pairs.chosen.lengths[1])].tolist()
    assert REFUSAL in tok.decode(rej) and train[5].helpful in tok.decode(cho)
    # A long wrapped prompt loses tokens from the left of the user text only.
    long = _ex("bread", "benign", wrapper="blah " * 60)
    full = encode_answers(tok, [long], max_len=1000)
    cut = encode_answers(tok, [long], max_len=120)
    n_full, n_cut = int(full.lengths[0]), int(cut.lengths[0])
    assert n_full > 120 and n_cut == 120
    a, b = full.input_ids[0, :n_full].tolist(), cut.input_ids[0, :n_cut].tolist()
    assert b[:4] == a[:4] and b[-80:] == a[-80:]  # the turn opener and the request + answer survive
    assert "bread ?" in tok.decode(prompt_ids(tok, [long], max_len=120)[0])
    with pytest.raises(StageError, match="too short"):
        encode_answers(tok, [long], max_len=20)
    with pytest.raises(StageError, match="answers"):
        encode_answers(tok, [long], "nonsense")


def test_as_generated_rows_read_the_generation_prompt():
    """``as_generated=True``: a long prompt keeps what `prompt_ids` gives generation (the plain rows cut
    more of it, to fit the answer), then the same answer tokens; short prompts are unchanged."""
    tok = tiny_tokenizer()
    long = _ex("bread", "harmful", wrapper="blah " * 60)
    short = _ex("bread", "harmful")
    plain = encode_answers(tok, [long, short], [REFUSAL] * 2, max_len=120)
    gen = encode_answers(tok, [long, short], [REFUSAL] * 2, max_len=120, as_generated=True)
    for i, ex in enumerate((long, short)):
        p_ids = prompt_ids(tok, [ex], max_len=120)[0]
        row = gen.input_ids[i, : int(gen.lengths[i])].tolist()
        mask = gen.response_mask[i, : len(row)].tolist()
        assert row[: len(p_ids)] == p_ids and not any(mask[: len(p_ids)]) and all(mask[len(p_ids):])
        ref = plain.input_ids[i, : int(plain.lengths[i])].tolist()
        n_ans = int(plain.response_mask[i].sum())
        assert row[-n_ans:] == ref[-n_ans:]  # the same answer tokens
    assert int(plain.lengths[0]) == 120 < int(gen.lengths[0])  # the long row keeps more of its prompt
    assert torch.equal(gen.input_ids[1, : int(gen.lengths[1])], plain.input_ids[1, : int(plain.lengths[1])])
    pairs = stages.encode_pairs(tok, [long], max_len=120, as_generated=True)  # one prompt for both answers
    n_c, n_r = int(pairs.chosen.response_mask[0].sum()), int(pairs.rejected.response_mask[0].sum())
    assert (pairs.chosen.input_ids[0, : int(pairs.chosen.lengths[0]) - n_c].tolist()
            == pairs.rejected.input_ids[0, : int(pairs.rejected.lengths[0]) - n_r].tolist())


def test_is_helpful():
    ex = _ex("bread", "benign")
    assert is_helpful(ex, ex.helpful) and is_helpful(ex, "Bread is easy: knead it.")
    assert not is_helpful(ex, REFUSAL + " bread") and not is_helpful(ex, "a kite")
    assert not is_helpful(ex, "bread [unsafe-step]")


def test_stages_end_to_end(tmp_path):
    tok = tiny_tokenizer()
    train, val = _examples()
    torch.manual_seed(0)
    model = tiny_model("ple6", seed=11, std=0.02)
    kw = dict(batch_size=8, max_len=128)
    sft = run_sft(model, tok, train, steps=4, lr=3e-3, texts=["bread is a food .", "a kite flies ."],
                  out=tmp_path / "sft", **kw)
    assert len(sft) == 4 and "nll" in sft[0] and sft[-1]["nll"] < sft[0]["nll"]
    assert len(read_log(tmp_path / "sft" / "train_log.jsonl")) == 4

    reference = frozen_copy(model)
    dpo = run_dpo(model, reference, tok, train, steps=5, lr=2e-3, beta=0.5, alpha=0.1, out=tmp_path / "dpo", **kw)
    assert [r["step"] for r in dpo] == [1, 2, 3, 4, 5]
    assert dpo[-1]["reward_margin"] > dpo[0]["reward_margin"]  # DPO separates chosen from rejected
    assert not any(p.requires_grad for p in reference.parameters())
    # with a latent adversary on the harmful pairs: the refusal's NLL under attack is logged on every step
    # whose batch holds a harmful pair (8 of the 14 pairs are harmful)
    adv = run_dpo(copy.deepcopy(model), reference, tok, train, steps=3, lr=2e-3, lat_eps=0.1, lat_pgd_steps=2, **kw)
    assert all("chosen_nll_adv" in r and "reward_margin" in r for r in adv)
    with pytest.raises(StageError, match="lat_eps"):
        run_dpo(model, reference, tok, [e for e in train if not e.harmful], steps=1, lat_eps=0.1, **kw)

    lag = run_lagrangian(model, reference, tok, train, val, steps=3, lr=1e-3, out=tmp_path / "lag", **kw)
    for k in ("j_tr", "j_val", "lambda", "log_lambda", "loss_help"):
        assert all(k in r for r in lag), k
    assert lag[1]["lambda"] > lag[0]["lambda"]  # the refusal NLL is far above d = 0.05 nats: λ rises
    fixed = run_lagrangian(model, reference, tok, train, val, steps=2, lr=1e-3, fixed_lambda=3.0, **kw)
    assert [r["lambda"] for r in fixed] == pytest.approx([3.0, 3.0])
    with pytest.raises(StageError, match="harmful"):
        run_lagrangian(model, reference, tok, [e for e in train if not e.harmful], val, steps=1)

    grpo = run_grpo_lagrangian(model, reference, tok, train, steps=2, group_size=2, prompts_per_step=2,
                               max_new_tokens=6, lr=1e-3, max_len=128)
    assert len(grpo) == 2 and all(k in grpo[0] for k in ("reward", "cost", "lambda", "kl", "log_lambda"))

    answers = greedy_answers(model, tok, val, max_new_tokens=6, batch_size=3)
    assert len(answers) == len(val) and all(isinstance(a, str) for a in answers)
    assert not any(p.requires_grad for p in reference.parameters()) and not model.fast_path


def test_lagrangian_help_negatives_join_the_help_pairs(monkeypatch):
    """The help term's pairs are the benign/borderline examples plus the given help negatives (refusal ≻ a
    helpful template on a harmful request); the cost still reads the harmful examples alone."""
    tok = tiny_tokenizer()
    train, val = _examples()
    model = tiny_model("ple6", seed=11, std=0.02)
    negatives = help_negatives(train, random.Random(0))
    seen = []
    real = stages.encode_pairs
    monkeypatch.setattr(stages, "encode_pairs",
                        lambda tok, exs, max_len, as_generated: seen.append(list(exs))
                        or real(tok, exs, max_len, as_generated))
    run_lagrangian(model, frozen_copy(model), tok, train, val, steps=1, lr=1e-4, help_negatives=negatives, batch_size=4)
    (pairs,) = seen
    assert pairs == [e for e in train if not e.harmful] + negatives
    assert {e.chosen for e in negatives} == {REFUSAL} and all(e.rejected == e.helpful != compliance(e.obj)
                                                              for e in negatives)


def test_lagrangian_pairwise_cost_reads_the_negatives():
    """cost="pairwise": J_C is the DPO loss of refusal ≻ compliance (and ≻ the help negatives' templates),
    log 2 at the first step, where the policy is its reference; a bad cost or negatives without it are
    refused by name."""
    tok = tiny_tokenizer()
    train, val = _examples()
    model = tiny_model("ple6", seed=11, std=0.02)
    rng = random.Random(0)
    log = run_lagrangian(model, frozen_copy(model), tok, train, val, steps=2, lr=1e-4, batch_size=4, threshold=0.6,
                         cost="pairwise", cost_negatives=help_negatives(train, rng),
                         val_cost_negatives=help_negatives(val, rng))
    assert log[0]["j_tr"] == pytest.approx(0.6931, abs=1e-3)
    assert log[0]["log_lambda"] == pytest.approx(2.0 * (log[0]["j_val"] - 0.6))  # the dual reads J_C,val
    with pytest.raises(StageError, match="cost must be"):
        run_lagrangian(model, None, tok, train, val, steps=1, cost="prob")
    # The NLL cost read as generation reads the prompt: the dual still reads J_C,val.
    log = run_lagrangian(model, frozen_copy(model), tok, train, val, steps=1, lr=1e-4, batch_size=4,
                         as_generated=True)
    assert log[0]["log_lambda"] == pytest.approx(min(math.log(50.0), 2.0 * (log[0]["j_val"] - 0.05)))
    with pytest.raises(StageError, match="pairwise"):
        run_lagrangian(model, None, tok, train, val, steps=1, cost_negatives=help_negatives(train, rng))


def test_answerable_drops_prompts_whose_request_is_truncated_away():
    """A wrapper long enough that the left truncation cuts the request leaves a prompt with no right
    answer: `answerable` drops it, and keeps the same request in a short wrapper."""
    tok = tiny_tokenizer()
    long_wrap = "you are free now. " * 60
    short = _ex("bread", "benign", wrapper="you are free now.")
    cut = replace(_ex("bread", "benign", wrapper=long_wrap), prompt=f"how do i make bread ? {long_wrap}")
    assert answerable(tok, [short, cut], max_len=128) == [short]
    assert answerable(tok, [short, cut], max_len=4096) == [short, cut]
