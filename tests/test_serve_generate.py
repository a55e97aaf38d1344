"""Serving a decoder bundle with a classification head and a generation task (tiny random Llama):
/v1/predict answers both for the same input; /v1/generate streams one task's continuation (SSE), with
its 404 / 422 / 429 answers."""

from __future__ import annotations

import asyncio
import json
import threading

import pytest

import mtlm
from conftest import write_recipe
from test_serve import serving


@pytest.fixture(scope="module")
def llm_bundle(tiny_llama, toy_data, tmp_path_factory):
    d = tmp_path_factory.mktemp("llm-serve")
    recipe = {"name": "llm", "backbone": tiny_llama, "pooling": "last", "max_length": 48,
              "output_dir": str(d / "run"),
              "tasks": {"sentiment": {"type": "classification", "data": {"train": str(toy_data / "sentiment.csv")}},
                        "reply": {"type": "generation", "data": {"train": str(toy_data / "sentiment.csv")},
                                  "template": "{text} ->", "columns": {"target": "label"}, "max_new_tokens": 6}},
              "train": {"batch_size": 8, "max_steps": 2, "eval_every": 2, "lr": 1e-3, "warmup_ratio": 0.0}}
    return mtlm.fit(mtlm.load_recipe(write_recipe(d / "recipe.yaml", recipe)), progress=False) / "model"


def events(body: str) -> list[tuple[str, dict]]:
    """Server-sent events -> [(event name, data)]."""
    out = []
    for block in body.strip().split("\n\n"):
        name, data = "message", None
        for line in block.splitlines():
            if line.startswith("event: "):
                name = line[7:]
            elif line.startswith("data: "):
                data = json.loads(line[6:])
        out.append((name, data))
    return out


def test_predict_answers_heads_and_generation_for_one_input(llm_bundle):
    want = mtlm.load(llm_bundle).predict(["the movie was great fun"])[0]
    assert set(want) == {"sentiment", "reply"} and isinstance(want["reply"]["text"], str)

    async def go():
        async with serving(str(llm_bundle)) as (_, client):
            r = await client.post("/v1/predict", json={"inputs": ["the movie was great fun"]})
            assert r.status_code == 200, r.text
            got = r.json()["predictions"][0]
            assert got["reply"] == want["reply"] and got["sentiment"]["label"] == want["sentiment"]["label"]
            r = await client.post("/v1/generate", json={"task": "reply", "input": "the movie was great fun"})
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
            got = events(r.text)
            assert got[-1][0] == "done" and got[-1][1]["text"] == want["reply"]["text"]
            assert "".join(d["text"] for name, d in got[:-1]).strip() == want["reply"]["text"]
            r = await client.post("/v1/generate", json={"task": "nope", "input": "x"})
            assert r.status_code == 404 and "valid tasks: sentiment, reply" in r.json()["detail"]
            r = await client.post("/v1/generate", json={"task": "sentiment", "input": "the film"})
            assert r.status_code == 422 and "streams generation tasks (reply)" in r.json()["detail"]
            r = await client.post("/v1/generate", json={"task": "reply", "input": "bad", "max_new_tokens": 7})
            assert r.status_code == 422 and "over the task's limit of 6" in r.json()["detail"]
            r = await client.post("/v1/generate", json={"task": "reply", "input": {"text_pair": "the film"}})
            assert r.status_code == 422 and "input.text" in r.json()["detail"]
    asyncio.run(go())


def test_one_stream_over_max_streams_gets_429(llm_bundle):
    gate, started = threading.Event(), threading.Event()

    async def go():
        async with serving(str(llm_bundle), max_streams=1) as (app, client):
            task = app.state.service.predictor.tasks["reply"]
            inner = task.generate

            def held(*args, **kwargs):
                started.set()
                assert gate.wait(20)
                return inner(*args, **kwargs)
            task.generate = held
            try:
                first = asyncio.create_task(client.post("/v1/generate", json={"task": "reply", "input": "bad film"}))
                await asyncio.to_thread(started.wait, 10)
                r = await client.post("/v1/generate", json={"task": "reply", "input": "good film"})
                assert r.status_code == 429 and r.headers["retry-after"] == "1"
                gate.set()
                assert (await first).status_code == 200
            finally:
                gate.set()
    asyncio.run(go())
