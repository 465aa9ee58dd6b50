"""LoRA and QLoRA adapters, stored in PEFT's on-disk format.

``add_lora(model, targets, r, alpha)`` wraps linear layers (attention, MLP, PLE projections; float
``nn.Linear`` or our int8/int4 quantized linears, which is QLoRA) in `LoRALinear`:
``y = base(x) + B(A(dropout(x))) * alpha / r`` with the base frozen. Module and tensor names follow
PEFT (``q_proj.base_layer``, ``q_proj.lora_A.weight``), so an adapter directory written by
`save_adapter` (``adapter_config.json`` + ``adapter_model.safetensors`` with keys such as
``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight``) loads with
``peft.PeftModel.from_pretrained`` onto transformers' model, and `load_adapter` reads PEFT's.

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
from gemma4.quant import Int4Linear, Int8Linear, QuantExperts, QuantWeight

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
PLE = ("per_layer_input_gate", "per_layer_projection", "per_layer_model_projection")
DEFAULT_TARGETS = ATTENTION + MLP
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
        if isinstance(self.base_layer, QuantWeight):
            y = frozen_quant_linear(x, self.base_layer)
        else:
            y = self.base_layer(x)
        # Outside autocast the update runs in the factors' dtype (float32) and is added in the base
        # output's dtype, as PEFT does; under autocast the matmuls follow the autocast dtype.
        xa = x if torch.is_autocast_enabled(x.device.type) else x.to(self._factor_dtype(x))
        z = self.lora_B(self.lora_A(self.lora_dropout(xa)))
        return y + (z * self.scaling).to(y.dtype)

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


def resolve_targets(model, targets) -> list[str]:
    """Module paths to adapt. ``targets``: short names (``q_proj``), groups (``attention``, ``mlp``,
    ``ple``, ``all-linear``) or full module paths (``model.layers.3.self_attn.q_proj``).

    A short name adapts every layer that has that module; a full path must exist, and a consumer's
    k/v (or a K=V layer's v) is refused by name."""
    if isinstance(targets, str):
        targets = [t.strip() for t in targets.split(",") if t.strip()]
    names = dict(model.named_modules())
    chosen: list[str] = []
    for t in targets or DEFAULT_TARGETS:
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
    out = sorted(set(chosen), key=lambda n: list(names).index(n))
    if any(isinstance(names[n], LoRALinear) or ".lora_" in n or n.endswith(".base_layer") for n in out):
        raise LoRAError("the model already has LoRA adapters on some of these modules")
    return out


def _set_module(model: nn.Module, path: str, new: nn.Module) -> None:
    parent, _, leaf = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, new)


def add_lora(model, targets=None, r: int = 8, alpha: float = 16.0, dropout: float = 0.0, *,
             use_rslora: bool = False, freeze_base: bool = True) -> list[str]:
    """Wrap the target linears in LoRALinear (QLoRA when they are quantized); returns their paths.
    With ``freeze_base`` every non-LoRA parameter stops requiring grad. Records the settings on
    ``model.lora_settings`` for `save_adapter`."""
    paths = resolve_targets(model, targets)
    prepare_qlora(model)
    for p in paths:
        _set_module(model, p, LoRALinear(model.get_submodule(p), r, alpha, dropout, use_rslora))
    if freeze_base:
        for n, prm in model.named_parameters():
            prm.requires_grad_(".lora_" in n)
    shorts = None if targets is None else ([targets] if isinstance(targets, str) else list(targets))
    model.lora_settings = {"r": r, "alpha": alpha, "dropout": dropout, "use_rslora": use_rslora,
                           "paths": paths, "targets": shorts}
    return paths


def lora_modules(model) -> dict[str, LoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


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
    paths = list(mods)
    shorts = sorted({p.rsplit(".", 1)[-1] for p in paths})
    names = dict(model.named_modules())
    # Short names when they mean exactly the adapted set (every module of that name has a LoRA), else
    # full paths: PEFT applies a LoRA wherever a target matches, and a mismatch would be a silent drift.
    every = all(isinstance(m, LoRALinear) for n, m in names.items() if n.rsplit(".", 1)[-1] in shorts
                and (isinstance(m, LoRALinear) or _is_linear(m)) and ".base_layer" not in n and ".lora_" not in n)
    target_modules = shorts if every else [_to_layout(p, prefix) for p in paths]
    cfg = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": first.r, "lora_alpha": first.alpha,
        "lora_dropout": float(settings.get("dropout", 0.0)), "target_modules": target_modules, "bias": "none",
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
    if cfg.get("target_parameters"):
        raise LoRAError(f"{f}: target_parameters (LoRA on raw parameters such as MoE experts) is not supported")
    return cfg


def _pattern_value(patterns: dict, path: str, default):
    # PEFT matches pattern keys against the end of the module name.
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?{key}$", path):
            return value
    return default


def load_adapter(model, directory, *, trainable: bool = False) -> list[str]:
    """Apply a PEFT-format LoRA adapter to ``model`` (float or quantized base). Every tensor in the
    file must land on a module of this model: a key for a missing module (such as a KV-sharing
    consumer's k_proj) is an error naming it."""
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
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in state.items():
        m = re.fullmatch(rf"{re.escape(PEFT_PREFIX)}(.+)\.(lora_A|lora_B)(?:\.[^.]+)?\.weight", key)
        if not m:
            raise LoRAError(f"{f}: unexpected tensor {key!r} (expected {PEFT_PREFIX}<module>.lora_A/lora_B.weight)")
        pairs.setdefault(_from_layout(m.group(1), prefix), {})[m.group(2)] = t
    names = dict(model.named_modules())
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
    prepare_qlora(model)
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
    model.lora_settings = {"r": cfg.get("r"), "alpha": cfg.get("lora_alpha"), "dropout": cfg.get("lora_dropout", 0.0),
                           "use_rslora": rslora, "paths": list(pairs), "targets": cfg.get("target_modules")}
    return list(pairs)


# ----------------------------------------------------------------------------- merge
def merge_lora(model) -> list[str]:
    """Fold every adapter into its base weight (W += scaling * B @ A) and remove the wrappers.
    A quantized base cannot take an exact update: merge onto the float checkpoint instead."""
    merged = []
    for path, m in lora_modules(model).items():
        base = m.base_layer
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


__all__ = ["LoRALinear", "LoRAError", "add_lora", "resolve_targets", "save_adapter", "load_adapter", "merge_lora",
           "unwrap_lora", "lora_modules", "adapter_state", "read_adapter_config", "frozen_quant_linear", "prepare_qlora"]
