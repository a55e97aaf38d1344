"""Request / response models of the HTTP API and the server's limits.

Inputs are validated twice on purpose: pydantic checks the JSON shape here (a non-string text, an
empty input list, an unknown field -> 422 with the field path), and `mtlm.predict.normalize_input` /
`Predictor.check_tasks` check what only the model knows (task names, pair fields) -> 422 with the reason.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, StrictStr


class ServeSettings(BaseModel):
    """Everything `mtlm serve` can tune. Times in milliseconds, sizes in inputs / tokens / bytes."""

    model_config = ConfigDict(extra="forbid")

    max_batch_size: int = Field(64, gt=0,
                                description="inputs per backbone pass")
    max_batch_tokens: int = Field(8192, gt=0,
                                  description="padded tokens per pass (batch size x longest input)")
    max_wait_ms: float = Field(5.0, ge=0,
                               description="a non-full batch runs once its oldest input has waited this long")
    max_queue: int = Field(1024, gt=0,
                           description="queued inputs (over all requests) before answering 429")
    max_queue_tokens: int | None = Field(None, gt=0,
                                         description="queued tokens before 429 (default: 16 x max_batch_tokens)")
    max_inputs_per_request: int = Field(256, gt=0,
                                        description="more inputs in one request -> 422")
    max_choices: int = Field(100, ge=2,
                             description="more choices in one multiple-choice input -> 422")
    max_windows: int = Field(64, gt=0,
                             description="more max_length windows for one QA context -> 413")
    max_body_bytes: int = Field(1 << 20, gt=0,
                                description="larger request bodies -> 413")
    default_timeout_ms: float = Field(30_000, gt=0,
                                      description="a request's timeout_ms when it gives none")
    min_timeout_ms: float = Field(100, gt=0,
                                  description="a smaller timeout_ms -> 422 (a deadline no request can meet)")
    input_cost_ms: float | None = Field(None, gt=0,
                                        description="ms each input of a request adds to its least timeout_ms "
                                                    "(default: one input alone, measured at warm-up)")
    max_timeout_ms: float = Field(600_000, gt=0,
                                  description="the largest timeout_ms a request may ask for")
    max_streams: int = Field(64, gt=0, description="/v1/generate streams open at once (their generation is batched "
                                                   "like any input); one more -> 429")
    max_new_tokens: int | None = Field(None, gt=0, description="most new tokens one generation input gets (default: "
                                                               "its task's max_new_tokens); /v1/generate asking more -> 422")
    torch_threads: int | None = Field(None, gt=0,
                                      description="torch intra-op threads per process (default: torch's, or cores / workers)")
    playground: bool = Field(True, description="the browser playground at / (--no-playground turns it off)")
    engine: str | None = Field(None, description="what runs the model: torch, torch-bf16, onnx, onnx-int8 (default: the "
                                                 "fastest engine the bundle holds that passes its check on this machine)")

    @property
    def queue_tokens(self) -> int:
        return self.max_queue_tokens or 16 * self.max_batch_tokens


class InputObject(BaseModel):
    """One input as an object: the fields its tasks read (`/v1/tasks` lists each task's input_fields).

    Text tasks read `text` (pair tasks also `text_pair`), extractive QA `question` and `context`, multiple
    choice `text` and `choices`. Which fields are required is checked per requested task."""

    model_config = ConfigDict(extra="forbid")

    text: StrictStr | None = None
    text_pair: StrictStr | None = None
    question: StrictStr | None = None
    context: StrictStr | None = None
    choices: list[StrictStr] | None = None


class PredictRequest(BaseModel):
    """`POST /v1/predict` body. `tasks` defaults, per input, to every task whose input fields it carries
    (plain text: the text tasks; question + context: extractive QA); given tasks apply to every input."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"inputs": ["What a wonderful film.", {"text": "A man eats.", "text_pair": "Someone is eating."}],
         "tasks": ["sentiment"], "timeout_ms": 2000},
        {"inputs": [{"question": "Who wrote it?", "context": "The book was written by Ann Lee in 1990."}],
         "tasks": ["qa"]},
        {"inputs": [{"text": "How are you?", "choices": ["I am fine, thanks.", "Paris is in France."]}],
         "tasks": ["reply"]}]})

    inputs: list[StrictStr | InputObject] = Field(min_length=1)
    tasks: list[StrictStr] | None = None
    # answer 504 when not computed within this many ms of arrival; under the least time a request of this many
    # inputs needs (`mtlm.serve.service.deadline_floors`, at least ServeSettings.min_timeout_ms) -> 422
    timeout_ms: float | None = Field(None, gt=0, strict=True)


class TaskPredictRequest(BaseModel):
    """`POST /v1/tasks/{task}/predict` body: like `PredictRequest`, the task comes from the path."""

    model_config = ConfigDict(extra="forbid")

    inputs: list[StrictStr | InputObject] = Field(min_length=1)
    timeout_ms: float | None = Field(None, gt=0, strict=True)


class Timing(BaseModel):
    """Where a request's time went, in ms. queue/forward are the worst over the request's inputs."""

    tokenize_ms: float   # validation + tokenisation (in the tokenizer thread)
    queue_ms: float      # enqueue -> its micro-batch started
    forward_ms: float    # its micro-batch's backbone pass + heads + decoding
    total_ms: float      # arrival -> response built
    batch_size: int      # largest micro-batch any of its inputs rode in


class PredictResponse(BaseModel):
    """One {task: result} dict per input, in input order; results have the shape of `Predictor.predict`."""

    model: str
    request_id: str
    tasks: list[str]
    predictions: list[dict[str, dict[str, Any]]]
    timing: Timing


class TaskInfo(BaseModel):
    name: str
    type: str
    input_fields: list[str]              # ["text"], ["text", "text_pair"], ["question", "context"], ["text", "choices"]
    labels: list[str] | None = None      # None for regression


class TasksResponse(BaseModel):
    model: str
    max_length: int                      # longer inputs are truncated to this many tokens ("truncated": true)
    tasks: list[TaskInfo]


class ErrorResponse(BaseModel):
    """Every 4xx/5xx body. `detail` says what to fix."""

    detail: str
    request_id: str | None = None
    errors: list[dict[str, Any]] | None = None   # field-level problems for 422s from JSON validation
