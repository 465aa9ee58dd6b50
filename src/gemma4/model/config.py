"""One configuration dataclass for every Gemma 4 text variant (and Gemma 3 text checkpoints).

Field names are the keys of a checkpoint's ``config.json`` (transformers ``Gemma4TextConfig`` /
``Gemma3TextConfig`` serialisation). Behaviour that differs between the families but is not spelled
out in ``config.json`` (RMSNorm stored as ``1+w``, the value norm, the layer scalar) is derived from
``model_type`` so that one model class serves both.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gemma4._util import Gemma4Error, atomic_write_text

log = logging.getLogger("gemma4")

SLIDING = "sliding_attention"
FULL = "full_attention"
LAYER_TYPES = (SLIDING, FULL)

# Keys transformers writes into every config.json that say nothing about the architecture.
# They are accepted and dropped; anything else that is not a field is rejected by name.
_HF_BOOKKEEPING_KEYS = frozenset(
    {
        "architectures", "dtype", "torch_dtype", "transformers_version", "_name_or_path",
        "initializer_range", "use_cache", "attention_dropout", "cache_implementation",
        "output_attentions", "output_hidden_states", "return_dict", "is_encoder_decoder",
        "tie_encoder_decoder", "id2label", "label2id", "problem_type", "chunk_size_feed_forward",
        "pruned_heads", "torchscript", "tokenizer_class", "prefix", "sep_token_id",
        "decoder_start_token_id", "task_specific_params", "finetuning_task", "bad_words_ids",
        "begin_suppress_tokens", "_attn_implementation_autoset", "use_return_dict",
        "keys_to_ignore_at_inference",
    }
)

_SUPPORTED_ACTIVATIONS = ("gelu_pytorch_tanh", "gelu_tanh", "gelu")

# Defaults transformers applies to a Gemma 4 config when the key is absent.
_GEMMA4_ROPE = {
    SLIDING: {"rope_type": "default", "rope_theta": 10_000.0},
    FULL: {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1_000_000.0},
}


class ConfigError(Gemma4Error, ValueError):
    """A configuration that cannot describe a working model; the message names the field."""


class UnknownPresetError(ConfigError, KeyError):
    """A preset name that is not in ``PRESETS``."""

    def __str__(self) -> str:  # (KeyError would quote the message)
        return str(self.args[0]) if self.args else ""


class ConfigNotFoundError(ConfigError, FileNotFoundError):
    """No config.json where one is needed."""


# Upper bounds on sizes, checked before anything is built: a few bytes of a hostile config (or GGUF
# header) must not make us allocate gigabytes (the RoPE table is built on the CPU even for a meta-device
# model) or loop for minutes. Each is far above any published Gemma (31B: hidden 5376, vocab 262144).
LIMITS: dict[str, int] = {
    "vocab_size": 1 << 23, "hidden_size": 1 << 16, "intermediate_size": 1 << 20, "num_hidden_layers": 1024,
    "num_attention_heads": 1024, "num_key_value_heads": 1024, "head_dim": 1 << 14, "global_head_dim": 1 << 14,
    "num_global_key_value_heads": 1024, "sliding_window": 1 << 24, "max_position_embeddings": 1 << 24,
    "vocab_size_per_layer_input": 1 << 23, "hidden_size_per_layer_input": 1 << 14, "num_kv_shared_layers": 1024,
    "num_experts": 4096, "top_k_experts": 4096, "moe_intermediate_size": 1 << 20, "sliding_window_pattern": 1024,
    "_sliding_window_pattern": 1024,
}


def read_config_json(path: str | Path) -> dict[str, Any]:
    """The dict in a config.json (``path`` may be its directory), with errors that name the file."""
    path = Path(path)
    if path.is_dir():
        path = path / "config.json"
    try:
        d = json.loads(path.read_bytes().decode("utf-8"))
    except FileNotFoundError:
        raise ConfigNotFoundError(f"no config.json at {path}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path} is not UTF-8 text: {e}") from None
    except (json.JSONDecodeError, RecursionError) as e:
        raise ConfigError(f"{path} is not valid JSON: {e}") from None
    except OSError as e:
        raise ConfigError(f"cannot read {path}: {e}") from None
    if not isinstance(d, dict):
        raise ConfigError(f"{path} holds a JSON {type(d).__name__}, not an object of config fields")
    return d


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


_POSITIVE_INTS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads", "head_dim", "sliding_window", "max_position_embeddings")
_OPTIONAL_POSITIVE_INTS = ("global_head_dim", "num_global_key_value_heads", "num_experts", "top_k_experts",
                           "moe_intermediate_size", "sliding_window_pattern", "_sliding_window_pattern")
_BOOLS = ("tie_word_embeddings", "attention_bias", "attention_k_eq_v", "use_double_wide_mlp", "enable_moe_block")
_OPTIONAL_POSITIVE_FLOATS = ("final_logit_softcapping", "attn_logit_softcapping", "query_pre_attn_scalar",
                             "rope_theta", "rope_local_base_freq")


def _check_rope(where: str, p: Any) -> None:
    if not isinstance(p, dict):
        raise ConfigError(f"{where} must be an object, got {p!r}")
    if "rope_type" in p and not isinstance(p["rope_type"], str):
        raise ConfigError(f"{where}.rope_type must be a string, got {p['rope_type']!r}")
    if "type" in p and not isinstance(p["type"], str):
        raise ConfigError(f"{where}.type must be a string, got {p['type']!r}")
    for k in ("rope_theta", "factor", "original_max_position_embeddings"):
        if p.get(k) is not None and not (_is_num(p[k]) and p[k] > 0):
            raise ConfigError(f"{where}.{k} must be a positive finite number, got {p[k]!r}")
    f = p.get("partial_rotary_factor")
    if f is not None and not (_is_num(f) and 0 < f <= 1):
        raise ConfigError(f"{where}.partial_rotary_factor must be in (0, 1], got {f!r}")


@dataclass
class Gemma4Config:
    model_type: str = "gemma4_text"
    vocab_size: int = 262_144
    hidden_size: int = 2304
    intermediate_size: int = 9216
    num_hidden_layers: int = 30
    num_attention_heads: int = 8
    num_key_value_heads: int = 4
    head_dim: int = 256
    # Full-attention geometry. Published Gemma 4 configs carry the legacy pair
    # (global_head_dim, num_global_key_value_heads); transformers >= 5.5 writes per_layer_config
    # ({"5": {"head_dim": 512, "num_key_value_heads": 4}, ...}) instead. Both are accepted.
    global_head_dim: int | None = None
    num_global_key_value_heads: int | None = None
    per_layer_config: dict[str, dict[str, int]] | None = None
    hidden_activation: str = "gelu_pytorch_tanh"
    max_position_embeddings: int = 131_072
    rms_norm_eps: float = 1e-6
    pad_token_id: int | None = 0
    eos_token_id: int | list[int] | None = 1
    bos_token_id: int | None = 2
    tie_word_embeddings: bool = True
    rope_parameters: dict[str, Any] | None = None
    attention_bias: bool = False
    sliding_window: int = 512
    layer_types: list[str] | None = None
    final_logit_softcapping: float | None = None
    use_bidirectional_attention: str | bool | None = None
    # Per-layer embeddings (E2B/E4B). None means the family default: 256 for Gemma 4 (what
    # transformers assumes when the key is missing), 0 for Gemma 3.
    vocab_size_per_layer_input: int = 262_144
    hidden_size_per_layer_input: int | None = None
    attention_k_eq_v: bool = False
    num_kv_shared_layers: int = 0
    use_double_wide_mlp: bool = False
    enable_moe_block: bool = False
    num_experts: int | None = None
    top_k_experts: int | None = None
    moe_intermediate_size: int | None = None
    # Gemma 3 keys.
    query_pre_attn_scalar: float | None = None
    attn_logit_softcapping: float | None = None
    rope_theta: float | None = None
    rope_local_base_freq: float | None = None
    rope_scaling: dict[str, Any] | None = None
    sliding_window_pattern: int | None = None
    _sliding_window_pattern: int | None = None
    # Written by gemma4.quantize: scheme, group size, which modules.
    quantization: dict[str, Any] | None = None

    # ------------------------------------------------------------------ construction
    def __post_init__(self) -> None:
        self._check_types()
        if self.hidden_size_per_layer_input is None:
            self.hidden_size_per_layer_input = 0 if self.is_gemma3 else 256
        if self.layer_types is None:
            if self.is_gemma3:
                # Gemma 3: every `pattern`-th layer is global; the last layer is NOT forced global.
                p = self.sliding_window_pattern or self._sliding_window_pattern or 6
                self.layer_types = [FULL if (i + 1) % p == 0 else SLIDING for i in range(self.num_hidden_layers)]
            else:
                self.layer_types = [FULL if (i + 1) % 6 == 0 else SLIDING for i in range(self.num_hidden_layers)]
        self.layer_types = list(self.layer_types)
        if not self.is_gemma3 and self.layer_types and self.layer_types[-1] != FULL:
            log.warning("last layer must be full attention; forcing layer %d to full", len(self.layer_types) - 1)
            self.layer_types[-1] = FULL
        if self.per_layer_config is not None:
            self.per_layer_config = {str(int(k)): dict(v) for k, v in self.per_layer_config.items()}
        self.validate()

    def _check_types(self) -> None:
        """Types and sizes of every field, before any of them is used: a wrong type must be a
        ConfigError naming the field, never an AttributeError deep inside, nor a string that happens
        to be truthy (``tie_word_embeddings: "no"``)."""
        def bad(name: str, want: str) -> ConfigError:
            return ConfigError(f"{name} must be {want}, got {getattr(self, name)!r}")

        if not isinstance(self.model_type, str):
            raise bad("model_type", "a string such as 'gemma4_text'")
        for name in _POSITIVE_INTS + _OPTIONAL_POSITIVE_INTS:
            v = getattr(self, name)
            if v is None and name in _OPTIONAL_POSITIVE_INTS:
                continue
            if not (_is_int(v) and 0 < v <= LIMITS[name]):
                raise bad(name, f"a positive integer <= {LIMITS[name]}")
        for name in ("num_kv_shared_layers", "hidden_size_per_layer_input", "vocab_size_per_layer_input"):
            v = getattr(self, name)
            if not (v is None and name == "hidden_size_per_layer_input") and not (_is_int(v) and 0 <= v <= LIMITS[name]):
                raise bad(name, f"an integer in 0..{LIMITS[name]}")
        for name in _BOOLS:
            if not isinstance(getattr(self, name), bool):
                raise bad(name, "true or false")
        if not (_is_num(self.rms_norm_eps) and 0 < self.rms_norm_eps < 1):
            raise bad("rms_norm_eps", "a number in (0, 1)")
        for name in _OPTIONAL_POSITIVE_FLOATS:
            v = getattr(self, name)
            if v is not None and not (_is_num(v) and v > 0):
                raise bad(name, "a positive finite number or null")
        for name in ("pad_token_id", "bos_token_id"):
            v = getattr(self, name)
            if v is not None and not (_is_int(v) and v >= 0):
                raise bad(name, "a token id (integer >= 0) or null")
        eos = self.eos_token_id
        if eos is not None and not (_is_int(eos) and eos >= 0) and not (
                isinstance(eos, list) and 0 < len(eos) <= 64 and all(_is_int(i) and i >= 0 for i in eos)):
            raise bad("eos_token_id", "a token id, a list of token ids, or null")
        if not isinstance(self.hidden_activation, str):
            raise bad("hidden_activation", "a string")
        if self.layer_types is not None and not (
                isinstance(self.layer_types, (list, tuple)) and len(self.layer_types) <= LIMITS["num_hidden_layers"]
                and all(isinstance(t, str) for t in self.layer_types)):
            raise bad("layer_types", f"a list of at most {LIMITS['num_hidden_layers']} layer type names")
        if self.use_bidirectional_attention is not None and not isinstance(self.use_bidirectional_attention, (bool, str)):
            raise bad("use_bidirectional_attention", "a string, a boolean or null")
        if self.quantization is not None and not isinstance(self.quantization, dict):
            raise bad("quantization", "an object or null")
        if self.rope_scaling is not None:
            _check_rope("rope_scaling", self.rope_scaling)
        rp = self.rope_parameters
        if rp is not None:
            if not isinstance(rp, dict):
                raise bad("rope_parameters", "an object")
            nested = SLIDING in rp or FULL in rp
            for t in ((SLIDING, FULL) if nested else ()):
                if t in rp:
                    _check_rope(f"rope_parameters.{t}", rp[t])
            if not nested:
                _check_rope("rope_parameters", rp)
        plc = self.per_layer_config
        if plc is not None:
            if not isinstance(plc, dict):
                raise bad("per_layer_config", "an object mapping layer indices to overrides")
            for k, o in plc.items():
                if not ((_is_int(k) or (isinstance(k, str) and k.isdigit() and len(k) <= 6)) and int(k) < LIMITS["num_hidden_layers"]):
                    raise ConfigError(f"per_layer_config key {k!r} is not a layer index")
                if not isinstance(o, dict):
                    raise ConfigError(f"per_layer_config[{k}] must be an object, got {o!r}")
                for f, v in o.items():
                    lim = LIMITS.get(f if f != "num_key_value_heads" else "num_key_value_heads", 0)
                    if not (_is_int(v) and 0 < v <= (lim or (1 << 14))):
                        raise ConfigError(f"per_layer_config[{k}].{f} must be a positive integer, got {v!r}")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Gemma4Config":
        """Build from a config.json dict (text config, or a multimodal one with ``text_config``)."""
        if not isinstance(d, dict):
            raise ConfigError(f"a config must be a JSON object of fields, got {type(d).__name__}")
        d = dict(d)
        if isinstance(d.get("text_config"), dict):
            outer_type = d.get("model_type", "gemma4")
            if not isinstance(outer_type, str):
                raise ConfigError(f"model_type must be a string, got {outer_type!r}")
            d = dict(d["text_config"])
            d.setdefault("model_type", f"{outer_type}_text" if not outer_type.endswith("_text") else outer_type)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(str(k) for k in d if k not in names and k not in _HF_BOOKKEEPING_KEYS)
        if unknown:
            raise ConfigError(f"unknown config key(s): {', '.join(unknown)}")
        return cls(**{k: v for k, v in d.items() if k in names})

    @classmethod
    def from_json(cls, path: str | Path) -> "Gemma4Config":
        d = read_config_json(path)
        try:
            return cls.from_dict(d)
        except ConfigError as e:
            where = Path(path) / "config.json" if Path(path).is_dir() else Path(path)
            raise ConfigError(f"{where}: {e}") from None

    @classmethod
    def from_preset(cls, name: str) -> "Gemma4Config":
        key = name.lower().replace("_", "-")
        if key not in PRESETS:
            raise UnknownPresetError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
        return cls.from_dict(PRESETS[key])

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        # Drop unset Gemma-3-only / optional keys so the file reads like the checkpoint's own.
        optional_none = {
            "global_head_dim", "num_global_key_value_heads", "per_layer_config", "query_pre_attn_scalar",
            "attn_logit_softcapping", "rope_theta", "rope_local_base_freq", "rope_scaling",
            "sliding_window_pattern", "_sliding_window_pattern", "quantization", "rope_parameters",
        }
        d = {k: v for k, v in d.items() if not (k in optional_none and v is None)}
        arch = "Gemma3ForCausalLM" if self.is_gemma3 else "Gemma4ForCausalLM"
        return {"architectures": [arch], **d}

    def to_json(self, path: str | Path) -> None:

        atomic_write_text(Path(path), json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")

    def replace(self, **changes: Any) -> "Gemma4Config":
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------ derived per-layer facts
    @property
    def is_gemma3(self) -> bool:
        return self.model_type.startswith("gemma3")

    @property
    def norm_offset(self) -> float:
        """Gemma 1-3 store RMSNorm scales as ``w`` and multiply by ``1+w``; Gemma 4 multiplies by ``w``."""
        return 1.0 if self.is_gemma3 else 0.0

    @property
    def use_v_norm(self) -> bool:
        return not self.is_gemma3

    @property
    def use_layer_scalar(self) -> bool:
        return not self.is_gemma3

    @property
    def attention_scale(self) -> float:
        # Gemma 4 folds the temperature into q_norm/k_norm (scale 1.0); Gemma 3 uses 1/sqrt(qpas).
        return self.query_pre_attn_scalar**-0.5 if self.query_pre_attn_scalar else 1.0

    @property
    def first_kv_shared_layer(self) -> int:
        return self.num_hidden_layers - self.num_kv_shared_layers

    def _layer_override(self, i: int) -> dict[str, int]:
        if self.per_layer_config is not None:
            return self.per_layer_config.get(str(i), {})
        if self.is_gemma3 or self.layer_types[i] != FULL:
            return {}
        # Legacy keys (and transformers' defaults when both forms are absent).
        o = {"head_dim": self.global_head_dim if self.global_head_dim is not None else 512}
        if self.attention_k_eq_v and self.num_global_key_value_heads is not None:
            o["num_key_value_heads"] = self.num_global_key_value_heads
        return o

    def layer_head_dim(self, i: int) -> int:
        return self._layer_override(i).get("head_dim", self.head_dim)

    def layer_kv_heads(self, i: int) -> int:
        return self._layer_override(i).get("num_key_value_heads", self.num_key_value_heads)

    def layer_k_eq_v(self, i: int) -> bool:
        return self.attention_k_eq_v and self.layer_types[i] == FULL

    def layer_intermediate_size(self, i: int) -> int:
        wide = self.use_double_wide_mlp and self.kv_sharing_modes[i] == "reuse"
        return self.intermediate_size * (2 if wide else 1)

    @property
    def kv_sharing_modes(self) -> list[str | None]:
        """Per layer: None (own K/V), "store" (producer: last own-K/V layer of its type) or "reuse"."""
        n, first = self.num_hidden_layers, self.first_kv_shared_layer
        modes: list[str | None] = [None if i < first else "reuse" for i in range(n)]
        if self.num_kv_shared_layers == 0:
            return modes
        for t in set(self.layer_types[first:]):
            producers = [i for i in range(first) if self.layer_types[i] == t]
            if not producers:
                raise ConfigError(
                    f"KV-sharing layers of type {t!r} (layers >= {first}) have no producer: "
                    f"no layer of that type among layers 0..{first - 1}"
                )
            modes[producers[-1]] = "store"
        return modes

    def kv_producer(self, i: int) -> int:
        """Index of the layer whose K/V layer i attends over (itself unless it is a consumer)."""
        if self.kv_sharing_modes[i] != "reuse":
            return i
        t = self.layer_types[i]
        return max(j for j in range(self.first_kv_shared_layer) if self.layer_types[j] == t)

    def rope(self, layer_type: str) -> dict[str, Any]:
        """RoPE parameters of one layer type: rope_type, rope_theta, partial_rotary_factor, factor."""
        rp = self.rope_parameters
        if rp is not None:
            p = rp.get(layer_type, rp) if (SLIDING in rp or FULL in rp) else rp
        elif self.is_gemma3:
            if layer_type == SLIDING:
                p = {"rope_type": "default", "rope_theta": self.rope_local_base_freq or 10_000.0}
            else:
                p = {"rope_type": "default", "rope_theta": self.rope_theta or 1_000_000.0}
                if self.rope_scaling:
                    p = {**p, **self.rope_scaling, "rope_type": self.rope_scaling.get("rope_type", self.rope_scaling.get("type", "default"))}
        else:
            p = _GEMMA4_ROPE[layer_type]
        return dict(p)

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise ConfigError(msg)

        self._check_types()

        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "head_dim", "sliding_window"):
            v = getattr(self, name)
            need(isinstance(v, int) and not isinstance(v, bool) and v > 0, f"{name} must be a positive integer, got {v!r}")
        need(self.model_type.startswith(("gemma4", "gemma3")), f"model_type {self.model_type!r} is not a Gemma 3/4 text model")
        need(len(self.layer_types) == self.num_hidden_layers,
             f"layer_types has {len(self.layer_types)} entries but num_hidden_layers is {self.num_hidden_layers}")
        bad = sorted({t for t in self.layer_types if t not in LAYER_TYPES})
        need(not bad, f"layer_types contains unknown type(s) {bad}; expected {LAYER_TYPES}")
        need(self.hidden_activation in _SUPPORTED_ACTIVATIONS,
             f"hidden_activation {self.hidden_activation!r} is not supported ({', '.join(_SUPPORTED_ACTIVATIONS)})")
        need(0 <= self.num_kv_shared_layers <= self.num_hidden_layers,
             f"num_kv_shared_layers={self.num_kv_shared_layers} is outside 0..num_hidden_layers={self.num_hidden_layers}")
        if self.per_layer_config is not None:
            for k, o in self.per_layer_config.items():
                need(0 <= int(k) < self.num_hidden_layers, f"per_layer_config names layer {k}, outside 0..{self.num_hidden_layers - 1}")
                extra = sorted(set(o) - {"head_dim", "num_key_value_heads"})
                need(not extra, f"per_layer_config[{k}] has unsupported key(s) {extra}")
        for i in range(self.num_hidden_layers):
            kv, hd = self.layer_kv_heads(i), self.layer_head_dim(i)
            need(kv > 0 and self.num_attention_heads % kv == 0,
                 f"layer {i}: num_attention_heads={self.num_attention_heads} is not a multiple of its "
                 f"{kv} key/value heads")
            need(hd > 0 and hd % 2 == 0, f"layer {i}: head_dim {hd} must be a positive even number")
        self.kv_sharing_modes  # raises if a consumer type has no producer
        if self.enable_moe_block:
            for name in ("num_experts", "top_k_experts", "moe_intermediate_size"):
                v = getattr(self, name)
                need(isinstance(v, int) and v > 0, f"enable_moe_block needs a positive integer {name}, got {v!r}")
            need(self.top_k_experts <= self.num_experts,
                 f"top_k_experts={self.top_k_experts} exceeds num_experts={self.num_experts}")
        need(self.hidden_size_per_layer_input >= 0, "hidden_size_per_layer_input must be >= 0")
        for t in set(self.layer_types):
            rt = self.rope(t).get("rope_type", "default")
            need(rt in ("default", "proportional", "linear"), f"rope_type {rt!r} for {t} is not supported")
        if self.use_bidirectional_attention == "all":
            raise ConfigError("use_bidirectional_attention='all' (encoder use) is not supported by this decoder")

    # ------------------------------------------------------------------ convenience
    @property
    def embed_scale(self) -> float:
        return math.sqrt(self.hidden_size)

    def describe_layers(self) -> str:
        return "".join("F" if t == FULL else "S" for t in self.layer_types)


def _g4(**kw: Any) -> dict[str, Any]:
    base = dict(model_type="gemma4_text", vocab_size=262_144, head_dim=256, global_head_dim=512,
                final_logit_softcapping=30.0, rms_norm_eps=1e-6, tie_word_embeddings=True,
                eos_token_id=[1, 106], rope_parameters=_GEMMA4_ROPE)
    base.update(kw)
    return base


def _pattern(n_layers: int, every: int) -> list[str]:
    return [FULL if (i + 1) % every == 0 else SLIDING for i in range(n_layers)]


PRESETS: dict[str, dict[str, Any]] = {
    "e2b": _g4(hidden_size=1536, intermediate_size=6144, num_hidden_layers=35, num_attention_heads=8,
               num_key_value_heads=1, sliding_window=512, layer_types=_pattern(35, 5),
               hidden_size_per_layer_input=256, vocab_size_per_layer_input=262_144, num_kv_shared_layers=20,
               use_double_wide_mlp=True, max_position_embeddings=131_072),
    "e4b": _g4(hidden_size=2560, intermediate_size=10240, num_hidden_layers=42, num_attention_heads=8,
               num_key_value_heads=2, sliding_window=512, layer_types=_pattern(42, 6),
               hidden_size_per_layer_input=256, vocab_size_per_layer_input=262_144, num_kv_shared_layers=18,
               max_position_embeddings=131_072),
    "31b": _g4(hidden_size=5376, intermediate_size=21504, num_hidden_layers=60, num_attention_heads=32,
               num_key_value_heads=16, num_global_key_value_heads=4, attention_k_eq_v=True, sliding_window=1024,
               layer_types=_pattern(60, 6), hidden_size_per_layer_input=0, max_position_embeddings=262_144,
               use_bidirectional_attention="vision"),
    "26b-a4b": _g4(hidden_size=2816, intermediate_size=2112, num_hidden_layers=30, num_attention_heads=16,
                   num_key_value_heads=8, num_global_key_value_heads=2, attention_k_eq_v=True, sliding_window=1024,
                   layer_types=_pattern(30, 6), hidden_size_per_layer_input=0, enable_moe_block=True,
                   num_experts=128, top_k_experts=8, moe_intermediate_size=704, max_position_embeddings=262_144,
                   use_bidirectional_attention="vision"),
    "12b": _g4(hidden_size=3840, intermediate_size=15360, num_hidden_layers=48, num_attention_heads=16,
               num_key_value_heads=8, num_global_key_value_heads=1, attention_k_eq_v=True, sliding_window=1024,
               layer_types=_pattern(48, 6), hidden_size_per_layer_input=0, max_position_embeddings=262_144,
               use_bidirectional_attention="vision"),
    # The one real trained checkpoint reachable here (Gemma 3 270M), as a configuration of the same model.
    "gemma3-270m": dict(model_type="gemma3_text", vocab_size=262_144, hidden_size=640, intermediate_size=2048,
                        num_hidden_layers=18, num_attention_heads=4, num_key_value_heads=1, head_dim=256,
                        sliding_window=512, layer_types=_pattern(18, 6), query_pre_attn_scalar=256,
                        rope_theta=1_000_000.0, rope_local_base_freq=10_000.0, max_position_embeddings=32_768,
                        final_logit_softcapping=None, eos_token_id=[1, 106], tie_word_embeddings=True),
}
