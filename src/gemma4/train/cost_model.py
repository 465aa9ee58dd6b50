"""A Safe RLHF-style cost model: our decoder backbone plus a scalar head on the last real token.

Loss (Dai et al. 2024, the cost trainer of PKU-Alignment/safe-rlhf), per pair of responses to one
prompt where one is the safer:

    L = −E[ log σ(C(unsafer) − C(safer)) + log σ(s_safer·C(safer)) + log σ(s_unsafer·C(unsafer)) ]

with s = +1 for a response labelled unsafe and −1 for a safe one. The first term only orders the
pair; the two sign terms pin the origin, so that C > 0 means unsafe and a constraint threshold of 0 is
meaningful.

On disk: ``config.json`` (the backbone's config plus a ``cost_model`` entry) and ``model.safetensors``,
written together as one directory swap."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from gemma4._util import Gemma4Error, atomic_dir
from gemma4.model import Gemma4Config, Gemma4TextModel

__all__ = ["CostModelError", "CostModel", "cost_model_loss", "save_cost_model", "load_cost_model"]

FORMAT = "gemma4-cost-model"


class CostModelError(Gemma4Error, ValueError):
    """A cost model that cannot be built, trained or read; the message names the file or field."""


class CostModel(nn.Module):
    """``forward(input_ids, attention_mask=None) -> costs [B]`` (float32)."""

    def __init__(self, config: Gemma4Config, backbone: Gemma4TextModel | None = None):
        super().__init__()
        self.config = config
        self.backbone = backbone if backbone is not None else Gemma4TextModel(config)
        # Zero-initialised head: every cost starts at 0 (undecided), and the first gradients come from
        # the labels rather than from a random projection of the features.
        self.head = nn.Linear(config.hidden_size, 1)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    @classmethod
    def from_causal_lm(cls, lm) -> "CostModel":
        """A cost model on ``lm``'s decoder (shared, not copied: deep-copy the LM first to keep it)."""
        cm = cls(lm.config, lm.model)
        return cm.to(device=lm.device, dtype=lm.dtype) if lm.dtype.is_floating_point else cm

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        h = self.backbone(input_ids, attention_mask)  # [B,T,H], final-normed
        b, t = input_ids.shape
        if attention_mask is None:
            last = torch.full((b,), t - 1, dtype=torch.long, device=h.device)
        else:
            # The last real token of each row, left or right padding alike: the largest index whose
            # mask is 1 ([B,T] positions times the mask, argmax).
            pos = torch.arange(t, device=h.device)[None] * attention_mask.to(h.device).long()
            last = pos.argmax(1)
        hl = h[torch.arange(b, device=h.device), last]  # [B,H]
        return self.head(hl.to(self.head.weight.dtype)).float()[:, 0]


def cost_model_loss(c_safer: torch.Tensor, c_unsafer: torch.Tensor, safer_unsafe: torch.Tensor,
                    unsafer_unsafe: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """The Safe RLHF cost loss over pairs [B] and metrics. ``*_unsafe``: bool [B], the safety label of
    each response (the sign s is +1 for unsafe, −1 for safe)."""
    s_safer = safer_unsafe.float() * 2 - 1
    s_unsafer = unsafer_unsafe.float() * 2 - 1
    terms = (F.logsigmoid(c_unsafer - c_safer) + F.logsigmoid(s_safer * c_safer)
             + F.logsigmoid(s_unsafer * c_unsafer))
    loss = -terms.mean()
    with torch.no_grad():
        both = torch.cat([c_safer, c_unsafer])
        labels = torch.cat([safer_unsafe, unsafer_unsafe]).bool()
        logs = {"loss": float(loss), "order_acc": float((c_unsafer > c_safer).float().mean()),
                "sign_acc": float(((both > 0) == labels).float().mean()),
                "cost_safer": float(c_safer.mean()), "cost_unsafer": float(c_unsafer.mean())}
    return loss, logs


def save_cost_model(model: CostModel, directory: str | Path) -> Path:
    """Write ``config.json`` + ``model.safetensors`` into ``directory`` in one atomic swap."""
    directory = Path(directory)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    cfg = {**model.config.to_dict(), "cost_model": {"format": FORMAT, "head": "last_token_linear"}}
    with atomic_dir(directory) as tmp:
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        # Plain writes inside the temporary directory: the directory swap is what makes them atomic.
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": FORMAT})
    return directory


def load_cost_model(directory: str | Path, dtype: torch.dtype | None = None) -> CostModel:
    directory = Path(directory)
    cfg_path, w_path = directory / "config.json", directory / "model.safetensors"
    for p in (cfg_path, w_path):
        if not p.is_file():
            raise CostModelError(f"{p}: missing (a cost model directory holds config.json and model.safetensors)")
    try:
        d = json.loads(cfg_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise CostModelError(f"{cfg_path}: invalid JSON ({e})") from None
    meta = d.pop("cost_model", None) if isinstance(d, dict) else None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CostModelError(f"{cfg_path}: not a cost model (no 'cost_model' entry with format {FORMAT!r})")
    d.pop("architectures", None)
    model = CostModel(Gemma4Config.from_dict(d))
    state = load_file(str(w_path))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CostModelError(f"{w_path}: tensors do not match the config (missing {missing[:3]}, "
                             f"unexpected {unexpected[:3]})")
    if dtype is not None:
        model = model.to(dtype)
    return model.eval()
