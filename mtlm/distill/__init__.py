"""Multi-task knowledge distillation: per-head-type losses (`losses`), teacher outputs cached per row
(`teacher`), the loss hook for `fit` (`hook`), students made of a teacher's own layers (`layers`) and the
`mtlm distill` command (`run`)."""

from mtlm.distill.hook import DistillError, Distiller, distillation_loss
from mtlm.distill.losses import distillation_term

__all__ = ["DistillError", "Distiller", "distillation_loss", "distillation_term"]
