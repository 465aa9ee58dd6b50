"""Training an MTP drafter (:class:`gemma4.model.drafter.Gemma4Drafter`) for a frozen target.

What the drafter has to do is fixed by how speculative decoding runs it
(``gemma4.infer.speculative._run_mtp``): the target holds K/V for slots 0..p and its final-normed hidden
state ``h_p``, whose logits chose the pending token ``x = t[p+1]``. Draft step 1 reads
``concat(embed(x), h_p)`` and the target's K/V of slots <= p, at query position p + 1, and should give
the target's next choice ``t[p+2]``; step j reads the token of step j - 1 and the drafter's own projected
hidden state (same keys, same position) and should give ``t[p+1+j]``.

Training does every slot p of a row at once. One target forward (no gradient, outside autocast, so its
hidden states and K/V are those decoding will hand the drafter) gives ``h`` and the producers' K/V for the
whole row; the drafter's query at slot p sees the keys of slots <= p (a causal mask over the row where
decoding has one query row) and sits at position p + 1. The steps are unrolled: step j + 1 reads step
j's projected hidden state, with the gradient flowing through it, as in decoding it reads its own.
Step j's input token at slot p is the row's ``t[p+1+j]`` (teacher forcing: in greedy decoding a draft
that differs from it is rejected anyway, so only the agreeing case matters for what comes after).

Labels are the row's own next tokens. On rows that are the target's own greedy continuations
(:func:`greedy_rows`) these are exactly the tokens greedy verification accepts, so the objective is
"predict the target's greedy choice"; ``first_slot`` excludes the prompt part of such rows (a slot p
counts only if ``t[p+1]`` is already the target's own token).

``Gemma4Drafter.forward`` serves one query slot per call (decoding); the row-wide forward here uses the
same modules (pre/post projection, the layers, the final norm, the head) with per-query slots.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from gemma4.infer import generate
from gemma4.model.attention import AttnContext
from gemma4.model.config import SLIDING
from gemma4.model.decoder import build_mask
from gemma4.model.drafter import DrafterConfig, Gemma4Drafter, build_drafter
from gemma4.train.loop import TrainError
from gemma4.train.loss import IGNORE
from gemma4.train.preference import _Sampler
from gemma4.train.run import init_weights_

__all__ = ["DrafterObjective", "drafter_config_for", "new_drafter", "greedy_rows", "unrolled_drafts", "drafter_loss"]


def drafter_config_for(target_config, layer_types=("full_attention",), *, hidden_size: int | None = None,
                       intermediate_size: int | None = None, num_attention_heads: int | None = None) -> DrafterConfig:
    """A drafter config that can read ``target_config``'s K/V: the target's head dims, K/V head counts,
    window and RoPE, ``layer_types`` consumer layers (each reads the target's last K/V of its type),
    hidden size and MLP width as given (default: the target's), a tied head, no soft-cap, no PLE."""
    t = target_config
    h = hidden_size or t.hidden_size
    text = {k: v for k, v in t.to_dict().items() if k not in ("architectures", "quantization")}
    text.update(hidden_size=h, intermediate_size=intermediate_size or t.intermediate_size,
                num_attention_heads=num_attention_heads or t.num_attention_heads,
                num_hidden_layers=len(layer_types), layer_types=list(layer_types),
                num_kv_shared_layers=len(layer_types), hidden_size_per_layer_input=0, vocab_size_per_layer_input=0,
                use_double_wide_mlp=False, enable_moe_block=False, final_logit_softcapping=None,
                tie_word_embeddings=True)
    return DrafterConfig(text_config=text, backbone_hidden_size=t.hidden_size)


def new_drafter(config: DrafterConfig, target=None, *, seed: int = 0, std: float = 0.02) -> Gemma4Drafter:
    """A float32 drafter ready to train: matrices N(0, std), norms at identity; with ``target`` and the
    same hidden size, the head starts as the target's embedding table (the drafter predicts the same
    tokens from a similar space, and the table is most of its parameters)."""
    d = init_weights_(build_drafter(config, dtype=torch.float32), seed=seed, std=std)
    if target is not None:
        te = target.model.embed_tokens.weight
        de = d.model.embed_tokens.weight
        if te.shape == de.shape:
            with torch.no_grad():
                de.copy_(te.float())
    for p in d.parameters():
        p.requires_grad_(True)
    return d.train()


@torch.no_grad()
def greedy_rows(target, prompts: torch.Tensor, new_tokens: int, *, batch_size: int = 64) -> torch.Tensor:
    """[N, P + new_tokens]: each prompt row ([N, P], no padding) followed by the target's greedy
    continuation (no stop token), generated in batches."""
    if prompts.dim() != 2:
        raise TrainError(f"prompts must be token ids [N, P], got shape {list(prompts.shape)}")
    out = []
    for s in range(0, prompts.shape[0], batch_size):
        chunk = prompts[s : s + batch_size]
        new = generate(target, chunk, new_tokens, stop_token_ids=(), fast=False)
        out.append(torch.cat([chunk, torch.tensor(new, dtype=torch.long)], 1))
    return torch.cat(out, 0)


def _row_context(drafter: Gemma4Drafter, t: int, device):
    """Masks and backend contexts for queries at slots 0..t-1 over keys at slots 0..t-1, by layer type:
    query p sees keys <= p (sliding: the W + 1 newest, as Gemma4Drafter.forward)."""
    tc = drafter.config.text_config
    slots = torch.arange(t, device=device)
    masks, ctxs = {}, {}
    for lt in set(tc.layer_types):
        window = tc.sliding_window + 1 if lt == SLIDING else None
        masks[lt] = build_mask(slots, slots, window, None)  # [1,1,T,T]
        ctxs[lt] = AttnContext(lt, window, slots, slots)
    return masks, ctxs


def unrolled_drafts(drafter: Gemma4Drafter, target, ids: torch.Tensor, h: torch.Tensor,
                    shared_kv: dict[str, tuple[torch.Tensor, torch.Tensor]], steps: int) -> list[torch.Tensor]:
    """Drafter logits of ``steps`` unrolled draft steps at every slot of the rows ``ids`` [B,T], given the
    target's final-normed hidden states ``h`` [B,T,H_target] and producer K/V for those rows. Entry j
    ([B,T,V]) at slot p is the guess for ``ids[p+2+j]`` after reading ``ids[p+1+j]`` (slots whose tokens
    run past the row read padding: their labels are IGNORE)."""
    b, t = ids.shape
    tc = drafter.config.text_config
    dt = drafter.dtype
    masks, ctxs = _row_context(drafter, t, ids.device)
    pos = torch.arange(1, t + 1, device=ids.device)[None].expand(b, t)  # query at slot p sits at position p + 1
    rope = {lt: drafter.model.rope(lt, pos, dt) for lt in set(tc.layer_types)}
    kv = {lt: (k.to(dt), v.to(dt)) for lt, (k, v) in shared_kv.items()}
    out, hd = [], h.to(dt)
    for j in range(steps):
        tok = F.pad(ids[:, 1 + j :], (0, 1 + j), value=0)  # [B,T]: the token read at slot p is ids[p+1+j]
        x = drafter.pre_projection(drafter.input_embeds(target, tok, hd).to(dt))
        for i, layer in enumerate(drafter.model.layers):
            lt = tc.layer_types[i]
            x, _ = layer(x, *rope[lt], masks[lt], ctxs[lt], shared_kv=kv[lt])
        n = drafter.model.norm(x)
        out.append(drafter.logits(n))
        hd = drafter.post_projection(n)
    return out


def _labels(ids: torch.Tensor, valid: torch.Tensor, j: int) -> torch.Tensor:
    """[B,T] label of step j at each slot: ids[p+2+j] where slot p counts and the row has that token."""
    lab = F.pad(ids[:, 2 + j :], (0, 2 + j), value=IGNORE)
    return torch.where(valid, lab, torch.full_like(lab, IGNORE))


@torch.no_grad()
def _target_pass(target, ids: torch.Tensor):
    # Outside autocast: the drafter must learn from the hidden states and K/V decoding will give it,
    # computed in the target's own dtype.
    with torch.autocast(ids.device.type, enabled=False):
        return target.model.forward_export_kv(ids)


def drafter_loss(drafter: Gemma4Drafter, target, ids: torch.Tensor, valid: torch.Tensor | None = None, *,
                 steps: int = 2, step_weights=None) -> tuple[torch.Tensor, dict]:
    """Mean cross-entropy of the unrolled draft steps (weighted by ``step_weights``, default equal) on the
    rows ``ids`` [B,T]; ``valid`` [B,T] bool marks the slots that count (default all). Logs per step:
    loss and top-1 accuracy (the greedy acceptance of that step given the earlier ones were accepted)."""
    if ids.dim() != 2 or ids.shape[1] < 3:
        raise TrainError(f"drafter rows must be token ids [B, T] with T >= 3, got shape {list(ids.shape)}")
    if valid is None:
        valid = torch.ones_like(ids, dtype=torch.bool)
    weights = list(step_weights) if step_weights is not None else [1.0] * steps
    if len(weights) != steps:
        raise TrainError(f"step_weights has {len(weights)} entries for {steps} steps")
    h, kv = _target_pass(target, ids)
    logits = unrolled_drafts(drafter, target, ids, h, kv, steps)
    total = logits[0].new_zeros((), dtype=torch.float32)
    logs: dict = {}
    n_first = 0
    for j, lg in enumerate(logits):
        lab = _labels(ids, valid, j)
        keep = lab != IGNORE
        n = int(keep.sum())
        if j == 0:
            n_first = n
        if not n:
            continue
        sel = lg[keep].float()  # [N,V]
        ce = F.cross_entropy(sel, lab[keep])
        total = total + weights[j] * ce
        logs[f"loss_step{j + 1}"] = float(ce.detach())
        logs[f"acc_step{j + 1}"] = float((sel.argmax(-1) == lab[keep]).float().mean())
    if not n_first:
        raise TrainError("no slot with a label in this batch (rows too short, or valid/first_slot excludes all)")
    logs["tokens"] = n_first
    return total / sum(weights), logs


class DrafterObjective:
    """A :class:`gemma4.train.Trainer` objective: ``Trainer(drafter, None, cfg, out, objective=DrafterObjective(...))``.

    ``rows`` [N,T]: token rows (e.g. :func:`greedy_rows`); ``first_slot``: the first slot whose loss
    counts (an int for every row, or [N]; for greedy rows: prompt length - 1). ``steps``: draft steps
    unrolled per slot. The target is frozen (eval mode, no gradients) and only read."""

    def __init__(self, target, rows: torch.Tensor, *, first_slot: int | torch.Tensor = 0, steps: int = 2,
                 batch_size: int = 16, seed: int = 0, step_weights=None):
        if not isinstance(rows, torch.Tensor) or rows.dim() != 2 or rows.dtype != torch.long:
            raise TrainError("DrafterObjective rows must be a LongTensor [N, T]")
        if steps < 1:
            raise TrainError(f"steps must be >= 1, got {steps}")
        if int(rows.min()) < 0 or int(rows.max()) >= target.config.vocab_size:
            raise TrainError(f"row token ids span [{int(rows.min())}, {int(rows.max())}] outside the target's "
                             f"vocabulary of {target.config.vocab_size}")
        if any(p.requires_grad for p in target.parameters()):
            raise TrainError("the target must be frozen (no parameter requiring grad): the drafter alone trains")
        first = torch.as_tensor(first_slot, dtype=torch.long).expand(rows.shape[0])  # [N]
        self.target, self.rows, self.steps, self.step_weights = target.eval(), rows, steps, step_weights
        self.valid = torch.arange(rows.shape[1])[None] >= first[:, None]  # [N,T]
        self.sampler = _Sampler(rows.shape[0], batch_size, seed)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        idx = self.sampler.next()
        return self.rows[idx], self.valid[idx]

    def loss(self, model, batch) -> tuple[torch.Tensor, dict]:
        model.check_target(self.target.config)
        ids, valid = batch
        return drafter_loss(model, self.target, ids, valid, steps=self.steps, step_weights=self.step_weights)

    def state(self) -> dict:
        return {"sampler": self.sampler.state()}

    def load_state(self, st: dict) -> None:
        self.sampler.load_state(st["sampler"])
