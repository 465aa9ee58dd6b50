"""LoRA on MoE expert tensors (gate_up_proj [E, 2I, H], down_proj [E, H, I]): PEFT's target_parameters
format both ways against transformers' Gemma 4 MoE (same keys and config fields as PEFT writes, same
logits and gradients), merging, QLoRA over int8 expert stacks, refusals by name."""

import json

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

import gemma4
from gemma4.train import LoRAError, TrainConfig, Trainer, add_lora, load_adapter, merge_lora, save_adapter
from gemma4.train.data import encode_text, pack
from gemma4.train.lora import LoRAExperts, lora_modules
from tiny import hf_model
from train_tiny import tiny_model, tiny_tokenizer
from test_lora import _hf, _peft_lora_keys as _peft_keys, _randomize_lora  # the shared PEFT round-trip helpers

peft = pytest.importorskip("peft", reason="PEFT interop tests need `pip install peft`")
BOTH = ["experts.gate_up_proj", "experts.down_proj"]


@pytest.fixture(scope="module")
def moe(tmp_path_factory):
    d = tmp_path_factory.mktemp("moe")
    hf_model("moe", seed=31).save_pretrained(str(d))
    return d


def _ids(seed=0):
    return torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(seed))


def _peft_adapter(path, out, seed, **kw):
    pm = peft.get_peft_model(_hf(path), peft.LoraConfig(**kw))
    _randomize_lora(pm, seed=seed)
    pm.save_pretrained(str(out))
    return pm.eval()


def test_our_expert_adapter_is_what_peft_writes_and_loads(moe, tmp_path):
    # PEFT's own adapter for the same targets: the reference for key names and config fields.
    ref_pm = _peft_adapter(moe, tmp_path / "peft", 0, r=2, lora_alpha=4, target_modules=[], target_parameters=BOTH)
    ref_keys = set(load_file(str(tmp_path / "peft" / "adapter_model.safetensors")))
    ref_cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert "base_model.model.model.layers.0.experts.base_layer.lora_A.weight" in ref_keys  # gate_up, nested

    ours = gemma4.load_pretrained(moe)
    paths = add_lora(ours, ["experts"], r=2, alpha=4)
    assert paths[:2] == ["model.layers.0.experts.gate_up_proj", "model.layers.0.experts.down_proj"]
    _randomize_lora(ours, seed=1)
    save_adapter(ours, tmp_path / "ours")
    saved = load_file(str(tmp_path / "ours" / "adapter_model.safetensors"))
    cfg = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert set(saved) == ref_keys
    assert all(saved[k].shape == ref_pm.state_dict()[k.replace("weight", "default.weight")].shape for k in saved)
    for field in ("target_parameters", "target_modules", "r", "lora_alpha", "peft_type", "lora_dropout"):
        assert cfg[field] == ref_cfg[field], field

    pm = peft.PeftModel.from_pretrained(_hf(moe), str(tmp_path / "ours")).eval()
    assert _peft_keys(pm) == set(saved)  # nothing missing, nothing unexpected
    for n, p in pm.named_parameters():
        if "lora_" in n:
            assert torch.equal(p, saved[n.replace(".default", "")]), n
    ids = _ids()
    with torch.no_grad():
        ref, out = pm(input_ids=ids).logits, ours(ids)
        assert (out - ref).abs().max().item() <= 1e-4
        with pm.disable_adapter():  # the expert adapter is not a no-op
            assert (pm(input_ids=ids).logits - ref).abs().max().item() > 1e-2


def test_mixed_and_partial_targets_round_trip_through_peft(moe, tmp_path):
    """Linears plus one tensor of two stacks: full parameter paths in target_parameters, single-level keys."""
    ours = gemma4.load_pretrained(moe)
    add_lora(ours, ["q_proj", "model.layers.1.experts.down_proj", "model.layers.4.experts"], r=3, alpha=5,
             use_rslora=True)
    _randomize_lora(ours, seed=2)
    save_adapter(ours, tmp_path / "ad")
    cfg = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert cfg["target_modules"] == ["q_proj"]
    assert cfg["target_parameters"] == ["model.layers.1.experts.down_proj", "model.layers.4.experts.gate_up_proj",
                                        "model.layers.4.experts.down_proj"]
    saved = load_file(str(tmp_path / "ad" / "adapter_model.safetensors"))
    assert "base_model.model.model.layers.1.experts.lora_A.weight" in saved
    assert "base_model.model.model.layers.1.experts.base_layer.lora_A.weight" not in saved
    pm = peft.PeftModel.from_pretrained(_hf(moe), str(tmp_path / "ad")).eval()
    assert _peft_keys(pm) == set(saved)
    ids = _ids(2)
    with torch.no_grad():
        assert (ours(ids) - pm(input_ids=ids).logits).abs().max().item() <= 1e-4
    again = gemma4.load_pretrained(moe)  # and back into ours
    assert len(load_adapter(again, tmp_path / "ad")) == len(lora_modules(ours))
    with torch.no_grad():
        assert torch.equal(again(ids), ours(ids))


@pytest.mark.parametrize("targets", [BOTH, ["experts.down_proj"]])
def test_peft_expert_adapter_loads_in_ours(moe, tmp_path, targets):
    pm = _peft_adapter(moe, tmp_path / "peft", 3, r=2, lora_alpha=6, use_rslora=True,
                       target_modules=["q_proj", "gate_proj"], target_parameters=targets)
    ours = gemma4.load_pretrained(moe)
    loaded = load_adapter(ours, tmp_path / "peft")
    stacks = [m for m in lora_modules(ours).values() if isinstance(m, LoRAExperts)]
    assert len(stacks) == 6 and all(m.params == tuple(t.split(".")[1] for t in targets) for m in stacks)
    assert len(loaded) == 6 * 3  # q_proj, gate_proj and the expert stack of every layer
    ids = _ids(3)
    with torch.no_grad():
        assert (ours(ids) - pm(input_ids=ids).logits).abs().max().item() <= 1e-4
    # Saving it again gives PEFT's file back, key for key.
    save_adapter(ours, tmp_path / "again")
    a, b = (load_file(str(tmp_path / d / "adapter_model.safetensors")) for d in ("peft", "again"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_expert_lora_gradients_equal_peft(moe):
    """Same loss, same factors: every expert LoRA gradient equals PEFT's (the per-expert rank layout)."""
    pm = peft.get_peft_model(_hf(moe), peft.LoraConfig(r=2, lora_alpha=4, target_modules=[], target_parameters=BOTH))
    ours = gemma4.load_pretrained(moe)
    add_lora(ours, ["experts"], r=2, alpha=4)
    _randomize_lora(pm, seed=4)
    with torch.no_grad():
        for k, t in pm.state_dict().items():
            if "lora_" in k:
                key = k.replace("base_model.model.", "", 1).replace(".default", "")
                stack, _, rest = key.partition(".experts.")
                param = "gate_up_proj" if rest.startswith("base_layer.") else "down_proj"
                factor = "lora_A" if "lora_A" in rest else "lora_B"
                getattr(ours.get_submodule(stack + ".experts"), factor)[param].copy_(t)
    ids = _ids(4)
    probe = torch.randn(2, 24, 256, generator=torch.Generator().manual_seed(5))
    (pm(input_ids=ids).logits * probe).sum().backward()
    (ours(ids) * probe).sum().backward()
    ref = {k.replace("base_model.model.", "", 1).replace(".default", ""): p.grad for k, p in pm.named_parameters()
           if p.requires_grad}
    ours_grads = {n: p.grad for n, p in ours.named_parameters() if p.requires_grad}
    assert len(ours_grads) == len(ref) == 6 * 4
    for name, g in ours_grads.items():
        stack, _, rest = name.partition(".experts.")
        factor, param = rest.split(".")
        peft_name = f"{stack}.experts.{'base_layer.' if param == 'gate_up_proj' else ''}{factor}.weight"
        gr = ref[peft_name]
        assert g.abs().sum() > 0, name
        cos = torch.nn.functional.cosine_similarity(g.flatten(), gr.flatten(), dim=0).item()
        rel = ((g - gr).norm() / gr.norm()).item()
        assert cos >= 0.99999 and rel <= 1e-4, (name, cos, rel)


def test_merge_experts_equals_adapter(moe, tmp_path):
    ours = gemma4.load_pretrained(moe)
    add_lora(ours, ["experts", "o_proj"], r=2, alpha=3)
    _randomize_lora(ours, seed=6)
    ids = _ids(6)
    with torch.no_grad():
        before = ours(ids)
    merged = merge_lora(ours)
    assert "model.layers.0.experts" in merged and not lora_modules(ours)
    with torch.no_grad():
        after = ours(ids)
    assert (after - before).abs().max().item() <= 1e-4
    gemma4.save_pretrained(ours, tmp_path / "merged")
    with torch.no_grad():
        assert torch.equal(gemma4.load_pretrained(tmp_path / "merged")(ids), after)


def test_qlora_on_int8_experts_trains_and_round_trips(tmp_path):
    from gemma4.quant import QuantExperts

    q = gemma4.quantize(tiny_model("moe", seed=7, std=0.05), "int8")
    assert isinstance(q.model.layers[0].experts, QuantExperts)
    add_lora(q, ["experts"], r=2, alpha=4)
    assert isinstance(q.model.layers[0].experts, LoRAExperts)
    ids = _ids(7).remainder(256)
    from gemma4.train import causal_lm_loss

    causal_lm_loss(q, ids, ids).backward()  # B starts at zero, so A's gradient is zero and B's is not
    grads = {n: p.grad for n, p in q.named_parameters() if p.requires_grad}
    assert grads and all(".experts.lora_" in n for n in grads)
    assert all(g.abs().sum() > 0 for n, g in grads.items() if ".lora_B." in n)
    tok = tiny_tokenizer()
    data = pack([encode_text(tok, "the and of to " * (1 + i % 3)) for i in range(16)], 24)
    before = {n: b.clone() for n, b in q.named_buffers() if "qweight" in n}
    q.zero_grad(set_to_none=True)
    res = Trainer(q, data, TrainConfig(steps=6, lr=2e-2, batch_size=2, plot=False), tmp_path / "run").fit()
    assert res.history[-1]["loss"] < res.history[0]["loss"]
    assert all(torch.equal(b, dict(q.named_buffers())[n]) for n, b in before.items())  # base untouched
    assert all((m.lora_A[p].abs().sum() > 0) for m in lora_modules(q).values() for p in m.params)
    save_adapter(q, tmp_path / "ad")
    fresh = gemma4.quantize(tiny_model("moe", seed=7, std=0.05), "int8")
    load_adapter(fresh, tmp_path / "ad")
    with torch.no_grad():
        assert torch.equal(fresh(ids), q.eval()(ids))
    with pytest.raises(LoRAError, match=r"model\.layers\.0\.experts: the expert stacks are quantized"):
        merge_lora(fresh)
    # The adapter's effect over the int8 stacks is its effect over their dequantized float twin (the
    # integer kernels run in bf16, so close rather than equal).
    from gemma4.quant import dequantize_model

    f = dequantize_model(gemma4.quantize(tiny_model("moe", seed=7, std=0.05), "int8"), torch.float32)
    fbase = dequantize_model(gemma4.quantize(tiny_model("moe", seed=7, std=0.05), "int8"), torch.float32)
    load_adapter(f, tmp_path / "ad")
    qbase = gemma4.quantize(tiny_model("moe", seed=7, std=0.05), "int8")
    with torch.no_grad():
        dq, df = (q(ids) - qbase(ids)).flatten(), (f(ids) - fbase(ids)).flatten()
    assert df.abs().max() > 1e-3
    assert torch.nn.functional.cosine_similarity(dq, df, dim=0).item() >= 0.99


def test_expert_refusals_name_the_target(moe, tmp_path):
    dense = gemma4.load_pretrained(hf_dense_dir(tmp_path))
    with pytest.raises(LoRAError, match="'experts': this model has no MoE expert stacks"):
        add_lora(dense, ["experts"])
    ours = gemma4.load_pretrained(moe)
    with pytest.raises(LoRAError, match=r"model\.layers\.0\.experts: LoRA on MoE expert tensors takes no dropout"):
        add_lora(ours, ["experts"], dropout=0.1)
    add_lora(ours, ["experts.down_proj"], r=2)
    with pytest.raises(LoRAError, match="already has LoRA"):
        add_lora(ours, ["model.layers.0.experts.base_layer.gate_up_proj"])
    save_adapter(ours, tmp_path / "ad")
    # A file whose nesting does not match its config (a gate_up level PEFT would never have written).
    st = load_file(str(tmp_path / "ad" / "adapter_model.safetensors"))
    st["base_model.model.model.layers.2.experts.base_layer.lora_A.weight"] = torch.zeros(16, 48)
    st["base_model.model.model.layers.2.experts.base_layer.lora_B.weight"] = torch.zeros(48, 16)
    save_file(st, str(tmp_path / "ad" / "adapter_model.safetensors"))
    with pytest.raises(LoRAError, match=r"model\.layers\.2\.experts: LoRA tensors at 2 nesting level"):
        load_adapter(gemma4.load_pretrained(moe), tmp_path / "ad")


def hf_dense_dir(tmp_path):
    d = tmp_path / "dense"
    hf_model("dense", seed=8).save_pretrained(str(d))
    return d


def test_finetune_cli_on_experts_then_merge(tmp_path):
    from typer.testing import CliRunner

    from gemma4.cli import app

    base = tmp_path / "base"
    gemma4.save_pretrained(tiny_model("moe", seed=9, std=0.05), base)
    tiny_tokenizer().save(base / "tokenizer.json")
    (tmp_path / "data.txt").write_text("the and of to " * 100)
    out = tmp_path / "run"
    for args in (["finetune", base, tmp_path / "data.txt", "--out", out, "--lora-rank", 2, "--targets", "experts",
                  "--steps", 2, "--lr", 1e-2, "--seq-len", 32, "--batch-size", 2, "--dtype", "float32"],
                 ["merge", base, out / "adapter", tmp_path / "merged"]):
        res = CliRunner().invoke(app, [str(a) for a in args])
        assert res.exit_code == 0, (res.output, res.exception)
    cfg = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert cfg["target_parameters"] == BOTH and cfg["target_modules"] == []
    ids = torch.tensor([[2, 40, 41, 42, 43, 44]])
    m = gemma4.load_pretrained(base)
    load_adapter(m, out / "adapter")
    with torch.no_grad():
        a, b, c = m(ids), gemma4.load_pretrained(tmp_path / "merged")(ids), gemma4.load_pretrained(base)(ids)
    assert (a - b).abs().max().item() <= 1e-4 and (a - c).abs().max().item() > 1e-4
