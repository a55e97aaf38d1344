"""Load a script of benchmarks/ as a module, as `python benchmarks/<name>.py` would see it (its folder on
sys.path, so its sibling imports work), for tests of a benchmark's pieces."""

from __future__ import annotations

import importlib.util
from pathlib import Path

BENCH = Path(__file__).parents[1] / "benchmarks"


def load_bench(name: str, monkeypatch):
    """benchmarks/<name>.py as a fresh module; monkeypatch puts benchmarks/ on sys.path for the test only."""
    monkeypatch.syspath_prepend(str(BENCH))
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
