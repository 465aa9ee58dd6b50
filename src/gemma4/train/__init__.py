"""Training: the chunked next-token loss, data loading and packing, the training loop, LoRA/QLoRA
adapters (PEFT's on-disk format) and resumable checkpoints."""

from gemma4.train.loss import causal_lm_loss, hidden_loss_sum, IGNORE
from gemma4.train.trainable import make_trainable, trainable_parameters

__all__ = ["causal_lm_loss", "hidden_loss_sum", "IGNORE", "make_trainable", "trainable_parameters"]
