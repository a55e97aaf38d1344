"""The browser playground at `mtlm serve`'s `/`: typed into, submitted, every task's result drawn
(mtlm/serve/playground.py, mtlm/serve/static/), driven in headless Chromium."""

from __future__ import annotations

import json
import random

import httpx
import pytest

from browser import browser_page, needs_browser
from conftest import write_recipe
from servers import running_server

KEY = "playground-test-key"
TEXT = "john smith went to paris and the movie was great fun"
QUESTION, CONTEXT = "who went to paris", "the film was good and john smith went to paris on the team bus ."
CHOICES = ["stock market shares", "team match goal", "movie film plot"]


@pytest.fixture(scope="module")
def six_task_bundle(tiny_backbone, toy_data, tmp_path_factory):
    """Every task type on the tiny backbone, trained enough (60 steps) that NER finds entities."""
    import mtlm
    from test_multiple_choice import mc_row
    from test_qa import qa_row
    d = tmp_path_factory.mktemp("playground")
    rng = random.Random(0)
    (d / "qa.jsonl").write_text("".join(json.dumps(qa_row(rng, rng.randint(8, 20))) + "\n" for _ in range(80)))
    (d / "mc.jsonl").write_text("".join(json.dumps(mc_row(rng, 3)) + "\n" for _ in range(80)))
    tasks = {"sentiment": {"type": "classification", "data": {"train": str(toy_data / "sentiment.csv")}},
             "emotions": {"type": "multilabel", "data": {"train": str(toy_data / "emotions.jsonl")}},
             "score": {"type": "regression", "data": {"train": str(toy_data / "score.jsonl")}},
             "ner": {"type": "token_classification", "data": {"train": str(toy_data / "ner.jsonl")}},
             "qa": {"type": "extractive_qa", "doc_stride": 8, "data": {"train": str(d / "qa.jsonl")}},
             "reply": {"type": "multiple_choice", "data": {"train": str(d / "mc.jsonl")}}}
    recipe = {"name": "playground", "backbone": tiny_backbone, "max_length": 32, "output_dir": str(d / "run"),
              "tasks": tasks, "train": {"batch_size": 16, "max_steps": 90, "eval_every": 90, "lr": 3e-3,
                                        "warmup_ratio": 0.0, "tracking": []}}
    return mtlm.fit(mtlm.load_recipe(write_recipe(d / "r.yaml", recipe)), progress=False) / "model"


@needs_browser[0]
@needs_browser[1]
def test_playground_types_submits_and_shows_every_task(six_task_bundle, tmp_path):
    with running_server(six_task_bundle, tmp_path, "--api-key", KEY, headers={"authorization": f"Bearer {KEY}"}) as base:
        assert httpx.get(f"{base}/v1/tasks").status_code == 401            # /v1 still needs the key
        page_html = httpx.get(f"{base}/")
        assert page_html.status_code == 200 and "mtlm playground" in page_html.text
        assert "http" not in page_html.text.replace(base, "")                # no CDN: every file from this server
        auth = {"authorization": f"Bearer {KEY}"}
        paths = httpx.get(f"{base}/openapi.json", headers=auth).json()["paths"]
        assert "/" not in paths and "/v1/predict" in paths
        api = {}
        for inp, tasks in (({"text": TEXT}, ["sentiment", "emotions", "score", "ner"]),
                           ({"question": QUESTION, "context": CONTEXT}, ["qa"]),
                           ({"text": TEXT, "choices": CHOICES}, ["reply"])):
            r = httpx.post(f"{base}/v1/predict", json={"inputs": [inp], "tasks": tasks}, headers=auth, timeout=30)
            api.update(r.json()["predictions"][0])
        assert api["ner"]["entities"], api["ner"]        # the comparison below is not of an empty list

        with browser_page(tmp_path / "profile") as (page, problems):
            page.goto(base + "/")
            page.wait_for_selector("#key-box:not([hidden])")
            page.fill("#key", KEY)
            page.dispatch_event("#key", "change")
            page.wait_for_selector("#fields-qa:not([hidden])")
            page.fill("#text", TEXT)
            page.fill("#question", QUESTION)
            page.fill("#context", CONTEXT)
            page.fill("#choices", "\n".join(CHOICES))
            page.click("#submit")
            page.wait_for_function("document.getElementById('status').textContent === 'done'", timeout=30_000)
            shown = {name: page.eval_on_selector(f"#result-{name}", "e => e.innerText")
                     for name in ("sentiment", "emotions", "score", "ner", "qa", "reply")}
            chosen = page.eval_on_selector_all("#result-sentiment .bar.chosen", "es => es.map(e => e.dataset.label)")
            bars = page.eval_on_selector_all("#result-sentiment .bar", "es => es.length")
            marks = page.eval_on_selector_all("#result-ner mark", "es => es.map(e => [+e.dataset.start, +e.dataset.end])")
            answer = page.eval_on_selector_all("#result-qa mark", "es => es.map(e => e.textContent)")
            choice = page.text_content("#result-reply .chosen-choice")
        assert problems == []
        assert chosen == [api["sentiment"]["label"]] and bars == len(api["sentiment"]["scores"])
        assert all(lab in shown["emotions"] for lab in api["emotions"]["scores"])
        assert f"{api['score']['value']:.4f}" in shown["score"]
        assert marks == [[e["start"], e["end"]] for e in api["ner"]["entities"]]
        assert answer == [api["qa"]["answer"]] and api["qa"]["answer"] in CONTEXT
        assert choice == api["reply"]["label"] and choice in CHOICES


def test_no_playground_leaves_it_out(six_task_bundle):
    from fastapi.testclient import TestClient

    from mtlm.cli import build_parser
    from mtlm.serve.app import create_app
    from mtlm.serve.schemas import ServeSettings

    args = build_parser().parse_args(["serve", str(six_task_bundle), "--no-playground"])
    assert args.setting_playground is False
    assert build_parser().parse_args(["serve", str(six_task_bundle)]).setting_playground is None
    off = TestClient(create_app(str(six_task_bundle), ServeSettings(playground=False)))
    on = TestClient(create_app(str(six_task_bundle), ServeSettings()))
    assert off.get("/").status_code == 404 and off.get("/playground/playground.js").status_code == 404
    assert on.get("/").status_code == 200 and on.get("/playground/playground.js").status_code == 200
    assert on.get("/playground/config.json").json() == {"api_key_required": False}
    # the page hides fields with the `hidden` attribute: the stylesheet must not override it for labels
    css = on.get("/playground/playground.css").text
    assert "[hidden] { display: none !important; }" in css
