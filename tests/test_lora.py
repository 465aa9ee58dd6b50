"""LoRA / QLoRA: PEFT's on-disk format both ways (our adapter on transformers + peft, PEFT's adapter on
ours: same logits, no missing or unexpected keys), merging, refusals by name, training over int8/int4."""

import json

import pytest
import torch
import transformers

import gemma4
from gemma4.train import (LoRAError, TrainConfig, Trainer, add_lora, causal_lm_loss, load_adapter, merge_lora,
                          save_adapter)
from gemma4.train.data import encode_text, pack
from gemma4.train.lora import lora_modules
from tiny import hf_model
from train_tiny import tame_, tiny_model, tiny_tokenizer

peft = pytest.importorskip("peft", reason="PEFT interop tests need `pip install peft`")


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    out = {}
    for i, kind in enumerate(("ple", "moe")):
        d = tmp_path_factory.mktemp(kind)
        hf_model(kind, seed=20 + i).save_pretrained(str(d))
        out[kind] = d
    return out


def _hf(path):
    return transformers.Gemma4ForCausalLM.from_pretrained(str(path), dtype=torch.float32,
                                                          attn_implementation="eager").eval()


def _randomize_lora(model, seed=0, std=0.2):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * std)


def _ids(seed=0):
    return torch.randint(0, 256, (2, 30), generator=torch.Generator().manual_seed(seed))


def _peft_lora_keys(pm):
    """The adapter tensor names PEFT's model has, in its on-disk spelling (no adapter name)."""
    return {n.replace(".default", "") for n, _ in pm.named_parameters() if "lora_" in n}


def test_our_adapter_loads_in_peft(ckpts, tmp_path):
    ours = gemma4.load_pretrained(ckpts["ple"])
    paths = add_lora(ours, ["all-linear"], r=4, alpha=8)
    # attention (producers' k/v included), MLP and the PLE projections, and no consumer k/v
    assert "model.layers.4.self_attn.k_proj" in paths and "model.per_layer_model_projection" in paths
    assert "model.layers.3.per_layer_input_gate" in paths
    assert not any(p.startswith(("model.layers.6.self_attn.k", "model.layers.9.self_attn.v")) for p in paths)
    _randomize_lora(ours)
    save_adapter(ours, tmp_path / "ad", base_model=ckpts["ple"])
    cfg = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4 and cfg["lora_alpha"] == 8

    pm = peft.PeftModel.from_pretrained(_hf(ckpts["ple"]), str(tmp_path / "ad")).eval()
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "ad" / "adapter_model.safetensors"))
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in saved
    assert _peft_lora_keys(pm) == set(saved)  # nothing missing, nothing unexpected
    for n, p in pm.named_parameters():
        if "lora_" in n:
            assert torch.equal(p, saved[n.replace(".default", "")]), n
    ids = _ids()
    with torch.no_grad():
        ref, out = pm(input_ids=ids).logits, ours(ids)
        base = ours.model.embed_tokens  # the adapter changes the output (it is not a no-op)
    err = (out - ref).abs().max().item()
    assert err <= 1e-4, err
    with torch.no_grad():
        pm.base_model.disable_adapter_layers()
        assert (pm(input_ids=ids).logits - ref).abs().max().item() > 1e-2
    assert base is not None


def test_peft_adapter_loads_in_ours(ckpts, tmp_path):
    hf = _hf(ckpts["moe"])
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    pm = peft.get_peft_model(hf, peft.LoraConfig(r=4, lora_alpha=12, target_modules=targets, use_rslora=True))
    _randomize_lora(pm, seed=1)
    pm.save_pretrained(str(tmp_path / "peft"))
    ours = gemma4.load_pretrained(ckpts["moe"])
    loaded = load_adapter(ours, tmp_path / "peft")
    assert len(loaded) == len({n.rsplit(".lora_", 1)[0] for n in _peft_lora_keys(pm)})
    ids = _ids(1)
    with torch.no_grad():
        ref, out = pm.eval()(input_ids=ids).logits, ours(ids)
    assert (out - ref).abs().max().item() <= 1e-4
    assert not any(p.requires_grad for p in ours.parameters())  # loaded for inference by default


def test_merge_equals_adapter(ckpts, tmp_path):
    ours = gemma4.load_pretrained(ckpts["ple"])
    add_lora(ours, ["q_proj", "v_proj", "down_proj", "ple"], r=2, alpha=4)
    _randomize_lora(ours, seed=2)
    ids = _ids(2)
    with torch.no_grad():
        before = ours(ids)
    merged = merge_lora(ours)
    assert merged and not lora_modules(ours)
    with torch.no_grad():
        after = ours(ids)
    assert (after - before).abs().max().item() <= 1e-4
    gemma4.save_pretrained(ours, tmp_path / "merged")
    with torch.no_grad():
        again = gemma4.load_pretrained(tmp_path / "merged")(ids)
    assert torch.equal(again, after)


def test_refusals_name_the_module(ckpts, tmp_path):
    ours = gemma4.load_pretrained(ckpts["ple"])  # layers 6-9 are KV-sharing consumers
    with pytest.raises(LoRAError, match=r"model\.layers\.7\.self_attn\.k_proj: layer 7 is a KV-sharing consumer"):
        add_lora(ours, ["model.layers.7.self_attn.k_proj"])
    dense = gemma4.load_pretrained(ckpts["moe"])  # K=V full layer 5
    with pytest.raises(LoRAError, match=r"model\.layers\.5\.self_attn\.v_proj: layer 5 uses K=V"):
        add_lora(dense, ["model.layers.5.self_attn.v_proj"])
    with pytest.raises(LoRAError, match="matches no linear layer"):
        add_lora(ours, ["qq_proj"])
    # An adapter file carrying a consumer's k_proj (e.g. made for a model without KV sharing).
    add_lora(ours, ["q_proj"], r=2)
    save_adapter(ours, tmp_path / "ad")
    from safetensors.torch import load_file, save_file

    st = load_file(str(tmp_path / "ad" / "adapter_model.safetensors"))
    st["base_model.model.model.layers.8.self_attn.k_proj.lora_A.weight"] = torch.zeros(2, 48)
    st["base_model.model.model.layers.8.self_attn.k_proj.lora_B.weight"] = torch.zeros(16, 2)
    save_file(st, str(tmp_path / "ad" / "adapter_model.safetensors"))
    fresh = gemma4.load_pretrained(ckpts["ple"])
    with pytest.raises(LoRAError, match=r"layers\.8\.self_attn\.k_proj: layer 8 is a KV-sharing consumer"):
        load_adapter(fresh, tmp_path / "ad")


def _qlora_pair(scheme, kind="dense"):
    """(quantized model with LoRA, float model of the same dequantized weights with the same LoRA)."""
    from gemma4.quant import dequantize_model

    cfg_kw = {"int4": dict(vocab_size=384)}.get(scheme, {})
    q = tiny_model(kind, seed=5, std=0.05, **cfg_kw) if scheme == "int8" else _tiny64(kind)
    gemma4.quantize(q, scheme, **({"group_size": 32} if scheme == "int4" else {}))
    f = dequantize_model(_clone_quantized(q, scheme, kind), torch.float32)
    for m in (q, f):
        add_lora(m, ["all-linear"], r=4, alpha=8)
        _randomize_lora(m, seed=3, std=0.05)
    return q, f


def _tiny64(kind):
    from train_tiny import tiny_config

    cfg = tiny_config(kind).to_dict()
    cfg.pop("architectures", None)
    cfg.update(hidden_size=64, intermediate_size=128, head_dim=16, global_head_dim=32)
    if cfg.get("moe_intermediate_size"):
        cfg["moe_intermediate_size"] = 32
    m = gemma4.build_model(gemma4.Gemma4Config.from_dict(cfg))
    return tame_(gemma4.init_random_(m, seed=5, std=0.02), 5)


def _clone_quantized(q, scheme, kind):
    """The same quantized weights in a second model (quantizing the same float weights again)."""
    m = tiny_model(kind, seed=5, std=0.05) if scheme == "int8" else _tiny64(kind)
    return gemma4.quantize(m, scheme, **({"group_size": 32} if scheme == "int4" else {}))


def test_frozen_quant_linear_gradient_is_exact():
    """The input gradient through a frozen int8/int4 linear is the true gradient of x @ W_deq^T."""
    from gemma4.quant import Int4Linear, Int8Linear
    from gemma4.train.lora import frozen_quant_linear

    g = torch.Generator().manual_seed(0)
    w = torch.randn(96, 64, generator=g) * 0.05
    for q in (Int8Linear(96, 64), Int4Linear(96, 64, group_size=32)):
        q.set_from_float(w)
        x = torch.randn(5, 64, generator=g, requires_grad=True)
        gy = torch.randn(5, 96, generator=g)
        frozen_quant_linear(x, q).backward(gy)
        x2 = x.detach().clone().requires_grad_(True)
        torch.nn.functional.linear(x2, q.dequantize(torch.float32)).backward(gy)
        assert torch.equal(x.grad, x2.grad)


# MoE top-k choices flip under the integer kernels' bf16 rounding on random weights, so its
# gradients agree less closely than a dense model's (measured cosines: dense >= 0.9996, MoE >= 0.96).
@pytest.mark.parametrize("scheme,kind,min_cos", [("int8", "dense", 0.999), ("int4", "dense", 0.995),
                                                  ("int8", "moe", 0.95)])
def test_qlora_gradients_and_training(scheme, kind, min_cos, tmp_path):
    q, f = _qlora_pair(scheme, kind)
    ids = _ids(3).remainder(256)
    grads = []
    for m in (q, f):
        m.zero_grad(set_to_none=True)
        causal_lm_loss(m, ids, ids).backward()
        grads.append({n: p.grad for n, p in m.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and all(".lora_" in n for n in grads[0])
    # Against the float model of the same dequantized weights (float32): the integer kernels run in
    # bf16, so close, not equal.
    for n in grads[0]:
        cos = torch.nn.functional.cosine_similarity(grads[0][n].flatten(), grads[1][n].flatten(), dim=0).item()
        assert cos >= min_cos, (n, cos)
    # Every quantized linear let the gradient through: layer 0's LoRA factors are reached.
    assert grads[0]["model.layers.0.self_attn.q_proj.lora_A.weight"].abs().sum() > 0
    # A few steps of QLoRA training lower the loss; the base stays quantized and untouched.
    tok = tiny_tokenizer()
    data = pack([encode_text(tok, "the and of to " * (1 + i % 3)) for i in range(16)], 24)
    before = {n: b.clone() for n, b in q.named_buffers() if "qweight" in n}
    res = Trainer(q, data, TrainConfig(steps=6, lr=1e-2, batch_size=2, plot=False), tmp_path).fit()
    assert res.history[-1]["loss"] < res.history[0]["loss"]
    assert all(torch.equal(b, dict(q.named_buffers())[n]) for n, b in before.items())
    save_adapter(q, tmp_path / "ad")
    assert len(load_adapter(_clone_quantized(q, scheme, kind), tmp_path / "ad")) == len(lora_modules(q))


def test_generate_with_adapter_equals_merged(ckpts, tmp_path):
    """Generation (which repacks the model for the CPU fast path) keeps the adapter: the same tokens as
    the merged model, not the base model's."""
    from gemma4.infer import generate

    trained = gemma4.load_pretrained(ckpts["ple"])
    add_lora(trained, ["attention", "mlp"], r=4, alpha=8)
    _randomize_lora(trained, seed=4, std=0.3)
    save_adapter(trained, tmp_path / "ad")
    prompt = [[2, 17, 99, 4, 61]]
    with_adapter = gemma4.load_pretrained(ckpts["ple"])
    load_adapter(with_adapter, tmp_path / "ad")
    merged = gemma4.load_pretrained(ckpts["ple"])
    load_adapter(merged, tmp_path / "ad")
    merge_lora(merged)
    a = generate(with_adapter, prompt, max_new_tokens=10)
    b = generate(merged, prompt, max_new_tokens=10)
    c = generate(gemma4.load_pretrained(ckpts["ple"]), prompt, max_new_tokens=10)
    assert a == b and a != c
