"""The fused head cross-entropy (`hidden_loss_sum` over a plain head weight: loss, dL/dh and dL/dw formed
chunk by chunk in the forward) against a plain reference that builds the full float32 logits, applies the
soft-cap and calls `F.cross_entropy`: loss and gradients for the hidden states and the head weight, with
and without a soft-cap, trainable and frozen head, ragged chunks, masked labels, a scaled upstream gradient.
"""

import copy
import types

import pytest
import torch
import torch.nn.functional as F

from gemma4.train import causal_lm_loss, make_trainable
from gemma4.train.loss import IGNORE, hidden_loss_sum
from train_tiny import tiny_model

V, H, N = 300, 24, 40


def _head_model(cap, tied: bool, trainable: bool, seed: int = 0):
    """The smallest object `hidden_loss_sum` reads: a config and a bare head (tied embedding or lm_head)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(V, H, generator=g) * 0.6
    cfg = types.SimpleNamespace(vocab_size=V, final_logit_softcapping=cap)
    if tied:
        head = torch.nn.Embedding(V, H, _weight=w.clone())
        model = types.SimpleNamespace(config=cfg, lm_head=None, model=types.SimpleNamespace(embed_tokens=head))
    else:
        head = torch.nn.Linear(H, V, bias=False)
        with torch.no_grad():
            head.weight.copy_(w)
        model = types.SimpleNamespace(config=cfg, lm_head=head)
    head.weight.requires_grad_(trainable)
    return model, head.weight


def _inputs(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, H, generator=g) * 2.0  # logits of std ~7: the soft-cap's curve matters at cap 5
    t = torch.randint(0, V, (N,), generator=g)
    return h, t


def _reference(h, w, t, cap):
    x = h @ w.t()  # [N,V] float32, all of it
    if cap:
        x = torch.tanh(x / cap) * cap
    return F.cross_entropy(x, t, reduction="sum")


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("cap", [None, 5.0])
@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("trainable", [True, False])
@pytest.mark.parametrize("chunk", [7, None])  # ragged token chunks; the default (one chunk)
@pytest.mark.parametrize("block", [64, None])  # 5 vocabulary blocks, the last ragged; the default (one)
def test_fused_loss_and_grads_match_full_logits(cap, tied, trainable, chunk, block):
    model, w = _head_model(cap, tied, trainable)
    h0, t = _inputs()
    h = h0.clone().requires_grad_(True)
    loss = hidden_loss_sum(model, h, t, chunk, vocab_block=block)
    (loss * 2.5).backward()  # an upstream gradient other than 1 is applied in backward

    wr = w.detach().clone().requires_grad_(trainable)
    hr = h0.clone().requires_grad_(True)
    ref = _reference(hr, wr, t, cap)
    (ref * 2.5).backward()

    assert abs(loss.item() - ref.item()) <= 1e-6 * ref.item()
    assert _rel(h.grad, hr.grad) <= 1e-5
    if trainable:
        assert w.grad is not None and w.grad.dtype == torch.float32
        assert _rel(w.grad, wr.grad) <= 1e-5
    else:
        assert w.grad is None


def test_fused_loss_without_grad_and_empty_input():
    model, w = _head_model(5.0, True, True)
    h, t = _inputs(2)
    with torch.no_grad():
        loss = hidden_loss_sum(model, h, t, 9, vocab_block=70)
    assert abs(loss.item() - _reference(h, w.detach(), t, 5.0).item()) <= 1e-6 * loss.item()
    # An all-masked micro-batch keeps a graph and gives a zero gradient.
    e = torch.zeros(0, H, requires_grad=True)
    hidden_loss_sum(model, e, t[:0]).backward()
    assert e.grad is not None and e.grad.shape == (0, H)


@pytest.mark.parametrize("cap", [None, 5.0])
@pytest.mark.parametrize("trainable", [True, False])
def test_fused_bf16_is_as_close_as_autograd_bf16(cap, trainable):
    """Under bf16 autocast (the training path: bf16 matmuls, float32 softmax): the fused gradients are
    no further from the float32 reference than autograd's through bf16 full logits."""
    model, w = _head_model(cap, True, trainable, seed=3)
    h0, t = _inputs(4)
    h = h0.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = hidden_loss_sum(model, h, t, 11, vocab_block=64)
    loss.backward()

    wa, ha = w.detach().clone().requires_grad_(True), h0.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        x = F.linear(ha, wa)  # bf16 [N,V]
        if cap:
            x = torch.tanh(x / cap) * cap
        auto = F.cross_entropy(x.float(), t, reduction="sum")
    auto.backward()

    wr, hr = w.detach().clone().requires_grad_(True), h0.clone().requires_grad_(True)
    ref = _reference(hr, wr, t, cap)
    ref.backward()
    assert abs(loss.item() - auto.item()) <= 1e-5 * auto.item()  # same bf16 logits, same float32 softmax
    pairs = [(h.grad, ha.grad, hr.grad)] + ([(w.grad, wa.grad, wr.grad)] if trainable else [])
    for ours, theirs, exact in pairs:
        assert _rel(ours.float(), exact) <= 1.5 * _rel(theirs.float(), exact) + 1e-3


@pytest.mark.parametrize("cap", [30.0, None])
@pytest.mark.parametrize("trainable_head", [True, False])
def test_causal_lm_loss_with_masked_labels_matches_full_logits(cap, trainable_head):
    """End to end through a tiny model (float32): ignored labels, the mean over real targets, and every
    parameter's gradient equal those of F.cross_entropy(ignore_index=-100) over the model's full logits."""
    ours = make_trainable(tiny_model("dense", seed=5))
    ours.config.final_logit_softcapping = cap
    ours.model.embed_tokens.weight.requires_grad_(trainable_head)
    ref = copy.deepcopy(ours)
    g = torch.Generator().manual_seed(6)
    ids = torch.randint(3, ours.config.vocab_size, (2, 21), generator=g)
    labels = ids.clone()
    labels[0, :6] = IGNORE
    labels[1, 15:] = IGNORE

    loss = causal_lm_loss(ours, ids, labels, chunk=4)
    loss.backward()
    logits = ref(ids)[:, :-1]  # [B,T-1,V]
    want = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=IGNORE)
    want.backward()

    assert abs(loss.item() - want.item()) <= 1e-5 * want.item()
    mine, theirs = dict(ours.named_parameters()), dict(ref.named_parameters())
    assert (mine["model.embed_tokens.weight"].grad is not None) == trainable_head
    for name, p in theirs.items():
        if p.grad is None:
            assert mine[name].grad is None, name
            continue
        cos = F.cosine_similarity(mine[name].grad.flatten().double(), p.grad.flatten().double(), dim=0).item()
        assert cos >= 0.99999, f"{name}: cosine {cos}"
        assert _rel(mine[name].grad, p.grad) <= 1e-4, name
