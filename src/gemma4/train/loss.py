"""Next-token loss without the full logits tensor.

Gemma's vocabulary has 262,144 entries: the float32 logits of one 2,048-token sequence are 2 GiB, and
autograd would keep that tensor (and its soft-capped copy, and the softmax) alive until the backward
pass. Here logits exist one chunk of tokens at a time:

* ``_ChunkedHeadCE`` (a plain head weight: tied embedding or ``lm_head``) turns each chunk's logits
  into its loss and, in place, its gradient (dL/dh rows, and dL/dw accumulated in float32), then
  drops them; backward only scales those gradients.
* any other head (a quantized tied embedding, a LoRA-wrapped ``lm_head``) goes through the model's own
  ``logits()`` one chunk at a time under non-reentrant activation checkpointing, which gives the same
  memory bound without knowing how the head computes.

Both return the *sum* of token losses; callers divide by the number of target tokens of the whole
optimizer step, which is what makes gradient accumulation equal to one large batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from gemma4.quant import QuantWeight
from gemma4.train.lora import frozen_quant_linear

IGNORE = -100

# Elements of one chunk's float32 logits: 2^24 * 4 bytes = 64 MiB (64 tokens of a 262k vocabulary).
DEFAULT_CHUNK_ELEMENTS = 1 << 24


def chunk_tokens(vocab_size: int, chunk_elements: int = DEFAULT_CHUNK_ELEMENTS) -> int:
    return max(1, chunk_elements // max(1, vocab_size))


def _compute_dtype(h: torch.Tensor) -> torch.dtype:
    """The dtype the head matmul runs in: the autocast dtype when autocast is on (as F.linear would),
    else the hidden states' own dtype."""
    dev = h.device.type
    if torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return h.dtype


class _ChunkedHeadCE(torch.autograd.Function):
    """sum over tokens of CE(softcap(h @ w.T), target), computed chunk by chunk.

    h [N,H], w [V,H], targets [N] (all valid: callers drop ignored positions first).

    When gradients are wanted, each chunk's gradient is formed right after its loss, while its logits
    exist anyway (softmax - onehot, times the soft-cap's derivative): dL/dh [N,H] and dL/dw [V,H]
    (float32) are kept for backward, which only scales them by the incoming gradient. That is one matmul
    per chunk fewer than recomputing the logits in backward, and dL/dw is the buffer w.grad needs anyway
    (the loss is the last op of the forward, so backward begins with it)."""

    @staticmethod
    def forward(ctx, h, w, targets, softcap, chunk, cdtype):
        n = h.shape[0]
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        wc = w.to(cdtype)
        gh = torch.empty_like(h) if need_h else None
        gw = torch.zeros(w.shape, dtype=torch.float32, device=w.device) if need_w else None
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        with torch.autocast(h.device.type, enabled=False):
            for s in range(0, n, chunk):
                hc = h[s : s + chunk].to(cdtype)
                t = targets[s : s + chunk, None]
                x = F.linear(hc, wc)
                if softcap:
                    tc = torch.tanh(x / softcap)
                    z = (tc * softcap).float()  # [c,V], as Gemma4ForCausalLM.logits rounds it
                else:
                    z = x.float()
                del x
                lse = torch.logsumexp(z, dim=-1, keepdim=True)  # [c,1]
                total += (lse - z.gather(1, t)).sum()
                if not (need_h or need_w):
                    continue
                # d(lse - z_t)/dz = softmax(z) - onehot(t), formed in place over the logits.
                z.sub_(lse).exp_()
                z.scatter_add_(1, t, torch.full_like(lse, -1.0))
                if softcap:
                    # z = c * tanh(x / c)  =>  dz/dx = 1 - tanh(x / c)^2.
                    z.mul_(1.0 - tc.float().square_())
                    del tc
                zc = z.to(cdtype)
                del z
                if need_h:
                    gh[s : s + chunk] = (zc @ wc).to(h.dtype)
                if need_w:
                    if cdtype == torch.float32:
                        gw.addmm_(zc.t(), hc)
                    else:  # low-precision matmul, float32 accumulation across chunks
                        gw.add_(zc.t() @ hc)
        ctx.grads = (gh, gw)
        ctx.w_dtype = w.dtype
        return total

    @staticmethod
    def backward(ctx, grad_total):
        gh, gw = ctx.grads
        ctx.grads = None
        g = grad_total.float()
        one = bool(g == 1.0)  # the usual case: hand the buffers over without a copy
        if gh is not None and not one:
            gh = gh * g.to(gh.dtype)
        if gw is not None:
            gw = (gw if one else gw.mul_(g)).to(ctx.w_dtype)
        return gh, gw, None, None, None, None


def _chunk_logits(hc, wc, softcap) -> torch.Tensor:
    """Logits of one chunk in float32, soft-capped like the model's head: the matmul and the cap run
    in the compute dtype, as ``Gemma4ForCausalLM.logits`` does, then the result is widened."""
    x = F.linear(hc, wc)
    if softcap:
        x = torch.tanh(x / softcap) * softcap
    return x.float()


def head_weight(model) -> torch.Tensor | None:
    """The plain output-projection weight [V,H] when the head is a bare matrix, else None."""
    head = model.lm_head if model.lm_head is not None else model.model.embed_tokens
    w = getattr(head, "weight", None)
    if type(head) in (torch.nn.Linear, torch.nn.Embedding) and isinstance(w, torch.Tensor) and w.is_floating_point():
        return w
    return None


def hidden_loss_sum(model, h: torch.Tensor, targets: torch.Tensor, chunk: int | None = None) -> torch.Tensor:
    """Sum of next-token losses for hidden states ``h`` [N,H] (already final-normed) against
    ``targets`` [N] (every entry a real token id). Never holds more than one chunk of logits."""
    if h.shape[0] == 0:
        return h.sum() * 0.0  # keeps the graph (and a zero gradient) for an all-masked micro-batch
    cfg = model.config
    chunk = chunk or chunk_tokens(cfg.vocab_size)
    softcap = cfg.final_logit_softcapping or None
    w = head_weight(model)
    if w is not None:
        return _ChunkedHeadCE.apply(h, w, targets, softcap, chunk, _compute_dtype(h))
    total = h.new_zeros((), dtype=torch.float32)
    for s in range(0, h.shape[0], chunk):
        total = total + checkpoint(_generic_chunk, model, h[s : s + chunk], targets[s : s + chunk], use_reentrant=False)
    return total


def _head_logits(model, h: torch.Tensor) -> torch.Tensor:
    """model.logits(h), with a gradient for h through a quantized head (QLoRA): the integer kernels
    have no derivative, so the quantized table goes through `frozen_quant_linear`."""
    head = model.lm_head
    table = getattr(head, "table", None) if head is not None else None  # TiedHead over a quantized table
    qmod = table if table is not None else (head if isinstance(head, QuantWeight) else None)
    if qmod is None:
        return model.logits(h)
    x = frozen_quant_linear(h, qmod)
    c = model.config.final_logit_softcapping
    return torch.tanh(x / c) * c if c else x


def _generic_chunk(model, h, t):
    return F.cross_entropy(_head_logits(model, h).float(), t, reduction="sum")


def _check_ids(ids: torch.Tensor, vocab: int) -> None:
    if ids.dim() != 2 or ids.dtype not in (torch.int64, torch.int32) or ids.shape[1] < 2:
        raise ValueError(f"input_ids must be an integer tensor [B, T] with T >= 2, got {ids.dtype} {list(ids.shape)}")
    if int(ids.min()) < 0 or int(ids.max()) >= vocab:
        raise ValueError(f"token id out of range: ids span [{int(ids.min())}, {int(ids.max())}] but vocab_size is {vocab}")


def causal_lm_loss(model, input_ids: torch.Tensor, labels: torch.Tensor | None = None, *,
                   attention_mask: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                   segment_ids: torch.Tensor | None = None, num_targets: int | None = None,
                   chunk: int | None = None) -> torch.Tensor:
    """Mean next-token cross-entropy, Hugging Face convention: ``labels`` [B,T] are aligned with
    ``input_ids`` (the model predicts ``labels[:, t+1]`` at position t; -100 = no loss). ``labels=None``
    uses ``input_ids``.

    ``num_targets``: divide by this count instead of this batch's own target count, so that the
    micro-batches of one optimizer step each contribute ``sum / total`` (exact accumulation).
    ``segment_ids`` [B,T] keeps attention inside each packed document (needs decoder support)."""
    if labels is None:
        labels = input_ids
    if labels.shape != input_ids.shape:
        raise ValueError(f"labels must have the shape of input_ids {list(input_ids.shape)}, got {list(labels.shape)}")
    _check_ids(input_ids, model.config.vocab_size)
    kw = {}
    if segment_ids is not None:
        kw["segment_ids"] = segment_ids
    h = model.model(input_ids, attention_mask, position_ids, **kw)  # [B,T,H]
    targets = labels[:, 1:]
    keep = targets != IGNORE
    hs = h[:, :-1][keep]  # [N,H]: only positions that have a target reach the head
    t = targets[keep]
    if t.numel() and (int(t.min()) < 0 or int(t.max()) >= model.config.vocab_size):
        raise ValueError(f"label ids span [{int(t.min())}, {int(t.max())}] outside the vocabulary "
                         f"(size {model.config.vocab_size}); use -100 for positions without a target")
    denom = num_targets if num_targets is not None else max(int(keep.sum()), 1)
    return hidden_loss_sum(model, hs, t, chunk) / denom
