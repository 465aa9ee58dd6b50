"""Faster CPU kernels for training, swapped into a model through its module tree.

``use_training_kernels(model)`` replaces

* every MLP's `gemma4.model.decoder.GatedGELU` (``gelu_tanh(g) * u``) with `NativeGatedGELU`: one compiled
  pass forward and one backward (:func:`gemma4.quant.native.gelu_mul_fwd`, ``gelu_mul_bwd``) instead of
  PyTorch's tanh-GELU kernel, a multiply, and their three backward ops, each a pass over a
  [tokens, intermediate] tensor;
* every `gemma4.model.decoder.RMSNorm` with `NativeRMSNorm` (the same weight Parameter): one pass each
  way (:func:`gemma4.quant.native.rmsnorm_fwd`, ``rmsnorm_bwd``) instead of ~9 ops forward and ~12
  backward (upcast, square, mean, power, multiplies, downcast), ~10x faster per norm on one core.

Values are the same functions computed in float32 and rounded once: float32-close to the PyTorch
compositions (sums in another order); under bf16 autocast the gated GELU is within about one bf16 ulp,
since autograd rounds the intermediate products to bf16 first. Tensors the kernels do not take (not on the CPU,
mixed dtypes, float16) go through the PyTorch composition, so the swap is always safe; without the compiled
library (no C compiler, ``GEMMA4_NATIVE=0``) nothing is swapped.

The Trainer applies it; the state dict and every parameter are unchanged. The kernels run only in forwards
that build a graph (grad enabled and an input or weight requiring grad): inference with the trained model
object (``no_grad``, generation, held-out evaluation) takes the PyTorch path and stays bit-identical to a
freshly loaded copy.
"""

from __future__ import annotations

import torch
from torch import nn

from gemma4.model.decoder import GatedGELU, RMSNorm, gelu_tanh
from gemma4.quant import native

__all__ = ["NativeGatedGELU", "NativeRMSNorm", "use_training_kernels"]


def _training(*ts) -> bool:
    """A forward that builds a graph: the kernels serve training only, so that inference with a trained
    model (no_grad, or nothing requiring grad) stays bit-identical to a freshly loaded one."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in ts)


class _GatedGELUFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, g, u):
        ctx.save_for_backward(g, u)
        return native.gelu_mul_fwd(g, u)

    @staticmethod
    def backward(ctx, dy):
        g, u = ctx.saved_tensors
        return native.gelu_mul_bwd(g, u, dy.contiguous())


class NativeGatedGELU(GatedGELU):
    """``gelu_tanh(g) * u`` through the compiled kernels where they apply (see the module docstring)."""

    def forward(self, g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        if (_training(g, u) and g.device.type == "cpu" and g.dtype == u.dtype and g.dtype in (torch.float32, torch.bfloat16)
                and g.shape == u.shape):
            return _GatedGELUFn.apply(g.contiguous(), u.contiguous())
        return gelu_tanh(g) * u


class _RMSNormFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, offset, eps):
        y, rstd = native.rmsnorm_fwd(x, weight, offset, eps)
        ctx.save_for_backward(x, weight, rstd)
        ctx.offset = offset
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, rstd = ctx.saved_tensors
        want_dw = weight is not None and ctx.needs_input_grad[1]
        dx, dw = native.rmsnorm_bwd(x, dy.contiguous(), weight, ctx.offset, rstd, want_dw)
        return dx, (dw.to(weight.dtype) if dw is not None else None), None, None


class NativeRMSNorm(RMSNorm):
    """`gemma4.model.decoder.RMSNorm` through the compiled kernels where they apply (float32 or bf16 on the
    CPU); built by :meth:`of`, which keeps the original's weight Parameter."""

    @classmethod
    def of(cls, norm: RMSNorm) -> "NativeRMSNorm":
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.eps, new.offset = norm.eps, norm.offset
        new.weight = norm.weight  # the same Parameter (or None): optimizer, state dict and sharing unchanged
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if _training(x, w) and x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16) and (
                w is None or w.device.type == "cpu"):
            return _RMSNormFn.apply(x.contiguous(), w, float(self.offset), float(self.eps))
        return super().forward(x)


def use_training_kernels(model: nn.Module) -> int:
    """Swap the faster training kernels in (see the module docstring); returns how many modules changed
    (0 when the compiled library is unavailable)."""
    if not native.available():
        return 0
    n = 0
    for mod in list(model.modules()):
        for name, child in list(mod.named_children()):
            if type(child) is GatedGELU:
                setattr(mod, name, NativeGatedGELU())
                n += 1
            elif type(child) is RMSNorm:
                setattr(mod, name, NativeRMSNorm.of(child))
                n += 1
    return n
