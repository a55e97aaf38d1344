"""`mtlm export RUN --task NAME --format hf [--output DIR]`: one task of a run as a standalone Hugging Face
folder (config.json with id2label / label2id, model.safetensors, the tokenizer) that `transformers.pipeline`
loads and that gives mtlm's predictions.

What maps, per task type:
- token_classification -> `AutoModelForTokenClassification` (the encoder's own class; mtlm's head is its
  `classifier`: dropout + linear on every token). `pipeline("token-classification",
  aggregation_strategy="first")` tags each word by its first sub-token, as mtlm does. A word is a
  whitespace-separated word in mtlm but a pre-token in the pipeline, which also splits at punctuation inside
  a word ("O'Gorman" -> O ' Gorman): there the entities can differ.
- extractive_qa -> `AutoModelForQuestionAnswering` (`qa_outputs`: start logit = mtlm's [..., 0], end = [..., 1]).
  transformers 5 has no question-answering pipeline any more: load it with AutoModelForQuestionAnswering.
- classification, regression -> `AutoModelForSequenceClassification`, but not the encoder's own class: HF's
  sequence heads read a [CLS] pooler (BERT: dense + tanh) that mtlm's heads lack, and mtlm pools by mean by
  default. The folder ships `modeling_mtlm.py` (auto_map) keeping mtlm's pooling and linear head, so loading
  needs `trust_remote_code=True`. Regression: num_labels=1, problem_type "regression", the standardised
  target's mean and std folded into the linear layer (outputs are in the target's units).
- multilabel, multiple_choice: refused (ExportError). Multilabel decisions use per-label thresholds tuned on
  dev, which no HF pipeline applies; multiple choice has no pipeline.
The tokenizer's model_max_length is the run's max_length: pass `truncation=True` for longer texts.
A task with private layers (`tasks.<name>.private_layers: K`) is exported with its own top K layers in place
of the shared ones (`mtlm.private_layers.task_backbone_state`): the plain encoder then computes its states.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from mtlm.private_layers import task_backbone_state

MODELING = Path(__file__).with_name("modeling_mtlm.py")
REFUSED = {
    "multilabel": "its decisions use per-label thresholds tuned on dev, which no Hugging Face pipeline applies "
                  "(the scores alone would map: sigmoid of the logits)",
    "multiple_choice": "Hugging Face has no pipeline for multiple choice",
}


class ExportError(ValueError):
    """A task that cannot be exported as asked (type without a one-to-one HF counterpart, unknown task)."""


def _labels(task) -> list[str]:
    return list(task.labels)


def _pooled_folder(model, task, ttype: str, config, out: Path) -> None:
    head = model.heads[task.name].out
    weight, bias = head.weight.detach().clone(), head.bias.detach().clone()
    if ttype == "regression":        # mtlm predicts (y - mean) / std: fold the scale back into the layer
        weight, bias = weight * task.std, bias * task.std + task.mean
        config.num_labels, config.problem_type = 1, "regression"
        config.id2label, config.label2id = {0: "value"}, {"value": 0}
    else:
        labels = _labels(task)
        config.num_labels, config.problem_type = len(labels), "single_label_classification"
        config.id2label = dict(enumerate(labels))
        config.label2id = {lab: i for i, lab in enumerate(labels)}
    config.mtlm_pooling = model.pooling
    config.architectures = ["MtlmForSequenceClassification"]
    config.auto_map = {"AutoModelForSequenceClassification": "modeling_mtlm.MtlmForSequenceClassification"}
    config.save_pretrained(out)
    tensors = {f"backbone.{k}": v.detach().cpu().contiguous()
               for k, v in task_backbone_state(model.backbone, model.private, task.name).items()
               if not k.startswith("pooler.")}
    tensors.update({"classifier.weight": weight.contiguous(), "classifier.bias": bias.contiguous()})
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    text = MODELING.read_text(encoding="utf-8").replace("__CONFIG_CLASS__", type(config).__name__)
    (out / "modeling_mtlm.py").write_text(text, encoding="utf-8")


def _token_folder(model, task, ttype: str, config, out: Path) -> None:
    from transformers import AutoModelForQuestionAnswering, AutoModelForTokenClassification

    if ttype == "token_classification":
        labels = _labels(task)
        config.num_labels = len(labels)
        config.id2label, config.label2id = dict(enumerate(labels)), {lab: i for i, lab in enumerate(labels)}
        auto, attr = AutoModelForTokenClassification, "classifier"
    else:
        config.num_labels = 2
        auto, attr = AutoModelForQuestionAnswering, "qa_outputs"
    hf = auto.from_config(config)
    target = getattr(hf, attr, None)
    if not isinstance(target, torch.nn.Linear):
        raise ExportError(f"{type(hf).__name__} has no linear `{attr}` head to hold mtlm's {ttype} head")
    missing, unexpected = hf.base_model.load_state_dict(
        task_backbone_state(model.backbone, model.private, task.name), strict=False)
    unexpected = [k for k in unexpected if not k.startswith("pooler.")]
    if missing or unexpected:
        raise ExportError(f"the backbone's weights do not fit {type(hf).__name__}: missing {missing[:5]}, "
                          f"unexpected {unexpected[:5]}")
    with torch.no_grad():
        target.weight.copy_(model.heads[task.name].out.weight)
        target.bias.copy_(model.heads[task.name].out.bias)
    hf.save_pretrained(out, safe_serialization=True)


def export_hf(run: str | Path, task_name: str, output: str | Path | None = None) -> Path:
    """Write task `task_name` of run (or bundle) `run` as a Hugging Face folder at `output` (default:
    <run>/hf/<task>; replaced when it exists) and return it. See the module docstring for what maps.
    Raises ExportError (unknown task, a type that does not map), BundleError."""
    from mtlm.checkpoint import find_bundle, load_bundle

    bundle = find_bundle(run)
    model, tokenizer, tasks, meta = load_bundle(bundle, "cpu")
    if task_name not in tasks:
        raise ExportError(f"--task {task_name!r}: the bundle's tasks are {', '.join(tasks)}")
    task = tasks[task_name]
    ttype = meta["tasks"][task_name]["type"]
    if ttype in REFUSED:
        raise ExportError(f"--task {task_name}: a {ttype} task has no one-to-one Hugging Face export: "
                          f"{REFUSED[ttype]}")
    run_dir = bundle.parent if bundle.name == "model" else bundle
    out = Path(output) if output is not None else run_dir / "hf" / task_name
    if out.exists() and not out.is_dir():
        raise ExportError(f"--output {out}: a file is there, not a folder")
    if out.is_dir() and any(out.iterdir()):
        if not (out / "mtlm_export.json").is_file():
            raise ExportError(f"--output {out}: the folder is not empty and holds no earlier export "
                              "(mtlm_export.json); give a new or empty folder")
        shutil.rmtree(out)                 # an earlier export of ours: replaced
    out.mkdir(parents=True, exist_ok=True)
    config = type(model.backbone.config).from_dict(model.backbone.config.to_dict())
    if ttype in ("classification", "regression"):
        _pooled_folder(model, task, ttype, config, out)
    elif ttype in ("token_classification", "extractive_qa"):
        _token_folder(model, task, ttype, config, out)
    else:
        raise ExportError(f"--task {task_name}: task type {ttype!r} has no Hugging Face export")
    tokenizer.model_max_length = meta["max_length"]
    tokenizer.save_pretrained(out)
    (out / "mtlm_export.json").write_text(json.dumps({
        "task": task_name, "type": ttype, "pooling": meta["pooling"], "max_length": meta["max_length"],
        "trust_remote_code": ttype in ("classification", "regression"),
        "task_config": meta["tasks"][task_name]["config"]}, indent=1), encoding="utf-8")
    return out
