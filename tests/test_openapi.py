"""The served OpenAPI document says what the server does (issue 18): schemathesis, all checks, runs clean
against a real `mtlm serve` on a text-task bundle and on a QA + multiple-choice bundle (tiny random
backbones: the fuzz is about the HTTP contract, not the predictions)."""

from __future__ import annotations

import json
import random
import re
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from servers import fit_bundle, running_server
from test_multiple_choice import mc_row
from test_qa import qa_row

from mtlm.serve.openapi import NON_BLANK, WHITESPACE, build_document, predict_request
from mtlm.serve.schemas import ServeSettings

pytest.importorskip("schemathesis")
SCHEMATHESIS_CONFIG = """
[warnings]
fail-on = true
"""


@pytest.fixture(scope="module")
def text_bundle(tiny_backbone, toy_data, tmp_path_factory) -> Path:
    """Single-text and pair tasks: classification, pair classification, tagging, regression."""
    data = lambda name: {"train": str(toy_data / name)}  # noqa: E731
    return fit_bundle(tmp_path_factory.mktemp("text"), tiny_backbone, {
        "sentiment": {"type": "classification", "data": data("sentiment.csv")},
        "paraphrase": {"type": "classification", "data": data("pairs.jsonl"),
                       "columns": {"text": "text_a", "text_pair": "text_b"}},
        "ner": {"type": "token_classification", "data": data("ner.jsonl")},
        "score": {"type": "regression", "data": data("score.jsonl")}})


@pytest.fixture(scope="module")
def qa_mc_bundle(tiny_backbone, toy_data, tmp_path_factory) -> Path:
    """Extractive QA, multiple choice and a classification (three field groups)."""
    d = tmp_path_factory.mktemp("qa-mc")
    rng = random.Random(0)
    (d / "squad.jsonl").write_text("".join(json.dumps(qa_row(rng, rng.randint(10, 40))) + "\n" for _ in range(40)))
    (d / "mc.jsonl").write_text("".join(json.dumps(mc_row(rng, rng.randint(2, 4))) + "\n" for _ in range(40)))
    return fit_bundle(d, tiny_backbone, {
        "qa": {"type": "extractive_qa", "data": {"train": str(d / "squad.jsonl")}, "doc_stride": 8},
        "reply": {"type": "multiple_choice", "data": {"train": str(d / "mc.jsonl")}},
        "topic": {"type": "classification", "data": {"train": str(toy_data / "topic.jsonl")}}})


def test_non_blank_pattern_is_pythons_whitespace():
    """The schema's "not blank" is the server's `str.strip()` test, character for character."""
    assert WHITESPACE == "".join(c for c in map(chr, range(0x110000)) if c.isspace())
    for c in map(chr, range(0x3100)):
        assert (re.search(NON_BLANK, c) is None) == c.isspace(), hex(ord(c))


def test_document_carries_the_bundles_tasks_and_limits():
    tasks = [{"name": "sentiment", "type": "classification", "input_fields": ["text"]},
             {"name": "nli", "type": "classification", "input_fields": ["text", "text_pair"]},
             {"name": "qa", "type": "extractive_qa", "input_fields": ["question", "context"]}]
    settings = ServeSettings(max_inputs_per_request=7, max_choices=5, min_timeout_ms=20, max_timeout_ms=900)
    body = predict_request(tasks, settings)
    assert len(body["anyOf"]) == 1 + 7                       # no tasks, and every set of the 3 field groups
    auto, *given = body["anyOf"]
    assert auto["properties"]["inputs"]["maxItems"] == 7
    timeout = auto["properties"]["timeout_ms"]["anyOf"][0]
    assert (timeout["minimum"], timeout["maximum"]) == (20, 900)
    enums = sorted(tuple(b["properties"]["tasks"]["items"]["enum"]) for b in given)
    assert ("sentiment",) in enums and ("nli", "qa") in enums and ("sentiment", "nli", "qa") in enums
    from fastapi.openapi.utils import get_openapi

    from mtlm.serve.app import create_app
    from mtlm.serve.auth import APIKeys
    app = create_app(lambda: None, settings)
    doc = build_document(get_openapi(title="t", version="1", routes=app.routes), settings,
                         APIKeys.from_keys(["k"]), tasks)
    assert "/v1/tasks/{task}/predict" not in doc["paths"] and "/v1/tasks/qa/predict" in doc["paths"]
    qa_items = doc["paths"]["/v1/tasks/qa/predict"]["post"]["requestBody"]["content"]["application/json"][
        "schema"]["properties"]["inputs"]["items"]["anyOf"]
    assert [sorted(i["required"]) for i in qa_items] == [["context", "question"]]
    predict = doc["paths"]["/v1/predict"]["post"]["responses"]
    assert set(predict) == {"200", "400", "401", "413", "422", "429", "500", "503", "504"}
    assert predict["429"]["headers"]["Retry-After"]["required"] is True
    assert "text/plain" in doc["paths"]["/metrics"]["get"]["responses"]["200"]["content"]
    assert "security" not in doc["paths"]["/health"]["get"] and doc["paths"]["/v1/tasks"]["get"]["security"]
    for example in body["examples"]:                          # examples the bundle accepts
        assert example["inputs"]


def test_least_timeout_grows_with_the_request_size_in_tiers():
    """n inputs need n x the cost of one (at least min_timeout_ms), per tier of 1, 4, 16, ... inputs; the
    document has one branch per tier with that minimum, and the server's 422 uses the same numbers."""
    from mtlm.serve.service import deadline_floors, least_timeout_ms
    settings = ServeSettings(max_inputs_per_request=100, min_timeout_ms=50, default_timeout_ms=1000)
    floors = deadline_floors(settings, 12.3)
    assert floors == [(4, 50), (16, 200), (64, 790), (100, 1230)]            # 1..4 merged: 4 x 12.3 < 50
    assert [least_timeout_ms(floors, n) for n in (1, 4, 5, 16, 17, 64, 65, 100)] == \
        [50, 50, 200, 200, 790, 790, 1230, 1230]
    assert deadline_floors(settings, 0.1) == [(100, 50)]                       # one tier: min_timeout_ms
    assert deadline_floors(ServeSettings(max_timeout_ms=900), 100)[-1] == (256, 900)   # capped
    tasks = [{"name": "sentiment", "type": "classification", "input_fields": ["text"]}]
    body = predict_request(tasks, settings, floors)
    assert len(body["anyOf"]) == 2 * 4                                        # (no tasks, tasks) x 4 tiers
    got = sorted({(b["properties"]["inputs"]["minItems"], b["properties"]["inputs"]["maxItems"],
                   (b["properties"]["timeout_ms"].get("anyOf") or [b["properties"]["timeout_ms"]])[0]["minimum"],
                   "timeout_ms" in b["required"]) for b in body["anyOf"]})
    assert got == [(1, 4, 50, False), (5, 16, 200, False), (17, 64, 790, False), (65, 100, 1230, True)]
    assert predict_request(tasks, settings, [(100, 50)]) == predict_request(tasks, settings)


def test_a_deadline_under_the_minimum_is_refused_up_front(text_bundle):
    """`timeout_ms: 1` (or 1e-323) used to get 504, a server error; now 422 naming the documented minimum."""
    import asyncio

    from mtlm.serve.app import create_app

    async def main():
        app = create_app(str(text_bundle), ServeSettings(min_timeout_ms=100))
        async with app.router.lifespan_context(app):
            await app.state.service.wait_ready(30)
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
                for timeout_ms in (1, 1e-323, 99.9):
                    r = await client.post("/v1/predict", json={"inputs": ["a"], "timeout_ms": timeout_ms})
                    assert r.status_code == 422 and "minimum of 100" in r.json()["detail"], r.text
                r = await client.post("/v1/predict", json={"inputs": ["a"], "timeout_ms": 100})
                assert r.status_code == 200, r.text
                r = await client.post("/v1/predict", json={"inputs": ["a"], "timeout_ms": "100"})
                assert r.status_code == 422                       # a number, as the document says
                doc = (await client.get("/openapi.json")).json()
                body = doc["paths"]["/v1/predict"]["post"]["requestBody"]["content"]["application/json"]["schema"]
                assert body["anyOf"][0]["properties"]["timeout_ms"]["anyOf"][0]["minimum"] == 100

    asyncio.run(main())


def _schemathesis(base: str, tmp_path: Path, max_examples: int, headers: dict | None = None) -> str:
    config = tmp_path / "schemathesis.toml"
    config.write_text(SCHEMATHESIS_CONFIG)
    cmd = [sys.executable, "-m", "schemathesis.cli", "--config-file", str(config), "run", f"{base}/openapi.json",
           "--checks", "all", "--seed", "1", "--max-examples", str(max_examples), "--workers", "1",
           "--request-timeout", "30", "--no-shrink"]
    for name, value in (headers or {}).items():
        cmd += ["-H", f"{name}: {value}"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path)   # its .schemathesis/ there
    assert out.returncode == 0, out.stdout[-8000:] + out.stderr[-2000:]
    return out.stdout


@pytest.mark.parametrize("which", ["text_bundle", "qa_mc_bundle"])
def test_schemathesis_finds_nothing(which, request, tmp_path):
    """All checks (server errors, status codes, content types, headers, response schemas, positive data
    accepted, negative data refused, ...) on every operation, seeded and bounded. The QA + multiple-choice
    server runs with an API key, so the 401s and `ignored_auth` are checked too."""
    bundle = request.getfixturevalue(which)
    key = "fuzz-key-123" if which == "qa_mc_bundle" else None
    # default settings: the coverage phase sends max_inputs_per_request inputs with the smallest timeout_ms
    # the document allows for that many, which the server measured at warm-up (no 504, no 422)
    args = ["--api-key", key] if key else []
    auth = {"Authorization": f"Bearer {key}"} if key else {}
    with running_server(bundle, tmp_path, *args, headers=auth) as base:
        with httpx.Client(base_url=base) as client:   # the document describes the bundle, not any bundle
            doc = client.get("/openapi.json", headers=auth).json()
        assert "/v1/tasks/sentiment/predict" in doc["paths"] or "/v1/tasks/qa/predict" in doc["paths"]
        out = _schemathesis(base, tmp_path, 40, auth)
    generated = re.search(r"(\d+) generated", out)
    assert generated and int(generated.group(1)) >= 300, out[-3000:]        # a few hundred cases, not none
    assert re.search(r"Tested: (\d+)", out).group(1) == str(len(doc["paths"])), out[-3000:]
