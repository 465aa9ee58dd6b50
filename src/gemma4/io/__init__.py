"""Checkpoints on disk: safetensors directories (+ hub names), the one GGUF reader/writer, GGUF-native
quantized blocks, drafter checkpoints, and the cached real assets. Only safetensors, GGUF and JSON are
ever read: never pickle."""

from gemma4.io import assets
from gemma4.io.checkpoint import (CheckpointError, CheckpointNotFoundError, iter_safetensors, load_safetensors_dir, load_state_streaming,
                                  map_key, read_safetensors_header, safetensors_files, stored_dtype)
from gemma4.io.hub import NAMED_CHECKPOINTS, resolve_path
from gemma4.io.gguf import (FILE_TYPES, GGUFError, GGUFFile, config_from_gguf, dequantize, gguf_to_hf, hf_to_gguf,
                            load_gguf, save_gguf)
from gemma4.io.gguf_native import gguf_is_bf16, gguf_is_quantized, gguf_native_model, gguf_native_types
from gemma4.io.drafter import load_drafter, save_drafter
from gemma4.io.load import load_config, load_pretrained, save_pretrained

__all__ = [
    "assets", "CheckpointError", "CheckpointNotFoundError", "iter_safetensors", "load_safetensors_dir", "load_state_streaming", "map_key",
    "read_safetensors_header", "safetensors_files", "save_pretrained", "stored_dtype", "NAMED_CHECKPOINTS",
    "resolve_path", "FILE_TYPES", "GGUFError", "GGUFFile", "config_from_gguf", "dequantize", "gguf_to_hf",
    "hf_to_gguf", "load_gguf", "save_gguf", "gguf_is_bf16", "gguf_is_quantized", "gguf_native_model", "gguf_native_types", "load_drafter",
    "save_drafter", "load_config", "load_pretrained",
]
