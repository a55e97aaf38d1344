"""`mtlm train|tune|eval|predict|baseline|quickstart|serve|export|compress|distill|report`: parse arguments, then call one
function.

User errors (bad recipe, bad data, missing backbone package, bad bundle, bad input) print one message and
exit with status 2, without a traceback."""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
from pathlib import Path


def _user_errors() -> tuple[type[Exception], ...]:
    from mtlm.checkpoint import BundleError
    from mtlm.config import RecipeError
    from mtlm.model import BackboneError
    from mtlm.predict import InputError
    from mtlm.sources import DataError
    from mtlm.serve.auth import AccessConfigError
    from pydantic import ValidationError         # a `mtlm serve` setting out of range
    from mtlm.compress import CompressError
    from mtlm.engine import EngineError
    from mtlm.distill import DistillError
    from mtlm.distill.layers import LayerError
    from mtlm.hf.export import ExportError
    from mtlm.report.collect import ReportError
    return (RecipeError, DataError, BackboneError, BundleError, InputError, ValidationError, MissingPackage,
            AccessConfigError, EngineError, ServeError, CompressError, DistillError, LayerError, ExportError, ReportError)


def cmd_train(args) -> None:
    from mtlm.recipe import load_recipe
    from mtlm.train import fit
    recipe = load_recipe(args.recipe, args.overrides)
    if recipe.distill is not None:
        logging.getLogger("mtlm").warning("the recipe's distill: options are read by `mtlm distill TEACHER_RUN "
                                          "--student ...` only; `mtlm train` trains without a teacher")
    run_dir = fit(recipe, resume=args.resume, progress=not args.no_progress, overwrite=args.overwrite)
    print(f"run folder: {run_dir}\nbest bundle: {run_dir / 'model'}")


def cmd_tune(args) -> None:
    import importlib.util
    if importlib.util.find_spec("optuna") is None:
        raise MissingPackage("`mtlm tune` needs the 'optuna' package: pip install 'mtlm[tune]'")
    from mtlm.tune import format_trials, prepare, run_tune
    search = prepare(args.recipe, args.overrides, args.trials, args.space, args.timeout_min, args.out, args.pruner,
                     args.seed)
    result = run_tune(search, jobs=args.jobs)
    print(format_trials(result))
    print(f"tune folder: {result['folder']} (trials.csv, study.db)")
    if result["best_recipe"]:
        print(f"best recipe: {result['best_recipe']}  (retrain: mtlm train {result['best_recipe']})")


def cmd_eval(args) -> None:
    from mtlm.evaluate import by_task, evaluate_bundle, format_deltas, format_table
    metrics, tasks, out_path = evaluate_bundle(args.run, args.split, args.batch_size, data_dir=args.data_dir,
                                               engine=args.engine, progress=True)
    print(format_table(by_task(metrics), tasks))
    if "mean" in metrics:
        print(f"{'mean':<20} {'':<22} {metrics['mean']:.4f}")
    report = json.loads(out_path.read_text(encoding="utf-8"))
    deltas = format_deltas(report, tasks)
    if deltas:
        print(deltas)
    print(f"engine: {report.get('engine', 'torch')}\nwrote {out_path}")


def read_inputs(path: str) -> tuple[list, list[int]]:
    """A JSONL file of strings or input objects ({text, text_pair?}, {question, context}, {text, choices}),
    one per line -> (inputs, their line numbers). Raises InputError naming the file and line."""
    from mtlm.predict import InputError
    inputs, lines = [], []
    try:
        with open(path, encoding="utf-8-sig") as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    try:
                        inputs.append(json.loads(line))
                    except json.JSONDecodeError as e:
                        raise InputError(f"{path}, line {n}: not valid JSON ({e.msg})") from None
                    lines.append(n)
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: cannot read: {e}") from None
    return inputs, lines


def _at_lines(message: str, path: str, lines: list[int]) -> str:
    """"inputs[0, 2]: ..." -> "<path>, line 1, 3: ..." (inputs counted from 0, blank lines skipped)."""
    def where(m: re.Match) -> str:
        numbers = [lines[int(i)] for i in m.group(1).split(",") if int(i) < len(lines)]
        return f"{path}, line {', '.join(map(str, numbers))}" + ("" if m.group(2) is None else f", field '{m.group(2)}'")
    return re.sub(r"inputs\[([\d, ]+)\](?:\.(\w+))?", where, message, count=1)


def cmd_predict(args) -> None:
    from mtlm.predict import InputError, load
    inputs, lines = read_inputs(args.input) if args.input else (list(args.texts), [])
    if not inputs:
        raise InputError("nothing to predict: give TEXT arguments or --input FILE.jsonl")
    out_path = Path(args.output) if args.output else None
    if out_path is not None and not os.access(out_path.parent if str(out_path.parent) else ".", os.W_OK):
        raise InputError(f"--output {args.output}: cannot write to {out_path.parent}")   # before the model loads
    predictor = load(args.run, engine=args.engine)
    tasks = args.tasks.split(",") if args.tasks else None
    try:
        results = predictor.predict(inputs, tasks=tasks)
    except InputError as e:
        raise InputError(_at_lines(str(e), args.input, lines) if args.input else str(e)) from None
    rendered = "".join(json.dumps({"input": item, "predictions": res}, ensure_ascii=False) + "\n"
                       for item, res in zip(inputs, results))
    if out_path is None:
        sys.stdout.write(rendered)
        return
    tmp = out_path.with_name(out_path.name + ".tmp")     # an existing output is replaced only when all is done
    try:
        tmp.write_text(rendered, encoding="utf-8")
        tmp.replace(out_path)
    except OSError as e:
        raise InputError(f"--output {args.output}: cannot write: {e}") from None
    print(f"wrote {len(results)} predictions to {args.output}")


def cmd_baseline(args) -> None:
    from mtlm.baseline import run_baseline
    from mtlm.config import RecipeError
    from mtlm.recipe import load_recipe
    if not args.warn_gap >= 0:
        raise RecipeError([f"--warn-gap {args.warn_gap}: must be 0 or more"], header="bad flag")
    run_baseline(load_recipe(args.recipe, args.overrides), split=args.split, retrain=args.retrain,
                 threshold=args.warn_gap)


def cmd_quickstart(args) -> None:
    from mtlm.quickstart import quickstart
    quickstart(output_dir=args.output_dir, max_steps=args.max_steps)


class ServeError(Exception):
    """The server could not start (a Ray Serve replica that failed to load); the message says why."""


class MissingPackage(Exception):
    """A package a command needs is not installed; the message names the pip install that brings it."""


def cmd_serve(args) -> None:
    from mtlm.config import RecipeError
    ray_only = [f for f, v in (("--replicas", args.replicas), ("--autoscale", args.autoscale),
                               ("--max-ongoing", args.max_ongoing)) if v is not None]
    if ray_only and not args.ray:
        raise RecipeError([f"{', '.join(ray_only)}: Ray Serve flags, add --ray (or use --workers N without Ray)"],
                          header="bad flag")
    if args.ray:
        if args.replicas is not None and args.autoscale is not None:
            raise RecipeError(["--replicas and --autoscale: give one (a fixed count, or MIN:MAX)"], header="bad flag")
        if args.workers != 1:
            raise RecipeError(["--workers is for uvicorn processes; with --ray use --replicas N"], header="bad flag")
        try:
            import ray.serve  # noqa: F401
        except ModuleNotFoundError:
            raise MissingPackage("`mtlm serve --ray` needs Ray Serve: pip install 'mtlm[ray]' "
                                 "(or pip install 'ray[serve]')") from None
        from mtlm.checkpoint import find_bundle
        from mtlm.engine import precheck_engine
        from mtlm.serve.ray import DeployError, serve_ray
        if getattr(args, "setting_engine", None):
            precheck_engine(args.setting_engine, find_bundle(args.run))
        try:
            return serve_ray(args)
        except DeployError as e:      # a replica that cannot load: the reason, without Ray's traceback
            raise ServeError(str(e)) from None
    try:
        from mtlm.serve.process import serve
    except ModuleNotFoundError as e:     # an install made with --no-deps, or an old one
        raise MissingPackage(f"`mtlm serve` needs the {e.name!r} package: pip install fastapi 'uvicorn[standard]' "
                             "prometheus-client (or reinstall mtlm: pip install -e .)") from None
    from mtlm.checkpoint import find_bundle
    from mtlm.engine import precheck_engine
    if getattr(args, "setting_engine", None):      # before the workers start: a clear error, not a failed load
        precheck_engine(args.setting_engine, find_bundle(args.run))
    serve(args)


def _need_onnx(command: str) -> None:
    """MissingPackage naming the install when onnx or onnxruntime is absent (the default install has neither)."""
    import importlib.util
    missing = [m for m in ("onnx", "onnxruntime") if importlib.util.find_spec(m) is None]
    if missing:
        raise MissingPackage(f"`{command}` needs {' and '.join(missing)}: pip install onnx onnxruntime")


def cmd_export(args) -> None:
    if args.format == "hf":
        from mtlm.hf.export import ExportError, export_hf
        if not args.task:
            raise ExportError("--format hf exports one task: give --task NAME")
        out = export_hf(args.run, args.task, args.output)
        info = json.loads((out / "mtlm_export.json").read_text(encoding="utf-8"))
        remote = ", trust_remote_code=True" if info["trust_remote_code"] else ""
        if info["type"] == "extractive_qa":     # transformers 5 has no question-answering pipeline
            how = f"transformers.AutoModelForQuestionAnswering.from_pretrained({str(out)!r}{remote})"
        else:
            pipe = "token-classification" if info["type"] == "token_classification" else "text-classification"
            how = f"transformers.pipeline({pipe!r}, model={str(out)!r}{remote})"
        print(f"wrote {out} ({info['type']}); load it with {how}")
        return
    from mtlm.hf.export import ExportError
    if args.format != "onnx":
        raise ExportError(f"unknown export format {args.format!r}; known formats: onnx, hf (one task: --task NAME)")
    if args.task:
        raise ExportError("--task is for --format hf (the onnx graph holds every task)")
    _need_onnx("mtlm export --format onnx")
    from mtlm.export import export_run
    bundle, report = export_run(args.run, args.output, args.format)
    fused = report["fused_operators"]
    print(f"wrote {bundle / report['file']}: outputs {', '.join(report['outputs'])}; onnxruntime fp32 vs torch "
          f"max |diff| {max(report['max_abs_diff'].values()):.2e} on {sum(report['rows_checked'].values())} dev rows")
    print("fused operators (onnxruntime transformer optimiser): "
          + (", ".join(f"{k} {v}" for k, v in fused.items()) if fused else "none found / optimiser unavailable"))


def cmd_compress(args) -> None:
    from mtlm.compress import REPORT_FILE, CompressError, compress_run, format_report
    if args.method in ("auto", "int8"):
        _need_onnx(f"mtlm compress --method {args.method}")
    layers = prune = auto = None
    if args.search_minutes is not None and args.method != "auto":
        raise CompressError("--search-minutes applies to --method auto only")
    if args.method == "auto":
        from mtlm.compress_auto import AutoSettings
        auto = AutoSettings()
        if args.search_minutes is not None:
            auto.search_minutes = args.search_minutes
        if args.recovery_steps is not None:
            auto.recovery_steps = args.recovery_steps
    elif args.method == "layers":
        from mtlm.layer_drop import LayerSettings
        layers = LayerSettings()
        if args.recovery_steps is not None:
            layers.recovery_steps = args.recovery_steps
        if args.layer_choice:
            layers.strategies = tuple(s.strip() for s in args.layer_choice.split(","))
    elif args.method == "prune":
        from mtlm.prune import PruneSettings
        prune = PruneSettings()
        if args.recovery_steps is not None:
            prune.recovery_steps = args.recovery_steps
        if args.prune_levels:
            try:
                prune.levels = tuple(float(x) for x in args.prune_levels.split(","))
            except ValueError:
                raise CompressError(f"--prune-levels {args.prune_levels}: expected fractions like 0.5,0.3,0.1") from None
    elif args.recovery_steps is not None:
        raise CompressError("--recovery-steps applies to --method auto, layers and prune only")
    if args.layer_choice and args.method != "layers":
        raise CompressError("--layer-choice applies to --method layers only")
    if args.prune_levels and args.method != "prune":
        raise CompressError("--prune-levels applies to --method prune only")
    run_dir, report = compress_run(args.run, args.method, args.budget, args.output, layers=layers, prune=prune,
                                   auto=auto)
    print(format_report(report))
    print(f"derived run: {run_dir} (mtlm eval {run_dir} --split dev|test compares it with its parent)\n"
          f"report: {run_dir / REPORT_FILE}")


def cmd_distill(args) -> None:
    from mtlm.distill.run import REPORT_FILE, distill_run, format_report
    run_dir, report = distill_run(args.teacher, args.student, args.overrides, args.output, args.data_dir,
                                  progress=not args.no_progress)
    print(format_report(report))
    print(f"derived run: {run_dir} (mtlm eval {run_dir} --split dev|test compares it with its teacher)\n"
          f"report: {run_dir / REPORT_FILE}")


def cmd_report(args) -> None:
    try:
        from mtlm.report.page import write_report
    except ModuleNotFoundError as e:
        raise MissingPackage(f"`mtlm report` needs the {e.name!r} package: pip install 'mtlm[report]' (matplotlib)") from None
    index = write_report(args.run, args.output, with_predictions=not args.no_predictions)
    print(f"wrote {index} ({len(list(index.parent.glob('*.png')))} figures)")


ENGINE_HELP = ("what runs the model: torch, torch-bf16, onnx, onnx-int8 (default: the fastest engine the bundle holds "
               "that passes its check against torch fp32 on this machine)")


def _positive_int(value: str) -> int:
    n = int(value)
    if n <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return n


def _autoscale(value: str) -> tuple[int, int]:
    """--autoscale MIN:MAX -> (MIN, MAX) replicas."""
    try:
        low, high = (int(x) for x in value.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"want MIN:MAX replicas (e.g. 1:4), got {value!r}") from None
    if not 0 <= low <= high or high < 1:
        raise argparse.ArgumentTypeError(f"want 0 <= MIN <= MAX and MAX >= 1, got {value!r}")
    return low, high


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mtlm", description="One pretrained backbone, many NLP tasks.")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train one backbone with one head per task")
    t.add_argument("recipe", help="YAML recipe")
    t.add_argument("overrides", nargs="*", help="key.path=value overrides, e.g. train.lr=3e-5")
    t.add_argument("--resume", action="store_true", help="continue from the newest checkpoint of the run")
    t.add_argument("--overwrite", action="store_true", help="start again in a run folder that holds a run")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    t.set_defaults(func=cmd_train)

    u = sub.add_parser("tune", help="hyperparameter search with Optuna: real trials, pruning, resumable")
    u.add_argument("recipe", help="YAML recipe (the base of every trial)")
    u.add_argument("overrides", nargs="*", help="key.path=value overrides of the base recipe")
    u.add_argument("--trials", type=_positive_int, required=True, help="trials in the study (a resumed study counts "
                                                                       "the ones it holds)")
    u.add_argument("--timeout-min", type=float, help="start no trial after this many minutes")
    u.add_argument("--space", help="search space YAML (default: lr, warmup, batch size, sampling/temperature, "
                                   "weighting, task weights; README 'Hyperparameter search')")
    u.add_argument("--jobs", type=_positive_int, default=1, help="trials at a time, one process each (default: 1)")
    u.add_argument("--pruner", choices=["median", "hyperband"], default="median")
    u.add_argument("--seed", type=int, default=0, help="the sampler's seed")
    u.add_argument("--out", help="tune folder (default: the recipe's run folder + '-tune')")
    u.set_defaults(func=cmd_tune)

    e = sub.add_parser("eval", help="evaluate every task of a run or bundle")
    e.add_argument("run", help="run folder or bundle folder")
    e.add_argument("--split", choices=["dev", "test"], default="test")
    e.add_argument("--batch-size", type=_positive_int, default=64)
    e.add_argument("--data-dir", help="where the data moved: a folder standing in for the recipe folder (the run's "
                                      "data paths are tried under it, then by file name)")
    e.add_argument("--engine", help=ENGINE_HELP)
    e.set_defaults(func=cmd_eval)

    q = sub.add_parser("predict", help="predict all (or some) tasks for texts")
    q.add_argument("run", help="run folder or bundle folder")
    q.add_argument("texts", nargs="*", help="texts to predict")
    q.add_argument("--tasks", help="comma-separated task names (default: per input, every task whose fields it carries)")
    q.add_argument("--input", help="JSONL file, one input per line: a string, {text, text_pair}, "
                                   "{question, context} (extractive QA) or {text, choices} (multiple choice)")
    q.add_argument("--output", help="JSONL output file (default: stdout)")
    q.add_argument("--engine", help=ENGINE_HELP)
    q.set_defaults(func=cmd_predict)

    b = sub.add_parser("baseline", help="multi-task vs one single-task model per task, same step budget")
    b.add_argument("recipe")
    b.add_argument("overrides", nargs="*")
    b.add_argument("--split", choices=["dev", "test"], default="test")
    b.add_argument("--warn-gap", type=float, default=0.02,
                   help="warn when a task trails its single-task model by more than this: points on the metric's "
                        "0-1 scale (0.02 = 2 points), relative for error metrics (default 0.02)")
    b.add_argument("--retrain", action="store_true", help="retrain the runs even if they exist (an existing model is reused only when trained from "
                                                  "the same recipe; a multi-task model from another recipe is an error)")
    b.set_defaults(func=cmd_baseline)

    s = sub.add_parser("quickstart", help="train MiniLM-L6 on real built-in tasks, evaluate, predict")
    s.add_argument("--output-dir", default="runs/quickstart")
    s.add_argument("--max-steps", type=int, default=None, help="optimizer steps (default: the tuned budget)")
    s.set_defaults(func=cmd_quickstart)

    v = sub.add_parser("serve", help="serve every task of a bundle over HTTP",
                       description="Serve every task of a bundle over HTTP (OpenAPI at /docs). Limits answer "
                                   "413 / 422 / 429 / 504 with the reason; see README 'Serving'.")
    v.add_argument("run", help="run folder or bundle folder")
    v.add_argument("--host", default="127.0.0.1", help="interface to listen on (default: %(default)s)")
    v.add_argument("--port", type=int, default=8000, help="(default: %(default)s)")
    v.add_argument("--workers", type=_positive_int, default=1,
                   help="server processes, each with its own model copy (default: %(default)s)")
    from mtlm.serve.schemas import ServeSettings
    for name, info in ServeSettings.model_fields.items():    # one flag per setting, e.g. --max-windows
        if info.annotation is bool:                             # on by default: --no-<name> turns it off
            v.add_argument(f"--no-{name.replace('_', '-')}", action="store_const", const=False, default=None,
                           dest=f"setting_{name}", help=info.description)
            continue
        kind = (float if info.annotation in (float, float | None) else str if info.annotation in (str, str | None)
                else int)
        default = "" if info.default is None else f" (default: {info.default})"
        v.add_argument(f"--{name.replace('_', '-')}", type=kind, default=None, dest=f"setting_{name}",
                       metavar="MS" if name.endswith("_ms") else "NAME" if kind is str else "N",
                       help=f"{info.description}{default}")
    r = v.add_argument_group("Ray Serve", "serve through Ray Serve replicas (pip install 'mtlm[ray]'; README 'Serving')")
    r.add_argument("--ray", action="store_true", help="run the app in Ray Serve replicas behind Ray's HTTP proxy "
                   "(a local Ray on 127.0.0.1, or the cluster at RAY_ADDRESS)")
    r.add_argument("--replicas", type=_positive_int, default=None, metavar="N",
                   help="replicas, each with its own model (default: 1)")
    r.add_argument("--autoscale", type=_autoscale, default=None, metavar="MIN:MAX",
                   help="let Ray scale between MIN and MAX replicas on ongoing requests")
    r.add_argument("--max-ongoing", type=_positive_int, default=None, metavar="N",
                   help="predict requests one replica holds before it answers 429 (default: --max-queue)")
    a = v.add_argument_group("access", "who may call the server (README 'Serving')")
    a.add_argument("--api-key", action="append", dest="api_keys", metavar="KEY",
                   help="require 'Authorization: Bearer KEY' on /v1/* (repeatable; shows in the process list: "
                        "prefer --api-key-file or MTLM_API_KEYS=k1,k2)")
    a.add_argument("--api-key-file", metavar="PATH", help="API keys, one per line ('#' comments)")
    a.add_argument("--open-metrics", action="store_true", help="with keys: /metrics needs none")
    a.add_argument("--open-docs", action="store_true", help="with keys: /docs and /openapi.json need none")
    a.add_argument("--ssl-certfile", metavar="PEM", help="serve HTTPS with this certificate (chain)")
    a.add_argument("--ssl-keyfile", metavar="PEM", help="the certificate's private key")
    v.set_defaults(func=cmd_serve)

    x = sub.add_parser("export", help="export a run's model as one ONNX graph (every task) or one task as a HF folder")
    x.add_argument("run", help="run folder or bundle folder")
    x.add_argument("--format", default="onnx",
                   help="onnx: one graph, every task (default); hf: one task as a Hugging Face folder (--task)")
    x.add_argument("--task", help="--format hf: the task to export")
    x.add_argument("--output", help="onnx: write a new derived run folder holding the graph (default: into the run's "
                                    "own model/onnx/); hf: the folder (default: <run>/hf/<task>)")
    x.set_defaults(func=cmd_export)

    r = sub.add_parser("report", help="an HTML page with plots of a run (curves, weights, confusion, baseline, "
                                      "compression, recipe, environment)")
    r.add_argument("run", help="run folder")
    r.add_argument("--output", help="folder for index.html and its figures (default: <run>/report)")
    r.add_argument("--no-predictions", action="store_true",
                   help="skip the dev predictions (confusion matrices, per-entity scores): no model is loaded")
    r.set_defaults(func=cmd_report)

    c = sub.add_parser("compress", help="a faster model keeping every task within an accuracy budget on dev")
    c.add_argument("run", help="run folder (with its stored dev rows)")
    c.add_argument("--method", default="auto",
                   help="auto | int8 | bf16 | prune | layers; default: %(default)s. auto tries int8, onnx fp32 and "
                        "bf16 (native only), then, within --search-minutes, layer dropping and pruning, alone and "
                        "+ int8 (each trains: minutes on a CPU)")
    c.add_argument("--budget", type=float, default=1.0,
                   help="relative drop in percent allowed for EACH task's dev metric (default: %(default)s)")
    c.add_argument("--output", help="derived run folder (default: <run>-<method> beside the run)")
    c.add_argument("--recovery-steps", type=int, default=None,
                   help="--method auto / layers / prune: recovery training steps (distilled from the run) per layer "
                        "count or pruning level tried (default: 100)")
    c.add_argument("--search-minutes", type=float, default=None,
                   help="--method auto: wall-clock bound of the trained tries (layers, prune; alone and + int8); a "
                        "try starts while the time spent plus the longest try fits; 0: none (default: 30)")
    c.add_argument("--layer-choice", help="--method layers: which layers a student keeps, tried in order: top "
                                          "(drop the top layers), alternate (keep spread layers); default top,alternate")
    c.add_argument("--prune-levels", help="--method prune: fractions of heads and of FFN neurons to try, e.g. "
                                          "0.5,0.4,0.3,0.2,0.1 (the default)")
    c.set_defaults(func=cmd_compress)

    d = sub.add_parser("distill", help="train a smaller student on a run's recipe with the run as its teacher")
    d.add_argument("teacher", help="the teacher's run folder (with its stored rows)")
    d.add_argument("overrides", nargs="*", help="key.path=value overrides of the student's recipe, e.g. "
                                                "distill.temperature=2 distill.alpha=0.7 train.max_steps=300")
    d.add_argument("--student", required=True, help="layers:N (N of the teacher's own layers) or a backbone "
                                                    "sharing the teacher's tokenizer (minilm-l6, a local folder)")
    d.add_argument("--output", help="derived run folder (default: <teacher>-distill-<student> beside it)")
    d.add_argument("--data-dir", help="where the teacher's data moved (a folder standing in for its recipe folder)")
    d.add_argument("--no-progress", action="store_true", help="no progress bar")
    d.set_defaults(func=cmd_distill)
    return p


def _quiet_libraries() -> None:
    """Library load reports and per-save progress bars drown the training log; keep errors only."""
    import transformers
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    for noisy in ("transformers", "accelerate", "datasets", "httpx"):
        logging.getLogger(noisy).setLevel(logging.ERROR)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # parse_known_args lets texts follow options (`mtlm predict RUN --tasks a,b "text"`)
    args, extra = parser.parse_known_args(argv)
    if extra and (args.command not in ("predict", "train", "baseline", "distill", "tune") or any(x.startswith("-") for x in extra)):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if extra:   # texts / overrides given after an option
        if args.command == "predict":
            args.texts = list(args.texts) + extra
        else:
            args.overrides = list(args.overrides) + extra
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.command == "serve":   # before torch loads: spinning OpenMP threads starve the event loop
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    _quiet_libraries()
    try:
        args.func(args)
    except _user_errors() as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: `mtlm train RECIPE --resume` continues from the last checkpoint", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())

