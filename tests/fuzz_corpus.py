"""Seeded corpus generator and driver for the input fuzz tests (issue 11); run by tests/test_fuzz.py in a
subprocess under an address-space limit.

Every case feeds a mutated file to a loader and classifies the outcome: loaded, refused with one of the
package's errors (a ``Gemma4Error``), or anything else (a bug: a stray ``IndexError``, an unbounded
allocation ending in ``MemoryError``, a hang caught by the per-case alarm, a read outside the checkpoint).

    python tests/fuzz_corpus.py OUT.json [--seed N] [--gguf N] [--safetensors N]
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import struct
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np

INTERESTING = [0, 1, 2, 3, 7, 8, 31, 32, 33, 255, 256, 1023, 1024, 65535, 2**31 - 1, 2**31, 2**32 - 1, 2**32,
               2**33, 2**40, 2**62, 2**63 - 1, 2**63, 2**64 - 1, 2**64 - 32]
S, F = "sliding_attention", "full_attention"
TINY_GEMMA3 = dict(model_type="gemma3_text", vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                   num_attention_heads=2, num_key_value_heads=1, head_dim=8, sliding_window=8, max_position_embeddings=64,
                   query_pre_attn_scalar=8, layer_types=[S, F])
TINY_GEMMA4 = dict(model_type="gemma4_text", vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                   num_attention_heads=2, num_key_value_heads=1, head_dim=8, global_head_dim=16, sliding_window=8,
                   max_position_embeddings=64, layer_types=[S, F], hidden_size_per_layer_input=0,
                   final_logit_softcapping=30.0)


class Hang(Exception):
    pass


def _alarm(signum, frame):
    raise Hang("case took longer than the per-case limit")


# ------------------------------------------------------------------------------------------- seeds
def tiny_vocab(kind: str):
    """A ~300-token Gemma-style vocabulary: control tokens, byte fallback, a few merged pieces."""
    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<start_of_turn>", "<end_of_turn>", "<|turn>", "<turn|>"]
    tokens = specials + ['<|"|>'] + [f"<0x{b:02X}>" for b in range(256)]
    types = [3] * len(specials) + [4] + [6] * 256
    pieces = ["▁", "a", "b", "c", "t", "h", "e", "▁t", "th", "he", "the", "▁the", "ab", "abc"]
    tokens += pieces
    types += [1] * len(pieces)
    scores = [0.0] * (len(tokens) - len(pieces)) + [-float(i) for i in range(len(pieces))]
    merges = ["▁ t", "t h", "h e", "th e", "▁t he", "a b", "ab c"]
    return tokens, types, scores, merges


def write_seed_gguf(path: Path, kind: str) -> Path:
    import gguf

    import gemma4
    from gemma4.io.gguf import GGUFFile

    vocab = path.with_suffix(".vocab.gguf")
    w = gguf.GGUFWriter(str(vocab), "gemma3" if kind == "gemma3" else "gemma4")
    tokens, types, scores, merges = tiny_vocab(kind)
    w.add_tokenizer_model("llama" if kind == "gemma3" else "gemma4")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_scores(scores)
    if kind != "gemma3":
        w.add_token_merges(merges)
    w.add_bos_token_id(2)
    w.add_eos_token_id(1)
    w.add_pad_token_id(0)
    w.add_unk_token_id(3)
    w.add_add_space_prefix(False)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.close()
    cfg = gemma4.Gemma4Config.from_dict(TINY_GEMMA3 if kind == "gemma3" else TINY_GEMMA4)
    model = gemma4.init_random_(gemma4.build_model(cfg), seed=0)
    return gemma4.save_gguf(model, path, vocab_from=GGUFFile(vocab))


class _FieldRecorder:
    """Positions of every 4- and 8-byte field the GGUF parser reads (counts, lengths, types, dims,
    offsets), so integer mutations land on field boundaries."""

    @staticmethod
    def fields(path: Path) -> tuple[list[tuple[int, int]], int]:
        from gemma4.io.gguf import GGUFFile

        seen: list[tuple[int, int]] = []
        orig = GGUFFile._take

        def take(self, n):
            p = orig(self, n)
            if n in (4, 8):
                seen.append((p, n))
            return p

        GGUFFile._take = take
        try:
            g = GGUFFile(path)
        finally:
            GGUFFile._take = orig
        data_start = min((t.offset for t in g.tensors.values()), default=g.size)
        return seen, data_start


def mutate_bytes(rng: random.Random, data: bytes, fields, hot: int) -> bytes:
    b = bytearray(data)
    for _ in range(rng.choice([1, 1, 1, 2, 3, 6])):
        k = rng.random()
        if k < 0.45 and fields:  # an integer field gets an interesting value
            p, n = rng.choice(fields)
            v = rng.choice(INTERESTING)
            if rng.random() < 0.3:
                v = int.from_bytes(b[p:p + n], "little") + rng.choice([-2, -1, 1, 2, 32])
            b[p:p + n] = (v % 2 ** (8 * n)).to_bytes(n, "little")
        elif k < 0.75:  # bit flips and random bytes, mostly in the header
            p = rng.randrange(hot) if rng.random() < 0.9 else rng.randrange(len(b))
            b[p] = b[p] ^ (1 << rng.randrange(8)) if rng.random() < 0.5 else rng.randrange(256)
        elif k < 0.85:  # truncation
            del b[rng.randrange(len(b)):]
            break
        elif k < 0.95:  # insert or delete a few bytes in the header
            p = rng.randrange(hot)
            if rng.random() < 0.5:
                del b[p:p + rng.randrange(1, 9)]
            else:
                b[p:p] = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 9)))
        else:  # a block of 0xFF
            p = rng.randrange(hot)
            b[p:p + 8] = b"\xff" * 8
        if not b:
            break
    return bytes(b)


def random_value(rng: random.Random, n_layers: int):
    """(value, GGUFValueType, sub type) of a random kind: type confusion and hostile sizes."""
    import gguf

    T = gguf.GGUFValueType
    k = rng.randrange(11)
    if k == 0:
        return rng.choice(["x", "", "gemma4", "llama", "1" * 50]), T.STRING, None
    if k == 1:
        return rng.choice(INTERESTING) % 2**32, T.UINT32, None
    if k == 2:
        return rng.choice(INTERESTING) % 2**64, T.UINT64, None
    if k == 3:
        return rng.choice([-1, -(2**31)]), T.INT32, None
    if k == 4:
        return rng.choice([float("nan"), float("inf"), -1.0, 0.0, 1e30, 1e-45, 0.5]), T.FLOAT32, None
    if k == 5:
        return rng.choice([True, False]), T.BOOL, None
    if k == 6:
        n = rng.choice([1, n_layers - 1, n_layers, n_layers + 1, 300])
        return [rng.choice(INTERESTING) % 2**32 for _ in range(n)], T.ARRAY, T.UINT32
    if k == 7:
        n = rng.choice([1, n_layers, 300])
        return [rng.choice(["a", "<bos>", "", "▁"]) for _ in range(n)], T.ARRAY, T.STRING
    if k == 8:
        n = rng.choice([1, n_layers, 300])
        return [rng.choice([-1.0, 0.0, float("nan"), 3.0]) for _ in range(n)], T.ARRAY, T.FLOAT32
    if k == 9:
        return [rng.choice([True, False]) for _ in range(rng.choice([1, n_layers, 5]))], T.ARRAY, T.BOOL
    return -5, T.INT64, None


def mutate_metadata(rng: random.Random, good, path: Path) -> None:
    """Rewrite ``good`` with one or two metadata values replaced by values of random type and size."""
    import gguf

    keys = [k for k in good.fields if k not in ("GGUF.version", "general.architecture")]
    targets = rng.sample(keys, k=min(len(keys), rng.choice([1, 1, 2])))
    extra = rng.random() < 0.15
    w = gguf.GGUFWriter(str(path), good.architecture)
    for k, v in good.fields.items():
        if k in ("GGUF.version", "general.architecture"):
            continue
        if k in targets:
            if rng.random() < 0.15:
                continue  # drop the key
            v2, vt, st = random_value(rng, 2)
            w.add_key_value(k, v2, vt, sub_type=st)
        else:
            vt, et = good.value_types[k]
            w.add_key_value(k, v, gguf.GGUFValueType(vt), sub_type=gguf.GGUFValueType(et) if et is not None else None)
    if extra:  # a key the loader reads but the seed lacks
        k = rng.choice(["general.alignment", f"{good.architecture}.attention.key_length_swa",
                        f"{good.architecture}.expert_count", "tokenizer.ggml.eot_token_id",
                        f"{good.architecture}.attention.query_pre_attn_scalar", f"{good.architecture}.rope.scaling.type"])
        v2, vt, st = random_value(rng, 2)
        w.add_key_value(k, v2, vt, sub_type=st)
    for name, t in good.tensors.items():
        raw = np.array(good.raw(name)).reshape(*t.shape[:-1], -1)  # bytes, rows kept (gguf's raw layout)
        w.add_tensor(name, raw, raw_dtype=gguf.GGMLQuantizationType(t.qtype))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


# -------------------------------------------------------------------------------------- safetensors
def write_seed_dir(d: Path) -> Path:
    import gemma4

    model = gemma4.init_random_(gemma4.build_model(gemma4.Gemma4Config.from_dict(TINY_GEMMA4)), seed=1)
    gemma4.save_pretrained(model, d, max_shard_bytes=4096)
    return d


def _st_split(raw: bytes):
    n = struct.unpack("<Q", raw[:8])[0]
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def _st_join(header, data: bytes, rng: random.Random | None = None, text: str | None = None) -> bytes:
    h = (text if text is not None else json.dumps(header)).encode()
    n = len(h)
    if rng is not None and rng.random() < 0.1:
        n = rng.choice([0, 1, n - 1, n + 1, 2**63, len(h) + len(data) + 100])
    return struct.pack("<Q", n % 2**64) + h + data


def mutate_header(rng: random.Random, raw: bytes) -> bytes:
    header, data = _st_split(raw)
    keys = [k for k in header if k != "__metadata__"]
    k = rng.randrange(14)
    key = rng.choice(keys)
    e = header[key]
    if k == 0:
        e["data_offsets"] = [e["data_offsets"][1], e["data_offsets"][0]]
    elif k == 1:
        e.pop(rng.choice(["data_offsets", "dtype", "shape"]))
    elif k == 2:
        e["shape"] = [rng.choice([-1, 0, 2**40, 2**64, 1.5, "3", None])] + e["shape"][1:]
    elif k == 3:
        e["data_offsets"] = [rng.choice([-1, 0, 3, 2**63, 2**70]), rng.choice([0, 4, 2**63, 2**64 + 4])]
    elif k == 4:
        e["dtype"] = rng.choice(["I32", "I64", "U8", "BOOL", "F8_E4M3", "Q4", 7, None, "F64"])
    elif k == 5:
        header = rng.choice([[1, 2], "str", 5, None, []])
    elif k == 6:
        other = rng.choice(keys)
        e["data_offsets"] = list(header[other]["data_offsets"])  # overlap / duplicate
    elif k == 7:
        header[key] = rng.choice([[1], "x", 3, None, {"dtype": "F32"}])
    elif k == 8:
        header["__metadata__"] = rng.choice([[1], {"a": 1}, "x", {"format": "pt"}])
    elif k == 9:
        e["data_offsets"] = [o + rng.choice([-4, -1, 1, 4]) for o in e["data_offsets"]]
    elif k == 10:
        e["shape"] = list(reversed(e["shape"])) + [1] * rng.randrange(10)
    elif k == 11:
        header["model.layers.99.mlp.up_proj.weight"] = dict(e)
    elif k == 12:
        return _st_join(None, data, text=rng.choice(["[" * 5000, '{"a": {"dtype": "F32"', "\udcff"[:0] + "{}",
                                                     json.dumps(header)[:-3]]))
    else:
        raw = bytearray(_st_join(header, data))
        n = struct.unpack("<Q", raw[:8])[0]
        for _ in range(rng.randrange(1, 4)):
            p = rng.randrange(8 + n)
            raw[p] = rng.randrange(256)
        return bytes(raw)
    return _st_join(header, data, rng)


def mutate_index(rng: random.Random, raw: str) -> str | bytes:
    j = json.loads(raw)
    wm = j["weight_map"]
    key = rng.choice(list(wm))
    k = rng.randrange(10)
    if k == 0:
        wm[key] = rng.choice(["../decoy/" + wm[key], "/etc/passwd", "../../etc/passwd", os.path.abspath("/tmp"),
                              "sub/" + wm[key], "..", ".", "", "a\\b", "decoy_link.safetensors"])
    elif k == 1:
        wm[key] = rng.choice([1, None, [wm[key]], {"a": 1}, True])
    elif k == 2:
        j["weight_map"] = rng.choice([[1], "x", None, 3])
    elif k == 3:
        other = rng.choice(sorted(set(wm.values())))
        wm[key] = other
    elif k == 4:
        wm.pop(key)
    elif k == 5:
        wm["model.extra.weight"] = rng.choice(list(wm.values()))
    elif k == 6:
        return rng.choice([b"\xff\xfe", b"[", b"[1,2]", b'"x"', b"null", b"{" * 3000])
    elif k == 7:
        wm[key] = "missing-shard.safetensors"
    elif k == 8:
        j = rng.choice([[j], "x"])
    else:
        for k2 in wm:
            wm[k2] = "../decoy/" + wm[k2]
    return json.dumps(j)


def mutate_config(rng: random.Random, raw: str) -> str | bytes:
    j = json.loads(raw)
    key = rng.choice(sorted(j))
    k = rng.randrange(8)
    if k == 0:
        j[key] = rng.choice(["x", "no", "", None, [], {}, [1, 2]])
    elif k == 1:
        j[key] = rng.choice([-1, 0, 2**31, 2**33, 10**8, 2**64, 1.5, float("inf")])
    elif k == 2:
        j[key] = rng.choice([True, False])
    elif k == 3:
        j.pop(key)
    elif k == 4:
        return rng.choice([b"\xff{", b"[1, 2]", b'"s"', b"{", b"[" * 5000])
    elif k == 5:
        j["rope_parameters"] = rng.choice([[1], {"full_attention": {"rope_theta": -1}},
                                           {"full_attention": [1]}, {"rope_type": 5}])
    elif k == 6:
        j["per_layer_config"] = rng.choice([{"x": {}}, {"1": {"head_dim": 2**40}}, {"-1": {}}, [1], {"1": 3}])
    else:
        j[rng.choice(["layer_types", "eos_token_id", "text_config"])] = rng.choice(
            [["x"], "sliding", [1], 5, {"model_type": 3}, [F] * 100000])
    return json.dumps(j)


# ------------------------------------------------------------------------------------ tokenizer files
def _pb_varint(v: int) -> bytes:
    out = bytearray()
    while True:
        b = v & 0x7F
        v >>= 7
        out.append(b | (0x80 if v else 0))
        if not v:
            return bytes(out)


def _pb_field(num: int, wire: int, payload) -> bytes:
    key = _pb_varint(num << 3 | wire)
    if wire == 0:
        return key + _pb_varint(payload)
    if wire == 5:
        return key + struct.pack("<f", payload)
    return key + _pb_varint(len(payload)) + payload


def write_seed_sentencepiece(path: Path) -> Path:
    """A SentencePiece ModelProto (BPE with byte fallback) written by hand: pieces, trainer and
    normalizer specs, the fields gemma4's reader understands."""
    tokens, types, scores, _ = tiny_vocab("gemma3")
    types = [2 if t == "<unk>" else ty for t, ty in zip(tokens, types)]
    out = b""
    for t, ty, sc in zip(tokens, types, scores):
        out += _pb_field(1, 2, _pb_field(1, 2, t.encode()) + _pb_field(2, 5, sc) + _pb_field(3, 0, ty))
    trainer = _pb_field(3, 0, 2) + _pb_field(35, 0, 1) + _pb_field(40, 0, 3) + _pb_field(41, 0, 2) + \
        _pb_field(42, 0, 1) + _pb_field(43, 0, 0)
    norm = _pb_field(1, 2, b"identity") + _pb_field(3, 0, 1) + _pb_field(4, 0, 0) + _pb_field(5, 0, 1)
    path.write_bytes(out + _pb_field(2, 2, trainer) + _pb_field(3, 2, norm))
    return path


def mutate_json_doc(rng: random.Random, raw: str) -> str | bytes:
    """Type confusion somewhere inside a JSON document (a tokenizer.json), or broken bytes."""
    if rng.random() < 0.15:
        b = bytearray(raw.encode())
        for _ in range(rng.randrange(1, 4)):
            b[rng.randrange(len(b))] = rng.randrange(256)
        return bytes(b)
    doc = json.loads(raw)
    node, path = doc, []
    for _ in range(rng.randrange(1, 5)):
        if isinstance(node, dict) and node:
            k = rng.choice(sorted(node))
        elif isinstance(node, list) and node:
            k = rng.randrange(len(node))
        else:
            break
        path.append((node, k))
        node = node[k]
    if path:
        parent, k = path[-1]
        parent[k] = rng.choice([None, -1, 2**64, "x", [], {}, [1, "a"], {"a": None}, 1.5, True])
    return json.dumps(doc)


# ------------------------------------------------------------------------------------------ driver
def run(out: Path, seed: int = 0, n_gguf: int = 1000, n_st: int = 500, n_tok: int = 300,
        per_case_s: float = 10.0) -> dict:
    import gemma4
    from gemma4 import Gemma4Error
    from gemma4.io.checkpoint import load_safetensors_dir
    from gemma4.io.gguf import GGUFFile, load_gguf
    from gemma4.text.tokenizer import load_tokenizer

    rng = random.Random(seed)
    signal.signal(signal.SIGALRM, _alarm)
    t0 = time.perf_counter()
    results = {"seed": seed, "cases": {}, "outcomes": {}, "unexpected": []}

    def attempt(family: str, what: str, case: int, fn, must_fail: bool = False):
        signal.setitimer(signal.ITIMER_REAL, per_case_s)
        try:
            fn()
            outcome = "loaded"
            if must_fail:
                results["unexpected"].append({"family": family, "loader": what, "case": case,
                                              "error": "loaded although the checkpoint names a file outside itself"})
        except Gemma4Error:
            outcome = "refused"
        except BaseException as e:  # noqa: BLE001 - the point: anything else is a finding
            if isinstance(e, KeyboardInterrupt):
                raise
            outcome = type(e).__name__
            results["unexpected"].append({"family": family, "loader": what, "case": case, "error": repr(e)[:300],
                                          "where": traceback.format_exc().splitlines()[-3:]})
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
        key = f"{family}/{what}"
        results["outcomes"].setdefault(key, {}).setdefault(outcome, 0)
        results["outcomes"][key][outcome] += 1

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        # ---- GGUF: byte-level and metadata-level mutations, through the model and tokenizer loaders
        seeds = {kind: write_seed_gguf(tmp / f"seed_{kind}.gguf", kind) for kind in ("gemma3", "gemma4")}
        for kind, p in seeds.items():  # the seeds themselves load
            load_gguf(p)
            load_tokenizer(p)
        info = {kind: (p.read_bytes(), *_FieldRecorder.fields(p), GGUFFile(p)) for kind, p in seeds.items()}
        case_path = tmp / "case.gguf"
        for i in range(n_gguf):
            kind = "gemma3" if i % 2 else "gemma4"
            data, fields, hot, good = info[kind]
            if rng.random() < 0.7:
                case_path.write_bytes(mutate_bytes(rng, data, fields, hot))
            else:
                mutate_metadata(rng, good, case_path)
            attempt("gguf", "load_gguf", i, lambda: load_gguf(case_path))
            attempt("gguf", "load_tokenizer", i, lambda: load_tokenizer(case_path))
        results["cases"]["gguf"] = n_gguf

        # ---- safetensors directories: shard headers, index, config
        base = write_seed_dir(tmp / "base")
        decoy = tmp / "decoy"
        shutil.copytree(base, decoy)
        load_safetensors_dir(base)
        shards = sorted(p.name for p in base.glob("model-*.safetensors"))
        for i in range(n_st):
            d = tmp / "st_case"
            if d.exists():
                shutil.rmtree(d)
            shutil.copytree(base, d)
            (d / "decoy_link.safetensors").symlink_to(decoy / shards[0])
            r = rng.random()
            must_fail = False
            if r < 0.6:
                f = d / rng.choice(shards)
                f.write_bytes(mutate_header(rng, f.read_bytes()))
            elif r < 0.85:
                new = mutate_index(rng, (d / "model.safetensors.index.json").read_text())
                must_fail = isinstance(new, str) and ("../" in new or "decoy_link" in new or "/etc" in new)
                p = d / "model.safetensors.index.json"
                p.write_bytes(new) if isinstance(new, bytes) else p.write_text(new)
            else:
                new = mutate_config(rng, (d / "config.json").read_text())
                p = d / "config.json"
                p.write_bytes(new) if isinstance(new, bytes) else p.write_text(new)
            attempt("safetensors", "load_safetensors_dir", i, lambda: load_safetensors_dir(d), must_fail=must_fail)
        results["cases"]["safetensors"] = n_st

        # ---- tokenizer files: SentencePiece protobuf bytes, tokenizer.json documents
        spm = write_seed_sentencepiece(tmp / "seed.model")
        load_tokenizer(spm)
        spm_data = spm.read_bytes()
        spm_fields = [(i, 1) for i in range(len(spm_data))]
        tj_dir = tmp / "tj"
        tj_dir.mkdir()
        load_tokenizer(seeds["gemma4"]).save(tj_dir / "tokenizer.json")
        tj_raw = (tj_dir / "tokenizer.json").read_text()
        load_tokenizer(tj_dir / "tokenizer.json")
        for i in range(n_tok):
            if i % 2:
                p = tmp / "case.model"
                p.write_bytes(mutate_bytes(rng, spm_data, [], len(spm_data)))
            else:
                p = tj_dir / "tokenizer.json"
                new = mutate_json_doc(rng, tj_raw)
                p.write_bytes(new) if isinstance(new, bytes) else p.write_text(new)
            attempt("tokenizer_files", "load_tokenizer", i, lambda: load_tokenizer(p))
        results["cases"]["tokenizer_files"] = n_tok
    results["seconds"] = round(time.perf_counter() - t0, 1)
    out.write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument("out", type=Path)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--gguf", type=int, default=1000)
    ap.add_argument("--safetensors", type=int, default=500)
    ap.add_argument("--tokenizer-files", type=int, default=300)
    a = ap.parse_args()
    r = run(a.out, a.seed, a.gguf, a.safetensors, a.tokenizer_files)
    print(json.dumps({k: r[k] for k in ("cases", "outcomes", "seconds")}), f"unexpected={len(r['unexpected'])}")
    sys.exit(1 if r["unexpected"] else 0)
