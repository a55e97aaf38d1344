"""How per-task losses become one update. The training loop calls `weighting.backward(losses, accelerator)`.

This issue ships `static` (L = sum_i alpha_i * L_i with alpha_i from the recipe); adaptive methods
(uncertainty, DWA, GradNorm, PCGrad, FAMO) plug into the same seam."""

from __future__ import annotations

from torch import Tensor


class Static:
    """Fixed loss weights alpha_i (the recipe's `tasks.<name>.weight`). Cost: one backward per micro-batch."""

    def __init__(self, weights: dict[str, float]):
        self.weights = dict(weights)

    def backward(self, losses: dict[str, Tensor], accelerator) -> Tensor:
        """Backpropagate sum_i alpha_i * L_i; returns that weighted total (a scalar tensor)."""
        total = sum(self.weights[name] * loss for name, loss in losses.items())
        accelerator.backward(total)
        return total.detach()

    def current(self) -> dict[str, float]:
        return dict(self.weights)


WEIGHTINGS = {"static": Static}
