"""Checkpoint hardening (issue 11): whole-checkpoint atomic saves under kill -9 at every write step, stale
files never shadowing a new save, reads that stay inside the checkpoint, validated safetensors headers."""

import json
import os
import signal
import struct

import pytest
import torch

import gemma4
from gemma4 import CheckpointError, Gemma4Error
from gemma4 import _util
from gemma4.io.checkpoint import read_safetensors_header
import quant_tiny


def _state(m):
    return {k: v.clone() for k, v in m.state_dict().items()}


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def models():
    return quant_tiny.model("dense", seed=1), quant_tiny.model("dense", seed=2)


# ------------------------------------------------------------------------------------------- atomicity
def _steps(fn):
    """Labels of every write step ``fn`` goes through."""
    labels = []
    _util._WRITE_HOOK = labels.append
    try:
        fn()
    finally:
        _util._WRITE_HOOK = None
    return labels


def _killed_at(k, fn):
    """Run ``fn`` in a forked child that SIGKILLs itself at write step ``k``; True if it died there."""
    pid = os.fork()
    if pid == 0:  # child
        count = [0]

        def hook(label):
            if count[0] == k:
                os.kill(os.getpid(), signal.SIGKILL)
            count[0] += 1

        _util._WRITE_HOOK = hook
        try:
            fn()
        finally:
            os._exit(0)
    _, status = os.waitpid(pid, 0)
    return os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL


def _seed_dir(d, model, shard):
    gemma4.save_pretrained(model, d, **({"max_shard_bytes": shard} if shard else {}))
    (d / "README.md").write_text("my notes\n")
    (d / "tokenizer.json").write_text('{"not": "checked here"}')
    (d / "runs").mkdir()
    (d / "runs" / "log.txt").write_text("step 1\n")


@pytest.mark.parametrize("old_shard,new_shard", [(200_000, None), (None, 200_000), (200_000, 300_000)])
def test_kill_at_every_write_step_leaves_old_or_new(models, tmp_path, old_shard, new_shard):
    a, b = models
    sa = _state(gemma4.load_pretrained(gemma4.save_pretrained(a, tmp_path / "ref_a")))
    sb = _state(gemma4.load_pretrained(gemma4.save_pretrained(b, tmp_path / "ref_b")))
    assert not _same(sa, sb)
    kw = {"max_shard_bytes": new_shard} if new_shard else {}
    probe = tmp_path / "probe"
    _seed_dir(probe, a, old_shard)
    labels = _steps(lambda: gemma4.save_pretrained(b, probe, **kw))
    assert "swap" in labels and len(labels) >= 6, labels
    seen = set()
    for k in range(len(labels)):
        d = tmp_path / f"k{k}"
        _seed_dir(d, a, old_shard)
        assert _killed_at(k, lambda: gemma4.save_pretrained(b, d, **kw)), f"child did not die at step {k}"
        got = _state(gemma4.load_pretrained(d))
        which = "old" if _same(got, sa) else "new" if _same(got, sb) else None
        assert which, f"kill at step {k} ({labels[k]}) left a mixed checkpoint"
        seen.add(which)
        # Files that are not part of the checkpoint survive either way.
        assert (d / "README.md").read_text() == "my notes\n"
        assert (d / "tokenizer.json").exists() and (d / "runs" / "log.txt").read_text() == "step 1\n"
        if which == "new":  # stale shards / index of the old save are gone
            assert bool(list(d.glob("model-*.safetensors"))) == bool(new_shard)
            assert (d / "model.safetensors.index.json").exists() == bool(new_shard)
    assert seen == {"old", "new"}
    # The uninterrupted save: only the new checkpoint's files, plus the user's.
    names = {p.name for p in probe.iterdir() if not p.name.startswith(".")}
    ckpt = {"config.json", "model.safetensors"} if not new_shard else \
        {"config.json", "model.safetensors.index.json"} | {p.name for p in probe.glob("model-*.safetensors")}
    assert names == ckpt | {"README.md", "tokenizer.json", "runs"}
    assert _same(_state(gemma4.load_pretrained(probe)), sb)


def test_reused_directory_sharded_then_single(models, tmp_path):
    """The issue's case: sharded save of A, then a single-file save of B, must load B."""
    a, b = models
    gemma4.save_pretrained(a, tmp_path, max_shard_bytes=200_000)
    assert (tmp_path / "model.safetensors.index.json").exists()
    gemma4.save_pretrained(b, tmp_path)
    assert not (tmp_path / "model.safetensors.index.json").exists()
    assert not list(tmp_path.glob("model-*.safetensors")) and not list(tmp_path.glob(".*.tmp"))
    ref = _state(gemma4.load_pretrained(gemma4.save_pretrained(b, tmp_path / "ref")))
    assert _same(_state(gemma4.load_pretrained(tmp_path)), ref)


def test_quantized_dir_save_is_atomic(tmp_path):
    q = gemma4.quantize(quant_tiny.model("dense", seed=3), "int8")
    ref = _state(gemma4.load_pretrained(gemma4.save_pretrained(q, tmp_path / "q0")))
    d = tmp_path / "q"
    gemma4.save_pretrained(quant_tiny.model("dense", seed=4), d, max_shard_bytes=200_000)
    n = len(_steps(lambda: gemma4.save_pretrained(q, tmp_path / "probe")))
    for k in range(n):
        assert _killed_at(k, lambda: gemma4.save_pretrained(q, d))
        gemma4.load_pretrained(d)  # old or new, always loadable
    gemma4.save_pretrained(q, d)
    assert _same(_state(gemma4.load_pretrained(d)), ref)


def test_save_gguf_and_tokenizer_save_are_atomic(models, tmp_path):
    from gemma4.io.gguf import GGUFFile

    a, b = models
    p = tmp_path / "m.gguf"
    gemma4.save_gguf(a, p)
    before = p.read_bytes()
    n = len(_steps(lambda: gemma4.save_gguf(b, tmp_path / "probe.gguf")))
    after = (tmp_path / "probe.gguf").read_bytes()
    assert n >= 1 and after != before
    for k in range(n):
        assert _killed_at(k, lambda: gemma4.save_gguf(b, p))
        assert p.read_bytes() in (before, after)  # the old file or the complete new one
        assert GGUFFile(p).tensors
    # Tokenizer.save (tokenizer.json) goes through the same temp-file-and-rename.
    from tokenizers import Tokenizer as Backend, models as tk_models
    from gemma4.text.tokenizer import Tokenizer

    tok = Tokenizer(Backend(tk_models.WordLevel({"<unk>": 0, "a": 1}, unk_token="<unk>")))
    t = tmp_path / "tokenizer.json"
    t.write_text("old")
    assert _steps(lambda: tok.save(tmp_path / "probe.json"))
    assert _killed_at(0, lambda: tok.save(t)) and t.read_text() == "old"
    tok.save(t)
    assert json.loads(t.read_text())["model"]["type"] == "WordLevel"


def test_atomic_dir_errors_and_cleanup(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(Gemma4Error, match="a file of that name exists"):
        with _util.atomic_dir(f):
            pass
    d = tmp_path / "d"
    d.mkdir()
    (d / "keep").write_text("1")
    with pytest.raises(RuntimeError):
        with _util.atomic_dir(d) as tmp:
            (tmp / "new").write_text("2")
            raise RuntimeError("boom")
    assert [p.name for p in tmp_path.iterdir()] in (["d", "file"], ["file", "d"])
    assert [p.name for p in d.iterdir()] == ["keep"]
    # default replace="*": the whole directory is the new version
    with _util.atomic_dir(d) as tmp:
        (tmp / "new").write_text("2")
    assert [p.name for p in d.iterdir()] == ["new"]
    # a symlink to a directory stays a symlink; its target gets the new content
    link = tmp_path / "link"
    link.symlink_to(d)
    with _util.atomic_dir(link, replace=()) as tmp:
        (tmp / "newer").write_text("3")
    assert link.is_symlink() and sorted(p.name for p in link.iterdir()) == ["new", "newer"]


# ---------------------------------------------------------------------------- reads stay inside
def _sharded(tmp_path, model, name="ck"):
    d = tmp_path / name
    gemma4.save_pretrained(model, d, max_shard_bytes=200_000)
    return d


def _rewrite_index(d, fn):
    p = d / "model.safetensors.index.json"
    j = json.loads(p.read_text())
    fn(j["weight_map"])
    p.write_text(json.dumps(j))


@pytest.mark.parametrize("bad", ["../elsewhere/model.safetensors", "/etc/passwd", "../../etc/passwd",
                                 "sub/model-00001.safetensors", "..", ".", "", "a\\b.safetensors", 7, None])
def test_index_shard_names_must_be_plain_files(models, tmp_path, bad):
    d = _sharded(tmp_path, models[0])
    (tmp_path / "elsewhere").mkdir()
    first = next(iter(json.loads((d / "model.safetensors.index.json").read_text())["weight_map"]))
    _rewrite_index(d, lambda wm: wm.__setitem__(first, bad))
    with pytest.raises(CheckpointError, match="not a plain file name|not a shard file name"):
        gemma4.load_pretrained(d)


def test_symlinks_escaping_the_checkpoint_are_refused(models, tmp_path):
    d = _sharded(tmp_path, models[0])
    shard = sorted(d.glob("model-*.safetensors"))[0]
    outside = tmp_path / "outside.safetensors"
    shard.rename(outside)
    shard.symlink_to(outside)
    with pytest.raises(CheckpointError, match="symlink .*outside the checkpoint"):
        gemma4.load_pretrained(d)
    # a symlink inside the directory is fine
    inside = d / "real.bin"
    outside.rename(inside)
    shard.unlink()
    shard.symlink_to(inside.name)
    gemma4.load_pretrained(d)
    # config.json pointing outside is refused too
    (tmp_path / "cfg.json").write_text((d / "config.json").read_text())
    (d / "config.json").unlink()
    (d / "config.json").symlink_to(tmp_path / "cfg.json")
    with pytest.raises(CheckpointError, match="config.json is a symlink"):
        gemma4.load_pretrained(d)


def test_hub_cache_snapshot_symlinks_are_allowed(models, tmp_path):
    root = tmp_path / "models--g--x"
    snap, blobs = root / "snapshots" / "abc", root / "blobs"
    blobs.mkdir(parents=True)
    gemma4.save_pretrained(models[0], tmp_path / "src")
    snap.mkdir(parents=True)
    for f in (tmp_path / "src").iterdir():
        f.rename(blobs / f.name)
        (snap / f.name).symlink_to(os.path.relpath(blobs / f.name, snap))
    ref = _state(gemma4.load_pretrained(gemma4.save_pretrained(models[0], tmp_path / "ref")))
    assert _same(_state(gemma4.load_pretrained(snap)), ref)


def test_index_and_shards_must_agree(models, tmp_path):
    d = _sharded(tmp_path, models[0])
    shards = sorted(p.name for p in d.glob("model-*.safetensors"))
    _rewrite_index(d, lambda wm: wm.__setitem__(next(k for k, v in wm.items() if v == shards[0]), shards[1]))
    with pytest.raises(CheckpointError, match="puts tensor .* but (it is in|no shard holds it)"):
        gemma4.load_pretrained(d)
    d2 = _sharded(tmp_path, models[0], "ck2")
    _rewrite_index(d2, lambda wm: wm.pop(next(iter(wm))))
    with pytest.raises(CheckpointError, match="does not list"):
        gemma4.load_pretrained(d2)
    d3 = _sharded(tmp_path, models[0], "ck3")
    (d3 / "model.safetensors.index.json").write_text("[1, 2]")
    with pytest.raises(CheckpointError, match="no 'weight_map'"):
        gemma4.load_pretrained(d3)
    (d3 / "model.safetensors.index.json").write_bytes(b"\xff\xfe{}")
    with pytest.raises(CheckpointError, match="not UTF-8"):
        gemma4.load_pretrained(d3)


# ---------------------------------------------------------------------------- safetensors headers
def _with_header(path, header: dict | list | str, data: bytes = b""):
    raw = header if isinstance(header, str) else json.dumps(header)
    raw = raw.encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


@pytest.mark.parametrize("header,data,message", [
    ([1, 2], b"", "is a JSON list"),
    ({"w": {"dtype": "F32", "shape": [2]}}, b"\0" * 8, "invalid data_offsets"),
    ({"w": {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}}, b"\0" * 8, "invalid data_offsets"),
    ({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0]}}, b"\0" * 8, "invalid data_offsets"),
    ({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, b"\0" * 4, "span 4 bytes.*needs 8"),
    ({"w": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, b"\0" * 4, "invalid shape"),
    ({"w": {"dtype": "F32", "shape": [2.0], "data_offsets": [0, 8]}}, b"\0" * 8, "invalid shape"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
      "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, b"\0" * 12, "overlaps"),
    ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, b"\0" * 8, "gap"),
    ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 8, "bytes after the last tensor"),
    ({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 8, "truncated"),
    ({"a": {"dtype": "Q4", "shape": [1], "data_offsets": [0, 1]}}, b"\0", "unsupported dtype"),
    ({"a": "x"}, b"", "not an object"),
    ({"__metadata__": [1]}, b"", "__metadata__"),
    ('{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, "a": {}}', b"\0" * 4, "appears twice"),
    ("[" * 100_000 + "]" * 100_000, b"", "corrupt header"),
    ('{"a": 1', b"", "corrupt header"),
])
def test_bad_safetensors_headers(tmp_path, header, data, message):
    f = _with_header(tmp_path / "model.safetensors", header, data)
    with pytest.raises(CheckpointError, match=message):
        read_safetensors_header(f)


def test_integer_tensor_for_a_float_weight_is_refused(models, tmp_path):
    from safetensors.torch import load_file, save_file

    gemma4.save_pretrained(models[0], tmp_path)
    st = load_file(str(tmp_path / "model.safetensors"))
    st["model.norm.weight"] = st["model.norm.weight"].to(torch.int32)
    save_file(st, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match="model.norm.weight.*integer dtype torch.int32"):
        gemma4.load_pretrained(tmp_path)


def test_missing_paths_are_named_errors(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint"):
        gemma4.load_pretrained(tmp_path / "nope")
    with pytest.raises(FileNotFoundError):  # still a FileNotFoundError for older except clauses
        gemma4.load_pretrained(tmp_path / "nope")
    with pytest.raises(Gemma4Error, match="max_shard_bytes"):
        gemma4.save_pretrained(quant_tiny.model("dense"), tmp_path / "x", max_shard_bytes=0)


def test_write_errors_are_named(models, tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(Gemma4Error, match="cannot create the directory"):
        gemma4.save_pretrained(models[0], tmp_path / "f" / "sub")
    with pytest.raises(Gemma4Error, match="a file of that name exists"):
        gemma4.save_pretrained(models[0], tmp_path / "f")
    (tmp_path / "d").mkdir()
    with pytest.raises(Gemma4Error, match="a directory of that name exists"):
        gemma4.save_gguf(models[0], tmp_path / "d")
    d = tmp_path / "kept"
    d.mkdir(mode=0o750)
    os.chmod(d, 0o750)
    gemma4.save_pretrained(models[0], d)
    assert (d.stat().st_mode & 0o777) == 0o750
