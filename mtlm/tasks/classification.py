"""Single-text or text-pair classification: pooled -> dropout -> linear, cross-entropy.

Metrics: accuracy, macro-F1, Matthews correlation (scikit-learn)."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mtlm.encoded import Encoded
from mtlm.tasks.base import LinearHead, TextTask, as_label, check_texts, label_sort_key


class Classification(TextTask):
    roles: ClassVar[dict[str, bool]] = {"text": True, "text_pair": False, "label": True}
    default_columns: ClassVar[dict[str, str]] = {"text": "text", "label": "label"}
    metric_names: ClassVar[tuple[str, ...]] = ("accuracy", "macro_f1", "mcc")
    class_role: ClassVar[str | None] = "label"
    joinable: ClassVar[bool] = True
    lower_is_better: ClassVar[frozenset[str]] = frozenset()
    outputs: ClassVar[str] = "categorical"

    labels: list[str]

    def check_row(self, row: dict) -> list[tuple[str, str]]:
        problems = check_texts(self, row)
        col = self.columns()["label"]
        if row.get(col) is None:
            problems.append((col, "missing label"))
        elif as_label(row[col]) is None:
            problems.append((col, f"expected a class label (text or integer), got {row[col]!r}"))
        return problems

    def fit(self, rows: list[dict]) -> None:
        col = self.columns()["label"]
        self.labels = sorted({as_label(r[col]) for r in rows}, key=label_sort_key)
        self._index = {label: i for i, label in enumerate(self.labels)}

    def check_eval_rows(self, rows: list[dict]) -> list[str]:
        col = self.columns()["label"]
        unseen = sorted({as_label(r[col]) for r in rows} - set(self.labels), key=label_sort_key)
        return [f"label(s) not seen in train: {', '.join(map(repr, unseen[:10]))}"] if unseen else []

    def state(self) -> dict:
        return {"labels": self.labels}

    def load_state(self, state: dict) -> None:
        self.labels = list(state["labels"])
        self._index = {label: i for i, label in enumerate(self.labels)}

    def make_head(self, hidden_size: int, dropout: float) -> nn.Module:
        return LinearHead(hidden_size, len(self.labels), dropout)

    def label_fields(self, row: dict) -> dict:
        return {"label": self._index[as_label(row[self.columns()["label"]])]}

    def collate_labels(self, features: list[dict], seq_len: int) -> dict[str, Tensor]:
        return {"labels": torch.tensor([f["label"] for f in features], dtype=torch.long)}

    def loss(self, logits: Tensor, batch: dict[str, Tensor]) -> Tensor:
        """Mean cross-entropy. logits (batch, num_labels), batch["labels"] (batch,)."""
        return F.cross_entropy(logits.float(), batch["labels"])

    def predictions(self, logits: Tensor, features: list[dict]) -> list[Any]:
        return logits.argmax(-1).tolist()

    def references(self, features: list[dict]) -> list[Any]:
        return [f["label"] for f in features]

    def metrics(self, predictions: list[Any], references: list[Any]) -> dict[str, float]:
        """accuracy, macro-F1 over EVERY known label (a class absent from both references and predictions
        counts as F1 0, so a split missing a class cannot inflate it; as multilabel's macro-F1), MCC."""
        from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef   # lazy: ~100 MB resident
        known = range(len(self.labels)) if hasattr(self, "labels") else ()     # unfitted: the labels present
        every = sorted(set(known) | set(references) | set(predictions))
        return {
            "accuracy": float(accuracy_score(references, predictions)),
            "macro_f1": float(f1_score(references, predictions, labels=every, average="macro", zero_division=0)),
            "mcc": float(matthews_corrcoef(references, predictions)),
        }

    def decode(self, logits: Tensor, inputs: list[Encoded]) -> list[dict]:
        """logits (batch, num_labels) -> [{"label": name, "score": p, "scores": {name: p}}]."""
        probs = logits.float().softmax(-1).tolist()
        out = []
        for p in probs:
            best = max(range(len(p)), key=p.__getitem__)
            out.append({"label": self.labels[best], "score": p[best],
                        "scores": dict(zip(self.labels, p))})
        return out
