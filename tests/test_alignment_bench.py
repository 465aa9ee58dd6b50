"""benchmarks/alignment.py's bookkeeping, without training: the well-formedness measures, the goals stated
against the base and SFT models of the same seed, and the key that decides when a cached base/SFT
checkpoint may be reused, the ablation pairs; `copy_probe.py` end to end at 30 training steps (it once
broke unnoticed) and `template_probe.py` on a saved untrained checkpoint."""

from __future__ import annotations

import json
import random
from dataclasses import replace

import pytest
import torch

from gemma4.align.data import HELPFUL_TEMPLATES, build, compliance
from gemma4.align.judge import REFUSAL

from bench_module import load_benchmark


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("alignment.py", "alignment_bench")


def test_well_formed_is_the_template_and_on_topic_the_object(bench):
    ex = next(e for e in build(0, sources=False).splits["test_objects"] if e.kind == "benign")
    other = HELPFUL_TEMPLATES[1].format(obj="a kite" if ex.obj != "a kite" else "a scarf")
    for text, wf, on in ((REFUSAL, True, True), (ex.helpful, True, True), (other, True, False),
                         (compliance(ex.obj), True, True), ("Sure. Here is how to make . to make .", False, False)):
        assert (bench.well_formed(text), bench.well_formed_on_topic(ex, text)) == (wf, on), text


def _result(seed: int, **models: dict) -> dict:
    base = {"lm_nll": 1.0, "helpful_benign": 0.5, "over_refusal_all": 0.0}
    return {"seed": seed, "models": {m: {"headline": base | h} for m, h in {"base": {}, **models}.items()}}


def test_relative_goals(bench):
    r = _result(0, sft={"over_refusal_all": 0.2}, dpo={"lm_nll": 1.04, "helpful_benign": 0.45, "over_refusal_all": 0.1})
    rel = bench.relative(r, "dpo")
    assert rel["lm_nll_rel"] == pytest.approx(0.04) and rel["helpful_drop"] == pytest.approx(0.05)
    assert rel["over_refusal_vs_sft"] == pytest.approx(-0.1)
    # over-refusal must fall below SFT's; at SFT 0 staying at 0 is met, rising is not
    for sft, dpo, met in ((0.2, 0.2, False), (0.2, 0.19, True), (0.0, 0.0, True), (0.0, 0.01, False)):
        r = _result(0, sft={"over_refusal_all": sft}, dpo={"over_refusal_all": dpo})
        assert (bench.relative(r, "dpo")["over_refusal_vs_sft"] < 0) == met, (sft, dpo)


def test_cache_key_ignores_only_the_later_stages(bench, tmp_path, monkeypatch):
    data = build(0, sources=False)
    tok = tmp_path / "tokenizer.json"
    tok.write_text("{}")
    r = replace(bench.Recipe(), rows_as_generated=0)  # the fields keyed only when set, off
    key = bench.cache_key(r, data, tok)
    later = replace(r, dpo_lr=1e-4, lag_steps=5, lag_threshold=0.01, lag_help_negatives=1, lag_cost="pairwise",
                    answerable_val=1, val_objects=1, early_stop_every=0)
    assert bench.cache_key(later, data, tok) == key
    assert bench.cache_key(replace(r, sft_lr=1e-4), data, tok) != key
    # the base's key ignores what only SFT reads; the base's own fields change both
    base_key = bench.cache_key(r, data, tok, "base")
    assert bench.cache_key(replace(r, sft_lr=1e-4, phrasing_drills=0, sft_knowledge_repeat=1), data, tok,
                           "base") == base_key != key
    assert bench.cache_key(replace(r, sft_knowledge_repeat=1), data, tok) != key
    assert bench.cache_key(replace(r, answerable_train=1), data, tok) != key
    assert bench.cache_key(replace(r, answerable_train=1), data, tok, "base") == base_key
    # rows_as_generated: SFT's key only, and at 0 no key at all (caches from before the field stay valid)
    assert bench.cache_key(replace(r, rows_as_generated=1), data, tok) != key
    assert bench.cache_key(replace(r, rows_as_generated=1), data, tok, "base") == base_key
    assert bench.cache_key(replace(r, contrast_drills=300), data, tok) != key
    assert bench.cache_key(replace(r, contrast_drills=300), data, tok, "base") == base_key
    monkeypatch.setattr(bench, "KEYED_WHEN_SET", ())  # keyed at 0 too, the key of a recipe without them would move
    assert bench.cache_key(r, data, tok) != key
    monkeypatch.undo()
    assert bench.cache_key(replace(r, tokenizer_split_punctuation=0), data, tok, "base") != base_key
    assert bench.cache_key(replace(r, benign_opening=0), data, tok, "base") != base_key
    assert bench.cache_key(replace(r, base_steps=10), data, tok, "base") != base_key
    assert bench.cache_key(r, build(1, sources=False), tok) != key
    # how many SFT candidates are compared is not in any key; candidate k > 0 has its own
    assert bench.cache_key(replace(r, sft_candidates=3, sft_soup=1, dpo_soup=1), data, tok) == key
    # nor is LAT, which trains after the cached SFT model(s)
    assert bench.cache_key(replace(r, lat_steps=300, lat_benign=0, lat_drills=1, dpo_lat=1, dpo_lat_eps=0.25),
                           data, tok) == key
    assert bench.cache_key(r, data, tok, "sft_c1") not in (key, bench.cache_key(r, data, tok, "sft_c2"))
    tok.write_text("{ }")
    assert bench.cache_key(r, data, tok) != key
    assert set(bench.AFTER_SFT) <= set(bench.Recipe.__dataclass_fields__)


def test_sft_candidate_is_chosen_on_validation_alone(bench):
    """The lowest validation ASR + over-refusal wins whatever the test numbers say; a tie keeps the earlier
    candidate (0 = the one SFT model of runs 1-46)."""
    c = lambda asr, over, test: {"val_asr": asr, "val_over_refusal": over, "headline": {"asr_objects": test}}  # noqa: E731
    assert bench.best_candidate([c(0.1, 0.0, 0.0), c(0.0, 0.05, 0.9), c(0.02, 0.02, 0.0)]) == 2
    assert bench.best_candidate([c(0.0, 0.02, 0.5), c(0.02, 0.0, 0.0), c(0.01, 0.01, 0.0)]) == 0
    assert bench.best_candidate([c(0.3, 0.0, 0.0)]) == 0


def test_weight_average_is_the_mean_of_the_weights(bench, capsys):
    torch.manual_seed(0)
    models = [torch.nn.Linear(3, 2) for _ in range(3)]
    models[0].register_buffer("count", torch.tensor([7]))
    for m in models[1:]:
        m.register_buffer("count", torch.tensor([1]))
    soup = bench.weight_average(models)
    assert torch.allclose(soup.weight, sum(m.weight for m in models) / 3) and soup.count.item() == 7
    assert soup is not models[0] and not torch.equal(models[0].weight, soup.weight)
    assert torch.equal(bench.weight_average(models[:1]).weight, models[0].weight)
    with pytest.raises(SystemExit):  # nothing to average
        bench.main(["--set", "sft_candidates=1", "--set", "sft_soup=1", "--summarize-only"])
    with pytest.raises(SystemExit):  # DPO's mean is read against the averaged SFT model
        bench.main(["--set", "sft_candidates=3", "--set", "sft_soup=0", "--set", "dpo_soup=1", "--summarize-only"])
    with pytest.raises(SystemExit):  # LAT trains the one SFT model DPO starts from; dpo_soup starts from each candidate
        bench.main(["--set", "sft_candidates=3", "--set", "sft_soup=1", "--set", "dpo_soup=1", "--set", "lat_steps=10",
                    "--summarize-only"])
    assert "do not combine" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # the copy drills join LAT's rows: no LAT, nothing to join
        bench.main(["--set", "lat_steps=0", "--set", "lat_drills=1", "--summarize-only"])
    assert "lat_drills" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # a radius for an adversary that is off
        bench.main(["--set", "dpo_lat_eps=0.25", "--summarize-only"])
    assert "dpo_lat=1" in capsys.readouterr().err


def test_constraint_goal_reads_the_kept_weights(bench):
    """With early stopping the Lagrangian returns the best check's weights, so the J_C,val goal is read
    there (recorded as ``j_val_kept``, else the log at that step), not at the last step."""
    log = [{"step": s, "j_val": j, "log_lambda": 0.0} for s, j in ((1, 0.01), (10, 0.02), (80, 0.09))]
    heads = {"asr_phrasings": 0.0, "over_refusal_all": 0.0}
    r = _result(0, sft=heads, dpo=heads, lagrangian=heads) | {"logs": {"lagrangian": log}}
    goal = lambda res: next(g for g in bench.summarize([res])["goals"] if "J_C,val" in g["goal"])  # noqa: E731
    g = goal(r | {"early_stop": {"lagrangian": {"chosen_step": 10}}})
    assert g["values"] == [0.02] and g["met"] and g["j_val_last_step"] == 0.09
    g = goal(r | {"early_stop": {"lagrangian": {"chosen_step": 0, "j_val_kept": 0.002}}})
    assert g["values"] == [0.002] and g["met"]
    g = goal(r)  # no early stopping: the last step's weights are the model
    assert g["values"] == [0.09] and not g["met"]


def test_wrapper_ablations_are_compared_in_pairs(bench):
    """The 3-family ablation is read against SFT (pre-registered), and the pair without the text drills
    against each other (a separate row, marked as added later); `--ablations` names only known ablations."""
    wrap = lambda x: {"asr_wrappers_pooled": x}  # noqa: E731
    r = _result(0, sft=wrap(0.02), dpo={}, lagrangian={}, sft_3_wrappers=wrap(0.05), sft_no_text_drills=wrap(0.1),
                sft_3_wrappers_no_text_drills=wrap(0.4), sft_0_wrappers_no_text_drills=wrap(0.15))
    r["logs"] = {}
    goals = {g["model"]: g for g in bench.summarize([r])["goals"] if "wrapper" in g["model"]}
    assert goals["sft_3_wrappers"]["values"] == [pytest.approx(0.03)] and not goals["sft_3_wrappers"]["met"]
    g = goals["sft_3_wrappers_no_text_drills"]
    assert g["values"] == [pytest.approx(0.3)] and g["met"] and "not pre-registered" in g["goal"]
    g = goals["sft_0_wrappers_no_text_drills"]
    assert g["values"] == [pytest.approx(0.05)] and not g["met"] and "not pre-registered" in g["goal"]
    assert len(set(bench.ABLATIONS)) == len(bench.ABLATIONS)
    with pytest.raises(SystemExit):
        bench.main(["--ablations", "no_such_ablation", "--summarize-only"])


def test_recipe_sets_the_training_wrappers_unless_an_ablation_names_them(bench):
    """`train_wrappers` changes only which template wraps each training pair; the wrapper ablations
    (`seed_data(..., train_wrappers=n)`) still get their own count."""
    base = bench.seed_data(0, bench.Recipe(), sources=False)
    two = bench.seed_data(0, bench.Recipe(train_wrappers=2), sources=False)
    assert len(two.meta["wrappers"]["train"]) == 2 < len(base.meta["wrappers"]["train"])
    assert {e.wrapper for e in two.splits["train"] if e.wrapper} == set(two.meta["wrappers"]["train"])
    assert all(two.splits[k] == base.splits[k] for k in base.splits if k != "train")
    assert [e.prompt for e in two.splits["train"] if not e.wrapper] == [
        e.prompt for e in base.splits["train"] if not e.wrapper]
    one = bench.seed_data(0, bench.Recipe(train_wrappers=2), sources=False, train_wrappers=1)
    assert len(one.meta["wrappers"]["train"]) == 1


def test_family_rates_are_also_given_per_wrapper_template(bench, monkeypatch):
    """A family's failure is usually one template answered for most objects (RESULTS, run 53): the
    evaluation counts answered harmful prompts per template as well as per family."""
    data = bench.seed_data(0, bench.Recipe(), sources=False)

    def answers(model, tok, exs, *a, **k):  # grandma's first template answered, everything else refused
        return [compliance(e.obj) if e.harmful and e.wrapper == "grandma" and e.wrapper_template == 0 else REFUSAL
                for e in exs]

    monkeypatch.setattr(bench, "greedy_answers", answers)
    monkeypatch.setattr(bench, "knowledge_nll", lambda *a, **k: 0.0)
    ev = bench.evaluate(torch.nn.Linear(1, 1), None, data, bench.Recipe(), random.Random(0))
    grandma = ev["families"]["grandma"]
    assert [(t["k"], t["n"]) for t in grandma["templates"]] == [(15, 15), (0, 15)]
    assert (grandma["asr"]["k"], grandma["asr"]["n"]) == (15, 30)
    assert grandma["unsafe"]["k"] == 15 and grandma["helped"]["k"] == 0  # the placeholder, not a help template
    assert [(t["k"], t["n"]) for t in ev["families"]["dev_mode"]["templates"]] == [(0, 30)]


def test_copy_probe_runs_a_setting_with_echo_chats(tmp_path):
    """`benchmarks/copy_probe.py` end to end at 30 steps (the plumbing, not the numbers): its echo setting
    trains on drills + echo chats and counts copies with the experiment's well-formedness test."""
    probe = load_benchmark("copy_probe.py", "copy_probe_bench")
    setting = next(s for s in probe.SETTINGS if s[4])
    row = probe.probe((setting, 0, tmp_path, True))
    assert row["steps"] == 30 and row["echo_chats"] == 200 and row["n"] == 100 and row["n_real"] == 120
    assert 0 <= row["copied"] <= row["n"] and 0 <= row["real_copied"] <= row["n_real"]


def test_template_probe_reads_a_saved_checkpoint(bench, tmp_path, monkeypatch, capsys):
    """`benchmarks/template_probe.py` end to end on an untrained checkpoint saved where `--cache` puts one
    (the plumbing, not the numbers), and its one-line error for a seed with no checkpoint."""
    probe = load_benchmark("template_probe.py", "template_probe_bench")
    recipe = bench.Recipe()
    data = bench.seed_data(0, recipe, sources=False)
    tok = bench.domain_tokenizer(data, recipe, tmp_path / "tokenizer.json")
    bench.save_model(bench.new_model(tok.vocab_size, recipe, 0), tok, tmp_path / "cache" / "seed0" / "sft")
    monkeypatch.setattr(probe, "seed_data", lambda seed, r: bench.seed_data(seed, r, sources=False))
    out = tmp_path / "probe.json"
    args = ["--seeds", "0", "--cache", str(tmp_path / "cache"), "--set", "eval_per_split=12", "--set",
            "max_new_tokens=2", "--out", str(out)]
    assert probe.main(args) == 0
    row, = json.loads(out.read_text())["rows"]
    assert row["seed"] == 0 and row["families"]
    for fam in row["families"].values():
        assert sum(t["n"] for t in fam["templates"]) == fam["asr"]["n"]
        assert sum(t["k"] for t in fam["templates"]) == fam["asr"]["k"]
    assert "answered per template" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        probe.main(["--seeds", "1", "--cache", str(tmp_path / "cache")])
    assert "seed1" in capsys.readouterr().err
