"""train.tracking: [tensorboard, mlflow] records the run in MLflow's local store (mtlm/tracking.py)."""

from __future__ import annotations

import json

import pytest

from mtlm.recipe import load_recipe
from mtlm.train import fit


@pytest.mark.requires(module="mlflow", hint="pip install -e '.[tracking]'")
def test_mlflow_records_params_metrics_weights_versions_and_bundle(make_recipe, monkeypatch):
    import mlflow
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    recipe = load_recipe(make_recipe(tasks=("sentiment", "topic"), max_steps=20, eval_every=10,
                                     tracking=["tensorboard", "mlflow"]), ["tasks.topic.weight=0.5"])
    run_dir = fit(recipe, progress=False)
    where = json.loads((run_dir / "mlflow.json").read_text())
    assert where["tracking_uri"] == (run_dir.resolve() / "mlruns").as_uri()
    assert any((run_dir / "logs").iterdir())            # TensorBoard still writes its events
    mlflow.set_tracking_uri(where["tracking_uri"])
    runs = mlflow.search_runs(experiment_names=["toy"], output_format="list")
    assert [r.info.run_id for r in runs] == [where["run_id"]]
    r = runs[0]
    assert r.info.status == "FINISHED"
    assert r.data.params["train.lr"] == "0.001" and r.data.params["train.max_steps"] == "20"
    assert r.data.params["task_weight.topic"] == "0.5" and r.data.params["tasks.topic.type"] == "classification"
    metrics = json.loads((run_dir / "metrics.json").read_text())
    last = metrics["eval"][-1]
    assert r.data.metrics["dev/sentiment/accuracy"] == pytest.approx(last["sentiment/accuracy"])
    assert r.data.metrics["dev/topic/accuracy"] == pytest.approx(last["topic/accuracy"])
    assert {"loss/sentiment", "loss/topic", "weight/topic", "lr"} <= set(r.data.metrics)
    assert r.data.metrics["weight/topic"] == pytest.approx(0.5)
    history = mlflow.tracking.MlflowClient().get_metric_history(r.info.run_id, "dev/topic/accuracy")
    assert sorted(m.step for m in history) == [10, 20]
    import torch
    assert r.data.tags["version.torch"] == torch.__version__.split("+")[0] or \
        r.data.tags["version.torch"] == torch.__version__
    assert len(r.data.tags.get("mlflow.source.git.commit", "")) == 40
    artifacts = {a.path for a in mlflow.tracking.MlflowClient().list_artifacts(r.info.run_id, "model")}
    assert {"model/heads.safetensors", "model/tasks.json"} <= artifacts


@pytest.mark.requires(module="mlflow", hint="pip install -e '.[tracking]'")
def test_resumed_run_continues_the_same_mlflow_run(make_recipe, monkeypatch):
    import mlflow
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    path = make_recipe(tasks=("sentiment",), max_steps=20, eval_every=10, tracking=["mlflow"])
    first = fit(load_recipe(path), progress=False, stop_after=10)
    run_id = json.loads((first / "mlflow.json").read_text())["run_id"]
    fit(load_recipe(path), progress=False, resume=True)
    assert not (first / "logs").exists()                # tracking: [mlflow] alone: no TensorBoard events
    mlflow.set_tracking_uri((first.resolve() / "mlruns").as_uri())
    runs = mlflow.search_runs(experiment_names=["toy"], output_format="list")
    assert [r.info.run_id for r in runs] == [run_id] and runs[0].info.status == "FINISHED"
    steps = [m.step for m in mlflow.tracking.MlflowClient().get_metric_history(run_id, "dev/sentiment/accuracy")]
    assert sorted(steps) == [10, 20]
