"""LoRA and QLoRA adapters, stored in PEFT's on-disk format.

``add_lora(model, targets, r, alpha)`` wraps linear layers (attention, MLP, PLE projections; float
``nn.Linear`` or our int8/int4 quantized linears, which is QLoRA) in `LoRALinear`:
``y = base(x) + B(A(dropout(x))) * alpha / r`` with the base frozen. Module and tensor names follow
PEFT (``q_proj.base_layer``, ``q_proj.lora_A.weight``), so an adapter directory written by
`save_adapter` (``adapter_config.json`` + ``adapter_model.safetensors`` with keys such as
``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight``) loads with
``peft.PeftModel.from_pretrained`` onto transformers' model, and `load_adapter` reads PEFT's.

MoE expert stacks (``Experts``: gate_up_proj [E, 2I, H], down_proj [E, H, I]; or their quantized
``QuantExperts``) are adapted by `LoRAExperts` (targets ``experts``, ``experts.gate_up_proj``,
``experts.down_proj`` or a module/parameter path): a rank-r update per expert in the layout of PEFT's
``ParamWrapper``, saved with ``target_parameters`` and the nested ``experts.base_layer.lora_A`` keys PEFT
itself writes for transformers' Gemma 4 MoE model.

KV-sharing consumer layers have no k/v projections (they reuse an earlier layer's K/V), and K=V full
layers have no v_proj: a LoRA naming one of those is refused with the module's name, whether asked
for by path or found in an adapter file, rather than silently training or serving nothing.
"""

from __future__ import annotations

import functools
import json
import math
import re
from pathlib import Path

import torch
from safetensors.torch import load_file
import torch.nn.functional as F
from torch import nn

from gemma4._util import Gemma4Error, atomic_save_safetensors, atomic_write_text
from gemma4.io import read_safetensors_header, safetensors_files
from gemma4.model.decoder import Experts, gelu_tanh
from gemma4.quant import Int4Linear, Int8Linear, QuantExperts, QuantWeight

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
PLE = ("per_layer_input_gate", "per_layer_projection", "per_layer_model_projection")
DEFAULT_TARGETS = ATTENTION + MLP
# The 3-D expert tensors, in the Experts module's declaration order: PEFT wraps the targeted ones in that
# order, so the last one is the outermost wrapper (``experts.lora_A``) and earlier ones sit one
# ``.base_layer`` deeper each (``experts.base_layer.lora_A``) in its keys.
EXPERT_PARAMS = ("gate_up_proj", "down_proj")
# Named groups a user may pass as a target.
GROUPS = {"attention": ATTENTION, "mlp": MLP, "ple": PLE, "all-linear": ATTENTION + MLP + PLE}


class LoRAError(Gemma4Error, ValueError):
    """A LoRA target or adapter file that cannot apply to this model; the message names the module/key."""


# ----------------------------------------------------------------------------- frozen quantized base
class _FrozenQuantLinear(torch.autograd.Function):
    """x @ W[index]^T through a quantized weight's own kernel, with the input gradient ``dy @ W`` from
    its dequantized rows (the integer kernels have no derivative). The weight is frozen: no weight grad."""

    @staticmethod
    def forward(ctx, x, qmod, index):
        ctx.qmod, ctx.index = qmod, index
        with torch.no_grad():
            return qmod.matmul(x, index)

    @staticmethod
    def backward(ctx, gy):
        w = ctx.qmod.dequantize(gy.dtype, ctx.index)  # [N,K], one matrix at a time
        return gy @ w, None, None


def frozen_quant_linear(x: torch.Tensor, qmod: QuantWeight, index: int | None = None) -> torch.Tensor:
    if torch.is_grad_enabled() and x.requires_grad:
        return _FrozenQuantLinear.apply(x, qmod, index)
    return qmod.matmul(x, index)


def _frozen_expert(experts, e: int, x: torch.Tensor) -> torch.Tensor:
    g, u = frozen_quant_linear(x, experts.gate_up_proj, e).chunk(2, dim=-1)
    return frozen_quant_linear(F.gelu(g, approximate="tanh") * u, experts.down_proj, e)


def prepare_qlora(model) -> int:
    """Let gradients pass *through* every frozen quantized linear and expert stack (to the LoRA factors
    before them): their integer kernels have no derivative. Per instance, names and state unchanged;
    the forward values are the kernels' own. Returns how many modules were switched."""
    n = 0
    for mod in model.modules():
        if isinstance(mod, (Int8Linear, Int4Linear)) and "forward" not in mod.__dict__:
            mod.forward = functools.partial(frozen_quant_linear, qmod=mod)
            n += 1
        elif isinstance(mod, QuantExperts) and "expert" not in mod.__dict__:
            mod.expert = functools.partial(_frozen_expert, mod)
            n += 1
    return n


# ----------------------------------------------------------------------------- the layer
class _LoRAMatmul(torch.autograd.Function):
    """y = x W^T + bias + s (x A^T) B^T over a frozen W, with the update accumulated into the base product
    by the GEMM itself (addmm, beta=1) rather than a separate [tokens, N] add, forward and backward; the
    factor gradients are laid out so the long token dimension is the contraction (dB^T = (s xA)^T dY).
    Measured on Gemma 3 270M's LoRA step (1 thread): the autograd composition spent as much time in
    [tokens, N]-sized adds, casts and thin GEMMs as in the base matmuls of the adapted layers."""

    @staticmethod
    def forward(ctx, x, w, bias, a, b, s):
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])  # [M,K]
        xa = (x2 @ a.t()) * s  # [M,r], scaled in the rank-r space
        y = torch.addmm(bias, x2, w.t()) if bias is not None else x2 @ w.t()  # [M,N]
        y.addmm_(xa, b.t())
        ctx.save_for_backward(x2, w, a, b, xa)
        ctx.s, ctx.shape = s, shape
        return y.view(*shape[:-1], w.shape[0])

    @staticmethod
    def backward(ctx, gy):
        x2, w, a, b, xa = ctx.saved_tensors
        s, shape = ctx.s, ctx.shape
        g = gy.reshape(-1, gy.shape[-1])  # [M,N]
        gb = (g @ b) * s  # [M,r]: dL/d(xA^T), the scaling applied once in the rank-r space
        gx = g @ w  # [M,K]
        gx.addmm_(gb, a)
        ga = gb.t() @ x2  # [r,K]
        gbw = (xa.t() @ g).t()  # [N,r]
        return gx.view(shape), None, None, ga, gbw, None


class LoRALinear(nn.Module):
    """A frozen linear layer plus a trainable low-rank update (PEFT's module and tensor names)."""

    def __init__(self, base: nn.Module, r: int, alpha: float, dropout: float = 0.0, use_rslora: bool = False):
        super().__init__()
        if r < 1:
            raise LoRAError(f"LoRA rank must be >= 1, got {r}")
        self.in_features, self.out_features = base.in_features, base.out_features
        self.base_layer = base
        self.r, self.alpha = r, alpha
        self.scaling = alpha / math.sqrt(r) if use_rslora else alpha / r
        dev = _device_of(base)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.lora_A = nn.Linear(self.in_features, r, bias=False, device=dev, dtype=torch.float32)
        self.lora_B = nn.Linear(r, self.out_features, bias=False, device=dev, dtype=torch.float32)
        # PEFT's default: A ~ kaiming-uniform(a=sqrt(5)), B = 0, so a new adapter starts as the base model.
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x):
        if torch.is_grad_enabled() and self._fused_ok(x):
            return self._fused_forward(x)
        return self._unfused(x)

    def _unfused(self, x):
        if isinstance(self.base_layer, QuantWeight):
            y = frozen_quant_linear(x, self.base_layer)
        else:
            y = self.base_layer(x)
        # Outside autocast the update runs in the factors' dtype (float32) and is added in the base
        # output's dtype, as PEFT does; under autocast the matmuls follow the autocast dtype.
        xa = x if torch.is_autocast_enabled(x.device.type) else x.to(self._factor_dtype(x))
        # The scaling multiplies the rank-r intermediate [.., r], not the output [.., N] (PEFT scales the
        # output): one pass over r values per token instead of N, forward and backward (measured ~3% of a
        # LoRA step of Gemma 3 270M); the same product up to float rounding.
        z = self.lora_B(self.lora_A(self.lora_dropout(xa)) * self.scaling)
        return y + z.to(y.dtype)

    def _fused_ok(self, x: torch.Tensor) -> bool:
        """The training path (`_LoRAMatmul`) takes a plain float base and plain factors, no dropout."""
        base = self.base_layer
        return (type(base) is nn.Linear and not base.weight.requires_grad and isinstance(self.lora_dropout, nn.Identity)
                and type(self.lora_A) is nn.Linear and type(self.lora_B) is nn.Linear and x.is_floating_point())

    def _fused_forward(self, x: torch.Tensor) -> torch.Tensor:
        # Under autocast: every operand in the autocast dtype, as autocast would cast them; the factors' casts
        # are differentiable, so their gradients come back in float32. Outside it: the base in its dtype,
        # the update in the factors' dtype (the unfused path's rule).
        base, a, b = self.base_layer, self.lora_A.weight, self.lora_B.weight
        dev = x.device.type
        if torch.is_autocast_enabled(dev):
            cdt = torch.get_autocast_dtype(dev)
            w, bias, a, b = base.weight.to(cdt), base.bias, a.to(cdt), b.to(cdt)
            bias = bias.to(cdt) if bias is not None else None
            with torch.autocast(dev, enabled=False):
                return _LoRAMatmul.apply(x.to(cdt), w, bias, a, b, self.scaling)
        if a.dtype != base.weight.dtype or x.dtype != base.weight.dtype:
            return self._unfused(x)
        return _LoRAMatmul.apply(x, base.weight, base.bias, a, b, self.scaling)

    def _factor_dtype(self, x: torch.Tensor) -> torch.dtype:
        # The factors' dtype; the CPU fast path may have swapped lora_A for a packed module without
        # a plain ``weight`` (then its first floating tensor tells).
        w = getattr(self.lora_A, "weight", None)
        if isinstance(w, torch.Tensor):
            return w.dtype
        for t in list(self.lora_A.parameters()) + list(self.lora_A.buffers()):
            if t.is_floating_point():
                return t.dtype
        return x.dtype

    def delta_weight(self) -> torch.Tensor:
        """scaling * B @ A, float32 [out, in]."""
        return (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scaling

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha}, in_features={self.in_features}, out_features={self.out_features}"


class LoRAExperts(nn.Module):
    """Frozen MoE expert stacks plus a trainable rank-r update of each expert's gate_up_proj and/or
    down_proj. Same routing and summation as the wrapped ``Experts``; QLoRA when those are quantized.

    The factors keep the layout of PEFT's ``ParamWrapper`` for a [E, out, in] parameter, so saving and
    loading are plain copies: ``lora_A[p]`` is [E*r, in] with expert e's rows at e*r .. e*r+r-1, and
    ``lora_B[p]`` is [out, r*E] with expert e's columns at e, E+e, 2E+e, ... (rank-major). Expert e's
    update is ``scaling * B_e @ A_e`` ([out, r] @ [r, in]); it is applied beside the frozen weight
    (``x A_e^T B_e^T``) rather than folded into it, which is the same function and never builds an
    [E, out, in] delta (nor needs a float weight: a quantized stack works the same way)."""

    def __init__(self, base: nn.Module, params, r: int, alpha: float, use_rslora: bool = False):
        super().__init__()
        if r < 1:
            raise LoRAError(f"LoRA rank must be >= 1, got {r}")
        self.params = tuple(p for p in EXPERT_PARAMS if p in params)
        if not self.params or set(params) - set(EXPERT_PARAMS):
            raise LoRAError(f"expert LoRA parameters must be among {EXPERT_PARAMS}, got {list(params)}")
        self.base_layer = base
        self.num_experts = base.num_experts
        self.r, self.alpha = r, alpha
        self.scaling = alpha / math.sqrt(r) if use_rslora else alpha / r
        dev, e = _device_of(base), base.num_experts
        self.lora_A, self.lora_B = nn.ParameterDict(), nn.ParameterDict()
        for p in self.params:
            out_f, in_f = _expert_shape(base, p)
            a = torch.empty(e * r, in_f, device=dev, dtype=torch.float32)
            # PEFT's default init over the whole [E*r, in] factor (so the same fan-in), B = 0.
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
            self.lora_A[p] = nn.Parameter(a)
            self.lora_B[p] = nn.Parameter(torch.zeros(out_f, r * e, device=dev, dtype=torch.float32))

    def factors(self, p: str, e: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Expert e's (A_e [r, in], B_e [out, r]) for parameter p (views of the stored factors)."""
        a = self.lora_A[p].view(self.num_experts, self.r, -1)[e]  # [E*r, in] -> [E, r, in] -> [r, in]
        b = self.lora_B[p].view(-1, self.r, self.num_experts)[:, :, e]  # [out, r*E] -> [out, r, E] -> [out, r]
        return a, b

    def _proj(self, p: str, e: int, x: torch.Tensor) -> torch.Tensor:
        w = getattr(self.base_layer, p)
        y = frozen_quant_linear(x, w, e) if isinstance(w, QuantWeight) else F.linear(x, w[e])
        if p not in self.lora_A:
            return y
        a, b = self.factors(p, e)
        # As LoRALinear: float32 factors outside autocast, added in the base output's dtype.
        xa = x if torch.is_autocast_enabled(x.device.type) else x.to(a.dtype)
        return y + (F.linear(F.linear(xa, a), b) * self.scaling).to(y.dtype)

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        g, u = self._proj("gate_up_proj", e, x).chunk(2, dim=-1)
        return self._proj("down_proj", e, gelu_tanh(g) * u)

    # Routing, expert order and accumulation are the base class's (it only calls self.expert).
    forward = Experts.forward

    def delta_weight(self, p: str) -> torch.Tensor:
        """scaling * B_e @ A_e for every expert: float32 [E, out, in], the layout of the base tensor."""
        a = self.lora_A[p].float().view(self.num_experts, self.r, -1)  # [E, r, in]
        b = self.lora_B[p].float().view(-1, self.r, self.num_experts)  # [out, r, E]
        return torch.einsum("ore,eri->eoi", b, a) * self.scaling

    def extra_repr(self) -> str:
        return f"params={list(self.params)}, r={self.r}, alpha={self.alpha}, num_experts={self.num_experts}"


def _expert_shape(base: nn.Module, p: str) -> tuple[int, int]:
    """(out, in) of one expert's matrix in a float [E, out, in] stack or a quantized one."""
    w = getattr(base, p)
    if isinstance(w, QuantWeight):
        return w.out_features, w.in_features
    return w.shape[-2], w.shape[-1]


def _device_of(mod: nn.Module) -> torch.device:
    for t in list(mod.parameters()) + list(mod.buffers()):
        return t.device
    return torch.device("cpu")


def _is_linear(mod: nn.Module) -> bool:
    return isinstance(mod, (nn.Linear, Int8Linear, Int4Linear))


# ----------------------------------------------------------------------------- targets
def _missing_reason(model, path: str) -> str | None:
    """Why a module path that the layout could name does not exist in this model, or None."""
    m = re.fullmatch(r"model\.layers\.(\d+)\.self_attn\.(k_proj|v_proj)", path)
    if not m:
        return None
    i, proj = int(m.group(1)), m.group(2)
    cfg = model.config
    if i >= cfg.num_hidden_layers:
        return None
    if cfg.kv_sharing_modes[i] == "reuse":
        return (f"{path}: layer {i} is a KV-sharing consumer: it reuses the K/V of an earlier "
                f"{cfg.layer_types[i]} layer and has no {proj} weight, so a LoRA there would train nothing")
    if proj == "v_proj" and cfg.layer_k_eq_v(i):
        return f"{path}: layer {i} uses K=V attention (values are the keys): it has no v_proj weight"
    return None


def _expert_targets(names: dict, t: str) -> list[str] | None:
    """The expert parameter paths (``<experts module>.<param>``) target ``t`` names, or None when it
    is not an expert target: ``experts`` (every stack, both tensors), ``experts.gate_up_proj`` /
    ``experts.down_proj`` (that tensor of every stack, PEFT's ``target_parameters`` spelling), or a path
    to one stack or one of its tensors."""
    stacks = [n for n, m in names.items() if isinstance(m, Experts)]
    mod, _, leaf = t.rpartition(".")
    if t == "experts" or (mod == "experts" and leaf in EXPERT_PARAMS):
        if not stacks:
            raise LoRAError(f"LoRA target {t!r}: this model has no MoE expert stacks")
        return [f"{n}.{p}" for n in stacks for p in (EXPERT_PARAMS if t == "experts" else (leaf,))]
    if isinstance(names.get(t), Experts):
        return [f"{t}.{p}" for p in EXPERT_PARAMS]
    if leaf in EXPERT_PARAMS and isinstance(names.get(mod), Experts):
        return [t]
    return None


def _split_targets(model, paths: list[str]) -> tuple[list[str], dict[str, list[str]]]:
    """(linear module paths, {experts module path: [its targeted tensors]})."""
    names = dict(model.named_modules())
    linear, stacks = [], {}
    for p in paths:
        mod, _, leaf = p.rpartition(".")
        # (A quantized stack's tensors are submodules, so the parent decides, not whether p is a module.)
        if leaf in EXPERT_PARAMS and isinstance(names.get(mod), Experts):
            stacks.setdefault(mod, []).append(leaf)
        else:
            linear.append(p)
    return linear, stacks


def resolve_targets(model, targets) -> list[str]:
    """Module paths to adapt. ``targets``: short names (``q_proj``), groups (``attention``, ``mlp``,
    ``ple``, ``all-linear``), full module paths (``model.layers.3.self_attn.q_proj``), or MoE expert
    tensors (``experts``, ``experts.gate_up_proj``, ``experts.down_proj``, ``model.layers.3.experts``),
    which come back as parameter paths (``model.layers.3.experts.down_proj``).

    A short name adapts every layer that has that module; a full path must exist, and a consumer's
    k/v (or a K=V layer's v) is refused by name."""
    if isinstance(targets, str):
        targets = [t.strip() for t in targets.split(",") if t.strip()]
    names = dict(model.named_modules())
    chosen: list[str] = []
    for t in targets or DEFAULT_TARGETS:
        experts = _expert_targets(names, t)
        if experts is not None:
            chosen += experts
            continue
        shorts = GROUPS.get(t, (t,) if "." not in t else None)
        if shorts is None:  # a full path
            if t not in names:
                raise LoRAError(_missing_reason(model, t) or f"{t}: no such module in this model")
            if not _is_linear(names[t]):
                raise LoRAError(f"{t}: a {type(names[t]).__name__}, not a linear layer (LoRA adapts linear layers)")
            chosen.append(t)
            continue
        hits = [n for n, m in names.items() if n.rsplit(".", 1)[-1] in shorts and _is_linear(m)]
        if not hits:
            raise LoRAError(f"LoRA target {t!r} matches no linear layer of this model")
        chosen += hits
    order = {n: i for i, n in enumerate(names)}

    def position(n: str):  # model order; an expert tensor right after its module, in declaration order
        mod, _, leaf = n.rpartition(".")
        return (order[n], 0) if n in order else (order[mod], 1 + EXPERT_PARAMS.index(leaf))

    out = sorted(set(chosen), key=position)
    if any(isinstance(names.get(n), (LoRALinear, LoRAExperts)) or ".lora_" in n or ".base_layer" in n for n in out):
        raise LoRAError("the model already has LoRA adapters on some of these modules")
    return out


def _set_module(model: nn.Module, path: str, new: nn.Module) -> None:
    parent, _, leaf = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, new)


def add_lora(model, targets=None, r: int = 8, alpha: float = 16.0, dropout: float = 0.0, *,
             use_rslora: bool = False, freeze_base: bool = True) -> list[str]:
    """Wrap the target linears in LoRALinear and the targeted MoE expert stacks in LoRAExperts (QLoRA
    when they are quantized); returns their paths (expert tensors as ``<module>.<param>``). With
    ``freeze_base`` every non-LoRA parameter stops requiring grad. Records the settings on
    ``model.lora_settings`` for `save_adapter`."""
    paths = resolve_targets(model, targets)
    linear, stacks = _split_targets(model, paths)
    if stacks and dropout > 0:
        # The expert update is per expert weight (PEFT folds it into the parameter and refuses
        # lora_dropout with target_parameters): there is no per-token input to drop.
        raise LoRAError(f"{next(iter(stacks))}: LoRA on MoE expert tensors takes no dropout (got {dropout}); "
                        "use dropout=0 or leave the experts out of the targets")
    prepare_qlora(model)
    for p in linear:
        _set_module(model, p, LoRALinear(model.get_submodule(p), r, alpha, dropout, use_rslora))
    for p, params in stacks.items():
        _set_module(model, p, LoRAExperts(model.get_submodule(p), params, r, alpha, use_rslora))
    if freeze_base:
        for n, prm in model.named_parameters():
            prm.requires_grad_(".lora_" in n)
    shorts = None if targets is None else ([targets] if isinstance(targets, str) else list(targets))
    model.lora_settings = {"r": r, "alpha": alpha, "dropout": dropout, "use_rslora": use_rslora,
                           "paths": paths, "targets": shorts}
    return paths


def lora_modules(model) -> dict[str, LoRALinear | LoRAExperts]:
    return {n: m for n, m in model.named_modules() if isinstance(m, (LoRALinear, LoRAExperts))}


def _expert_key(path: str, params: tuple[str, ...], p: str) -> str:
    """PEFT's module name for tensor p of an adapted stack: one ``.base_layer`` per wrapper around it
    (the last targeted tensor is the outermost)."""
    return path + ".base_layer" * (len(params) - 1 - params.index(p))


# ----------------------------------------------------------------------------- PEFT format
def checkpoint_prefix(base_path) -> str:
    """How the base checkpoint names the text model: "model." (a text-only checkpoint, as ours) or
    "model.language_model." (the multimodal Gemma 4 release). Adapter keys follow the base's layout."""
    if base_path is None:
        return "model."
    p = Path(str(base_path))
    if not p.is_dir():
        return "model."
    try:
        files = safetensors_files(p)
    except Exception:  # no safetensors (e.g. a GGUF base): our own layout
        return "model."
    _, header = read_safetensors_header(files[0])
    return "model.language_model." if any(k.startswith("model.language_model.") for k in header) else "model."


def _to_layout(path: str, prefix: str) -> str:
    return prefix + path[len("model."):] if prefix != "model." and path.startswith("model.") else path


def _from_layout(path: str, prefix: str) -> str:
    return "model." + path[len(prefix):] if prefix != "model." and path.startswith(prefix) else path


def _whole(t: torch.Tensor) -> torch.Tensor:
    # An FSDP2-sharded factor (a DTensor) is gathered first; every rank must take part.
    t = t.detach()
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).float().contiguous().cpu()


def adapter_state(model, prefix: str = "model.") -> dict[str, torch.Tensor]:
    """The adapter tensors under PEFT's key names (collective under FSDP: call on every rank)."""
    out = {}
    for path, m in lora_modules(model).items():
        key = PEFT_PREFIX + _to_layout(path, prefix)
        if isinstance(m, LoRAExperts):
            for p in m.params:
                k = _expert_key(key, m.params, p)
                out[f"{k}.lora_A.weight"] = _whole(m.lora_A[p])
                out[f"{k}.lora_B.weight"] = _whole(m.lora_B[p])
            continue
        out[f"{key}.lora_A.weight"] = _whole(m.lora_A.weight)
        out[f"{key}.lora_B.weight"] = _whole(m.lora_B.weight)
    return out


def save_adapter(model, directory, *, base_model: str | None = None, prefix: str | None = None,
                 state: dict[str, torch.Tensor] | None = None) -> Path:
    """Write ``adapter_config.json`` + ``adapter_model.safetensors`` (PEFT's format), each atomically.
    ``base_model``: the base checkpoint (recorded, and its key layout followed). ``state``: the tensors
    from :func:`adapter_state` when already gathered (FSDP: every rank gathers, rank 0 writes)."""
    mods = lora_modules(model)
    if not mods:
        raise LoRAError("the model has no LoRA adapter to save")
    settings = getattr(model, "lora_settings", None) or {}
    first = next(iter(mods.values()))
    ranks = {m.r for m in mods.values()}
    alphas = {m.alpha for m in mods.values()}
    if len(ranks) > 1 or len(alphas) > 1:
        raise LoRAError(f"adapters with mixed ranks/alphas ({sorted(ranks)}, {sorted(alphas)}) are not supported")
    prefix = prefix or checkpoint_prefix(base_model)
    paths = [p for p, m in mods.items() if isinstance(m, LoRALinear)]
    shorts = sorted({p.rsplit(".", 1)[-1] for p in paths})
    names = dict(model.named_modules())
    # Short names when they mean exactly the adapted set (every module of that name has a LoRA), else
    # full paths: PEFT applies a LoRA wherever a target matches, and a mismatch would be a silent drift.
    every = all(isinstance(m, LoRALinear) for n, m in names.items() if n.rsplit(".", 1)[-1] in shorts
                and (isinstance(m, LoRALinear) or _is_linear(m)) and ".base_layer" not in n and ".lora_" not in n)
    target_modules = shorts if every else [_to_layout(p, prefix) for p in paths]
    stacks = {p: m for p, m in mods.items() if isinstance(m, LoRAExperts)}
    target_parameters = None
    if stacks:
        # PEFT applies a target_parameters entry to every parameter path ending in it: the short form
        # only when every expert stack carries the same tensors, else one full path per tensor.
        all_stacks = [n for n, m in names.items() if isinstance(m, (Experts, LoRAExperts)) and ".base_layer" not in n]
        kinds = {m.params for m in stacks.values()}
        if len(kinds) == 1 and set(all_stacks) == set(stacks):
            target_parameters = [f"experts.{p}" for p in next(iter(kinds))]
        else:
            target_parameters = [f"{_to_layout(n, prefix)}.{p}" for n, m in stacks.items() for p in m.params]
    cfg = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": first.r, "lora_alpha": first.alpha,
        "lora_dropout": float(settings.get("dropout", 0.0)), "target_modules": target_modules,
        "target_parameters": target_parameters, "bias": "none",
        "fan_in_fan_out": False, "use_rslora": bool(settings.get("use_rslora", False)), "use_dora": False,
        "init_lora_weights": True, "inference_mode": True, "modules_to_save": None, "layers_to_transform": None,
        "layers_pattern": None, "rank_pattern": {}, "alpha_pattern": {}, "revision": None,
        "base_model_name_or_path": str(base_model) if base_model is not None else None,
    }
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    atomic_save_safetensors(state if state is not None else adapter_state(model, prefix), d / ADAPTER_WEIGHTS,
                            metadata={"format": "pt"})
    atomic_write_text(d / ADAPTER_CONFIG, json.dumps(cfg, indent=2) + "\n")
    return d


def read_adapter_config(directory) -> dict:
    f = Path(directory) / ADAPTER_CONFIG
    try:
        cfg = json.loads(f.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise LoRAError(f"{f}: no adapter config (an adapter directory holds {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS})") from None
    except json.JSONDecodeError as e:
        raise LoRAError(f"{f}: invalid JSON ({e})") from None
    if cfg.get("peft_type", "LORA") != "LORA":
        raise LoRAError(f"{f}: peft_type {cfg.get('peft_type')!r}; only LORA adapters are supported")
    for key, ok in (("use_dora", False), ("fan_in_fan_out", False)):
        if bool(cfg.get(key)) != ok:
            raise LoRAError(f"{f}: {key}={cfg.get(key)!r} is not supported")
    if cfg.get("bias", "none") != "none" or cfg.get("lora_bias"):
        raise LoRAError(f"{f}: bias={cfg.get('bias')!r}: adapters that train biases are not supported")
    if cfg.get("modules_to_save"):
        raise LoRAError(f"{f}: modules_to_save={cfg['modules_to_save']} (full module copies) is not supported")
    tp = cfg.get("target_parameters")
    if tp is not None and (not isinstance(tp, list) or not all(isinstance(t, str) for t in tp)):
        raise LoRAError(f"{f}: target_parameters must be a list of parameter names, got {tp!r}")
    return cfg


def _peft_param_match(targets, key: str) -> bool:
    # PEFT's rule for target_parameters: the full parameter name, or any name ending in ".<target>".
    return any(key == t or key.endswith("." + t) for t in targets or ())


def _pattern_value(patterns: dict, path: str, default):
    # PEFT matches pattern keys against the end of the module name.
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?{key}$", path):
            return value
    return default


def load_adapter(model, directory, *, trainable: bool = False) -> list[str]:
    """Apply a PEFT-format LoRA adapter to ``model`` (float or quantized base), MoE expert tensors
    (``target_parameters``) included. Every tensor in the file must land on a module of this model: a
    key for a missing module (such as a KV-sharing consumer's k_proj) is an error naming it."""
    d = Path(directory)
    cfg = read_adapter_config(d)
    f = d / ADAPTER_WEIGHTS
    if not f.exists():
        raise LoRAError(f"{f}: missing adapter weights")
    try:
        state = load_file(str(f))
    except Exception as e:
        raise LoRAError(f"cannot read {f}: {e}") from None
    prefix = "model.language_model." if any(k.startswith(PEFT_PREFIX + "model.language_model.") for k in state) else "model."
    names = dict(model.named_modules())
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    nested: dict[str, dict[int, dict[str, torch.Tensor]]] = {}  # experts path -> wrapper depth -> A/B
    for key, t in state.items():
        m = re.fullmatch(rf"{re.escape(PEFT_PREFIX)}(.+)\.(lora_A|lora_B)(?:\.[^.]+)?\.weight", key)
        if not m:
            raise LoRAError(f"{f}: unexpected tensor {key!r} (expected {PEFT_PREFIX}<module>.lora_A/lora_B.weight)")
        mod, depth = m.group(1), 0
        while mod.endswith(".base_layer"):  # PEFT nests one wrapper per targeted tensor of a module
            mod, depth = mod[: -len(".base_layer")], depth + 1
        path = _from_layout(mod, prefix)
        if isinstance(names.get(path), Experts):
            nested.setdefault(path, {}).setdefault(depth, {})[m.group(2)] = t
        elif depth:
            raise LoRAError(f"{f}: unexpected tensor {key!r}: nested (.base_layer) LoRA tensors belong to MoE "
                            f"expert stacks, and {path} is not one")
        else:
            pairs.setdefault(path, {})[m.group(2)] = t
    stacks = {path: _expert_factors(f, cfg, names[path], path, prefix, levels) for path, levels in nested.items()}
    for path, ab in pairs.items():
        if set(ab) != {"lora_A", "lora_B"}:
            raise LoRAError(f"{f}: {path} has {sorted(ab)} but needs both lora_A and lora_B")
        if path not in names:
            raise LoRAError(f"{f}: " + (_missing_reason(model, path) or f"{path}: no such module in this model"))
        if not _is_linear(names[path]):
            raise LoRAError(f"{f}: {path} is a {type(names[path]).__name__}, not a linear layer")
        a, b = ab["lora_A"], ab["lora_B"]
        mod = names[path]
        if a.shape[1] != mod.in_features or b.shape[0] != mod.out_features or a.shape[0] != b.shape[1]:
            raise LoRAError(f"{f}: {path}: lora_A {list(a.shape)} / lora_B {list(b.shape)} do not fit "
                            f"a [{mod.out_features}, {mod.in_features}] layer")
    rslora = bool(cfg.get("use_rslora"))
    if stacks and float(cfg.get("lora_dropout") or 0.0) > 0:
        raise LoRAError(f"{f}: lora_dropout={cfg.get('lora_dropout')} with LoRA on MoE expert tensors "
                        f"({next(iter(stacks))}); PEFT refuses that combination too")
    prepare_qlora(model)
    for path, factors in stacks.items():
        base = names[path]
        r = next(iter(factors.values()))[0].shape[0] // base.num_experts
        alpha = float(_pattern_value(cfg.get("alpha_pattern"), path, cfg.get("lora_alpha", r)))
        lora = LoRAExperts(base, tuple(factors), r, alpha, rslora)
        with torch.no_grad():
            for p, (a, b) in factors.items():
                lora.lora_A[p].copy_(a)
                lora.lora_B[p].copy_(b)
        _set_module(model, path, lora)
    for path, ab in pairs.items():
        r = ab["lora_A"].shape[0]
        alpha = float(_pattern_value(cfg.get("alpha_pattern"), path, cfg.get("lora_alpha", r)))
        lora = LoRALinear(names[path], r, alpha, float(cfg.get("lora_dropout") or 0.0), rslora)
        with torch.no_grad():
            lora.lora_A.weight.copy_(ab["lora_A"])
            lora.lora_B.weight.copy_(ab["lora_B"])
        _set_module(model, path, lora)
    for n, prm in model.named_parameters():
        prm.requires_grad_(trainable and ".lora_" in n)
    loaded = list(pairs) + list(stacks)
    model.lora_settings = {"r": cfg.get("r"), "alpha": cfg.get("lora_alpha"), "dropout": cfg.get("lora_dropout", 0.0),
                           "use_rslora": rslora, "paths": list(pairs) + [f"{n}.{p}" for n, fs in stacks.items() for p in fs],
                           "targets": cfg.get("target_modules")}
    return loaded


def _expert_factors(f: Path, cfg: dict, base: nn.Module, path: str, prefix: str, levels: dict) -> dict:
    """{tensor name: (lora_A, lora_B)} for one expert stack, from the file's nesting levels. Which tensor
    a level belongs to follows PEFT: the stack's tensors that ``target_parameters`` selects, wrapped in
    declaration order, the last one outermost (level 0)."""
    chosen = tuple(p for p in EXPERT_PARAMS
                   if _peft_param_match(cfg.get("target_parameters"), f"{_to_layout(path, prefix)}.{p}"))
    if sorted(levels) != list(range(len(chosen))):
        raise LoRAError(f"{f}: {path}: LoRA tensors at {len(levels)} nesting level(s) but target_parameters="
                        f"{cfg.get('target_parameters')} selects {list(chosen) or 'none'} of its tensors")
    e = base.num_experts
    out = {}
    for depth, ab in sorted(levels.items(), reverse=True):  # deepest first = declaration order
        p = chosen[len(chosen) - 1 - depth]
        if set(ab) != {"lora_A", "lora_B"}:
            raise LoRAError(f"{f}: {path}.{p} has {sorted(ab)} but needs both lora_A and lora_B")
        a, b = ab["lora_A"], ab["lora_B"]
        out_f, in_f = _expert_shape(base, p)
        if (a.dim() != 2 or b.dim() != 2 or a.shape[0] % e or a.shape[1] != in_f or b.shape[0] != out_f
                or b.shape[1] != a.shape[0] or a.shape[0] == 0):
            raise LoRAError(f"{f}: {path}.{p}: lora_A {list(a.shape)} / lora_B {list(b.shape)} do not fit "
                            f"{e} experts of [{out_f}, {in_f}] (expected [{e}*r, {in_f}] / [{out_f}, r*{e}])")
        out[p] = (a, b)
    return out


# ----------------------------------------------------------------------------- merge
def merge_lora(model) -> list[str]:
    """Fold every adapter into its base weight (W += scaling * B @ A) and remove the wrappers.
    A quantized base cannot take an exact update: merge onto the float checkpoint instead."""
    merged = []
    for path, m in lora_modules(model).items():
        base = m.base_layer
        if isinstance(m, LoRAExperts):
            if isinstance(base, QuantExperts):
                raise LoRAError(f"{path}: the expert stacks are quantized; merge the adapter into the float "
                                "checkpoint, then quantize the merged model")
            with torch.no_grad():
                for p in m.params:
                    w = getattr(base, p)
                    w += m.delta_weight(p).to(w.dtype)
            _set_module(model, path, base)
            merged.append(path)
            continue
        if not isinstance(base, nn.Linear):
            raise LoRAError(f"{path}: the base layer is quantized ({type(base).__name__}); merge the adapter "
                            "into the float checkpoint, then quantize the merged model")
        with torch.no_grad():
            base.weight += m.delta_weight().to(base.weight.dtype)
        _set_module(model, path, base)
        merged.append(path)
    if hasattr(model, "lora_settings"):
        del model.lora_settings
    return merged


def unwrap_lora(model) -> None:
    """Remove the adapters without merging (the base model again)."""
    for path, m in lora_modules(model).items():
        _set_module(model, path, m.base_layer)


__all__ = ["LoRALinear", "LoRAExperts", "LoRAError", "add_lora", "resolve_targets", "save_adapter", "load_adapter", "merge_lora",
           "unwrap_lora", "lora_modules", "adapter_state", "read_adapter_config", "frozen_quant_linear", "prepare_qlora"]
