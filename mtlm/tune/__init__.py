"""`mtlm tune`: hyperparameter search with Optuna (`study`: trials, pruning, storage, outputs) over a search
space of recipe settings (`space`: the YAML format and the default space)."""

from mtlm.tune.space import DEFAULT_SPACE, Param, load_space, parse_space
from mtlm.tune.study import format_trials, prepare, run_tune

__all__ = ["DEFAULT_SPACE", "Param", "format_trials", "load_space", "parse_space", "prepare", "run_tune"]
