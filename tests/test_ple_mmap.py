"""The PLE table of a safetensors checkpoint is a view of a copy-on-write memory map (resident only where
touched); everything else, and any load that converts it, is an ordinary in-memory tensor."""

import hashlib

import pytest
import quant_tiny
import torch

from gemma4.infer import generate
from gemma4.io import load_pretrained, save_pretrained
from gemma4.io.checkpoint import iter_safetensors, safetensors_files
from gemma4.quant import Int8Embedding, quantize

IDS = torch.randint(0, 320, (2, 9), generator=torch.Generator().manual_seed(5))


def _mapped_file(t: torch.Tensor) -> str | None:
    """The file whose memory map holds ``t``'s data (from /proc/self/maps), or None for anonymous memory."""
    ptr = t.untyped_storage().data_ptr()
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split(maxsplit=5)
            lo, hi = (int(x, 16) for x in parts[0].split("-"))
            if lo <= ptr < hi:
                return parts[5].strip() if len(parts) == 6 and parts[5].startswith("/") else None
    return None


def _digest(d):
    return hashlib.sha256((d / "model.safetensors").read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("ple")
    save_pretrained(quant_tiny.model("ple", dtype=torch.bfloat16), d)
    return d


def test_ple_table_is_mapped_and_computes_the_same(ckpt):
    m = load_pretrained(ckpt)
    full = load_pretrained(ckpt, map_ple=False)
    w = m.model.embed_tokens_per_layer.weight
    assert w.dtype == torch.bfloat16
    assert _mapped_file(w) == str((ckpt / "model.safetensors").resolve())
    assert _mapped_file(full.model.embed_tokens_per_layer.weight) is None
    # Only the PLE table: every other weight is read into memory.
    assert _mapped_file(m.model.embed_tokens.weight) is None
    assert _mapped_file(m.model.layers[0].mlp.down_proj.weight) is None
    with torch.no_grad():
        assert torch.equal(m(IDS), full(IDS))
    out = generate(m, IDS[:1, :5].tolist(), 4, temperature=0.0)
    assert out == generate(full, IDS[:1, :5].tolist(), 4, temperature=0.0)


def test_writes_never_reach_the_file(ckpt):
    before = _digest(ckpt)
    m = load_pretrained(ckpt, trainable=True)
    w = m.model.embed_tokens_per_layer.weight
    assert w.requires_grad and _mapped_file(w) is not None
    with torch.no_grad():
        w.add_(1.0)  # copy-on-write: private pages
    assert _digest(ckpt) == before
    assert not torch.equal(load_pretrained(ckpt).model.embed_tokens_per_layer.weight, w.detach())


def test_another_dtype_is_an_ordinary_copy(ckpt):
    m = load_pretrained(ckpt, dtype=torch.float32)
    w = m.model.embed_tokens_per_layer.weight
    assert w.dtype == torch.float32 and _mapped_file(w) is None
    ref = load_pretrained(ckpt).model.embed_tokens_per_layer.weight
    assert torch.equal(w, ref.float())


def test_quantized_ple_codes_are_mapped(tmp_path):
    m = quantize(quant_tiny.model("ple", dtype=torch.bfloat16), "int8")
    save_pretrained(m, tmp_path)
    q = load_pretrained(tmp_path)
    ple = q.model.embed_tokens_per_layer
    assert isinstance(ple, Int8Embedding)
    assert _mapped_file(ple.qweight) == str((tmp_path / "model.safetensors").resolve())
    assert _mapped_file(ple.scales) is None
    with torch.no_grad():
        assert torch.equal(q(IDS), m(IDS))


def test_iter_safetensors_maps_only_what_it_is_asked_to(ckpt):
    files = safetensors_files(ckpt)
    for mapped, want in (((), None), (("embed_tokens_per_layer.weight",), str((ckpt / "model.safetensors").resolve()))):
        got = {k: load() for k, load in iter_safetensors(files, mapped)}
        assert _mapped_file(got["model.embed_tokens_per_layer.weight"]) == want
        assert _mapped_file(got["model.embed_tokens.weight"]) is None
