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
        assert torch.equal(out.argmax(-1), ref.argmax(-1))
    else:
        assert torch.equal(out, ref)
    use_plain_path(m)
    after = m.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
