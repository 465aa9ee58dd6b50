"""Tiny models and a tiny Gemma 4-family tokenizer for the training tests."""

from __future__ import annotations

import string

import torch

import gemma4
from gemma4.text.tokenizer import Tokenizer, build_from_vocab
from gemma4.train.preference import Responses

CONTROL, NORMAL, BYTE, UNKNOWN, USER = 3, 1, 6, 2, 4
SPECIAL = ["<pad>", "<eos>", "<bos>", "<unk>", "<|turn>", "<turn|>", "<|channel>", "<channel|>", "<|think|>",
           "<|tool>", "<tool|>"]
USER_DEFINED = ["<|tool_call>", "<tool_call|>", "<|tool_response>", "<tool_response|>", '<|"|>']


def tiny_tokenizer() -> Tokenizer:
    """~330 tokens: Gemma 4's control tokens, byte fallback, single characters, a few words."""
    chars = list(string.ascii_letters + string.digits + string.punctuation) + ["▁", "\n"]
    words = ["▁the", "▁and", "▁to", "▁of", "he", "th", "in", "er", "an", "re"]
    tokens = SPECIAL + USER_DEFINED + [f"<0x{b:02X}>" for b in range(256)] + chars + words
    types = ([UNKNOWN if t == "<unk>" else CONTROL for t in SPECIAL] + [USER] * len(USER_DEFINED)
             + [BYTE] * 256 + [NORMAL] * (len(chars) + len(words)))
    merges = ["▁ t", "t h", "▁t he", "h e", "a n", "▁ a", "▁a n", "an d", "▁an d", "▁ to", "o f", "▁ of",
              "i n", "e r", "r e", "▁t o", "▁o f"]
    vocab = set(tokens)
    merges = [m for m in merges if "".join(m.split(" ")) in vocab and all(x in vocab for x in m.split(" "))]
    backend = build_from_vocab(tokens, types, merges=merges)
    return Tokenizer(backend, source="tiny test tokenizer")


def tiny_config(kind: str = "ple", vocab_size: int = 384) -> "gemma4.Gemma4Config":
    """Our config of a tiny model (not a transformers one): PLE + KV sharing by default.
    "ple6": the PLE kind with 6 layers (2 KV-sharing consumers), for tests that run many steps."""
    from tiny import TINY, F, S

    d = dict(TINY["ple" if kind == "ple6" else kind])
    if kind == "ple6":
        d.update(num_hidden_layers=6, layer_types=[S, S, F, S, S, F], num_kv_shared_layers=2)
    d["vocab_size"] = vocab_size
    if d.get("vocab_size_per_layer_input"):
        d["vocab_size_per_layer_input"] = vocab_size
    d["model_type"] = "gemma4_text"
    return gemma4.Gemma4Config.from_dict(d)


def tiny_model(kind: str = "ple", seed: int = 0, vocab_size: int = 384, std: float = 0.05):
    m = gemma4.build_model(tiny_config(kind, vocab_size))
    return tame_(gemma4.init_random_(m, seed=seed, std=std), seed)


def tame_(model, seed: int = 0):
    """q/k norm scales in [0.125, 0.375], as tests/tiny.py draws them: Gemma 4 attends with scale 1 over
    RMS-normed q and k, so scales near 1 give attention logits ~head_dim and a near-argmax softmax whose
    choices flip under bf16 rounding (a chaotic toy, unlike trained weights)."""
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("q_norm.weight", "k_norm.weight")):
                p.copy_(torch.empty(p.shape).uniform_(0.125, 0.375, generator=g))
    return model


# Token-id stand-ins for the refusal and a helpful answer, and random prompts (ids 100-379, after <bos>),
# for the preference, constrained and latent-adversarial objectives' tests.
REFUSE = [60, 61, 62, 63, 1]
HELP = [70, 71, 72, 1]


def token_prompts(n: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [[2] + torch.randint(100, 380, (3 + i % 3,), generator=g).tolist() for i in range(n)]


def token_responses(prompts: list[list[int]], answer: list[int]) -> Responses:
    """Each prompt followed by ``answer``, the answer marked as the response."""
    return Responses.from_lists([p + answer for p in prompts],
                                [[False] * len(p) + [True] * len(answer) for p in prompts])
