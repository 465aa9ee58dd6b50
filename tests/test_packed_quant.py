"""use_fast_path on quantized models: same logits as the unpacked quantized model; unpack restores it."""

import pytest
import torch

import quant_tiny
from gemma4.infer.fast_path import use_fast_path, use_plain_path
from gemma4.quant.rtn import quantize


@pytest.mark.parametrize("scheme, group", [("int8", None), ("int4", 32)])
@pytest.mark.parametrize("kind", ["gemma3", "ple", "moe"])
def test_packed_quantized_matches_and_unpacks(kind, scheme, group):
    m = quant_tiny.model(kind)
    quantize(m, scheme, group)
    m = m.to(torch.bfloat16)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    ids = torch.randint(0, 320, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = m(ids).float()
        use_fast_path(m)
        out = m(ids).float()
    if m.config.final_logit_softcapping:
        # Packed quantized heads return float32 logits, so the soft-cap is applied before bf16 rounding.
        assert (out - ref).abs().max().item() <= 0.05
        # same top token, up to ties that the plain path's bf16 logits cannot break
        assert torch.equal(ref.gather(-1, out.argmax(-1, keepdim=True)), ref.amax(-1, keepdim=True))
    else:  # the packed head may return float32 where the plain one rounds to the model's bf16
        assert torch.equal(out.to(torch.bfloat16).float(), ref)
    use_plain_path(m)
    after = m.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


def _hidden_modules(model: torch.nn.Module) -> list[str]:
    """Attributes that hold a module (or a list of modules) outside ``_modules``: invisible to
    ``.to()``, ``state_dict`` and FSDP."""
    found = []
    for name, mod in model.named_modules():
        for attr, val in vars(mod).items():
            vals = val if isinstance(val, (list, tuple)) else [val]
            if attr != "_modules" and any(isinstance(v, torch.nn.Module) for v in vals):
                found.append(f"{name}.{attr}")
    return found


@pytest.mark.parametrize("scheme", [None, "int8", "int4"])
def test_fast_path_hides_no_module_and_saves_each_tensor_once(scheme):
    m = quant_tiny.model("ple")
    if scheme:
        quantize(m, scheme, 32 if scheme == "int4" else None)
    m = m.to(torch.bfloat16)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    use_fast_path(m)
    assert _hidden_modules(m) == []
    sd = m.state_dict(keep_vars=True)
    ptrs = [v.data_ptr() for v in sd.values() if v is not None and not v.is_mkldnn and v.numel()]
    assert len(ptrs) == len(set(ptrs)), "a tensor is saved twice under two names"
    use_plain_path(m)
    assert _hidden_modules(m) == []
    after = m.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
