"""The report page: figures from `figures`, tables of numbers, the recipe and the environment, in one HTML
file (inline CSS, no script, no network) beside the PNG files it shows."""

from __future__ import annotations

import html
import json
from pathlib import Path

from mtlm.report import figures as F
from mtlm.report.collect import ReportError, RunRecord, collect
from mtlm.report.dev_outputs import dev_outputs

STYLE = ("body{font-family:sans-serif;max-width:980px;margin:2em auto;color:#222}img{max-width:100%}"
         "table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ccc;padding:2px 8px;text-align:right}"
         "th:first-child,td:first-child{text-align:left}pre{background:#f6f6f6;padding:8px;overflow:auto;font-size:12px}"
         "figure{margin:1em 0}")


def _table(header: list[str], rows: list[list]) -> str:
    def cell(v):
        return f"{v:.4f}" if isinstance(v, float) else html.escape("" if v is None else str(v))
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{cell(v)}</td>" for v in r) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


class Page:
    def __init__(self, out: Path) -> None:
        self.out, self.parts, self.figures = out, [], []

    def h(self, text: str, level: int = 2) -> None:
        self.parts.append(f"<h{level}>{html.escape(text)}</h{level}>")

    def add(self, markup: str) -> None:
        self.parts.append(markup)

    def figure(self, fig, name: str, caption: str) -> None:
        if fig is None:
            return
        F.save(fig, self.out / f"{name}.png")
        self.figures.append(f"{name}.png")
        self.parts.append(f'<figure><img src="{name}.png" alt="{html.escape(caption)}">'
                          f"<figcaption>{html.escape(caption)}</figcaption></figure>")


def _task_figures(page: Page, dev: dict[str, dict]) -> None:
    for task, d in dev.items():
        t = d["type"]
        page.h(f"{task} ({t}, {d['rows']} dev rows)", 3)
        page.add(_table(["metric", "dev"], [[k, float(v)] for k, v in d["metrics"].items()]))
        if t == "classification":
            page.figure(F.confusion(task, d["labels"], d["confusion"]), f"confusion_{task}",
                        f"{task}: confusion matrix on dev")
        elif t == "token_classification":
            groups = {k: {"precision": v["precision"], "recall": v["recall"], "F1": v["f1-score"]}
                      for k, v in d["entities"].items()}
            page.figure(F.grouped_bars(f"{task}: per entity type on dev", groups), f"entities_{task}",
                        f"{task}: precision / recall / F1 per entity type on dev")
            page.add(_table(["entity type", "precision", "recall", "F1", "support"],
                            [[k, v["precision"], v["recall"], v["f1-score"], int(v["support"])]
                             for k, v in d["entities"].items()]))
        elif t == "extractive_qa":
            m = d["metrics"]
            page.figure(F.grouped_bars(f"{task}: dev", {"all questions": {"exact match": m["exact_match"],
                                                                          "F1": m["f1"]}}),
                        f"qa_{task}", f"{task}: exact match and F1 on dev")
        elif t == "regression":
            page.figure(F.scatter_true_pred(task, d["true"], d["predicted"]), f"scatter_{task}",
                        f"{task}: predicted vs true on dev")
        elif t == "multilabel":
            page.figure(F.grouped_bars(f"{task}: per label on dev", {k: {"F1": v} for k, v in d["per_label_f1"].items()}),
                        f"labels_{task}", f"{task}: F1 per label on dev (tuned thresholds)")
        else:
            page.figure(F.grouped_bars(f"{task}: dev", {"dev": {k: float(v) for k, v in d["metrics"].items()}}),
                        f"metrics_{task}", f"{task}: dev metrics")


def _baselines(page: Page, rec: RunRecord) -> None:
    for split, b in rec.baselines.items():
        page.h(f"multi-task vs single-task ({split})")
        groups = {r["task"]: {"multi-task": r["multi_task"], "single-task": r["single_task"]}
                  for r in b["tasks"] if r["multi_task"] is not None and r["single_task"] is not None}
        page.figure(F.grouped_bars(f"selection metric on {split}", groups), f"baseline_{split}",
                    f"one multi-task model vs one single-task model per task on {split}")
        page.add(_table(["task", "metric", "multi-task", "single-task"],
                        [[r["task"], r["metric"], r["multi_task"], r["single_task"]] for r in b["tasks"]]))
        for w in b.get("warnings", []):      # mtlm.transfer_check: a task left behind, and the options that help
            page.add(f"<p class=\"warning\">WARNING: {html.escape(w['message'])}. Options that help:</p><ul>"
                     + "".join(f"<li><code>{html.escape(o)}</code></li>" for o in w["options"]) + "</ul>")


def _kept_vs_own_best(rec: RunRecord) -> str:
    """Each task's dev metric at the kept step (selected by the mean over tasks) beside its own best step."""
    kept = next((e for e in rec.evals if e.get("step") == rec.best_step), {})
    return _table(["task", "metric", f"dev at the kept step {rec.best_step}", "own best step", "dev there"],
                  [[t, b["metric"], kept.get(f"{t}/{b['metric']}"), b["step"], b["value"]]
                   for t, b in rec.task_best.items()])


def _environment(env: dict | None) -> str:
    if not env:
        return "<p>no environment.json (a run trained before mtlm recorded it)</p>"
    rows = [[k, json.dumps(v) if isinstance(v, dict) else v] for k, v in env.items() if k != "libraries"]
    rows += [[f"library {k}", v] for k, v in env.get("libraries", {}).items()]
    return _table(["", "value"], rows)


def write_report(run: str | Path, output: str | Path | None = None, with_predictions: bool = True) -> Path:
    """Write the report of run folder `run` into `output` (default run/report; created): index.html and the
    PNG figures it shows. with_predictions: also compute dev predictions with the run's best bundle on its
    stored dev rows (confusion matrices, per-entity P/R/F1, QA EM/F1). Returns the path of index.html.
    Raises ReportError (not a run folder), BundleError, ContractError (dev data changed or missing)."""
    rec = collect(run)
    out = Path(output) if output is not None else rec.run_dir / "report"
    if out.exists() and not out.is_dir():
        raise ReportError(f"--output {out}: a file is there, not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ReportError(f"--output {out}: cannot create the folder ({e.strerror})") from None
    for old in out.glob("*.png"):
        old.unlink()
    page = Page(out)
    name = rec.run_dir.resolve().name
    page.add(f"<h1>mtlm run {html.escape(name)}</h1><p>{len(rec.evals)} dev evaluations; kept model: step "
             f"{rec.best_step}</p>")
    page.h("training")
    page.figure(F.dev_metrics(rec.evals, rec.best_step), "dev_metrics", "per-task dev metrics over steps")
    page.figure(F.train_curves(rec.train_log, "loss/", "training loss per task (moving average)", "loss"),
                "train_loss", "training loss per task")
    page.figure(F.train_curves(rec.train_log, "weight/", "task weights (weighting method)", "weight"),
                "task_weights", "task weights over steps")
    if rec.task_best:
        page.add(_kept_vs_own_best(rec))
    if with_predictions:
        dev = dev_outputs(rec.run_dir)
        if dev:
            page.h("per task, on dev (the kept model)")
            _task_figures(page, dev)
    for split, ev in rec.eval_files.items():
        page.h(f"evaluation on {split} ({ev.get('engine', 'torch')})")
        page.add(_table(["metric", split], [[k, float(v)] for k, v in ev["metrics"].items()]))
    _baselines(page, rec)
    if rec.derived:
        page.h("compression and distillation")
        page.figure(F.tradeoff(rec.derived), "tradeoff", "mean dev metric vs throughput per derived run")
        page.add(_table(["run", "method", "engine", "texts/s", "vs torch"],
                        [[d["run"], d.get("method"), d["engine"], d["engines"][d["engine"]]["texts_per_s"],
                          d["engines"][d["engine"]]["ratio_vs_torch"]] for d in rec.derived]))
    page.h("recipe")
    page.add(f"<pre>{html.escape(rec.recipe_text)}</pre>")
    page.h("environment")
    page.add(_environment(rec.environment))
    doc = (f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>mtlm report: {html.escape(name)}'
           f'</title><link rel="icon" href="data:,"><style>{STYLE}</style></head><body>'
           + "\n".join(page.parts) + "</body></html>")
    index = out / "index.html"
    index.write_text(doc, encoding="utf-8")
    return index
