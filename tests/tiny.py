"""Tiny reference models built with transformers, randomized and written in the real on-disk format.

Every norm weight, layer scalar, router scale and per-expert scale is drawn away from 1.0: weights
that start at 1 hide convention bugs (1+w vs w, routing on the wrong tensor).
"""

from __future__ import annotations

import torch

COMMON = dict(vocab_size=256, hidden_size=48, num_attention_heads=4, head_dim=16, global_head_dim=32,
              sliding_window=8, final_logit_softcapping=30.0, rms_norm_eps=1e-6, tie_word_embeddings=True,
              pad_token_id=0, bos_token_id=2, eos_token_id=1, max_position_embeddings=256)

S, F = "sliding_attention", "full_attention"

# 31B-like: K=V on full layers, fewer global KV heads, 5:1 pattern.
DENSE = dict(COMMON, num_hidden_layers=8, layer_types=[S, S, S, S, S, F, S, F], intermediate_size=96,
             num_key_value_heads=2, num_global_key_value_heads=1, attention_k_eq_v=True,
             hidden_size_per_layer_input=0, use_bidirectional_attention="vision")
# E2B-like: PLE, KV sharing (4 consumer layers), double-wide MLP, 4:1 pattern.
PLE = dict(COMMON, num_hidden_layers=10, layer_types=[S, S, S, S, F] * 2, intermediate_size=64,
           num_key_value_heads=1, attention_k_eq_v=False, hidden_size_per_layer_input=8,
           vocab_size_per_layer_input=256, num_kv_shared_layers=4, use_double_wide_mlp=True)
# 26B-A4B-like: MoE branch beside the dense MLP in every layer.
MOE = dict(COMMON, num_hidden_layers=6, layer_types=[S] * 5 + [F], intermediate_size=40, num_key_value_heads=2,
           num_global_key_value_heads=1, attention_k_eq_v=True, hidden_size_per_layer_input=0,
           enable_moe_block=True, num_experts=8, top_k_experts=2, moe_intermediate_size=24)
GEMMA3 = dict(vocab_size=256, hidden_size=48, intermediate_size=96, num_hidden_layers=8, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, sliding_window=8, max_position_embeddings=256,
              query_pre_attn_scalar=16, rms_norm_eps=1e-6, pad_token_id=0, bos_token_id=2, eos_token_id=1)

TINY = {"dense": DENSE, "ple": PLE, "moe": MOE, "gemma3": GEMMA3}


def randomize_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in list(model.named_parameters()) + list(model.named_buffers()):
            if not p.is_floating_point() or "inv_freq" in name or "embed_scale" in name:
                continue
            if p.dim() <= 1:  # norm scales, layer_scalar, router scale, per_expert_scale
                lo, hi = (0.125, 0.375) if ("q_norm" in name or "k_norm" in name) else (0.5, 1.5)
                p.copy_(torch.empty(p.shape).uniform_(lo, hi, generator=g))
            else:
                p.copy_(torch.empty(p.shape).normal_(0, 0.15, generator=g))
    return model


def hf_model(kind: str, seed: int = 0):
    """A randomized transformers model of one tiny kind (float32, eager attention)."""
    import transformers

    if kind == "gemma3":
        cfg = transformers.Gemma3TextConfig(**TINY[kind])
        cls = transformers.Gemma3ForCausalLM
    else:
        cfg = transformers.Gemma4TextConfig(**TINY[kind])
        cls = transformers.Gemma4ForCausalLM
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    m = cls(cfg).eval()
    return randomize_(m, seed)


def write_hf_checkpoint(kind: str, directory, seed: int = 0, dtype=torch.float32):
    m = hf_model(kind, seed).to(dtype)
    m.save_pretrained(str(directory))
    return m
