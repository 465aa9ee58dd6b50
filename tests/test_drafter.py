"""MTP drafter: parity with transformers' Gemma4AssistantForCausalLM on the tiny paired configs."""

from __future__ import annotations

import json

import pytest
import torch

from gemma4 import load_pretrained
from gemma4.model.config import ConfigError
from gemma4.io.checkpoint import CheckpointError
from gemma4.io import load_drafter, save_drafter
from gemma4.model.drafter import DrafterConfig, build_drafter
from tiny import hf_model, randomize_

transformers = pytest.importorskip("transformers")

S, F = "sliding_attention", "full_attention"
# Spec §5.2 "assistant" (paired with the "ple" target): 2 layers [S,F], hidden 32, 4 heads, 1 KV head,
# head_dim 16/32, intermediate 64, backbone 48, 16 centroids, top-4.
TEXT = dict(vocab_size=256, hidden_size=32, num_hidden_layers=2, layer_types=[S, F], num_attention_heads=4,
            num_key_value_heads=1, head_dim=16, global_head_dim=32, intermediate_size=64, sliding_window=8,
            hidden_size_per_layer_input=0, vocab_size_per_layer_input=0, rms_norm_eps=1e-6,
            max_position_embeddings=256, final_logit_softcapping=None, tie_word_embeddings=True,
            pad_token_id=0, bos_token_id=2, eos_token_id=1)
# The same drafter shaped for the dense (31B-like) target: 2 sliding / 1 full K/V heads.
TEXT_DENSE = dict(TEXT, num_key_value_heads=2, attention_k_eq_v=True, num_global_key_value_heads=1)


def hf_assistant(monkeypatch, ordered: bool, seed: int = 1, text=TEXT):
    cfg = transformers.Gemma4AssistantConfig(text_config=dict(text), backbone_hidden_size=48,
                                             use_ordered_embeddings=ordered, num_centroids=16,
                                             centroid_intermediate_top_k=4)
    tcls = type(cfg.text_config)
    try:
        cfg.text_config.kv_sharing_modes
    except ValueError:  # transformers 5.23: every-layer-shared configs raise (spec §3.1 / §9.14)
        orig = tcls.kv_sharing_modes
        monkeypatch.setattr(tcls, "kv_sharing_modes", property(
            lambda self: ["reuse"] * self.num_hidden_layers
            if self.num_kv_shared_layers == self.num_hidden_layers else orig.fget(self)))
    cfg._attn_implementation = "eager"
    cfg.text_config._attn_implementation = "eager"
    torch.manual_seed(seed)
    m = transformers.Gemma4AssistantForCausalLM(cfg).eval()
    randomize_(m, seed)
    if ordered:
        g = torch.Generator().manual_seed(seed)
        m.masked_embedding.token_ordering.copy_(torch.randperm(256, generator=g))
    return m


@pytest.fixture(scope="module")
def targets(tmp_path_factory):
    out = {}
    for kind in ("ple", "dense"):
        d = tmp_path_factory.mktemp(kind)
        hf = hf_model(kind)
        hf.save_pretrained(str(d))
        ours = load_pretrained(d).set_attention_backend("eager")
        out[kind] = (hf, ours)
    return out


def _drafter_pair(monkeypatch, tmp_path, ordered, kind="ple"):
    hf = hf_assistant(monkeypatch, ordered, text=TEXT_DENSE if kind == "dense" else TEXT)
    hf.save_pretrained(str(tmp_path / "asst"))
    ours = load_drafter(tmp_path / "asst").set_attention_backend("eager")
    return hf, ours


@pytest.mark.parametrize("kind", ["ple", "dense"])
def test_shared_kv_matches_transformers(targets, kind):
    """The K/V our target hands the drafter equals transformers' shared_kv_states. For the dense
    (31B-like) target without KV sharing transformers marks the last layer of each type "store"."""
    hf, ours = targets[kind]
    ids = torch.randint(3, 256, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        o = hf(ids, return_shared_kv_states=True, output_hidden_states=True)
        h, shared = ours.model.forward_export_kv(ids)
    assert set(o.shared_kv_states) == set(shared) == {S, F}
    for lt in (S, F):
        for a, b in zip(o.shared_kv_states[lt], shared[lt]):
            torch.testing.assert_close(b, a, atol=1e-5, rtol=0)
    torch.testing.assert_close(h, o.hidden_states[-1], atol=1e-5, rtol=0)


@pytest.mark.parametrize("ordered", [True, False])
@pytest.mark.parametrize("kind,T", [("ple", 5), ("ple", 20), ("dense", 20)])
def test_drafter_matches_transformers(targets, monkeypatch, tmp_path, ordered, kind, T):
    """Three chained drafting steps (argmax token + projected state fed back), fp32, <= 1e-4.
    T=20 > sliding_window+1 exercises the sliding cut (transformers sees W+1 = 9 keys)."""
    hf_t, our_t = targets[kind]
    hf_d, our_d = _drafter_pair(monkeypatch, tmp_path, ordered, kind)
    our_d.check_target(our_t.config)
    # Batch 1 per row: transformers' centroid fill value is a batch-wide minimum.
    for row in range(2):
        ids = torch.randint(3, 256, (1, T), generator=torch.Generator().manual_seed(10 + row))
        with torch.no_grad():
            o = hf_t(ids, return_shared_kv_states=True, output_hidden_states=True)
            kv = {k: (v[0], v[1]) for k, v in o.shared_kv_states.items()}
            tok = torch.randint(3, 256, (1, 1), generator=torch.Generator().manual_seed(row))
            h_hf = h_us = o.hidden_states[-1][:, -1:]
            tok_hf = tok_us = tok
            pos = torch.tensor([[T]])
            mask = torch.ones(1, T, dtype=torch.long)
            for step in range(3):
                x_hf = torch.cat([hf_t.model.embed_tokens(tok_hf), h_hf], dim=-1)
                x_us = our_d.input_embeds(our_t, tok_us, h_us)
                # The carried hidden state is the previous step's output: equal up to float32 summation
                # order, which depends on the CPU's vector width (1e-6 of its scale, not absolute).
                torch.testing.assert_close(x_us, x_hf, atol=1e-6 * max(1.0, x_hf.abs().max().item()), rtol=0)
                ref = hf_d(inputs_embeds=x_hf, attention_mask=mask, position_ids=pos, shared_kv_states=kv)
                logits, h_us = our_d(x_us, kv, pos, attention_mask=mask)
                torch.testing.assert_close(logits, ref.logits, atol=1e-4, rtol=0)
                torch.testing.assert_close(h_us, ref.last_hidden_state, atol=1e-4, rtol=0)
                h_hf = ref.last_hidden_state
                tok_hf, tok_us = ref.logits.argmax(-1), logits.argmax(-1)
                assert torch.equal(tok_hf, tok_us)


def test_drafter_padding_batch_matches_transformers(targets, monkeypatch, tmp_path):
    """Batch of 2 with left padding (plain tied head, so the fill-value caveat does not apply)."""
    hf_t, our_t = targets["ple"]
    hf_d, our_d = _drafter_pair(monkeypatch, tmp_path, ordered=False)
    T = 16
    ids = torch.randint(3, 256, (2, T), generator=torch.Generator().manual_seed(3))
    mask = torch.ones(2, T, dtype=torch.long)
    mask[1, :5] = 0
    with torch.no_grad():
        o = hf_t(ids, attention_mask=mask, return_shared_kv_states=True, output_hidden_states=True)
        kv = dict(o.shared_kv_states)
        x = torch.cat([hf_t.model.embed_tokens(ids[:, -1:]), o.hidden_states[-1][:, -1:]], dim=-1)
        pos = torch.tensor([[T], [T - 5]])
        ref = hf_d(inputs_embeds=x, attention_mask=mask, position_ids=pos, shared_kv_states=kv)
        logits, h = our_d(x, kv, pos, attention_mask=mask)
    torch.testing.assert_close(logits, ref.logits, atol=1e-4, rtol=0)
    torch.testing.assert_close(h, ref.last_hidden_state, atol=1e-4, rtol=0)


def test_key_slots_and_last_slot(targets, monkeypatch, tmp_path):
    """Keys given in ring order with explicit slots, plus keys beyond last_slot (rejected candidates),
    give the same result as the chronological, truncated K/V."""
    _, our_t = targets["ple"]
    _, our_d = _drafter_pair(monkeypatch, tmp_path, ordered=True)
    ids = torch.randint(3, 256, (1, 24), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        h, kv = our_t.model.forward_export_kv(ids)
        p = 17
        x = our_d.input_embeds(our_t, ids[:, p + 1 : p + 2], h[:, p : p + 1])
        pos = torch.tensor([[p + 1]])
        trunc = {k: (a[:, :, : p + 1], b[:, :, : p + 1]) for k, (a, b) in kv.items()}
        want, _ = our_d(x, trunc, pos)
        perm = torch.randperm(24, generator=torch.Generator().manual_seed(5))
        shuffled = {k: (a[:, :, perm], b[:, :, perm]) for k, (a, b) in kv.items()}
        got, _ = our_d(x, shuffled, pos, key_slots={S: perm, F: perm}, last_slot=p)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_roundtrip_and_rejections(monkeypatch, tmp_path):
    hf = hf_assistant(monkeypatch, ordered=True)
    hf.save_pretrained(str(tmp_path / "a"))
    d = load_drafter(tmp_path / "a")
    save_drafter(d, tmp_path / "b")
    d2 = load_drafter(tmp_path / "b")
    for (k1, v1), (k2, v2) in zip(d.state_dict().items(), d2.state_dict().items()):
        assert k1 == k2 and torch.equal(v1, v2)
    raw = json.loads((tmp_path / "a" / "config.json").read_text())
    with pytest.raises(ConfigError, match="unknown drafter config key"):
        DrafterConfig.from_dict({**raw, "bogus": 1})
    with pytest.raises(ConfigError, match="every layer must read"):
        DrafterConfig.from_dict({**raw, "text_config": {**raw["text_config"], "num_kv_shared_layers": 1}})
    with pytest.raises(ConfigError, match="hidden_size_per_layer_input"):
        DrafterConfig.from_dict({**raw, "text_config": {**raw["text_config"], "hidden_size_per_layer_input": 8}})
    with pytest.raises(ConfigError, match="num_centroids"):
        DrafterConfig.from_dict({**raw, "num_centroids": 15})
    # A token ordering that is not a permutation is caught at load time.
    bad = hf_assistant(monkeypatch, ordered=True)
    bad.masked_embedding.token_ordering.zero_()
    bad.save_pretrained(str(tmp_path / "bad"))
    with pytest.raises(CheckpointError, match="permutation"):
        load_drafter(tmp_path / "bad")
    # A drafter paired with a target of the wrong width is refused by name.
    cfg = DrafterConfig.from_dict(raw)
    from gemma4.model.config import Gemma4Config
    with pytest.raises(ValueError, match="backbone_hidden_size"):
        build_drafter(cfg).check_target(Gemma4Config(hidden_size=64, vocab_size=256, num_hidden_layers=2,
                                                     hidden_size_per_layer_input=0))
