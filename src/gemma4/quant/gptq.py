"""Error-aware weight quantization (GPTQ) into the formats of :mod:`gemma4.quant`.

Round-to-nearest (RTN) quantizes every weight on its own. GPTQ quantizes a weight matrix one input column
at a time and, after each column, moves the rounding error onto the columns not yet quantized, weighted by
the inverse Hessian ``H = X^T X`` of the layer's calibration inputs: what is minimised is the error of the
layer's *output* ``||X W^T - X Q^T||`` on real activations, not the error of the weights. On Gemma 3 270M
(whose int4-g32 RTN perplexity is +80% over bf16) this is the difference between usable and not.

``gptq_quantize(model, "int4", 32, calib_ids=ids)``:

1. one float pass over the calibration tokens records every decoder layer's inputs (rotary tables, masks,
   per-layer inputs) with forward pre-hooks;
2. layer by layer, the layer's linears see the hidden states produced by the *already quantized* earlier
   layers (hooks sum ``X^T X`` per linear), each weight matrix gets GPTQ'd, the layer is re-run with its
   quantized weights to give the next layer's input;
3. the tied embedding / output head gets GPTQ'd with the Hessian of the final-normed hidden states (the
   head's inputs); ``head="rtn"`` keeps the plain rounding for it, ``embedding_scheme="int8"`` stores it
   at int8 instead (the mixed recipe: int4 body, int8 table, like llama.cpp's Q4_K_M keeps sensitive
   tensors at higher precision);
4. the codes + scales are handed to :func:`gemma4.quant.quantize` (``precomputed=``), so the modules,
   kernels, saving and loading are exactly those of RTN models.

Group-wise asymmetric int4 uses the same grid as :func:`gemma4.quant.quantize_int4_tensor`: a group's
(scale, zero) are chosen by that function's clipping search on the group's *error-updated* weights when
GPTQ reaches the group's first column (``act_order=False``), or once from the original weights
(``act_order=True``: columns are visited by decreasing Hessian diagonal, groups stay contiguous in K so
the storage format is unchanged). int8 keeps quant.py's per-row symmetric scale and only changes the codes.

MoE expert stacks and the PLE table are quantized with RTN (not GPTQ'd here).

``awq=True`` (or :func:`awq_scale` on its own, before RTN) first rescales the float model so that the
input channels with large activations get finer int4 steps (AWQ); the two methods stack. Gemma 3 270M,
int4-g32 with an int8 table, perplexity over bf16 on text it has not memorized (two Alice in Wonderland
chapters) / on the US Constitution, which it has: GPTQ alone +14% / +47%, AWQ + GPTQ +7.7% / +42%, and
+6.6% / +34% with k/v at int8 (``int8_modules``); plain rounding +28% / +65% (benchmarks/RESULTS.md).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Iterable

import torch
from torch import nn

from gemma4._util import Progress, no_progress
from gemma4.model import Gemma4ForCausalLM
from gemma4.quant.rtn import (
    DEFAULT_SKIP,
    QuantizationError,
    int4_dequant,
    int8_dequant,
    int4_grid,
    validate_request,
    quantize,
    quantize_int4_tensor,
    quantize_int8_tensor,
)

log = logging.getLogger("gemma4")


# ----------------------------------------------------------------------------- calibration text
def default_calibration_text(root: str | Path | None = None) -> str:
    """Calibration text that is not the evaluation text and exists on every machine: the English prose of
    Python's own reference documentation (``pydoc_data.topics``, ~110k Gemma tokens, shipped with CPython),
    then this project's README.md and src/gemma4 modules. Prose matters: with 4k tokens of code as the only
    calibration, the GPTQ'd 270M model was +55% perplexity on the evaluation text, with 16k tokens of
    the pydoc prose +47% (benchmarks/RESULTS.md)."""
    parts = []
    try:
        from pydoc_data.topics import topics

        parts.extend(topics[k] for k in sorted(topics))
    except ImportError:  # some distributions strip pydoc_data; the project's own text still works
        pass
    root = Path(root) if root else Path(__file__).resolve().parents[2]
    readme = root / "README.md"
    if readme.exists():
        parts.append(readme.read_text(encoding="utf-8"))
    for p in sorted((root / "src" / "gemma4").glob("*.py")):
        parts.append(p.read_text(encoding="utf-8"))
    if not parts:
        raise FileNotFoundError(f"no calibration text found (no pydoc_data, nothing under {root})")
    return "\n\n".join(parts)


def calibration_ids(tokenizer, text: str | None = None, n_tokens: int = 16384, seq_len: int = 512,
                    bos: int | None = 2) -> torch.Tensor:
    """Token ids [B, seq_len] (B = n_tokens // seq_len) from ``text`` (default: :func:`default_calibration_text`),
    each row starting with BOS like a fresh document."""
    ids = tokenizer.encode(text if text is not None else default_calibration_text())
    ids = [i for i in ids if i != bos] if bos is not None else list(ids)
    per = seq_len - (bos is not None)
    rows = min(n_tokens // seq_len, len(ids) // per)
    if rows < 1:
        raise QuantizationError(f"calibration text has {len(ids)} tokens; need at least {per}")
    t = torch.tensor(ids[: rows * per]).view(rows, per)
    if bos is not None:
        t = torch.cat([torch.full((rows, 1), bos), t], 1)
    return t


# ----------------------------------------------------------------------------- GPTQ on one matrix
def _hinv_chol(h: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of (H + damp·mean(diag H)·I)^-1, in float64."""
    lam = damp * torch.diagonal(h).mean()
    eye = torch.eye(h.shape[0], dtype=h.dtype)
    for _ in range(6):  # grow the damping if H is too ill-conditioned for Cholesky
        try:
            l = torch.linalg.cholesky(h + lam * eye)
            return torch.linalg.cholesky(torch.cholesky_inverse(l), upper=True)
        except torch.linalg.LinAlgError:
            lam = lam * 10
    raise QuantizationError("Hessian is not positive definite even with heavy damping")


# Clipping candidates (fraction of the group's [min, max] range trimmed off the low, high end) for a
# group's (scale, zero) under GPTQ: a subset of quant.py's RTN search (GPTQ's error feedback does part of
# the clipping search's job, and the search runs on every group of every matrix inside the column loop).
_GPTQ_TRIMS = ((0.0, 0.0), (0.05, 0.05), (0.1, 0.1), (0.0, 0.08), (0.08, 0.0))


def _group_params(t: torch.Tensor) -> torch.Tensor:
    """Asymmetric int4 (scale, zero) bf16 [N, 2] for the group t [N, g], least squared error over _GPTQ_TRIMS."""
    t = t[:, None]  # [N, 1, g]: quant.int4_grid works on [.., groups, g]
    lo0, hi0 = t.amin(-1), t.amax(-1)
    r = hi0 - lo0
    best = None
    for a, b in _GPTQ_TRIMS:
        _, sc, ze, err = int4_grid(t, lo0 + a * r, hi0 - b * r)
        if best is None:
            best = [sc, ze, err]
        else:
            m = err < best[2]
            best = [torch.where(m, sc, best[0]), torch.where(m, ze, best[1]), torch.where(m, err, best[2])]
    return torch.stack([best[0][:, 0], best[1][:, 0]], -1)


def gptq_matrix(w: torch.Tensor, h: torch.Tensor, scheme: str = "int4", group_size: int = 32, *,
                damp: float = 0.01, block: int = 32, act_order: bool = False, rows_per_chunk: int = 32768):
    """GPTQ one weight ``w [N, K]`` given the input Hessian ``h [K, K]`` (``sum x x^T`` up to a factor).

    Returns the same tensors as quant.py's RTN: int4 -> (codes uint8 [N, K], scales_zeros bf16 [K/g, N, 2]);
    int8 -> (q int8 [N, K], scales bf16 [N]). Rows are independent given H, so tall matrices (the
    262144-row head) run in row chunks: bounded temporaries."""
    n, k = w.shape
    if h.shape != (k, k):
        raise QuantizationError(f"Hessian shape {list(h.shape)} does not match weight input dim {k}")
    g = group_size if scheme == "int4" else k
    if scheme == "int4" and k % g:
        raise QuantizationError(f"group size {g} does not divide the input dim {k}")
    if scheme == "int4" and block % g and g % block:
        raise QuantizationError(f"block {block} and group size {g} must divide one another")
    h = h.double().clone()
    dead = torch.diagonal(h) == 0  # inputs never excited: weight irrelevant, keep H invertible
    h[dead, dead] = 1.0
    perm = None
    if act_order:  # most-excited inputs first, while the most other columns are left to absorb error
        perm = torch.argsort(torch.diagonal(h), descending=True)
        h = h[perm][:, perm]
    u = _hinv_chol(h, damp).float()
    codes, scales = [], []
    for r0 in range(0, n, rows_per_chunk):
        wc = w[r0 : r0 + rows_per_chunk].detach().float()
        q, s = _gptq_rows(wc, u, dead, perm, scheme, g, block)
        codes.append(q)
        scales.append(s)
    if scheme == "int4":
        return torch.cat(codes, 0), torch.cat(scales, 1)
    return torch.cat(codes, 0), torch.cat(scales, 0)


def _gptq_rows(w: torch.Tensor, u: torch.Tensor, dead, perm, scheme: str, g: int, block: int):
    n, k = w.shape
    W = w.clone()
    W[:, dead] = 0.0
    if scheme == "int8":
        _, scales = quantize_int8_tensor(w)
        sc = scales.float()  # [N], fixed per row from the original weights
    else:
        sz = torch.empty(k // g, n, 2, dtype=torch.bfloat16)
        if perm is not None:  # static groups: (scale, zero) from the original weights, before any update
            _, sz = quantize_int4_tensor(w, g)
        szf = sz.float()
    if perm is not None:
        W = W[:, perm]
    Q = torch.empty(n, k)  # integer codes, in visiting order
    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        W1 = W[:, i1:i2].clone()
        E1 = torch.empty_like(W1)
        U1 = u[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            x = W1[:, i]
            if scheme == "int4":
                gi = (int(perm[col]) if perm is not None else col) // g  # group in the stored layout
                if perm is None and col % g == 0:
                    # The group's params from its error-updated weights: inside this block they are
                    # W1's, and a group spanning blocks starts a block (W1 is up to date there too).
                    grp = W1[:, i : i + g] if i + g <= i2 - i1 else W[:, col : col + g]
                    sz[gi] = _group_params(grp)
                    szf[gi] = sz[gi].float()
                s, z = szf[gi, :, 0], szf[gi, :, 1]
                q = torch.round((x - z) / s + 8.0).clamp_(0, 15)
                deq = (q - 8.0) * s + z
            else:
                q = torch.round(x / sc).clamp_(-127, 127)
                deq = q * sc
            Q[:, col] = q
            e = (x - deq) / U1[i, i]
            W1[:, i + 1 :] -= e[:, None] * U1[i, i + 1 :][None]
            E1[:, i] = e
        W[:, i2:] -= E1 @ u[i1:i2, i2:]
    if perm is not None:
        Q = Q[:, torch.argsort(perm)]
    if scheme == "int4":
        return Q.to(torch.uint8), sz
    return Q.to(torch.int8), scales


class _Stop(Exception):
    pass


@torch.no_grad()
def _capture_layer_calls(model: Gemma4ForCausalLM, calib_ids: torch.Tensor) -> list[tuple[tuple, dict]]:
    """Every decoder layer's call arguments (hidden state, rotary tables, masks, per-layer inputs) from one
    float pass over the calibration tokens, stopping before the last layer runs."""
    layers = list(model.model.layers)
    captured: list[tuple[tuple, dict]] = [None] * len(layers)  # type: ignore[list-item]

    def grab(i):
        def pre(mod, args, kwargs):
            captured[i] = (args, dict(kwargs))
            if i == len(layers) - 1:
                raise _Stop
        return pre

    hs = [layer.register_forward_pre_hook(grab(i), with_kwargs=True) for i, layer in enumerate(layers)]
    try:
        model.model(calib_ids)
    except _Stop:
        pass
    finally:
        for hk in hs:
            hk.remove()
    return captured


def _layer_by_layer(model: Gemma4ForCausalLM, calib_ids: torch.Tensor, desc: str = "", progress: Progress | None = None):
    """Walk the decoder layers on calibration activations. Yields ``(i, layer, run)``: ``run()`` calls layer
    i on its input as the stack *so far* computes it (e.g. under hooks), ``run(advance=True)`` also makes
    the output the next layer's input (and the K/V a storing layer shares with its consumers). Changes made
    to layer i before it advances (quantized or rescaled weights) reach every later layer's input."""
    cfg, layers = model.config, list(model.model.layers)
    captured = _capture_layer_calls(model, calib_ids)
    state, shared = {"h": captured[0][0][0]}, {}
    for i in (progress or no_progress)(range(len(layers)), desc):
        args, kwargs = captured[i]
        kwargs = {**kwargs, "cache": None, "shared_kv": shared.get(cfg.layer_types[i])}

        def run(advance: bool = False):
            h, kv = layers[i](state["h"], *args[1:], **kwargs)
            if advance:
                state["h"] = h
                if cfg.kv_sharing_modes[i] == "store":
                    shared[cfg.layer_types[i]] = kv
            return h

        yield i, layers[i], run


def _check_calib(model: Gemma4ForCausalLM, calib_ids) -> None:
    if model.config.quantization:
        raise QuantizationError("model is already quantized; calibrated quantization needs the float weights")
    if not isinstance(calib_ids, torch.Tensor) or calib_ids.dim() != 2 or calib_ids.dtype not in (torch.int64, torch.int32):
        got = f"{calib_ids.dtype} {list(calib_ids.shape)}" if isinstance(calib_ids, torch.Tensor) else type(calib_ids).__name__
        raise QuantizationError(f"calib_ids must be an integer tensor [B, T], got {got}")


# ----------------------------------------------------------------------------- AWQ: activation-aware scales
def _fake_int4(w: torch.Tensor, group_size: int) -> torch.Tensor:
    codes, sz = quantize_int4_tensor(w, group_size, search=False)
    return int4_dequant(codes, sz, group_size, torch.float32)


def _awq_groups(layer: nn.Module) -> list[tuple[str, nn.Module, list[nn.Linear], nn.Linear]]:
    """(name, module whose output the scale folds into, linears sharing that input, the linear whose input
    is recorded). Only exact folds: a norm's weight (its output feeds exactly these linears) or up_proj's
    rows (down_proj's input is gelu(gate) * up, linear in up). Not folded: o_proj (Gemma 4's scale-less
    v_norm sits between v_proj and it), the PLE gate (its input is the residual stream), the MoE experts."""
    at, mlp = layer.self_attn, layer.mlp
    qkv = [m for m in (getattr(at, "q_proj", None), getattr(at, "k_proj", None), getattr(at, "v_proj", None))
           if isinstance(m, nn.Linear)]
    return [("qkv", layer.input_layernorm, qkv, qkv[0]),
            ("gate_up", layer.pre_feedforward_layernorm, [mlp.gate_proj, mlp.up_proj], mlp.gate_proj),
            ("down", mlp.up_proj, [mlp.down_proj], mlp.down_proj)]


@torch.no_grad()
def awq_scale(model: Gemma4ForCausalLM, calib_ids: torch.Tensor, group_size: int = 32, *, grid: int = 20,
              rows: int = 8192, progress: Progress | None = None) -> dict[str, float]:
    """Activation-aware weight scaling (AWQ, Lin et al. 2023) for int4, applied in place to a float model.

    Why: Gemma's norms give a few input channels activations far larger than the rest, and a weight's
    rounding error reaches the output multiplied by its input. Scaling a linear's input columns by
    ``s = mean|x|^a`` before group-wise rounding gives those channels finer steps; ``x / s`` is folded into
    the norm (or up_proj) feeding the linear, so the *float* model computes the same function. ``a`` in
    [0, 1] is searched per layer and group of linears sharing an input, minimising the int4 output error
    ``||X (Q(W s) / s)^T - X W^T||`` on (up to ``rows``) calibration inputs. Returns {"layer.group": a}.
    Then quantize (RTN or GPTQ) as usual: :func:`gptq_quantize` does both with ``awq=True``."""
    group_size = validate_request("int4", group_size)
    _check_calib(model, calib_ids)
    chosen: dict[str, float] = {}
    gen = torch.Generator().manual_seed(0)
    for i, layer, run in _layer_by_layer(model, calib_ids, "AWQ scales", progress):
        groups = _awq_groups(layer)
        xs: dict[str, torch.Tensor] = {}

        def rec(name):
            def fwd(mod, inp, out):
                xs[name] = inp[0].detach().reshape(-1, inp[0].shape[-1]).float()
            return fwd

        hooks = [probe.register_forward_hook(rec(name)) for name, _, _, probe in groups]
        run()
        for hk in hooks:
            hk.remove()
        for name, prev, lins, _ in groups:
            x = xs[name]
            xmean = x.abs().mean(0).clamp(min=1e-8)  # [K]
            if x.shape[0] > rows:
                x = x[torch.randperm(x.shape[0], generator=gen)[:rows]]
            w = torch.cat([m.weight.float() for m in lins], 0)  # [sum N, K]
            if w.shape[1] % group_size:
                raise QuantizationError(f"group size {group_size} does not divide layer {i} {name} input dim {w.shape[1]}")
            ref = x @ w.t()
            best_a, best_err, best_s = 0.0, float("inf"), None
            for j in range(grid + 1):
                a = j / grid
                s = xmean.pow(a)
                s = s / (s.max() * s.min()).sqrt()  # centred in log space: keeps w * s away from over/underflow
                err = (x @ (_fake_int4(w * s, group_size) / s).t() - ref).pow(2).mean().item()
                if err < best_err:
                    best_a, best_err, best_s = a, err, s
            chosen[f"{i}.{name}"] = best_a
            if best_a == 0.0:
                continue
            if not isinstance(prev, nn.Linear):
                # s <= 1 so the norm's multiplier only grows: Gemma 3 stores w of (1 + w) and a model cast to
                # bf16 keeps ~3 significant digits of w; shrinking 1 + w toward 0 (s > 1) would cancel them
                # (the folded *float* model lost 8.5% perplexity in bf16 with centred s). The overall
                # factor of s does not change the int4 rounding: each group's scale absorbs it.
                best_s = best_s / best_s.max()
            for m in lins:
                m.weight.mul_(best_s.to(m.weight.dtype))
            if isinstance(prev, nn.Linear):  # up_proj: its output rows carry 1/s into down_proj's input
                prev.weight.div_(best_s[:, None].to(prev.weight.dtype))
            else:  # RMSNorm: multiplies by (weight + offset); Gemma 3 stores 1 + w
                off = prev.offset
                prev.weight.copy_(((prev.weight.float() + off) / best_s - off).to(prev.weight.dtype))
        run(advance=True)  # float outputs: unchanged by the folds, up to rounding
    return chosen


# ----------------------------------------------------------------------------- GPTQ on the model


def _linears(layer: nn.Module, skip: tuple[str, ...]) -> dict[str, nn.Linear]:
    return {n: m for n, m in layer.named_modules() if isinstance(m, nn.Linear)
            and not any(s and f".{s}." in f".{n}." for s in skip)}


@torch.no_grad()
def gptq_quantize(model: Gemma4ForCausalLM, scheme: str = "int4", group_size: int | None = 32, *,
                  calib_ids: torch.Tensor, embeddings: bool = True, embedding_scheme: str | None = None,
                  head: str = "gptq", skip: Iterable[str] = DEFAULT_SKIP, damp: float = 0.3, block: int = 32,
                  act_order: bool = True, awq: bool = False, int8_modules: Iterable[str] = (),
                  progress: Progress | None = None) -> Gemma4ForCausalLM:
    """Quantize ``model`` in place with GPTQ (see the module docstring) and return it.

    ``calib_ids``: calibration token ids [B, T] (e.g. :func:`calibration_ids`). ``embeddings``: also
    quantize the token embedding / tied head (and PLE table, RTN). ``embedding_scheme``: "int8" stores the
    embedding/head at int8 while the body uses ``scheme`` (a per-module override in the config's
    quantization section: the mixed model saves and loads like any other). ``head``: "gptq" or "rtn" for
    the tied table. ``awq``: first fold activation-aware scales into the float model (:func:`awq_scale`;
    int4 only: int8's per-row steps are already fine enough). ``int8_modules``: module-name components
    (e.g. ``("v_proj",)``) whose layer linears are GPTQ'd to int8 under an int4 body, like llama.cpp's
    Q4_K_M keeps attn_v at higher precision; recorded as overrides, so the model saves and loads.
    """
    group_size = validate_request(scheme, group_size)
    if scheme == "bf16":
        raise QuantizationError("bf16 keeps the weights' values (nothing to calibrate): use quantize(model, 'bf16')")
    if scheme == "int8" and group_size:
        raise QuantizationError("GPTQ int8 rounds per output row: group_size must be None (grouped int8 is RTN only)")
    if head not in ("gptq", "rtn"):
        raise QuantizationError(f"head must be 'gptq' or 'rtn', got {head!r}")
    if embedding_scheme not in (None, scheme, "int8"):
        raise QuantizationError(f"embedding_scheme must be None or 'int8', got {embedding_scheme!r}")
    _check_calib(model, calib_ids)
    skip = tuple(skip)
    int8_modules = (int8_modules,) if isinstance(int8_modules, str) else tuple(int8_modules)
    t0 = time.perf_counter()
    body = model.model
    orig_dtype = model.dtype
    if orig_dtype != torch.float32:
        model.float()

    if awq and scheme == "int4":
        awq_scale(model, calib_ids, group_size, progress=progress)
    pre: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    overrides: dict[str, dict] = {}
    # 1-2. one float pass records every layer's call arguments; then layer by layer on the quantized
    # stack's activations
    for i, layer, run in _layer_by_layer(model, calib_ids, f"GPTQ {scheme}", progress):
        lins = _linears(layer, skip)
        hess = {n: torch.zeros(m.in_features, m.in_features, dtype=torch.float64) for n, m in lins.items()}
        counts = dict.fromkeys(lins, 0)

        def acc(name):
            def fwd(mod, inp, out):
                x = inp[0].detach().reshape(-1, inp[0].shape[-1]).float()
                hess[name] += (x.t() @ x).double()
                counts[name] += x.shape[0]
            return fwd

        hooks = [m.register_forward_hook(acc(n)) for n, m in lins.items()]
        run()
        for hk in hooks:
            hk.remove()
        for n, m in lins.items():
            full = f"model.layers.{i}.{n}"
            sch = "int8" if any(f".{c}." in f".{full}." for c in int8_modules) else scheme
            res = gptq_matrix(m.weight, hess[n] / max(counts[n], 1), sch, group_size or 32, damp=damp,
                              block=block, act_order=act_order)
            pre[full] = res
            if sch != scheme:
                overrides[full] = {"scheme": sch}
            m.weight.copy_(_dequant(sch, res, group_size))
        h = run(advance=True)

    # 3. the tied table, with the Hessian of the head's inputs
    emb_scheme = embedding_scheme or scheme
    emb_res = None
    tied = model.lm_head is None
    if embeddings and tied and head == "gptq":
        hf = body.norm(h)
        x = hf.reshape(-1, hf.shape[-1]).double()
        res = gptq_matrix(body.embed_tokens.weight, x.t() @ x / x.shape[0], emb_scheme, group_size or 32,
                          damp=damp, block=block, act_order=act_order)
        if emb_scheme == scheme:
            pre["model.embed_tokens"] = res
        else:
            emb_res = res
    elif embeddings and not tied and isinstance(model.lm_head, nn.Linear) and "lm_head" not in skip:
        hf = body.norm(h)
        x = hf.reshape(-1, hf.shape[-1]).double()
        pre["lm_head"] = gptq_matrix(model.lm_head.weight, x.t() @ x / x.shape[0], scheme, group_size or 32,
                                     damp=damp, block=block, act_order=act_order)

    # 4. build the modules with quant.py's machinery (a mixed table is a recorded per-module override)
    mixed = embeddings and emb_scheme != scheme
    if mixed:
        overrides["model.embed_tokens"] = {"scheme": emb_scheme}
        if emb_res is not None:  # GPTQ'd above (head="gptq"); otherwise quantize() rounds it (RTN)
            pre["model.embed_tokens"] = emb_res
    quantize(model, scheme, group_size, embeddings=embeddings, skip=skip, precomputed=pre, overrides=overrides or None)
    if orig_dtype != torch.float32:
        model.to(orig_dtype)
    log.info("GPTQ %s g%s: %.1f s", scheme, group_size, time.perf_counter() - t0)
    return model


def _dequant(scheme: str, res, group_size) -> torch.Tensor:
    if scheme == "int4":
        return int4_dequant(res[0], res[1], group_size, torch.float32)
    return int8_dequant(res[0], res[1], torch.float32)


def layer_output_error(w: torch.Tensor, wq: torch.Tensor, x: torch.Tensor) -> float:
    """Relative output error ||x W^T - x Wq^T|| / ||x W^T|| of one linear on inputs x [.., K]."""
    with torch.no_grad():
        ref = x @ w.t()
        return float((ref - x @ wq.t()).norm() / ref.norm().clamp(min=1e-12))


__all__ = ["gptq_quantize", "awq_scale", "gptq_matrix", "calibration_ids", "default_calibration_text", "layer_output_error"]
