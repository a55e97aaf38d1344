"""Generation requests through the server's batcher (tiny random Llama): /v1/generate streams and /v1/predict
generation inputs of one task share one batched `generate`, each row with its own new-token limit; a batch
is bounded by prompt + new tokens (max_batch_tokens); a full queue answers 429 and a stream queued past its
deadline ends with an error event; the server's --max-new-tokens caps requests."""

from __future__ import annotations

import asyncio
import threading

import httpx

import mtlm
from servers import metric, running_server
from test_serve import serving, wait_until
from test_serve_generate import events, llm_bundle  # noqa: F401  (a module-scoped fixture)

TEXTS = ["the movie was great fun", "bad film", "a very boring plot", "loved it"]


def alone(predictor, text: str, limit: int) -> str:
    """What the reply task generates for `text` alone, at most `limit` new tokens."""
    task = predictor.tasks["reply"]
    group = next(iter(predictor.groups(["reply"])))
    feat = predictor.encode([{"text": text}], group)[0]
    return task.generate(predictor.model, [feat.meta["prompt_ids"]], predictor.tokenizer.pad_token_id,
                         predictor.tokenizer.eos_token_id, limits=[limit])[0]


def test_streams_and_predict_share_one_batch_each_row_with_its_own_limit(llm_bundle, tmp_path):
    predictor = mtlm.load(llm_bundle)
    limits = [5, 2, 5]

    async def go(base):
        async with httpx.AsyncClient(base_url=base, timeout=60) as client:
            before = (await client.get("/metrics")).text
            calls = [client.post("/v1/generate", json={"task": "reply", "input": TEXTS[i],
                                                       **({"max_new_tokens": 2} if limits[i] == 2 else {})})
                     for i in range(3)]
            calls.append(client.post("/v1/predict", json={"inputs": [TEXTS[3]], "tasks": ["reply"]}))
            answers = await asyncio.gather(*calls)
            after = (await client.get("/metrics")).text
            over = await client.post("/v1/generate", json={"task": "reply", "input": "x", "max_new_tokens": 6})
            return before, answers, after, over

    with running_server(llm_bundle, tmp_path, "--max-wait-ms", "1500", "--max-new-tokens", "5",
                        ready_timeout_s=300) as base:
        before, answers, after, over = asyncio.run(go(base))
    for i, r in enumerate(answers[:3]):
        assert r.status_code == 200, r.text
        got = events(r.text)
        assert got[-1][0] == "done" and got[-1][1]["text"] == alone(predictor, TEXTS[i], limits[i]), (i, got)
        assert "".join(d["text"] for _, d in got[:-1]).strip() == got[-1][1]["text"]
    assert answers[3].json()["predictions"][0]["reply"]["text"] == alone(predictor, TEXTS[3], 5)
    # the four generation inputs ran as ONE batch of 4
    assert metric(after, "mtlm_batch_size_count") - metric(before, "mtlm_batch_size_count") == 1
    assert metric(after, "mtlm_batch_size_sum") - metric(before, "mtlm_batch_size_sum") == 4
    assert over.status_code == 422 and "over the server's (max_new_tokens) limit of 5" in over.json()["detail"]


class Held:
    """Wraps a Predictor's `run`: records each batch's size and holds the model thread while closed."""

    def __init__(self, predictor):
        self.predictor, self.sizes = predictor, []
        self.gate, self.started = threading.Event(), threading.Event()
        self.gate.set()
        inner = predictor.run

        def run(feats, names, row_tasks=None, should_stop=None):
            self.sizes.append(len(feats))
            self.started.set()
            assert self.gate.wait(20), "gate never opened"
            return inner(feats, names, row_tasks, should_stop)
        predictor.run = run


def test_a_batch_is_bounded_by_prompt_plus_new_tokens(llm_bundle):
    held = Held(mtlm.load(llm_bundle))
    prompt = len(held.predictor.encode([{"text": "bad film"}], ("text", "#reply"))[0].meta["prompt_ids"])

    async def go(new_tokens: int) -> list[int]:
        async with serving(lambda: held.predictor, max_wait_ms=1000, max_batch_tokens=2 * (prompt + 3)) as (_, client):
            held.sizes.clear()
            rs = await asyncio.gather(*[client.post("/v1/generate", json={"task": "reply", "input": "bad film",
                                                                         "max_new_tokens": new_tokens})
                                        for _ in range(2)])
            assert all(r.status_code == 200 and events(r.text)[-1][0] == "done" for r in rs)
            return list(held.sizes)
    assert asyncio.run(go(3)) == [2]          # 2 x (prompt + 3) tokens fit one batch
    assert asyncio.run(go(5)) == [1, 1]       # 2 x (prompt + 5) do not: two batches


def test_full_queue_is_429_and_a_stream_queued_past_its_deadline_ends_in_an_error_event(llm_bundle):
    held = Held(mtlm.load(llm_bundle))

    async def go():
        # max_queue 2 (the warm-up input takes two: the text group and the generation group)
        async with serving(lambda: held.predictor, max_queue=2, max_wait_ms=0) as (app, client):
            held.gate.clear()
            held.started.clear()
            first = asyncio.create_task(client.post("/v1/generate", json={"task": "reply", "input": "bad film"}))
            await asyncio.to_thread(held.started.wait, 10)          # the model thread holds the first stream
            queued = [asyncio.create_task(client.post("/v1/generate", json={"task": "reply", "input": text,
                                                                            "timeout_ms": 400}))
                      for text in ("good film", "fun")]
            await wait_until(lambda: app.state.service.batcher.queued_inputs == 2)
            full = await client.post("/v1/generate", json={"task": "reply", "input": "boring"})
            assert full.status_code == 429 and "queue full" in full.json()["detail"], full.text
            assert "retry-after" in full.headers
            for late in await asyncio.gather(*queued):
                assert late.status_code == 200 and events(late.text)[-1][0] == "error"
                assert "deadline" in events(late.text)[-1][1]["detail"]
            held.gate.set()
            assert events((await first).text)[-1][0] == "done"
    asyncio.run(go())
