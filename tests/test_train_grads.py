"""Gradients equal transformers' for every parameter (float32), through our loader and chunked loss.

Reference: transformers' Gemma4ForCausalLM without gradient checkpointing, on tiny randomized
checkpoints of every variant shape (PLE + KV sharing, K=V full layers, MoE, Gemma 3). Ours: the same
checkpoint loaded with `gemma4.load_pretrained`, loss from `gemma4.train.causal_lm_loss` (chunked, the
final soft-cap inside the chunks), with and without gradient checkpointing.
"""

import pytest
import torch
import torch.nn.functional as F

import gemma4
from gemma4.quant import native
from gemma4.train import causal_lm_loss, make_trainable, use_training_kernels
from tiny import hf_model

KINDS = ["dense", "ple", "moe", "gemma3"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    out = {}
    for i, kind in enumerate(KINDS):
        d = tmp_path_factory.mktemp(kind)
        ref = hf_model(kind, seed=10 + i)
        ref.save_pretrained(str(d))
        out[kind] = (ref, d)
    return out


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 256, (2, 40), generator=g)  # 40 tokens: 5 sliding windows of 8
    labels = ids.clone()
    labels[0, :7] = -100  # a prompt without loss
    labels[1, 30:] = -100
    return ids, labels


def _reference_grads(ref, ids, labels):
    ref.zero_grad(set_to_none=True)
    for p in ref.parameters():
        p.requires_grad_(True)
    loss = ref(input_ids=ids, labels=labels).loss
    loss.backward()
    return loss.detach(), {n: p.grad.detach().clone() for n, p in ref.named_parameters() if p.grad is not None}


def _compare(ours: dict, ref: dict, kind: str):
    assert set(ours) == set(ref), f"{kind}: parameter sets differ: {sorted(set(ours) ^ set(ref))[:6]}"
    worst = (1.0, 0.0, "")
    for name, g_ref in ref.items():
        g = ours[name]
        nref = g_ref.norm().item()
        if nref == 0.0:
            assert g.abs().max().item() == 0.0, f"{kind}/{name}: reference gradient is zero, ours is not"
            continue
        cos = F.cosine_similarity(g.flatten().double(), g_ref.flatten().double(), dim=0).item()
        rel = ((g - g_ref).norm() / nref).item()
        if cos < worst[0] or rel > worst[1]:
            worst = (min(cos, worst[0]), max(rel, worst[1]), name)
        assert cos >= 0.99999, f"{kind}/{name}: cosine {cos:.7f}"
        assert rel <= 1e-4, f"{kind}/{name}: relative error {rel:.2e}"
    return worst


@pytest.mark.parametrize("kind", KINDS)
def test_gradients_match_transformers(models, kind):
    ref, path = models[kind]
    ids, labels = _batch()
    ref_loss, ref_grads = _reference_grads(ref, ids, labels)

    ours = make_trainable(gemma4.load_pretrained(path))
    # Last: the compiled training kernels the Trainer swaps in (RMSNorm with its weight gradient, gated GELU).
    for ckpt, kernels in ((False, False), (True, False), (False, True)):
        if ckpt:
            ours.gradient_checkpointing_enable()
        else:
            ours.gradient_checkpointing_disable()
        if kernels:
            assert use_training_kernels(ours) > 0 or not native.available()
        ours.zero_grad(set_to_none=True)
        # chunk=13: several chunks and a ragged last one
        loss = causal_lm_loss(ours, ids, labels, chunk=13)
        loss.backward()
        assert abs(loss.item() - ref_loss.item()) <= 1e-5 * ref_loss.item()
        grads = {n: p.grad for n, p in ours.named_parameters() if p.grad is not None}
        ref_g = dict(ref_grads)
        if ours.config.tie_word_embeddings:
            ref_g.pop("lm_head.weight", None)  # the tied head is embed_tokens (listed once by both)
        worst = _compare(grads, ref_g, f"{kind}/ckpt={ckpt}/kernels={kernels}")
        print(f"{kind} ckpt={ckpt} kernels={kernels}: min cosine {worst[0]:.9f}, max rel err {worst[1]:.2e} ({worst[2]})")

    if kind == "ple":
        # The layers that produce the K/V shared with the last 4 layers get gradient from those
        # consumers too: compared above, named here so a regression says where it is.
        producers = [i for i, m in enumerate(ours.config.kv_sharing_modes) if m == "store"]
        assert producers, "the PLE kind must have KV-sharing producer layers"
        for i in producers:
            for w in ("k_proj", "v_proj"):
                name = f"model.layers.{i}.self_attn.{w}.weight"
                g = dict(ours.named_parameters())[name].grad
                cos = F.cosine_similarity(g.flatten(), ref_grads[name].flatten(), dim=0).item()
                assert cos >= 0.99999, f"producer {name}: cosine {cos}"


def test_chunked_loss_matches_full_logits_in_bf16_autocast(models):
    """Under bf16 autocast the chunked loss equals the loss on the model's own full logits."""
    _, path = models["ple"]
    ours = make_trainable(gemma4.load_pretrained(path))
    ids, labels = _batch(1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = causal_lm_loss(ours, ids, labels, chunk=16)
        full = ours(ids)[:, :-1].float()
        ref = F.cross_entropy(full.reshape(-1, full.shape[-1]), labels[:, 1:].reshape(-1))
    assert abs(loss.item() - ref.item()) <= 1e-4 * ref.item()
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in ours.parameters() if p.grad is not None)


def test_chunked_loss_never_builds_full_logits(models):
    """The forward keeps no tensor with a vocabulary axis bigger than one chunk."""
    _, path = models["dense"]
    ours = make_trainable(gemma4.load_pretrained(path))
    ids, labels = _batch(2)
    big = []

    def pack(t):
        if t.dim() >= 2 and t.shape[-1] == 256 and t.numel() > 8 * 256:
            big.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = causal_lm_loss(ours, ids, labels, chunk=8)
    loss.backward()
    assert big == [], f"saved logits-sized tensors: {big}"


def test_checkpointing_is_off_without_grad(models):
    _, path = models["moe"]
    ours = gemma4.load_pretrained(path).gradient_checkpointing_enable()
    ids, _ = _batch(3)
    with torch.no_grad():
        a = ours(ids)
    ours.gradient_checkpointing_disable()
    with torch.no_grad():
        b = ours(ids)
    assert torch.equal(a, b)


def test_checkpointing_saves_fewer_activations(models):
    _, path = models["ple"]
    ours = make_trainable(gemma4.load_pretrained(path))
    ids, labels = _batch(4)

    def saved_bytes():
        total = [0]

        def pack(t):
            total[0] += t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            causal_lm_loss(ours, ids, labels)
        return total[0]

    plain = saved_bytes()
    ours.gradient_checkpointing_enable()
    ckpt = saved_bytes()
    assert ckpt < 0.5 * plain, (ckpt, plain)
