"""Recipe parsing: a valid recipe, dotted overrides, and every problem of an invalid recipe in one error."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from mtlm.config import Recipe, RecipeError, apply_overrides
from mtlm.recipe import load_recipe, parse_recipe


def valid_recipe() -> dict:
    return {
        "name": "support-desk",
        "backbone": "minilm-l6",
        "pooling": "mean",
        "max_length": 64,
        "tasks": {
            "sentiment": {"type": "classification", "data": {"train": "reviews.csv", "dev": "reviews_dev.csv"},
                          "columns": {"text": "review", "label": "stars"}, "metric": "macro_f1"},
            "nli": {"type": "classification", "data": {"train": "builtin:snli"},
                    "columns": {"text": "premise", "text_pair": "hypothesis", "label": "label"}},
            "emotions": {"type": "multilabel", "data": {"train": "emo.jsonl", "split": {"dev": 0.2}},
                         "label_separator": "|", "threshold": 0.3},
            "stars": {"type": "regression", "data": {"train": "stars.jsonl"}, "columns": {"score": "rating"},
                      "metric": "spearman", "weight": 2},
            "ner": {"type": "token_classification", "data": {"train": "ner.jsonl"},
                    "on_bad_rows": "skip"},
        },
        "train": {"batch_size": 16, "max_steps": 300, "lr": 5.0e-5, "sampling": "temperature",
                  "temperature": 3, "mixed_precision": "bf16", "eval_every": 50, "seed": 7},
    }


def write(path: Path, data) -> Path:
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


def problems_of(raw, overrides=()) -> list[str]:
    with pytest.raises(RecipeError) as info:
        parse_recipe(raw, Path("."), list(overrides))
    err = info.value
    # ONE error whose message repeats every problem line
    for p in err.problems:
        assert f"  - {p}" in str(err)
    assert f"({len(err.problems)} problem" in str(err)
    return err.problems


def test_valid_recipe_parses(tmp_path):
    path = write(tmp_path / "recipe.yaml", valid_recipe())
    r = load_recipe(path)
    assert isinstance(r, Recipe)
    assert r.name == "support-desk" and r.pooling == "mean" and r.max_length == 64
    assert list(r.tasks) == ["sentiment", "nli", "emotions", "stars", "ner"]
    s = r.tasks["sentiment"]
    assert s.type == "classification" and s.metric == "macro_f1" and s.weight == 1.0
    assert s.columns == {"text": "review", "label": "stars"}
    assert s.data.train == "reviews.csv" and s.data.dev == "reviews_dev.csv" and s.data.test is None
    assert s.data.split == {"dev": 0.1, "test": 0.1} and s.on_bad_rows == "error"
    assert r.tasks["emotions"].data.split == {"dev": 0.2}
    assert r.tasks["emotions"].label_separator == "|" and r.tasks["emotions"].threshold == 0.3
    assert r.tasks["stars"].weight == 2.0 and isinstance(r.tasks["stars"].weight, float)
    assert r.tasks["ner"].on_bad_rows == "skip"
    t = r.train
    assert (t.batch_size, t.max_steps, t.epochs, t.seed, t.eval_every) == (16, 300, None, 7, 50)
    assert t.lr == pytest.approx(5e-5) and t.temperature == 3.0 and t.sampling == "temperature"
    assert t.mixed_precision == "bf16"
    # relative paths resolve against the recipe's folder, not the working directory
    assert r.base_dir == tmp_path.resolve()


def test_defaults_and_run_dir(tmp_path, monkeypatch):
    raw = {"name": "mini", "tasks": {"t": {"type": "regression", "data": {"train": "a.csv"}}}}
    r = parse_recipe(raw, tmp_path)
    assert r.backbone == "minilm-l6" and r.pooling == "mean" and r.max_length == 128
    assert r.train.max_steps == 1000 and r.train.epochs is None      # neither given -> default step budget
    assert r.train.batch_size == 32 and r.train.sampling == "proportional" and r.train.mixed_precision == "auto"
    monkeypatch.chdir(tmp_path)
    assert r.run_dir() == tmp_path / "runs" / "mini"
    r2 = parse_recipe({**raw, "output_dir": str(tmp_path / "elsewhere")}, tmp_path)
    assert r2.run_dir() == tmp_path / "elsewhere"
    r3 = parse_recipe({**raw, "train": {"epochs": 2}}, tmp_path)
    assert r3.train.epochs == 2.0 and r3.train.max_steps is None


def test_to_yaml_round_trips(tmp_path):
    r = load_recipe(write(tmp_path / "r.yaml", valid_recipe()))
    again = parse_recipe(yaml.safe_load(r.to_yaml()), tmp_path)
    assert again.model_dump() == r.model_dump()


def test_dotted_overrides_apply_and_are_typed(tmp_path):
    path = write(tmp_path / "recipe.yaml", valid_recipe())
    r = load_recipe(path, ["train.lr=3e-5", "tasks.nli.weight=0.5", "train.batch_size=8",
                           "tasks.nli.columns.text_pair=hyp2",        # new key under an existing mapping
                           "train.scheduler=cosine",                  # new key (default before)
                           "train.max_steps=null", "train.epochs=1.5",
                           "train.max_grad_norm=null", "pooling=cls",
                           "tasks.extra.type=regression",             # a whole new task
                           "tasks.extra.data.train=more.jsonl"])
    assert r.train.lr == pytest.approx(3e-5) and isinstance(r.train.lr, float)
    assert r.tasks["nli"].weight == 0.5 and isinstance(r.tasks["nli"].weight, float)
    assert r.train.batch_size == 8 and isinstance(r.train.batch_size, int)
    assert r.tasks["nli"].columns == {"text": "premise", "text_pair": "hyp2", "label": "label"}
    assert r.train.scheduler == "cosine"
    assert r.train.max_steps is None and r.train.epochs == 1.5
    assert r.train.max_grad_norm is None and r.pooling == "cls"
    assert r.tasks["extra"].type == "regression" and r.tasks["extra"].data.train == "more.jsonl"
    # untouched values survive
    assert r.tasks["sentiment"].weight == 1.0 and r.train.seed == 7


def test_apply_overrides_does_not_mutate_input():
    raw = valid_recipe()
    before = copy.deepcopy(raw)
    out = apply_overrides(raw, ["train.lr=1e-4", "tasks.ner.weight=3"])
    assert raw == before
    assert float(out["train"]["lr"]) == 1e-4 and out["tasks"]["ner"]["weight"] == 3


def test_override_unknown_key_and_wrong_type_reported_with_path():
    problems = problems_of(valid_recipe(), ["train.lrr=1", "train.batch_size=many", "tasks.nli.wieght=2"])
    assert "train.lrr: unknown key" in problems
    assert "tasks.nli.wieght: unknown key" in problems
    assert any(p.startswith("train.batch_size:") and "'many'" in p for p in problems)
    assert len(problems) == 3


def test_malformed_overrides_all_listed():
    problems = problems_of(valid_recipe(), ["train.lr", "=3", "train..lr=1", "train.seed=1"])
    assert problems == ["override 'train.lr': expected key.path=value",
                        "override '=3': expected key.path=value",
                        "override 'train..lr=1': expected key.path=value"]


def test_override_value_that_is_not_yaml_is_a_recipe_problem():
    problems = problems_of(valid_recipe(), ["train.lr={", "train.seed=1"])
    assert len(problems) == 1 and problems[0].startswith("override 'train.lr={': the value is not valid YAML")


def test_override_mixed_precision_no():
    r = parse_recipe(valid_recipe(), Path("."), ["train.mixed_precision=no"])
    assert r.train.mixed_precision == "no"


def test_invalid_recipe_structure_problems_in_one_error():
    raw = valid_recipe()
    raw["colour"] = "blue"                                   # unknown key, top level
    raw["tasks"]["sentiment"]["lable"] = "x"                 # unknown key, task level
    raw["tasks"]["sentiment"]["data"]["validation"] = "v.csv"  # unknown key, data level
    raw["train"]["learning_rate"] = 1e-3                     # unknown key, train level
    raw["train"]["batch_size"] = "big"                       # wrong type
    raw["tasks"]["nli"]["weight"] = "heavy"                  # wrong type
    raw["max_length"] = [128]                                # wrong type
    raw["pooling"] = "max"                                   # not an allowed value
    problems = problems_of(raw)
    assert "colour: unknown key" in problems
    assert "tasks.sentiment.lable: unknown key" in problems
    assert "tasks.sentiment.data.validation: unknown key" in problems
    assert "train.learning_rate: unknown key" in problems
    assert any(p.startswith("train.batch_size:") and "'big'" in p for p in problems)
    assert any(p.startswith("tasks.nli.weight:") and "'heavy'" in p for p in problems)
    assert any(p.startswith("max_length:") for p in problems)
    assert any(p.startswith("pooling:") and "'max'" in p for p in problems)
    assert len(problems) == 8


def test_invalid_recipe_registry_problems_in_one_error():
    raw = valid_recipe()
    raw["tasks"]["sentiment"]["type"] = "classifcation"          # unknown task type
    raw["tasks"]["nli"]["columns"]["hypothesis"] = "h"           # unknown column role
    raw["tasks"]["emotions"]["columns"] = {"label": "labels"}    # role of another type (multilabel uses labels)
    raw["tasks"]["stars"]["metric"] = "accuracy"                 # metric of another type
    raw["tasks"]["ner"]["metric"] = "bleu"                       # not a metric at all
    problems = problems_of(raw)
    assert problems == [
        "tasks.sentiment.type: unknown task type 'classifcation' "
        "(known: classification, multilabel, regression, token_classification, extractive_qa, multiple_choice, "
        "generation)",
        "tasks.nli.columns.hypothesis: unknown role for classification (roles: text, text_pair, label)",
        "tasks.emotions.columns.label: unknown role for multilabel (roles: text, text_pair, labels)",
        "tasks.stars.metric: 'accuracy' is not a regression metric (choose from: pearson, spearman, mse)",
        "tasks.ner.metric: 'bleu' is not a token_classification metric (choose from: f1, precision, recall)",
    ]


def test_max_steps_and_epochs_both_given():
    raw = valid_recipe()
    raw["train"]["epochs"] = 3
    assert problems_of(raw) == ["train: give max_steps or epochs, not both"]


def test_other_value_checks():
    raw = valid_recipe()
    raw["name"] = "has spaces"
    raw["tasks"]["sentiment"]["data"]["split"] = {"dev": 0.6, "test": 0.5}
    raw["tasks"]["nli"]["weight"] = -1
    raw["train"]["warmup_ratio"] = 1.5
    del raw["tasks"]["stars"]["data"]
    problems = problems_of(raw)
    paths = sorted(p.split(":")[0] for p in problems)
    assert paths == ["name", "tasks.nli.weight", "tasks.sentiment.data", "tasks.stars.data", "train.warmup_ratio"]
    assert "tasks.stars.data: Field required" in problems
    assert any("split fractions" in p for p in problems)


def test_no_tasks():
    assert any("at least one task" in p for p in problems_of({"name": "x", "tasks": {}}))
    assert problems_of({"name": "x"}) == ["tasks: Field required"]


def test_every_problem_in_one_error():
    raw = valid_recipe()
    raw["colour"] = "blue"                                       # unknown key
    raw["train"]["batch_size"] = "big"                           # wrong type
    raw["tasks"]["sentiment"]["type"] = "classifcation"          # unknown task type
    raw["tasks"]["nli"]["columns"]["hypothesis"] = "h"           # unknown column role
    raw["tasks"]["ner"]["metric"] = "bleu"                       # bad metric name
    raw["train"]["epochs"] = 3                                   # max_steps and epochs both given
    paths = [p.split(":")[0] for p in problems_of(raw)]
    assert sorted(paths) == sorted(["colour", "train.batch_size", "tasks.sentiment.type",
                                    "tasks.nli.columns.hypothesis", "tasks.ner.metric", "train"])


def test_load_recipe_missing_file(tmp_path):
    with pytest.raises(RecipeError) as info:
        load_recipe(tmp_path / "nope.yaml")
    assert info.value.problems == [f"{tmp_path / 'nope.yaml'}: file not found"]


def test_load_recipe_invalid_yaml(tmp_path):
    path = write(tmp_path / "bad.yaml", "name: x\ntasks:\n  a: {type: classification\n  b: [\n")
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    (problem,) = info.value.problems
    assert problem.startswith(f"{path}: not valid YAML:")
    assert "line" in problem      # the parser's position is passed on


@pytest.mark.parametrize("text, got", [("- a\n- b\n", "list"), ("", "NoneType"), ("just a string\n", "str")])
def test_load_recipe_not_a_mapping(tmp_path, text, got):
    with pytest.raises(RecipeError) as info:
        load_recipe(write(tmp_path / "r.yaml", text))
    assert info.value.problems == [f"recipe: expected a mapping of keys, got {got}"]


def test_load_recipe_overrides_and_file_errors_together(tmp_path):
    """Overrides that break a valid file are reported like problems in the file."""
    path = write(tmp_path / "recipe.yaml", valid_recipe())
    with pytest.raises(RecipeError) as info:
        load_recipe(path, ["train.sampling=random", "tasks.nli.type=nli"])
    problems = info.value.problems
    assert len(problems) == 2
    assert any(p.startswith("train.sampling:") and "'random'" in p for p in problems)
    assert any(p.startswith("tasks.nli.type: unknown task type 'nli'") for p in problems)


def test_load_recipe_on_a_directory(tmp_path):
    with pytest.raises(RecipeError):
        load_recipe(tmp_path)


def test_duplicate_task_name_is_an_error(tmp_path):
    path = tmp_path / "dup.yaml"
    path.write_text("name: d\ntasks:\n  s: {type: classification, data: {train: a.csv}}\n"
                    "  s: {type: regression, data: {train: a.csv}}\n")
    with pytest.raises(RecipeError, match="duplicate key 's'"):
        load_recipe(path)
