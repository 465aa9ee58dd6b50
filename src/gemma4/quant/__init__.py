"""Weight-only quantization: int8/int4 formats and bf16 storage with float32 compute, round-to-nearest
(``rtn``), calibrated GPTQ and AWQ (``gptq``). Builds on ``gemma4.model`` only."""

from gemma4.quant.rtn import (
    DEFAULT_SKIP, GROUP_SIZES, SCHEMES, Bf16Embedding, Bf16Linear, Bf16Weight, Int4Embedding, Int4Linear, Int4Weight, Int8Embedding, Int8Linear, Int8Weight,
    QuantExperts, QuantizationError, QuantWeight, dequantize_model, int4_dequant, int8_dequant,
    kernels_available, model_nbytes, pack_nibbles, prepare_quantized, quantize, quantize_int4_tensor,
    quantize_int8_tensor, to_kernel_layout, unpack_nibbles,
)
from gemma4.quant.gptq import awq_scale, calibration_ids, default_calibration_text, gptq_matrix, gptq_quantize

__all__ = [
    "DEFAULT_SKIP", "GROUP_SIZES", "SCHEMES", "Bf16Embedding", "Bf16Linear", "Bf16Weight", "Int4Embedding", "Int4Linear", "Int4Weight", "Int8Embedding",
    "Int8Linear", "Int8Weight", "QuantExperts", "QuantizationError", "QuantWeight", "dequantize_model",
    "int4_dequant", "int8_dequant", "kernels_available", "model_nbytes", "pack_nibbles", "prepare_quantized",
    "quantize", "quantize_int4_tensor", "quantize_int8_tensor", "to_kernel_layout", "unpack_nibbles",
    "awq_scale", "calibration_ids", "default_calibration_text", "gptq_matrix", "gptq_quantize",
]
