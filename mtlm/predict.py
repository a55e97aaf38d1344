"""Predict every task for new inputs from one backbone pass per input.

`mtlm.load(path)` returns a `Predictor`. Inputs are strings or dicts of input fields: {"text", "text_pair"?}
for text tasks, {"question", "context"} for extractive QA, {"text", "choices"} for multiple choice (one input
may carry the fields of several kinds). Tasks that read the same input fields share one backbone pass: all
single-text tasks (classification, multilabel, regression, tagging) run on one encoding of the text; pair
tasks on one encoding of the pair; a QA input runs all windows of its context, a multiple-choice input one
row per choice.

Encoding goes through the task types' `encode_inputs` (the same tokenization as training) into typed
`mtlm.encoded.Encoded` inputs; the backbone and heads run only through an engine (`mtlm.engine`, torch eager
by default); each head's `decode` turns its outputs and the inputs' metadata into results.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mtlm.checkpoint import load_bundle
from mtlm.data import length_sorted_batches
from mtlm.encoded import Encoded, ModelInputs
from mtlm.engine import Engine, make_engine
from mtlm.tasks.base import pad_inputs

TEXT_FIELDS = ("text", "text_pair", "question", "context")   # string fields of an input
FIELDS = TEXT_FIELDS + ("choices",)                           # every field an input may have
MIN_CHOICES = 2                                               # a multiple-choice input's fewest choices
Fields = tuple[str, ...]


class InputError(ValueError):
    """A prediction input that cannot be served (unknown task, missing text_pair, empty text, ...)."""


class Abandoned(RuntimeError):
    """A micro-batch stopped between backbone chunks because `should_stop()` said so (the server: every
    input's deadline has passed, so nobody waits for the result)."""


def normalize_input(item: Any, index: int, generation_fields: frozenset[str] = frozenset()) -> dict:
    """A str or a dict of input fields -> dict. Raises InputError naming the input index and field.

    Fields: text, text_pair, question, context (strings), choices (a list of 2 or more non-empty strings).
    Strings must be valid Unicode text: a lone surrogate (JSON "\\ud800") is an InputError naming it.
    An input needs a text, or a question and a context; a field that is present must not be blank. Which
    fields each task needs is checked by `Predictor.plan`. generation_fields: the fields generation tasks read
    (their `prompt`, or their template's columns: allowed too, and an input carrying one needs nothing else)."""
    if isinstance(item, str):
        item = {"text": item}
    if not isinstance(item, dict):
        raise InputError(f"inputs[{index}]: expected a string or an object with 'text', got {type(item).__name__}")
    for key, value in item.items():
        if key not in FIELDS and key not in generation_fields:
            raise InputError(f"inputs[{index}].{key}: unknown field (expected {', '.join(FIELDS)})")
        if key == "choices":
            if not isinstance(value, list) or not all(isinstance(c, str) and c.strip() for c in value):
                raise InputError(f"inputs[{index}].choices: expected a list of non-empty strings")
            if len(value) < MIN_CHOICES:
                raise InputError(f"inputs[{index}].choices: {len(value)} choice(s), at least {MIN_CHOICES} "
                                 "(the model picks one of them)")
        elif not isinstance(value, str):
            raise InputError(f"inputs[{index}].{key}: expected a string, got {type(value).__name__}")
        for where, text in ([(f"choices[{j}]", c) for j, c in enumerate(value)] if key == "choices"
                            else [(key, value)]):
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as e:      # a lone surrogate: valid JSON (\ud800), not Unicode text
                raise InputError(f"inputs[{index}].{where}: not valid Unicode text (lone surrogate "
                                 f"{text[e.start]!r} at character {e.start})") from None
    if "context" in item and "question" not in item and "choices" in item:
        raise InputError(f"inputs[{index}].context: a multiple-choice input gives its context as 'text' "
                         "(with 'choices'); 'context' goes with a 'question' for extractive QA")
    qa = [k for k in ("question", "context") if k in item and k not in generation_fields]
    generation = [k for k in item if k in generation_fields]
    blank = [k for k, v in item.items() if isinstance(v, str) and not v.strip()]
    needed = ("question", "context") if qa else () if generation else ("text",)
    for key in blank + [k for k in needed if k not in item]:
        raise InputError(f"inputs[{index}].{key}: missing or empty")
    return item


def _carries(item: dict, field: str) -> bool:
    value = item.get(field)
    return bool(value) and not (isinstance(value, str) and not value.strip())


def min_tokens(item: dict, fields: Fields, max_length: int) -> int:
    """A lower bound of the tokens `Predictor.encode` makes of one input for one field group, from its
    whitespace-separated words (each word is at least one token): checked before tokenising, so an
    oversized input is refused without paying for its tokenisation. Text groups are cut at max_length
    tokens; a QA context is read whole (windows); a multiple-choice input is one sequence per choice."""
    words = {f: len(item[f].split()) for f in fields if isinstance(item.get(f), str)}
    if "choices" in fields:
        return sum(min(words.get("text", 0) + len(c.split()), max_length) for c in item["choices"])
    total = sum(words.values())
    return total if "context" in fields else min(total, max_length)


def check_fields(items: list[dict], groups: dict[Fields, list[str]]) -> None:
    """Every input has every field that the tasks of each field group read. Raises InputError naming the
    inputs (first five) and the tasks, e.g. "inputs[0, 2]: task(s) paraphrase need 'text_pair'"."""
    for fields, group in groups.items():
        for field in (f for f in fields if not f.startswith("#")):
            missing = [i for i, it in enumerate(items) if not _carries(it, field)]
            if missing:
                raise InputError(f"inputs{missing[:5]}: task(s) {', '.join(group)} need '{field}'")


@dataclass
class Plan:
    """What to compute for a list of normalised inputs (`Predictor.plan`).

    names: the tasks of the response, in order; row_tasks: per input, the tasks it gets; groups: field
    group -> its tasks among `names` (one backbone pass each); members: field group -> the indices of the
    inputs that need that pass."""

    names: list[str]
    row_tasks: list[list[str]]
    groups: dict[Fields, list[str]]
    members: dict[Fields, list[int]]


class Predictor:
    """A loaded bundle: `predict(inputs, tasks=None)` -> one {task: result} dict per input.

    Results: classification {"label", "score", "scores"}; multilabel {"labels", "scores"}; regression
    {"value"}; token_classification {"entities": [{"entity", "text", "start", "end", "score"}]} with character
    offsets into the text; extractive_qa {"answer", "start", "end", "score", "no_answer"} with character
    offsets into the context; multiple_choice {"label": the best choice, "index", "score", "scores"};
    generation {"text"} (the prompt's continuation, `mtlm.tasks.generation`). A result
    carries "truncated": true when the input exceeded max_length tokens (for QA: the question was cut; a
    long context is read window by window, never cut)."""

    def __init__(self, model, tokenizer, tasks: dict, meta: dict, device: torch.device,
                 max_pass_tokens: int = 16384, engine: str | Engine = "torch"):
        """model: the loaded `MultiTaskModel` the engine is built from. max_pass_tokens: padded tokens
        (rows x seq_len) per engine call; a larger micro-batch (a QA context of many windows, many choices)
        runs in row chunks, so activation memory stays bounded. engine: an Engine, or the name of a torch
        engine (torch, torch-bf16); ONNX engines read their graph from a bundle: `mtlm.load(path, engine=...)`
        builds and checks them. Raises ValueError (mtlm.engine.EngineError) on an unknown engine name."""
        self.model, self.tokenizer, self.tasks, self.meta, self.device = model, tokenizer, tasks, meta, device
        self.max_length = int(meta["max_length"])
        self.max_pass_tokens = max_pass_tokens
        self.engine = make_engine(engine, model, device) if isinstance(engine, str) else engine

    @property
    def name(self) -> str:
        return self.meta.get("name", "mtlm")

    def check_tasks(self, tasks: list[str] | None) -> list[str]:
        """The requested task names (all when None). Raises InputError listing the valid ones."""
        if tasks is None:
            return list(self.tasks)
        if not tasks:
            raise InputError(f"tasks: an empty list; omit it (each input gets the tasks its fields feed) or name "
                             f"some of the valid tasks: {', '.join(self.tasks)}")
        unknown = [t for t in tasks if t not in self.tasks]
        if unknown:
            raise InputError(f"unknown task(s) {unknown}; valid tasks: {', '.join(self.tasks)}")
        return list(dict.fromkeys(tasks))

    def groups(self, names: list[str]) -> dict[Fields, list[str]]:
        """Requested tasks grouped by the input fields they read (one backbone pass per group)."""
        out: dict[Fields, list[str]] = {}
        for n in names:     # a generation task decodes on its own: its group is marked "#<task>"
            mark = ("#" + n,) if hasattr(self.tasks[n], "decode_with") else ()
            out.setdefault(tuple(self.tasks[n].input_fields()) + mark, []).append(n)
        return out

    @property
    def generation_fields(self) -> frozenset[str]:
        """Input fields that generation tasks read (`normalize_input`)."""
        return frozenset(f for t in self.tasks.values() if hasattr(t, "decode_with") for f in t.input_fields())

    def plan(self, items: list[dict], tasks: list[str] | None) -> Plan:
        """The tasks each input gets. Explicit `tasks`: all of them for every input (an input missing a
        field one of them reads is an error). None: per input, every task whose input fields it carries
        (plain text -> the text tasks; {"question", "context"} -> extractive QA; both -> both).
        Raises InputError: unknown task, missing field, or an input that no task can read."""
        if tasks is not None:
            names = self.check_tasks(tasks)
            check_fields(items, self.groups(names))
            row_tasks = [list(names) for _ in items]
        else:
            row_tasks = []
            for i, it in enumerate(items):
                mine = [n for n, t in self.tasks.items() if all(_carries(it, f) for f in t.input_fields())]
                if not mine:
                    reads = "; ".join(f"{n} reads {' + '.join(t.input_fields())}" for n, t in self.tasks.items())
                    raise InputError(f"inputs[{i}]: no task of this model reads the fields it carries "
                                     f"({', '.join(it)}): {reads}")
                row_tasks.append(mine)
            names = [n for n in self.tasks if any(n in r for r in row_tasks)]
        groups = self.groups(names)
        members = {fields: [i for i, r in enumerate(row_tasks) if any(n in r for n in group)]
                   for fields, group in groups.items()}
        return Plan(names, row_tasks, groups, members)

    def encoder(self, fields: Fields):
        """The task whose `encode_inputs` encodes the field group `fields` for every task reading it (one
        backbone pass per group): a task with a per-token head when the group has one (a word tagger must
        read the words it was trained on; with a WordPiece tokenizer, as MiniLM/BERT, its input ids equal the
        plain text encoding that the pooled text tasks were trained on), else the group's first task."""
        if fields and fields[-1].startswith("#"):
            return self.tasks[fields[-1][1:]]
        readers = [t for t in self.tasks.values() if tuple(t.input_fields()) == fields]
        return next((t for t in readers if t.head_input == "tokens"), readers[0])

    def encode(self, items: list[dict], fields: Fields) -> list[Encoded]:
        """Tokenize items for one field group -> one `Encoded` per item (backbone rows, decode metadata,
        truncation flag), by the group's `encoder`."""
        return self.encoder(fields).encode_inputs(items, self.tokenizer, self.max_length)

    def forward(self, inputs: ModelInputs, names: list[str], should_stop=None,
                rows: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """{head: logits (rows, ...)} for a padded batch (rows, seq_len) through the engine, in chunks of at
        most `max_pass_tokens` padded tokens (at least one row per chunk). `should_stop()` is asked before
        every chunk after the first; True raises Abandoned. rows: {head: LongTensor of the rows it is
        asked for, ascending} (engines with `takes_rows` only): its logits then hold only those rows."""
        total, seq_len = inputs.shape
        step = max(1, self.max_pass_tokens // seq_len)
        if total <= step:
            return self.engine.run(inputs, names) if rows is None else self.engine.run(inputs, names, rows=rows)
        parts = []
        for i in range(0, total, step):
            if parts and should_stop is not None and should_stop():
                raise Abandoned(f"stopped after {i} of {total} rows")
            chunk = inputs.rows(i, i + step)
            if rows is None:
                parts.append(self.engine.run(chunk, names))
                continue
            mine = {n: r[(r >= i) & (r < i + step)] - i for n, r in rows.items()}
            asked = [n for n in names if len(mine[n])]
            if asked:
                parts.append(self.engine.run(chunk, asked, rows={n: mine[n] for n in asked}))
        return {n: torch.cat([part[n] for part in parts if n in part]) for n in names}

    def _routed_rows(self, encoded: list[Encoded], heads: list[str], first: list[int],
                     row_tasks: list[list[str]] | None) -> dict[str, torch.Tensor] | None:
        """{head: the backbone rows of the inputs that asked for it} when the model has per-task LoRA
        adapters, the engine can route rows, and some head is not asked by every input: each adapter then
        runs only its own rows (`mtlm.adapters.adapter_states`). None otherwise (every head, every row)."""
        adapters = getattr(self.model, "adapters", None)
        if (row_tasks is None or adapters is None or len(adapters.names()) < 2
                or not getattr(self.engine, "takes_rows", False)):
            return None
        if all(n in r for r in row_tasks for n in heads):
            return None
        return {n: torch.tensor([k for i, r in enumerate(row_tasks) if n in r for k in range(first[i], first[i + 1])],
                                dtype=torch.long) for n in heads}

    @torch.inference_mode()
    def run(self, encoded: list[Encoded], names: list[str], row_tasks: list[list[str]] | None = None,
            should_stop=None) -> list[dict[str, dict]]:
        """One engine pass over a micro-batch of encoded inputs (one field group), every head in `names`.
        An input of several rows (QA windows, choices) takes them consecutively; its task's `decode`
        regroups them.

        row_tasks: the tasks each input asked for (default: all of `names`); a head's outputs are decoded
        only for the inputs that asked for it (the server mixes requests for different task subsets).
        should_stop: see `forward` (raises Abandoned)."""
        generated = [n for n in names if hasattr(self.tasks[n], "decode_with")]
        heads = [n for n in names if n not in generated]
        first = [0]
        for e in encoded:
            first.append(first[-1] + e.rows)
        outputs, routed = {}, None
        if heads:
            inputs = ModelInputs.from_dict(pad_inputs([s for e in encoded for s in e.sequences],
                                                      self.tokenizer.pad_token_id))
            routed = self._routed_rows(encoded, heads, first, row_tasks)
            outputs = self.forward(inputs, heads, should_stop, routed)
        out: list[dict[str, dict]] = [{} for _ in encoded]
        for n in names:
            asked = [i for i in range(len(encoded)) if row_tasks is None or n in row_tasks[i]]
            if not asked:
                continue
            if n in generated:      # decoding runs the model token by token (`Generation.decode_with`)
                results = self.tasks[n].decode_with(self.model, [encoded[i] for i in asked],
                                                    self.tokenizer.pad_token_id, should_stop, self.tokenizer)
            else:
                head = outputs[n]
                if len(asked) < len(encoded) and routed is None:     # routed: only the asked rows came back
                    head = head[[r for i in asked for r in range(first[i], first[i + 1])]]
                results = self.tasks[n].decode(head.float(), [encoded[i] for i in asked])
            for i, result in zip(asked, results):
                if encoded[i].truncated:
                    result["truncated"] = True
                out[i][n] = result
        return out

    def predict(self, inputs: list[Any] | str, tasks: list[str] | None = None, batch_size: int = 32
                ) -> list[dict[str, dict]]:
        """Predict `tasks` for each input; default: per input, every task whose fields it carries (see
        `plan`). Returns one {task: result} dict per input. Raises InputError on bad inputs or task names."""
        if isinstance(inputs, (str, dict)):
            inputs = [inputs]
        if isinstance(tasks, str):
            tasks = [tasks]
        if not inputs:
            raise InputError("no inputs to predict")
        items = [normalize_input(x, i, self.generation_fields) for i, x in enumerate(inputs)]
        plan = self.plan(items, tasks)
        results: list[dict[str, dict]] = [{} for _ in items]
        for fields, group in plan.groups.items():
            members = plan.members[fields]
            feats = self.encode([items[i] for i in members], fields)
            for idx in length_sorted_batches([e.length for e in feats], batch_size):
                rows = [members[j] for j in idx]
                out = self.run([feats[j] for j in idx], group, [plan.row_tasks[i] for i in rows])
                for i, res in zip(rows, out):
                    results[i].update(res)
        return [{n: r[n] for n in plan.names if n in r} for r in results]


def load(path: str | Path, device: str | None = None, engine: str | None = None) -> Predictor:
    """Load a run folder or bundle for prediction, run by `engine` (a name in `mtlm.engine.ENGINES`: torch,
    torch-bf16, onnx, onnx-int8). Default (None): the fastest engine the bundle holds that runs on this
    machine and passes its check against torch fp32 on the bundle's dev rows (`mtlm.engine_check.choose_engine`;
    torch for a bundle holding no other). A named engine other than torch is checked the same way first.
    Raises mtlm.checkpoint.BundleError, mtlm.engine.EngineError (a ValueError: unknown engine, one this
    machine or bundle cannot run, or one that fails its check)."""
    from mtlm.checkpoint import find_bundle
    from mtlm.engine_check import choose_engine

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model, tokenizer, tasks, meta = load_bundle(path, dev)
    chosen = choose_engine(find_bundle(path), model, tokenizer, tasks, meta, dev, requested=engine)
    return Predictor(model, tokenizer, tasks, meta, dev, engine=chosen)
