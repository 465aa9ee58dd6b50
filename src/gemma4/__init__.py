"""gemma4: the Gemma 4 text model family in clean PyTorch.

The package is organised by workflow (``model``, ``quant``, ``io``, ``text``, ``infer``, ``train``,
``serve``, ``redteam``, ``cli``; README "Layout" has the table of who may import whom). Everything a user
needs day to day is importable from here."""

__version__ = "0.1.0"

from gemma4._util import Gemma4Error, WriteError, parse_dtype
from gemma4.model import (FULL, PRESETS, SLIDING, ConfigError, DrafterConfig, Gemma4Config, Gemma4Drafter,
                          Gemma4ForCausalLM, FullCache, ModelCache, SlidingCache, BlockSparse, LinearAttention,
                          build_model, count_parameters, estimate_memory, init_random_)
from gemma4.quant import QuantizationError, gptq_quantize, quantize
from gemma4.io import (CheckpointError, CheckpointNotFoundError, GGUFError, assets, load_drafter, load_gguf, load_pretrained, resolve_path,
                       save_drafter, save_gguf, save_pretrained)
from gemma4.text import (ChatError, ChatPrompt, ChatSegment, Tokenizer, TokenizerError, UnknownTokenError, load_tokenizer,
                         parse_response, render_chat, render_chat_segments)
from gemma4.infer import (GenerationError, LatencyMonitor, NonFiniteLogitsError, SamplingError, SamplingParams,
                          SpeculativeResult, SpeculativeStats, generate, greedy_decode, speculative_generate, stream)



def load(spec, dtype=None, device="cpu", **kw):
    """``(model, tokenizer)`` for anything :func:`load_pretrained` accepts (a directory, a ``.gguf``, a short
    name such as ``"gemma3-270m"``, a hub id); the tokenizer is None when the checkpoint carries none."""
    model = load_pretrained(spec, dtype=dtype, device=device, **kw)
    try:
        tokenizer = load_tokenizer(spec)
    except FileNotFoundError:
        tokenizer = None
    return model, tokenizer


__all__ = [
    "__version__", "load", "Gemma4Error", "WriteError", "parse_dtype",
    "FULL", "PRESETS", "SLIDING", "ConfigError", "DrafterConfig", "Gemma4Config", "Gemma4Drafter", "Gemma4ForCausalLM",
    "FullCache", "ModelCache", "SlidingCache", "BlockSparse", "LinearAttention", "build_model", "count_parameters",
    "estimate_memory", "init_random_",
    "QuantizationError", "gptq_quantize", "quantize",
    "CheckpointError", "CheckpointNotFoundError", "GGUFError", "assets", "load_drafter", "load_gguf", "load_pretrained", "resolve_path",
    "save_drafter", "save_gguf", "save_pretrained",
    "ChatError", "ChatPrompt", "ChatSegment", "Tokenizer", "TokenizerError", "UnknownTokenError", "load_tokenizer",
    "parse_response", "render_chat", "render_chat_segments",
    "GenerationError", "LatencyMonitor", "NonFiniteLogitsError", "SamplingError", "SamplingParams",
    "SpeculativeResult", "SpeculativeStats", "generate", "greedy_decode", "speculative_generate", "stream",
]
