"""The recipe: typed config, YAML loading, dotted overrides, and every error reported at once.

A recipe names a backbone, a set of tasks keyed by task name, and the training settings.
`load_recipe(path, overrides)` returns a validated `Recipe` or raises `RecipeError` whose message lists
every problem with its dotted path (``tasks.topic.columns.label: ...``). Checks that need the data
(columns present, dev labels seen in train) happen in `mtlm.data` and raise the same error type.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator


class RecipeError(Exception):
    """An invalid recipe or data set. ``problems`` holds one ``path: message`` line per problem."""

    def __init__(self, problems: list[str], header: str = "invalid recipe"):
        self.problems = list(problems)
        super().__init__(f"{header} ({len(problems)} problem{'s' if len(problems) != 1 else ''}):\n"
                         + "\n".join(f"  - {p}" for p in problems))


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(_Strict):
    train: str                                   # file path (relative to the recipe), builtin:<name>, or hub id
    dev: str | None = None                       # optional; made from train by `split` when absent
    test: str | None = None                      # optional; made from train by `split` when absent
    split: dict[Literal["dev", "test"], float] = Field(default_factory=lambda: {"dev": 0.1, "test": 0.1})
    limit: dict[Literal["train", "dev", "test"], int] = Field(default_factory=dict)  # seeded row caps per split

    @model_validator(mode="after")
    def _check(self) -> "DataConfig":
        if any(not 0 <= f < 1 for f in self.split.values()) or sum(self.split.values()) >= 1:
            raise ValueError("split fractions must be in [0, 1) and sum to less than 1")
        if any(n <= 0 for n in self.limit.values()):
            raise ValueError("limit values must be positive")
        return self


class TaskConfig(_Strict):
    type: str                                    # a key of mtlm.tasks.TASK_TYPES
    data: DataConfig
    columns: dict[str, str | list[str]] = Field(default_factory=dict)  # role -> column name (a list only for
    #                                            multiple_choice `choices` given as several columns)
    weight: float = Field(1.0, ge=0)             # alpha_i in L = sum_i alpha_i * L_i
    private_layers: int = Field(0, ge=0)         # K: this task's own copy of the backbone's top K layers
    #                                            (the lower layers stay shared and run once); 0 = fully shared
    head_lr: float | None = Field(None, gt=0)    # this task's head peak lr (absolute); None = train.head_lr
    metric: str | None = None                    # selection metric; the task type's default when None
    on_bad_rows: Literal["error", "skip"] = "error"
    label_separator: str = ","                   # multilabel: separator when labels come as one string
    threshold: float = Field(0.5, gt=0, lt=1)    # multilabel: initial per-label probability threshold
    doc_stride: int = Field(128, gt=0)           # extractive_qa: tokens shared by consecutive windows of a long context
    max_answer_length: int = Field(30, gt=0)     # extractive_qa: longest predicted answer, in tokens
    n_best: int = Field(20, gt=0)                # extractive_qa: start and end candidates searched per window
    allow_no_answer: bool = False                # extractive_qa: rows may have no answer (SQuAD v2)
    no_answer_threshold: float = 0.0             # extractive_qa: answer nothing when p(null) - p(best span) > this
    template: str | None = None                  # generation: prompt as a format string over columns ("Q: {question}")
    max_new_tokens: int = Field(32, gt=0)        # generation: longest generated continuation, in tokens
    generate: dict[str, Any] = Field(default_factory=dict)  # generation: decoding options (num_beams, do_sample, ...)


class WeightingConfig(BaseModel):
    """`train.weighting`: how per-task losses become one update. `name` is a key of
    `mtlm.weighting.WEIGHTINGS`; every other key is an option of that method (checked against its Options
    model when the recipe is parsed). A plain string is shorthand for `{name: <string>}`."""

    model_config = ConfigDict(extra="allow", validate_assignment=True)
    name: str = "static"

    def options(self) -> dict[str, Any]:
        """The method's options (every key but `name`)."""
        return dict(self.model_extra or {})


class AdversarialConfig(_Strict):
    """`train.adversarial`: perturbed-embedding training (mtlm.adversarial). `epsilon` None = the method's
    default: fgm 1.0 (L2 norm of the word-embedding matrix perturbation), smart 1e-5 (l-inf radius of the
    per-token perturbation, Jiang et al. 2020)."""

    method: Literal["none", "fgm", "smart"] = "none"
    epsilon: float | None = Field(None, gt=0)    # perturbation size; None = the method's default (above)
    weight: float = Field(1.0, gt=0)             # fgm: weight of the adversarial loss; smart: lambda_s
    step_size: float = Field(1e-3, gt=0)         # smart: eta, the projected gradient-ascent step
    noise: float = Field(1e-5, gt=0)             # smart: sigma of the random initial perturbation

    @model_validator(mode="after")
    def _check(self) -> "AdversarialConfig":
        # an option the method does not read would be silently ignored: say so (defaults are fine: a saved
        # recipe lists every option)
        reads = {"none": set(), "fgm": {"epsilon", "weight"}, "smart": {"epsilon", "weight", "step_size", "noise"}}
        unused = sorted(f for f in type(self).model_fields if f != "method"
                        if f not in reads[self.method] and getattr(self, f) != type(self).model_fields[f].default)
        if unused:
            raise ValueError(f"{', '.join(unused)}: not an option of method {self.method!r} "
                             f"(its options: {', '.join(sorted(reads[self.method])) or 'none'})")
        return self


class FsdpConfig(_Strict):
    """`train.fsdp`: shard parameters, gradients and optimizer state across the processes (FSDP2 through
    Accelerate, `mtlm.sharding`), for backbones that do not fit one device. `true` = these defaults."""

    reshard_after_forward: bool = True           # free a unit's gathered weights after its forward (gathered
    #                                            again for backward: least memory); false keeps them to backward
    min_num_params: int | None = Field(None, gt=0)  # size-based units (modules of at least this many
    #                                            parameters); None = one unit per backbone layer
    cpu_offload: bool = False                    # keep the shards (and the optimizer step) in CPU memory (GPUs)


# what train.fsdp cannot shard (each reason says why)
FSDP_REFUSED_WEIGHTINGS = {"gradnorm": "its gradient norms are taken w.r.t. one backbone weight, which FSDP shards",
                           "pcgrad": "it combines the backbone's per-task gradients, which FSDP shards",
                           "cagrad": "it combines the backbone's per-task gradients, which FSDP shards",
                           "uncertainty": "its log-variances share the model's AdamW, whose state FSDP keys by "
                                          "the model's (sharded) parameters"}


class TrainConfig(_Strict):
    batch_size: int = Field(32, gt=0)            # micro-batch size per process
    eval_batch_size: int = Field(64, gt=0)
    max_steps: int | None = Field(None, gt=0)    # optimizer steps; or give epochs
    epochs: float | None = Field(None, gt=0)     # passes over all tasks' train rows (sum of sizes / global batch)
    lr: float = Field(5e-5, gt=0)                # peak learning rate, reached after warmup
    # peak lr of the task heads (absolute, as in a torch param group; e.g. 1e-3 with lr 5e-5); None = lr.
    # tasks.<name>.head_lr overrides it per task. Private layers (tasks.<name>.private_layers) use lr.
    head_lr: float | None = Field(None, gt=0)
    head_warmup_steps: int = Field(0, ge=0)      # first optimizer steps: heads train alone, backbone frozen
    # none: each task's loss as its type computes it; initial: divided by its first value (mtlm.loss_normalization)
    loss_normalization: Literal["none", "initial"] = "none"
    weight_decay: float = Field(0.01, ge=0)      # AdamW decoupled L2; not on biases / LayerNorm
    warmup_ratio: float = Field(0.06, ge=0, lt=1)
    scheduler: Literal["linear", "cosine", "constant"] = "linear"
    dropout: float = Field(0.1, ge=0, lt=1)      # heads and backbone hidden dropout
    grad_accum: int = Field(1, gt=0)             # micro-batches per optimizer step, per process
    max_grad_norm: float | None = Field(1.0, gt=0)
    # auto: bf16 autocast where the GPU / CPU computes bf16 natively (AVX512-BF16, AMX), else fp32
    # (mtlm.precision); bf16 on a CPU without it falls back to fp32 with a warning; fp16 needs a GPU
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = "auto"
    sampling: Literal["proportional", "temperature", "round_robin", "annealed"] = "proportional"
    temperature: float = Field(2.0, gt=0)        # temperature sampling: p_i proportional to n_i^(1/T)
    weighting: WeightingConfig = Field(default_factory=WeightingConfig)  # static | uncertainty | dwa | ...
    adversarial: AdversarialConfig = Field(default_factory=AdversarialConfig)  # none | fgm | smart
    # sampled: each micro-batch serves one source drawn by `sampling`; all_tasks: each optimizer step takes
    # one micro-batch of every source (task or joint group) per accumulation round; auto: all_tasks when the
    # weighting needs every task in every step (gradnorm, pcgrad, cagrad, famo), else sampled
    step_mode: Literal["auto", "sampled", "all_tasks"] = "auto"
    group_by_length: bool = True                 # length-grouped micro-batches (less padding)
    # several examples of one source per backbone row (rows of up to max_length tokens, the cheapest layout
    # per micro-batch, plain rows where that is one example per row; attention within each example;
    # batch_size still counts examples): mtlm.packing. Not for extractive QA / multiple choice
    packing: bool = False
    compile: bool = False                        # torch.compile(dynamic=True) on the backbone (mtlm.compiled)
    # false | true | {reshard_after_forward, min_num_params, cpu_offload}: sharded training (FSDP2,
    # mtlm.sharding); needs several processes (accelerate launch --multi_gpu --num_processes N)
    fsdp: FsdpConfig | None = None
    eval_every: int = Field(200, gt=0)           # optimizer steps between evaluations on dev
    checkpoint_every: int | None = Field(None, gt=0)  # defaults to eval_every
    keep_checkpoints: int = Field(1, gt=0)       # resumable checkpoints kept on disk
    early_stopping_patience: int | None = Field(5, gt=0)  # evaluations without improvement; None = off
    seed: int = 0
    # experiment tracking (mtlm.tracking): tensorboard -> run_dir/logs; mlflow -> tracking_uri, or
    # run_dir/mlruns (a local file store) when none is given
    tracking: list[Literal["tensorboard", "mlflow"]] = Field(default_factory=lambda: ["tensorboard"])
    tracking_uri: str | None = None              # mlflow: e.g. http://mlflow:5000, sqlite:///mlflow.db
    experiment: str | None = None                # mlflow experiment name; default: the recipe's name

    @field_validator("mixed_precision", mode="before")
    @classmethod
    def _yaml_no(cls, v: Any) -> Any:
        return "no" if v is False else v      # YAML 1.1 reads an unquoted `no` as false

    @field_validator("fsdp", mode="before")
    @classmethod
    def _fsdp_bool(cls, v: Any) -> Any:
        if v is True or v is False or v is None or isinstance(v, dict):   # `fsdp: true` = the defaults; false = off
            return {} if v is True else None if v is False else v
        raise ValueError(f"must be true, false or a mapping of {{reshard_after_forward, min_num_params, cpu_offload}}, "
                         f"not {v!r}")

    @field_validator("weighting", mode="before")
    @classmethod
    def _weighting_name(cls, v: Any) -> Any:
        return {"name": v} if isinstance(v, str) else v   # `weighting: pcgrad` = `weighting: {name: pcgrad}`

    @model_validator(mode="after")
    def _check(self) -> "TrainConfig":
        if self.max_steps is None and self.epochs is None:
            self.max_steps = 1000
        if self.max_steps is not None and self.epochs is not None:
            raise ValueError("give max_steps or epochs, not both")
        if self.fsdp is not None:
            if self.weighting.name in FSDP_REFUSED_WEIGHTINGS:
                raise ValueError(f"fsdp: not with weighting {self.weighting.name} "
                                 f"({FSDP_REFUSED_WEIGHTINGS[self.weighting.name]}); use static, dwa or famo")
            if self.adversarial.method != "none":
                raise ValueError(f"fsdp: not with adversarial.method {self.adversarial.method} (it perturbs the "
                                 f"word-embedding weights or states outside the sharded forward)")
            if self.compile:
                raise ValueError("fsdp: not with compile (torch.compile of a backbone FSDP then shards is untested)")
        if self.max_steps is not None and self.head_warmup_steps >= self.max_steps:
            raise ValueError(f"head_warmup_steps ({self.head_warmup_steps}) must be less than max_steps "
                             f"({self.max_steps}): the backbone would never train")
        return self


class DistillConfig(_Strict):
    """`distill:` options of `mtlm distill` (and of `mtlm compress --method layers`' recovery training);
    `mtlm train` does not read them. See `mtlm.distill.hook` for the loss they set."""

    temperature: float = Field(2.0, gt=0)        # T of the softened softmax / sigmoid; the KL is x T^2 (Hinton et al. 2015)
    alpha: float = Field(0.5, ge=0, le=1)        # weight of the teacher term; 1 - alpha on the hard-label loss
    hidden: float = Field(0.0, ge=0)             # weight of the pooled hidden-state MSE through a learned projection; 0 = off
    anneal: bool = False                         # teacher annealing (BAM!, Clark et al. 2019): alpha -> 0 over training
    layer_choice: Literal["alternate", "top"] = "alternate"  # layers:N students: which teacher layers to keep


class AdapterConfig(_Strict):
    """`adapters:` LoRA adapters on the backbone (Hu et al. 2022, through PEFT; `mtlm.adapters`). The backbone's
    own weights are frozen unless `train_backbone`; the heads always train."""

    type: Literal["lora"] = "lora"
    r: int = Field(8, gt=0)                      # rank of each low-rank update B @ A
    alpha: float = Field(16.0, gt=0)             # the update is scaled by alpha / r
    dropout: float = Field(0.05, ge=0, lt=1)     # dropout on the adapter's input
    target_modules: list[str] = Field(default_factory=lambda: ["q_proj", "v_proj"])  # module names (last part)
    per_task: bool = False                       # one adapter per task (else one shared adapter)
    layers: str = "all"                          # all | top:K: adapters only in the top K layers (lower ones shared)
    train_backbone: bool = False                 # also train the backbone's own weights

    @field_validator("layers")
    @classmethod
    def _layers(cls, v: str) -> str:
        if v == "all":
            return v
        head, _, k = v.partition(":")
        if head != "top" or not k.isdigit() or int(k) < 1:
            raise ValueError(f"must be 'all' or 'top:K' with K >= 1 (got {v!r})")
        return v

    def top_layers(self, total: int) -> int:
        """How many of the backbone's `total` layers (from the top) carry adapters."""
        return total if self.layers == "all" else min(total, int(self.layers.split(":")[1]))


class Recipe(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    backbone: str = "minilm-l6"                  # short name (mtlm.model.BACKBONES), local HF folder, or hub id
    pooling: Literal["mean", "cls", "last"] = "mean"   # last: the last real token (decoders); cls: encoders only
    max_length: int = Field(128, gt=8)           # tokens per input after truncation
    output_dir: str | None = None                # default runs/<name>
    tasks: dict[str, TaskConfig]
    train: TrainConfig = Field(default_factory=TrainConfig)
    adapters: AdapterConfig | None = None        # LoRA on the backbone (mtlm.adapters); None = full fine-tuning
    distill: DistillConfig | None = None         # read by `mtlm distill` only

    _base_dir: Path = PrivateAttr(default_factory=Path.cwd)

    @model_validator(mode="after")
    def _check(self) -> "Recipe":
        if not self.tasks:
            raise ValueError("a recipe needs at least one task")
        bad = [t for t in self.tasks if not t.replace("_", "").replace("-", "").isalnum()]
        if bad:
            raise ValueError(f"task names must be letters, digits, '_' or '-': {bad}")
        if self.train.fsdp is not None:      # what runs backbone pieces outside the sharded model's forward
            if self.adapters is not None:
                raise ValueError("train.fsdp: not with adapters (LoRA runs the backbone's layers one by one, "
                                 "outside the sharded forward)")
            private = [n for n, t in self.tasks.items() if t.private_layers]
            if private:
                raise ValueError(f"train.fsdp: not with private_layers (tasks {', '.join(private)}: their layers "
                                 f"run on the backbone's pieces, outside the sharded forward)")
            generation = [n for n, t in self.tasks.items() if t.type == "generation"]
            if generation:
                raise ValueError(f"train.fsdp: not with generation tasks ({', '.join(generation)}: decoding "
                                 f"calls the backbone's generate, outside the sharded forward)")
        return self

    @property
    def base_dir(self) -> Path:
        """Folder that relative data paths resolve against (the recipe's folder)."""
        return self._base_dir

    def run_dir(self) -> Path:
        out = Path(self.output_dir) if self.output_dir else Path("runs") / self.name
        return out if out.is_absolute() else (Path.cwd() / out)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json", exclude_none=True), sort_keys=False)


def recipe_changes(old: dict, new: dict, prefix: str = "") -> list[str]:
    """The settings that differ between two recipe dicts (e.g. yaml.safe_load of two `Recipe.to_yaml()`),
    one "path: old -> new" line each, paths dotted (`train.lr: 0.0001 -> 0.0002`), in sorted order."""
    out = []
    for key in sorted(set(old) | set(new), key=str):
        a, b, path = old.get(key), new.get(key), f"{prefix}{key}"
        if isinstance(a, dict) and isinstance(b, dict):
            out += recipe_changes(a, b, path + ".")
        elif a != b:
            out.append(f"{path}: {a!r} -> {b!r}")
    return out


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Return a copy of `raw` with ``a.b.c=value`` overrides applied (values parsed as YAML).

    Raises RecipeError listing every malformed override."""
    out, problems = copy.deepcopy(raw), []
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key or any(not p for p in key.split(".")):
            problems.append(f"override '{item}': expected key.path=value")
            continue
        node: Any = out
        parts = key.split(".")
        for p in parts[:-1]:
            if not isinstance(node.get(p), dict):
                node[p] = {}
            node = node[p]
        try:
            node[parts[-1]] = yaml.safe_load(value) if value != "" else None
        except yaml.YAMLError as e:
            problems.append(f"override '{item}': the value is not valid YAML ({str(e).splitlines()[0]})")
    if problems:
        raise RecipeError(problems)
    return out


def _format_loc(loc: tuple) -> str:
    return ".".join(str(p) for p in loc if not (isinstance(p, str) and p.startswith("function-after")))


def validation_problems(err: ValidationError) -> list[str]:
    """One ``path: message`` line per pydantic error."""
    out = []
    for e in err.errors():
        path = _format_loc(e["loc"]) or "recipe"
        msg = "unknown key" if e["type"] == "extra_forbidden" else e["msg"].removeprefix("Value error, ")
        if e["type"] not in ("extra_forbidden", "missing") and "input" in e and not isinstance(e["input"], dict):
            msg += f" (got {e['input']!r})"
        out.append(f"{path}: {msg}")
    return out
