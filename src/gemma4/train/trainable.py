"""Turning a loaded (inference) model into a trainable one."""

from __future__ import annotations

import torch
from torch import nn


def make_trainable(model: nn.Module, *, gradient_checkpointing: bool = False, only: str | None = None) -> nn.Module:
    """Every floating-point parameter requires grad (``only="lora"``: just the LoRA factors, the base
    frozen), the model is put in train mode. Loaders return frozen eval-mode models because inference
    must not pay for autograd bookkeeping."""
    for name, p in model.named_parameters():
        want = p.is_floating_point() and (only is None or f".{only}_" in name or name.startswith(f"{only}_"))
        p.requires_grad_(want)
    if gradient_checkpointing:
        model.gradient_checkpointing_enable()
    return model.train()


def trainable_parameters(model: nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]
