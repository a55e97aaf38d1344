"""What makes the server pass its engine's speed through, checked for correctness (speed is measured by
benchmarks/serve_bench.py --scenarios engines): batch tokenisation gives each input the encoding it gets
alone, the predict fast path answers as the FastAPI route does, the engine asked for is the one served, and
ONNX Runtime threads do not spin under OMP_WAIT_POLICY=PASSIVE."""

from __future__ import annotations

import asyncio
import json
import threading

import httpx
import numpy as np
import pytest

import mtlm
from servers import running_server
from test_serve import TEXTS, assert_same, bundle, serving  # noqa: F401  (the session's tiny bundle fixture)
from mtlm.serve.runner import Runner

TEXT, PAIR = ("text",), ("text", "text_pair")
OTHER_JSON = {"content-type": "application/merge-patch+json"}   # JSON to FastAPI, not taken by the fast path


def same_encoding(a, b) -> bool:
    return (a.truncated == b.truncated and a.meta == b.meta and len(a.sequences) == len(b.sequences)
            and all(x.keys() == y.keys() and all(np.array_equal(x[k], y[k]) for k in x)
                    for x, y in zip(a.sequences, b.sequences)))


def test_batch_tokenisation_equals_per_request_tokenisation(bundle):
    predictor = mtlm.load(bundle, engine="torch")
    requests = [{TEXT: [{"text": t} for t in TEXTS[:3]]},
                {TEXT: [{"text": " ".join(["great"] * 80)}], PAIR: [{"text": "a man eats", "text_pair": "he eats"}]},
                {PAIR: [{"text": t, "text_pair": TEXTS[0]} for t in TEXTS[3:]]},
                {TEXT: [{"text": "john smith went to paris"}]}]
    joint = Runner._tokenize_group(predictor, requests)
    assert len(joint) == len(requests)
    for got, jobs in zip(joint, requests):
        assert list(got) == list(jobs)
        for fields, items in jobs.items():
            alone = predictor.encode(items, fields)
            assert len(got[fields]) == len(alone) == len(items)
            assert all(same_encoding(g, a) for g, a in zip(got[fields], alone))
    assert joint[1][TEXT][0].truncated is True


def test_a_request_that_fails_tokenising_fails_alone(bundle):
    predictor = mtlm.load(bundle, engine="torch")
    good, bad = {TEXT: [{"text": "the movie was great fun"}]}, {PAIR: [{"text": "no pair here"}]}
    out = Runner._tokenize_group(predictor, [good, bad, good])
    assert isinstance(out[1], KeyError)
    assert same_encoding(out[0][TEXT][0], predictor.encode(good[TEXT], TEXT)[0])
    assert same_encoding(out[2][TEXT][0], out[0][TEXT][0])


def test_concurrent_requests_are_tokenised_in_one_call_and_answer_as_predict(bundle):
    predictor = mtlm.load(bundle, engine="torch")
    inputs = [[t] for t in TEXTS] + [[TEXTS[0], TEXTS[1]]]

    async def main():
        async with serving(str(bundle)) as (app, client):
            runner = app.state.service.runner
            joint, groups, held = runner._tokenize_group, [], threading.Event()
            encode, calls = runner._thread_predictor.encode, []

            def grouping(predictor, requests):      # the first group waits until every other request queued
                groups.append(len(requests))
                if len(groups) == 1:
                    assert held.wait(10)
                return joint(predictor, requests)

            def counting(items, fields):
                calls.append(len(items))
                return encode(items, fields)
            runner._tokenize_group, runner._thread_predictor.encode = grouping, counting
            posts = [asyncio.ensure_future(client.post("/v1/predict", json={"inputs": x, "tasks": ["sentiment", "ner"]}))
                     for x in inputs]
            deadline = asyncio.get_running_loop().time() + 10
            while not groups or groups[0] + len(runner._waiting) < len(inputs):
                assert asyncio.get_running_loop().time() < deadline, "requests never queued for the tokenizer"
                await asyncio.sleep(0.005)
            held.set()
            answers = await asyncio.gather(*posts)
            assert len(groups) <= 2 and sum(groups) == len(inputs)      # 7 requests: at most 2 tokenizer calls
            assert len(calls) == len(groups) and sum(calls) == sum(map(len, inputs))
            for r, x in zip(answers, inputs):
                assert r.status_code == 200, r.text
                for got, want in zip(r.json()["predictions"], predictor.predict(x, ["sentiment", "ner"]), strict=True):
                    assert_same(got, want)
    asyncio.run(main())


def test_fast_path_answers_as_the_fastapi_route(bundle):
    body = {"inputs": [TEXTS[0], {"text": "a man eats", "text_pair": "he eats"}], "timeout_ms": 20000}

    async def main():
        async with serving(str(bundle)) as (app, client):
            fast = await client.post("/v1/predict", json=body)            # application/json: the fast path
            routed = await client.post("/v1/predict", content=json.dumps(body), headers=OTHER_JSON)   # FastAPI's
            one = await client.post("/v1/tasks/sentiment/predict", json={"inputs": TEXTS[:2]})
            one_routed = await client.post("/v1/tasks/sentiment/predict", content=json.dumps({"inputs": TEXTS[:2]}),
                                           headers=OTHER_JSON)
            bad = await client.post("/v1/predict", json={"inputs": [TEXTS[0]], "timeout_ms": "soon"})
            return fast, routed, one, one_routed, bad
    fast, routed, one, one_routed, bad = asyncio.run(main())
    assert fast.status_code == routed.status_code == one.status_code == one_routed.status_code == 200
    assert fast.headers["content-type"] == routed.headers["content-type"] == "application/json"
    assert fast.json()["request_id"] != routed.json()["request_id"]
    a, b = fast.json(), routed.json()
    assert a.keys() == b.keys() and a["tasks"] == b["tasks"] and a["model"] == b["model"]
    for got, want in zip(a["predictions"], b["predictions"], strict=True):
        assert_same(got, want)
    assert one.json()["predictions"] == one_routed.json()["predictions"]
    assert bad.status_code == 422 and bad.json()["errors"][0]["loc"] == ["body", "timeout_ms"]


@pytest.fixture(scope="module")
def onnx_bundle(bundle, tmp_path_factory):
    """The tiny run exported to ONNX as a derived run: its bundle's default engine is onnx."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    from mtlm.export import export_run
    return export_run(bundle.parent, tmp_path_factory.mktemp("served") / "run-onnx")[0]


def test_mtlm_load_takes_the_engine(onnx_bundle):
    assert mtlm.load(onnx_bundle).engine.name == "onnx"
    assert mtlm.load(onnx_bundle, engine="torch").engine.name == "torch"


def test_serve_runs_the_engine_asked_for(onnx_bundle, tmp_path):
    """`mtlm serve --engine torch` with one worker used to serve the bundle's default engine instead."""
    for engine in ("torch", None):
        with running_server(onnx_bundle, tmp_path, *(["--engine", engine] if engine else [])) as url:
            r = httpx.post(f"{url}/v1/predict", json={"inputs": [TEXTS[0]]}, timeout=30)
            assert r.status_code == 200, r.text
        log = (tmp_path / "serve.log").read_text()
        assert f"(engine {engine or 'onnx'}) loaded" in log, log[-2000:]


def test_onnx_threads_do_not_spin_under_a_passive_wait_policy(onnx_bundle, monkeypatch):
    from mtlm.engine import ort_session
    path = onnx_bundle / "onnx" / "model.onnx"
    key = "session.intra_op.allow_spinning"
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
    assert ort_session(path, 1).get_session_options().get_session_config_entry(key) == "0"
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    with pytest.raises(Exception):       # not set: onnxruntime's default (spinning)
        ort_session(path, 1).get_session_options().get_session_config_entry(key)


def test_length_passes_split_mixed_lengths_and_keep_homogeneous_batches_whole():
    from mtlm.encoded import Encoded
    from mtlm.serve.runner import length_passes

    def enc(n: int, rows: int = 1) -> Encoded:
        return Encoded([{"input_ids": np.arange(n)} for _ in range(rows)])
    mixed = [enc(60), enc(5), enc(62), enc(6), enc(7), enc(64), enc(5)]
    passes = length_passes(mixed, pass_cost_tokens=64)
    assert passes == [[1, 6, 3, 4], [0, 2, 5]]           # short ones together, long ones together
    assert sorted(i for p in passes for i in p) == list(range(len(mixed)))
    assert length_passes([enc(30), enc(31), enc(29)], pass_cost_tokens=64) == [[2, 0, 1]]   # one pass
    assert length_passes(mixed, pass_cost_tokens=10 ** 6) == [[1, 6, 3, 4, 0, 2, 5]]       # passes too dear
    assert length_passes([enc(10, rows=8), enc(10)], pass_cost_tokens=64) == [[0, 1]]
    assert length_passes([]) == []
