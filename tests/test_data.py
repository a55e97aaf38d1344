"""Data: row checks with file/line/field messages, skipping, splits, task sampling, batching and collation."""

from __future__ import annotations

import collections
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from mtlm.config import RecipeError
from mtlm.recipe import load_recipe, parse_recipe
from mtlm.batches import (LengthGroupedBatchSampler, SourceBatches, TaskSampler, collate_source, mean_probabilities,
                          source_dataset, steps_for_epochs, task_probabilities)
from mtlm.data import MAX_ROW_ERRORS, collate, length_sorted_batches, prepare_rows
from mtlm.tasks import build_task
from mtlm.tasks.token_classification import IGNORE


def jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("data")
    (d / "news.csv").write_text("text,label\nstocks rose,business\nteam won,sport\nbank fell,business\n"
                                "goal scored,sport\n")
    (d / "news_dev.csv").write_text("text,label\nshares up,business\nrain today,weather\n")
    (d / "bad.csv").write_text('text,label\n"fine text",pos\n,neg\n"   ",neg\n"two\nlines",pos\n"no label",\n'
                               "last,neg\n")
    jsonl(d / "bad.jsonl", [{"text": "ok", "label": "a"},
                            {"text": "listy", "label": ["a", "b"]},
                            {"label": "b"},
                            {"text": " \t ", "label": "a"},
                            {"text": 42, "label": "b"},
                            {"text": "float label", "label": 0.5},
                            {"text": "fine", "label": "b"}])
    (d / "scores.csv").write_text("text,score\ngood,1.5\nbad,abc\nok,2\n")
    jsonl(d / "tags.jsonl", [{"tokens": ["john", "went"], "tags": ["B-PER", "O"]},
                             {"tokens": ["paris"], "tags": ["LOC"]},
                             {"tokens": ["a", "b"], "tags": ["O"]},
                             {"tokens": [], "tags": []}])
    jsonl(d / "emo.jsonl", [{"text": "yay", "labels": ["joy"]}, {"text": "grr", "labels": {"anger": 1}},
                            {"text": "meh", "labels": "joy,anger"}])
    jsonl(d / "many_bad.jsonl", [{"text": " ", "label": "a"} for _ in range(MAX_ROW_ERRORS + 4)]
                                + [{"text": "x", "label": "a"}])
    return d


def prepare(tasks: dict, base: Path, **top):
    recipe = parse_recipe({"name": "t", "tasks": tasks, **top}, base)
    return prepare_rows(recipe, {n: build_task(n, c) for n, c in recipe.tasks.items()})


def problems(tasks: dict, base: Path) -> list[str]:
    with pytest.raises(RecipeError) as info:
        prepare(tasks, base)
    return info.value.problems


def cls(train, **extra):
    return {"type": "classification", "data": {"train": train, "split": {}, **extra.pop("data", {})}, **extra}


# ---------------------------------------------------------------- data-level errors

def test_missing_column_message(files):
    got = problems({"topic": cls("news.csv", columns={"label": "category"})}, files)
    assert got == [f"tasks.topic.columns.label: column 'category' not in {files / 'news.csv'} (columns: text, label)"]


def test_missing_default_and_optional_columns(files):
    got = problems({"a": cls("news.csv", columns={"text": "body", "text_pair": "hyp"}),
                    "b": {"type": "regression", "data": {"train": "news.csv", "split": {}}}}, files)
    origin = files / "news.csv"
    assert got == [f"tasks.a.columns.text: column 'body' not in {origin} (columns: text, label)",
                   f"tasks.a.columns.text_pair: column 'hyp' not in {origin} (columns: text, label)",
                   f"tasks.b.columns.score: column 'score' not in {origin} (columns: text, label)"]


def test_fit_reports_data_errors_before_loading_a_model(files, tmp_path):
    recipe_path = tmp_path / "r.yaml"
    recipe_path.write_text(json.dumps({
        "name": "t", "backbone": str(tmp_path / "no-such-backbone"), "output_dir": str(tmp_path / "run"),
        "tasks": {"topic": cls(str(files / "news.csv"), columns={"label": "category"})}}))
    from mtlm.train import fit
    with pytest.raises(RecipeError) as info:       # a BackboneError would mean the model was loaded first
        fit(load_recipe(recipe_path), progress=False)
    assert info.value.problems[0].startswith("tasks.topic.columns.label: column 'category' not in")
    assert not (tmp_path / "run").exists()


def test_bad_csv_rows_name_file_line_and_field(files):
    f = files / "bad.csv"
    assert problems({"s": cls("bad.csv")}, files) == [
        f"{f}, line 3, field 'text': missing",
        f"{f}, line 4, field 'text': empty text",
        f"{f}, line 7, field 'label': missing label",     # the quoted two-line text above spans lines 5-6
    ]


def test_bad_jsonl_rows_name_file_line_and_field(files):
    f = files / "bad.jsonl"
    assert problems({"s": cls("bad.jsonl")}, files) == [
        f"{f}, line 2, field 'label': expected a class label (text or integer), got ['a', 'b']",
        f"{f}, line 3, field 'text': missing",
        f"{f}, line 4, field 'text': empty text",
        f"{f}, line 5, field 'text': expected text, got int",
        f"{f}, line 6, field 'label': expected a class label (text or integer), got 0.5",
    ]


def test_empty_string_text_in_jsonl_is_reported_as_empty(tmp_path):
    jsonl(tmp_path / "e.jsonl", [{"text": "ok", "label": "a"}, {"text": "", "label": "a"}])
    assert problems({"s": cls("e.jsonl")}, tmp_path) == [f"{tmp_path / 'e.jsonl'}, line 2, field 'text': empty text"]


def test_bad_rows_of_other_task_types(files):
    got = problems({"r": {"type": "regression", "data": {"train": "scores.csv", "split": {}}},
                    "n": {"type": "token_classification", "data": {"train": "tags.jsonl", "split": {}}},
                    "m": {"type": "multilabel", "data": {"train": "emo.jsonl", "split": {}}}}, files)
    assert got == [
        f"{files / 'scores.csv'}, line 3, field 'score': expected a finite number, got 'abc'",
        f"{files / 'tags.jsonl'}, line 2, field 'tags': not a BIO tag: 'LOC' (expected O, B-TYPE or I-TYPE)",
        f"{files / 'tags.jsonl'}, line 3, field 'tags': 1 tags for 2 tokens",
        f"{files / 'tags.jsonl'}, line 4, field 'tokens': expected a non-empty list of non-empty strings",
        f"{files / 'emo.jsonl'}, line 2, field 'labels': expected a list of labels or a ','-separated string, "
        "got {'anger': 1}",
    ]


def test_many_bad_rows_are_capped(files):
    got = problems({"s": cls("many_bad.jsonl")}, files)
    assert len(got) == MAX_ROW_ERRORS + 1
    assert got[0] == f"{files / 'many_bad.jsonl'}, line 1, field 'text': empty text"
    assert got[-1] == f"{files / 'many_bad.jsonl'}: ... and 4 more bad rows (or set tasks.s.on_bad_rows: skip)"


def test_on_bad_rows_skip_reports_count(files):
    data = prepare({"c": cls("bad.csv", on_bad_rows="skip"), "j": cls("bad.jsonl", on_bad_rows="skip")}, files)
    assert f"c: skipped 3 bad row(s) of 6 in {files / 'bad.csv'}" in data.notes
    assert f"j: skipped 5 bad row(s) of 7 in {files / 'bad.jsonl'}" in data.notes
    c = data.rows["c"]["train"]
    assert [r["text"] for r in c.records] == ["fine text", "two\nlines", "last"]
    assert c.lines == [2, 5, 8]                       # line numbers survive the skip
    assert [r["text"] for r in data.rows["j"]["train"].records] == ["ok", "fine"]


def test_on_bad_rows_skip_also_skips_unreadable_lines(files, tmp_path):
    (tmp_path / "broken.jsonl").write_text('{"text": "ok", "label": "a"}\n{"text": oops\n{"text": "b", "label": "c"}\n')
    with pytest.raises(RecipeError, match=r"broken\.jsonl, line 2: not valid JSON"):
        prepare({"j": cls("broken.jsonl")}, tmp_path)
    data = prepare({"j": cls("broken.jsonl", on_bad_rows="skip")}, tmp_path)
    assert [r["text"] for r in data.rows["j"]["train"].records] == ["ok", "b"]
    assert data.rows["j"]["train"].lines == [1, 3]
    (note,) = [n for n in data.notes if "unreadable" in n]
    assert note.startswith(f"tasks.j.data.train: skipped 1 unreadable line(s) of {tmp_path / 'broken.jsonl'} (line 2: ")


def test_dev_label_unseen_in_train(files):
    got = problems({"topic": cls("news.csv", data={"dev": "news_dev.csv"})}, files)
    assert got == ["tasks.topic.data.dev: label(s) not seen in train: 'weather'"]


def test_all_problems_of_several_tasks_in_one_error(files):
    with pytest.raises(RecipeError) as info:
        prepare({"a": cls("news.csv", columns={"label": "category"}),
                 "b": cls("bad.jsonl"),
                 "c": cls("news.csv", data={"dev": "news_dev.csv"}),
                 "d": cls("missing.csv"),
                 "e": cls("news.csv")}, files)
    got = info.value.problems
    assert got[0].startswith("tasks.a.columns.label: column 'category' not in")
    assert sum(str(files / "bad.jsonl") in p for p in got) == 5
    assert "tasks.c.data.dev: label(s) not seen in train: 'weather'" in got
    assert f"tasks.d.data.train: {files / 'missing.csv'}: cannot read: file not found" in got
    assert len(got) == 8
    assert "(8 problems)" in str(info.value)


def test_relative_paths_resolve_against_the_recipe_folder(files, tmp_path, monkeypatch):
    sub = tmp_path / "project"
    sub.mkdir()
    (sub / "news.csv").write_text((files / "news.csv").read_text())
    (sub / "recipe.yaml").write_text(json.dumps({"name": "t", "tasks": {"topic": cls("news.csv")}}))
    monkeypatch.chdir(tmp_path)
    recipe = load_recipe("project/recipe.yaml")
    data = prepare_rows(recipe, {n: build_task(n, c) for n, c in recipe.tasks.items()})
    assert data.rows["topic"]["train"].origin == str((sub / "news.csv").resolve())
    assert len(data.rows["topic"]["train"].records) == 4


def test_missing_splits_are_made_disjoint_and_stratified(toy_data):
    data = prepare({"s": {"type": "classification", "data": {"train": str(toy_data / "sentiment.csv"),
                                                             "split": {"dev": 0.1, "test": 0.2}}}}, Path("."))
    rows = data.rows["s"]
    texts = {s: [r["text"] for r in rows[s].records] for s in ("train", "dev", "test")}
    assert set(texts["train"]).isdisjoint(texts["dev"]) and set(texts["train"]).isdisjoint(texts["test"])
    assert set(texts["dev"]).isdisjoint(texts["test"])
    total = sum(len(t) for t in texts.values())
    assert len(texts["dev"]) == round(0.1 * total) and len(texts["test"]) == round(0.2 * total)
    for split in ("dev", "test"):
        counts = collections.Counter(r["label"] for r in rows[split].records)
        assert abs(counts["positive"] - counts["negative"]) <= 1
    again = prepare({"s": {"type": "classification", "data": {"train": str(toy_data / "sentiment.csv"),
                                                              "split": {"dev": 0.1, "test": 0.2}}}}, Path("."))
    assert [r["text"] for r in again.rows["s"]["dev"].records] == texts["dev"]      # seeded


# ---------------------------------------------------------------- task sampling

SIZES = {"a": 100, "b": 300, "c": 600}


def draw(sampler, n):
    return [sampler.next() for _ in range(n)]


def test_proportional_sampling():
    counts = collections.Counter(draw(TaskSampler(SIZES, "proportional", 2.0, seed=0), 20000))
    for name, size in SIZES.items():
        assert counts[name] / 20000 == pytest.approx(size / 1000, abs=0.015)


def test_temperature_sampling():
    T = 2.0
    weights = {n: s ** (1 / T) for n, s in SIZES.items()}
    expected = {n: w / sum(weights.values()) for n, w in weights.items()}
    assert task_probabilities(SIZES, "temperature", T) == pytest.approx(expected)
    counts = collections.Counter(draw(TaskSampler(SIZES, "temperature", T, seed=1), 20000))
    for name in SIZES:
        assert counts[name] / 20000 == pytest.approx(expected[name], abs=0.015)
    # the small task gets more than its proportional share, the large one less
    assert counts["a"] / 20000 > 0.15 and counts["c"] / 20000 < 0.5
    # T = 1 is proportional; large T approaches uniform
    assert task_probabilities(SIZES, "temperature", 1.0) == pytest.approx({"a": 0.1, "b": 0.3, "c": 0.6})
    assert task_probabilities(SIZES, "temperature", 1000.0) == pytest.approx({n: 1 / 3 for n in SIZES}, abs=0.01)


def test_round_robin_sampling():
    seq = draw(TaskSampler(SIZES, "round_robin", 2.0, seed=0), 9)
    assert seq == ["a", "b", "c"] * 3


def test_annealed_sampling_moves_from_proportional_towards_uniform():
    """Stickland & Murray 2019: p_i ∝ n_i^alpha, alpha from 1 (proportional) down to 0.2 over the run."""
    assert task_probabilities(SIZES, "annealed", 2.0, 0.0) == pytest.approx({"a": 0.1, "b": 0.3, "c": 0.6})
    end = {n: s ** 0.2 for n, s in SIZES.items()}
    assert task_probabilities(SIZES, "annealed", 2.0, 1.0) == pytest.approx(
        {n: w / sum(end.values()) for n, w in end.items()})
    total, part = 40000, 4000
    seq = draw(TaskSampler(SIZES, "annealed", 2.0, seed=0, total=total), total)
    first, last = collections.Counter(seq[:part]), collections.Counter(seq[-part:])
    early = task_probabilities(SIZES, "annealed", 2.0, 0.05)    # the middle of the first tenth
    late = task_probabilities(SIZES, "annealed", 2.0, 0.95)
    for name in SIZES:
        assert first[name] / part == pytest.approx(early[name], abs=0.025)
        assert last[name] / part == pytest.approx(late[name], abs=0.025)
    assert last["a"] > 2 * first["a"] and last["c"] < first["c"]
    # resuming mid-run continues the schedule where it was
    s1 = TaskSampler(SIZES, "annealed", 2.0, seed=3, total=100)
    draw(s1, 60)
    s2 = TaskSampler(SIZES, "annealed", 2.0, seed=3, total=100)
    s2.load_state_dict(json.loads(json.dumps(s1.state_dict())))
    assert draw(s2, 40) == draw(s1, 40)
    # the mean share over the run (what a single-task baseline gets) lies between the two ends
    mean = mean_probabilities(SIZES, "annealed", 2.0)
    assert 0.1 < mean["a"] < end["a"] / sum(end.values())
    assert sum(mean.values()) == pytest.approx(1.0)


def test_sampler_is_seeded_and_resumable():
    s1 = TaskSampler(SIZES, "proportional", 2.0, seed=5)
    first = draw(s1, 50)
    assert draw(TaskSampler(SIZES, "proportional", 2.0, seed=5), 50) == first
    assert draw(TaskSampler(SIZES, "proportional", 2.0, seed=6), 50) != first
    state = json.loads(json.dumps(s1.state_dict()))             # survives a JSON checkpoint
    rest = draw(s1, 100)
    s2 = TaskSampler(SIZES, "proportional", 2.0, seed=5)
    s2.load_state_dict(state)
    assert draw(s2, 100) == rest
    rr = TaskSampler(SIZES, "round_robin", 2.0, seed=0)
    draw(rr, 4)
    rr2 = TaskSampler(SIZES, "round_robin", 2.0, seed=0)
    rr2.load_state_dict(rr.state_dict())
    assert draw(rr2, 3) == draw(rr, 3) == ["b", "c", "a"]


# ---------------------------------------------------------------- batching

def lengths_of(n: int, seed: int = 0) -> list[int]:
    return np.random.default_rng(seed).integers(3, 120, size=n).tolist()


def take(sampler: LengthGroupedBatchSampler, n: int) -> list[list[int]]:
    it = iter(sampler)
    return [next(it) for _ in range(n)]


@pytest.mark.parametrize("group", [True, False])
def test_every_example_once_per_epoch(group):
    n, gb = 103, 8
    tb = LengthGroupedBatchSampler(lengths_of(n), gb, seed=3, group_by_length=group)
    per_epoch = -(-n // gb)
    epochs = [take(tb, per_epoch) for _ in range(2)]
    for batches in epochs:
        assert sorted(i for b in batches for i in b) == list(range(n))
        assert all(len(b) == gb for b in batches if len(b) != n % gb)
    assert epochs[0] != epochs[1]                 # a new permutation each epoch
    assert tb.state_dict() == {"epoch": 1, "cursor": per_epoch}


@pytest.mark.parametrize("n", [17, 16, 1, 103])
def test_every_process_gets_rows_of_every_batch(n):
    """2 processes, batch 8 each: a global batch of 16. With 17 items the epoch's last batch holds 1 item, fewer
    than processes: the epoch is padded (DistributedSampler-style) so both processes get one row of it."""
    lengths = lengths_of(n)
    shards = [LengthGroupedBatchSampler(lengths, 8, seed=1, num_replicas=2, rank=r) for r in (0, 1)]
    per_epoch = -(-(n + n % 2) // 16)
    for _ in range(2):                                             # two epochs
        got = [take(s, per_epoch) for s in shards]
        assert [len(a) for a in got[0]] == [len(b) for b in got[1]]        # equal shares, never empty
        assert all(len(a) >= 1 for a in got[0])
        served = {i for rank in got for b in rank for i in b}
        assert served == set(range(n))                                     # every item, once or (padding) twice
        assert sum(len(b) for rank in got for b in rank) == n + n % 2
    whole = LengthGroupedBatchSampler(lengths, 8, seed=1, num_replicas=2).global_batches(2)
    assert [sorted(a + b) for a, b in zip(*[take(s, per_epoch) for s in shards])] == [sorted(b) for b in whole]


def padding(lengths: list[int], batches: list[list[int]]) -> int:
    return sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in batches)


def test_length_grouping_reduces_padding():
    lengths, gb = lengths_of(2000, seed=1), 16
    n_batches = 2000 // gb
    grouped = LengthGroupedBatchSampler(lengths, gb, seed=0, group_by_length=True)
    plain = LengthGroupedBatchSampler(lengths, gb, seed=0, group_by_length=False)
    pad_grouped = padding(lengths, take(grouped, n_batches))
    pad_plain = padding(lengths, take(plain, n_batches))
    assert pad_grouped < 0.2 * pad_plain
    # grouped batches still come in shuffled order, not longest-first
    firsts = [max(lengths[i] for i in b) for b in take(grouped, 20)]
    assert firsts != sorted(firsts, reverse=True)


def test_batch_sampler_resumes_the_exact_sequence():
    lengths = lengths_of(50)
    tb = LengthGroupedBatchSampler(lengths, 8, seed=11)
    take(tb, 9)                                   # into the second epoch (7 batches per epoch)
    state = json.loads(json.dumps(tb.state_dict()))
    expected = take(tb, 20)
    resumed = LengthGroupedBatchSampler(lengths, 8, seed=11)
    resumed.load_state_dict(state)
    assert take(resumed, 20) == expected
    fresh = LengthGroupedBatchSampler(lengths, 8, seed=11)
    assert take(fresh, 20) != expected


def test_source_batches_come_from_a_dataloader_and_resume(toy_data, tiny_backbone):
    """A task alone through the DataLoader: padded inputs, every row labelled (rows None), the labels of the
    sampler's rows; a resumed loader continues with the same micro-batches."""
    from transformers import AutoTokenizer

    from mtlm.data import encode_rows
    data = prepare({"s": {"type": "classification", "data": {"train": str(toy_data / "sentiment.csv")}}}, Path("."))
    task = build_task("s", parse_recipe({"name": "t", "tasks": {"s": cls("x.csv")}}, Path(".")).tasks["s"])
    task.fit(data.rows["s"]["train"].records)
    tokenizer = AutoTokenizer.from_pretrained(tiny_backbone)
    feats = encode_rows({"s": task}, data.rows, tokenizer, 32)["s"]["train"]
    dataset = source_dataset(data.sources["s"], {"s": feats})
    assert len(dataset) == len(feats)

    def make():
        return SourceBatches(dataset, {"s": task}, 8, seed=4, group_by_length=True, num_replicas=1, rank=0,
                             pad_token_id=tokenizer.pad_token_id)
    first = make()
    sampler_view = LengthGroupedBatchSampler(dataset.lengths(), 8, seed=4)
    idx = take(sampler_view, 3)
    for k in range(3):
        inputs, targets = first.next()
        assert set(targets) == {"s"} and targets["s"][0] is None
        want = collate(task, [feats[i] for i in idx[k]], tokenizer.pad_token_id)
        assert torch.equal(inputs["input_ids"], want["input_ids"])
        assert torch.equal(targets["s"][1]["labels"], want["labels"])
    state = json.loads(json.dumps(first.state_dict()))
    resumed = make()
    resumed.load_state_dict(state)
    for _ in range(4):
        a, b = first.next(), resumed.next()
        assert torch.equal(a[0]["input_ids"], b[0]["input_ids"])
    with pytest.raises(ValueError, match="empty micro-batch"):
        collate_source({"s": task}, [], tokenizer.pad_token_id)


def test_length_sorted_batches_and_steps_for_epochs():
    lengths = [5, 9, 1, 7, 3]
    assert length_sorted_batches(lengths, 2) == [[1, 3], [0, 4], [2]]
    assert steps_for_epochs(1.0, {"a": 100, "b": 60}, 32) == 5
    assert steps_for_epochs(2.5, {"a": 10}, 4) == 7


# ---------------------------------------------------------------- collation

def feature(n: int, label) -> dict:
    return {"input_ids": list(range(10, 10 + n)), "attention_mask": [1] * n, "token_type_ids": [0] * n,
            "length": n, "label": label}


def test_collate_pads_to_longest_in_batch():
    task = build_task("c", parse_recipe({"name": "t", "tasks": {"c": cls("x.csv")}}, Path(".")).tasks["c"])
    batch = collate(task, [feature(3, 1), feature(5, 0), feature(4, 2)], pad_token_id=0)
    assert batch["input_ids"].shape == (3, 5)                    # longest in the batch, not max_length
    assert batch["input_ids"][0].tolist() == [10, 11, 12, 0, 0]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1] * 5, [1, 1, 1, 1, 0]]
    assert batch["token_type_ids"].sum() == 0
    assert batch["labels"].tolist() == [1, 0, 2] and batch["labels"].dtype == torch.long
    assert all(v.dtype == torch.long for k, v in batch.items())
    small = collate(task, [feature(2, 0), feature(3, 1)], pad_token_id=7)
    assert small["input_ids"].shape == (2, 3) and small["input_ids"][0, 2] == 7


def test_collate_token_labels_padded_with_ignore():
    task = build_task("n", parse_recipe({"name": "t", "tasks": {"n": {"type": "token_classification",
                                                                       "data": {"train": "x"}}}},
                                        Path(".")).tasks["n"])
    f1 = {**feature(4, [1, 0]), "token_labels": [IGNORE, 1, 0, IGNORE]}
    f2 = {**feature(6, [0]), "token_labels": [IGNORE, 0, IGNORE, IGNORE, IGNORE, IGNORE]}
    batch = collate(task, [f1, f2], pad_token_id=0)
    assert batch["labels"].tolist() == [[IGNORE, 1, 0, IGNORE, IGNORE, IGNORE], f2["token_labels"]]
    assert batch["input_ids"].shape == batch["labels"].shape == (2, 6)


def test_rare_class_of_a_made_split_stays_in_train(tmp_path):
    from mtlm.recipe import parse_recipe
    from mtlm.data import prepare_rows
    from mtlm.tasks import build_task
    rows = [{"text": f"text number {i}", "label": "a" if i % 2 else "b"} for i in range(40)]
    rows.append({"text": "the only one", "label": "c"})
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    recipe = parse_recipe({"name": "r", "tasks": {"s": {"type": "classification",
                                                        "data": {"train": "d.jsonl", "split": {"dev": 0.5}}}}},
                          tmp_path)
    tasks = {"s": build_task("s", recipe.tasks["s"])}
    data = prepare_rows(recipe, tasks).rows["s"]
    assert "c" in tasks["s"].labels
    assert all(r["label"] != "c" for r in data["dev"].records)
    assert len(data["train"].records) + len(data["dev"].records) == 41


@pytest.mark.parametrize("kind", ["multilabel", "token_classification"])
def test_rare_labels_and_tags_of_a_made_split_stay_in_train(tmp_path, kind):
    """Six rows each with a label (multilabel) or tag (tagging) no other row has: a made dev split of half the
    rows would take some of them ("not seen in train"); they all go back to train instead."""
    def row(i: int, rare: str | None) -> dict:
        if kind == "multilabel":
            return {"text": f"text number {i}", "labels": ["a"] + ([rare] if rare else [])}
        return {"tokens": ["word", f"w{i}"], "tags": ["O", f"B-{rare}" if rare else "O"]}
    rows = [row(i, None) for i in range(40)] + [row(40 + k, f"RARE{k}") for k in range(6)]
    jsonl(tmp_path / "d.jsonl", rows)
    recipe = parse_recipe({"name": "r", "tasks": {"t": {"type": kind, "data": {"train": "d.jsonl",
                                                                              "split": {"dev": 0.5}}}}}, tmp_path)
    tasks = {"t": build_task("t", recipe.tasks["t"])}
    data = prepare_rows(recipe, tasks).rows["t"]
    assert {f"RARE{k}" for k in range(6)} <= {label.removeprefix("B-") for label in tasks["t"].labels}
    assert len(data["train"].records) + len(data["dev"].records) == 46
    assert all("RARE" not in json.dumps(r) for r in data["dev"].records)


def test_task_types_declare_what_the_data_path_asks():
    """Every task type declares the TaskType class attributes (no getattr defaults in mtlm.data): a class
    role to stratify splits by only where a row has one class, and joinability only where a data row is one
    backbone row with one feature."""
    from mtlm.tasks import TASK_TYPES
    from mtlm.tasks.base import TaskType
    declared = [n for n, a in TaskType.__annotations__.items() if str(a).startswith("ClassVar")]
    assert {"class_role", "joinable"} <= set(declared)
    for name, cls in TASK_TYPES.items():
        assert all(hasattr(cls, n) for n in declared), name
    assert {n: (c.class_role, c.joinable) for n, c in TASK_TYPES.items()} == {
        "classification": ("label", True), "multilabel": (None, True), "regression": (None, True),
        "token_classification": (None, True), "extractive_qa": (None, False), "multiple_choice": (None, False),
        "generation": (None, False)}


def test_baseline_average_leaves_error_metrics_out_and_flips_their_gain():
    """An mse row must not enter the average as if higher were better (a worse error would raise it); its
    gain is single - multi; the relative gain is scale-free over every task."""
    from mtlm.baseline import average_rows, format_baseline
    rows = [{"task": "a", "metric": "accuracy", "lower_is_better": False, "multi_task": 0.8, "single_task": 0.7},
            {"task": "r", "metric": "mse", "lower_is_better": True, "multi_task": 2.0, "single_task": 2.5}]
    out = average_rows(rows)
    assert out["average"] == {"multi_task": 0.8, "single_task": 0.7}
    assert out["average_excludes"] == ["r"]
    assert rows[1]["gain"] == pytest.approx(0.5) and rows[0]["gain"] == pytest.approx(0.1)
    assert out["relative_gain"] == pytest.approx((0.1 / 0.7 + 0.5 / 2.5) / 2)
    text = format_baseline({"split": "test", "tasks": rows, **out,
                            "parameters": {"multi_task": 1e6, "single_task_total": 2e6, "ratio": 2.0},
                            "backbone_passes_per_input": {"multi_task": 1, "single_task": 2, "ratio": 2.0}})
    assert "(without r: an error metric)" in text and "mse (lower=better)" in text


def test_a_train_cap_keeps_the_made_splits_classes_in_train(tmp_path):
    """`limit: {train: N}` is applied after the split: a cap that drops a rare class's last train rows must
    not leave "label not seen in train" on the dev/test splits the user never wrote; their rows of it go back."""
    rows = [{"text": f"common text {i}", "label": "c"} for i in range(195)] + \
           [{"text": f"rare text {i}", "label": "w"} for i in range(5)]
    jsonl(tmp_path / "d.jsonl", rows)
    recipe = parse_recipe({"name": "r", "tasks": {"t": {"type": "classification", "data": {
        "train": "d.jsonl", "split": {"dev": 0.2, "test": 0.2}, "limit": {"train": 10}}}}}, tmp_path)
    tasks = {"t": build_task("t", recipe.tasks["t"])}
    data = prepare_rows(recipe, tasks).rows["t"]
    assert "w" in tasks["t"].labels
    train_w = sum(r["label"] == "w" for r in data["train"].records)
    assert train_w >= 1 and len(data["train"].records) <= 10 + 5
