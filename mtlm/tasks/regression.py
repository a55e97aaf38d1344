"""Regression on a text or text pair: pooled -> dropout -> linear, MSE on the standardised target.

Metrics: Pearson and Spearman correlation (SciPy), MSE. The target is standardised with the train mean and
standard deviation (kept in the bundle) so the loss scale is comparable to the other tasks'."""

from __future__ import annotations

import math
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mtlm.encoded import Encoded
from mtlm.tasks.base import LinearHead, TextTask, check_texts


def _as_number(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, str):
        try:
            v = float(value)
        except ValueError:
            return None
        return v if math.isfinite(v) else None
    return None


class Regression(TextTask):
    roles: ClassVar[dict[str, bool]] = {"text": True, "text_pair": False, "score": True}
    default_columns: ClassVar[dict[str, str]] = {"text": "text", "score": "score"}
    metric_names: ClassVar[tuple[str, ...]] = ("pearson", "spearman", "mse")
    class_role: ClassVar[str | None] = None
    joinable: ClassVar[bool] = True
    lower_is_better: ClassVar[frozenset[str]] = frozenset({"mse"})
    outputs: ClassVar[str] = "real"

    mean: float
    std: float

    def check_row(self, row: dict) -> list[tuple[str, str]]:
        problems = check_texts(self, row)
        col = self.columns()["score"]
        if row.get(col) is None:
            problems.append((col, "missing score"))
        elif _as_number(row[col]) is None:
            problems.append((col, f"expected a finite number, got {row[col]!r}"))
        return problems

    def fit(self, rows: list[dict]) -> None:
        y = np.array([_as_number(r[self.columns()["score"]]) for r in rows])
        self.mean, self.std = float(y.mean()), float(y.std() or 1.0)

    def state(self) -> dict:
        return {"mean": self.mean, "std": self.std}

    def load_state(self, state: dict) -> None:
        self.mean, self.std = float(state["mean"]), float(state["std"])

    def make_head(self, hidden_size: int, dropout: float) -> nn.Module:
        return LinearHead(hidden_size, 1, dropout)

    def label_fields(self, row: dict) -> dict:
        return {"label": (_as_number(row[self.columns()["score"]]) - self.mean) / self.std}

    def collate_labels(self, features: list[dict], seq_len: int) -> dict[str, Tensor]:
        return {"labels": torch.tensor([f["label"] for f in features], dtype=torch.float)}

    def loss(self, logits: Tensor, batch: dict[str, Tensor]) -> Tensor:
        """MSE between logits (batch, 1) and the standardised targets (batch,)."""
        return F.mse_loss(logits.float().squeeze(-1), batch["labels"])

    def predictions(self, logits: Tensor, features: list[dict]) -> list[Any]:
        return (logits.float().squeeze(-1) * self.std + self.mean).tolist()

    def references(self, features: list[dict]) -> list[Any]:
        return [f["label"] * self.std + self.mean for f in features]

    def metrics(self, predictions: list[Any], references: list[Any]) -> dict[str, float]:
        from scipy.stats import pearsonr, spearmanr   # lazy: not resident before evaluation
        p, r = np.asarray(predictions), np.asarray(references)
        constant = p.std() == 0 or r.std() == 0   # correlation undefined: report 0 rather than NaN
        return {
            "pearson": 0.0 if constant else float(pearsonr(p, r).statistic),
            "spearman": 0.0 if constant else float(spearmanr(p, r).statistic),
            "mse": float(((p - r) ** 2).mean()),
        }

    def decode(self, logits: Tensor, inputs: list[Encoded]) -> list[dict]:
        """logits (batch, 1) -> [{"value": float}] in the original units of the score column."""
        return [{"value": v} for v in self.predictions(logits, [])]
