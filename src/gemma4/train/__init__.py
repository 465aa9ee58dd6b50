"""Training: the chunked next-token loss, data loading and packing, the training loop, LoRA/QLoRA
adapters (PEFT's on-disk format) and resumable checkpoints."""

from gemma4.train.loss import IGNORE, causal_lm_loss, hidden_loss_sum
from gemma4.train.trainable import make_trainable, trainable_parameters
from gemma4.train.lora import (LoRAError, LoRALinear, add_lora, load_adapter, merge_lora, save_adapter,
                               unwrap_lora)
from gemma4.train.data import DataError, DataReport, pack, read_documents, split_heldout
from gemma4.train.loop import TrainConfig, TrainError, Trainer, TrainResult, lr_at, plot_log, read_log
from gemma4.train.state import TrainStateError

__all__ = [
    "IGNORE", "causal_lm_loss", "hidden_loss_sum", "make_trainable", "trainable_parameters",
    "LoRAError", "LoRALinear", "add_lora", "load_adapter", "merge_lora", "save_adapter", "unwrap_lora",
    "DataError", "DataReport", "pack", "read_documents", "split_heldout",
    "TrainConfig", "TrainError", "Trainer", "TrainResult", "lr_at", "plot_log", "read_log", "TrainStateError",
]
