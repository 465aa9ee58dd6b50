"""Import a script of ``benchmarks/`` as a module, for tests of its recipe and bookkeeping."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load_benchmark(filename: str, module_name: str):
    spec = importlib.util.spec_from_file_location(module_name, BENCHMARKS / filename)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up while the class is created
    spec.loader.exec_module(mod)
    return mod
