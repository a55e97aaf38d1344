"""Text generation with a decoder backbone: prompt -> target text, trained with a prompt-masked next-token
loss, decoded greedily (or with beam search / sampling through `generate` kwargs).

Columns: `prompt` and `target`, or `template` (a Python format string over several columns, e.g.
"Question: {question}\\nAnswer:") and `target`. The target is appended to the prompt after one space
(none when the prompt ends in whitespace) and closed with the tokenizer's eos token; only target tokens
(eos included) count in the loss (as in instruction tuning, e.g. Ouyang et al. 2022's SFT). A prompt that
leaves no room for a target within max_length is an error naming the file, line and field; a target that
does not fit is cut.

The head is the backbone's own language-model head: its input embedding matrix, tied (`LMHead`), so it
adds no weights to the bundle; decoders with an untied output layer are refused. Decoding uses a
`transformers` causal-LM view of the backbone (`causal_lm`: the same modules, KV cache, `generate`), with
each task's LoRA adapter when the model has per-task adapters (`mtlm.adapters.adapter_rows`).

Metrics (predictions are {"text", "nll", "tokens"}): rouge_l (ROUGE-L F1, Lin 2004, `rouge-score` with
stemming), exact_match (after SQuAD's answer normalisation), bleu (corpus BLEU, Papineni et al. 2002,
`sacrebleu`, divided by 100 to lie in [0, 1]) and perplexity (exp of the mean target-token negative
log-likelihood under teacher forcing; lower is better).
"""

from __future__ import annotations

import contextlib
import math
import string
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import StoppingCriteria
from transformers.generation.streamers import BaseStreamer

from mtlm.config import RecipeError, TaskConfig
from mtlm.encoded import Encoded
from mtlm.tasks.base import NothingToFit, RowProblems, pad_inputs, text_problems

IGNORE = -100
GENERATE_OPTIONS = frozenset({"num_beams", "do_sample", "temperature", "top_p", "top_k", "repetition_penalty",
                              "length_penalty", "no_repeat_ngram_size"})


def template_fields(template: str) -> list[str]:
    """The column names a format template reads, in order ("{q} and {c}" -> ["q", "c"]). Raises ValueError
    for a malformed template or a positional field ("{}" / "{0}")."""
    fields = []
    for _, name, _, _ in string.Formatter().parse(template):
        if name is None:
            continue
        if name == "" or name.isdigit():
            raise ValueError(f"template {template!r}: fields must name columns ({{column}}), not positions")
        fields.append(name.split(".")[0].split("[")[0])
    return list(dict.fromkeys(fields))


class LMHead(nn.Module):
    """The decoder's output layer tied to its input embeddings: (batch, seq_len, hidden) -> (batch, seq_len,
    vocab) logits. Holds no parameters of its own (the embedding lives in the backbone); `tie(backbone)`
    binds it. Raises RecipeError for a backbone whose config does not tie its word embeddings."""

    def __init__(self):
        super().__init__()
        self._embedding: list[nn.Module] = []       # a list: not a registered submodule, not in state_dict

    def tie(self, backbone: nn.Module) -> None:
        if not getattr(backbone.config, "tie_word_embeddings", False):
            raise RecipeError([f"type generation: the backbone ({backbone.config.model_type}) has an untied output "
                               f"layer that mtlm does not load; use a decoder with tied embeddings (e.g. smollm2-135m)"])
        self._embedding[:] = [backbone.get_input_embeddings()]

    def forward(self, hidden: Tensor) -> Tensor:
        if not self._embedding:
            raise RuntimeError("LMHead.tie(backbone) was not called")
        return F.linear(hidden, self._embedding[0].weight)


def causal_lm(backbone: nn.Module) -> nn.Module:
    """A `transformers` causal-LM model (e.g. LlamaForCausalLM) made of `backbone` and a tied lm_head, for
    `generate` (KV cache, beam search, sampling). Built on the meta device, then given the real modules:
    no weights are copied. Cached on the backbone."""
    cached = getattr(backbone, "_mtlm_causal_lm", None)
    if cached is not None:
        return cached[0]
    from transformers import AutoModelForCausalLM

    cls = AutoModelForCausalLM._model_mapping[type(backbone.config)]
    with torch.device("meta"):
        lm = cls(backbone.config)
    setattr(lm, lm.base_model_prefix, backbone)
    head = nn.Linear(backbone.config.hidden_size, backbone.config.vocab_size, bias=False)
    head.weight = backbone.get_input_embeddings().weight
    lm.lm_head = head
    lm.eval()
    object.__setattr__(backbone, "_mtlm_causal_lm", (lm,))
    return lm


def normalize_answer(text: str) -> str:
    """SQuAD's answer normalisation: lower case, no punctuation, no articles, single spaces."""
    import re
    text = "".join(c for c in text.lower() if c not in set(string.punctuation))
    return " ".join(re.sub(r"\b(a|an|the)\b", " ", text).split())


class Generation(NothingToFit):
    # the roles a recipe's columns may name; with a template, the instance's roles are template + target
    roles: ClassVar[dict[str, bool]] = {"prompt": True, "target": True}
    default_columns: ClassVar[dict[str, str]] = {"prompt": "prompt", "target": "target"}
    metric_names: ClassVar[tuple[str, ...]] = ("rouge_l", "exact_match", "bleu", "perplexity")
    class_role: ClassVar[str | None] = None
    joinable: ClassVar[bool] = False
    lower_is_better: ClassVar[frozenset[str]] = frozenset({"perplexity"})
    outputs: ClassVar[str] = "tokens"
    head_input: ClassVar[str] = "tokens"

    def __init__(self, name: str, cfg: TaskConfig):
        self.name, self.cfg = name, cfg
        problems = []
        if cfg.template is not None:
            try:
                self.fields = template_fields(cfg.template)
            except ValueError as e:
                problems.append(f"tasks.{name}.template: {e}")
            if "prompt" in cfg.columns:
                problems.append(f"tasks.{name}: give columns.prompt or template, not both")
        bad = sorted(set(cfg.generate) - GENERATE_OPTIONS)
        if bad:
            problems.append(f"tasks.{name}.generate: {', '.join(bad)} not a decoding option "
                            f"(options: {', '.join(sorted(GENERATE_OPTIONS))})")
        if problems:
            raise RecipeError(problems)
        if cfg.template is not None:
            self.roles = {"template": True, "target": True}

    def columns(self) -> dict[str, Any]:
        target = self.cfg.columns.get("target", "target")
        if self.cfg.template is not None:
            return {"template": self.fields, "target": target}
        return {"prompt": self.cfg.columns.get("prompt", "prompt"), "target": target}

    def input_fields(self) -> tuple[str, ...]:
        return tuple(self.fields) if self.cfg.template is not None else ("prompt",)

    def prompt(self, row: dict) -> str:
        """The prompt text of a row (a training row's columns, or a request's fields)."""
        if self.cfg.template is not None:
            return self.cfg.template.format_map({f: row[f] for f in self.fields})
        return row[self.columns()["prompt"]] if self.columns()["prompt"] in row else row["prompt"]

    def check_row(self, row: dict) -> list[tuple[str, str]]:
        problems = []
        inputs = self.fields if self.cfg.template is not None else [self.columns()["prompt"]]
        for col in inputs:
            value = row.get(col)
            if value is None:
                problems.append((col, "missing" + (" (named by the template)" if self.cfg.template else "")))
            elif not isinstance(value, (str, int, float)) or isinstance(value, bool):
                problems.append((col, f"expected text, got {type(value).__name__}"))
        col = self.columns()["target"]
        return problems + text_problems(col, row.get(col), "target")

    def make_head(self, hidden_size: int, dropout: float) -> nn.Module:
        return LMHead()

    def _prompt_ids(self, prompts: list[str], tokenizer, max_length: int) -> tuple[list[list[int]], list[int]]:
        """Token ids of each prompt, and the indices of prompts that leave no room for a target token."""
        ids = tokenizer(prompts, add_special_tokens=True)["input_ids"]
        return ids, [i for i, p in enumerate(ids) if len(p) >= max_length]

    def encode(self, rows: list[dict], tokenizer, max_length: int) -> list[dict]:
        """Features: input_ids = prompt + " " + target + eos (cut to max_length), "prompt_length", and
        "target" (the reference text). Raises RowProblems for a prompt of max_length tokens or more."""
        self.tokenizer = tokenizer
        prompts = [self.prompt(r) for r in rows]
        ids, too_long = self._prompt_ids(prompts, tokenizer, max_length)
        if too_long:
            field = "template" if self.cfg.template is not None else self.columns()["prompt"]
            raise RowProblems([(i, field, f"the prompt is {len(ids[i])} tokens; max_length {max_length} leaves no "
                                          f"room for the target (raise max_length or shorten the prompt)")
                               for i in too_long])
        targets = [r[self.columns()["target"]].strip() for r in rows]
        joined = [("" if p[-1:].isspace() else " ") + t for p, t in zip(prompts, targets)]
        target_ids = tokenizer(joined, add_special_tokens=False)["input_ids"]
        features = []
        for p, t, text in zip(ids, target_ids, targets):
            full = (p + t + [tokenizer.eos_token_id])[:max_length]
            features.append({"input_ids": np.asarray(full, dtype=np.int32), "length": len(full),
                             "prompt_length": len(p), "target": text})
        return features

    def collate_labels(self, features: list[dict], seq_len: int) -> dict[str, Tensor]:
        labels = np.full((len(features), seq_len), IGNORE, dtype=np.int64)
        for row, f in enumerate(features):
            labels[row, f["prompt_length"]:f["length"]] = f["input_ids"][f["prompt_length"]:]
        return {"labels": torch.from_numpy(labels)}

    def loss(self, logits: Tensor, batch: dict[str, Tensor]) -> Tensor:
        """Mean next-token cross-entropy over target tokens: logits (batch, seq_len, vocab) at position t
        predict labels[:, t + 1]; prompt and padding positions are -100 (ignored)."""
        return F.cross_entropy(logits[:, :-1].float().flatten(0, 1), batch["labels"][:, 1:].flatten(),
                               ignore_index=IGNORE)

    # --- decoding: needs the model, not one pass's logits (mtlm.evaluate.task_outputs calls it) ---

    @torch.inference_mode()
    def generate(self, model, prompts: list[np.ndarray], pad_token_id: int, eos_token_id: int,
                 limits: list[int] | None = None, stops: list | None = None, sinks: list | None = None,
                 should_stop=None, tokenizer=None, **extra) -> list[str]:
        """Greedy (or `generate`-option) continuations of token-id prompts, through this task's adapter when
        the model has adapters, all prompts in one batched `generate` (left padding, KV cache).

        limits: per prompt, its most new tokens (default: the task's max_new_tokens); stops: per prompt a
        callable or None, True once nobody waits for it (its deadline passed, its client left); should_stop:
        one such callable for the whole batch; a prompt stops at eos, its limit, or a stop. sinks: per prompt
        a callable or None, given each newly decoded piece of text as it is generated (streaming; not with
        beam search, where each prompt's text comes at the end). tokenizer: the one to decode with (default:
        the one the task last encoded with). `extra`: more `generate` arguments. Returns the decoded texts,
        stripped."""
        from transformers import StoppingCriteriaList

        from mtlm.adapters import adapter_rows

        tokenizer = tokenizer or self.tokenizer
        lm = causal_lm(model.backbone)
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, p in enumerate(prompts):          # left padding: every prompt ends where generation starts
            ids[i, width - len(p):] = torch.as_tensor(np.asarray(p, dtype=np.int64))
            mask[i, width - len(p):] = 1
        cap = min(int(extra.pop("max_new_tokens", self.cfg.max_new_tokens)), self.cfg.max_new_tokens)
        limits = [min(int(n), cap) for n in limits] if limits else [cap] * len(prompts)
        options = {"do_sample": False, **self.cfg.generate, **extra, "max_new_tokens": max(limits)}
        beams = int(options.get("num_beams", 1))
        if beams == 1:                           # per-prompt limits and stops, and streaming
            rows = RowStops(width, limits, eos_token_id, stops, should_stop)
            options["stopping_criteria"] = StoppingCriteriaList([rows, *options.get("stopping_criteria", [])])
            if sinks is not None and any(sinks):
                options["streamer"] = RowStreamer(tokenizer, rows, sinks)
        elif should_stop is not None or stops:
            options["stopping_criteria"] = StoppingCriteriaList([AllStop(should_stop, stops)])
        names = [model.adapters.of[self.name]] * (len(prompts) * beams) if model.adapters is not None else None
        device = next(model.parameters()).device
        with adapter_rows(model.backbone, names) if names else contextlib.nullcontext():
            out = lm.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                              pad_token_id=pad_token_id, eos_token_id=eos_token_id, **options)
        return [tokenizer.decode(seq[width:width + limit], skip_special_tokens=True).strip()
                for seq, limit in zip(out, limits)]

    def run_batch(self, model, features: list[dict], pad_token_id: int, device: torch.device) -> list[dict]:
        """Predictions for evaluation: {"text": generated, "nll": summed target-token NLL, "tokens": count}
        per feature (teacher-forced pass for the NLL, then `generate` from the prompt)."""
        batch = {k: v.to(device) for k, v in pad_inputs(features, pad_token_id).items()}
        labels = self.collate_labels(features, batch["input_ids"].shape[1])["labels"].to(device)
        with torch.inference_mode():
            logits = model(task=self.name, **batch).float()
            nll = F.cross_entropy(logits[:, :-1].transpose(1, 2), labels[:, 1:], ignore_index=IGNORE,
                                  reduction="none").sum(1)
        counts = (labels[:, 1:] != IGNORE).sum(1)
        texts = self.generate(model, [f["input_ids"][:f["prompt_length"]] for f in features], pad_token_id,
                              self.tokenizer.eos_token_id)
        return [{"text": t, "nll": float(n), "tokens": int(c)} for t, n, c in zip(texts, nll, counts)]

    def predictions(self, logits: Tensor, features: list[dict]) -> list[Any]:
        raise RuntimeError("generation predictions come from run_batch (they need decoding, not one pass)")

    def references(self, features: list[dict]) -> list[Any]:
        return [f["target"] for f in features]

    def postprocess(self, predictions: list[Any], features: list[dict]) -> list[Any]:
        return predictions

    def metrics(self, predictions: list[Any], references: list[Any]) -> dict[str, float]:
        import sacrebleu
        from rouge_score import rouge_scorer

        texts = [p["text"] for p in predictions]
        scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
        rouge = [scorer.score(r, t)["rougeL"].fmeasure for t, r in zip(texts, references)]
        tokens = sum(p["tokens"] for p in predictions)
        return {
            "rouge_l": float(np.mean(rouge)) if rouge else 0.0,
            "exact_match": float(np.mean([normalize_answer(t) == normalize_answer(r)
                                          for t, r in zip(texts, references)])) if texts else 0.0,
            "bleu": float(sacrebleu.corpus_bleu(texts, [references]).score / 100.0),
            "perplexity": float(math.exp(sum(p["nll"] for p in predictions) / max(tokens, 1))),
        }

    # --- prediction inputs (mtlm.predict / the server) ---

    def encode_inputs(self, items: list[dict], tokenizer, max_length: int) -> list[Encoded]:
        """Prediction inputs (the prompt, or the template's fields) -> one Encoded each: the prompt's ids cut
        to max_length - 1 (keeping its end), meta "prompt_ids"; truncated when cut; new_tokens = the task's
        max_new_tokens (so the server budgets prompt + generated tokens per batch)."""
        self.tokenizer = tokenizer
        prompts = [self.prompt(it) for it in items]
        ids = tokenizer(prompts, add_special_tokens=True)["input_ids"]
        out = []
        for p in ids:
            kept = p[-(max_length - 1):]
            arr = np.asarray(kept, dtype=np.int32)
            out.append(Encoded([{"input_ids": arr}], {"prompt_ids": arr}, len(kept) < len(p),
                               new_tokens=self.cfg.max_new_tokens))
        return out

    def decode(self, logits: Tensor, inputs: list[Encoded]) -> list[dict]:
        raise RuntimeError("generation results come from decode_with (they need the model)")

    def decode_with(self, model, inputs: list[Encoded], pad_token_id: int, should_stop=None, tokenizer=None
                    ) -> list[dict]:
        """[{"text": generated text}] per input (`generate` from its prompt, all inputs in one batch). An
        input's meta may carry "max_new_tokens" (its own limit, at most the task's), "stop" (a callable:
        True once nobody waits for it) and "sink" (a callable given each new piece of text: streaming)."""
        texts = self.generate(model, [e.meta["prompt_ids"] for e in inputs], pad_token_id,
                              (tokenizer or self.tokenizer).eos_token_id,
                              limits=[int(e.meta.get("max_new_tokens", self.cfg.max_new_tokens)) for e in inputs],
                              stops=[e.meta.get("stop") for e in inputs], sinks=[e.meta.get("sink") for e in inputs],
                              should_stop=should_stop, tokenizer=tokenizer)
        return [{"text": t} for t in texts]


class RowStops(StoppingCriteria):
    """A `transformers` stopping criterion with one verdict per row (greedy / sampling): row i is done after
    eos, after limits[i] new tokens, or once stops[i]() or should_stop() is True. `stopped_at[i]`: how many
    new tokens row i had when it was done (None while running): the tokens after that are padding
    (`RowStreamer` reads it, whether `generate` streams a step before or after asking the criteria)."""

    def __init__(self, width: int, limits: list[int], eos_token_id: int, stops: list | None, should_stop=None):
        self.width, self.limits, self.eos = width, torch.tensor(limits), eos_token_id
        self.stops = list(stops) if stops else [None] * len(limits)
        self.should_stop = should_stop
        self.done = torch.zeros(len(limits), dtype=torch.bool)
        self.stopped_at: list[int | None] = [None] * len(limits)

    def __call__(self, input_ids: Tensor, scores, **kwargs) -> Tensor:
        new = input_ids.shape[1] - self.width
        done = self.done | (input_ids[:, -1].cpu() == self.eos) | (new >= self.limits)
        if self.should_stop is not None and self.should_stop():
            done[:] = True
        for i, stop in enumerate(self.stops):
            if stop is not None and not done[i] and stop():
                done[i] = True
        for i in torch.nonzero(done & ~self.done).flatten().tolist():
            self.stopped_at[i] = new
        self.done = done
        return done.to(input_ids.device)


class AllStop(StoppingCriteria):
    """A stopping criterion for beam search: every row stops once should_stop() or every stops[i]() is True."""

    def __init__(self, should_stop, stops: list | None):
        self.should_stop, self.stops = should_stop, [s for s in (stops or []) if s is not None]

    def __call__(self, input_ids: Tensor, scores, **kwargs) -> Tensor:
        stop = (self.should_stop is not None and self.should_stop()) or (
            bool(self.stops) and all(s() for s in self.stops))
        return torch.full((input_ids.shape[0],), stop, dtype=torch.bool, device=input_ids.device)


class RowStreamer(BaseStreamer):
    """A `transformers` streamer for a batch: the k-th new token of row i joins row i's text unless the row
    was done before it (`RowStops.stopped_at[i]` < k), and sinks[i] (when given) gets each new piece of
    decoded text: the whole continuation decoded again and the new suffix sent, held back while it ends in
    an incomplete character (byte-level BPE splits UTF-8 characters over tokens)."""

    def __init__(self, tokenizer, rows: RowStops, sinks: list):
        self.tokenizer, self.rows, self.sinks = tokenizer, rows, list(sinks)
        self.tokens: list[list[int]] = [[] for _ in self.sinks]
        self.sent = [0] * len(self.sinks)
        self.steps = 0
        self.prompt_seen = False

    def put(self, value: Tensor) -> None:
        if not self.prompt_seen:          # generate puts the prompt first
            self.prompt_seen = True
            return
        self.steps += 1
        for i, token in enumerate(value.reshape(-1).tolist()):
            end = self.rows.stopped_at[i]
            if self.sinks[i] is None or (end is not None and self.steps > end):
                continue
            self.tokens[i].append(token)
            self._send(i, final=False)

    def end(self) -> None:
        for i, sink in enumerate(self.sinks):
            if sink is not None:
                self._send(i, final=True)

    def _send(self, i: int, final: bool) -> None:
        text = self.tokenizer.decode(self.tokens[i], skip_special_tokens=True)
        if text.endswith("\ufffd") and not final:
            return
        if len(text) > self.sent[i]:
            self.sinks[i](text[self.sent[i]:])
            self.sent[i] = len(text)
