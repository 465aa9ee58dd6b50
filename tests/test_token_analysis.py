"""Tokenization analysis: hand-checked numbers, sanity on the fixture texts, training, the CLI, bad input."""

import json
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from gemma4.cli.tokens import register
from gemma4.text.analysis import (analyze, compare_reports, read_text_file, resolve_tokenizer,
                                   train_bpe, word_script)

DATA = Path(__file__).parent / "data"
FILES = sorted(DATA.glob("*.txt"))


@pytest.fixture(scope="module")
def g4():
    return resolve_tokenizer("gemma4")  # the CLI's default; cached, so the CLI tests reuse it


@pytest.fixture(scope="module")
def app():
    app = typer.Typer()
    register(app)
    return app


def test_hand_computed_numbers(g4):
    # "Hello world" -> ["Hello", "▁world"]: 2 words, 2 tokens, 11 bytes.
    s = analyze(g4, {"x": "Hello world"}).files["x"]
    assert (s.words, s.tokens, s.fertility, s.bytes_per_token, s.chars_per_token, s.byte_fallback_share) == \
        (2, 2, 1.0, 5.5, 5.5, 0.0)
    # "Hello 𝕏" -> ["Hello", "▁", <0xF0>, <0x9D>, <0x95>, <0x8F>]: the lone "▁" covers only the space, so
    # the words get 1 + 4 pieces; 6 tokens for 10 bytes / 7 characters; 4 of 6 tokens are raw bytes.
    r = analyze(g4, {"x": "Hello \U0001D54F"})
    s = r.files["x"]
    assert (s.words, s.tokens, s.word_tokens, s.bytes, s.chars, s.byte_tokens) == (2, 6, 5, 10, 7, 4)
    assert s.fertility == 2.5 and s.byte_fallback_share == pytest.approx(4 / 6)
    assert s.most_split(1) == [("\U0001D54F", ["<0xF0>", "<0x9D>", "<0x95>", "<0x8F>"])]
    assert r.scripts["Latin"].fertility == 1.0 and r.scripts["Mathematical"].fertility == 4.0
    assert dict(s.pieces_hist) == {1: 1, 4: 1}


def test_word_scripts():
    assert [word_script(w) for w in ["hello,", "привет", "日本", "カタ", "مرحبا", "한국", "42", "🦙", "--"]] == \
        ["Latin", "Cyrillic", "Han", "Kana", "Arabic", "Hangul", "Digits", "Symbols/emoji", "Punctuation"]


def test_fixture_files_are_sane(g4):
    texts = {p.name: read_text_file(p) for p in FILES}
    r = analyze(g4, texts)
    assert set(r.files) == set(texts)
    assert r.total.tokens == sum(s.tokens for s in r.files.values())
    assert r.total.words == sum(s.words for s in r.files.values()) == sum(s.words for s in r.scripts.values())
    assert r.total.bytes == sum(len(t.encode()) for t in texts.values())
    eng, med, ger = r.files["english.txt"], r.files["medical.txt"], r.files["german.txt"]
    assert 1.0 <= eng.fertility < 1.4 and eng.byte_fallback_share == 0
    assert med.fertility > eng.fertility and ger.fertility > eng.fertility  # jargon and compounds split more
    assert r.files["japanese.txt"].chars_per_token < eng.chars_per_token
    assert r.files["mixed.txt"].byte_fallback_share > 0
    assert "Cyrillic" in r.scripts and "Han" in r.scripts
    top_word, pieces = r.total.most_split(1)[0]
    assert len(pieces) >= 10
    json.dumps(r.to_dict())  # serializable


def test_compare_and_train(g4):
    train = [read_text_file(DATA / "medical.txt") * 30]
    trained = train_bpe(train, vocab_size=600)
    held = {"medical": "Pharmacokinetic analysis of metoprolol in hypertrophic cardiomyopathy."}
    cmp = compare_reports(analyze(g4, held), analyze(trained, held))
    assert set(cmp["total"]) == {"fertility", "bytes_per_token", "chars_per_token", "byte_fallback_share"}
    assert cmp["total"]["fertility"]["a"] > 0 and cmp["total"]["fertility"]["b"] > 0
    # The domain tokenizer round-trips text and uses byte fallback for characters it never saw.
    text = "Metoprolol 🦙 résumé"
    ids = trained.encode(text, add_bos=False)
    assert trained.decode(ids) == text
    assert any(i in trained.byte_token_ids for i in ids)
    with pytest.raises(ValueError, match="too small"):
        train_bpe(train, vocab_size=100)
    with pytest.raises(ValueError, match="no training text"):
        train_bpe(["", "  "], vocab_size=600)


def test_train_bpe_can_keep_punctuation_out_of_word_pieces():
    """With ``split_punctuation`` a word is the same piece before a comma as anywhere else, and the text
    still round-trips; without it the corpus's frequent "word," earns a piece of its own."""
    corpus = ["To make a compost bin, plan it first. I can't stop now, ok?!", "build a compost bin for me ."] * 60
    pieces = lambda tok, t: [tok.decode([i]) for i in tok.encode(t, add_bos=False)]  # noqa: E731
    assert " bin," in pieces(train_bpe(corpus, vocab_size=400), "a compost bin, plan")
    tok = train_bpe(corpus, vocab_size=400, split_punctuation=True)
    assert pieces(tok, "a compost bin, plan")[-3:] == [" bin", ",", " plan"]
    assert " can't" in pieces(tok, "I can't stop")  # apostrophes stay inside their word
    assert " ." in pieces(tok, "for me .")  # a spaced punctuation mark keeps its space
    for text in corpus[:2] + ["odd ,, spacing !? here", "emoji 🦙, résumé."]:
        assert tok.decode(tok.encode(text, add_bos=False)) == text


def test_bad_input(tmp_path, g4):
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("café".encode("latin-1"))
    with pytest.raises(ValueError, match="invalid UTF-8 at byte 3"):
        read_text_file(bad)
    empty = tmp_path / "empty.txt"
    empty.write_text(" \n")
    with pytest.raises(ValueError, match="empty text"):
        read_text_file(empty)
    with pytest.raises(ValueError, match="x: empty text"):
        analyze(g4, {"x": ""})
    with pytest.raises(ValueError, match="no texts"):
        analyze(g4, {})


# ------------------------------------------------------------------------------------------------- CLI


def test_cli_analyze_json_and_plot(app, tmp_path):
    out = tmp_path / "pieces.png"
    res = CliRunner().invoke(app, ["tokens", "analyze", *map(str, FILES[:3]), "--json", "--plot", str(out)])
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert set(data["files"]) == {p.name for p in FILES[:3]}
    assert data["total"]["fertility"] > 1.0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_analyze_tables_and_compare(app, tmp_path, g4):
    g4.save(tmp_path / "tokenizer.json")
    res = CliRunner().invoke(app, ["tokens", "analyze", str(DATA / "english.txt"), str(DATA / "mixed.txt"),
                                   "--compare", str(tmp_path / "tokenizer.json"), "--top", "3"])
    assert res.exit_code == 0, res.output
    assert "Per script" in res.output and "A vs B" in res.output and "+0.0%" in res.output


def test_cli_train(app, tmp_path):
    saved = tmp_path / "domain.json"
    res = CliRunner().invoke(app, ["tokens", "train", str(DATA / "medical.txt"), str(DATA / "english.txt"),
                                   "--vocab-size", "500", "--min-frequency", "1",
                                   "--heldout", str(DATA / "medical.txt"), "-o", str(saved), "--json"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    fert = data["comparison"]["total"]["fertility"]
    assert fert["a"] > 0 and fert["b"] > 0
    assert saved.is_file()
    res = CliRunner().invoke(app, ["tokens", "train", str(DATA / "medical.txt"), "--vocab-size", "500",
                                   "--heldout", str(DATA / "english.txt")])
    assert res.exit_code == 0 and "Held-out fertility" in res.output


def test_cli_errors_and_help(app, tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"ok \xff\xfe")
    res = CliRunner().invoke(app, ["tokens", "analyze", str(bad)])
    assert res.exit_code == 2 and "invalid UTF-8" in res.output
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    res = CliRunner().invoke(app, ["tokens", "train", str(DATA / "english.txt"), "--heldout", str(empty)])
    assert res.exit_code == 2 and "empty text" in res.output
    res = CliRunner().invoke(app, ["tokens", "analyze", str(tmp_path / "missing.txt")])
    assert res.exit_code == 2 and "no such file" in res.output
    res = CliRunner().invoke(app, ["tokens", "analyze", "--help"])
    assert res.exit_code == 0 and "fertility" in res.output and "--compare" in res.output


def test_registered_in_main_cli():
    from gemma4.cli import app as main_app
    res = CliRunner().invoke(main_app, ["tokens", "--help"])
    assert res.exit_code == 0 and "analyze" in res.output and "train" in res.output
