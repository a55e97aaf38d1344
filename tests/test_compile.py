"""train.compile: the backbone under torch.compile(dynamic=True), checked before training (mtlm.compiled)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

import mtlm
from mtlm.config import RecipeError

needs_cxx = pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                               reason="Inductor on CPU needs a C++ compiler")


def _losses(run):
    return [r["loss/sentiment"] for r in json.loads((run / "metrics.json").read_text())["train"]]


@pytest.mark.slow       # Inductor compiles the forward and backward graphs: minutes on 2 busy cores
@needs_cxx
def test_compiled_training_matches_eager(make_recipe):
    """Same seed, dropout 0: the compiled backbone trains to the same losses as eager (fp32, tolerance for
    Inductor's fused kernels), and the bundle keeps the eager parameter names (it loads and predicts)."""
    common = dict(tasks=("sentiment",), max_steps=4, eval_every=4, dropout=0.0, mixed_precision="no",
                  early_stopping_patience=None)
    eager = mtlm.fit(mtlm.load_recipe(make_recipe(name="eager", **common)), progress=False)
    compiled = mtlm.fit(mtlm.load_recipe(make_recipe(name="compiled", compile=True, **common)), progress=False)
    a, b = _losses(eager), _losses(compiled)
    assert b == pytest.approx(a, rel=1e-3, abs=1e-4)
    assert mtlm.load(compiled / "model").predict([{"text": "great fun"}])[0]["sentiment"]


def test_compile_failure_is_a_recipe_error(make_recipe, monkeypatch):
    """A machine where torch.compile fails (here: the compile call raises) gets a RecipeError naming
    train.compile before any step."""
    def broken(self, *a, **k):
        raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found")
    monkeypatch.setattr(torch.nn.Module, "compile", broken)
    with pytest.raises(RecipeError, match="train.compile: torch.compile failed on this machine .*InvalidCxxCompiler"):
        mtlm.fit(mtlm.load_recipe(make_recipe(tasks=("sentiment",), name="broken", compile=True)), progress=False)
