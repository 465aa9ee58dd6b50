"""The Gemma 4 MTP drafter ("assistant"): a small Gemma 4 stack that reads the *target's* K/V.

Every drafter layer is a KV-sharing consumer: it owns q_proj/q_norm/o_proj, the MLP and the norms,
but no key/value projections and no cache. It attends over the K/V that the target's producer layers
computed (``target.model.forward_export_kv(...)``), so drafting needs no prefill of its own.

One drafting step (query length 1):

    x   = concat(target.embed(last_token) * sqrt(H_target), h_last)     [B, 1, 2*H_target]
    x   = pre_projection(x)                                             [B, 1, H]
    x   = drafter layers (RoPE at a constant position, target K/V)      [B, 1, H]
    n   = final norm(x)
    logits = tied head(n)  or  centroid-masked head(n)                  [B, 1, V]
    h_next = post_projection(n)                                         [B, 1, H_target]

``h_last`` is the target's final-normed hidden state at the last position it has K/V for (slot ``p``)
in the first step of a round, then the drafter's own ``h_next``. The query position is ``p + 1``
for every step of a round. Which target keys a step sees (checked against transformers 5.24):
full layers every key with slot <= p; sliding layers the ``sliding_window + 1`` most recent keys
(slots p-W .. p): transformers builds a *bidirectional* window ``|q - k| <= W`` over the flipped key
axis, which is one key more than a causal target query sees.

The logits are not soft-capped (transformers ignores ``final_logit_softcapping`` here too). With
ordered embeddings (E2B/E4B drafters) the head scores only the tokens of the top-k centroid
clusters; every other token gets ``min(selected logits) - 1`` (per position; transformers takes the
minimum over the whole batch, which differs only for batch > 1 and never changes the argmax).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from gemma4.model.attention import AttnContext, set_attention_backend
from gemma4.model.config import FULL, SLIDING, ConfigError, Gemma4Config, read_config_json
from gemma4.model.decoder import Gemma4TextModel, build_mask, build_model

log = logging.getLogger("gemma4")

__all__ = ["DrafterConfig", "DrafterTextConfig", "Gemma4Drafter", "load_drafter", "save_drafter", "build_drafter"]


# ----------------------------------------------------------------------------- configuration
class DrafterTextConfig(Gemma4Config):
    """The drafter's text stack: a Gemma 4 text config in which every layer is a KV consumer.

    ``Gemma4Config.kv_sharing_modes`` insists on a producer layer of each type before the first
    shared layer; a drafter has none (its producers live in the target), so that rule is lifted
    when *all* layers are shared."""

    def __post_init__(self) -> None:
        if self.hidden_size_per_layer_input is None:
            self.hidden_size_per_layer_input = 0  # a drafter never has per-layer embeddings
        if not self.num_kv_shared_layers:
            self.num_kv_shared_layers = self.num_hidden_layers  # what transformers does too
        super().__post_init__()

    @property
    def kv_sharing_modes(self) -> list[str | None]:
        if self.num_kv_shared_layers == self.num_hidden_layers:
            return ["reuse"] * self.num_hidden_layers
        return super().kv_sharing_modes

    def validate(self) -> None:
        if self.num_kv_shared_layers != self.num_hidden_layers:
            raise ConfigError(
                f"drafter text_config: every layer must read the target's K/V (num_kv_shared_layers="
                f"{self.num_kv_shared_layers}, num_hidden_layers={self.num_hidden_layers})"
            )
        if self.hidden_size_per_layer_input:
            raise ConfigError(f"drafter text_config: hidden_size_per_layer_input must be 0, got {self.hidden_size_per_layer_input}")
        if self.enable_moe_block:
            raise ConfigError("drafter text_config: enable_moe_block must be false")
        if self.use_double_wide_mlp:
            raise ConfigError("drafter text_config: use_double_wide_mlp must be false")
        super().validate()


# Keys of an assistant config.json that carry no architecture (accepted and dropped).
_BOOKKEEPING = frozenset({"architectures", "dtype", "torch_dtype", "transformers_version", "_name_or_path",
                          "initializer_range", "use_cache", "output_attentions", "output_hidden_states",
                          "return_dict"})


@dataclass
class DrafterConfig:
    """Fields = the keys of a ``gemma4_assistant`` config.json."""

    text_config: DrafterTextConfig
    backbone_hidden_size: int = 1536
    use_ordered_embeddings: bool = False
    num_centroids: int = 2048
    centroid_intermediate_top_k: int = 32
    tie_word_embeddings: bool = True
    model_type: str = "gemma4_assistant"

    def __post_init__(self) -> None:
        if isinstance(self.text_config, dict):
            self.text_config = DrafterTextConfig.from_dict(self.text_config)
        elif not isinstance(self.text_config, DrafterTextConfig):
            if isinstance(self.text_config, Gemma4Config):
                self.text_config = DrafterTextConfig.from_dict(
                    {f.name: getattr(self.text_config, f.name) for f in dataclasses.fields(Gemma4Config)})
            else:
                raise ConfigError(f"text_config must be a dict or Gemma4Config, got {type(self.text_config).__name__}")
        self.validate()

    def validate(self) -> None:
        tc = self.text_config
        if self.model_type not in ("gemma4_assistant", "gemma4_unified_assistant"):
            raise ConfigError(f"model_type {self.model_type!r} is not a Gemma 4 assistant (drafter)")
        if not (isinstance(self.backbone_hidden_size, int) and self.backbone_hidden_size > 0):
            raise ConfigError(f"backbone_hidden_size must be a positive integer, got {self.backbone_hidden_size!r}")
        if self.use_ordered_embeddings:
            c, k = self.num_centroids, self.centroid_intermediate_top_k
            if not (isinstance(c, int) and c > 0 and tc.vocab_size % c == 0):
                raise ConfigError(f"num_centroids={c!r} must be a positive divisor of vocab_size={tc.vocab_size}")
            if not (isinstance(k, int) and 0 < k <= c):
                raise ConfigError(f"centroid_intermediate_top_k={k!r} must be in 1..num_centroids={c}")

    # map_key / load_state_streaming ask these of "the model's config".
    @property
    def kv_sharing_modes(self) -> list[str | None]:
        return self.text_config.kv_sharing_modes

    @property
    def vocab_size(self) -> int:
        return self.text_config.vocab_size

    @property
    def hidden_size(self) -> int:
        return self.text_config.hidden_size

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "DrafterConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(k for k in d if k not in names and k not in _BOOKKEEPING)
        if unknown:
            raise ConfigError(f"unknown drafter config key(s): {', '.join(unknown)}")
        if "text_config" not in d:
            raise ConfigError("drafter config.json has no text_config")
        return cls(**{k: v for k, v in d.items() if k in names})

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> "DrafterConfig":
        return cls.from_dict(read_config_json(path))

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        text = self.text_config.to_dict()
        text.pop("architectures", None)
        d["text_config"] = text
        return {"architectures": ["Gemma4AssistantForCausalLM"], **d}


# ----------------------------------------------------------------------------- model
class MaskedEmbedding(nn.Module):
    """Centroid-masked output head: score the clusters, then only the tokens of the top-k clusters."""

    def __init__(self, config: DrafterConfig):
        super().__init__()
        tc = config.text_config
        self.top_k, self.num_centroids = config.centroid_intermediate_top_k, config.num_centroids
        self.per_centroid = tc.vocab_size // config.num_centroids
        self.centroids = nn.Linear(tc.hidden_size, config.num_centroids, bias=False)
        # Vocabulary permutation grouped by cluster: row c of view(C, V/C) = the tokens of cluster c.
        self.register_buffer("token_ordering", torch.arange(tc.vocab_size, dtype=torch.int64))

    def forward(self, h: torch.Tensor, head_weight: torch.Tensor) -> torch.Tensor:
        """h [B,T,H], head_weight [V,H] -> logits [B,T,V]."""
        b, t, d = h.shape
        top = torch.topk(self.centroids(h), self.top_k, dim=-1).indices  # [B,T,k]
        ids = self.token_ordering.view(self.num_centroids, self.per_centroid)[top].reshape(b, t, -1)  # [B,T,k*V/C]
        emb = head_weight[ids.reshape(-1)].view(b, t, ids.shape[-1], d)  # [B,T,M,H]
        sel = torch.matmul(emb, h.unsqueeze(-1)).squeeze(-1)  # [B,T,M]
        fill = sel.amin(dim=-1, keepdim=True) - 1.0  # below every scored token, so argmax stays inside
        out = fill.expand(b, t, head_weight.shape[0]).clone()
        return out.scatter_(-1, ids, sel)


class Gemma4Drafter(nn.Module):
    """The MTP drafter. Parameter names follow the transformers checkpoint (``model.layers.N...``,
    ``pre_projection``, ``post_projection``, ``masked_embedding.*``)."""

    def __init__(self, config: DrafterConfig):
        super().__init__()
        self.config = config
        tc = config.text_config
        self.model = Gemma4TextModel(tc)  # embed_tokens (the tied head), consumer layers, final norm
        self.pre_projection = nn.Linear(2 * config.backbone_hidden_size, tc.hidden_size, bias=False)
        self.post_projection = nn.Linear(tc.hidden_size, config.backbone_hidden_size, bias=False)
        self.masked_embedding = MaskedEmbedding(config) if config.use_ordered_embeddings else None
        self.lm_head = None if config.tie_word_embeddings else nn.Linear(tc.hidden_size, tc.vocab_size, bias=False)
        if tc.final_logit_softcapping:
            log.info("drafter: final_logit_softcapping=%s is ignored (as in transformers)", tc.final_logit_softcapping)

    # -- helpers
    @property
    def dtype(self) -> torch.dtype:
        return self.pre_projection.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.pre_projection.weight.device

    def set_attention_backend(self, name: str) -> "Gemma4Drafter":
        set_attention_backend(self.model.layers, name)
        return self

    def head_weight(self) -> torch.Tensor:
        return self.lm_head.weight if self.lm_head is not None else self.model.embed_tokens.weight

    def logits(self, n: torch.Tensor) -> torch.Tensor:
        """Final-normed drafter hidden [B,T,H] -> logits [B,T,V] (no soft-cap)."""
        if self.masked_embedding is not None:
            return self.masked_embedding(n, self.head_weight())
        return F.linear(n, self.head_weight())

    def check_target(self, target_config: Gemma4Config) -> None:
        """Raise if this drafter cannot read ``target_config``'s K/V."""
        tc, cfg = self.config.text_config, self.config
        if cfg.backbone_hidden_size != target_config.hidden_size:
            raise ValueError(f"drafter backbone_hidden_size={cfg.backbone_hidden_size} != target hidden_size={target_config.hidden_size}")
        if tc.vocab_size != target_config.vocab_size:
            raise ValueError(f"drafter vocab_size={tc.vocab_size} != target vocab_size={target_config.vocab_size}")
        for lt in sorted(set(tc.layer_types)):
            t_layers = [i for i, t in enumerate(target_config.layer_types) if t == lt]
            if not t_layers:
                raise ValueError(f"drafter has {lt} layers but the target has none to read K/V from")
            j = t_layers[-1]
            d_layer = tc.layer_types.index(lt)
            if tc.layer_head_dim(d_layer) != target_config.layer_head_dim(j):
                raise ValueError(f"{lt}: drafter head_dim {tc.layer_head_dim(d_layer)} != target head_dim {target_config.layer_head_dim(j)}")
            if tc.layer_kv_heads(d_layer) != target_config.layer_kv_heads(j):
                raise ValueError(f"{lt}: drafter expects {tc.layer_kv_heads(d_layer)} K/V heads, the target has "
                                 f"{target_config.layer_kv_heads(j)}")

    def input_embeds(self, target, token_ids: torch.Tensor, h_last: torch.Tensor) -> torch.Tensor:
        """concat(target embedding of ``token_ids`` (sqrt(H)-scaled), ``h_last``) -> [B,T,2*H_target]."""
        e = target.model.embed(token_ids)
        return torch.cat([e.to(h_last.dtype), h_last], dim=-1)

    # -- forward
    def forward(
        self,
        inputs_embeds: torch.Tensor,
        shared_kv: dict[str, tuple[torch.Tensor, torch.Tensor]],
        position_ids: torch.Tensor,
        *,
        key_slots: dict[str, torch.Tensor] | None = None,
        last_slot: int | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One drafting step. Returns (logits [B,T,V], projected hidden [B,T,H_target]).

        inputs_embeds: [B,T,2*H_target] (see :meth:`input_embeds`); position_ids: [B,T] (the
        position after ``last_slot``). shared_kv: the target's K/V by layer type, [B,K,S,D].
        key_slots: the slot of every key per layer type (a cache returns its sliding keys in ring
        order); by default the full keys are slots 0..S_full-1 and the sliding keys the last
        S_sliding of those. last_slot: newest slot the drafter may see (keys after it, e.g. rejected
        candidates, are masked); default the newest full slot. attention_mask: [B, >= last_slot+1]
        padding mask indexed by slot."""
        tc = self.config.text_config
        missing = sorted(set(tc.layer_types) - set(shared_kv))
        if missing:
            raise ValueError(f"shared_kv lacks the target K/V for {missing}")
        b, t, _ = inputs_embeds.shape
        dev = inputs_embeds.device
        if key_slots is None:
            key_slots = {}
        n_full = shared_kv[FULL][0].shape[2] if FULL in shared_kv else None
        slots, masks, ctxs, rope = {}, {}, {}, {}
        for lt in set(tc.layer_types):
            s = shared_kv[lt][0].shape[2]
            ks = key_slots.get(lt)
            if ks is None:
                end = n_full if n_full is not None else s
                ks = torch.arange(end - s, end, device=dev)
            slots[lt] = ks
        p = last_slot if last_slot is not None else int(max(int(v.max()) for v in slots.values()))
        q_slots = torch.full((t,), p, device=dev, dtype=torch.long)
        for lt in set(tc.layer_types):
            # Sliding: |p - k| <= W, i.e. W + 1 keys (transformers' bidirectional window, see module doc).
            window = tc.sliding_window + 1 if lt == SLIDING else None
            m = build_mask(q_slots, slots[lt], window, attention_mask)
            masks[lt] = m
            ctxs[lt] = AttnContext(lt, window, q_slots, slots[lt])
            rope[lt] = self.model.rope(lt, position_ids, self.dtype)
        h = self.pre_projection(inputs_embeds.to(self.dtype))
        for i, layer in enumerate(self.model.layers):
            lt = tc.layer_types[i]
            k, v = shared_kv[lt]
            h, _ = layer(h, *rope[lt], masks[lt], ctxs[lt], shared_kv=(k.to(h.dtype), v.to(h.dtype)))
        n = self.model.norm(h)
        return self.logits(n), self.post_projection(n)


# ----------------------------------------------------------------------------- building / checkpoints
def build_drafter(config: DrafterConfig, dtype: torch.dtype | None = None, device: str | torch.device = "cpu") -> Gemma4Drafter:
    return build_model(config, dtype, device, cls=Gemma4Drafter)
