"""The forward reads no tensor value on the host, so it compiles as one graph (no graph breaks)."""

import pytest
import torch

from gemma4.model import Gemma4Config, build_model, init_random_
from tiny import PLE


@pytest.mark.parametrize("cfg", [PLE], ids=["ple"])
def test_forward_compiles_fullgraph_and_matches_eager(cfg):
    torch._dynamo.reset()
    m = init_random_(build_model(Gemma4Config.from_dict(dict(cfg))), seed=1)
    ids = torch.randint(3, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, :4] = 0  # left padding: the padded mask path
    with torch.no_grad():
        ref = m(ids, attention_mask=mask)
        # fullgraph=True raises on any graph break, e.g. a bool(tensor) or .item() in the forward.
        compiled = torch.compile(m, fullgraph=True, backend="eager")
        out = compiled(ids, attention_mask=mask)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)


def test_cached_decode_step_compiles_fullgraph():
    """A decode step over ring and full caches. (MoE layers are the one exception to a single graph: they
    run only the experts the router picked, a data-dependent loop by design.)"""
    torch._dynamo.reset()
    m = init_random_(build_model(Gemma4Config.from_dict(dict(PLE, max_position_embeddings=64))), seed=2)
    ids = torch.randint(3, 256, (1, 6), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        cache = m.new_cache()
        m(ids, cache=cache, keep_last=1)
        step = torch.compile(lambda x: m(x, cache=cache, keep_last=1), fullgraph=True, backend="eager")
        out = step(ids[:, -1:])
    assert out.shape == (1, 1, 256) and torch.isfinite(out).all()


def test_zero_tokens_is_a_named_shape_error():
    m = init_random_(build_model(Gemma4Config.from_dict(dict(PLE))), seed=1)
    with pytest.raises(ValueError, match="no tokens"):
        m(torch.zeros(1, 0, dtype=torch.long))
