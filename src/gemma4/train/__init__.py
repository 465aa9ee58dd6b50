"""Training: the chunked next-token loss, data loading and packing, the training loop, LoRA/QLoRA
adapters (PEFT's on-disk format) and resumable checkpoints; preference and constrained objectives
(DPO family, Lagrangian, GRPO-Lagrangian) and a Safe RLHF cost model that drive the same loop."""

from gemma4.train.loss import IGNORE, causal_lm_loss, hidden_loss_sum
from gemma4.train.trainable import make_trainable, trainable_parameters
from gemma4.train.kernels import NativeGatedGELU, use_training_kernels
from gemma4.train.lora import (LoRAError, LoRALinear, add_lora, load_adapter, merge_lora, save_adapter,
                               unwrap_lora)
from gemma4.train.data import DataError, DataReport, pack, read_documents, split_heldout
from gemma4.train.loop import TrainConfig, TrainError, Trainer, TrainResult, lr_at, plot_log, read_log
from gemma4.train.state import TrainStateError
from gemma4.train.preference import Pairs, Responses, preference_loss, sequence_logprobs
from gemma4.train.constrained import LagrangeMultiplier
from gemma4.train.cost_model import CostModel

__all__ = [
    "IGNORE", "causal_lm_loss", "hidden_loss_sum", "make_trainable", "trainable_parameters",
    "NativeGatedGELU", "use_training_kernels",
    "LoRAError", "LoRALinear", "add_lora", "load_adapter", "merge_lora", "save_adapter", "unwrap_lora",
    "DataError", "DataReport", "pack", "read_documents", "split_heldout",
    "TrainConfig", "TrainError", "Trainer", "TrainResult", "lr_at", "plot_log", "read_log", "TrainStateError",
    "Pairs", "Responses", "preference_loss", "sequence_logprobs", "LagrangeMultiplier", "CostModel",
]
