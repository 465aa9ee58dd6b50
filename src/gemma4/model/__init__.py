"""The Gemma 4 text model: configuration, the decoder, attention backends, KV caches, the MTP drafter,
and parameter/memory accounting. Imports nothing above it."""

from gemma4.model.config import FULL, LAYER_TYPES, PRESETS, SLIDING, ConfigError, Gemma4Config, read_config_json
from gemma4.model.attention import ATTENTION_BACKENDS, AttnContext, BlockSparse, LinearAttention, set_attention_backend
from gemma4.model.cache import FullCache, LayerCache, ModelCache, SlidingCache
from gemma4.model.decoder import Experts, Gemma4ForCausalLM, Gemma4TextModel, build_model, count_params, init_random_
from gemma4.model.drafter import DrafterConfig, Gemma4Drafter, build_drafter
from gemma4.model.size import ParamCount, MemoryEstimate, count_parameters, estimate_memory

__all__ = [
    "FULL", "LAYER_TYPES", "PRESETS", "SLIDING", "ConfigError", "Gemma4Config", "read_config_json",
    "ATTENTION_BACKENDS", "AttnContext", "BlockSparse", "LinearAttention", "set_attention_backend",
    "FullCache", "LayerCache", "ModelCache", "SlidingCache",
    "Experts", "Gemma4ForCausalLM", "Gemma4TextModel", "build_model", "count_params", "init_random_",
    "DrafterConfig", "Gemma4Drafter", "build_drafter",
    "ParamCount", "MemoryEstimate", "count_parameters", "estimate_memory",
]
