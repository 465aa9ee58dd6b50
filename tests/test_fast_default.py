"""Fast by default: load_pretrained + generate reaches the CPU fast path with no extra call, training gets
ordinary modules, and saving works on whatever the loader or generation left."""

import pytest
import torch

import gemma4
from gemma4.infer import on_fast_path, plain_path, use_plain_path
from gemma4.model import Gemma4Config, build_model, init_random_
from tiny import PLE


@pytest.fixture()
def ckpt(tmp_path):
    m = init_random_(build_model(Gemma4Config.from_dict(dict(PLE))), seed=3)
    return gemma4.save_pretrained(m, tmp_path / "m")


def test_generate_moves_an_inference_model_to_the_fast_path_and_back(ckpt, tmp_path):
    m = gemma4.load_pretrained(ckpt)
    ref = gemma4.generate(m, [[2, 5, 9, 11]], 12, stop_token_ids=(), fast=False)
    assert not on_fast_path(m)
    assert gemma4.generate(m, [[2, 5, 9, 11]], 12, stop_token_ids=()) == ref
    assert on_fast_path(m)
    # no second copy of the tied table: the head reads the embedding itself
    assert m.lm_head.w.data_ptr() == m.model.embed_tokens.weight.data_ptr()
    gemma4.save_pretrained(m, tmp_path / "again")  # saving a fast-path model works, and keeps it fast
    assert on_fast_path(m)
    back = gemma4.load_pretrained(tmp_path / "again")
    fresh = gemma4.load_pretrained(ckpt)
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, back.state_dict()[k]), k
    with pytest.raises(gemma4.QuantizationError, match="fast path"):
        gemma4.quantize(m, "int8")
    with plain_path(m):
        gemma4.quantize(m, "int8")
    use_plain_path(m)
    assert not on_fast_path(m)


def test_trainable_models_are_never_repacked(ckpt):
    m = gemma4.load_pretrained(ckpt, trainable=True)
    assert m.training and all(p.requires_grad for p in m.parameters())
    gemma4.generate(m, [[2, 5, 9]], 3, stop_token_ids=())
    assert not on_fast_path(m)
    loss = m(torch.tensor([[2, 5, 9, 11]])).float().logsumexp(-1).mean()
    loss.backward()
    assert all(p.grad is not None for n, p in m.named_parameters() if "layers.0." in n)


def test_load_returns_model_and_tokenizer(ckpt):
    model, tok = gemma4.load(ckpt)
    assert isinstance(model, gemma4.Gemma4ForCausalLM) and tok is None  # the tiny checkpoint has no tokenizer
    model, tok = gemma4.load("gemma3-270m")
    assert tok is not None and tok.encode("The capital of France is")[:2] == [2, 818]
    assert gemma4.generate(model, [tok.encode("The capital of France is")], 3)[0][0] == 506  # " the"


def test_save_gguf_after_generation(ckpt, tmp_path):
    m = gemma4.load_pretrained(ckpt)
    gemma4.generate(m, [[2, 5, 9]], 3, stop_token_ids=())
    assert on_fast_path(m)
    back = gemma4.load_gguf(gemma4.save_gguf(m, tmp_path / "m.gguf"))
    fresh = gemma4.load_pretrained(ckpt)
    assert all(torch.equal(v, back.state_dict()[k]) for k, v in fresh.state_dict().items())
    assert on_fast_path(m)
