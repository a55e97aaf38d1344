"""`mtlm report RUN`: an HTML page with every figure rendered in headless Chromium (mtlm/report/)."""

from __future__ import annotations

import json

import pytest

from browser import browser_page, images_rendered, needs_browser
from mtlm.cli import main
from mtlm.recipe import load_recipe
from mtlm.transfer_check import warnings

needs_matplotlib = pytest.mark.requires(module="matplotlib", hint="pip install -e '.[report]'")


def rendered_in_browser(index, tmp_path) -> list[str]:
    """Open the page in headless Chromium; assert every <img> rendered (naturalWidth > 0) and no console
    error, page error or failed request. Returns the images' srcs."""
    with browser_page(tmp_path / "profile") as (page, problems):
        page.goto(index.resolve().as_uri())
        page.wait_for_load_state("load")
        images = images_rendered(page)
    assert problems == []
    assert images and all(i["width"] > 0 for i in images), images
    return sorted(i["src"] for i in images)


@needs_matplotlib
@needs_browser[0]
@needs_browser[1]
def test_report_of_a_run_with_baseline_and_compressed_variant(make_recipe, tmp_path, capsys):
    from mtlm.baseline import run_baseline
    from mtlm.compress import compress_run

    recipe = load_recipe(make_recipe(tasks=("sentiment", "ner", "score"), max_steps=30, eval_every=10,
                                     weighting="dwa"))
    run_baseline(recipe, split="dev", progress=False)
    run = recipe.run_dir()
    # the warning baseline writes when a task trails (forced here: on a tiny model which task trails is chance)
    stored = json.loads((run / "baseline_dev.json").read_text())
    stored["warnings"] = warnings([{**r, "multi_task": 0.0, "single_task": 0.5} if r["task"] == "ner" else r
                                   for r in stored["tasks"]], recipe, {}, 0.02)
    (run / "baseline_dev.json").write_text(json.dumps(stored))
    compress_run(run, "int8", budget=100.0, measure_memory=False)
    assert main(["report", str(run), "--output", str(tmp_path / "rep")]) == 0
    assert "(8 figures)" in capsys.readouterr().out
    index = tmp_path / "rep" / "index.html"
    text = index.read_text()
    for section in ("training", "per task, on dev", "multi-task vs single-task (dev)", "compression and distillation",
                    "recipe", "environment", "library torch", "name: dwa",
                    "WARNING: task ner trails its single-task model", "tasks.ner.head_lr=", "dev at the kept step",
                    "own best step"):
        assert section in text, section
    assert 'src="http' not in text and "<script" not in text     # self-contained: no network, no script
    assert rendered_in_browser(index, tmp_path) == sorted(
        ["dev_metrics.png", "train_loss.png", "task_weights.png", "confusion_sentiment.png", "entities_ner.png",
         "scatter_score.png", "baseline_dev.png", "tradeoff.png"])


@needs_matplotlib
def test_report_of_a_folder_that_is_not_a_run_says_what_is_missing(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    assert "no recipe.yaml" in capsys.readouterr().err


def test_report_output_that_is_a_file_is_a_clear_error(make_recipe, tmp_path, capsys):
    from mtlm.train import fit
    run = fit(load_recipe(make_recipe(max_steps=2)), progress=False)
    (tmp_path / "page.html").write_text("x")
    assert main(["report", str(run), "--no-predictions", "--output", str(tmp_path / "page.html")]) == 2
    assert "a file is there, not a folder" in capsys.readouterr().err


@needs_matplotlib
@needs_browser[0]
@needs_browser[1]
def test_report_of_a_real_run_renders_in_chromium(real_run, tmp_path):
    """The short real MiniLM run (SST-2, CoNLL-2003, SQuAD): curves, a confusion matrix, per-entity scores
    and QA EM/F1 from its stored dev rows, all rendered."""
    from mtlm.report.page import write_report
    index = write_report(real_run, tmp_path / "rep")
    assert rendered_in_browser(index, tmp_path) == sorted(
        ["dev_metrics.png", "train_loss.png", "task_weights.png", "confusion_sentiment.png", "entities_ner.png",
         "qa_qa.png"])
    text = index.read_text()
    assert "<td>exact_match</td>" in text
    assert all(f"<td>{t}</td>" in text for t in ("PER", "LOC", "ORG", "MISC"))   # the per-entity table


def test_training_log_falls_back_to_tensorboard_events(make_recipe):
    """A metrics.json without its training log (an older run): the curves come from the TensorBoard events."""
    import json

    from mtlm.report.collect import collect
    from mtlm.train import fit
    run = fit(load_recipe(make_recipe(max_steps=20, eval_every=10)), progress=False)
    kept = collect(run).train_log
    metrics = json.loads((run / "metrics.json").read_text())
    metrics["train"] = []
    (run / "metrics.json").write_text(json.dumps(metrics))
    from_events = collect(run).train_log
    assert [e["step"] for e in from_events] == list(range(1, 21))          # every step, not every 10th
    assert {"loss/sentiment", "loss/topic", "weight/topic", "lr"} <= set().union(*from_events)
    assert from_events[-1]["weight/topic"] == pytest.approx(kept[-1]["weight/topic"])


def test_a_distilled_student_is_a_point_of_the_tradeoff(tmp_path):
    """A `mtlm distill` run beside its teacher (distill_report.json) is read like a compressed run: the
    teacher as torch fp32, the student as its own point."""
    from mtlm.contract import FORMAT_VERSION
    from mtlm.report.collect import derived_runs
    teacher, student = tmp_path / "teacher", tmp_path / "teacher-distill-layers3"
    teacher.mkdir()
    student.mkdir()
    (student / "parent.json").write_text(json.dumps({"format": FORMAT_VERSION, "parent": "../teacher", "parent_name": "teacher", "method": "distill",
                                                       "details": {}}))
    (student / "distill_report.json").write_text(json.dumps({
        "tasks": {"ner": {"metric": "f1", "teacher_dev": 0.8, "student_dev": 0.75}},
        "speed": {"teacher": {"texts_per_s": 30.0}, "student": {"texts_per_s": 63.0}}}))
    (rep,) = derived_runs(teacher)
    assert rep["run"] == student.name and rep["engine"] == "student"
    assert rep["tasks"] == {"ner": {"metric": "f1", "dev_before": 0.8, "dev_after": 0.75}}
    assert rep["engines"] == {"torch": {"texts_per_s": 30.0}, "student": {"texts_per_s": 63.0}}


def test_each_tasks_own_best_step_stands_beside_the_kept_step(tmp_path):
    from mtlm.report.collect import RunRecord
    from mtlm.report.page import _kept_vs_own_best
    rec = RunRecord(tmp_path, "", None, [{"step": 10, "ner/f1": 0.61, "intent/accuracy": 0.5},
                                         {"step": 20, "ner/f1": 0.58, "intent/accuracy": 0.7}], [], 20,
                    task_best={"ner": {"metric": "f1", "value": 0.61, "step": 10},
                               "intent": {"metric": "accuracy", "value": 0.7, "step": 20}})
    html = _kept_vs_own_best(rec)
    assert "dev at the kept step 20" in html
    assert "<td>ner</td><td>f1</td><td>0.5800</td><td>10</td><td>0.6100</td>" in html
    assert "<td>intent</td><td>accuracy</td><td>0.7000</td><td>20</td><td>0.7000</td>" in html
