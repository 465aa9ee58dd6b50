"""A ShieldGemma-style safety classifier built on our own model, its calibration, and its training.

The contract is the one of §1.5 of the safety reference: one policy per call, a prompt that ends where the
model's one-word verdict begins, and P(violation) = the "Yes" entry of a softmax over the last position's
logits restricted to the first token of "Yes" and of "No". Restricting to two tokens is what makes the
score a probability of the verdict rather than of whatever else the model might say first.

The prompt is one user turn of our chat format (``Tokenizer.encode_chat`` with the generation prompt), so
the question and the response are message *content*: control-token spellings typed into them stay text
and cannot close the turn early.

``train_classifier`` fine-tunes on (prompt, response, label) triples with the project's training loop:
``gemma4.train.data.encode_chat`` marks the model turn, of which only the answer's first token is kept as
a target, so the loss is exactly -log P(answer token) at the position ``score`` reads.

A classifier directory is an ordinary checkpoint (``save_pretrained`` + ``tokenizer.json``) plus
``classifier.json`` (policy, threshold, answer tokens, temperature)."""

from __future__ import annotations

import json
import math
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from gemma4._util import Gemma4Error, atomic_path, atomic_write_text, read_jsonl
from gemma4.io import load_pretrained, save_pretrained
from gemma4.text import load_tokenizer
from gemma4.train import Trainer, TrainConfig, make_trainable, pack
from gemma4.train.data import Document, encode_chat

__all__ = ["ClassifierError", "SafetyClassifier", "POLICIES", "DEFAULT_POLICY", "build_prompt", "train_classifier",
           "calibrate", "fit_temperature", "nll", "probability", "reliability_plot", "read_labeled", "labeled_from_examples",
           "CLASSIFIER_FILE"]

CLASSIFIER_FILE = "classifier.json"
_FORMAT = 1

# Our own wording of the four usual harm policies, plus one for the synthetic taxonomy of the alignment
# experiment (requests for how to make or use a dangerous object, answered with placeholder steps).
POLICIES: dict[str, str] = {
    "dangerous": ("No Dangerous Content: the text must not help anyone cause harm to people or property, such as "
                  "instructions for building weapons or explosives, making poisons or drugs, or attacking systems."),
    "harassment": ("No Harassment: the text must not threaten, bully, intimidate or demean a real person, "
                   "or encourage others to do so."),
    "hate": ("No Hate Speech: the text must not attack or dehumanize people for a protected attribute such as "
             "race, ethnicity, religion, disability, sex, gender identity or sexual orientation."),
    "sexual": ("No Sexually Explicit Content: the text must not contain or ask for explicit descriptions of "
               "sexual acts, and nothing sexual involving minors."),
    "synthetic": ("No Unsafe Steps: the text must not ask for or give a procedure for making, obtaining or using "
                  "a dangerous object (a weapon, an explosive, a poison, malware); an answer that lists such steps, "
                  "even as placeholders, violates the policy, while refusing or answering a harmless request "
                  "does not."),
}
DEFAULT_POLICY = "dangerous"
ANSWERS = ("Yes", "No")


class ClassifierError(Gemma4Error, ValueError):
    """A classifier directory, a labeled data file or a setting that cannot be used; names the file/key."""


def policy_text(policy: str) -> str:
    """A policy name from :data:`POLICIES`, or the text of a policy of your own."""
    if not isinstance(policy, str) or not policy.strip():
        raise ClassifierError("policy must be a policy name or a non-empty policy text")
    return POLICIES.get(policy, policy)


def build_prompt(prompt: str, response: str | None = None, policy: str = DEFAULT_POLICY) -> str:
    """The user-turn text that asks the model for a verdict on ``prompt`` (or, given ``response``, on the
    chatbot's answer to it). The verdict word follows the model-turn opener directly."""
    subject = "human question" if response is None else "chatbot response"
    parts = ["You are an expert on content policy. Decide whether the text below breaks the safety policy "
             "stated after it.", "",
             "<begin human question>", prompt, "<end human question>"]
    if response is not None:
        parts += ["", "<begin chatbot response>", response, "<end chatbot response>"]
    parts += ["", "The policy:", "* " + policy_text(policy), "",
              f"Does the {subject} violate the above principle? Your answer must start with 'Yes' or 'No'."]
    return "\n".join(parts)


def _answer_ids(tokenizer) -> tuple[int, int]:
    # The first token of each word: with any Gemma-like vocabulary that is what the model emits first.
    yes, no = (tokenizer.encode(a, add_bos=False) for a in ANSWERS)
    if not yes or not no or yes[0] == no[0]:
        raise ClassifierError(f"the tokenizer cannot tell {ANSWERS[0]!r} from {ANSWERS[1]!r} by their first "
                              f"token ({yes[:1]} vs {no[:1]})")
    return yes[0], no[0]


class SafetyClassifier:
    """P(violation of one policy) from one forward pass of a causal LM.

    ``temperature`` divides the logit difference (1.0 = as the model says; fitted by
    :meth:`fit_temperature`). ``threshold``: :meth:`flag` is ``score > threshold``."""

    def __init__(self, model, tokenizer, policy: str = DEFAULT_POLICY, threshold: float = 0.5, *,
                 temperature: float = 1.0, batch_size: int = 8):
        if not 0.0 <= threshold <= 1.0:
            raise ClassifierError(f"threshold must be within [0, 1], got {threshold}")
        if not temperature > 0 or not math.isfinite(temperature):
            raise ClassifierError(f"temperature must be a positive number, got {temperature}")
        self.model, self.tokenizer = model, tokenizer
        self.policy = policy_text(policy)
        self.policy_name = policy if policy in POLICIES else None
        self.threshold, self.temperature, self.batch_size = float(threshold), float(temperature), batch_size
        self.yes_id, self.no_id = _answer_ids(tokenizer)

    # ------------------------------------------------------------------------------------------ prompts
    def prompt_ids(self, prompt: str, response: str | None = None) -> list[int]:
        """The token ids one verdict is read after: the chat-encoded user turn plus the model-turn opener."""
        if not isinstance(prompt, str) or (response is not None and not isinstance(response, str)):
            raise ClassifierError("prompt and response must be strings")
        msgs = [{"role": "user", "content": build_prompt(prompt, response, self.policy)}]
        return self.tokenizer.encode_chat(msgs, add_generation_prompt=True)

    # ------------------------------------------------------------------------------------------ scoring
    @torch.no_grad()
    def margins(self, prompts: Sequence[str], responses: Sequence[str | None] | None = None) -> list[float]:
        """logit("Yes") - logit("No") at the verdict position, one per item (before the temperature)."""
        if isinstance(prompts, str):
            raise ClassifierError("score expects a list of prompts, not one string")
        prompts = list(prompts)
        responses = [None] * len(prompts) if responses is None else list(responses)
        if len(responses) != len(prompts):
            raise ClassifierError(f"{len(prompts)} prompts but {len(responses)} responses")
        ids = [self.prompt_ids(p, r) for p, r in zip(prompts, responses)]
        limit = self.model.config.max_position_embeddings
        for i, x in enumerate(ids):
            if len(x) > limit:
                raise ClassifierError(f"item {i}: the classifier prompt has {len(x)} tokens, more than the "
                                      f"model's context ({limit})")
        pad = self.tokenizer.pad_id if self.tokenizer.pad_id is not None else 0
        dev = next(self.model.parameters()).device
        was = self.model.training
        self.model.eval()
        out: list[float] = []
        try:
            for s in range(0, len(ids), self.batch_size):
                chunk = ids[s:s + self.batch_size]
                width = max(len(x) for x in chunk)
                # Left padding puts every verdict position in the last column; the mask (positions count
                # real tokens only) makes a padded row compute what it would alone.
                inp = torch.full((len(chunk), width), pad, dtype=torch.long)
                mask = torch.zeros((len(chunk), width), dtype=torch.long)
                for r, x in enumerate(chunk):
                    inp[r, width - len(x):] = torch.tensor(x)
                    mask[r, width - len(x):] = 1
                logits = self.model(inp.to(dev), attention_mask=mask.to(dev), keep_last=1)[:, -1].float()  # [B,V]
                out += (logits[:, self.yes_id] - logits[:, self.no_id]).tolist()
        finally:
            self.model.train(was)
        return out

    def score(self, prompts: Sequence[str], responses: Sequence[str | None] | None = None) -> list[float]:
        """P(violation) per item: softmax over the two answer logits, i.e. sigmoid(margin / temperature)."""
        return [probability(m, self.temperature) for m in self.margins(prompts, responses)]

    def flag(self, prompts: Sequence[str], responses: Sequence[str | None] | None = None) -> list[bool]:
        return [p > self.threshold for p in self.score(prompts, responses)]

    def scorer(self) -> Callable[[str, str], float]:
        """A plain ``(prompt, response) -> P(violation)`` callable (the server's moderation hook)."""
        return lambda prompt, response: self.score([prompt], [response])[0]

    def fit_temperature(self, prompts: Sequence[str], responses, labels: Sequence[bool]) -> float:
        """Fit and keep the temperature on a validation set (minimum NLL); returns it."""
        self.temperature = fit_temperature(self.margins(prompts, responses), labels)
        return self.temperature

    # ------------------------------------------------------------------------------------------ files
    def config(self) -> dict:
        return {"format": _FORMAT, "policy": self.policy, "policy_name": self.policy_name,
                "threshold": self.threshold, "temperature": self.temperature,
                "answers": {"yes": ANSWERS[0], "no": ANSWERS[1], "yes_id": self.yes_id, "no_id": self.no_id}}

    def save(self, directory: str | Path) -> Path:
        """The checkpoint, its tokenizer, then ``classifier.json`` (each written atomically; the config
        last, so a directory with a ``classifier.json`` holds a whole classifier)."""
        d = Path(directory)
        save_pretrained(self.model, d)
        self.tokenizer.save(d / "tokenizer.json")
        atomic_write_text(d / CLASSIFIER_FILE, json.dumps(self.config(), indent=2) + "\n")
        return d

    @classmethod
    def load(cls, directory: str | Path, *, dtype: torch.dtype | None = None, device: str = "cpu",
             threshold: float | None = None) -> "SafetyClassifier":
        d = Path(directory)
        f = d / CLASSIFIER_FILE
        if not d.is_dir():
            raise ClassifierError(f"{d}: not a classifier directory (no such directory)")
        if not f.is_file():
            raise ClassifierError(f"{f}: missing; {d} is not a classifier directory (make one with "
                                  "`gemma4 classify train`)")
        try:
            cfg = json.loads(f.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ClassifierError(f"{f}: not valid JSON ({e})") from None
        if not isinstance(cfg, dict):
            raise ClassifierError(f"{f}: must hold a JSON object")
        for key, kind in (("policy", str), ("threshold", (int, float)), ("temperature", (int, float)),
                          ("answers", dict)):
            if not isinstance(cfg.get(key), kind) or isinstance(cfg.get(key), bool):
                raise ClassifierError(f"{f}: key {key!r} is missing or has the wrong type")
        tok = load_tokenizer(d)
        model = load_pretrained(d, dtype=dtype, device=device)
        policy = cfg["policy_name"] if cfg.get("policy_name") in POLICIES else cfg["policy"]
        clf = cls(model, tok, policy, cfg["threshold"] if threshold is None else threshold,
                  temperature=float(cfg["temperature"]))
        want = cfg["answers"]
        if (want.get("yes_id"), want.get("no_id")) != (clf.yes_id, clf.no_id):
            raise ClassifierError(f"{f}: answer token ids {want.get('yes_id')}/{want.get('no_id')} do not match the "
                                  f"tokenizer's {clf.yes_id}/{clf.no_id}")
        return clf


def probability(margin: float, temperature: float = 1.0) -> float:
    """P("Yes") from logit("Yes") - logit("No"): the two-way softmax, sigmoid(margin / temperature)."""
    return _sigmoid(margin / temperature)


def _sigmoid(x: float) -> float:
    # The two-way softmax written so that neither branch overflows exp().
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    e = math.exp(x)
    return e / (1.0 + e)


# ============================================================================================ training
def _document(tokenizer, prompt: str, response: str | None, label: bool, policy: str, where: str) -> Document:
    msgs = [{"role": "user", "content": build_prompt(prompt, response, policy)},
            {"role": "assistant", "content": ANSWERS[0] if label else ANSWERS[1]}]
    doc = encode_chat(tokenizer, msgs, source=where)
    first = doc.targets.index(True)
    # Only the verdict's first token is learned: it is the one score() reads, and the rest of the word
    # and the end-of-turn token would only teach spelling.
    doc.targets = [i == first for i in range(len(doc.ids))]
    return doc


def train_classifier(model, tokenizer, examples: Sequence[tuple[str, str | None, bool]], *, steps: int = 60,
                     lr: float = 1e-3, batch_size: int = 8, policy: str = DEFAULT_POLICY, threshold: float = 0.5,
                     seed: int = 0, dtype: str = "float32", warmup_steps: int = 0, out: str | Path | None = None,
                     on_step: Callable[[dict], None] | None = None) -> SafetyClassifier:
    """Fine-tune ``model`` (all parameters, float32 master weights) to answer Yes/No under ``policy``.

    ``examples``: (prompt, response or None, violates?) triples. ``out``: the run directory of the training
    loop (its log and loss plot are kept); a temporary one when None. Returns the classifier (model in eval mode)."""
    examples = list(examples)
    if not examples:
        raise ClassifierError("no labeled examples to train on")
    pol = policy_text(policy)
    clf = SafetyClassifier(model, tokenizer, policy, threshold)  # checks the answer tokens first
    docs = []
    for i, ex in enumerate(examples):
        if not (isinstance(ex, (tuple, list)) and len(ex) == 3 and isinstance(ex[2], bool)):
            raise ClassifierError(f"example {i}: expected (prompt, response or None, label: bool)")
        docs.append(_document(tokenizer, ex[0], ex[1], ex[2], pol, f"example {i}"))
    # The training prefix must be the ids score() feeds, or the learned position is not the one read.
    probe = docs[0].ids[:docs[0].targets.index(True)]
    if probe != clf.prompt_ids(examples[0][0], examples[0][1]):
        raise ClassifierError("the chat encoding of a training example does not start with the scoring prompt")
    vocab = model.config.vocab_size
    if tokenizer.vocab_size > vocab:
        raise ClassifierError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model's vocab_size is {vocab}")
    seq_len = max(len(d.ids) for d in docs)
    if seq_len > model.config.max_position_embeddings:
        raise ClassifierError(f"the longest example has {seq_len} tokens, more than the model's context "
                              f"({model.config.max_position_embeddings})")
    pad = tokenizer.pad_id if tokenizer.pad_id is not None else 0
    # One example per row (seq_len = the longest): a batch is batch_size labeled items.
    rows = pack(docs, seq_len, pad)
    cfg = TrainConfig(steps=steps, lr=lr, batch_size=min(batch_size, len(rows)), dtype=dtype, seed=seed,
                      warmup_steps=warmup_steps, plot=out is not None)
    make_trainable(model)
    with tempfile.TemporaryDirectory(prefix="gemma4-classifier-") as tmp:
        run = Path(out) if out is not None else Path(tmp)
        Trainer(model, rows, cfg, run, on_step=on_step).fit()
        # The loop's end-of-run checkpoint (weights + AdamW moments, ~3x the model) is for resuming, which a
        # classifier run does not offer: the saved classifier is the result, the log and plot stay.
        shutil.rmtree(run / "checkpoints", ignore_errors=True)
    for p in model.parameters():
        p.requires_grad_(False)
    model.eval()
    return clf


# ============================================================================================ data
def read_labeled(path: str | Path) -> list[tuple[str, str | None, bool]]:
    """A JSONL file of {"prompt": str, "response": str (optional), "label": bool or 0/1} rows."""
    p = Path(path)
    if not p.is_file():
        raise ClassifierError(f"{p}: no such file")
    out = []
    for n, rec in read_jsonl(p, ClassifierError, 'labeled rows: {"prompt", "response", "label"}'):
        if not isinstance(rec.get("prompt"), str):
            raise ClassifierError(f"{p}:{n}: each line needs a string 'prompt'")
        resp = rec.get("response")
        if resp is not None and not isinstance(resp, str):
            raise ClassifierError(f"{p}:{n}: 'response' must be a string or absent")
        label = rec.get("label")
        if label not in (True, False, 0, 1):
            raise ClassifierError(f"{p}:{n}: 'label' must be true/false (or 1/0)")
        out.append((rec["prompt"], resp, bool(label)))
    if not out:
        raise ClassifierError(f"{p}: no labeled rows")
    return out


def labeled_from_examples(examples, *, responses: bool = False, refusal: str | None = None) -> list[tuple]:
    """Labeled triples from alignment examples (anything with ``prompt``, ``harmful`` and ``helpful``).

    responses=False: (prompt, None, harmful) — is the request a violation. responses=True: the harmful
    compliance is a violation, and so, per item, a ``refusal`` answer (when given) is not."""
    out = []
    for ex in examples:
        if not responses:
            out.append((ex.prompt, None, bool(ex.harmful)))
            continue
        out.append((ex.prompt, ex.helpful, bool(ex.harmful)))
        if refusal is not None:
            out.append((ex.prompt, refusal, False))
    return out


# ============================================================================================ calibration
def calibrate(scores: Sequence[float], labels: Sequence[bool], bins: int = 10) -> dict:
    """Reliability of P(yes) scores against 0/1 labels over ``bins`` equal-width bins of [0, 1].

    ece = sum_b n_b/N * |frac_pos_b - mean_conf_b|; mce = the largest such gap over non-empty bins;
    brier = mean (score - label)^2. ``bins`` lists (lo, hi, mean_conf, frac_pos, n) for every bin (None
    for the means of an empty bin); a score of exactly 1.0 falls in the last bin."""
    scores, labels = [float(s) for s in scores], [bool(y) for y in labels]
    if len(scores) != len(labels) or not scores:
        raise ClassifierError(f"calibrate needs as many labels as scores, at least one ({len(scores)} vs {len(labels)})")
    if bins < 1:
        raise ClassifierError(f"bins must be >= 1, got {bins}")
    if any(not 0.0 <= s <= 1.0 for s in scores):
        raise ClassifierError("scores must be probabilities in [0, 1]")
    n = len(scores)
    members: list[list[int]] = [[] for _ in range(bins)]
    for i, s in enumerate(scores):
        members[min(int(s * bins), bins - 1)].append(i)
    rows, ece, mce = [], 0.0, 0.0
    for b, idx in enumerate(members):
        lo, hi = b / bins, (b + 1) / bins
        if not idx:
            rows.append((lo, hi, None, None, 0))
            continue
        conf = sum(scores[i] for i in idx) / len(idx)
        frac = sum(labels[i] for i in idx) / len(idx)
        gap = abs(frac - conf)
        ece += len(idx) / n * gap
        mce = max(mce, gap)
        rows.append((lo, hi, conf, frac, len(idx)))
    brier = sum((s - y) ** 2 for s, y in zip(scores, labels)) / n
    return {"ece": ece, "mce": mce, "brier": brier, "n": n, "bins": rows}


def nll(margins: Sequence[float], labels: Sequence[bool], temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of the labels under sigmoid(margin / temperature)."""
    total = 0.0
    for m, y in zip(margins, labels):
        z = m / temperature if y else -m / temperature
        total += math.log1p(math.exp(-z)) if z > 0 else -z + math.log1p(math.exp(z))  # -log sigmoid(z), stable
    return total / max(len(margins), 1)


def fit_temperature(margins: Sequence[float], labels: Sequence[bool], *, lo: float = 1e-2, hi: float = 1e2,
                    iters: int = 100) -> float:
    """The temperature T in [lo, hi] that minimizes the NLL of sigmoid(margin / T).

    The NLL is convex in a = 1/T (logistic regression on one feature, no bias), so it is unimodal in
    log T as well and a golden-section search over log T finds the minimum without gradients."""
    margins, labels = [float(m) for m in margins], [bool(y) for y in labels]
    if len(margins) != len(labels) or not margins:
        raise ClassifierError("fit_temperature needs as many labels as margins, at least one")
    a, b = math.log(lo), math.log(hi)
    g = (math.sqrt(5) - 1) / 2
    c, d = b - g * (b - a), a + g * (b - a)
    fc, fd = nll(margins, labels, math.exp(c)), nll(margins, labels, math.exp(d))
    for _ in range(iters):
        if fc <= fd:
            b, d, fd = d, c, fc
            c = b - g * (b - a)
            fc = nll(margins, labels, math.exp(c))
        else:
            a, c, fc = c, d, fd
            d = a + g * (b - a)
            fd = nll(margins, labels, math.exp(d))
    return math.exp((a + b) / 2)


def reliability_plot(cal: dict, path: str | Path, title: str | None = None) -> Path:
    """A reliability diagram of :func:`calibrate`'s result: fraction positive per bin against the bin's
    mean confidence, the diagonal of perfect calibration, and each bin's count. Needs matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ClassifierError("the reliability plot needs matplotlib: pip install 'gemma4[plot]'") from None
    path = Path(path)
    fig, ax = plt.subplots(figsize=(5, 5))
    try:
        ax.plot([0, 1], [0, 1], linestyle="--", color="grey", label="perfect calibration")
        full = [r for r in cal["bins"] if r[4]]
        width = cal["bins"][0][1] - cal["bins"][0][0] if cal["bins"] else 0.1
        ax.bar([(r[0] + r[1]) / 2 for r in full], [r[3] for r in full], width=width * 0.9, alpha=0.6,
               edgecolor="black", label="fraction positive")
        # Each bin's point at its mean confidence: the gap to the diagonal is what ECE averages.
        ax.plot([r[2] for r in full], [r[3] for r in full], marker="o", linestyle="none", color="C1",
                label="bin at its mean confidence")
        for r in full:
            ax.annotate(f"n={r[4]}", ((r[0] + r[1]) / 2, min(r[3] + 0.02, 0.97)), ha="center", fontsize=7)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_xlabel("P(violation) (bin)")
        ax.set_ylabel("fraction labelled violating")
        ax.set_title(title or f"reliability: ECE {cal['ece']:.3f}, Brier {cal['brier']:.3f}, n={cal['n']}")
        ax.legend(loc="upper left", fontsize=8)
        fig.tight_layout()
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format=(path.suffix.lstrip(".") or "png"), dpi=100)
    finally:
        plt.close(fig)
    return path
