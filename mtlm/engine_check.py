"""Check an engine against torch fp32 on a bundle's own dev rows, and choose the engine a bundle runs by default.

An engine other than torch fp32 (bf16 autocast, an ONNX graph, an int8 graph) is used only after it has
run a bounded sample of the bundle's stored dev rows (`mtlm.contract`: exactly the rows the run was selected
on) next to torch fp32 on the same padded batches. Per head it reports the max absolute difference of the
logits and the agreement of the decisions the task makes from them (classification / tagging: argmax
labels; multilabel: labels over their tuned thresholds; multiple choice: the chosen choice; extractive QA:
the best span; regression has no decision, only the difference). An fp32 engine passes within
FP32_TOLERANCE; a lossy one (bf16, int8) when every head agrees on at least MIN_AGREEMENT of its rows.

`EngineModel` lets `mtlm.evaluate.evaluate` score any engine: it looks like the model's one-task forward.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mtlm.data import collate, length_sorted_batches
from mtlm.encoded import ModelInputs
from mtlm.engine import ENGINES, Engine, EngineError, TorchEngine, make_engine, read_manifest

log = logging.getLogger("mtlm")

CHECK_ROWS = 64            # dev rows per task run by both engines before an engine is used
FP32_TOLERANCE = 1e-3      # max |logit difference| an fp32 engine (onnx) may show on real rows
MIN_AGREEMENT = 0.9        # fewest share of decisions a lossy engine (bf16, int8) must keep, per head
AGREEMENT_SLACK = 0.05    # a lossy engine accepted with lower agreement (`mtlm compress`) may lose this much more
LOSSY = ("torch-bf16", "onnx-int8")


class EngineModel:
    """An engine dressed as `MultiTaskModel`'s one-task forward, `model(task=name, input_ids, attention_mask,
    token_type_ids?) -> logits`, so `mtlm.evaluate.evaluate` scores any engine on the same code path."""

    def __init__(self, engine: Engine):
        self.engine = engine

    def eval(self) -> EngineModel:
        return self

    def __call__(self, task: str, input_ids, attention_mask, token_type_ids=None):
        return self.engine.run(ModelInputs(input_ids, attention_mask, token_type_ids), [task])[task]


def decisions(task, logits: torch.Tensor, features: list[dict]) -> list[Any] | None:
    """What the task decides from a batch's logits, one comparable value per feature; None for regression
    (a real value, no decision)."""
    kind = task.cfg.type
    if kind == "regression":
        return None
    preds = task.predictions(logits.float(), features)
    if kind == "multilabel":
        return [tuple(np.asarray(p) >= np.asarray(task.thresholds)) for p in preds]
    if kind == "multiple_choice":
        return [int(np.argmax(p)) for p in preds]
    if kind == "extractive_qa":
        return [(p["start"], p["end"]) for p in preds]
    return preds


@dataclass
class HeadCheck:
    """One head's comparison: rows compared, max |logit difference|, share of equal decisions (None for
    regression)."""

    task: str
    rows: int
    max_abs_diff: float
    agreement: float | None

    def as_dict(self) -> dict:
        return {"rows": self.rows, "max_abs_diff": self.max_abs_diff, "agreement": self.agreement}


def compare(engine: Engine, reference: Engine, tasks: dict, features: dict[str, list[dict]], pad_token_id: int,
            batch_size: int = 32) -> dict[str, HeadCheck]:
    """Run `engine` and `reference` on the same padded batches of each task's `features` (its encoded rows)
    -> {task: HeadCheck}. Tasks without features are left out."""
    out = {}
    for name, feats in features.items():
        if not feats:
            continue
        task, diff, same, counted = tasks[name], 0.0, 0, 0
        for idx in length_sorted_batches([f["length"] for f in feats], batch_size):
            chunk = [feats[i] for i in idx]
            batch = collate(task, chunk, pad_token_id)
            inputs = ModelInputs.from_dict(batch)
            got, want = engine.run(inputs, [name])[name].float(), reference.run(inputs, [name])[name].float()
            diff = max(diff, float((got.cpu() - want.cpu()).abs().max()))
            a, b = decisions(task, got, chunk), decisions(task, want, chunk)
            if a is not None:
                same += sum(x == y for x, y in zip(a, b))
                counted += len(a)
        out[name] = HeadCheck(name, len(feats), diff, same / counted if counted else None)
    return out


def failures(name: str, checks: dict[str, HeadCheck], recorded: dict | None = None) -> list[str]:
    """The heads where engine `name` fails its check, one line each (empty: it passes). A lossy engine needs
    MIN_AGREEMENT per head, or, where `recorded` ({task: {"agreement"}}, the check made when the engine was
    accepted within its accuracy budget by `mtlm compress` on the same rows) is lower, that minus
    AGREEMENT_SLACK: the budget judged the metric, this check judges that this machine runs it the same."""
    bad = []
    for c in checks.values():
        if name in LOSSY:
            then = ((recorded or {}).get(c.task) or {}).get("agreement")
            need = MIN_AGREEMENT if then is None else min(MIN_AGREEMENT, then - AGREEMENT_SLACK)
            if c.agreement is not None and c.agreement < need:
                bad.append(f"{c.task}: {c.agreement:.1%} of {c.rows} dev rows keep torch fp32's decision "
                           f"(needs {need:.0%}" + ("" if then is None else f"; {then:.1%} when it was made") + ")")
        elif c.max_abs_diff > FP32_TOLERANCE:
            bad.append(f"{c.task}: logits differ from torch fp32 by up to {c.max_abs_diff:.2e} "
                       f"(an fp32 engine must stay within {FP32_TOLERANCE:g})")
    return bad


def format_checks(checks: dict[str, HeadCheck]) -> str:
    return "; ".join(f"{c.task}: max|diff| {c.max_abs_diff:.2e}"
                     + ("" if c.agreement is None else f", agreement {c.agreement:.1%}") + f" ({c.rows} rows)"
                     for c in checks.values())


def dev_features(bundle: Path, tasks: dict, tokenizer, max_length: int, rows: int | None = CHECK_ROWS,
                 split: str = "dev") -> dict[str, list[dict]]:
    """{task: encoded features of its first `rows` stored `split` rows (all when None)} read through the run's
    evaluation contract (a derived run: its parent's). Raises ContractError when the run has no contract or
    its data cannot be read."""
    from mtlm.contract import ContractError, find_contract, load_split_rows

    run_dir = bundle.parent if bundle.name == "model" else bundle
    found = find_contract(run_dir)
    if found is None:
        raise ContractError([f"{run_dir}: no stored evaluation contract (contract.json), so no {split} rows to "
                             f"check an engine on"])
    contract, contract_dir = found
    split_rows = load_split_rows(contract, contract_dir, split, list(tasks))
    return {n: tasks[n].encode(r.records[:rows] if rows else r.records, tokenizer, max_length)
            for n, r in split_rows.items()}


def default_order(bundle: Path) -> list[str]:
    """The engines the bundle holds, fastest first as measured when they were made (engines.json), then torch."""
    manifest = read_manifest(bundle)
    speed = (manifest.get("measured") or {}).get("texts_per_s") or {}
    held = [n for n in (manifest.get("engines") or {}) if n in ENGINES] + ["torch"]
    return sorted(dict.fromkeys(held), key=lambda n: -speed.get(n, 0.0))


def choose_engine(bundle: Path, model, tokenizer, tasks: dict, meta: dict, device: torch.device,
                  requested: str | None = None) -> Engine:
    """The engine to run a loaded bundle with: `requested`, or by default the fastest engine the bundle holds
    (`default_order`) that runs on this machine and passes its check against torch fp32 on CHECK_ROWS dev
    rows per task (torch itself when none does). A requested engine that cannot run here or fails the check
    raises EngineError saying why; a default candidate that does is skipped with a warning. When the dev rows
    cannot be read (no contract, data moved) the engine is used unchecked, with a warning."""
    if requested is not None and requested not in ENGINES:
        raise EngineError(f"unknown engine {requested!r}; known engines: {', '.join(ENGINES)}")
    reference = TorchEngine(model, device)
    features = None
    for name in [requested] if requested else default_order(bundle):
        if name == "torch":
            return reference
        try:
            engine = make_engine(name, model, device, bundle)
        except EngineError as e:
            if requested:
                raise
            log.warning("%s; falling back to the next engine", e)
            continue
        if features is None:
            from mtlm.contract import ContractError
            try:
                features = dev_features(Path(bundle), tasks, tokenizer, int(meta["max_length"]))
            except ContractError as e:
                log.warning("engine %s NOT checked against torch fp32 (the dev rows cannot be read): %s", name, e)
                return engine
        checks = compare(engine, reference, tasks, features, tokenizer.pad_token_id)
        bad = failures(name, checks, (read_manifest(bundle).get("engines", {}).get(name) or {}).get("check"))
        if not bad:
            log.info("engine %s checked against torch fp32 on dev rows: %s", name, format_checks(checks))
            return engine
        message = f"engine {name} fails its check against torch fp32 on this machine: " + "; ".join(bad)
        if requested:
            raise EngineError(message + "; use --engine torch")
        log.warning("%s; falling back to the next engine", message)
    return reference
