"""Next-token loss without the full logits tensor.

Gemma's vocabulary has 262,144 entries: the float32 logits of one 2,048-token sequence are 2 GiB, and
autograd would keep that tensor (and its soft-capped copy, and the softmax) alive until the backward
pass. Here logits exist one chunk of tokens at a time:

* ``_ChunkedHeadCE`` (a plain head weight: tied embedding or ``lm_head``) is a fused linear
  cross-entropy: it walks the vocabulary in cache-sized blocks and forms the loss and the gradients
  (dL/dh, and dL/dw in float32 for a trainable head) in the forward; backward only scales them.
* any other head (a quantized tied embedding, a LoRA-wrapped ``lm_head``) goes through the model's own
  ``logits()`` one chunk at a time under non-reentrant activation checkpointing, which gives the same
  memory bound without knowing how the head computes.

Both return the *sum* of token losses; callers divide by the number of target tokens of the whole
optimizer step, which is what makes gradient accumulation equal to one large batch.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from gemma4.quant import QuantWeight, native
from gemma4.train.lora import frozen_quant_linear

IGNORE = -100

# Elements of one chunk's float32 logits: 2^24 * 4 bytes = 64 MiB (64 tokens of a 262k vocabulary).
# For heads that go through the model's own logits() (quantized, LoRA-wrapped).
DEFAULT_CHUNK_ELEMENTS = 1 << 24
# A plain head works on [tokens x vocabulary block] tiles of 2^19 float32 logits (2 MiB, about one
# core's L2 cache), so the softmax terms are computed while the tile is still cached.
BLOCK_ELEMENTS = 1 << 19
MIN_BLOCK = 256  # vocabulary rows: narrower blocks make the matmuls inefficient
# Tokens per pass over the vocabulary of a plain head: each pass reads the whole head weight once, so
# a pass should take every token of a usual micro-batch; per token it keeps only an [H] float32 sum.
DEFAULT_PASS_TOKENS = 1024


def chunk_tokens(vocab_size: int, chunk_elements: int = DEFAULT_CHUNK_ELEMENTS) -> int:
    return max(1, chunk_elements // max(1, vocab_size))


def _compute_dtype(h: torch.Tensor) -> torch.dtype:
    """The dtype the head matmul runs in: the autocast dtype when autocast is on (as F.linear would),
    else the hidden states' own dtype."""
    dev = h.device.type
    if torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return h.dtype


class _Blocks:
    """The [tokens, vocabulary block] work buffers of one chunk of tokens, reused by every block: x (the
    matmul output in the compute dtype; with a soft-cap, tanh in place), z (float32 logits, then their
    exp) and e (the block's dL/dlogits in the compute dtype). With float32 compute the three share
    storage where they can. A ragged last block gets its own set (contiguous ``out=`` targets)."""

    def __init__(self, c: int, cdtype: torch.dtype, softcap, need: bool, device):
        self.c, self.cdtype, self.softcap, self.need, self.device = c, cdtype, softcap, need, device
        self.sets: dict[int, tuple] = {}

    def get(self, nb: int):
        if nb not in self.sets:
            f32 = torch.float32
            x = torch.empty((self.c, nb), dtype=self.cdtype, device=self.device)
            z = x if (self.cdtype == f32 and not self.softcap) else torch.empty((self.c, nb), dtype=f32, device=self.device)
            e = torch.empty((self.c, nb), dtype=self.cdtype, device=self.device) if self.need and self.cdtype != f32 else z
            self.sets[nb] = (x, z, e)
        return self.sets[nb]


def _block_logits(hc, wb, softcap, x, z) -> None:
    """One vocabulary block's logits in float32, into ``z``, with the rounding of
    ``Gemma4ForCausalLM.logits``: matmul and soft-cap in the compute dtype, then widened. With a cap,
    ``x`` keeps tanh(x / cap) (the cap's derivative is 1 - that^2)."""
    torch.mm(hc, wb.t(), out=x)
    if softcap:
        x.div_(softcap).tanh_()
        torch.mul(x, softcap, out=z)  # computed in the compute dtype, stored widened
    elif z is not x:
        z.copy_(x)


def _targets_by_block(t: torch.Tensor, vb: int) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """{vocabulary block: (rows of the chunk whose target is in it, the target's column in the block)}."""
    blk = torch.div(t, vb, rounding_mode="floor")
    order = torch.argsort(blk)
    ids, counts = torch.unique_consecutive(blk[order], return_counts=True)
    return {b: (rows, t[rows] - b * vb) for b, rows in zip(ids.tolist(), order.split(counts.tolist()))}


def _block_grad(z, x, e, softcap) -> torch.Tensor:
    """A block's dL/dlogits from its softmax terms ``z`` (float32): times the cap's derivative when there
    is a cap, in the compute dtype (``e``)."""
    if softcap:
        # z * (1 - x^2) in one pass, written in the compute dtype (in place in float32)
        return torch.ops.aten.tanh_backward.grad_input(z, x, grad_input=e)
    if e is not z:
        e.copy_(z)
    return e


def _native_ok(h: torch.Tensor, cdtype: torch.dtype) -> bool:
    return h.device.type == "cpu" and cdtype in (torch.float32, torch.bfloat16) and native.available()


def _native_block(hc, wb, softcap, x, hit, zt, dcap_t, m, ssum, scale, acc) -> None:
    """One vocabulary block of the online pass through the compiled kernel (`gemma4.quant.native.ce_block_`):
    the same steps as the PyTorch ops of the loop below (matmul and soft-cap in the compute dtype; max,
    exp, sums and the cap's derivative in float32) in one pass over the tile, the tile's dL/dlogits
    written over its logits in ``x``. The target's logit (and cap derivative) are read first, with the
    rounding of `_block_logits`."""
    torch.mm(hc, wb.t(), out=x)
    if softcap:
        x.div_(softcap).tanh_()
    if hit is not None:
        xt = x[hit].to(torch.float32)
        zt[hit[0]] = (xt * softcap).to(x.dtype).to(torch.float32) if softcap else xt
        if softcap:
            dcap_t[hit[0]] = 1.0 - xt.square()
    native.ce_block_(x, softcap, m, ssum, scale, x if acc is not None else None)
    if acc is not None:
        acc.mul_(scale)
        if hit is not None:
            x[hit] = 0  # the target's term is added exactly at the end
        _add_mm(acc, x, wb)


def _add_mm(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc (float32) += a @ b: in place when a, b are float32; else a low-precision product, added."""
    if a.dtype == acc.dtype:
        acc.addmm_(a, b)
    else:
        acc.add_(torch.mm(a, b))


class _ChunkedHeadCE(torch.autograd.Function):
    """sum over tokens of CE(softcap(h @ w.T), target): a fused linear cross-entropy.

    h [N,H], w [V,H], targets [N] (all valid: callers drop ignored positions first).

    Work goes by chunks of tokens (``chunk``; all tokens of a usual micro-batch) and, inside a chunk, by
    blocks of the vocabulary sized so that one block's logits stay in cache (``BLOCK_ELEMENTS``): logits
    never exist beyond one [tokens x block] tile, and each pass over the vocabulary reads the head weight
    once for the whole chunk. (Chunks of few tokens over the whole vocabulary re-read it, and oneDNN
    re-transforms its layout, once per chunk: measured, that doubled the head's matmul time.)

    The gradients are formed in the forward and kept for backward, which only scales them:

    * frozen head (LoRA), one pass: an online softmax (running max and sum per token, rescaled when
      the max grows) accumulates dL/dh = sum_v softmax_v w_v - w_t, the target's own term added exactly
      in float32 at the end. Two head matmuls per token, as with full logits.
    * trainable head, two passes: the first finds each token's logsumexp, the second recomputes each
      block's logits, forms dL/dlogits = softmax - onehot exactly, adds its dL/dh share and writes the
      block's rows of dL/dw [V,H] (float32) once. Four matmuls instead of three, but no [V,H] temporary
      per chunk and no pass over the whole dL/dw per chunk.

    With a soft-cap, dL/dlogits is multiplied by the cap's derivative 1 - tanh(x / cap)^2."""

    @staticmethod
    def forward(ctx, h, w, targets, softcap, chunk, cdtype, block):
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        n, hid = h.shape
        v = w.shape[0]
        f32 = torch.float32
        wc = w.to(cdtype)  # one cast per call (a float32 head under autocast), not one per block
        gh = torch.empty_like(h) if need_h else None
        gw = torch.empty((v, hid), dtype=f32, device=w.device) if need_w else None
        total = torch.zeros((), dtype=f32, device=h.device)
        with torch.autocast(h.device.type, enabled=False):
            for s in range(0, n, chunk):
                hc = h[s : s + chunk].to(cdtype)  # [c,H]
                t = targets[s : s + chunk]
                c = hc.shape[0]
                vb = block or max(MIN_BLOCK, BLOCK_ELEMENTS // c)
                bufs = _Blocks(c, cdtype, softcap, need_h or need_w, h.device)
                where = _targets_by_block(t, vb)
                online = need_h and not need_w
                # The compiled block kernel takes the one-pass cases (online gradient, or the loss alone).
                fast = not need_w and _native_ok(h, cdtype)
                scale_buf = torch.empty((c, 1), dtype=f32, device=h.device) if fast else None
                m = torch.full((c, 1), -math.inf, dtype=f32, device=h.device)  # running max
                ssum = torch.zeros((c, 1), dtype=f32, device=h.device)  # running sum of exp(z - m)
                zt = torch.empty(c, dtype=f32, device=h.device)  # target logits
                dcap_t = torch.ones(c, dtype=f32, device=h.device)  # the cap's derivative at the target
                acc = torch.zeros((c, hid), dtype=f32, device=h.device) if need_h else None
                for b, v0 in enumerate(range(0, v, vb)):
                    wb = wc[v0 : v0 + vb]
                    x, z, e = bufs.get(wb.shape[0])
                    hit = where.get(b)
                    if fast:
                        _native_block(hc, wb, softcap, x, hit, zt, dcap_t, m, ssum, scale_buf, acc if online else None)
                        continue
                    _block_logits(hc, wb, softcap, x, z)
                    if hit is not None:
                        zt[hit[0]] = z[hit]
                        if softcap:
                            dcap_t[hit[0]] = 1.0 - x[hit].to(f32).square()
                    m_new = torch.maximum(m, z.amax(1, keepdim=True))
                    scale = (m - m_new).exp_()  # [c,1]: 0 at the first block (m = -inf)
                    z.sub_(m_new).exp_()
                    ssum.mul_(scale).add_(z.sum(1, keepdim=True))
                    m = m_new
                    if online:
                        acc.mul_(scale)
                        g = _block_grad(z, x, e, softcap)
                        if hit is not None:
                            g[hit] = 0  # the target's term is added exactly at the end
                        _add_mm(acc, g, wb)
                lse = m.squeeze(1) + ssum.squeeze(1).log()  # [c]
                total += (lse - zt).sum()
                if online:
                    # dL/dh = (sum_{v != t} e_v w_v) / sum + (p_t - 1) * cap'(t) * w_t
                    coef = ((zt - lse).exp() - 1.0) * dcap_t
                    acc.div_(ssum).addcmul_(coef[:, None], wc[t].to(f32))
                elif need_w:
                    for b, v0 in enumerate(range(0, v, vb)):
                        wb = wc[v0 : v0 + vb]
                        nb = wb.shape[0]
                        x, z, e = bufs.get(nb)
                        _block_logits(hc, wb, softcap, x, z)
                        z.sub_(lse[:, None]).exp_()  # softmax, exact: the logsumexp is known
                        hit = where.get(b)
                        if hit is not None:
                            z.index_put_(hit, torch.full_like(zt[hit[0]], -1.0), accumulate=True)  # - onehot
                        g = _block_grad(z, x, e, softcap)
                        if need_h:
                            _add_mm(acc, g, wb)
                        gw_b = gw[v0 : v0 + nb]
                        if s == 0:  # the first chunk writes the rows: no zero fill, no add
                            if g.dtype == f32:
                                torch.mm(g.t(), hc, out=gw_b)
                            else:
                                gw_b.copy_(torch.mm(g.t(), hc))
                        else:
                            _add_mm(gw_b, g.t(), hc)
                if need_h:
                    gh[s : s + c] = acc.to(h.dtype)
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
        return gh, gw, None, None, None, None, None


def head_weight(model) -> torch.Tensor | None:
    """The plain output-projection weight [V,H] when the head is a bare matrix, else None."""
    head = model.lm_head if model.lm_head is not None else model.model.embed_tokens
    w = getattr(head, "weight", None)
    if type(head) in (torch.nn.Linear, torch.nn.Embedding) and isinstance(w, torch.Tensor) and w.is_floating_point():
        return w
    return None


def hidden_loss_sum(model, h: torch.Tensor, targets: torch.Tensor, chunk: int | None = None,
                    vocab_block: int | None = None) -> torch.Tensor:
    """Sum of next-token losses for hidden states ``h`` [N,H] (already final-normed) against
    ``targets`` [N] (every entry a real token id). Never holds more than one chunk of logits.

    ``chunk``: tokens per chunk; ``vocab_block``: vocabulary rows per block of a plain head (default:
    sized by ``BLOCK_ELEMENTS``; tests set it to exercise many blocks on a tiny vocabulary)."""
    if h.shape[0] == 0:
        return h.sum() * 0.0  # keeps the graph (and a zero gradient) for an all-masked micro-batch
    cfg = model.config
    softcap = cfg.final_logit_softcapping or None
    w = head_weight(model)
    if w is not None:
        return _ChunkedHeadCE.apply(h, w, targets, softcap, chunk or DEFAULT_PASS_TOKENS, _compute_dtype(h),
                                    vocab_block)
    chunk = chunk or chunk_tokens(cfg.vocab_size)
    total = h.new_zeros((), dtype=torch.float32)
    for s in range(0, h.shape[0], chunk):
        total = total + checkpoint(_generic_chunk, model, h[s : s + chunk], targets[s : s + chunk], use_reentrant=False)
    return total


def _head_logits(model, h: torch.Tensor) -> torch.Tensor:
    """model.logits(h), with a gradient for h through a quantized head (QLoRA): the integer kernels
    have no derivative, so the quantized table goes through `frozen_quant_linear`."""
    head = model.lm_head if model.lm_head is not None else model.model.embed_tokens  # tied: the table
    qmod = head if isinstance(head, QuantWeight) else None
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
