"""Parameter accounting: exact against a meta-device model, and the published figures."""

import pytest
import torch

from gemma4 import Gemma4Config, PRESETS, build_model, count_parameters
from gemma4.model.config import FULL, SLIDING
from gemma4.model.size import published_comparison

import quant_tiny


def _meta_counts(cfg):
    m = build_model(cfg, device="meta")
    by = lambda pred: sum(p.numel() for n, p in m.named_parameters() if pred(n))  # noqa: E731
    types = cfg.layer_types
    layer_of = lambda n: int(n.split(".")[2])  # noqa: E731
    out = {
        "total": sum(p.numel() for p in m.parameters()),
        "embedding": m.model.embed_tokens.weight.numel(),
        "ple_table": by(lambda n: n.startswith("model.embed_tokens_per_layer.")),
        "experts": by(lambda n: ".experts." in n),
        "buffers": sum(b.numel() for b in m.buffers()),
    }
    for t in (SLIDING, FULL):
        out[f"attn_{t}"] = by(lambda n: ".self_attn." in n and types[layer_of(n)] == t)
        out[f"mlp_{t}"] = by(lambda n: ".mlp." in n and types[layer_of(n)] == t)
    return out


@pytest.mark.parametrize("name", list(PRESETS) + [f"tiny-{k}" for k in quant_tiny.KINDS])
def test_count_equals_meta_model(name):
    cfg = quant_tiny.config(name[5:]) if name.startswith("tiny-") else Gemma4Config.from_preset(name)
    c = count_parameters(cfg)
    m = _meta_counts(cfg)
    assert c.total == m["total"]
    assert c.embedding == m["embedding"]
    assert c.ple_table == m["ple_table"]
    assert c.experts == m["experts"]
    assert c.buffers == m["buffers"]
    for t in (SLIDING, FULL):
        assert c.attention[t] == m[f"attn_{t}"], t
        assert c.mlp[t] == m[f"mlp_{t}"], t


def test_published_figures():
    e2b = count_parameters(Gemma4Config.from_preset("e2b"))
    assert round(e2b.total / 1e9, 3) == 4.629  # text decoder (spec §4.2)
    assert round(e2b.effective / 1e9, 1) == 2.3
    assert round(e2b.ple_table / 1e9, 3) == 2.349
    moe = count_parameters(Gemma4Config.from_preset("26b-a4b"))
    assert round(moe.total / 1e9, 1) == 25.2 and round(moe.active_per_token / 1e9, 2) == 3.82
    assert round(count_parameters(Gemma4Config.from_preset("31b")).total / 1e9, 1) == 30.7
    rows = {(p, r["figure"]): r for p in ("e2b", "e4b", "31b", "26b-a4b") for r in published_comparison(p)}
    assert rows[("e2b", "total")]["reproduced"] and round(rows[("e2b", "total")]["ours"] / 1e9, 1) == 5.1
    not_reproduced = [k for k, r in rows.items() if not r["reproduced"]]
    assert not_reproduced == [("e4b", "effective")]  # 4.644B vs the card's 4.5B, explained in the note
    assert "4.644" in rows[("e4b", "effective")]["note"]
    assert count_parameters(Gemma4Config.from_preset("gemma3-270m")).total == 268_098_176


def test_cli_params_and_json():
    from typer.testing import CliRunner

    from gemma4.cli import app

    r = CliRunner().invoke(app, ["params", "26b-a4b"])
    assert r.exit_code == 0, r.output
    assert "active per token" in r.output and "reproduced" in r.output
    r = CliRunner().invoke(app, ["params", "e4b", "--json"])
    assert r.exit_code == 0 and "NOT" not in r.output and '"reproduced": false' in r.output
