"""Memory estimates against what our modules and caches actually allocate (tiny configs)."""

import os
import platform
import sys

import pytest
import torch

from gemma4 import Gemma4Config, estimate_memory
from gemma4.model.config import FULL, SLIDING
from gemma4.model.size import kv_cache_bytes, parse_tokens, weight_bytes
from gemma4.quant.rtn import Int4Linear, Int8Linear, kernels_available, model_nbytes, quantize

import quant_tiny

CASES = [("fp32", None, torch.float32), ("bf16", None, torch.bfloat16), ("int8", None, torch.float32),
         ("int8", None, torch.bfloat16), ("int4", 32, torch.bfloat16), ("int4", 64, torch.float32)]


@pytest.mark.parametrize("kind", list(quant_tiny.KINDS))
def test_weight_bytes_equal_module_bytes(kind):
    cfg = quant_tiny.config(kind)
    for wd, g, dt in CASES:
        m = quant_tiny.model(kind, dtype=dt)
        if wd.startswith("int"):
            if g and any(k % g for k in (cfg.intermediate_size, cfg.hidden_size)):
                continue
            quantize(m, wd, g)
        compute = "bf16" if dt == torch.bfloat16 else "fp32"
        est = sum(weight_bytes(cfg, wd, g or 32, compute_dtype=compute).values())
        assert est == model_nbytes(m), (kind, wd, g, dt)


@pytest.mark.parametrize("kind", list(quant_tiny.KINDS))
def test_kv_bytes_equal_cache_bytes(kind):
    cfg = quant_tiny.config(kind)
    m = quant_tiny.model(kind)
    for n_prefill, n_decode, slack in [(3, 0, 0), (5, 4, 0), (20, 3, 2), (260, 2, 0)]:
        cache = m.new_cache(slack=slack)
        with torch.no_grad():
            m(torch.randint(0, cfg.vocab_size, (2, n_prefill)), cache=cache, keep_last=1)
            for _ in range(n_decode):
                m(torch.randint(0, cfg.vocab_size, (2, 1)), cache=cache, keep_last=1)
        n = n_prefill + n_decode
        live, reserved, _ = kv_cache_bytes(cfg, n, 2, "fp32", slack=slack)
        assert cache.nbytes_by_type() == live, (n, slack)
        assert sum(c.reserved_nbytes() for c in cache.layers if c is not None) == reserved
        est = estimate_memory(cfg, n, batch=2, weight_dtype="fp32", slack=slack)
        assert est.kv_total == cache.nbytes() and est.kv_reserved == reserved
        assert sum(est.kv_layers.values()) == sum(c is not None for c in cache.layers)


def test_layer_kinds_in_the_kv_estimate():
    e2b = Gemma4Config.from_preset("e2b")
    a, b = estimate_memory(e2b, 32_768), estimate_memory(e2b, 131_072)
    # Sliding layers are window-bounded: the same bytes at 32k and 128k; full layers grow 4x.
    assert a.kv_by_type[SLIDING] == b.kv_by_type[SLIDING] == 12 * 2 * 256 * 512 * 2
    assert b.kv_by_type[FULL] == 4 * a.kv_by_type[FULL] == 4 * 3 * 2 * 512 * 32_768 * 2
    assert a.kv_layers == {SLIDING: 12, FULL: 3}  # 20 KV-shared layers hold none
    assert a.offloadable == a.weights["ple_table"] > 0
    assert a.accelerator_total == a.total - a.offloadable
    # K=V: our cache stores both; the estimate reports what storing the raw key once would save.
    dense = Gemma4Config.from_preset("31b")
    e = estimate_memory(dense, 65_536)
    shared = estimate_memory(dense, 65_536, share_k_eq_v=True)
    assert e.k_eq_v_saving == e.kv_by_type[FULL] // 2
    assert shared.kv_by_type[FULL] == e.kv_by_type[FULL] // 2 and shared.k_eq_v_saving == 0
    assert estimate_memory(dense, 65_536, weight_dtype="int4").weights_total < e.weights_total / 3


@pytest.mark.parametrize("cls,kw", [(Int8Linear, {}), (Int4Linear, {"group_size": 32})])
def test_quantized_matmuls_allocate_only_their_output(cls, kw):
    # Why the activation estimate does not depend on weight_dtype: quantized models run bf16 activations,
    # and with those the int8/int4 layers hand the input to their kernel as is (no converted copy, no
    # dequantized weight) — the only new tensor is the output the estimate already counts.
    # The claim is about the kernels' path, which the pinned CPU torch has (test_quant asserts it too).
    assert all(kernels_available().values()), kernels_available()
    from torch.utils._python_dispatch import TorchDispatchMode

    class NewStorage(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.nbytes = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            held = {a.untyped_storage().data_ptr() for a in args if isinstance(a, torch.Tensor)}
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in held:  # not a view
                    self.nbytes.append(t.untyped_storage().nbytes())
            return out

    lin = cls(96, 64, **kw)
    lin.set_from_float(torch.randn(96, 64))
    x = torch.randn(1, 40, 64, dtype=torch.bfloat16)
    lin(x)  # first call: one-time kernel checks
    with NewStorage() as seen:
        y = lin(x)
    # (gemma4.quant.native quantizes the input into scratch memory of its own, freed before it returns)
    assert y.dtype == torch.bfloat16 and seen.nbytes == [y.numel() * 2]


def test_onednn_cache_caps_set_by_the_fast_path_not_on_import_and_user_values_win():
    import subprocess
    import sys

    code = ("import os, gemma4; print(os.environ.get('ONEDNN_PRIMITIVE_CACHE_CAPACITY'));"
            "from gemma4.infer.fast_path import configure_onednn; configure_onednn();"
            "print(os.environ['ONEDNN_PRIMITIVE_CACHE_CAPACITY'], os.environ['LRU_CACHE_CAPACITY'])")
    env = {k: v for k, v in os.environ.items() if k not in ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY")}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.split() == ["None", "64", "64"]  # nothing on import; set where the fast path is set up
    out = subprocess.run([sys.executable, "-c", code], env={**env, "LRU_CACHE_CAPACITY": "8"}, capture_output=True,
                         text=True, check=True).stdout
    assert out.split() == ["None", "64", "8"]


@pytest.mark.skipif(not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_malloc_threshold_held_by_the_fast_path_unless_the_user_set_it():
    import subprocess

    code = ("from gemma4.infer.fast_path import configure_malloc;"
            "print(configure_malloc(), configure_malloc())")
    env = {k: v for k, v in os.environ.items() if k != "MALLOC_MMAP_THRESHOLD_"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.split() == ["True", "True"]
    out = subprocess.run([sys.executable, "-c", code], env={**env, "MALLOC_MMAP_THRESHOLD_": "65536"},
                         capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]  # glibc follows the user's setting


def test_bad_input_and_token_parsing():
    assert parse_tokens("32k") == 32_768 and parse_tokens("1m") == 1 << 20 and parse_tokens(4096) == 4096
    with pytest.raises(ValueError, match="token count"):
        parse_tokens("lots")
    with pytest.raises(ValueError, match="weight dtype"):
        estimate_memory("e2b", 1024, weight_dtype="int3")
    with pytest.raises(ValueError, match="KV dtype"):
        estimate_memory("e2b", 1024, kv_dtype="int8")


def test_cli_memory_and_plot(tmp_path):
    from typer.testing import CliRunner

    from gemma4.cli import app

    png = tmp_path / "mem.png"
    r = CliRunner().invoke(app, ["memory", "e2b", "--context", "32k", "--quant", "int4", "--plot", str(png)])
    assert r.exit_code == 0, r.output
    assert "PLE table" in r.output and png.stat().st_size > 10_000
    r = CliRunner().invoke(app, ["memory", "31b", "--context", "8k", "--json"])
    assert r.exit_code == 0 and '"k_eq_v_saving"' in r.output
