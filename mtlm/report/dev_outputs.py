"""Per-task predictions on the run's stored dev rows (contract.json, `mtlm.contract`), through the same
`evaluate.task_outputs` that training's evaluation uses, turned into what the report draws: confusion
matrices (classification), per-entity-type P/R/F1 (tagging, seqeval), EM/F1 (extractive QA), predicted vs
true values (regression), per-label F1 (multilabel), accuracy (multiple choice)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch


def dev_outputs(run_dir: Path, batch_size: int = 64) -> dict[str, dict]:
    """{task: {"type", "metrics", ...what its figure needs}} for every task with dev rows; {} when the run has
    no stored contract. Raises BundleError, ContractError (a data file changed or is missing)."""
    from mtlm.checkpoint import find_bundle, load_bundle
    from mtlm.contract import find_contract, load_split_rows
    from mtlm.evaluate import task_outputs

    found = find_contract(run_dir)
    if found is None:
        return {}
    contract, contract_dir = found
    model, tokenizer, tasks, meta = load_bundle(find_bundle(run_dir))
    rows = load_split_rows(contract, contract_dir, "dev", list(tasks))
    out = {}
    for name, r in rows.items():
        task = tasks[name]
        feats = task.encode(r.records, tokenizer, meta["max_length"])
        if not feats:
            continue
        preds, refs = task_outputs(model, task, feats, batch_size, tokenizer.pad_token_id, torch.device("cpu"))
        out[name] = {"type": meta["tasks"][name]["type"], "metrics": task.metrics(preds, refs),
                     "rows": len(r.records), **_details(task, meta["tasks"][name]["type"], preds, refs)}
    return out


def _details(task, ttype: str, preds: list, refs: list) -> dict:
    if ttype == "classification":
        from sklearn.metrics import confusion_matrix
        labels = list(task.labels)
        return {"labels": labels, "confusion": confusion_matrix(refs, preds, labels=range(len(labels))).tolist()}
    if ttype == "token_classification":
        from seqeval.metrics import classification_report
        gold = [[task.labels[i] for i in g] for g in refs]
        pred = [[task.labels[i] for i in p] for p in preds]
        report = classification_report(gold, pred, output_dict=True, zero_division=0)
        return {"entities": {k: {m: float(v[m]) for m in ("precision", "recall", "f1-score", "support")}
                             for k, v in report.items() if not k.endswith(" avg")}}
    if ttype == "regression":
        return {"predicted": [float(p) for p in preds], "true": [float(t) for t in refs]}
    if ttype == "multilabel":
        from sklearn.metrics import f1_score
        pred = (np.asarray(preds) >= np.asarray(task.thresholds)).astype(int)
        f1 = f1_score(np.asarray(refs).astype(int), pred, average=None, zero_division=0)
        return {"per_label_f1": dict(zip(task.labels, map(float, f1)))}
    return {}
