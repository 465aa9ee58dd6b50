"""Data-parallel training with FSDP2 (``fully_shard``): gloo on CPUs, nccl on GPUs, started by torchrun.

Every rank reads the same data and the same seeded batch order; each global micro-batch of
``batch_size x world`` rows is split into contiguous per-rank slices, and the loss of every slice is
divided by the target count of the whole global step. FSDP2 averages gradients over ranks, so each
rank's loss is multiplied by the world size: the summed gradient is exactly the single-process one of
the same global batch (up to summation order).

Checkpoints stay in the single-process format (full tensors, gathered with ``full_tensor()``, written by
rank 0): a run can resume on another number of processes. On resume each rank takes its own shard.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from gemma4.train.loss import causal_lm_loss


@dataclass
class DistContext:
    rank: int
    world: int
    device: torch.device
    mesh: object = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_sum(self, x: float) -> float:
        t = torch.tensor([x], dtype=torch.float64, device=self.device if self.device.type == "cuda" else "cpu")
        dist.all_reduce(t)
        return float(t.item())

    def rows(self, batch: dict) -> dict:
        """This rank's contiguous slice of a global micro-batch."""
        n = next(iter(batch.values())).shape[0]
        if n % self.world:
            raise ValueError(f"a global micro-batch of {n} rows does not split over {self.world} ranks")
        per = n // self.world
        return {k: v[self.rank * per : (self.rank + 1) * per] for k, v in batch.items()}

    def barrier(self) -> None:
        dist.barrier()


def from_env(backend: str | None = None) -> DistContext | None:
    """A DistContext when started by torchrun with WORLD_SIZE > 1 (initializing the process group),
    else None."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return None
    from torch.distributed.device_mesh import init_device_mesh

    use_cuda = torch.cuda.is_available() and backend in (None, "nccl")
    backend = backend or ("nccl" if use_cuda else "gloo")
    if not dist.is_initialized():
        dist.init_process_group(backend)
    rank = dist.get_rank()
    if use_cuda:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    return DistContext(rank, dist.get_world_size(), device, mesh)


class LossModule(nn.Module):
    """The model plus its loss as one module: FSDP2 gathers the root's parameters (embedding, final
    norm, head) in the root's forward, and the chunked loss reads the head inside it."""

    def __init__(self, lm):
        super().__init__()
        self.lm = lm

    def forward(self, input_ids, labels, position_ids=None, segment_ids=None, num_targets=None):
        return causal_lm_loss(self.lm, input_ids, labels, position_ids=position_ids, segment_ids=segment_ids,
                              num_targets=num_targets)


def shard(model, ctx: DistContext) -> LossModule:
    """fully_shard every decoder layer, then the root (model + loss). Returns the module to call."""
    from torch.distributed.fsdp import fully_shard

    model.to(ctx.device)
    for layer in model.model.layers:
        fully_shard(layer, mesh=ctx.mesh)
    root = LossModule(model)
    fully_shard(root, mesh=ctx.mesh)
    return root


def full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a (possibly sharded) DTensor; every rank must call this in the same order."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def like(full_tensor: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``full_tensor`` laid out like ``target`` (this rank's shard of a DTensor, or itself)."""
    if hasattr(target, "device_mesh"):
        from torch.distributed.tensor import distribute_tensor

        return distribute_tensor(full_tensor.to(target.device), target.device_mesh, target.placements)
    return full_tensor.to(target.device)
