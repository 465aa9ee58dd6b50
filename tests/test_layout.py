"""The package's rooms and one-way doors (README "Layout"): every import of a gemma4 module, at the top of
a file or inside a function, must follow the table, the modules must form no cycle, and every
``from gemma4.x import y`` must resolve."""

import ast
import importlib
from collections import defaultdict
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "gemma4"

# package -> the packages it may import (besides itself). The README's Layout table says the same.
ALLOWED = {
    "_util": set(),
    "model": {"_util"},
    "quant": {"model", "_util"},
    "infer": {"quant", "model", "_util"},
    "io": {"infer", "quant", "model", "_util"},
    "text": {"io", "infer", "quant", "model", "_util"},
    "train": {"text", "io", "infer", "quant", "model", "_util"},
    "serve": {"text", "io", "infer", "quant", "model", "_util"},
    "align": {"train", "text", "io", "infer", "quant", "model", "_util"},
    "redteam": {"align", "serve", "train", "text", "io", "infer", "quant", "model", "_util"},
    "cli": {"__init__", "redteam", "align", "serve", "train", "text", "io", "infer", "quant", "model", "_util"},
    "__init__": {"text", "io", "infer", "quant", "model", "_util", "train", "serve", "align", "redteam"},
    "__main__": {"cli"},
}
# Only the CLI draws on a terminal or parses command lines.
CLI_ONLY = ("typer", "rich")


def _modules():
    for f in sorted(SRC.rglob("*.py")):
        rel = f.relative_to(SRC.parent).with_suffix("")
        name = ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
        yield name, f


def _package(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1:
        return "__init__"
    return parts[1]


def _imports(path: Path, module: str):
    """(imported module, imported names, line) for every import statement, nested ones included."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    pkg = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                yield a.name, [], node.lineno
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(pkg.split(".")[: len(pkg.split(".")) - node.level + 1] + ([base] if base else []))
            yield base, [a.name for a in node.names], node.lineno


def _edges():
    edges = []
    for module, path in _modules():
        for target, names, line in _imports(path, module):
            if target == "gemma4" or target.startswith("gemma4."):
                edges.append((module, target, names, f"{path.relative_to(SRC.parent)}:{line}"))
    return edges


def test_imports_follow_the_table():
    bad = []
    for src, dst, names, where in _edges():
        a, b = _package(src), _package(dst)
        if dst == "gemma4":  # `from gemma4 import x` means the top-level package
            b = "__init__"
        if a != b and b not in ALLOWED[a]:
            bad.append(f"{where}: {a} -> {b} ({dst})")
    assert not bad, "imports outside the README Layout table:\n" + "\n".join(bad)


def test_no_import_cycles_between_modules():
    graph = defaultdict(set)
    known = {m for m, _ in _modules()}
    for src, dst, names, _ in _edges():
        targets = {f"{dst}.{n}" for n in names if f"{dst}.{n}" in known} or {dst}
        for t in targets:
            if t in known and t != src and not (src.startswith(t + ".")):  # a package importing its own submodule is fine
                graph[src].add(t)
    # A package __init__ re-exports its submodules; edges *into* an __init__ from its own submodules
    # would be a cycle, and those are what this search finds.
    state, stack, cycles = {}, [], []

    def visit(n):
        state[n] = 1
        stack.append(n)
        for m in sorted(graph[n]):
            if state.get(m) == 1:
                cycles.append(stack[stack.index(m):] + [m])
            elif m not in state:
                visit(m)
        stack.pop()
        state[n] = 2

    for n in sorted(known):
        if n not in state:
            visit(n)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_only_the_cli_imports_typer_and_rich():
    bad = []
    for module, path in _modules():
        if _package(module) in ("cli", "__main__"):
            continue
        for target, _, line in _imports(path, module):
            if target.split(".")[0] in CLI_ONLY:
                bad.append(f"{path.relative_to(SRC.parent)}:{line}: {target}")
    assert not bad, "typer/rich outside gemma4.cli:\n" + "\n".join(bad)


def test_every_from_import_resolves():
    missing = []
    for src, dst, names, where in _edges():
        mod = importlib.import_module(dst)
        for n in names:
            if n != "*" and not hasattr(mod, n):
                try:
                    importlib.import_module(f"{dst}.{n}")
                except ImportError:
                    missing.append(f"{where}: from {dst} import {n}")
    assert not missing, "imports that do not resolve:\n" + "\n".join(missing)


@pytest.mark.parametrize("name", ["load", "Gemma4Config", "build_model", "load_pretrained", "save_pretrained", "load_tokenizer",
                                  "render_chat", "parse_response", "generate", "stream", "quantize", "count_parameters",
                                  "estimate_memory", "save_gguf", "load_gguf", "Gemma4Error", "ConfigError",
                                  "CheckpointError", "GGUFError", "QuantizationError", "GenerationError",
                                  "SamplingError", "SamplingParams"])
def test_public_api_is_importable_from_the_package(name):
    import gemma4

    assert hasattr(gemma4, name) and name in gemma4.__all__


def test_every_package_error_is_a_gemma4_error():
    import gemma4

    for name in ("ConfigError", "CheckpointError", "CheckpointNotFoundError", "GGUFError", "QuantizationError",
                 "GenerationError", "SamplingError", "NonFiniteLogitsError", "ChatError", "TokenizerError",
                 "UnknownTokenError", "WriteError"):
        assert issubclass(getattr(gemma4, name), gemma4.Gemma4Error), name


def test_importing_gemma4_has_no_side_effects():
    import subprocess
    import sys

    code = ("import os; before = dict(os.environ); import gemma4, gemma4.cli; "
            "from gemma4.model import ATTENTION_BACKENDS; "
            "assert dict(os.environ) == before, set(os.environ.items()) ^ set(before.items()); "
            "assert sorted(ATTENTION_BACKENDS) == ['block_sparse', 'eager', 'linear', 'sdpa'], sorted(ATTENTION_BACKENDS)")
    subprocess.run([sys.executable, "-c", code], check=True)
