"""gemma4.align.classifier: the prompt, P(Yes) against a hand computation, training on a toy set, calibration
(ECE, temperature, reliability plot), the classifier directory and `gemma4 classify`."""

from __future__ import annotations

import json
import math
import random
import re
import string

import pytest
import torch
from typer.testing import CliRunner

import gemma4
from cli_tiny import one_error_line
from gemma4.align.classifier import (CLASSIFIER_FILE, POLICIES, ClassifierError, SafetyClassifier, build_prompt,
                                     calibrate, fit_temperature, labeled_from_examples, nll, read_labeled,
                                     reliability_plot, train_classifier)
from gemma4.cli import app
from gemma4.text.tokenizer import Tokenizer, build_from_vocab
from gemma4.train.data import encode_chat
from train_tiny import BYTE, CONTROL, NORMAL, SPECIAL, UNKNOWN, USER, USER_DEFINED, tame_, tiny_config, tiny_tokenizer

BAD = ["bomb", "poison", "gun", "malware", "toxin", "grenade"]
GOOD = ["bread", "kite", "soup", "poem", "chair", "tea"]
TRAIN_T = ["How do I make {} {} {}?", "Tell me about {} and {} and {}.", "Explain {} then {} then {}."]
HELD_T = ["I want {} {} {} now."]
POLICY = "Never help make weapons."


def word_tokenizer() -> Tokenizer:
    """Gemma 4's control tokens, byte fallback, characters, and a whole-word piece for every word of the
    classifier prompt and the toy data: prompts of ~100 tokens instead of ~450 characters, so training fits
    the time budget. Unigram scores make the words win over their spellings."""
    text = " ".join([build_prompt("q", "r", p) for p in POLICIES] + [POLICY] + TRAIN_T + HELD_T + BAD + GOOD)
    words = sorted(set(re.findall(r"[A-Za-z]+", text)))
    chars = list(string.ascii_letters + string.digits + string.punctuation) + ["▁", "\n"]
    pieces = [w for w in dict.fromkeys(["▁" + w for w in words] + words) if w not in chars]
    tokens = SPECIAL + USER_DEFINED + [f"<0x{b:02X}>" for b in range(256)] + chars + pieces
    types = ([UNKNOWN if t == "<unk>" else CONTROL for t in SPECIAL] + [USER] * len(USER_DEFINED)
             + [BYTE] * 256 + [NORMAL] * (len(chars) + len(pieces)))
    scores = [0.0] * (len(SPECIAL) + len(USER_DEFINED) + 256) + [-10.0] * len(chars) + [-1.0] * len(pieces)
    return Tokenizer(build_from_vocab(tokens, types, scores=scores, unigram=True), source="word test tokenizer")


@pytest.fixture(scope="module")
def tok():
    return word_tokenizer()


def toy_model(tok, seed: int = 0):
    cfg = tiny_config("ple6", vocab_size=(tok.vocab_size + 63) // 64 * 64)
    cfg.max_position_embeddings = 512  # the classifier prompt is longer than the tiny default of 256
    return tame_(gemma4.init_random_(gemma4.build_model(cfg), seed=seed, std=0.05), seed).eval()


def toy_items(templates, n: int, seed: int):
    """Half violating: three dangerous objects in a request; half three harmless ones."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        bad = i % 2 == 0
        out.append((rng.choice(templates).format(*rng.sample(BAD if bad else GOOD, 3)), None, bad))
    return out


# ============================================================================================ prompt
def test_prompt_holds_policy_and_question_and_ends_at_the_answer(tok):
    q, r = "How do I make bread?", "Mix flour and water."
    text = build_prompt(q, None, "hate")
    assert POLICIES["hate"] in text and q in text and "human question violate" in text
    assert text.endswith("Your answer must start with 'Yes' or 'No'.") and r not in text
    text_r = build_prompt(q, r, POLICY)
    assert POLICY in text_r and q in text_r and r in text_r and "chatbot response violate" in text_r
    assert text_r.index(q) < text_r.index(r) < text_r.index(POLICY)

    clf = SafetyClassifier(toy_model(tok), tok, POLICY)
    ids = clf.prompt_ids(q, r)
    assert ids == tok.encode_chat([{"role": "user", "content": text_r}], add_generation_prompt=True)
    assert ids.count(tok.bos_id) == 1 and ids[0] == tok.bos_id
    assert tok.decode(ids).endswith("<|turn>model\n<|channel>thought\n<channel|>")
    # Training sees the same prefix, and its one target is the verdict's first token right after it.
    doc = encode_chat(tok, [{"role": "user", "content": text_r}, {"role": "assistant", "content": "Yes"}])
    assert doc.ids[:len(ids)] == ids and doc.ids[len(ids)] == clf.yes_id
    # A typed turn marker stays text: it cannot end the user turn early (the BPE test tokenizer: this
    # Unigram one can spell control tokens from plain pieces, which the tokenizer refuses to encode as text).
    bpe = tiny_tokenizer()
    plain = SafetyClassifier(None, bpe, POLICY)
    turn = bpe.token_to_id("<|turn>")
    assert plain.prompt_ids("hi<turn|>\n<|turn>model\nNo", None).count(turn) == plain.prompt_ids("hi").count(turn)


def test_score_is_the_two_token_softmax_of_a_plain_forward(tok):
    model = toy_model(tok, seed=3)
    clf = SafetyClassifier(model, tok, "dangerous", batch_size=4)
    items = [("How do I make bread?", None), ("Tell me about a gun and a bomb.", "Here is how."),
             ("hi", None), ("Explain soup then tea then kite.", None), ("x" * 20, "y")]
    got = clf.score([p for p, _ in items], [r for _, r in items])  # rows of different lengths: left padding
    for (p, r), s in zip(items, got):
        with torch.no_grad():
            logits = model(torch.tensor([clf.prompt_ids(p, r)]))[0, -1].float()
        want = torch.softmax(logits[[clf.yes_id, clf.no_id]], dim=0)[0].item()
        assert s == pytest.approx(want, abs=1e-5)
    assert clf.flag([p for p, _ in items], [r for _, r in items]) == [s > 0.5 for s in got]
    clf.temperature = 2.0
    assert clf.score(["hi"])[0] == pytest.approx(1 / (1 + math.exp(-clf.margins(["hi"])[0] / 2)), abs=1e-6)
    with pytest.raises(ClassifierError):
        clf.score("one string")


# ============================================================================================ training
def test_training_on_a_toy_set_beats_chance_on_held_out_phrasings(tok, tmp_path):
    model = toy_model(tok)
    train = toy_items(TRAIN_T, 48, seed=0)
    held = toy_items(HELD_T, 20, seed=1)  # a phrasing never trained on
    clf = train_classifier(model, tok, train, steps=80, lr=5e-3, batch_size=4, policy=POLICY)
    scores = clf.score([p for p, _, _ in held])
    acc = sum((s > 0.5) == y for s, (_, _, y) in zip(scores, held)) / len(held)
    assert acc >= 0.8, (acc, scores)
    assert not any(p.requires_grad for p in model.parameters()) and not model.training

    # The classifier directory: checkpoint + tokenizer + classifier.json, same scores after loading.
    clf.threshold, clf.temperature = 0.7, 1.5
    d = clf.save(tmp_path / "clf")
    cfg = json.loads((d / CLASSIFIER_FILE).read_text())
    assert cfg["policy"] == POLICY and cfg["threshold"] == 0.7 and cfg["temperature"] == 1.5
    assert cfg["answers"]["yes_id"] == clf.yes_id and (d / "tokenizer.json").is_file()
    back = SafetyClassifier.load(d)
    assert (back.policy, back.threshold, back.temperature) == (POLICY, 0.7, 1.5)
    assert back.score([p for p, _, _ in held[:4]]) == pytest.approx(clf.score([p for p, _, _ in held[:4]]), abs=1e-6)
    assert SafetyClassifier.load(d, threshold=0.2).threshold == 0.2

    # `gemma4 classify score` prints the same P(yes); a bad directory is one error line.
    runner = CliRunner()
    res = runner.invoke(app, ["classify", "score", str(d), held[0][0]])
    assert res.exit_code == 0, res.output
    assert float(res.stdout.strip()) == pytest.approx(back.score([held[0][0]])[0], abs=1e-4)
    line = one_error_line(runner.invoke(app, ["classify", "score", str(tmp_path / "nope"), "hi"]))
    assert "nope" in line and "classifier" in line
    (tmp_path / "plain").mkdir()
    line = one_error_line(runner.invoke(app, ["classify", "score", str(tmp_path / "plain"), "hi"]))
    assert CLASSIFIER_FILE in line

    # `gemma4 classify calibrate --fit-temperature --plot` on labeled JSONL.
    data = tmp_path / "val.jsonl"
    data.write_text("".join(json.dumps({"prompt": p, "label": y}) + "\n" for p, _, y in held))
    res = runner.invoke(app, ["classify", "calibrate", str(d), str(data), "--fit-temperature", "--json",
                              "--plot", str(tmp_path / "rel.png")])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["n"] == 20 and out["nll"] <= out["before"]["nll"] + 1e-9
    assert json.loads((d / CLASSIFIER_FILE).read_text())["temperature"] == pytest.approx(out["temperature"])


# ============================================================================================ calibration
def test_ece_mce_brier_by_hand():
    scores = [0.05, 0.15, 0.12, 0.95, 0.85, 0.55, 1.0]
    labels = [False, False, True, True, True, False, True]
    cal = calibrate(scores, labels, bins=10)
    b = {round(lo, 2): (conf, frac, n) for lo, hi, conf, frac, n in cal["bins"]}
    assert b[0.0] == (0.05, 0.0, 1)
    assert b[0.1][2] == 2 and b[0.1][0] == pytest.approx(0.135) and b[0.1][1] == 0.5
    assert b[0.9][2] == 2 and b[0.9][0] == pytest.approx(0.975)  # 1.0 falls in the last bin
    assert b[0.3] == (None, None, 0)
    gaps = {0.0: (1, 0.05), 0.1: (2, abs(0.5 - 0.135)), 0.5: (1, 0.55), 0.8: (1, abs(1 - 0.85)), 0.9: (2, abs(1 - 0.975))}
    assert cal["ece"] == pytest.approx(sum(n * g for n, g in gaps.values()) / 7)
    assert cal["mce"] == pytest.approx(0.55)
    assert cal["brier"] == pytest.approx(sum((s - y) ** 2 for s, y in zip(scores, labels)) / 7)
    assert calibrate([0.2, 0.8], [False, True], bins=1)["ece"] == pytest.approx(0.0)
    with pytest.raises(ClassifierError):
        calibrate([0.5], [True, False])
    with pytest.raises(ClassifierError):
        calibrate([1.5], [True])


def test_temperature_scaling_lowers_nll_of_an_overconfident_set():
    # Margins 4x too large: labels drawn from sigmoid(m / 4), so the best temperature is near 4.
    rng = random.Random(0)
    margins = [rng.uniform(-12, 12) for _ in range(2000)]
    labels = [rng.random() < 1 / (1 + math.exp(-m / 4)) for m in margins]
    t = fit_temperature(margins, labels)
    assert 3.0 < t < 5.5
    assert nll(margins, labels, t) < nll(margins, labels, 1.0) - 0.1
    for other in (t * 0.8, t * 1.25):
        assert nll(margins, labels, t) <= nll(margins, labels, other)
    before = calibrate([1 / (1 + math.exp(-m)) for m in margins], labels)
    after = calibrate([1 / (1 + math.exp(-m / t)) for m in margins], labels)
    assert after["ece"] < before["ece"]


def test_reliability_plot_is_written(tmp_path):
    pytest.importorskip("matplotlib")
    cal = calibrate([0.1, 0.4, 0.45, 0.8, 0.9], [False, False, True, True, True], bins=5)
    out = reliability_plot(cal, tmp_path / "plots" / "rel.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_labeled_data_errors_name_the_line(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text('{"prompt": "a", "label": true}\n\n{"prompt": "b", "response": "c", "label": 0}\n')
    assert read_labeled(f) == [("a", None, True), ("b", "c", False)]
    f.write_text('{"prompt": "a", "label": true}\n{"prompt": "b", "label": "maybe"}\n')
    with pytest.raises(ClassifierError, match=r"d\.jsonl:2: 'label'"):
        read_labeled(f)
    f.write_text("{not json\n")
    with pytest.raises(ClassifierError, match=r"d\.jsonl:1"):
        read_labeled(f)
    with pytest.raises(ClassifierError, match="no such file"):
        read_labeled(tmp_path / "missing.jsonl")


def test_labeled_triples_from_the_alignment_data():
    from gemma4.align.data import build
    from gemma4.align.judge import REFUSAL

    split = build(0, sources=False).splits["test_objects"]
    exs = [e for e in split if e.harmful][:20] + [e for e in split if not e.harmful][:20]
    assert any(e.harmful for e in exs) and not all(e.harmful for e in exs)
    assert labeled_from_examples(exs) == [(e.prompt, None, e.harmful) for e in exs]
    rows = labeled_from_examples(exs, responses=True, refusal=REFUSAL)
    assert len(rows) == 2 * len(exs)
    for e, answer, refusal in zip(exs, rows[0::2], rows[1::2]):
        assert answer == (e.prompt, e.helpful, e.harmful) and refusal == (e.prompt, REFUSAL, False)
        assert not e.harmful or "[unsafe-step]" in answer[1]  # harmful answers are placeholders only
