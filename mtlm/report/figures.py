"""The report's figures, drawn with matplotlib (object API, Agg canvas: no display, thread-safe) and saved
as PNG files. Each function takes what `collect` / `dev_outputs` read and returns a Figure, or None when
there is nothing to draw."""

from __future__ import annotations

from pathlib import Path

from matplotlib.figure import Figure

WIDTH = 7.0     # inches; at DPI 110 a figure is ~770 px wide


def save(fig: Figure, path: Path) -> Path:
    fig.savefig(path, dpi=110, bbox_inches="tight")
    return path


def _grid(n: int, height: float = 2.6) -> tuple[Figure, list]:
    cols = min(n, 3)
    rows = (n + cols - 1) // cols
    fig = Figure(figsize=(WIDTH if cols > 1 else WIDTH * 0.6, height * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel().tolist()
    for ax in axes[n:]:
        ax.set_visible(False)
    return fig, axes[:n]


def dev_metrics(evals: list[dict], best_step: int | None) -> Figure | None:
    """One panel per task: each dev metric over training steps; the kept model's step marked."""
    tasks: dict[str, list[str]] = {}
    for e in evals:
        for k in e:
            if "/" in k:
                t, m = k.split("/", 1)
                tasks.setdefault(t, [])
                if m not in tasks[t]:
                    tasks[t].append(m)
    if not tasks:
        return None
    fig, axes = _grid(len(tasks))
    for ax, (task, metrics) in zip(axes, tasks.items()):
        for m in metrics:
            pts = [(e["step"], e[f"{task}/{m}"]) for e in evals if f"{task}/{m}" in e]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3, label=m)
        if best_step is not None:
            ax.axvline(best_step, color="grey", ls=":", lw=1)
        ax.set_title(task)
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
    fig.suptitle("dev metrics (dotted: the kept model's step)")
    return fig


def _series(log: list[dict], prefix: str) -> dict[str, tuple[list, list]]:
    out: dict[str, tuple[list, list]] = {}
    for entry in log:
        for k, v in entry.items():
            if k.startswith(prefix):
                xs, ys = out.setdefault(k[len(prefix):], ([], []))
                xs.append(entry["step"])
                ys.append(v)
    return out


def train_curves(log: list[dict], prefix: str, title: str, ylabel: str) -> Figure | None:
    """Per-task curves of one training-log quantity (prefix "loss/": smoothed training loss; "weight/": the
    weighting's task weights) over steps."""
    series = _series(log, prefix)
    if not series:
        return None
    fig = Figure(figsize=(WIDTH, 3.2), layout="constrained")
    ax = fig.subplots()
    for task, (xs, ys) in series.items():
        ax.plot(xs, ys, label=task)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=8)
    return fig


def confusion(task: str, labels: list[str], matrix: list[list[int]]) -> Figure:
    """A classification task's dev confusion matrix (rows: true label, columns: predicted), counts."""
    from sklearn.metrics import ConfusionMatrixDisplay
    import numpy as np
    n = len(labels)
    size = min(9.0, 2.5 + 0.35 * n)
    fig = Figure(figsize=(size, size), layout="constrained")
    ax = fig.subplots()
    ConfusionMatrixDisplay(np.asarray(matrix), display_labels=labels).plot(
        ax=ax, colorbar=False, include_values=n <= 20, xticks_rotation="vertical" if n > 6 else "horizontal")
    ax.set_title(f"{task}: dev confusion matrix")
    return fig


def grouped_bars(title: str, groups: dict[str, dict[str, float]], ylabel: str = "") -> Figure | None:
    """Bars: one group per key of `groups` (e.g. an entity type), one bar per series inside it (e.g. P/R/F1)."""
    if not groups:
        return None
    import numpy as np
    names = list(groups)
    series = list(dict.fromkeys(s for g in groups.values() for s in g))
    fig = Figure(figsize=(min(WIDTH, 2.5 + 0.9 * len(names)), 3.0), layout="constrained")
    ax = fig.subplots()
    width = 0.8 / len(series)
    x = np.arange(len(names))
    for i, s in enumerate(series):
        vals = [groups[g].get(s, float("nan")) for g in names]
        bars = ax.bar(x + i * width - 0.4 + width / 2, vals, width, label=s)
        ax.bar_label(bars, fmt="%.2f", fontsize=6)
    ax.set_xticks(x, names, rotation=30 if len(names) > 5 else 0)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=7)
    return fig


def scatter_true_pred(task: str, true: list[float], pred: list[float]) -> Figure:
    """A regression task: predicted vs true value on dev, with the diagonal."""
    fig = Figure(figsize=(4.0, 4.0), layout="constrained")
    ax = fig.subplots()
    ax.scatter(true, pred, s=8, alpha=0.6)
    lo, hi = min(true + pred), max(true + pred)
    ax.plot([lo, hi], [lo, hi], color="grey", lw=1)
    ax.set_xlabel("true")
    ax.set_ylabel("predicted")
    ax.set_title(f"{task}: dev predictions")
    return fig


def tradeoff(derived: list[dict]) -> Figure | None:
    """Compression / distillation: the mean dev selection metric against throughput (texts/s) per variant,
    the parent (torch fp32) included, from each derived run's compress_report.json."""
    points = []
    for rep in derived:
        tasks, engines = rep.get("tasks") or {}, rep.get("engines") or {}
        if not tasks or "torch" not in engines or rep.get("engine") not in engines:
            continue
        before = sum(t["dev_before"] for t in tasks.values()) / len(tasks)
        after = sum(t["dev_after"] for t in tasks.values()) / len(tasks)
        points.append(("parent (torch fp32)", engines["torch"]["texts_per_s"], before))
        points.append((f"{rep['run']} ({rep['engine']})", engines[rep["engine"]]["texts_per_s"], after))
    if not points:
        return None
    fig = Figure(figsize=(WIDTH * 0.8, 3.6), layout="constrained")
    ax = fig.subplots()
    for label, x, y in dict(((p[0], p) for p in points)).values():
        ax.scatter([x], [y], s=30)
        ax.annotate(label, (x, y), fontsize=7, xytext=(4, 4), textcoords="offset points")
    ax.set_xlabel("texts/s (batch 32, every head)")
    ax.set_ylabel("mean dev selection metric")
    ax.set_title("accuracy vs throughput per variant")
    return fig
