"""Tiny configs whose every dim suits the int8/int4 CPU kernels (inputs multiple of 32, outputs of 16),
one per architecture kind, for the accounting and quantization tests."""

from __future__ import annotations

import torch

from gemma4 import Gemma4Config, build_model, init_random_

S, F = "sliding_attention", "full_attention"
_COMMON = dict(vocab_size=320, hidden_size=64, num_attention_heads=4, head_dim=32, global_head_dim=64,
               sliding_window=8, final_logit_softcapping=30.0, max_position_embeddings=256)

KINDS = {
    # 31B-like: K=V full layers with fewer KV heads.
    "dense": dict(_COMMON, num_hidden_layers=4, layer_types=[S, S, S, F], intermediate_size=128,
                  num_key_value_heads=2, num_global_key_value_heads=1, attention_k_eq_v=True,
                  hidden_size_per_layer_input=0),
    # E2B-like: PLE, KV sharing, double-wide MLP in consumers.
    "ple": dict(_COMMON, num_hidden_layers=6, layer_types=[S, S, F, S, S, F], intermediate_size=128,
                num_key_value_heads=1, hidden_size_per_layer_input=64, vocab_size_per_layer_input=320,
                num_kv_shared_layers=3, use_double_wide_mlp=True),
    # 26B-A4B-like: MoE beside the dense MLP.
    "moe": dict(_COMMON, num_hidden_layers=3, layer_types=[S, S, F], intermediate_size=64, num_key_value_heads=2,
                num_global_key_value_heads=1, attention_k_eq_v=True, hidden_size_per_layer_input=0,
                enable_moe_block=True, num_experts=4, top_k_experts=2, moe_intermediate_size=64),
    "gemma3": dict(model_type="gemma3_text", vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                   num_attention_heads=4, num_key_value_heads=2, head_dim=32, sliding_window=8,
                   max_position_embeddings=256, query_pre_attn_scalar=32, layer_types=[S, S, S, F]),
}


def config(kind: str) -> Gemma4Config:
    return Gemma4Config.from_dict(KINDS[kind])


def model(kind: str, seed: int = 0, dtype=torch.float32):
    m = init_random_(build_model(config(kind)), seed=seed, std=0.05)
    return m.to(dtype).eval()
