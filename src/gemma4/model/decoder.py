"""The Gemma 4 text decoder (and Gemma 3 text, as a configuration of it), top to bottom.

Module and parameter names follow the checkpoint layout (``model.layers.N.self_attn.q_proj.weight``
...), so loading a checkpoint is a key rename at most. Per-layer differences are settled when the
model is built: a KV-sharing consumer layer simply has no k/v projection, a K=V full layer no v_proj,
a dense layer no router. Shapes in comments: B batch, T new tokens, S keys, H hidden, N heads,
K key/value heads, D head dim, P per-layer-embedding dim, L layers, E experts.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from gemma4.model.attention import ATTENTION_BACKENDS, AttnContext, set_attention_backend
from gemma4.model.cache import ModelCache
from gemma4.model.config import SLIDING, Gemma4Config


# ----------------------------------------------------------------------------- building blocks
class RMSNorm(nn.Module):
    """RMSNorm in float32. Gemma 4 multiplies by ``w``; Gemma 1-3 store ``w`` and multiply by ``1 + w``
    (``offset``). ``with_scale=False`` is the scale-less norm used on values and router inputs."""

    def __init__(self, dim: int, eps: float = 1e-6, with_scale: bool = True, offset: float = 0.0):
        super().__init__()
        self.eps, self.offset = eps, offset
        self.weight = nn.Parameter(torch.ones(dim)) if with_scale else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        # pow(-0.5) rather than rsqrt: the reference does the same, and the two differ in the last ulp.
        xf = xf * torch.pow(xf.pow(2).mean(-1, keepdim=True) + self.eps, -0.5)
        if self.weight is not None:
            xf = xf * (self.weight.float() + self.offset) if self.offset else xf * self.weight.float()
        return xf.type_as(x)


def embedding(num: int, dim: int) -> nn.Embedding:
    """nn.Embedding without its default init on the meta device: that init path imports torch._dynamo
    (~70 MB of resident memory) just to build a shape-only model before loading a checkpoint."""
    w = torch.empty(num, dim)
    if not w.is_meta:
        nn.init.normal_(w)
    return nn.Embedding(num, dim, _weight=w)


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


def rope_inv_freq(params: dict, head_dim: int) -> torch.Tensor:
    """Inverse frequencies [D/2] for one layer type. "proportional" rotates only the fastest
    ``partial_rotary_factor`` share of the pairs, with exponents over the *full* head dim; the rest
    get frequency 0, i.e. cos=1, sin=0, an identity."""
    theta = float(params.get("rope_theta", 10_000.0))
    rope_type = params.get("rope_type", "default")
    half = head_dim // 2
    n_rot = int(params.get("partial_rotary_factor", 1.0) * head_dim // 2) if rope_type == "proportional" else half
    j = torch.arange(0, 2 * n_rot, 2, dtype=torch.int64, device="cpu").float()
    inv = 1.0 / (theta ** (j / head_dim))
    inv = torch.cat([inv, torch.zeros(half - n_rot, device="cpu")])
    if rope_type in ("linear", "proportional") and params.get("factor"):
        inv = inv / float(params["factor"])
    return inv


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [B, T, N, D]; cos/sin: [B, T, 1, D]. Half-split (rotate_half) layout."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def build_mask(q_slots, k_slots, window, pad_mask):
    """Boolean mask [B|1, 1, T, S]: causal on slots, sliding ``q - k < window``, padding from the
    2-D mask (indexed by slot). A query row with no visible key (a left-pad position) may see itself,
    so no row is empty: empty rows make SDPA return NaN, and NaN in a pad position's values would
    reach real tokens through 0 * NaN."""
    qs, ks = q_slots[:, None], k_slots[None, :]
    allowed = (ks <= qs) & (ks >= 0)
    if window is not None:
        allowed &= ks > (qs - window)  # q - k < window, without an int64 [T,S] temporary
    allowed = allowed[None, None]
    if pad_mask is not None:
        allowed = allowed & pad_mask[:, k_slots.clamp(min=0)].bool()[:, None, None, :]
        empty = ~allowed.any(-1, keepdim=True)
        allowed = allowed | (empty & (ks == qs)[None, None])
    return allowed


# ----------------------------------------------------------------------------- layers
class Attention(nn.Module):
    def __init__(self, cfg: Gemma4Config, i: int):
        super().__init__()
        self.layer_type = cfg.layer_types[i]
        self.head_dim = d = cfg.layer_head_dim(i)
        self.n_heads, self.n_kv = cfg.num_attention_heads, cfg.layer_kv_heads(i)
        self.window = cfg.sliding_window if self.layer_type == SLIDING else None
        self.scale, self.softcap = cfg.attention_scale, cfg.attn_logit_softcapping
        self.is_consumer = cfg.kv_sharing_modes[i] == "reuse"
        self.k_eq_v = cfg.layer_k_eq_v(i)
        # Eager is the default: it is the reference computation, and on CPUs measured here it is as fast
        # as SDPA for prefill and 2-10x faster for decoding (one query row against the cache).
        self.backend = "eager"
        eps, off, bias = cfg.rms_norm_eps, cfg.norm_offset, cfg.attention_bias
        self.q_proj = nn.Linear(cfg.hidden_size, self.n_heads * d, bias=bias)
        self.q_norm = RMSNorm(d, eps, offset=off)
        if not self.is_consumer:
            self.k_proj = nn.Linear(cfg.hidden_size, self.n_kv * d, bias=bias)
            self.v_proj = None if self.k_eq_v else nn.Linear(cfg.hidden_size, self.n_kv * d, bias=bias)
            self.k_norm = RMSNorm(d, eps, offset=off)
            self.v_norm = RMSNorm(d, eps, with_scale=False) if cfg.use_v_norm else None
        self.o_proj = nn.Linear(self.n_heads * d, cfg.hidden_size, bias=bias)

    def forward(self, x, cos, sin, mask, ctx, cache=None, shared_kv=None):
        """x [B,T,H]. Returns (output [B,T,H], (k, v) attended over, for KV-sharing consumers)."""
        b, t, _ = x.shape
        q = self.q_norm(self.q_proj(x).view(b, t, self.n_heads, self.head_dim))  # [B,T,N,D]
        q = apply_rope(q, cos, sin).transpose(1, 2)  # [B,N,T,D]
        if self.is_consumer:
            k, v = shared_kv
        else:
            k_raw = self.k_proj(x).view(b, t, self.n_kv, self.head_dim)  # [B,T,K,D]
            # K=V layers: the value is the *pre-norm* key projection, normed without a scale.
            v = k_raw if self.v_proj is None else self.v_proj(x).view(b, t, self.n_kv, self.head_dim)
            k = apply_rope(self.k_norm(k_raw), cos, sin).transpose(1, 2)  # [B,K,T,D]
            v = (self.v_norm(v) if self.v_norm is not None else v).transpose(1, 2)
            if cache is not None:
                k, v = cache.update(k, v)
        o = ATTENTION_BACKENDS[self.backend](q, k, v, mask, self.scale, self.softcap, ctx)
        o = o.transpose(1, 2).reshape(b, t, self.n_heads * self.head_dim)  # [B,T,N*D]
        return self.o_proj(o), (k, v)


class GatedGELU(nn.Module):
    """gelu_tanh(gate) * up. A module (no parameters) so that a faster kernel for training can be swapped
    in through the module tree (`gemma4.train.use_training_kernels`)."""

    def forward(self, g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        return gelu_tanh(g) * u


class MLP(nn.Module):
    def __init__(self, hidden: int, inter: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inter, bias=False)
        self.up_proj = nn.Linear(hidden, inter, bias=False)
        self.down_proj = nn.Linear(inter, hidden, bias=False)
        self.act = GatedGELU()

    def forward(self, x):
        return self.down_proj(self.act(self.gate_proj(x), self.up_proj(x)))


class Router(nn.Module):
    """Top-k routing computed on the raw residual stream (not the pre-FFN-normed input)."""

    def __init__(self, cfg: Gemma4Config):
        super().__init__()
        self.top_k, self.eps = cfg.top_k_experts, cfg.rms_norm_eps
        self.root = cfg.hidden_size**-0.5
        self.proj = nn.Linear(cfg.hidden_size, cfg.num_experts, bias=False)
        self.scale = nn.Parameter(torch.ones(cfg.hidden_size))
        self.per_expert_scale = nn.Parameter(torch.ones(cfg.num_experts))
        self._norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, with_scale=False)

    def forward(self, r: torch.Tensor):
        """r [N,H] -> weights [N,k] (float32), expert ids [N,k]."""
        z = self._norm(r) * self.scale * self.root
        probs = torch.softmax(self.proj(z), dim=-1, dtype=torch.float32)  # over all E experts
        w, idx = torch.topk(probs, self.top_k, dim=-1)
        w = w / w.sum(dim=-1, keepdim=True)
        return w * self.per_expert_scale[idx], idx


class Experts(nn.Module):
    def __init__(self, cfg: Gemma4Config):
        super().__init__()
        e, h, i = cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size
        self.num_experts = e
        self.gate_up_proj = nn.Parameter(torch.empty(e, 2 * i, h))  # rows: gate first, then up
        self.down_proj = nn.Parameter(torch.empty(e, h, i))

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        g, u = F.linear(x, self.gate_up_proj[e]).chunk(2, dim=-1)
        return F.linear(gelu_tanh(g) * u, self.down_proj[e])

    def forward(self, x, w, idx):
        """x [N,H], w [N,k] float32, idx [N,k] -> [N,H]. Experts run in ascending id order and
        accumulate in the activation dtype, which is the reference's summation order."""
        out = torch.zeros_like(x)
        for e in torch.unique(idx).tolist():
            tok, pos = torch.where(idx == e)
            y = self.expert(e, x[tok]) * w[tok, pos, None]  # float32 product, then back
            out.index_add_(0, tok, y.to(out.dtype))
        return out


class DecoderLayer(nn.Module):
    def __init__(self, cfg: Gemma4Config, i: int):
        super().__init__()
        h, eps, off = cfg.hidden_size, cfg.rms_norm_eps, cfg.norm_offset
        self.layer_type = cfg.layer_types[i]
        self.self_attn = Attention(cfg, i)
        self.mlp = MLP(h, cfg.layer_intermediate_size(i))
        self.input_layernorm = RMSNorm(h, eps, offset=off)
        self.post_attention_layernorm = RMSNorm(h, eps, offset=off)
        self.pre_feedforward_layernorm = RMSNorm(h, eps, offset=off)
        self.post_feedforward_layernorm = RMSNorm(h, eps, offset=off)
        self.enable_moe = cfg.enable_moe_block
        if self.enable_moe:
            self.router = Router(cfg)
            self.experts = Experts(cfg)
            self.pre_feedforward_layernorm_2 = RMSNorm(h, eps)
            self.post_feedforward_layernorm_1 = RMSNorm(h, eps)
            self.post_feedforward_layernorm_2 = RMSNorm(h, eps)
        self.ple_dim = cfg.hidden_size_per_layer_input
        if self.ple_dim:
            self.per_layer_input_gate = nn.Linear(h, self.ple_dim, bias=False)
            self.per_layer_projection = nn.Linear(self.ple_dim, h, bias=False)
            self.post_per_layer_input_norm = RMSNorm(h, eps)
        if cfg.use_layer_scalar:
            # A checkpoint buffer that scales the whole residual stream (not only the branch).
            self.register_buffer("layer_scalar", torch.ones(1))
        else:
            self.layer_scalar = None

    def forward(self, h, cos, sin, mask, ctx, ple=None, cache=None, shared_kv=None):
        a, kv = self.self_attn(self.input_layernorm(h), cos, sin, mask, ctx, cache, shared_kv)
        h = h + self.post_attention_layernorm(a)
        r = h
        m = self.mlp(self.pre_feedforward_layernorm(r))
        if self.enable_moe:
            flat = r.reshape(-1, r.shape[-1])  # [B*T,H]
            w, idx = self.router(flat)
            m2 = self.experts(self.pre_feedforward_layernorm_2(flat), w, idx).view_as(r)
            m = self.post_feedforward_layernorm_1(m) + self.post_feedforward_layernorm_2(m2)
        h = r + self.post_feedforward_layernorm(m)
        if self.ple_dim:
            g = gelu_tanh(self.per_layer_input_gate(h)) * ple  # [B,T,P]
            h = h + self.post_per_layer_input_norm(self.per_layer_projection(g))
        if self.layer_scalar is not None:
            h = h * self.layer_scalar
        return h, kv


# ----------------------------------------------------------------------------- the model
class Gemma4TextModel(nn.Module):
    def __init__(self, cfg: Gemma4Config):
        super().__init__()
        self.config = cfg
        self.embed_tokens = embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, offset=cfg.norm_offset)
        p = cfg.hidden_size_per_layer_input
        if p:
            n = cfg.num_hidden_layers
            self.embed_tokens_per_layer = embedding(cfg.vocab_size_per_layer_input, n * p)
            self.per_layer_model_projection = nn.Linear(cfg.hidden_size, n * p, bias=False)
            self.per_layer_projection_norm = RMSNorm(p, cfg.rms_norm_eps)
        # RoPE tables are derived, never loaded: keep them off the module (and off the meta device).
        self._inv_freq = {t: rope_inv_freq(cfg.rope(t), self._type_head_dim(t)) for t in set(cfg.layer_types)}
        self._inv_freq_dev: dict = {}
        self.gradient_checkpointing = False
        # Optional: a callable that runs every layer for one decoded token in one go, set by an inference
        # fast path that swapped the layers' modules (gemma4.infer.fast_path.DecodeStack). It takes
        # (h, ple, rope, masks, cache) and returns the new h, or None when it cannot take this step.
        self.decode_stack = None

    def _type_head_dim(self, t: str) -> int:
        return next(self.config.layer_head_dim(i) for i, lt in enumerate(self.config.layer_types) if lt == t)

    def rope(self, t: str, pos: torch.Tensor, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [B,T,1,D] of layer type ``t`` at positions ``pos`` [B,T] (what every layer of the type uses)."""
        key = (t, pos.device)
        if key not in self._inv_freq_dev:
            self._inv_freq_dev[key] = self._inv_freq[t].to(pos.device)
        f = pos[..., None].float() * self._inv_freq_dev[key]  # [B,T,D/2], float32 from integer positions
        f = torch.cat((f, f), dim=-1)[:, :, None]  # [B,T,1,D]
        return f.cos().to(dtype), f.sin().to(dtype)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        w = self.embed_tokens.weight
        # sqrt(H) is rounded to the weight dtype before the multiply (bf16: sqrt(1536) -> 39.25).
        return self.embed_tokens(ids) * torch.tensor(self.config.embed_scale, dtype=torch.float32).to(w.dtype)

    def per_layer_inputs(self, ids: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        """PLE: token part + context part, [B,T,L,P]."""
        cfg, p = self.config, self.config.hidden_size_per_layer_input
        n = cfg.num_hidden_layers
        w = self.embed_tokens_per_layer.weight
        tok = self.embed_tokens_per_layer(ids) * torch.tensor(p**0.5, dtype=torch.float32).to(w.dtype)
        ctx = self.per_layer_model_projection(e) * cfg.hidden_size**-0.5
        ctx = self.per_layer_projection_norm(ctx.view(*e.shape[:-1], n, p))  # [B,T,L,P]
        return (ctx + tok.view(*ids.shape, n, p)) * 2.0**-0.5

    # -- the forward, in named steps -------------------------------------------------------------
    # No step reads a tensor's value on the host (no .item(), bool(t), int(t)): decoding stays free of
    # device syncs and the whole forward compiles with torch.compile(fullgraph=True). Input checks that
    # need values (token ids in range, mask shapes) live at the entry points: generate(), the loaders,
    # the CLI, check_input_ids().
    def positions(self, b: int, t: int, past: int, attention_mask, segment_ids, device) -> torch.Tensor:
        """Default position ids [B,T]: the count of real tokens before each position (left-padded rows
        start at 0); with ``segment_ids`` (packed documents) the offset inside each document."""
        if attention_mask is not None:
            return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, past:]
        pos = torch.arange(past, past + t, device=device)[None].expand(b, t)
        if segment_ids is not None:
            # The index where each position's document starts, by a running max over change points.
            change = torch.ones_like(segment_ids, dtype=torch.bool)
            change[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
            start = torch.where(change, pos, torch.zeros_like(pos)).cummax(-1).values  # [B,T]
            pos = pos - start
        return pos

    def layer_type_inputs(self, t: int, past: int, position_ids, cache, pad, segment_ids, dtype, device):
        """What every layer of one type shares: RoPE tables, the attention mask and the backend context."""
        cfg = self.config
        q_slots = torch.arange(past, past + t, device=device)
        rope, masks, ctxs = {}, {}, {}
        for lt in set(cfg.layer_types):
            c = cache.first_of_type(lt) if cache is not None else None
            k_slots = c.key_slots(t, device) if c is not None else torch.arange(past + t, device=device)
            window = cfg.sliding_window if lt == SLIDING else None
            rope[lt] = self.rope(lt, position_ids, dtype)
            # One new token over a cache whose every slot it may see needs no mask (decided from the
            # cache's bookkeeping, not from the mask's values).
            if t == 1 and pad is None and segment_ids is None and (c is None or c.sees_all_slots()):
                masks[lt] = None
            else:
                m = build_mask(q_slots, k_slots, window, pad)
                if segment_ids is not None:  # packed documents: a query sees keys of its own document only
                    m = m & (segment_ids[:, None, :, None] == segment_ids[:, None, None, k_slots.clamp(min=0)])
                masks[lt] = m
            ctxs[lt] = AttnContext(lt, window, q_slots, k_slots)
        return rope, masks, ctxs

    @staticmethod
    def kv_sharing_cut(keep: int, h, ple, rope, masks, ctxs):
        """Keep only the last ``keep`` positions before the first KV-sharing consumer layer: consumers
        write no cache, so positions whose logits are not wanted can be dropped there (a large prefill
        saving on E2B/E4B)."""
        sl = slice(-keep, None)
        return (h[:, sl], ple[:, sl] if ple is not None else None,
                {k: (c_[:, sl], s_[:, sl]) for k, (c_, s_) in rope.items()},
                {k: (m[:, :, sl] if m is not None else None) for k, m in masks.items()},
                {k: AttnContext(c.layer_type, c.window, c.q_slots[sl], c.k_slots) for k, c in ctxs.items()})

    def run_layers(self, h, ple, rope, masks, ctxs, cache, keep_last: int, export_kv: bool):
        """The decoder stack. Returns (h, shared): ``shared`` maps layer type -> (k, v) of the layer that
        stores it for its KV-sharing consumers (without KV sharing, the last layer of each type stands in
        when ``export_kv``: what a drafter attends over)."""
        cfg = self.config
        t = h.shape[1]
        shared: dict[str, tuple] = {}
        modes = cfg.kv_sharing_modes
        ckpt = self.gradient_checkpointing and torch.is_grad_enabled()
        if self.decode_stack is not None and t == 1 and cache is not None and not export_kv and not ckpt:
            out = self.decode_stack(h, ple, rope, masks, cache)
            if out is not None:
                return self.norm(out), shared
        for i, layer in enumerate(self.layers):
            if keep_last and i == cfg.first_kv_shared_layer and 0 < keep_last < t:
                h, ple, rope, masks, ctxs = self.kv_sharing_cut(keep_last, h, ple, rope, masks, ctxs)
                t = keep_last
            lt = cfg.layer_types[i]
            args = (h, *rope[lt], masks[lt], ctxs[lt])
            kw = dict(ple=ple[:, :, i] if ple is not None else None,
                      cache=cache.layers[i] if cache is not None else None, shared_kv=shared.get(lt))
            if ckpt:
                # Non-reentrant checkpointing recomputes the layer in backward and routes gradients through
                # every output, the K/V a producer shares with later consumers included (the reentrant
                # variant drops those: wrong producer k/v gradients).
                h, kv = torch.utils.checkpoint.checkpoint(layer, *args, use_reentrant=False, **kw)
            else:
                h, kv = layer(*args, **kw)
            if modes[i] == "store" or (export_kv and modes[i] is None):
                shared[lt] = kv
        if keep_last and h.shape[1] > keep_last:
            h = h[:, -keep_last:]
        return self.norm(h), shared

    def _forward(self, input_ids, attention_mask, position_ids, cache, keep_last, segment_ids, export_kv):
        b, t = input_ids.shape
        if t == 0:  # a shape, not a value: checking it costs no device sync
            raise ValueError("input_ids has no tokens (T = 0): give at least one token per row")
        past = cache.length if cache is not None else 0
        dev = input_ids.device
        if attention_mask is not None and attention_mask.shape != (b, past + t):
            raise ValueError(f"attention_mask must have shape [B, past+T] = [{b}, {past + t}], got {list(attention_mask.shape)}")
        if segment_ids is not None and (cache is not None or segment_ids.shape != (b, t)):
            raise ValueError("segment_ids (packed documents) must be [B, T] and is for uncached forwards (training)")
        if position_ids is None:
            position_ids = self.positions(b, t, past, attention_mask, segment_ids, dev)
        h = self.embed(input_ids)
        ple = self.per_layer_inputs(input_ids, h) if self.config.hidden_size_per_layer_input else None
        rope, masks, ctxs = self.layer_type_inputs(t, past, position_ids, cache, attention_mask, segment_ids, h.dtype, dev)
        return self.run_layers(h, ple, rope, masks, ctxs, cache, keep_last, export_kv)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, cache: ModelCache | None = None, keep_last: int = 0,
                segment_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Final-normed hidden states [B,T',H] (T' = keep_last or T).

        attention_mask: [B, past+T] (1 = token, 0 = padding), indexed by slot. position_ids default to
        the count of real tokens before each position, so left-padded rows start at 0. segment_ids [B,T]
        (uncached only): packed documents, each attending only to itself, positions restarting at 0."""
        return self._forward(input_ids, attention_mask, position_ids, cache, keep_last, segment_ids, False)[0]

    def forward_export_kv(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                          position_ids: torch.Tensor | None = None, cache: ModelCache | None = None,
                          keep_last: int = 0) -> tuple[torch.Tensor, dict[str, tuple]]:
        """As :meth:`forward`, plus the producers' K/V by layer type: what a KV-sharing drafter attends over."""
        return self._forward(input_ids, attention_mask, position_ids, cache, keep_last, None, True)


def check_input_ids(config: Gemma4Config, ids: torch.Tensor) -> None:
    """Entry-point check (it reads values, so the forward itself does not): an integer [B, T] tensor with
    T >= 1 and every id inside the vocabulary."""
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.dtype not in (torch.int64, torch.int32):
        what = f"{ids.dtype} {list(ids.shape)}" if isinstance(ids, torch.Tensor) else type(ids).__name__
        raise ValueError(f"input_ids must be an integer tensor [B, T], got {what}")
    if ids.shape[1] == 0:
        raise ValueError("input_ids has no tokens (T = 0): give at least one token per row")
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= config.vocab_size):
        raise ValueError(
            f"token id out of range: ids span [{int(ids.min())}, {int(ids.max())}] but vocab_size is {config.vocab_size}"
        )


class Gemma4ForCausalLM(nn.Module):
    """Gemma 4 (or Gemma 3) text model with its tied, soft-capped output head.

    ``model(input_ids)`` -> logits [B, T, V]. ``keep_last=n`` computes only the last n positions'
    logits (prefill needs one row, not [T, 262144])."""

    # True while gemma4.infer.use_fast_path has swapped modules for CPU kernels (inference only: such a
    # model cannot train, and quantizing or saving it needs gemma4.infer.plain_path(model)).
    fast_path = False

    def __init__(self, config: Gemma4Config):
        super().__init__()
        self.config = config
        self.model = Gemma4TextModel(config)
        self.lm_head = None if config.tie_word_embeddings else nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        x = self.lm_head(h) if self.lm_head is not None else self.tied_head(h)
        c = self.config.final_logit_softcapping
        return torch.tanh(x / c) * c if c else x

    def tied_head(self, h: torch.Tensor) -> torch.Tensor:
        """Logits of a tied model (no ``lm_head``), before the soft-cap: the embedding table used as the
        output matrix. A quantized table (:mod:`gemma4.quant`) brings its own ``head`` matmul, so the
        table has one owner and no float copy."""
        emb = self.model.embed_tokens
        head = getattr(emb, "head", None)
        return head(h) if head is not None else F.linear(h, emb.weight)

    def forward(self, input_ids, attention_mask=None, position_ids=None, cache=None, keep_last: int = 0,
                segment_ids=None):
        h = self.model(input_ids, attention_mask, position_ids, cache, keep_last=keep_last, segment_ids=segment_ids)
        return self.logits(h)

    def gradient_checkpointing_enable(self) -> "Gemma4ForCausalLM":
        """Recompute each decoder layer in backward instead of keeping its activations (training)."""
        self.model.gradient_checkpointing = True
        return self

    def gradient_checkpointing_disable(self) -> "Gemma4ForCausalLM":
        self.model.gradient_checkpointing = False
        return self

    def set_attention_backend(self, name: str) -> "Gemma4ForCausalLM":
        set_attention_backend(self.model.layers, name)
        return self

    def new_cache(self, **kw) -> ModelCache:
        return ModelCache(self.config, **kw)

    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.embed_tokens.weight.dtype


def build_model(config, dtype: torch.dtype | None = None, device: str | torch.device = "cpu", cls=None):
    """Build ``cls`` (default Gemma4ForCausalLM) with the given dtype/device, in eval mode.
    ``device="meta"`` builds every preset instantly (no memory)."""
    with torch.device(device):
        m = (cls or Gemma4ForCausalLM)(config)
    if dtype is not None:
        m = m.to(dtype)
    return m.eval()


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def init_random_(model: Gemma4ForCausalLM, seed: int = 0, std: float = 0.02) -> Gemma4ForCausalLM:
    """Random weights for tests and benchmarks: matrices N(0, std), every norm scale, layer scalar
    and router scale drawn away from 1 (ones hide convention bugs)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in list(model.named_parameters()) + list(model.named_buffers()):
            if p.is_meta or not p.is_floating_point():
                continue
            if p.dim() <= 1:
                p.copy_(torch.empty(p.shape).uniform_(0.5, 1.5, generator=g))
            else:
                p.copy_(torch.empty(p.shape).normal_(0, std, generator=g))
    return model
