"""The training kernels: the compiled gated GELU, RMSNorm and cross-entropy block against PyTorch, the fused
LoRA matmul against the unfused composition, and LoRA gradients through all of them (what `Trainer` runs)
against transformers + PEFT in float32."""

import math

import pytest
import torch
import torch.nn.functional as F
import transformers

import gemma4
from gemma4.model.decoder import MLP, GatedGELU, RMSNorm
from gemma4.quant import native
from gemma4.train import add_lora, causal_lm_loss, use_training_kernels
from gemma4.train.kernels import NativeGatedGELU, NativeRMSNorm
from gemma4.train.lora import LoRALinear
from tiny import hf_model

needs_native = pytest.mark.skipif(not native.available(), reason="the compiled kernels are unavailable here")
peft = pytest.importorskip("peft", reason="PEFT gradient parity needs `pip install peft`")


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gated_gelu_kernel_matches_pytorch(dtype):
    g = torch.Generator().manual_seed(0)
    a = (torch.randn(3, 37, 70, generator=g) * 3).to(dtype)  # odd sizes: vector tails
    u = torch.randn(3, 37, 70, generator=g).to(dtype)
    dy = torch.randn(3, 37, 70, generator=g).to(dtype)
    a32, u32 = a.float().requires_grad_(), u.float().requires_grad_()
    ref = F.gelu(a32, approximate="tanh") * u32
    ref.backward(dy.float())
    y = native.gelu_mul_fwd(a, u)
    da, du = native.gelu_mul_bwd(a, u, dy)
    assert y.dtype == da.dtype == du.dtype == dtype
    tol = 1e-6 if dtype == torch.float32 else 8e-3  # float32: exp-based tanh; bf16: one rounding
    assert _rel(y, ref) <= tol and _rel(da, a32.grad) <= tol and _rel(du, u32.grad) <= tol
    with pytest.raises(ValueError, match="gelu_mul_fwd"):
        native.gelu_mul_fwd(a, u.float() if dtype == torch.bfloat16 else u.bfloat16())


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("scale,offset", [(True, 0.0), (True, 1.0), (False, 0.0)])
def test_rmsnorm_kernel_matches_pytorch(dtype, scale, offset):
    g = torch.Generator().manual_seed(1)
    norm = RMSNorm(53, 1e-6, with_scale=scale, offset=offset)
    if scale:
        with torch.no_grad():
            norm.weight.uniform_(-0.5, 1.5, generator=g)
    x = (torch.randn(2, 9, 53, generator=g) * 4).to(dtype)
    dy = torch.randn(2, 9, 53, generator=g).to(dtype)
    xr = x.clone().requires_grad_()
    ref = norm(xr)
    ref.backward(dy)
    y, rstd = native.rmsnorm_fwd(x, norm.weight, offset, 1e-6)
    dx, dw = native.rmsnorm_bwd(x, dy, norm.weight, offset, rstd, want_dw=scale)
    tol = 1e-6 if dtype == torch.float32 else 8e-3
    assert y.dtype == dx.dtype == dtype and _rel(y, ref) <= tol and _rel(dx, xr.grad) <= tol
    if scale:
        assert dw.dtype == torch.float32 and _rel(dw, norm.weight.grad) <= (1e-6 if dtype == torch.float32 else 1e-5)
    else:
        assert dw is None


@needs_native
@pytest.mark.parametrize("softcap", [None, 30.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cross_entropy_block_kernel_is_an_online_softmax(softcap, dtype):
    """Blocks fed one after another give each row's logsumexp, and each block's exp(logit - running max)
    (times the cap's derivative) as the PyTorch loop computes them."""
    g = torch.Generator().manual_seed(2)
    c, v, nb = 7, 100, 33  # ragged last block
    raw = (torch.randn(c, v, generator=g) * 20).to(dtype)
    x = torch.tanh(raw / softcap).to(dtype) if softcap else raw  # what the loop hands over
    logits = ((x.float() * softcap).to(dtype).float() if softcap else x.float())
    m = torch.full((c, 1), -math.inf)
    ssum, scale = torch.zeros(c, 1), torch.empty(c, 1)
    for v0 in range(0, v, nb):
        xb = x[:, v0 : v0 + nb].contiguous()
        e = torch.empty_like(xb)
        m_old = m.clone()
        native.ce_block_(xb, softcap, m, ssum, scale, e)
        m_ref = torch.maximum(m_old, logits[:, v0 : v0 + nb].amax(1, keepdim=True))
        assert torch.equal(m, m_ref)
        want_scale = torch.where(torch.isinf(m_old), torch.zeros_like(m_old), (m_old - m_ref).exp())
        assert torch.allclose(scale, want_scale, rtol=1e-6, atol=0)
        want_e = (logits[:, v0 : v0 + nb] - m_ref).exp()
        if softcap:
            want_e = want_e * (1 - xb.float() ** 2)
        assert _rel(e, want_e) <= (1e-6 if dtype == torch.float32 else 8e-3)
    lse = m.squeeze(1) + ssum.squeeze(1).log()
    assert torch.allclose(lse, torch.logsumexp(logits, dim=1), rtol=1e-6, atol=1e-5)


def test_fused_lora_matmul_equals_the_composition():
    """LoRALinear's training path (one autograd function, the update accumulated by the GEMM) against
    the module composition it replaces: float32 outputs and every gradient, with a bias; bf16 autocast
    close; dropout keeps the composition."""
    g = torch.Generator().manual_seed(3)
    base = torch.nn.Linear(24, 40, bias=True)
    with torch.no_grad():
        base.weight.normal_(generator=g)
        base.bias.normal_(generator=g)
    base.requires_grad_(False)
    lora = LoRALinear(base, r=4, alpha=8.0)
    with torch.no_grad():
        lora.lora_B.weight.normal_(generator=g)
    x = torch.randn(2, 5, 24, generator=g)
    outs = []
    for fused in (True, False):
        lora.zero_grad(set_to_none=True)
        xr = x.clone().requires_grad_()
        y = lora(xr) if fused else lora._unfused(xr)
        y.square().sum().backward()
        outs.append((y.detach(), xr.grad, lora.lora_A.weight.grad, lora.lora_B.weight.grad))
    for a, b in zip(*outs):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = lora(x.clone().requires_grad_())
        ref = lora._unfused(x)
    assert y.dtype == torch.bfloat16 and _rel(y, ref) <= 1e-2
    y.float().sum().backward()
    assert lora.lora_A.weight.grad.dtype == torch.float32
    drop = LoRALinear(base, r=4, alpha=8.0, dropout=0.5)
    assert not drop._fused_ok(x)


@needs_native
def test_kernels_swap_in_and_inference_stays_exact():
    """use_training_kernels swaps every GatedGELU and RMSNorm (keeping the norm weights, so the state dict
    is unchanged); without a graph the swapped modules take the PyTorch path, bit for bit."""
    from train_tiny import tiny_model

    ref = tiny_model("ple", seed=4)
    m = tiny_model("ple", seed=4)
    keys = list(m.state_dict())
    weights = {n: p for n, p in m.named_parameters()}
    n = use_training_kernels(m)
    assert n > 0 and not any(type(x) in (GatedGELU, RMSNorm) for x in m.modules())
    assert any(isinstance(x, NativeGatedGELU) for x in m.modules()) and any(isinstance(x, NativeRMSNorm) for x in m.modules())
    assert list(m.state_dict()) == keys and all(p is weights[k] for k, p in m.named_parameters())
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert torch.equal(m(ids), ref(ids))
    # the inference fast path still packs the MLPs (the activation child carries no weights)
    from gemma4.infer import fast_path
    from gemma4.infer.fast_path import PackedMLP

    fast = fast_path.use_fast_path(tiny_model("ple", seed=4))
    assert all(isinstance(layer.mlp, PackedMLP) for layer in fast.model.layers)
    assert isinstance(MLP(8, 16).act, GatedGELU)


@needs_native
@pytest.mark.parametrize("kind", ["ple", "gemma3"])
def test_lora_gradients_through_the_kernels_match_peft(kind, tmp_path, monkeypatch):
    """LoRA factor gradients of ours with every training kernel on (fused LoRA matmul, compiled GELU,
    RMSNorm and frozen-head cross-entropy) against transformers + PEFT, float32, on a tiny checkpoint."""
    path = tmp_path / kind
    hf_model(kind, seed=30).save_pretrained(str(path))
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    cls = transformers.Gemma3ForCausalLM if kind == "gemma3" else transformers.Gemma4ForCausalLM
    hf = cls.from_pretrained(str(path), dtype=torch.float32, attn_implementation="eager")
    pm = peft.get_peft_model(hf, peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, lora_dropout=0.0))
    ours = gemma4.load_pretrained(path)
    add_lora(ours, targets, r=4, alpha=8)
    assert use_training_kernels(ours) > 0
    g = torch.Generator().manual_seed(6)
    mine = dict(ours.named_parameters())
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
                mine[n.replace("base_model.model.", "").replace(".default", "")].copy_(p)
    calls = {}
    for name in ("gelu_mul_fwd", "gelu_mul_bwd", "rmsnorm_fwd", "rmsnorm_bwd", "ce_block_"):
        def counted(*a, _f=getattr(native, name), _n=name, **k):
            calls[_n] = calls.get(_n, 0) + 1
            return _f(*a, **k)
        monkeypatch.setattr(native, name, counted)
    from gemma4.train.lora import _LoRAMatmul

    fused = _LoRAMatmul.apply
    monkeypatch.setattr(_LoRAMatmul, "apply", lambda *a: calls.__setitem__("lora", calls.get("lora", 0) + 1) or fused(*a))
    ids = torch.randint(3, 256, (2, 24), generator=g)
    labels = ids.clone()
    labels[0, :5] = -100
    ref_loss = pm(input_ids=ids, labels=labels).loss
    ref_loss.backward()
    loss = causal_lm_loss(ours, ids, labels)
    loss.backward()
    assert abs(loss.item() - ref_loss.item()) <= 1e-5 * ref_loss.item()
    assert set(calls) == {"gelu_mul_fwd", "gelu_mul_bwd", "rmsnorm_fwd", "rmsnorm_bwd", "ce_block_", "lora"}, calls
    checked = 0
    for n, p in pm.named_parameters():
        if "lora_" not in n:
            continue
        ours_g = mine[n.replace("base_model.model.", "").replace(".default", "")].grad
        cos = F.cosine_similarity(ours_g.flatten().double(), p.grad.flatten().double(), dim=0).item()
        assert cos >= 0.99999 and _rel(ours_g, p.grad) <= 1e-4, (n, cos, _rel(ours_g, p.grad))
        checked += 1
    assert checked > 0
