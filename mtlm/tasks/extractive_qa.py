"""Extractive question answering (SQuAD v1.1; v2.0 with `allow_no_answer`) on the shared backbone.

BERT's SQuAD set-up (Devlin et al. 2019, sections 4.2-4.3) with the windowing and post-processing of the
Hugging Face `run_qa.py` example:

- encode: question first, context second (`truncation="only_second"`). A context longer than one window
  is split into windows that overlap by `doc_stride` tokens (`return_overflowing_tokens`), never cut. Each
  window is one feature holding its example index and the character offsets of its context tokens. A
  question longer than half a window is cut to half a window (flagged "truncated" by predict).
- labels: the start and end token of the (first) gold answer in each window that holds all of it, else
  position 0 ([CLS]); unanswerable questions point at [CLS] in every window.
- head: per token, hidden -> 2 logits (start, end); loss: mean of the start and end cross-entropies.
- post-processing: in each window the `n_best` likeliest start and end tokens among its context tokens make
  spans with start <= end and at most `max_answer_length` tokens, scored p_start * p_end (softmaxes over the
  window's context tokens and [CLS]); an example's answer is its best span over all its windows. With
  `allow_no_answer`, the answer is "" when the smallest window null score p_start[CLS] * p_end[CLS] exceeds
  the best span's score by more than `no_answer_threshold`.
- metrics: exact match and F1 over normalised answer tokens, max over the gold answers (the official SQuAD
  evaluation), as fractions in [0, 1] (the official script prints x100); with `allow_no_answer` also the
  HasAns / NoAns breakdown of the v2.0 script.

No offline library computes these: the Hugging Face `evaluate` loader fetches the metric script from the
hub, transformers 5 dropped `data.metrics.squad_metrics`, and torchmetrics (not a dependency) reports only
the v1.1 totals. So `normalize_answer` / `answer_f1` below follow the official scripts line for line.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mtlm.encoded import Encoded
from mtlm.tasks.base import STORED_KEYS, LinearHead, NothingToFit, compact_inputs

CHUNK = 512       # examples tokenized per call (examples of one call share their capped stride)


# ---------------------------------------------------------------- the official SQuAD metric

_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_PUNCTUATION = frozenset(string.punctuation)


def normalize_answer(text: str) -> str:
    """Lower-case, drop ASCII punctuation, drop the articles a / an / the, collapse whitespace: the
    `normalize_answer` of the official SQuAD v1.1 and v2.0 evaluation scripts (Rajpurkar et al. 2016, 2018)."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def answer_f1(prediction: str, gold: str) -> float:
    """Token F1 of two answers after `normalize_answer` (bag of tokens). As in the v2.0 script, when either
    side normalises to nothing the F1 is 1 if both do, else 0."""
    pred, ref = normalize_answer(prediction).split(), normalize_answer(gold).split()
    if not pred or not ref:
        return float(pred == ref)
    same = sum((Counter(pred) & Counter(ref)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(ref)
    return 2 * precision * recall / (precision + recall)


def answer_scores(prediction: str, golds: list[str]) -> tuple[float, float]:
    """(exact match, F1) of one prediction, each the max over the gold answers. Gold answers that normalise
    to nothing are dropped; none left (an unanswerable question) means the gold answer is ""."""
    golds = [g for g in golds if normalize_answer(g)] or [""]
    norm = normalize_answer(prediction)
    return (max(float(norm == normalize_answer(g)) for g in golds),
            max(answer_f1(prediction, g) for g in golds))


# ---------------------------------------------------------------- gold answers and windows

def gold_answers(value: Any) -> list[tuple[str, int]]:
    """SQuAD answers -> [(text, answer_start)] in order.

    Accepts {"text": [...], "answer_start": [...]} (the datasets / JSONL form) or a list of
    {"text", "answer_start"} dicts (the original JSON form). Raises ValueError saying what is wrong."""
    if isinstance(value, dict):
        texts, starts = value.get("text"), value.get("answer_start")
        if not isinstance(texts, list) or not isinstance(starts, list) or len(texts) != len(starts):
            raise ValueError('expected {"text": [...], "answer_start": [...]} with two lists of equal length, '
                             f"got {value!r}"[:200])
        pairs = list(zip(texts, starts))
    elif isinstance(value, list) and all(isinstance(a, dict) for a in value):
        pairs = [(a.get("text"), a.get("answer_start")) for a in value]
    else:
        raise ValueError('expected {"text": [...], "answer_start": [...]}, got ' + f"{value!r}"[:200])
    out = []
    for k, (text, start) in enumerate(pairs):
        if isinstance(start, float) and start.is_integer():
            start = int(start)
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"answer {k}: text must be a non-empty string, got {text!r}")
        if isinstance(start, bool) or not isinstance(start, int) or start < 0:
            raise ValueError(f"answer {k}: answer_start must be a non-negative integer, got {start!r}")
        out.append((text, start))
    return out


def _cut_questions(tokenizer, questions: list[str], max_tokens: int) -> tuple[list[str], list[int], list[bool]]:
    """Questions cut to at most `max_tokens` tokens -> (questions, token counts, whether each was cut)."""
    enc = tokenizer(questions, add_special_tokens=False, return_offsets_mapping=True)
    out, lengths, cut = [], [], []
    for q, offsets in zip(questions, enc["offset_mapping"]):
        if len(offsets) > max_tokens:
            q = q[:offsets[max_tokens - 1][1]]
        out.append(q)
        lengths.append(min(len(offsets), max_tokens))
        cut.append(len(offsets) > max_tokens)
    return out, lengths, cut


def encode_windows(tokenizer, questions: list[str], contexts: list[str], max_length: int, doc_stride: int
                   ) -> tuple[list[dict], list[bool]]:
    """(question, context) pairs -> (windows, question_cut).

    Each window is a compact feature (input_ids, token_type_ids, length) plus "example" (index into the
    inputs) and "offsets": int32 (length, 2) character [start, end) of each context token, -1 for question,
    special and padding tokens. Windows of one example are consecutive and cover its whole context.
    Questions are cut to half a window; `doc_stride` (overlap in tokens) is capped per example at half the
    context room its own question leaves, so each window advances by at least half its context (an overlap
    near the whole room would make one window per token), and an example's windows do not depend on the
    other examples encoded with it."""
    specials = tokenizer.num_special_tokens_to_add(pair=True)
    if max_length - specials < 2:
        raise ValueError(f"max_length {max_length} leaves no room for a question and a context")
    questions, q_lengths, cut = _cut_questions(tokenizer, questions, (max_length - specials) // 2)
    # overlap <= half the context room of the example's own question: windows advance >= half a context
    strides = [max(0, min(doc_stride, (max_length - specials - q) // 2)) for q in q_lengths]
    by_stride: dict[int, list[int]] = {}
    for i, stride in enumerate(strides):
        by_stride.setdefault(stride, []).append(i)
    per_example: list[list[dict]] = [[] for _ in questions]
    for stride, members in by_stride.items():   # one tokenizer call per stride value and chunk
        for lo in range(0, len(members), CHUNK):
            chunk = members[lo:lo + CHUNK]
            enc = tokenizer([questions[i] for i in chunk], [contexts[i] for i in chunk], truncation="only_second",
                            max_length=max_length, stride=stride, return_overflowing_tokens=True,
                            return_offsets_mapping=True)
            for w, k in enumerate(enc["overflow_to_sample_mapping"]):
                offsets = np.asarray(enc["offset_mapping"][w], dtype=np.int32).reshape(-1, 2)
                offsets[np.asarray([s != 1 for s in enc.sequence_ids(w)])] = -1
                trim_spaces(offsets, contexts[chunk[k]])
                per_example[chunk[k]].append({**compact_inputs(enc, w), "example": chunk[k], "offsets": offsets})
    return [w for windows in per_example for w in windows], cut


_SPACES = np.array([c for c in range(0x3000 + 1) if chr(c).isspace()], dtype=np.uint32)


def trim_spaces(offsets: np.ndarray, context: str) -> np.ndarray:
    """Move each context token's start past the whitespace it begins with, in place: byte-level BPE tokens
    (GPT-2, Llama 3, SmolLM2) carry the space before a word ("Ġparis" covers " paris"), so without this an
    answer span would start with a space. offsets: (length, 2), -1 outside the context. Returns offsets."""
    ctx = np.nonzero((offsets[:, 0] >= 0) & (offsets[:, 0] < len(context)))[0]
    if not len(ctx):
        return offsets
    chars = np.frombuffer(context.encode("utf-32-le"), dtype=np.uint32)    # one code point per character
    for t in ctx[np.isin(chars[offsets[ctx, 0]], _SPACES)]:     # WordPiece offsets never start on a space
        start, end = int(offsets[t, 0]), int(offsets[t, 1])
        while start < end - 1 and context[start].isspace():
            start += 1
        offsets[t, 0] = start
    return offsets


def span_tokens(offsets: np.ndarray, start_char: int, end_char: int) -> tuple[int, int]:
    """(first, last) token of a window covering the characters [start_char, end_char) of its context, or
    (0, 0) ([CLS]) when the window does not hold all of them. offsets: (length, 2), -1 outside the context."""
    ctx = np.nonzero(offsets[:, 0] >= 0)[0]
    if len(ctx) == 0 or offsets[ctx[0], 0] > start_char or offsets[ctx[-1], 1] < end_char:
        return 0, 0
    first = ctx[offsets[ctx, 0] <= start_char][-1]     # the token the answer starts in
    last = ctx[offsets[ctx, 1] >= end_char][0]         # the token the answer ends in
    return int(first), int(last)


def best_span(start_logits: Tensor, end_logits: Tensor, offsets: np.ndarray, n_best: int,
              max_answer_length: int) -> dict:
    """The best answer span of one window.

    start_logits, end_logits: (seq_len,) (positions past len(offsets) are padding and ignored); offsets as
    in `encode_windows`. Softmaxes run over the window's context tokens and position 0 ([CLS]). Returns
    {"score": p_start * p_end of the best span, "start", "end": its characters [start, end) in the context,
    "null": p_start[0] * p_end[0]}; score 0 and start = end = -1 when no span is valid."""
    n = len(offsets)
    ctx = torch.from_numpy(offsets[:, 0] >= 0)
    allowed = ctx.clone()
    allowed[0] = True
    log_s = start_logits[:n].float().masked_fill(~allowed, float("-inf")).log_softmax(-1)
    log_e = end_logits[:n].float().masked_fill(~allowed, float("-inf")).log_softmax(-1)
    out = {"score": 0.0, "start": -1, "end": -1, "null": float((log_s[0] + log_e[0]).exp())}
    k = min(n_best, int(ctx.sum()))
    if k == 0:
        return out
    starts = log_s.masked_fill(~ctx, float("-inf")).topk(k).indices
    ends = log_e.masked_fill(~ctx, float("-inf")).topk(k).indices
    width = ends[None, :] - starts[:, None]                     # (k, k): end - start per candidate pair
    scores = (log_s[starts][:, None] + log_e[ends][None, :]).masked_fill(
        (width < 0) | (width >= max_answer_length), float("-inf"))
    best = int(scores.argmax())
    i, j = divmod(best, k)
    if scores[i, j] == float("-inf"):
        return out
    out.update(score=float(scores[i, j].exp()), start=int(offsets[int(starts[i]), 0]),
               end=int(offsets[int(ends[j]), 1]))
    return out


def pick_answer(windows: list[dict], context: str, allow_no_answer: bool, threshold: float) -> dict:
    """One example's answer from its windows' `best_span` results: the highest-scoring span over all
    windows; with allow_no_answer, no answer when min window null score - best span score > threshold.

    Returns {"answer": text, "start", "end": characters in the context (None when no answer),
    "score": the span's (or the null's) probability, "no_answer": bool}."""
    best = max(windows, key=lambda w: w["score"])
    null = min(w["null"] for w in windows)
    if best["start"] < 0 or (allow_no_answer and null - best["score"] > threshold):
        return {"answer": "", "start": None, "end": None, "score": null, "no_answer": True}
    return {"answer": context[best["start"]:best["end"]], "start": best["start"], "end": best["end"],
            "score": best["score"], "no_answer": False}


# ---------------------------------------------------------------- the task type

class ExtractiveQA(NothingToFit):
    roles: ClassVar[dict[str, bool]] = {"question": True, "context": True, "answers": True}
    default_columns: ClassVar[dict[str, str]] = {"question": "question", "context": "context", "answers": "answers"}
    metric_names: ClassVar[tuple[str, ...]] = ("f1", "exact_match", "has_ans_f1", "has_ans_exact_match",
                                               "no_ans_exact_match")
    lower_is_better: ClassVar[frozenset[str]] = frozenset()
    outputs: ClassVar[str] = "span"
    head_input: ClassVar[str] = "tokens"
    class_role: ClassVar[str | None] = None
    joinable: ClassVar[bool] = False            # several windows (backbone rows) per data row

    def __init__(self, name: str, cfg):
        self.name, self.cfg = name, cfg

    def columns(self) -> dict[str, str]:
        return {**self.default_columns, **self.cfg.columns}

    def input_fields(self) -> tuple[str, ...]:
        return ("question", "context")

    def check_row(self, row: dict) -> list[tuple[str, str]]:
        """Question and context are non-empty texts; every gold answer's text is the context at its
        answer_start; an empty answer list only with allow_no_answer."""
        cols, problems = self.columns(), []
        for role in ("question", "context"):
            value = row.get(cols[role])
            if value is None:
                problems.append((cols[role], "missing"))
            elif not isinstance(value, str):
                problems.append((cols[role], f"expected text, got {type(value).__name__}"))
            elif not value.strip():
                problems.append((cols[role], "empty text"))
        col = cols["answers"]
        if row.get(col) is None:
            return problems + [(col, "missing")]
        try:
            answers = gold_answers(row[col])
        except ValueError as e:
            return problems + [(col, str(e))]
        if not answers and not self.cfg.allow_no_answer:
            problems.append((col, "no answer (for unanswerable questions, as in SQuAD v2, set allow_no_answer: true)"))
        context = row.get(cols["context"])
        if isinstance(context, str):
            for k, (text, start) in enumerate(answers):
                found = context[start:start + len(text)]
                if found != text:
                    problems.append((col, f"answer {k} {text!r} is not the context at answer_start {start} "
                                          f"(the context has {found!r} there)"))
        return problems

    def make_head(self, hidden_size: int, dropout: float) -> nn.Module:
        return LinearHead(hidden_size, 2, dropout)

    def encode(self, rows: list[dict], tokenizer, max_length: int) -> list[dict]:
        """One feature per window (see `encode_windows`) with its labels "start" / "end" (token positions,
        0 when the window lacks the first gold answer), the example's "context" and gold answer "answers"."""
        cols = self.columns()
        contexts = [r[cols["context"]] for r in rows]
        windows, _ = encode_windows(tokenizer, [r[cols["question"]] for r in rows], contexts, max_length,
                                    self.cfg.doc_stride)
        golds = [gold_answers(r[cols["answers"]]) for r in rows]
        texts = [[t for t, _ in g] for g in golds]
        for w in windows:
            ex = w["example"]
            start, end = (0, 0)
            if golds[ex]:
                text, char = golds[ex][0]
                start, end = span_tokens(w["offsets"], char, char + len(text))
            w.update(start=start, end=end, context=contexts[ex], answers=texts[ex])
        return windows

    def encode_inputs(self, items: list[dict], tokenizer, max_length: int) -> list[Encoded]:
        """Prediction inputs {"question", "context"} -> one Encoded per input whose rows are its windows
        (`encode_windows`, as in training); meta: "context" and "offsets" (one array per window);
        truncated: the question was cut."""
        windows, cut = encode_windows(tokenizer, [it["question"] for it in items], [it["context"] for it in items],
                                      max_length, self.cfg.doc_stride)
        out = [Encoded([], {"context": it["context"], "offsets": []}, c) for it, c in zip(items, cut)]
        for w in windows:
            encoded = out[w["example"]]
            encoded.meta["offsets"].append(w["offsets"])
            encoded.sequences.append({k: w[k] for k in STORED_KEYS if k in w})
        return out

    def collate_labels(self, features: list[dict], seq_len: int) -> dict[str, Tensor]:
        return {"labels": torch.tensor([[f["start"], f["end"]] for f in features], dtype=torch.long)}

    def loss(self, logits: Tensor, batch: dict[str, Tensor]) -> Tensor:
        """(CE(start) + CE(end)) / 2. logits (batch, seq_len, 2), batch["labels"] (batch, 2) token positions."""
        logits, labels = logits.float(), batch["labels"]
        return (F.cross_entropy(logits[..., 0], labels[:, 0]) + F.cross_entropy(logits[..., 1], labels[:, 1])) / 2

    def _best(self, start_logits: Tensor, end_logits: Tensor, offsets: np.ndarray) -> dict:
        return best_span(start_logits, end_logits, offsets, self.cfg.n_best, self.cfg.max_answer_length)

    def predictions(self, logits: Tensor, features: list[dict]) -> list[Any]:
        """Per window: its `best_span` result. logits (windows, seq_len, 2), on any device."""
        logits = logits.float().cpu()      # one copy per batch: the span search is many small ops
        return [self._best(logits[i, :, 0], logits[i, :, 1], f["offsets"]) for i, f in enumerate(features)]

    def postprocess(self, predictions: list[dict], features: list[dict]) -> list[str]:
        """Per-window results (in feature order) -> one answer text per example ("" for no answer)."""
        groups: dict[int, list[int]] = {}
        for i, f in enumerate(features):
            groups.setdefault(f["example"], []).append(i)
        return [pick_answer([predictions[i] for i in idx], features[idx[0]]["context"], self.cfg.allow_no_answer,
                            self.cfg.no_answer_threshold)["answer"] for idx in groups.values()]

    def references(self, features: list[dict]) -> list[Any]:
        """One list of gold answer texts per example ([] when unanswerable), in the order of `postprocess`."""
        seen: dict[int, list[str]] = {}
        for f in features:
            seen.setdefault(f["example"], f["answers"])
        return list(seen.values())

    def metrics(self, predictions: list[Any], references: list[Any]) -> dict[str, float]:
        """Mean exact match and F1 (see `answer_scores`); with allow_no_answer, also over the answerable
        (has_ans_*) and the unanswerable (no_ans_exact_match, which equals its F1) questions.

        A question is answerable when its gold answer list is not empty, as in the official v2.0 script
        (`qid_to_has_ans = bool(qa['answers'])`), also when every gold answer normalises to nothing
        (e.g. "The"): it is scored against "" then, but still counts as has-answer."""
        scores = [answer_scores(p, g) for p, g in zip(predictions, references)]
        out = {"f1": _mean([f for _, f in scores]), "exact_match": _mean([e for e, _ in scores])}
        if self.cfg.allow_no_answer:
            has = [s for s, g in zip(scores, references) if len(g) > 0]
            no = [s for s, g in zip(scores, references) if len(g) == 0]
            if has:
                out.update(has_ans_f1=_mean([f for _, f in has]), has_ans_exact_match=_mean([e for e, _ in has]))
            if no:
                out["no_ans_exact_match"] = _mean([e for e, _ in no])
        return out

    def decode(self, logits: Tensor, inputs: list[Encoded]) -> list[dict]:
        """logits (total windows, seq_len, 2), the windows of each input in order ->
        [{"answer": text, "start", "end": characters [start, end) in the context (None for no answer),
        "score": probability, "no_answer": bool}]."""
        logits = logits.float().cpu()
        out, row = [], 0
        for encoded in inputs:
            meta = encoded.meta
            windows = [self._best(logits[row + w, :, 0], logits[row + w, :, 1], offsets)
                       for w, offsets in enumerate(meta["offsets"])]
            row += encoded.rows
            out.append(pick_answer(windows, meta["context"], self.cfg.allow_no_answer, self.cfg.no_answer_threshold))
        return out


def _mean(values: list[float]) -> float:
    return float(sum(values) / len(values)) if values else 0.0
