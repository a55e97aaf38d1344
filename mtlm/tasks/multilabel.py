"""Multi-label classification: pooled -> dropout -> linear, sigmoid, one threshold per label; BCE loss.

Metrics: micro-F1, macro-F1, subset accuracy (scikit-learn). Thresholds start at the task's `threshold`
and are tuned per label on dev after training (`tune_thresholds`)."""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mtlm.encoded import Encoded
from mtlm.tasks.base import LinearHead, TextTask, as_label, check_texts, label_sort_key


class MultiLabel(TextTask):
    roles: ClassVar[dict[str, bool]] = {"text": True, "text_pair": False, "labels": True}
    default_columns: ClassVar[dict[str, str]] = {"text": "text", "labels": "labels"}
    metric_names: ClassVar[tuple[str, ...]] = ("micro_f1", "macro_f1", "subset_accuracy")
    class_role: ClassVar[str | None] = None     # a label set per row: splits are not stratified
    joinable: ClassVar[bool] = True
    lower_is_better: ClassVar[frozenset[str]] = frozenset()
    outputs: ClassVar[str] = "bernoulli"

    labels: list[str]
    thresholds: list[float]

    def _row_labels(self, row: dict) -> list[str] | None:
        value = row.get(self.columns()["labels"])
        if isinstance(value, str):
            value = [v for v in value.split(self.cfg.label_separator) if v.strip()]
        if not isinstance(value, (list, tuple)):
            return None
        labels = [as_label(v) for v in value]
        return None if any(v is None for v in labels) else labels

    def check_row(self, row: dict) -> list[tuple[str, str]]:
        problems = check_texts(self, row)
        col = self.columns()["labels"]
        if row.get(col) is None:
            problems.append((col, "missing labels"))
        elif self._row_labels(row) is None:
            problems.append((col, f"expected a list of labels or a '{self.cfg.label_separator}'-separated "
                                  f"string, got {row[col]!r}"))
        return problems

    def fit(self, rows: list[dict]) -> None:
        self.labels = sorted({lab for r in rows for lab in self._row_labels(r)}, key=label_sort_key)
        self.thresholds = [self.cfg.threshold] * len(self.labels)
        self._index = {label: i for i, label in enumerate(self.labels)}

    def check_eval_rows(self, rows: list[dict]) -> list[str]:
        unseen = sorted({lab for r in rows for lab in self._row_labels(r)} - set(self.labels), key=label_sort_key)
        return [f"label(s) not seen in train: {', '.join(map(repr, unseen[:10]))}"] if unseen else []

    def state(self) -> dict:
        return {"labels": self.labels, "thresholds": self.thresholds}

    def load_state(self, state: dict) -> None:
        self.labels = list(state["labels"])
        self.thresholds = [float(t) for t in state["thresholds"]]
        self._index = {label: i for i, label in enumerate(self.labels)}

    def make_head(self, hidden_size: int, dropout: float) -> nn.Module:
        return LinearHead(hidden_size, len(self.labels), dropout)

    def label_fields(self, row: dict) -> dict:
        target = [0.0] * len(self.labels)
        for lab in self._row_labels(row):
            target[self._index[lab]] = 1.0
        return {"label": target}

    def collate_labels(self, features: list[dict], seq_len: int) -> dict[str, Tensor]:
        return {"labels": torch.tensor([f["label"] for f in features], dtype=torch.float)}

    def loss(self, logits: Tensor, batch: dict[str, Tensor]) -> Tensor:
        """Mean binary cross-entropy over (batch, num_labels)."""
        return F.binary_cross_entropy_with_logits(logits.float(), batch["labels"])

    def predictions(self, logits: Tensor, features: list[dict]) -> list[Any]:
        return logits.float().sigmoid().tolist()   # probabilities; thresholds apply in metrics

    def references(self, features: list[dict]) -> list[Any]:
        return [f["label"] for f in features]

    def metrics(self, predictions: list[Any], references: list[Any]) -> dict[str, float]:
        from sklearn.metrics import accuracy_score, f1_score   # lazy: ~100 MB resident, not before evaluation
        pred = (np.asarray(predictions) >= np.asarray(self.thresholds)).astype(int)
        gold = np.asarray(references).astype(int)
        return {
            "micro_f1": float(f1_score(gold, pred, average="micro", zero_division=0)),
            "macro_f1": float(f1_score(gold, pred, average="macro", zero_division=0)),
            "subset_accuracy": float(accuracy_score(gold, pred)),
        }

    def tune_thresholds(self, predictions: list[Any], references: list[Any]) -> None:
        """Per label, the threshold in 0.05..0.95 that maximises that label's F1 on these (dev) rows."""
        from sklearn.metrics import f1_score
        probs, gold = np.asarray(predictions), np.asarray(references).astype(int)
        grid = np.arange(0.05, 0.96, 0.05)
        for j in range(len(self.labels)):
            scores = [f1_score(gold[:, j], (probs[:, j] >= t).astype(int), zero_division=0) for t in grid]
            if max(scores) > 0:
                self.thresholds[j] = float(grid[int(np.argmax(scores))])

    def decode(self, logits: Tensor, inputs: list[Encoded]) -> list[dict]:
        """logits (batch, num_labels) -> [{"labels": [names over threshold], "scores": {name: p}}]."""
        out = []
        for p in logits.float().sigmoid().tolist():
            out.append({"labels": [lab for lab, q, t in zip(self.labels, p, self.thresholds) if q >= t],
                        "scores": dict(zip(self.labels, p))})
        return out
