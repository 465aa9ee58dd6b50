"""Parameter and memory accounting, computed from a config alone (no model is built).

``count_parameters(config)`` says how many parameters a variant has and where they sit: the token
embedding (tied with the output head), the per-layer-embedding (PLE) table of the E models, attention,
MLP and MoE weights of each layer type. ``estimate_memory(config, context, ...)`` turns that into bytes
for a given precision and context: weights, the KV cache exactly as :mod:`gemma4.model.cache` allocates it,
prefill activations, and what may live off the accelerator (the PLE table is only ever gathered from).

Both are tested equal to what the real modules and caches hold (tests/test_params.py, test_memory.py).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from gemma4._util import DTYPES
from gemma4.model.config import FULL, SLIDING, Gemma4Config

# ----------------------------------------------------------------------------- published figures
# Vision/audio tower sizes (incl. their projections into the text width) as counted by the spec
# (§4.2, transformers on the meta device). We implement the text decoder only, so these are quoted,
# not computed; they are what turns a text count into the published "with towers" totals.
TOWER_PARAMS: dict[str, dict[str, float]] = {
    "e2b": {"vision": 168.5e6, "audio": 307.2e6},
    "e4b": {"vision": 169.3e6, "audio": 308.8e6},
    "31b": {"vision": 575.7e6, "audio": 0.0},
    "26b-a4b": {"vision": 572.8e6, "audio": 0.0},
    "12b": {"vision": 49.9e6, "audio": 2.5e6},
}

# Model-card figures, with the quantity of ours each one corresponds to.
PUBLISHED: dict[str, dict[str, tuple[float, str]]] = {
    "e2b": {"total": (5.1e9, "total_with_towers"), "effective": (2.3e9, "effective")},
    "e4b": {"total": (8.0e9, "total_with_towers"), "effective": (4.5e9, "effective")},
    "31b": {"total": (30.7e9, "total")},
    "26b-a4b": {"total": (25.2e9, "total"), "active": (3.8e9, "active_per_token")},
}
# Published figures our accounting does not reproduce, and why.
NOT_REPRODUCED = {
    ("e4b", "effective"): (
        "the E4B model card says 4.5B effective; text decoder minus the PLE table is 4.644B (7.463B - "
        "2.819B). The same rule gives E2B's published 2.3B (2.280B), so the card's rule for E4B is not "
        "known (minus the PLE projections/gates too would give 4.56B, still not 4.5B)"
    ),
}


# ----------------------------------------------------------------------------- parameter counts
@dataclass
class ParamCount:
    """Parameter counts of a text decoder. ``total`` = sum of ``nn.Parameter`` elements (buffers such
    as the layer scalars are listed apart in ``buffers``)."""

    total: int
    embedding: int  # token embedding table (also the output head when tied)
    lm_head: int  # untied output head, else 0
    ple_table: int  # E models: embed_tokens_per_layer [V_ple, L*P]
    ple_projection: int  # per_layer_model_projection + per_layer_projection_norm
    ple_layers: int  # per-layer PLE gate/projection/norm inside the decoder layers
    attention: dict[str, int]  # by layer type
    mlp: dict[str, int]  # dense MLP, by layer type
    moe: dict[str, int]  # router + experts + extra MoE norms, by layer type
    experts: int  # expert weights alone (gate_up_proj + down_proj of every layer)
    norms: int  # layer norms + final norm (excluding q/k norms, counted in attention)
    buffers: int  # persistent non-parameter tensors (layer scalars)
    layers_by_type: dict[str, int]  # number of layers of each type
    top_k: int = 0
    num_experts: int = 0

    @property
    def effective(self) -> int:
        """Google's "effective" size of the E models: everything but the PLE table (a lookup table that
        need not sit in accelerator memory)."""
        return self.total - self.ple_table

    @property
    def non_embedding(self) -> int:
        return self.total - self.embedding - self.lm_head - self.ple_table

    @property
    def active_per_token(self) -> int:
        """Parameters a token touches: all but the unrouted experts (top_k of num_experts per layer)."""
        if not self.num_experts:
            return self.total
        return self.total - self.experts + self.experts * self.top_k // self.num_experts

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(effective=self.effective, non_embedding=self.non_embedding, active_per_token=self.active_per_token)
        return d


def _attn_params(cfg: Gemma4Config, i: int) -> int:
    h, n, d, kv = cfg.hidden_size, cfg.num_attention_heads, cfg.layer_head_dim(i), cfg.layer_kv_heads(i)
    bias = cfg.attention_bias
    p = h * n * d + n * d * h + d  # q_proj, o_proj, q_norm
    p += (n * d + h) if bias else 0
    if cfg.kv_sharing_modes[i] != "reuse":  # consumers have no k/v projections of their own
        p += h * kv * d + d + (kv * d if bias else 0)  # k_proj, k_norm (v_norm has no scale)
        if not cfg.layer_k_eq_v(i):
            p += h * kv * d + (kv * d if bias else 0)  # v_proj
    return p


def count_parameters(config: Gemma4Config) -> ParamCount:
    """Exact parameter counts of the text decoder ``build_model(config)`` builds, from the config alone."""
    cfg = config
    h, L, p = cfg.hidden_size, cfg.num_hidden_layers, cfg.hidden_size_per_layer_input
    types = (SLIDING, FULL)
    attn = {t: 0 for t in types}
    mlp = {t: 0 for t in types}
    moe = {t: 0 for t in types}
    n_layers = {t: 0 for t in types}
    experts = norms = ple_layers = 0
    for i, t in enumerate(cfg.layer_types):
        n_layers[t] += 1
        attn[t] += _attn_params(cfg, i)
        mlp[t] += 3 * h * cfg.layer_intermediate_size(i)
        norms += 4 * h
        if cfg.enable_moe_block:
            e, mi = cfg.num_experts, cfg.moe_intermediate_size
            ex = e * 2 * mi * h + e * h * mi
            experts += ex
            moe[t] += ex + e * h + h + e + 3 * h  # experts, router proj/scale/per_expert_scale, 3 norms
        if p:
            ple_layers += h * p + p * h + h
    norms += h  # final norm
    embedding = cfg.vocab_size * h
    lm_head = 0 if cfg.tie_word_embeddings else cfg.vocab_size * h
    ple_table = cfg.vocab_size_per_layer_input * L * p if p else 0
    ple_projection = (h * L * p + p) if p else 0
    total = embedding + lm_head + ple_table + ple_projection + ple_layers + norms
    total += sum(attn.values()) + sum(mlp.values()) + sum(moe.values())
    return ParamCount(
        total=total, embedding=embedding, lm_head=lm_head, ple_table=ple_table, ple_projection=ple_projection,
        ple_layers=ple_layers, attention=attn, mlp=mlp, moe=moe, experts=experts, norms=norms,
        buffers=L if cfg.use_layer_scalar else 0, layers_by_type=n_layers,
        top_k=(cfg.top_k_experts or 0) if cfg.enable_moe_block else 0,
        num_experts=(cfg.num_experts or 0) if cfg.enable_moe_block else 0,
    )


def published_comparison(preset: str, counts: ParamCount | None = None) -> list[dict[str, Any]]:
    """Rows (figure, published, ours, rounded-equal?, note) for a preset with published figures."""
    key = preset.lower()
    if key not in PUBLISHED:
        return []
    c = counts or count_parameters(Gemma4Config.from_preset(key))
    towers = TOWER_PARAMS.get(key, {})
    ours_by_name = {
        "total": c.total, "effective": c.effective, "active_per_token": c.active_per_token,
        "total_with_towers": c.total + round(sum(towers.values())),
    }
    rows = []
    for fig, (value, ours_name) in PUBLISHED[key].items():
        ours = ours_by_name[ours_name]
        # Published figures have one decimal in billions: equal when ours rounds to it.
        ok = round(ours / 1e9, 1) == round(value / 1e9, 1)
        if key == "e4b" and fig == "total":
            ok = round(ours / 1e9) == round(value / 1e9)  # the card says "8B": integer precision
        rows.append({"figure": fig, "published": value, "ours": ours, "ours_is": ours_name, "reproduced": ok,
                     "note": NOT_REPRODUCED.get((key, fig), "")})
    return rows


# ----------------------------------------------------------------------------- dtypes and bytes
WEIGHT_FORMATS = ("fp32", "bf16", "fp16", "int8", "int4")
_SHORT = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
DTYPE_BYTES = {short: dt.itemsize for dt, short in _SHORT.items()}


def _norm_dtype(name, what: str, allowed) -> str:
    """Any spelling of the one dtype table (gemma4._util.DTYPES) -> the short name used here."""
    n = str(name).lower().removeprefix("torch.")
    if n in DTYPES:
        n = _SHORT[DTYPES[n]]
    if n not in allowed:
        raise ValueError(f"unsupported {what} {name!r}; choose one of {', '.join(allowed)}")
    return n


def quantized_bytes(n_out: int, n_in: int, scheme: str, group_size: int | None, lead: int = 1) -> int:
    """Bytes of one quantized [lead, n_out, n_in] weight as gemma4.quant stores it: int8 codes + one
    bf16 scale per output row (or, group_size 32, one float16 scale per 32 inputs); int4 two codes per
    byte + a bf16 (scale, zero) pair per group; bf16 two bytes."""
    if scheme == "int8":
        return lead * (n_out * n_in + 2 * n_out * (n_in // group_size if group_size else 1))
    if scheme == "int4":
        return lead * (n_out * n_in // 2 + 4 * n_out * (n_in // group_size))
    if scheme == "bf16":
        return lead * n_out * n_in * 2
    raise ValueError(f"unknown quantization scheme {scheme!r}")


def _weight_tensors(cfg: Gemma4Config):
    """Yields (part, kind, shape) for every parameter/buffer the model holds. kind: "linear" (an
    nn.Linear weight), "embedding", "ple_table", "experts" (3-D) or "small" (norms, scalars, router)."""
    h, L, p = cfg.hidden_size, cfg.num_hidden_layers, cfg.hidden_size_per_layer_input
    yield "embedding", "embedding", (cfg.vocab_size, h)
    if not cfg.tie_word_embeddings:
        yield "lm_head", "linear", (cfg.vocab_size, h)
    if p:
        yield "ple_table", "ple_table", (cfg.vocab_size_per_layer_input, L * p)
        yield "ple", "linear", (L * p, h)
        yield "ple", "small", (p,)
    yield "norms", "small", (h,)
    modes = cfg.kv_sharing_modes
    for i, t in enumerate(cfg.layer_types):
        n, d, kv = cfg.num_attention_heads, cfg.layer_head_dim(i), cfg.layer_kv_heads(i)
        part = f"attention_{'full' if t == FULL else 'sliding'}"
        yield part, "linear", (n * d, h)
        yield part, "linear", (h, n * d)
        yield part, "small", (d,)
        if modes[i] != "reuse":
            yield part, "linear", (kv * d, h)
            yield part, "small", (d,)
            if not cfg.layer_k_eq_v(i):
                yield part, "linear", (kv * d, h)
        inter = cfg.layer_intermediate_size(i)
        yield "mlp", "linear", (inter, h)
        yield "mlp", "linear", (inter, h)
        yield "mlp", "linear", (h, inter)
        for _ in range(4):
            yield "norms", "small", (h,)
        if cfg.use_layer_scalar:
            yield "norms", "small", (1,)
        if cfg.enable_moe_block:
            e, mi = cfg.num_experts, cfg.moe_intermediate_size
            yield "moe", "router", (e, h)
            yield "moe", "small", (h,)
            yield "moe", "small", (e,)
            yield "moe", "experts", (e, 2 * mi, h)
            yield "moe", "experts", (e, h, mi)
            for _ in range(3):
                yield "norms", "small", (h,)
        if p:
            yield "ple", "linear", (p, h)
            yield "ple", "linear", (h, p)
            yield "ple", "small", (h,)


def weight_bytes(config: Gemma4Config, weight_dtype: str = "bf16", group_size: int | None = 32,
                 compute_dtype: str = "bf16", quantize_embeddings: bool = True) -> dict[str, int]:
    """Bytes of every weight by part, for a plain float model (``weight_dtype`` fp32/bf16/fp16) or one
    quantized by :func:`gemma4.quant.quantize` (int8/int4; unquantized tensors — norms, scalars, the
    router — stay in ``compute_dtype``)."""
    wd = _norm_dtype(weight_dtype, "weight dtype", WEIGHT_FORMATS)
    quant = wd in ("int8", "int4")
    small = DTYPE_BYTES[_norm_dtype(compute_dtype, "compute dtype", ("fp32", "bf16", "fp16"))] if quant else DTYPE_BYTES[wd]
    gs = group_size if wd == "int4" else None
    out: dict[str, int] = {}
    for part, kind, shape in _weight_tensors(config):
        numel = math.prod(shape)
        if not quant or kind in ("small", "router") or (kind in ("embedding", "ple_table") and not quantize_embeddings):
            nb = numel * small
        elif kind == "experts":
            nb = quantized_bytes(shape[1], shape[2], wd, gs, lead=shape[0])
        else:
            nb = quantized_bytes(shape[0], shape[1], wd, gs)
        out[part] = out.get(part, 0) + nb
    return out


# ----------------------------------------------------------------------------- memory estimate
@dataclass
class MemoryEstimate:
    config_name: str
    context: int
    batch: int
    weight_dtype: str
    kv_dtype: str
    weights: dict[str, int]  # bytes by part
    kv_by_type: dict[str, int]  # bytes of live KV (what ModelCache.nbytes reports), by layer type
    kv_reserved: int  # bytes the caches have allocated (full layers grow in whole chunks)
    kv_layers: dict[str, int]  # number of layers holding a cache, by type (KV-shared consumers hold none)
    k_eq_v_saving: int  # bytes a cache storing K=V layers' raw key once would save (ours does not)
    activations: int  # transient bytes of one prefill chunk
    prefill_chunk: int
    offloadable: int  # bytes that need not be on the accelerator (the PLE table: gathered, never multiplied)
    notes: list[str] = field(default_factory=list)

    @property
    def weights_total(self) -> int:
        return sum(self.weights.values())

    @property
    def kv_total(self) -> int:
        return sum(self.kv_by_type.values())

    @property
    def total(self) -> int:
        return self.weights_total + self.kv_reserved + self.activations

    @property
    def accelerator_total(self) -> int:
        return self.total - self.offloadable

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(weights_total=self.weights_total, kv_total=self.kv_total, total=self.total,
                 accelerator_total=self.accelerator_total)
        return d


def kv_cache_bytes(config: Gemma4Config, context: int, batch: int = 1, kv_dtype: str = "bf16", *,
                   slack: int = 0, chunk: int = 256, share_k_eq_v: bool = False) -> tuple[dict[str, int], int, int]:
    """(live bytes by layer type, reserved bytes, K=V saving) of a :class:`gemma4.model.cache.ModelCache`
    after ``context`` tokens.

    Exactly what our caches hold: a sliding layer allocates its whole ring of ``window + slack`` slots
    on first use (even for a short context); a full layer holds ``context`` slots live and allocates
    them in whole ``chunk``s; KV-sharing consumers hold nothing. Both K and V are stored on K=V full
    layers: there V = v_norm(k_raw) (no RoPE, no k_norm scale) is a different tensor from
    K = RoPE(k_norm(k_raw)). Storing k_raw once and recomputing both views per step would halve those
    layers' cache: that is the ``k_eq_v_saving`` returned; ``share_k_eq_v=True`` prices such a cache."""
    eb = DTYPE_BYTES[_norm_dtype(kv_dtype, "KV dtype", ("fp32", "bf16", "fp16"))]
    live = {SLIDING: 0, FULL: 0}
    reserved = saving = 0
    modes = config.kv_sharing_modes
    for i, t in enumerate(config.layer_types):
        if modes[i] == "reuse" or context <= 0:
            continue
        per_slot = batch * config.layer_kv_heads(i) * config.layer_head_dim(i) * eb  # one of K or V
        n_tensors = 2
        if config.layer_k_eq_v(i):
            saving += per_slot * context
            if share_k_eq_v:
                n_tensors = 1
        if t == SLIDING:
            slots = max(config.sliding_window + slack, 1)
            live[t] += n_tensors * per_slot * slots
            reserved += n_tensors * per_slot * slots
        else:
            live[t] += n_tensors * per_slot * context
            reserved += n_tensors * per_slot * (-(-context // chunk) * chunk)
    if share_k_eq_v:
        saving = 0
    return live, reserved, saving


def activation_bytes(config: Gemma4Config, tokens: int, batch: int = 1, dtype: str = "bf16", *,
                     keep_last: int = 1, attention: str = "eager", context: int | None = None) -> int:
    """Peak transient bytes of one forward over ``tokens`` new tokens (a prefill chunk).

    A layer's working set is counted at its largest point: the residual stream and its normed copy,
    q/k/v (and their RoPE'd copies), the MLP's gate/up/product, the PLE inputs of all layers, and the
    attention scores when the eager backend materialises them ([B, N, T, S] in float32). SDPA on CPU
    works in blocks, so its scores are not charged. Logits are [B, keep_last, V] in float32 plus the
    soft-cap temporary."""
    cfg = config
    eb = DTYPE_BYTES[_norm_dtype(dtype, "activation dtype", ("fp32", "bf16", "fp16"))]
    bt = batch * tokens
    h = cfg.hidden_size
    s = tokens if context is None else max(context, tokens)
    best = 0
    for i, t in enumerate(cfg.layer_types):
        n, d, kv = cfg.num_attention_heads, cfg.layer_head_dim(i), cfg.layer_kv_heads(i)
        attn = bt * (n * d * 3 + kv * d * 4) * eb  # q (+ normed, roped), k/v (+ normed, roped)
        if attention == "eager":
            keys = min(s, cfg.sliding_window + tokens) if t == SLIDING else s
            # The peak is at the softmax: the masked scores, the float32 copy softmax(dtype=float32) makes
            # of them and its float32 output — 2 + 4 + 4 bytes per score in bf16 (measured on the 270M at
            # 4096 tokens). float32 activations need no copy (8 bytes), which this overcounts.
            attn += batch * n * tokens * keys * (3 * eb + 4)
        inter = cfg.layer_intermediate_size(i)
        mlp = bt * 3 * inter * eb
        if cfg.enable_moe_block:
            mlp += bt * (3 * cfg.moe_intermediate_size * cfg.top_k_experts + cfg.num_experts * 4) * eb
        best = max(best, attn, mlp)
    resid = bt * h * eb * 4  # residual, normed input, branch output, sum
    ple = bt * cfg.num_hidden_layers * cfg.hidden_size_per_layer_input * eb * 3 if cfg.hidden_size_per_layer_input else 0
    k = min(keep_last, tokens) if keep_last else tokens
    logits = batch * k * cfg.vocab_size * 4 * 2
    return resid + ple + best + logits


def estimate_memory(config: Gemma4Config | str, context: int, batch: int = 1, weight_dtype: str = "bf16",
                    kv_dtype: str | None = None, *, group_size: int | None = 32, prefill_chunk: int = 512,
                    slack: int = 0, chunk: int = 256, share_k_eq_v: bool = False, attention: str = "eager",
                    quantize_embeddings: bool = True) -> MemoryEstimate:
    """Memory of running ``config`` at ``context`` tokens (batch ``batch``).

    ``weight_dtype``: fp32/bf16/fp16, or int8/int4 (``gemma4.quantize``; int4 with ``group_size``).
    ``kv_dtype`` defaults to the activation dtype (bf16 for quantized models), which is what our caches
    store. ``prefill_chunk``: tokens per forward when prefilling (activations scale with it)."""
    name = config if isinstance(config, str) else "custom"
    cfg = Gemma4Config.from_preset(config) if isinstance(config, str) else config
    if context < 0 or batch < 1:
        raise ValueError(f"context must be >= 0 and batch >= 1, got context={context}, batch={batch}")
    wd = _norm_dtype(weight_dtype, "weight dtype", WEIGHT_FORMATS)
    act_dtype = "bf16" if wd in ("int8", "int4") else wd
    kvd = _norm_dtype(kv_dtype or act_dtype, "KV dtype", ("fp32", "bf16", "fp16"))
    if wd == "int4" and (group_size is None or group_size <= 0):
        raise ValueError("int4 needs a positive group_size")
    weights = weight_bytes(cfg, wd, group_size, act_dtype, quantize_embeddings)
    live, reserved, saving = kv_cache_bytes(cfg, context, batch, kvd, slack=slack, chunk=chunk, share_k_eq_v=share_k_eq_v)
    modes = cfg.kv_sharing_modes
    kv_layers = {SLIDING: 0, FULL: 0}
    for i, t in enumerate(cfg.layer_types):
        kv_layers[t] += modes[i] != "reuse"
    tokens = min(prefill_chunk, context) if context else 1
    # The same for every weight format: quantized models run bf16 activations, which the int8/int4 kernels
    # take as they are, allocating nothing but their output (tests/test_memory.py checks it).
    act = activation_bytes(cfg, tokens, batch, act_dtype, attention=attention, context=context)
    notes = []
    if cfg.num_kv_shared_layers:
        notes.append(f"{cfg.num_kv_shared_layers} KV-shared layers hold no cache")
    if saving:
        notes.append("K=V full layers store K and V separately in our cache (V is the scale-less-normed raw key, "
                     f"K the k_norm'd, RoPE'd one); a cache storing the raw key once would save {saving / 2**20:.1f} MiB")
    return MemoryEstimate(
        config_name=name, context=context, batch=batch, weight_dtype=wd if wd != "int4" else f"int4-g{group_size}",
        kv_dtype=kvd, weights=weights, kv_by_type=live, kv_reserved=reserved, kv_layers=kv_layers,
        k_eq_v_saving=saving, activations=act, prefill_chunk=tokens, offloadable=weights.get("ple_table", 0), notes=notes,
    )


def parse_tokens(s: str | int) -> int:
    """'32k' -> 32768, '1m' -> 1048576, '4096' -> 4096."""
    if isinstance(s, int):
        return s
    t = str(s).strip().lower()
    mult = {"k": 1024, "m": 1024 * 1024}.get(t[-1:], 1)
    try:
        return int(float(t[:-1] if mult > 1 else t) * mult)
    except ValueError:
        raise ValueError(f"cannot read a token count from {s!r} (examples: 4096, 32k, 1m)") from None
