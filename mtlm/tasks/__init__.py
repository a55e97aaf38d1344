"""Task types keyed by the `type` name used in recipes. Each value implements `mtlm.tasks.base.TaskType`."""

from mtlm.tasks.classification import Classification
from mtlm.tasks.extractive_qa import ExtractiveQA
from mtlm.tasks.generation import Generation
from mtlm.tasks.multilabel import MultiLabel
from mtlm.tasks.multiple_choice import MultipleChoice
from mtlm.tasks.regression import Regression
from mtlm.tasks.token_classification import TokenClassification

TASK_TYPES = {
    "classification": Classification,
    "multilabel": MultiLabel,
    "regression": Regression,
    "token_classification": TokenClassification,
    "extractive_qa": ExtractiveQA,
    "multiple_choice": MultipleChoice,
    "generation": Generation,
}


def build_task(name: str, cfg):
    """The task-type instance for one recipe task (unfitted)."""
    return TASK_TYPES[cfg.type](name, cfg)


def default_metric(task) -> str:
    return task.cfg.metric or task.metric_names[0]
