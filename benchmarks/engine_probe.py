"""Engines mtlm does not ship, measured against the ones it does on one run's real dev rows: is any of them
the faster way to the same predictions on THIS machine?

    python benchmarks/engine_probe.py runs/teacher-l6-1200            # ~5 min on a quiet 2-core CPU
    pip install openvino                                              # adds the OpenVINO rows (optional)

Variants, all from the run's bundle, every head computed, measured interleaved in one process
(`mtlm.measure.speed`: texts/s at batch 32 over length-sorted dev texts, p50 of batch-1 calls):
  torch                torch eager fp32: the baseline of every ratio
  onnx                 onnxruntime, the exported fp32 graph (`mtlm export`)
  onnx-int8            onnxruntime dynamic int8, per-channel, encoder int8, embeddings and heads fp32 (what
                       `mtlm compress --method int8` writes when every group does not fit)
  onnx-fused-int8      onnxruntime's transformer optimiser (fused Attention / SkipLayerNorm / BiasGelu) before
                       the same dynamic quantisation, fused Attention quantised too (QAttention)
  onnx-static-int8     onnxruntime static int8 (QDQ, per-channel weights, activation ranges calibrated on
                       `--calibration-rows` TRAINING rows of every task, MinMax), encoder MatMuls only
  openvino             OpenVINO reading the fp32 graph (only when `openvino` is installed)
  openvino-static-int8 OpenVINO running the static QDQ graph with its int8 kernels (same condition)
Per variant: relative drop (%) of every task's dev metric vs torch fp32 (`mtlm.compress.Scorer`), the
throughput ratio, p50 latency; with the CPU's flags (int8 speed depends on VNNI / AMX) and the load average.
Writes benchmarks/results/engine_probe.json. Raises SystemExit when the run has no stored dev rows.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))


class OpenVinoEngine:
    """OpenVINO (CPU plugin) compiled from an ONNX graph; the `mtlm.engine.Engine` protocol. threads: the
    plugin's INFERENCE_NUM_THREADS (torch's count, so the engines compare at the same parallelism)."""

    def __init__(self, path: Path, threads: int):
        import openvino as ov
        self.compiled = ov.Core().compile_model(str(path), "CPU", {"INFERENCE_NUM_THREADS": threads,
                                                                    "PERFORMANCE_HINT": "LATENCY"})
        self.request = self.compiled.create_infer_request()
        self.inputs = [i.get_any_name() for i in self.compiled.inputs]
        self.outputs = [o.get_any_name() for o in self.compiled.outputs]

    def run(self, inputs, tasks):
        import numpy as np
        import torch

        from mtlm.engine import graph_feed
        feed = graph_feed(inputs)
        result = self.request.infer({k: feed[k] for k in self.inputs})
        return {n: torch.from_numpy(np.array(result[self.compiled.output(n)])) for n in self.outputs if n in tasks}


def quantize_static_qdq(source: Path, target: Path, rows: list[dict], pad_token_id: int, exclude: list[str]) -> None:
    """onnxruntime static int8 of `source` into `target` (QDQ format, per-channel QInt8 weights, QUInt8
    activations, MinMax ranges over `rows` in length-sorted batches of 16), MatMul / Gemm outside `exclude`."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    from mtlm.engine import graph_feed
    from mtlm.measure import batches

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter(batches(rows, 16, pad_token_id))

        def get_next(self):
            b = next(self.batches, None)
            return None if b is None else graph_feed(b)

    target.parent.mkdir(parents=True, exist_ok=True)
    quantize_static(str(source), str(target), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul", "Gemm"],
                    nodes_to_exclude=exclude)


def quantize_fused(source: Path, target: Path, config) -> dict[str, int]:
    """onnxruntime's transformer optimiser (BERT fusions) over `source`, then dynamic per-channel int8 of MatMul,
    Gemm, Gather, the fused Attention and EmbedLayerNormalization into `target`. Returns the fused-operator counts."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.transformers.optimizer import optimize_model

    optimized = optimize_model(str(source), model_type="bert", num_heads=config.num_attention_heads,
                               hidden_size=config.hidden_size)
    fused = target.with_name("model.fused.onnx")
    optimized.save_model_to_file(str(fused))
    quantize_dynamic(str(fused), str(target), weight_type=QuantType.QInt8, per_channel=True,
                     op_types_to_quantize=["MatMul", "Gemm", "Gather", "Attention", "EmbedLayerNormalization"],
                     extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
    return {k: int(v) for k, v in optimized.get_fused_operator_statistics().items() if v}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run", help="a trained run folder (with its stored dev rows)")
    p.add_argument("--rounds", type=int, default=3, help="timed passes per engine (median)")
    p.add_argument("--calibration-rows", type=int, default=64, help="training rows per task for static int8")
    p.add_argument("--output", default=str(ROOT / "benchmarks" / "results" / "engine_probe.json"))
    args = p.parse_args()

    import torch

    import machine
    from mtlm.checkpoint import find_bundle, load_bundle
    from mtlm.compress import Scorer
    from mtlm.engine import OnnxEngine, OnnxInt8Engine, TorchEngine
    from mtlm.engine_check import dev_features
    from mtlm.export import export_onnx
    from mtlm.measure import cpu_flags, model_rows, speed
    from mtlm.quantize import node_groups, quantize_int8

    bundle = find_bundle(args.run)
    model, tokenizer, tasks, meta = load_bundle(bundle, "cpu")
    dev = dev_features(bundle, tasks, tokenizer, int(meta["max_length"]), rows=None)
    if not all(dev.get(n) for n in tasks):
        raise SystemExit(f"{args.run}: every task needs stored dev rows")
    train = dev_features(bundle, tasks, tokenizer, int(meta["max_length"]), rows=args.calibration_rows, split="train")
    scorer = Scorer(tasks, dev, tokenizer.pad_token_id)
    torch_engine = TorchEngine(model, "cpu")
    base = scorer.metrics(torch_engine)
    threads = torch.get_num_threads()
    load_before = list(os.getloadavg())
    root = logging.getLogger()
    root.setLevel(logging.ERROR)         # the quantisers log a line per tensor through the root logger
    with tempfile.TemporaryDirectory(prefix="mtlm-probe-") as tmp:
        work = Path(tmp)
        folders = {n: work / n / "onnx" for n in ("onnx", "int8", "fused", "static")}
        source = folders["onnx"] / "model.onnx"
        export_onnx(model, source)
        groups = node_groups(source)
        keep = [n for g, nodes in groups.items() if g == "embeddings" or g.startswith("head.") for n in nodes]
        quantize_int8(source, folders["int8"] / "model.int8.onnx", keep)
        fused = quantize_fused(source, folders["fused"] / "model.int8.onnx", model.backbone.config)
        quantize_static_qdq(source, folders["static"] / "model.int8.onnx", model_rows(train), tokenizer.pad_token_id, keep)
        engines = {"torch": torch_engine, "onnx": OnnxEngine(None, "cpu", work / "onnx"),
                   "onnx-int8": OnnxInt8Engine(None, "cpu", work / "int8"),
                   "onnx-fused-int8": OnnxInt8Engine(None, "cpu", work / "fused"),
                   "onnx-static-int8": OnnxInt8Engine(None, "cpu", work / "static")}
        try:
            import openvino
            engines["openvino"] = OpenVinoEngine(source, threads)
            engines["openvino-static-int8"] = OpenVinoEngine(folders["static"] / "model.int8.onnx", threads)
            openvino_version = openvino.__version__
        except ImportError:
            openvino_version = None
        drops = {n: scorer.drops(base, scorer.metrics(e)) for n, e in engines.items() if n != "torch"}
        speeds = speed(engines, list(tasks), model_rows(dev), tokenizer.pad_token_id, rounds=args.rounds)
    rate = speeds["torch"]["texts_per_s"]
    report = {"benchmark": "engine_probe", "run": str(args.run), "threads": threads, "cpu_flags": cpu_flags(),
              "cpu": machine.cpu_model(), "loadavg": {"start": load_before, "end": list(os.getloadavg())},
              "openvino": openvino_version or "not installed (pip install openvino)", "fused_operators": fused,
              "torch_dev": base, "calibration_rows_per_task": args.calibration_rows,
              "engines": {n: {**s, "ratio_vs_torch": s["texts_per_s"] / rate, "dev_drop_pct": drops.get(n, {})}
                          for n, s in speeds.items()}}
    Path(args.output).write_text(json.dumps(report, indent=2), encoding="utf-8")
    print(f"{'engine':<22}{'x torch':>8}{'p50 ms':>8}  dev drop % per task")
    for n, e in report["engines"].items():
        print(f"{n:<22}{e['ratio_vs_torch']:>8.2f}{e['p50_latency_ms']:>8.1f}  "
              + "  ".join(f"{t} {d:+.2f}" for t, d in e["dev_drop_pct"].items()))
    print(f"cpu flags: {' '.join(report['cpu_flags'])}; {threads} threads; load average {load_before[0]:.1f}; "
          f"openvino: {report['openvino']}; wrote {args.output}")


if __name__ == "__main__":
    main()
