"""Running a model: the one sampler, generate/stream (plain and speculative), latency monitoring and
the CPU fast path."""

from gemma4.infer.sampling import SamplingError, SamplingParams, sample_next
from gemma4.infer.generate import GenerationError, NonFiniteLogitsError, generate, stream
from gemma4.infer.speculative import SpeculativeResult, SpeculativeStats, greedy_decode, speculative_generate
from gemma4.infer.monitor import LatencyMonitor
from gemma4.infer.fast_path import (configure_malloc, configure_onednn, on_fast_path, plain_path, use_fast_path,
                                    use_plain_path)

__all__ = [
    "SamplingError", "SamplingParams", "sample_next", "GenerationError", "NonFiniteLogitsError", "generate", "stream",
    "SpeculativeResult", "SpeculativeStats", "greedy_decode", "speculative_generate", "LatencyMonitor",
    "configure_malloc", "configure_onednn", "on_fast_path", "plain_path", "use_fast_path", "use_plain_path",
]
