"""`mtlm export RUN --format onnx`: one ONNX graph of backbone + every head, checked against torch.

The graph is `mtlm.model.InferenceGraph` exported with the legacy TorchScript exporter
(`torch.onnx.export(..., dynamo=False)`, opset 17) and eager attention (SDPA's mask path does not trace to
ONNX cleanly; eager attention is what onnxruntime's transformer fusions match): inputs input_ids,
attention_mask, token_type_ids (int64, (batch, seq)); one output per head named after its task, (batch,
outputs) or (batch, seq, outputs); batch and sequence axes dynamic. See /work/shared/ENGINES.md for the
traps checked on this machine (optimum does not support transformers 5; the dynamo exporter needs onnxscript).

After export: onnxruntime's fp32 outputs are compared with torch's on real dev rows (within PARITY_ATOL),
and onnxruntime's transformer optimiser (`onnxruntime.transformers.optimizer.optimize_model`, model_type
"bert") reports which fused operators (Attention, SkipLayerNormalization, Gelu, ...) it finds in the graph.

A bundle holding ONNX graphs lists them in its engines.json (`write_manifest`):

    model/onnx/model.onnx        fp32 graph            (engine "onnx")
    model/onnx/model.int8.onnx   dynamic int8 graph    (engine "onnx-int8", written by `mtlm compress`)
    model/engines.json           {"format": 1, "engines": {name: {file, ...}}, "measured": {texts_per_s, cpu_flags}}
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from mtlm.engine import GRAPH_INPUTS, ONNX_DIR, ONNX_FILES, EngineError, make_engine, read_manifest
from mtlm.model import InferenceGraph

log = logging.getLogger("mtlm")

OPSET = 17
PARITY_ATOL = 1e-4        # max |onnxruntime fp32 - torch fp32| on any logit of the checked rows
MANIFEST_FORMAT = 1


def export_onnx(model, path: Path) -> list[str]:
    """Write `model` (a MultiTaskModel in eval mode, on the CPU) as one ONNX graph to `path`; returns its
    output names (the task names, in head order). Switches the backbone to eager attention for the export and
    back after. Raises RuntimeError from the exporter."""
    path.parent.mkdir(parents=True, exist_ok=True)
    backbone = model.backbone
    before = getattr(backbone.config, "_attn_implementation", None)
    backbone.set_attn_implementation("eager")
    try:
        graph = InferenceGraph(model).eval()
        ids = torch.tensor([[2, 7, 8, 9, 3], [2, 7, 3, 0, 0]], dtype=torch.long)    # any ids: shapes are dynamic
        mask = (ids != 0).long()
        axes = {k: {0: "batch", 1: "seq"} for k in GRAPH_INPUTS}
        axes.update({n: {0: "batch", 1: "seq"} if model.head_inputs[n] == "tokens" else {0: "batch"}
                     for n in graph.names})
        with torch.no_grad():
            torch.onnx.export(graph, (ids, mask, torch.zeros_like(ids)), str(path), input_names=list(GRAPH_INPUTS),
                              output_names=graph.names, dynamic_axes=axes, opset_version=OPSET, dynamo=False)
    finally:
        if before and before != "eager":
            backbone.set_attn_implementation(before)
    return graph.names


def fused_operators(path: Path, config) -> dict[str, int] | None:
    """onnxruntime's transformer optimiser run over the graph at `path` for a BERT-like encoder with the
    backbone `config`'s heads and hidden size -> {fused operator: count} (e.g. Attention, SkipLayerNormalization,
    Gelu / FastGelu, EmbedLayerNormalization), or None where the optimiser is unavailable or fails. The graph
    file itself is left unchanged (onnxruntime applies its own fusions when a session loads it)."""
    try:
        from onnxruntime.transformers.optimizer import optimize_model
        from mtlm.pruning import PRUNING_KEY
        pruned = bool(getattr(config, PRUNING_KEY, None))      # heads per layer differ: let it read them off the graph
        optimized = optimize_model(str(path), model_type="bert", num_heads=0 if pruned else config.num_attention_heads,
                                   hidden_size=0 if pruned else config.hidden_size)
        return {k: int(v) for k, v in optimized.get_fused_operator_statistics().items() if v}
    except Exception as e:          # an optimiser bug must not stop the export; the counts are a report
        log.warning("onnxruntime's transformer optimiser could not read %s: %s", path, e)
        return None


def write_manifest(bundle: Path, engines: dict[str, dict], measured: dict | None = None) -> Path:
    """Add or replace `engines` ({name: details, each with "file" relative to the bundle}) in
    bundle/engines.json, and set "measured" ({"texts_per_s": {engine: rate}, "cpu_flags": [...]}) when given."""
    manifest = read_manifest(bundle) or {"format": MANIFEST_FORMAT, "engines": {}}
    manifest["engines"].update(engines)
    if measured is not None:
        manifest["measured"] = measured
    path = Path(bundle) / "engines.json"
    path.write_text(json.dumps(manifest, indent=2), encoding="utf-8")
    return path


def export_bundle(bundle: Path, model, tokenizer, tasks: dict, meta: dict, check_rows: int = 64) -> dict:
    """Export `model` into bundle/onnx/model.onnx, check it and record it in bundle/engines.json. Returns the
    report: {"file", "outputs", "max_abs_diff": {task: float}, "rows_checked": {task: int},
    "fused_operators": {op: count} | None}. Raises EngineError when onnxruntime's outputs differ from torch's
    by more than PARITY_ATOL on real dev rows, ContractError when the dev rows cannot be read."""
    from mtlm.engine_check import compare, dev_features
    from mtlm.engine import TorchEngine

    path = Path(bundle) / ONNX_DIR / ONNX_FILES["onnx"]
    outputs = export_onnx(model, path)
    engine = make_engine("onnx", None, "cpu", Path(bundle))
    features = dev_features(Path(bundle), tasks, tokenizer, int(meta["max_length"]), rows=check_rows)
    checks = compare(engine, TorchEngine(model, "cpu"), tasks, features, tokenizer.pad_token_id)
    worst = {n: c.max_abs_diff for n, c in checks.items()}
    if any(d > PARITY_ATOL for d in worst.values()):
        path.unlink()
        raise EngineError(f"ONNX export of {bundle}: onnxruntime's fp32 outputs differ from torch's by more than "
                          f"{PARITY_ATOL:g} on real dev rows: {worst}; the graph was not kept")
    report = {"file": f"{ONNX_DIR}/{ONNX_FILES['onnx']}", "opset": OPSET, "outputs": outputs,
              "max_abs_diff": worst, "rows_checked": {n: c.rows for n, c in checks.items()},
              "fused_operators": fused_operators(path, model.backbone.config)}
    write_manifest(Path(bundle), {"onnx": report})
    return report


def export_run(run: str | Path, output: str | Path | None = None, fmt: str = "onnx") -> tuple[Path, dict]:
    """`mtlm export`: export run `run`'s model into its own bundle (model/onnx/), or, with `output`, into a new
    derived run folder (`mtlm.contract.derive_run`: a copy of the bundle plus the graph, judged on the
    parent's rows). Returns (the bundle written, the `export_bundle` report). Raises EngineError (unknown
    format, parity failure), BundleError, ContractError, FileExistsError (`output` holds a model)."""
    from mtlm.checkpoint import find_bundle, load_bundle
    from mtlm.contract import derive_run

    if fmt != "onnx":
        raise EngineError(f"unknown export format {fmt!r}; known formats: onnx, hf (one task: --task NAME)")
    bundle = find_bundle(run)
    if output is not None:
        parent = bundle.parent if bundle.name == "model" else bundle
        bundle = derive_run(parent, Path(output), method="export-onnx", details={"format": fmt}) / "model"
    model, tokenizer, tasks, meta = load_bundle(bundle, "cpu")
    return bundle, export_bundle(bundle, model, tokenizer, tasks, meta)
