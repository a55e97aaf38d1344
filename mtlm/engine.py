"""Engines: what runs the backbone and heads at prediction time.

An engine takes a padded micro-batch (`mtlm.encoded.ModelInputs`) and returns every asked head's output by
task name. `mtlm.predict.Predictor` and the server run the model only through one, so an engine that is not
torch eager (bf16 autocast, an ONNX Runtime session of `MultiTaskModel.infer`, int8) plugs in by name:

    ENGINES = {"torch": TorchEngine}      # name -> factory(model, device) -> Engine

Outputs are torch tensors on the CPU or the model's device, one per task: the head's logits, (rows, ...)
with one row per backbone row (the task types' `decode` regroups multi-row inputs).
"""

from __future__ import annotations

from typing import Callable, Protocol, Sequence

import torch
from torch import Tensor

from mtlm.encoded import ModelInputs


class Engine(Protocol):
    """Runs the backbone once and the asked heads on its states."""

    name: str

    def run(self, inputs: ModelInputs, tasks: Sequence[str]) -> dict[str, Tensor]:
        """{task: logits (rows, ...)} for every task in `tasks` (an engine may compute more heads, e.g. an
        exported graph computes all of them, but returns at least these). Raises KeyError on an unknown task."""
        ...


class TorchEngine:
    """Torch eager on `device` (fp32 as loaded), under `torch.inference_mode()`: one backbone pass, then
    only the asked heads."""

    name = "torch"

    def __init__(self, model, device: torch.device | str = "cpu"):
        self.model, self.device = model, torch.device(device)

    @torch.inference_mode()
    def run(self, inputs: ModelInputs, tasks: Sequence[str]) -> dict[str, Tensor]:
        return self.model.infer(**inputs.to(self.device).as_dict(), tasks=list(tasks))


ENGINES: dict[str, Callable[..., Engine]] = {
    "torch": TorchEngine,
}


def make_engine(name: str, model, device: torch.device | str = "cpu") -> Engine:
    """The engine called `name` for a loaded `MultiTaskModel`. Raises ValueError listing the known names."""
    if name not in ENGINES:
        raise ValueError(f"unknown engine {name!r}; known engines: {', '.join(ENGINES)}")
    return ENGINES[name](model, device)
