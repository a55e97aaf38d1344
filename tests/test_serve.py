"""The HTTP server on a tiny random bundle: in-process (httpx ASGITransport, lifespan run by hand) and one
real uvicorn subprocess on 127.0.0.1. Gates (threading.Event) hold the model thread still so queueing,
batching, 429 and 504 are deterministic rather than timing-dependent."""

from __future__ import annotations

import asyncio
import copy
import os
import signal
import threading
import time
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import pytest

from benchscripts import load_bench

import mtlm
from conftest import write_recipe
from servers import metric
from mtlm.serve.app import create_app
from mtlm.serve.schemas import ServeSettings

os.environ["HF_HUB_OFFLINE"] = "1"
TASKS = ("sentiment", "topic", "paraphrase", "ner", "score")
TEXTS = ["the movie was great fun", "john smith went to paris", "stock market shares rose",
         "terrible boring plot", "the team won the match and the goal was good", "it"]


@pytest.fixture(scope="session")
def bundle(tiny_backbone, toy_data, tmp_path_factory) -> Path:
    """A 5-task bundle (two classifications, a pair classification, NER, regression), trained once."""
    d = tmp_path_factory.mktemp("serve")
    data = lambda name: {"train": str(toy_data / name)}  # noqa: E731
    recipe = {"name": "serve-toy", "backbone": tiny_backbone, "max_length": 32, "output_dir": str(d / "run"),
              "tasks": {"sentiment": {"type": "classification", "data": data("sentiment.csv")},
                        "topic": {"type": "classification", "data": data("topic.jsonl")},
                        "paraphrase": {"type": "classification", "data": data("pairs.jsonl"),
                                       "columns": {"text": "text_a", "text_pair": "text_b"}},
                        "ner": {"type": "token_classification", "data": data("ner.jsonl")},
                        "score": {"type": "regression", "data": data("score.jsonl")}},
              "train": {"batch_size": 8, "max_steps": 10, "eval_every": 10, "lr": 1e-3, "warmup_ratio": 0.0}}
    run_dir = mtlm.fit(mtlm.load_recipe(write_recipe(d / "recipe.yaml", recipe)), progress=False)
    return Path(run_dir) / "model"


@pytest.fixture(scope="module")
def predictor(bundle):
    return mtlm.load(bundle, device="cpu")


class Gate:
    """Wraps a Predictor's `run`: records every batch (texts, task names) and, while closed, holds the
    model thread (bounded: 20 s) so requests pile up in the queue."""

    def __init__(self, predictor, closed: bool = False):
        self.predictor = copy.copy(predictor)        # shares the model; only `run` is replaced
        self.event, self.calls = threading.Event(), []
        if not closed:
            self.event.set()
        inner = predictor.run

        def run(feats, names, row_tasks=None, should_stop=None):
            self.calls.append(([f.meta["text"] for f in feats], list(names), row_tasks))
            assert self.event.wait(20), "gate never opened"
            return inner(feats, names, row_tasks, should_stop)
        self.predictor.run = run

    def open(self):
        self.event.set()


@asynccontextmanager
async def serving(source, gate: Gate | None = None, **settings):
    """(app, client) with the lifespan started by hand (ASGITransport runs none) and the model ready.
    `gate` is opened on the way out, so a failing test does not leave the model thread waiting."""
    app = create_app(source, ServeSettings(**settings))
    async with app.router.lifespan_context(app):
        try:
            await app.state.service.wait_ready(30)
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=30) as client:
                yield app, client
        finally:
            if gate is not None:
                gate.open()


async def wait_until(predicate, timeout_s: float = 10.0):
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.005)


def assert_same(got: dict, want: dict):
    """Server results equal Predictor.predict: labels/entities exactly, scores to 1e-4 (batching and
    padding change float summation order)."""
    assert got.keys() == want.keys()
    for task in want:
        g, w = got[task], want[task]
        assert g.keys() == w.keys(), task
        for k in w:
            if k == "entities":
                assert [(e["entity"], e["start"], e["end"]) for e in g[k]] == \
                       [(e["entity"], e["start"], e["end"]) for e in w[k]]
            elif isinstance(w[k], dict) or (isinstance(w[k], list) and all(isinstance(x, float) for x in w[k])):
                assert g[k] == pytest.approx(w[k], abs=1e-4)
            elif isinstance(w[k], float):
                assert g[k] == pytest.approx(w[k], abs=1e-4)
            else:
                assert g[k] == w[k], (task, k)


def test_results_equal_predict(bundle, predictor):
    inputs = [{"text": t, "text_pair": TEXTS[-1 - i]} for i, t in enumerate(TEXTS)]
    inputs.append({"text": " ".join(["great"] * 80), "text_pair": "bad"})        # over max_length=32

    async def main():
        async with serving(str(bundle)) as (app, client):
            r = await client.post("/v1/predict", json={"inputs": inputs}, headers={"X-Request-ID": "abc-1"})
            assert r.status_code == 200, r.text
            assert r.headers["x-request-id"] == "abc-1"
            body = r.json()
            assert body["request_id"] == "abc-1" and body["model"] == "serve-toy"
            assert body["tasks"] == list(TASKS)
            assert body["timing"]["total_ms"] >= body["timing"]["forward_ms"] > 0
            for got, want in zip(body["predictions"], predictor.predict(inputs), strict=True):
                assert_same(got, want)
            assert body["predictions"][-1]["sentiment"]["truncated"] is True

            mixed = TEXTS[:2] + inputs[:2]           # without tasks: each input gets the tasks its fields feed
            r = await client.post("/v1/predict", json={"inputs": mixed})
            assert r.status_code == 200, r.text
            preds = r.json()["predictions"]
            assert [list(p) for p in preds[:2]] == [[t for t in TASKS if t != "paraphrase"]] * 2
            assert [list(p) for p in preds[2:]] == [list(TASKS)] * 2
            for got, want in zip(preds, predictor.predict(mixed), strict=True):
                assert_same(got, want)

            r = await client.post("/v1/tasks/ner/predict", json={"inputs": TEXTS})
            assert r.status_code == 200 and len(r.headers["x-request-id"]) >= 18        # generated
            for got, want in zip(r.json()["predictions"], predictor.predict(TEXTS, ["ner"])):
                assert_same(got, want)

            r = await client.get("/v1/tasks")
            tasks = {t["name"]: t for t in r.json()["tasks"]}
            assert list(tasks) == list(TASKS) and r.json()["max_length"] == 32
            assert tasks["paraphrase"]["input_fields"] == ["text", "text_pair"]
            assert tasks["score"]["labels"] is None and set(tasks["sentiment"]["labels"]) == {"negative", "positive"}
            assert (await client.get("/docs")).status_code == 200

    asyncio.run(main())


def test_concurrent_requests_share_one_backbone_pass(predictor):
    """Eight requests asking for different task subsets, queued while the model is busy, run as ONE batch
    with the union of their heads; each gets back only its tasks, equal to Predictor.predict."""
    gate = Gate(predictor)
    subsets = [["sentiment"], ["topic"], ["ner"], ["sentiment", "score"], ["score"], ["topic", "ner"],
               ["sentiment"], ["ner", "score"]]

    async def main():
        async with serving(lambda: gate.predictor, gate, max_wait_ms=0, max_batch_size=64) as (app, client):
            warm = len(gate.calls)              # 2 warm-up batches, then the cost of one input measured
            gate.event.clear()
            busy = asyncio.create_task(client.post("/v1/predict", json={"inputs": ["hold"], "tasks": ["topic"]}))
            await wait_until(lambda: len(gate.calls) == warm + 1)
            posts = [asyncio.create_task(client.post("/v1/predict", json={"inputs": [TEXTS[i % 6]], "tasks": s}))
                     for i, s in enumerate(subsets)]
            await wait_until(lambda: app.state.service.batcher.queued_inputs == len(subsets))
            gate.open()
            assert (await busy).status_code == 200
            for i, (post, subset) in enumerate(zip(posts, subsets)):
                r = await post
                assert r.status_code == 200, r.text
                assert r.json()["timing"]["batch_size"] == len(subsets)
                assert_same(r.json()["predictions"][0], predictor.predict([TEXTS[i % 6]], subset)[0])
            texts, names, row_tasks = gate.calls[warm + 1]
            assert len(texts) == len(subsets) and set(names) == {"sentiment", "topic", "ner", "score"}
            # each row carries the tasks its request asked for: heads are decoded only for those rows
            assert sorted(zip(texts, map(tuple, row_tasks))) == sorted((TEXTS[i % 6], tuple(s))
                                                                       for i, s in enumerate(subsets))
            m = (await client.get("/metrics")).text
            assert metric(m, "mtlm_batch_size_count") == 4
            assert metric(m, "mtlm_batch_size_bucket", le="8.0") - metric(m, "mtlm_batch_size_bucket", le="4.0") == 1
            assert metric(m, "mtlm_requests_total", task="sentiment", status="200") == 3
            assert metric(m, "mtlm_predictions_total", task="ner") == 3
            assert metric(m, "mtlm_queue_inputs") == 0

    asyncio.run(main())


def test_full_queue_answers_429_with_retry_after(predictor):
    """Both rejection paths: a request larger than the room left (checked on admission) and any request
    once the queue is full (shed in the middleware, before routing). Rejected inputs never run."""
    gate = Gate(predictor)

    async def main():
        async with serving(lambda: gate.predictor, gate, max_queue=2, max_wait_ms=0) as (app, client):
            post = lambda inputs: client.post("/v1/predict", json={"inputs": inputs, "tasks": ["topic"]})  # noqa
            r = await post(["x"] * 3)
            assert r.status_code == 413                                   # larger than the whole queue
            warm = len(gate.calls)
            gate.event.clear()
            running = asyncio.create_task(post(["a"]))
            await wait_until(lambda: len(gate.calls) == warm + 1)
            queued = [asyncio.create_task(post(["b"]))]
            await wait_until(lambda: app.state.service.batcher.queued_inputs == 1)
            r = await post(["d1", "d2"])                                   # 2 inputs, room for 1
            assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1 and "queue full" in r.json()["detail"]
            queued.append(asyncio.create_task(post(["c"])))
            await wait_until(lambda: app.state.service.batcher.queued_inputs == 2)
            t0 = time.perf_counter()
            r = await post(["d3"])                                         # no room at all
            assert time.perf_counter() - t0 < 0.5
            assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1 and "queue full" in r.json()["detail"]
            assert r.headers["x-request-id"] == r.json()["request_id"]
            gate.open()
            assert [(await t).status_code for t in [running, *queued]] == [200, 200, 200]
            m = (await client.get("/metrics")).text
            assert metric(m, "mtlm_requests_total", task="topic", status="429") == 2
            assert (await post(["e"])).status_code == 200                 # room again
            assert not any(t.startswith("d") for texts, *_ in gate.calls for t in texts)

    asyncio.run(main())


def test_timeout_answers_504_and_skips_the_input(predictor):
    gate = Gate(predictor)

    async def main():
        async with serving(lambda: gate.predictor, gate, max_wait_ms=0) as (app, client):
            warm = len(gate.calls)
            gate.event.clear()
            running = asyncio.create_task(client.post("/v1/predict", json={"inputs": ["a"], "tasks": ["topic"]}))
            await wait_until(lambda: len(gate.calls) == warm + 1)
            t0 = time.perf_counter()
            r = await client.post("/v1/predict", json={"inputs": ["late input"], "tasks": ["topic"],
                                                       "timeout_ms": 100})
            assert r.status_code == 504 and 0.09 < time.perf_counter() - t0 < 5
            assert app.state.service.batcher.queued_inputs == 0
            gate.open()
            assert (await running).status_code == 200
            r = await client.post("/v1/predict", json={"inputs": ["on time"], "tasks": ["topic"]})
            assert r.status_code == 200
            assert not any("late input" in texts for texts, *_ in gate.calls)

    asyncio.run(main())


def test_a_deadline_too_short_for_the_request_size_gets_422_before_queueing(predictor):
    """A model that takes 10 ms per row: the server measures it at warm-up, so 20 inputs with a 150 ms
    deadline (they need over 200 ms) are refused with 422 naming the least timeout_ms and the measured cost,
    and never reach the model (before: queued, computed late, 504). One input with 150 ms is fine; the
    schema states the same minimum for that many inputs."""
    slow = copy.copy(predictor)
    inner, seen = predictor.run, []

    def run(feats, names, row_tasks=None, should_stop=None):
        seen.extend(f.meta["text"] for f in feats)
        time.sleep(0.01 * len(feats))
        return inner(feats, names, row_tasks, should_stop)
    slow.run = run

    async def main():
        async with serving(lambda: slow, max_wait_ms=0) as (app, client):
            before = len(seen)
            body = {"inputs": [f"input {i}" for i in range(20)], "tasks": ["topic"], "timeout_ms": 150}
            r = await client.post("/v1/predict", json=body)
            assert r.status_code == 422, r.text                            # was 504, after computing late
            service = app.state.service
            assert service.input_cost_ms >= 10                            # measured at warm-up
            least = service.least_timeout_ms(20)
            assert least >= 20 * 10 and least == service.least_timeout_ms(64) > service.least_timeout_ms(1)
            detail = r.json()["detail"]
            assert f"minimum of {least:g} ms for 20 input(s)" in detail and "measured at warm-up" in detail
            assert len(seen) == before                                   # refused before the queue
            r = await client.post("/v1/predict", json={**body, "timeout_ms": least})
            assert r.status_code == 200, r.text
            r = await client.post("/v1/predict", json={"inputs": ["one"], "tasks": ["topic"], "timeout_ms": 150})
            assert r.status_code == 200, r.text
            doc = (await client.get("/openapi.json")).json()
            branches = doc["paths"]["/v1/predict"]["post"]["requestBody"]["content"]["application/json"][
                "schema"]["anyOf"]
            tier = [b for b in branches if b["properties"]["inputs"]["minItems"] <= 20
                    <= b["properties"]["inputs"]["maxItems"]]
            assert tier and all(b["properties"]["timeout_ms"]["anyOf"][0]["minimum"] == least for b in tier)
            m = (await client.get("/metrics")).text
            assert metric(m, "mtlm_requests_total", task="none", status="422") == 1
            assert "status=\"504\"" not in m

    asyncio.run(main())


def test_model_failure_answers_500_and_the_server_goes_on(predictor):
    broken = copy.copy(predictor)
    inner = predictor.run

    def run(feats, names, row_tasks=None, should_stop=None):
        if any("boom" in f.meta["text"] for f in feats):
            raise RuntimeError("simulated out of memory")
        return inner(feats, names, row_tasks, should_stop)
    broken.run = run

    async def main():
        async with serving(lambda: broken) as (app, client):
            r = await client.post("/v1/predict", json={"inputs": ["boom"], "tasks": ["topic"]})
            assert r.status_code == 500 and r.json()["request_id"] == r.headers["x-request-id"]
            r = await client.post("/v1/predict", json={"inputs": ["fine"], "tasks": ["topic"]})
            assert r.status_code == 200
            assert metric((await client.get("/metrics")).text, "mtlm_requests_total", task="topic", status="500") == 1

    asyncio.run(main())


def test_bad_inputs_get_the_stated_4xx(bundle):
    cases = [  # (body, status, words the reason must contain)
        ({"inputs": ["x"], "tasks": ["nope"]}, 422, ["nope", "sentiment", "paraphrase"]),
        ({"inputs": ["x"], "tasks": []}, 422, ["valid tasks"]),
        ({"inputs": ["x"], "tasks": ["paraphrase"]}, 422, ["text_pair"]),
        ({"inputs": [{"question": "q", "context": "c"}]}, 422, ["no task", "paraphrase reads text + text_pair"]),
        ({"inputs": [{"text": "x", "choices": ["a"] * 101}]}, 422, ["inputs[0].choices", "at most 100"]),
        ({"inputs": [], "tasks": ["topic"]}, 422, ["inputs"]),
        ({"inputs": [123], "tasks": ["topic"]}, 422, ["inputs[0]"]),
        ({"inputs": [{"text": 5}], "tasks": ["topic"]}, 422, ["inputs[0].text"]),
        ({"inputs": [{"text": "a", "lang": "en"}], "tasks": ["topic"]}, 422, ["lang"]),
        ({"inputs": ["   "], "tasks": ["topic"]}, 422, ["empty"]),
        ({"inputs": ["a"] * 5, "tasks": ["topic"]}, 422, ["at most 4"]),
        ({"inputs": ["a"], "tasks": ["topic"], "timeout_ms": -1}, 422, ["timeout_ms"]),
        ({"inputs": ["a"], "tasks": ["topic"], "timeout_ms": 1e9}, 422, ["timeout_ms"]),
        ({"text": "a"}, 422, ["inputs"]),
        ({"inputs": ["a " * 2000], "tasks": ["topic"]}, 413, ["bytes"]),
        ({"inputs": [" ".join("abcdefghijklmnopqrstuvwxyz1234")] * 4}, 413, ["one per word", "token budget (100)"]),   # before tokenising
    ]

    async def main():
        async with serving(str(bundle), max_inputs_per_request=4, max_body_bytes=2000,
                           max_queue_tokens=100) as (app, client):
            for body, status, words in cases:
                r = await client.post("/v1/predict", json=body)
                assert r.status_code == status, (body, r.text)
                assert all(w in r.json()["detail"] for w in words), (body, r.json())
                assert r.json()["request_id"] == r.headers["x-request-id"]
            r = await client.post("/v1/tasks/nope/predict", json={"inputs": ["x"]})
            assert r.status_code == 404 and "sentiment" in r.json()["detail"]
            r = await client.post("/v1/predict", content=b"{not json", headers={"content-type": "application/json"})
            assert r.status_code == 422

            async def chunks():                                      # no Content-Length: counted while read
                for _ in range(10):
                    yield b" " * 500
            r = await client.post("/v1/predict", content=chunks(), headers={"content-type": "application/json"})
            assert r.status_code == 413
            m = (await client.get("/metrics")).text
            assert metric(m, "mtlm_requests_total", task="none", status="413") == 2
            assert "status=\"5" not in m

    asyncio.run(main())


def test_ready_only_after_load_and_warm_up_and_503_while_draining(predictor):
    import gc
    gc.unfreeze()
    loaded = threading.Event()
    gate = Gate(predictor, closed=True)

    def load():
        assert loaded.wait(20)
        return gate.predictor

    async def main():
        app = create_app(load, ServeSettings(max_wait_ms=0))
        async with app.router.lifespan_context(app):
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
                assert (await client.get("/health")).status_code == 200
                r = await client.get("/ready")
                assert r.status_code == 503 and r.json()["state"] == "loading"
                r = await client.post("/v1/predict", json={"inputs": ["a"], "tasks": ["topic"]})
                assert r.status_code == 503 and r.headers["retry-after"] == "1"
                loaded.set()                                          # loaded, warm-up batch held
                await wait_until(lambda: len(gate.calls) >= 1)
                assert (await client.get("/ready")).status_code == 503
                gate.open()
                await wait_until(lambda: app.state.service.ready)
                assert (await client.get("/ready")).status_code == 200
                assert gc.get_freeze_count() > 0          # the loaded model is out of the collector's way
                m = (await client.get("/metrics")).text
                assert metric(m, "mtlm_batch_size_count") == 2 and metric(m, "mtlm_ready") == 1

                app.state.service.begin_drain()
                r = await client.get("/ready")
                assert r.status_code == 503 and r.json()["state"] == "draining"
                r = await client.post("/v1/predict", json={"inputs": ["a"], "tasks": ["topic"]})
                assert r.status_code == 503
                assert (await client.get("/health")).status_code == 200

    asyncio.run(main())
    gc.unfreeze()


def test_failed_load_is_reported_not_raised():
    def load():
        raise OSError("weights unreadable")

    async def main():
        app = create_app(load)
        async with app.router.lifespan_context(app):
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
                await wait_until(lambda: app.state.service.state == "failed")
                r = await client.get("/ready")
                assert r.status_code == 503 and "weights unreadable" in r.json()["error"]
                assert (await client.get("/health")).status_code == 503
                r = await client.post("/v1/predict", json={"inputs": ["a"]})
                assert r.status_code == 503 and "weights unreadable" in r.json()["detail"]

    asyncio.run(main())


def test_bench_single_task_bundle_equals_its_head(bundle, predictor, tmp_path, monkeypatch):
    """The benchmark's baseline: a copy of the bundle with one head answers exactly like that head."""
    bench = load_bench("serve_bench", monkeypatch)
    assert bench.text_tasks(bundle) == ["sentiment", "topic", "ner", "score"]
    single = mtlm.load(bench.single_task_bundle(bundle, "topic", tmp_path / "topic"), device="cpu")
    assert list(single.tasks) == ["topic"]
    for got, want in zip(single.predict(TEXTS), predictor.predict(TEXTS, ["topic"])):
        assert_same(got, want)


def test_batch_loop_errors_answer_500_at_once_and_the_loop_goes_on(predictor, caplog):
    """An exception in the batch loop outside the model call (an observer error, a result list of the
    wrong length) is logged and answers that batch's requests 500 at once (not 504 at the deadline); the
    loop goes on. An error outside any batch ends the loop and turns /ready and /health to 503."""
    short = copy.copy(predictor)
    inner = predictor.run

    def run(feats, names, row_tasks=None, should_stop=None):
        out = inner(feats, names, row_tasks, should_stop)
        return out[:-1] if any("short" in f.meta["text"] for f in feats) else out
    short.run = run

    async def main():
        async with serving(lambda: short, max_wait_ms=0) as (app, client):
            service = app.state.service
            post = lambda text: client.post("/v1/predict", json={"inputs": [text], "tasks": ["topic"],  # noqa
                                                                  "timeout_ms": 5000})
            real = service.metrics.queue_wait

            def broken(seconds):
                service.metrics.queue_wait = real
                raise ValueError("observer bug")
            service.metrics.queue_wait = broken
            for text in ("observed", "short result"):
                t0 = time.perf_counter()
                r = await post(text)
                assert r.status_code == 500 and time.perf_counter() - t0 < 4, r.text
            r = await post("fine")
            assert r.status_code == 200 and (await client.get("/ready")).status_code == 200
            assert "observer bug" in caplog.text and "1 results for a batch of" not in caplog.text
            assert "0 results for a batch of 1 inputs" in caplog.text

            def loop_bug():
                raise RuntimeError("loop bug")
            service.batcher._oldest = loop_bug                # fails while forming the next batch
            t0 = time.perf_counter()
            r = await post("never batched")
            assert r.status_code == 500 and time.perf_counter() - t0 < 4
            r = await client.get("/ready")
            assert r.status_code == 503 and "batching loop failed: RuntimeError: loop bug" in r.json()["error"]
            assert (await client.get("/health")).status_code == 503
            assert (await post("after")).status_code == 503
            assert metric((await client.get("/metrics")).text, "mtlm_ready") == 0

    asyncio.run(main())


def test_signal_handler_only_sets_a_flag(predictor):
    """SIGTERM arriving while the main thread holds a metrics lock (prometheus_client's process-wide lock
    in multiprocess mode) must not block in the handler: it sets a flag, the event loop drains."""
    chained = []
    saved = {sig: signal.signal(sig, lambda s, f: chained.append(s)) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        async def main():
            app = create_app(lambda: predictor, ServeSettings(), handle_signals=True)
            async with app.router.lifespan_context(app):
                service = app.state.service
                await service.wait_ready(30)
                lock = service.metrics.ready._value._lock
                lock.acquire()                     # the interrupted thread holds the gauge's lock
                released = []
                timer = threading.Timer(3.0, lambda: (released.append(True), lock.release()))
                timer.start()
                t0 = time.perf_counter()
                signal.raise_signal(signal.SIGTERM)
                elapsed = time.perf_counter() - t0
                timer.cancel()
                timer.join()
                if not released:
                    lock.release()
                assert not released and elapsed < 1, f"the handler waited {elapsed:.1f} s on a metrics lock"
                assert chained == [signal.SIGTERM] and service.drain_requested
                await wait_until(lambda: service.state == "draining")
                async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
                    assert (await c.get("/ready")).status_code == 503
                    assert metric((await c.get("/metrics")).text, "mtlm_ready") == 0

        asyncio.run(main())
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


def test_lone_surrogates_and_malformed_json_get_4xx_and_are_counted(predictor):
    """Valid JSON that is not valid Unicode text (a lone surrogate) -> 422 naming inputs[i] and the field,
    before the batcher; the Python API raises InputError naming the index. A body that is not UTF-8 JSON
    -> 400; both are counted in /metrics."""
    gate = Gate(predictor)
    with pytest.raises(mtlm.predict.InputError, match=r"inputs\[1\]\.text: not valid Unicode text"):
        predictor.predict(["fine", "abc\ud800"], tasks=["topic"])
    cases = [(b'{"inputs": ["fine", "abc\\ud800"], "tasks": ["topic"]}', ["inputs[1].text", "surrogate"]),
             (b'{"inputs": [{"text": "a", "text_pair": "\\udfff b"}]}', ["inputs[0].text_pair", "surrogate"]),
             (b'{"inputs": [{"te\\ud800xt": "a"}], "tasks": ["topic"]}', ["inputs[0]"]),
             (b'{"inputs": ["a"], "tasks": ["to\\ud800pic"]}', ["unknown task", "valid tasks"])]

    async def main():
        async with serving(lambda: gate.predictor, gate) as (app, client):
            batches = len(gate.calls)
            for body, words in cases:
                r = await client.post("/v1/predict", content=body, headers={"content-type": "application/json"})
                assert r.status_code == 422 and all(w in r.json()["detail"] for w in words), (body, r.text)
                assert r.json()["request_id"] == r.headers["x-request-id"]
            assert len(gate.calls) == batches                        # nothing reached the batcher
            r = await client.post("/v1/predict", content=b'{"inputs": ["\xff\xfe"]}',
                                  headers={"content-type": "application/json"})
            assert r.status_code == 400 and "UTF-8" in r.json()["detail"]
            assert r.json()["request_id"] == r.headers["x-request-id"]
            m = (await client.get("/metrics")).text
            assert metric(m, "mtlm_requests_total", task="none", status="400") == 1
            assert metric(m, "mtlm_requests_total", task="none", status="422") == 4
            assert "status=\"5" not in m

    asyncio.run(main())


@pytest.fixture(scope="module")
def mc_bundle(tiny_backbone, toy_data, tmp_path_factory) -> Path:
    """A bundle with a multiple-choice task (reply) beside a text classification (topic), briefly trained."""
    import json
    import random

    from test_multiple_choice import mc_row
    d = tmp_path_factory.mktemp("serve-mc")
    rng = random.Random(0)
    (d / "mc.jsonl").write_text("".join(json.dumps(mc_row(rng, rng.randint(2, 4))) + "\n" for _ in range(40)))
    recipe = {"name": "serve-mc", "backbone": tiny_backbone, "max_length": 32, "output_dir": str(d / "run"),
              "tasks": {"reply": {"type": "multiple_choice", "data": {"train": str(d / "mc.jsonl")}},
                        "topic": {"type": "classification", "data": {"train": str(toy_data / "topic.jsonl")}}},
              "train": {"batch_size": 8, "max_steps": 2, "eval_every": 2, "lr": 1e-3, "warmup_ratio": 0.0}}
    return Path(mtlm.fit(mtlm.load_recipe(write_recipe(d / "recipe.yaml", recipe)), progress=False)) / "model"


def test_multiple_choice_over_http(mc_bundle):
    """Multiple-choice inputs over HTTP equal Predictor.predict (one score per choice, summing to 1), share
    a request with plain texts, and bad choices get 422 naming the input."""
    predictor = mtlm.load(mc_bundle, device="cpu")
    mc = [{"text": "stock market bank", "choices": ["team goal", "shares profit"]},
          {"text": "the movie plot", "choices": ["paris", "acting story", "bank", "match"]}]

    async def main():
        async with serving(str(mc_bundle), max_choices=4) as (app, client):
            r = await client.get("/v1/tasks")
            assert {t["name"]: t["input_fields"] for t in r.json()["tasks"]} == \
                {"reply": ["text", "choices"], "topic": ["text"]}
            r = await client.post("/v1/predict", json={"inputs": mc, "tasks": ["reply"]})
            assert r.status_code == 200, r.text
            for item, got, want in zip(mc, r.json()["predictions"], predictor.predict(mc, tasks=["reply"]),
                                       strict=True):
                assert len(got["reply"]["scores"]) == len(item["choices"])
                assert sum(got["reply"]["scores"]) == pytest.approx(1.0, abs=1e-5)
                assert_same(got, want)
            r = await client.post("/v1/predict", json={"inputs": ["bank profit", mc[0]]})    # tasks by fields
            assert r.status_code == 200, r.text
            assert [list(p) for p in r.json()["predictions"]] == [["topic"], ["reply", "topic"]]
            assert_same(r.json()["predictions"][1], predictor.predict([mc[0]])[0])
            bad = [({"text": "x", "choices": ["a", "b", "c", "d", "e"]}, ["inputs[0].choices", "at most 4"]),
                   ({"text": "x", "choices": ["a"]}, ["inputs[0].choices", "at least 2"]),
                   ({"text": "x", "choices": ["a", ""]}, ["inputs[0].choices"]),
                   ("just text", ["inputs[0]", "reply", "choices"])]
            for item, words in bad:
                r = await client.post("/v1/predict", json={"inputs": [item], "tasks": ["reply"]})
                assert r.status_code == 422 and all(w in r.json()["detail"] for w in words), (item, r.text)
            r = await client.post("/v1/predict", content=b'{"inputs": [{"text": "x", "choices": ["a", "b\\ud800"]}]}',
                                  headers={"content-type": "application/json"})
            assert r.status_code == 422 and "inputs[0].choices[1]" in r.json()["detail"], r.text

    asyncio.run(main())
