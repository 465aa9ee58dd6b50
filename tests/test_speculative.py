"""Speculative decoding: greedy output is token-identical to plain greedy decoding."""

from __future__ import annotations

import pytest
import torch

from gemma4 import Gemma4Config, build_model, init_random_
from gemma4.model.drafter import DrafterConfig, build_drafter
from gemma4.infer import SamplingParams, generate, stream
from gemma4.infer.speculative import _Picker, greedy_decode, speculative_generate
from tiny import DENSE, GEMMA3, PLE

S, F = "sliding_attention", "full_attention"
DRAFTER_TEXT = dict(vocab_size=256, hidden_size=32, num_hidden_layers=2, layer_types=[S, F], num_attention_heads=4,
                    num_key_value_heads=1, head_dim=16, global_head_dim=32, intermediate_size=64, sliding_window=8,
                    hidden_size_per_layer_input=0, max_position_embeddings=256, final_logit_softcapping=None)


def _model(d, seed, **kw):
    cfg = Gemma4Config.from_dict({**d, **kw})
    # std 0.15 (as tests/tiny.py): logits well separated, so float noise cannot flip an argmax.
    return init_random_(build_model(cfg), seed=seed, std=0.15)


@pytest.fixture(scope="module")
def ple_target():
    return _model(PLE, 1)


@pytest.fixture(scope="module")
def mtp_drafter():
    cfg = DrafterConfig(text_config=dict(DRAFTER_TEXT), backbone_hidden_size=48, use_ordered_embeddings=True,
                        num_centroids=16, centroid_intermediate_top_k=4)
    d = init_random_(build_drafter(cfg), seed=2, std=0.15)
    d.masked_embedding.token_ordering.copy_(torch.randperm(256, generator=torch.Generator().manual_seed(2)))
    return d


def _prompt(n, seed=0):
    return torch.randint(3, 256, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def test_greedy_reference_matches_full_forward(ple_target):
    """The plain cached greedy loop (the reference below) equals the argmax of one uncached forward."""
    prompt = _prompt(5)
    out = greedy_decode(ple_target, prompt, 30)
    with torch.no_grad():
        logits = ple_target(torch.tensor([prompt + out]))[0]
    assert logits[len(prompt) - 1 : -1].argmax(-1).tolist() == out


@pytest.mark.parametrize("k,plen", [(1, 5), (3, 5), (4, 1), (6, 12)])
def test_mtp_greedy_identical(ple_target, mtp_drafter, k, plen):
    """40 new tokens with window 8: the sliding rings wrap and roll back many times."""
    prompt = _prompt(plen, seed=k)
    want = greedy_decode(ple_target, prompt, 40)
    res = speculative_generate(ple_target, prompt, 40, drafter=mtp_drafter, num_draft_tokens=k)
    assert res.tokens == want
    st = res.stats
    assert st.new_tokens == 40 and st.drafted >= st.accepted >= 0 and 0.0 <= st.acceptance_rate <= 1.0
    assert st.rounds == len(st.accepted_per_round)
    assert sum(st.accepted_per_round) + st.rounds + 1 == 40  # every round adds accepted + 1 token


def test_mtp_sdpa_backend(ple_target, mtp_drafter):
    prompt = _prompt(7, seed=9)
    want = greedy_decode(ple_target, prompt, 24)
    mtp_drafter.set_attention_backend("eager")
    try:
        assert speculative_generate(ple_target, prompt, 24, drafter=mtp_drafter, num_draft_tokens=3).tokens == want
    finally:
        mtp_drafter.set_attention_backend("sdpa")


@pytest.mark.parametrize("draft_kind", ["small-gemma4", "gemma3"])
def test_draft_model_greedy_identical(draft_kind):
    target = _model(DENSE, 3)
    if draft_kind == "small-gemma4":
        draft = _model(DENSE, 4, num_hidden_layers=2, layer_types=[S, F], hidden_size=32, intermediate_size=48)
    else:
        draft = _model(GEMMA3, 5, num_hidden_layers=2, layer_types=[S, F], model_type="gemma3_text")
    prompt = _prompt(6, seed=1)
    want = greedy_decode(target, prompt, 40)
    for k in (2, 5):
        res = speculative_generate(target, prompt, 40, draft_model=draft, num_draft_tokens=k)
        assert res.tokens == want, (draft_kind, k)


def test_draft_equal_to_target_accepts_everything():
    target = _model(DENSE, 3)
    prompt = _prompt(4, seed=2)
    res = speculative_generate(target, prompt, 31, draft_model=target, num_draft_tokens=4)
    assert res.tokens == greedy_decode(target, prompt, 31)
    assert res.stats.acceptance_rate == 1.0
    assert res.stats.tokens_per_round == 5.0  # 4 accepted + 1 bonus per target forward
    # Sampling: p == q, so every candidate is accepted too; a fixed seed reproduces the output.
    a = speculative_generate(target, prompt, 20, draft_model=target, num_draft_tokens=3, temperature=0.8, seed=7)
    b = speculative_generate(target, prompt, 20, draft_model=target, num_draft_tokens=3, temperature=0.8, seed=7)
    assert a.stats.acceptance_rate == 1.0 and a.tokens == b.tokens


def test_speculative_sampling_follows_target_distribution():
    """One candidate from q, verified against p: the first emitted token is distributed as p."""
    torch.manual_seed(0)
    p_logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, 0.5], [0.0] * 5])
    q_logits = torch.tensor([0.0, 2.0, 1.0, 0.0, -2.0])
    pick = _Picker(SamplingParams(temperature=1.0, seed=3), device="cpu")
    counts = torch.zeros(5)
    n = 20000
    for _ in range(n):
        d, q = pick.draft(q_logits)
        acc, nxt = pick.verify(p_logits, [d], [q])
        counts[d if acc == 1 else nxt] += 1
    p = torch.softmax(p_logits[0], -1)
    assert (counts / n - p).abs().max() < 0.015


def test_stop_tokens_and_errors(ple_target, mtp_drafter):
    prompt = _prompt(5)
    ref = greedy_decode(ple_target, prompt, 30)
    stop = ref[11]
    want = ref[: ref.index(stop) + 1]
    assert greedy_decode(ple_target, prompt, 30, stop_token_ids=[stop]) == want
    assert speculative_generate(ple_target, prompt, 30, drafter=mtp_drafter, stop_token_ids=[stop]).tokens == want
    with pytest.raises(ValueError, match="empty prompt"):
        speculative_generate(ple_target, [], 5, drafter=mtp_drafter)
    with pytest.raises(ValueError, match="one prompt at a time"):
        speculative_generate(ple_target, [[3, 4], [5, 6]], 5, drafter=mtp_drafter)
    with pytest.raises(ValueError, match="out of range"):
        speculative_generate(ple_target, [3, 999], 5, drafter=mtp_drafter)
    with pytest.raises(ValueError, match="exactly one"):
        speculative_generate(ple_target, [3, 4], 5)
    with pytest.raises(ValueError, match="exceeds the context"):
        speculative_generate(ple_target, [3, 4], 1000, drafter=mtp_drafter)
    with pytest.raises(ValueError, match="temperature"):
        speculative_generate(ple_target, [3, 4], 5, drafter=mtp_drafter, temperature=-1)
    other = _model(DENSE, 3, vocab_size=128)
    with pytest.raises(ValueError, match="vocab_size"):
        speculative_generate(ple_target, [3, 4], 5, draft_model=other)


class _CheckingOracleDrafter(torch.nn.Module):
    """Wraps the real drafter. On every call it (1) checks that the K/V, slots and hidden state the
    loop hands over give the same drafter output as K/V recomputed from scratch over the committed
    tokens, then (2) overrides the proposal with the true greedy token 60% of the time, so rounds
    end with every acceptance count 0..k and all rollback paths run."""

    def __init__(self, inner, target, seq):
        super().__init__()
        self.inner, self.target, self.seq = inner, target, seq
        self.calls, self.max_err, self.round_pos, self.step = 0, 0.0, None, 0
        self.g = torch.Generator().manual_seed(0)

    def check_target(self, cfg):
        self.inner.check_target(cfg)

    def input_embeds(self, target, tok, h):
        return self.inner.input_embeds(target, tok, h)

    def forward(self, emb, kv, pos, key_slots=None, last_slot=None):
        p = last_slot
        self.step = self.step + 1 if pos.item() == self.round_pos else 0
        self.round_pos = pos.item()
        logits, h = self.inner(emb, kv, pos, key_slots=key_slots, last_slot=p)
        with torch.no_grad():
            h_ref, kv_ref = self.target.model.forward_export_kv(torch.tensor([self.seq[: p + 1]]))
            if self.step == 0:  # the round starts from the target's hidden state at slot p
                self.max_err = max(self.max_err, (emb[..., -h_ref.shape[-1]:] - h_ref[:, -1:]).abs().max().item())
            ref, _ = self.inner(emb, kv_ref, pos)
        self.max_err = max(self.max_err, (logits - ref).abs().max().item())
        self.calls += 1
        want = self.seq[p + 2 + self.step] if p + 2 + self.step < len(self.seq) else 0
        tok = want if torch.rand((), generator=self.g) < 0.6 else int(torch.randint(3, 256, (), generator=self.g))
        forced = torch.zeros_like(logits)
        forced[..., tok] = 1.0
        return forced, h


def test_mtp_partial_acceptance_and_drafter_inputs(ple_target, mtp_drafter):
    prompt = _prompt(5, seed=4)
    want = greedy_decode(ple_target, prompt, 45)
    oracle = _CheckingOracleDrafter(mtp_drafter, ple_target, prompt + want)
    res = speculative_generate(ple_target, prompt, 45, drafter=oracle, num_draft_tokens=4)
    assert res.tokens == want
    assert oracle.max_err < 1e-4, oracle.max_err  # float noise only (a wrong key set gives O(0.1))
    seen = set(res.stats.accepted_per_round)
    assert {0, 4} <= seen and len(seen) >= 4, res.stats.accepted_per_round


def test_draft_model_partial_acceptance():
    target = _model(DENSE, 3)
    draft = _model(DENSE, 3)
    with torch.no_grad():  # a slightly perturbed copy: agrees often, not always
        g = torch.Generator().manual_seed(0)
        for p in draft.parameters():
            if p.dim() > 1:
                p.add_(torch.randn(p.shape, generator=g) * 0.01)
    prompt = _prompt(6)
    res = speculative_generate(target, prompt, 40, draft_model=draft, num_draft_tokens=4)
    assert res.tokens == greedy_decode(target, prompt, 40)
    assert 0 < res.stats.acceptance_rate < 1 and max(res.stats.accepted_per_round) >= 2


def test_stream_and_generate_take_a_draft_and_equal_plain_greedy(ple_target, mtp_drafter):
    """Speculative decoding through the ordinary entry points: the same tokens as plain greedy
    generation, streamed token by token, with the stop token ending the row."""
    prompt = _prompt(5)
    plain = generate(ple_target, [prompt], 24, stop_token_ids=())
    assert generate(ple_target, [prompt], 24, stop_token_ids=(), draft_model=ple_target) == plain
    g = stream(ple_target, [prompt], 24, stop_token_ids=(), drafter=mtp_drafter)
    steps = [s for s in g]
    assert all(len(s) == 1 for s in steps) and [s[0] for s in steps] == plain[0]
    assert g.tokens == plain and g.finish_reasons == ["length"] and g.stats.rounds > 0
    stop = plain[0][9]
    g = stream(ple_target, [prompt], 24, stop_token_ids=[stop], drafter=mtp_drafter)
    list(g)
    assert g.tokens[0] == plain[0][: plain[0].index(stop) + 1] and g.finish_reasons == ["stop_token"]
    with pytest.raises(Exception, match="one prompt"):
        stream(ple_target, [prompt, prompt], 4, drafter=mtp_drafter)
    with pytest.raises(Exception, match="repetition_penalty"):
        list(stream(ple_target, [prompt], 4, drafter=mtp_drafter, temperature=0.5, repetition_penalty=1.2))


def test_cli_generate_draft_matches_plain(tmp_path, ple_target):
    from typer.testing import CliRunner

    from gemma4.cli import app
    from gemma4.io import save_pretrained

    save_pretrained(ple_target, tmp_path / "t")
    ids = " ".join(map(str, _prompt(5)))
    base = ["generate", "-m", str(tmp_path / "t"), "--ids", ids, "-n", "12", "--json", "--no-timings"]
    plain = CliRunner().invoke(app, base)
    spec = CliRunner().invoke(app, base + ["--draft", str(tmp_path / "t"), "--draft-tokens", "3"])
    assert plain.exit_code == 0 and spec.exit_code == 0, (plain.output, spec.output)
    import json

    assert json.loads(spec.output.strip().splitlines()[-1])["ids"] == json.loads(plain.output.strip().splitlines()[-1])["ids"]
