"""Experiment tracking behind `fit`'s callbacks: `train.tracking: [tensorboard, mlflow]`.

TensorBoard (`callbacks.TensorBoardLog`) is the default. `MLflowLog` records one MLflow run per mtlm run:
parameters (the resolved recipe, flattened to dotted keys), per-task training losses and task weights every
step, dev metrics at every evaluation, the git commit and library versions as tags (`mtlm.environment`), and
the best bundle (run_dir/model) as the artifact "model" at the end. The store is `train.tracking_uri`, else
$MLFLOW_TRACKING_URI, else a local file store in run_dir/mlruns. The MLflow run id is checkpointed, so
`--resume` continues the same MLflow run; run_dir/mlflow.json says where the run is.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from mtlm.callbacks import Callback, TensorBoardLog
from mtlm.config import RecipeError
from mtlm.environment import describe_environment

if TYPE_CHECKING:
    from mtlm.hooks import Run

log = logging.getLogger("mtlm")
MAX_PARAM_CHARS = 6000      # MLflow's limit on one parameter value
BATCH = 100                 # MLflow's limit on parameters per log_batch call


def tracking_callbacks(cfg) -> list[Callback]:
    """The callbacks `train.tracking` asks for, in its order. Raises RecipeError when mlflow is asked for
    and not installed."""
    out: list[Callback] = []
    for name in dict.fromkeys(cfg.tracking):
        if name == "tensorboard":
            out.append(TensorBoardLog())
        elif name == "mlflow":
            try:
                import mlflow  # noqa: F401
            except ImportError:
                raise RecipeError(["train.tracking: mlflow needs the mlflow package: pip install 'mtlm[tracking]' "
                                   "(mlflow-skinny)"]) from None
            out.append(MLflowLog(cfg.tracking_uri, cfg.experiment))
    return out


def flatten(tree: dict, prefix: str = "") -> dict[str, str]:
    """{"train": {"lr": 1e-4}} -> {"train.lr": "0.0001"}; lists and scalars become their YAML/str text."""
    out: dict[str, str] = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, path + "."))
        else:
            out[path] = (json.dumps(value) if isinstance(value, (list, dict)) else str(value))[:MAX_PARAM_CHARS]
    return out


def default_store(run_dir: Path) -> str:
    """run_dir/mlruns as a file URI. MLflow 3 refuses file stores unless MLFLOW_ALLOW_FILE_STORE=true (its
    database stores need SQLAlchemy, which mlflow-skinny lacks); mtlm sets it for this local store."""
    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    return (Path(run_dir).resolve() / "mlruns").as_uri()


class MLflowLog(Callback):
    """One MLflow run per mtlm run (main process only). See the module docstring for what it records."""

    key = "mlflow"

    def __init__(self, tracking_uri: str | None = None, experiment: str | None = None) -> None:
        self.tracking_uri, self.experiment = tracking_uri, experiment
        self.client, self.run_id = None, None

    def on_train_begin(self, run: Run) -> None:
        if not run.is_main:
            return
        from mlflow.entities import Param, RunTag
        from mlflow.tracking import MlflowClient

        uri = self.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or default_store(run.run_dir)
        self.client = MlflowClient(tracking_uri=uri)
        if self.run_id is None:
            name = self.experiment or run.recipe.name
            exp = self.client.get_experiment_by_name(name)
            exp_id = exp.experiment_id if exp is not None else self.client.create_experiment(name)
            env = describe_environment()
            tags = {"mtlm.run_dir": str(run.run_dir.resolve()), "mlflow.runName": run.run_dir.name,
                    "mtlm.weighting": run.recipe.train.weighting.name,
                    **{f"version.{k}": v for k, v in env["libraries"].items()}}
            if env["git"]:
                tags.update({"mlflow.source.git.commit": env["git"]["commit"],
                             "mtlm.git_dirty": str(env["git"]["dirty"])})
            self.run_id = self.client.create_run(exp_id, run_name=run.run_dir.name).info.run_id
            params = [Param(k, v) for k, v in flatten(yaml.safe_load(run.recipe.to_yaml())).items()]
            params += [Param(f"task_weight.{n}", str(t.cfg.weight)) for n, t in run.tasks.items()]
            for i in range(0, len(params), BATCH):
                self.client.log_batch(self.run_id, params=params[i:i + BATCH])
            self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])
        else:                                   # --resume: the same MLflow run goes on
            self.client.update_run(self.run_id, status="RUNNING")
        (run.run_dir / "mlflow.json").write_text(json.dumps({"tracking_uri": uri, "run_id": self.run_id},
                                                            indent=1), encoding="utf-8")

    def _log(self, values: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric
        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, step) for k, v in values.items()])

    def on_step_end(self, run: Run, step: int, losses: dict[str, float], weights: dict[str, float]) -> None:
        if self.client is not None:
            self._log({**{f"loss/{n}": v for n, v in losses.items()}, **{f"weight/{n}": w for n, w in weights.items()},
                       "lr": run.scheduler.get_last_lr()[0]}, step)

    def on_evaluate(self, run: Run, step: int, metrics: dict[str, float]) -> None:
        if self.client is not None:
            self._log({f"dev/{k}": v for k, v in metrics.items()}, step)

    def on_train_end(self, run: Run) -> None:
        if self.client is None:
            return
        if run.best_step is not None:
            self._log({"best_step": run.best_step}, run.step)
        bundle = run.run_dir / "model"
        if bundle.is_dir():
            self.client.log_artifacts(self.run_id, str(bundle), artifact_path="model")
        self.client.set_terminated(self.run_id, "FINISHED" if run.step >= run.max_steps or run.stop == "early"
                                   else "KILLED")

    def state_dict(self) -> dict:
        return {"run_id": self.run_id}

    def load_state_dict(self, state: dict) -> None:
        self.run_id = state.get("run_id")
