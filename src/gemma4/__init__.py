"""gemma4: the Gemma 4 text model family in clean PyTorch."""

__version__ = "0.1.0"

import os as _os

# oneDNN, which runs bf16 matmuls on CPU, keeps every primitive it builds in two caches (PyTorch's ideep
# LRU and oneDNN's own), 1024 shapes each, ~0.3-0.5 MiB per entry here. Eager attention over a growing
# KV cache has a new key length at every decoded token: with those defaults RSS grew ~1.2 MiB per token
# (+226 MiB over 200 tokens of the 270M model) for primitives never used again. 64 entries bound that
# (a few tens of MiB at most) without evicting what decoding reuses: at 16, int4-g32 decode measured 4-9%
# slower than with the defaults, at 64 as fast (benchmarks/RESULTS.md). Both are read when oneDNN is first
# used; setdefault leaves a value the user exported alone.
for _var in ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY"):
    _os.environ.setdefault(_var, "64")

from gemma4.config import Gemma4Config, ConfigError, PRESETS
from gemma4.model import Gemma4ForCausalLM, build_model, init_random_
from gemma4.cache import ModelCache, FullCache, SlidingCache
from gemma4.checkpoint import load_pretrained, save_pretrained, CheckpointError
from gemma4 import assets
from gemma4.params import count_parameters, estimate_memory
from gemma4.quant import quantize
from gemma4.generate import generate, stream
from gemma4.sampling import SamplingParams
from gemma4.tokenizer import load_tokenizer, Tokenizer
from gemma4.chat import render_chat, parse_response
from gemma4.attention import BlockSparse, LinearAttention  # also registers "block_sparse" / "linear"
from gemma4.drafter import DrafterConfig, Gemma4Drafter, load_drafter, save_drafter
from gemma4.speculative import speculative_generate, greedy_decode, SpeculativeResult, SpeculativeStats
