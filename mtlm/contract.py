"""The evaluation contract: what each split of a run contains, stored at training time, so that `mtlm eval`
judges a model on exactly those rows, wherever the run folder and its data are copied.

`run_dir/contract.json` (written by `fit` once the rows are prepared)::

    {"format": 1,
     "sources": {"data/reviews.csv": {"kind": "file", "path": "../../data/reviews.csv", "sha256": "...",
                                      "bytes": 12345},          # path: relative to the run folder
                 "builtin:imdb": {"kind": "builtin"}},          # builtin / hub sources keep their names
     "tasks": {"sentiment": {"test": {"source": "data/reviews.csv", "line_kind": "line",
                                      "lines": [17, 42, ...], "row_sha256": ["9f2c...", ...]}, ...}}}

A file source is keyed by its path relative to the recipe folder (what `--data-dir` replaces) and carries the
sha256 of its bytes; every stored row carries its 1-based line (or row) number in its source and a hash of its
content (`row_sha256`). Evaluation re-reads each source, checks the file digest, selects the stored lines and
checks each row's hash: a changed or missing file is an error naming it, never a silent re-split.

A *derived* run (compressed, distilled, pruned from a parent run) has no contract of its own: its
`parent.json` names the parent run (a path relative to the derived run) with digests of the parent's contract
and model at derivation time; it is evaluated on the parent's rows (`find_contract` follows the chain) and its
report shows per-task differences from the parent (`metric_deltas`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

from mtlm.checkpoint import find_bundle
from mtlm.sources import DataError, Rows, read_source

log = logging.getLogger("mtlm")

CONTRACT_FILE = "contract.json"
PARENT_FILE = "parent.json"
FORMAT_VERSION = 1
ROW_HASH_CHARS = 16        # 64 bits of sha256 per row: a changed row goes unnoticed with p ~ 2^-64
MAX_LISTED = 5             # rows listed per problem before "... and N more"


class ContractError(DataError):
    """The stored evaluation contract cannot be met (a data file changed or is missing, a parent run is gone or
    was retrained); ``problems`` holds one line per problem, each naming the file, task, split or run."""

    def __init__(self, problems: list[str], header: str = "the run's stored evaluation rows cannot be read"):
        self.problems = list(problems)
        super().__init__(f"{header} ({len(problems)} problem{'s' if len(problems) != 1 else ''}):\n"
                         + "\n".join(f"  - {p}" for p in problems))


# ---------------------------------------------------------------- digests

def row_sha256(record: dict) -> str:
    """The content hash of one row: sha256 of its canonical JSON (sorted keys), first ROW_HASH_CHARS hex digits."""
    text = json.dumps(record, sort_keys=True, ensure_ascii=True, default=str)   # ascii: lone surrogates too
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:ROW_HASH_CHARS]


def file_sha256(path: Path) -> str:
    """sha256 (hex) of a file's bytes, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def bundle_sha256(bundle: Path) -> str:
    """sha256 over every file of a bundle folder (relative path + content digest, sorted): changes whenever
    the model's weights, heads, tasks.json (thresholds, labels) or tokenizer change."""
    h = hashlib.sha256()
    for path in sorted(p for p in Path(bundle).rglob("*") if p.is_file()):
        h.update(f"{path.relative_to(bundle).as_posix()}\0{file_sha256(path)}\n".encode())
    return h.hexdigest()


def split_sha256(contract: dict, split: str, tasks: list[str]) -> dict[str, str]:
    """{task: sha256 of its stored `split` rows (source, line ids, row hashes)} for the `tasks` that have that
    split: two evaluations with equal values ran on the same rows."""
    out = {}
    for name in tasks:
        part = contract["tasks"].get(name, {}).get(split)
        if part is not None:
            out[name] = hashlib.sha256(json.dumps(part, sort_keys=True).encode()).hexdigest()
    return out


# ---------------------------------------------------------------- writing (training time)

def _rel(path: Path, start: Path) -> str:
    return Path(os.path.relpath(Path(path).resolve(), Path(start).resolve())).as_posix()


def write_contract(run_dir: Path, recipe, rows: dict[str, dict[str, Rows]]) -> Path:
    """Store in run_dir/contract.json what every task's splits contain: per row its source line and content
    hash, per source file its sha256 and path relative to the run folder (and, as its key, to the recipe
    folder). `rows`: `mtlm.data.prepare_rows(...).rows`, {task: {split: Rows}} (a joint group's task: the rows
    labelled for it). Written atomically; returns its path. Raises OSError when the folder is not writable."""
    run_dir, base = Path(run_dir), Path(recipe.base_dir)
    sources: dict[str, dict] = {}
    keys: dict[str, str] = {}                       # Rows.origin -> source key
    tasks: dict[str, dict] = {}
    for name, splits in rows.items():
        tasks[name] = {}
        for split, part in splits.items():
            origin = part.origin
            if origin not in keys:
                keys[origin] = key = _source_key(origin, base)
                if key != origin:                   # a file (its key is relative to the recipe folder)
                    path = Path(origin)
                    sources[key] = {"kind": "file", "path": _rel(path, run_dir), "sha256": file_sha256(path),
                                    "bytes": path.stat().st_size}
                else:
                    sources[key] = {"kind": "builtin" if origin.startswith("builtin:") else "hub"}
            tasks[name][split] = {"source": keys[origin], "line_kind": part.line_kind, "lines": list(part.lines),
                                  "row_sha256": [row_sha256(r) for r in part.records]}
    out = run_dir / CONTRACT_FILE
    _warn_if_rows_changed(out, tasks)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps({"format": FORMAT_VERSION, "sources": sources, "tasks": tasks},
                              separators=(",", ":")), encoding="utf-8")
    os.replace(tmp, out)
    return out


def check_rows_unchanged(run_dir: Path, rows: dict[str, dict[str, Rows]]) -> None:
    """For `--resume`: the task splits just prepared must hold the rows stored when the run began (same
    source lines, same content). Otherwise rows the model trained on could now sit in dev or test, so a
    changed data file is refused, naming each task split that moved (start again with --overwrite).
    A run folder without a readable contract is not checked. Raises RecipeError."""
    from mtlm.config import RecipeError
    try:
        old = json.loads((Path(run_dir) / CONTRACT_FILE).read_text(encoding="utf-8"))["tasks"]
    except (OSError, ValueError, KeyError, TypeError):
        return
    changed = []
    for name, splits in rows.items():
        for split, part in splits.items():
            before = old.get(name, {}).get(split)
            if before is None:
                continue
            now = (list(part.lines), [row_sha256(r) for r in part.records])
            if (list(before.get("lines", [])), list(before.get("row_sha256", []))) != now:
                changed.append(f"{name} {split}")
    if changed:
        raise RecipeError([f"data: the rows of {', '.join(changed)} differ from the ones stored in "
                           f"{Path(run_dir) / CONTRACT_FILE} when this run began (a data file changed); --resume "
                           f"would mix rows the model trained on into dev/test: restore the data, or start again "
                           f"with --overwrite"])


def _warn_if_rows_changed(path: Path, tasks: dict) -> None:
    """A run folder that already holds a contract (a resumed or restarted run): say which task splits now hold
    other rows than before (the data changed since the run began), since the old ones are replaced."""
    try:
        old = json.loads(path.read_text(encoding="utf-8"))["tasks"]
    except (OSError, ValueError, KeyError, TypeError):
        return
    changed = [f"{name} {split}" for name, splits in tasks.items() for split, part in splits.items()
               if old.get(name, {}).get(split) not in (None, part)]
    if changed:
        log.warning("%s: the rows of %s differ from the ones stored when this run began (the data changed); "
                    "storing the new ones: evaluation uses them from now on", path, ", ".join(changed))


def _source_key(origin: str, base: Path) -> str:
    """A file origin (an absolute path) -> its path relative to the recipe folder; builtin/hub names as read."""
    if origin.startswith("builtin:") or not Path(origin).is_absolute():
        return origin
    return _rel(Path(origin), base)


# ---------------------------------------------------------------- reading (evaluation time)

def _load_json(path: Path, what: str) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ContractError([f"{path}: cannot read the {what}: {e}"]) from None
    if not isinstance(data, dict) or data.get("format") != FORMAT_VERSION:
        raise ContractError([f"{path}: {what} format {data.get('format') if isinstance(data, dict) else '?'} "
                             f"is not supported (expected {FORMAT_VERSION})"])
    return data


def read_parent(run_dir: Path) -> tuple[Path, dict] | None:
    """(the parent run folder, parent.json) of a derived run, or None for a run trained from data.
    Raises ContractError when the parent is not where parent.json says (relative to `run_dir`)."""
    path = Path(run_dir) / PARENT_FILE
    if not path.is_file():
        return None
    info = _load_json(path, "parent record")
    parent = (Path(run_dir) / info["parent"]).resolve()
    if not parent.is_dir():
        raise ContractError([f"{path}: the parent run {info.get('parent_name')!r} is not at {parent} "
                             f"({info['parent']!r} relative to {run_dir}); keep a derived run beside its parent "
                             f"when copying them"])
    return parent, info


def find_contract(run_dir: Path) -> tuple[dict, Path] | None:
    """(contract, the run folder it belongs to) for `run_dir`: its own contract.json, or for a derived run its
    parent's (followed up the chain). None for a run trained before contracts were stored. Raises
    ContractError when a parent is missing or was retrained since the run was derived from it."""
    run_dir = Path(run_dir)
    if (run_dir / CONTRACT_FILE).is_file():
        return _load_json(run_dir / CONTRACT_FILE, "evaluation contract"), run_dir
    found = read_parent(run_dir)
    if found is None:
        return None
    parent, info = found
    inherited = find_contract(parent)
    if inherited is None:
        raise ContractError([f"{run_dir / PARENT_FILE}: the parent run {parent} has no stored evaluation "
                             f"contract ({CONTRACT_FILE}); retrain it with this mtlm version"])
    digest = file_sha256(inherited[1] / CONTRACT_FILE)
    if digest != info.get("contract_sha256"):
        raise ContractError([f"{run_dir}: its parent's evaluation contract {inherited[1] / CONTRACT_FILE} changed "
                             f"since this run was derived (was the parent retrained?); derive it again"])
    return inherited


def resolve_source(key: str, source: dict, run_dir: Path, data_dir: Path | None = None) -> tuple[Path | None, list[Path]]:
    """(the file of a stored source, or None; the places tried). With `data_dir`: data_dir/<key> (the key is
    the path relative to the recipe folder), then data_dir/<each shorter tail of the key>, `..` parts dropped
    (`../../shared/data/sst2/train.jsonl` -> shared/data/sst2/train.jsonl, data/sst2/train.jsonl,
    sst2/train.jsonl, train.jsonl); then the path stored relative to the run. Of the files found, the first
    whose sha256 is the stored one wins (several sources may share a file name); else the first found."""
    tried = []
    if data_dir is not None:
        parts = [p for p in Path(key).parts if p not in ("..", ".")]
        tried += [Path(data_dir) / key] + [Path(data_dir).joinpath(*parts[i:]) for i in range(len(parts))]
    tried.append(Path(run_dir) / source["path"])
    tried = list(dict.fromkeys(p.resolve() for p in tried))
    found = [p for p in tried if p.is_file()]
    if len(found) > 1:
        return next((p for p in found if file_sha256(p) == source.get("sha256")), found[0]), tried
    return (found[0] if found else None), tried


def _read(key: str, source: dict, run_dir: Path, data_dir: Path | None, problems: list[str]) -> Rows | None:
    """Re-read one stored source after checking its digest; None (with a problem) when missing or changed."""
    spec = key
    if source["kind"] == "file":
        path, tried = resolve_source(key, source, run_dir, data_dir)
        if path is None:
            hint = "" if data_dir is not None else "; if the data moved, pass --data-dir FOLDER (the recipe folder's stand-in)"
            problems.append(f"data file {key} is missing: looked for {', '.join(map(str, tried))}{hint}")
            return None
        digest = file_sha256(path)
        if digest != source["sha256"]:
            problems.append(f"data file {key} ({path}) changed since training: sha256 {source['sha256'][:12]}... "
                            f"({source['bytes']} bytes) then, {digest[:12]}... ({path.stat().st_size} bytes) now; "
                            f"restore it, or retrain to evaluate on the new data")
            return None
        spec = str(path)
    try:           # as training read it: strictly, or (on_bad_rows: skip) leaving unreadable lines out
        try:
            return read_source(spec, Path(run_dir))
        except DataError:
            return read_source(spec, Path(run_dir), skip_bad_lines=True)
    except DataError as e:
        problems.append(f"source {key}: {e}")
        return None


def _select(raw: Rows, part: dict, where: str, problems: list[str]) -> Rows | None:
    """The stored rows of one task split, in stored order, each checked against its content hash."""
    if raw.line_kind != part["line_kind"]:
        problems.append(f"{where}: {raw.origin} now reads by {raw.line_kind}, training read it by {part['line_kind']}")
        return None
    index = {line: i for i, line in enumerate(raw.lines)}
    missing = [n for n in part["lines"] if n not in index]
    if missing:
        problems.append(f"{where}: {raw.origin} has no {part['line_kind']} " + _listed(missing))
        return None
    rows = raw.select([index[n] for n in part["lines"]])
    changed = [n for n, r, h in zip(part["lines"], rows.records, part["row_sha256"]) if row_sha256(r) != h]
    if changed:
        problems.append(f"{where}: {raw.origin}, {part['line_kind']} {_listed(changed)}: content differs from "
                        f"the row trained on (the file's digest matches: the reader or a builtin/hub dataset changed)")
        return None
    return rows


def _listed(numbers: list[int]) -> str:
    shown = ", ".join(map(str, numbers[:MAX_LISTED]))
    return shown + (f" ... and {len(numbers) - MAX_LISTED} more" if len(numbers) > MAX_LISTED else "")


def load_split_rows(contract: dict, run_dir: Path, split: str, tasks: list[str],
                    data_dir: Path | None = None) -> dict[str, Rows]:
    """{task: the stored `split` rows} for each of `tasks` that has that split, re-read from the contract's
    sources (paths relative to `run_dir`, the folder holding the contract; or under `data_dir`) in stored
    order. Raises ContractError listing every problem: a task the contract does not know, a missing or changed
    file (sha256), a stored line that is gone or whose content differs."""
    problems: list[str] = []
    cache: dict[str, Rows | None] = {}
    out: dict[str, Rows] = {}
    for name in tasks:
        if name not in contract["tasks"]:
            problems.append(f"task {name}: not in the evaluation contract {Path(run_dir) / CONTRACT_FILE} "
                            f"(its tasks: {', '.join(contract['tasks'])})")
            continue
        part = contract["tasks"][name].get(split)
        if part is None:
            continue
        key = part["source"]
        if key not in cache:
            cache[key] = _read(key, contract["sources"][key], Path(run_dir), data_dir, problems)
        if cache[key] is not None:
            rows = _select(cache[key], part, f"task {name}, {split} split", problems)
            if rows is not None:
                out[name] = rows
    if problems:
        raise ContractError(problems)
    return out


# ---------------------------------------------------------------- derived runs

def record_parent(run_dir: Path, parent: Path, method: str, details: dict | None = None) -> Path:
    """Write run_dir/parent.json: `run_dir` (holding a bundle in run_dir/model) is derived from run `parent` by
    `method` (e.g. "int8", "distill", "prune"; `details`: its settings, JSON-serialisable). Records the parent's
    path relative to `run_dir` and the digests of its contract and model, so evaluation can refuse a parent that
    was retrained since. Raises ContractError when `parent` has no contract (own or inherited)."""
    run_dir, parent = Path(run_dir), Path(parent)
    found = find_contract(parent)
    if found is None:
        raise ContractError([f"{parent}: no stored evaluation contract ({CONTRACT_FILE}): a derived run is judged "
                             f"on its parent's stored rows; retrain the parent with this mtlm version"])
    info = {"format": FORMAT_VERSION, "parent": _rel(parent, run_dir), "parent_name": parent.resolve().name,
            "method": method, "details": details or {},
            "contract_sha256": file_sha256(found[1] / CONTRACT_FILE),
            "model_sha256": bundle_sha256(find_bundle(parent))}
    out = run_dir / PARENT_FILE
    run_dir.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(info, indent=2), encoding="utf-8")
    return out


def derive_run(parent: Path, run_dir: Path, bundle: Path | None = None, method: str = "copy",
               details: dict | None = None) -> Path:
    """Create the run folder of a model derived from run `parent`: copy `bundle` (a bundle folder; default the
    parent's own model/) to run_dir/model and record the parent (`record_parent`). Returns `run_dir`.
    `mtlm eval run_dir` then evaluates on the parent's stored rows and reports per-task deltas from the parent.
    Raises ContractError (no contract in `parent`), BundleError (no bundle), FileExistsError (run_dir/model
    exists)."""
    run_dir = Path(run_dir)
    source = find_bundle(bundle if bundle is not None else parent)
    if (run_dir / "model").exists():
        raise FileExistsError(f"{run_dir / 'model'} exists: derive into a new run folder")
    run_dir.mkdir(parents=True, exist_ok=True)
    record_parent(run_dir, parent, method, details)
    shutil.copytree(source, run_dir / "model")
    return run_dir


def check_parent_model(run_dir: Path, parent: Path, info: dict) -> None:
    """Raises ContractError when the parent's model changed since `run_dir` was derived from it (the deltas
    would compare against another model)."""
    if bundle_sha256(find_bundle(parent)) != info.get("model_sha256"):
        raise ContractError([f"{run_dir}: the model of its parent {parent} changed since this run was derived "
                             f"from it (retrained?); derive it again"])


def metric_deltas(metrics: dict[str, float], parent: dict[str, float]) -> dict[str, float]:
    """{"task/metric": this run's value - the parent's} for every key both have, and "mean" when both
    means are over the same tasks (a derived run that dropped a head has no comparable mean)."""
    def tasks(m: dict) -> set[str]:
        return {k.split("/", 1)[0] for k in m if "/" in k}
    same = tasks(metrics) == tasks(parent)
    return {k: v - parent[k] for k, v in metrics.items() if k in parent and (k != "mean" or same)}
