"""`mtlm export RUN --task NAME --format hf`: one task as a Hugging Face folder giving mtlm's predictions
(mtlm/hf/export.py)."""

from __future__ import annotations

import json
import re

import pytest
import torch

from mtlm.checkpoint import load_bundle
from mtlm.cli import main
from mtlm.hf.export import ExportError, export_hf
from mtlm.predict import load
from mtlm.recipe import load_recipe
from mtlm.train import fit

AUTO = {"classification": "AutoModelForSequenceClassification", "regression": "AutoModelForSequenceClassification",
        "token_classification": "AutoModelForTokenClassification", "extractive_qa": "AutoModelForQuestionAnswering"}


def mtlm_logits(bundle, task: str, texts: list, pairs=None):
    model, tokenizer, tasks, meta = load_bundle(bundle)
    enc = tokenizer(texts, pairs, padding=True, truncation=True, max_length=meta["max_length"], return_tensors="pt")
    with torch.no_grad():
        return model.infer(enc["input_ids"], enc["attention_mask"], enc.get("token_type_ids"), tasks=[task])[task], enc


def hf_logits(folder, ttype: str, enc) -> torch.Tensor:
    import transformers
    hf = getattr(transformers, AUTO[ttype]).from_pretrained(folder, trust_remote_code=True).eval()
    with torch.no_grad():
        out = hf(**enc)
    return torch.stack([out.start_logits, out.end_logits], -1) if ttype == "extractive_qa" else out.logits


@pytest.fixture(scope="module")
def toy_run(tiny_backbone, toy_data, tmp_path_factory):
    from conftest import write_recipe
    d = tmp_path_factory.mktemp("hf")
    recipe = {"name": "hf", "backbone": tiny_backbone, "max_length": 32, "output_dir": str(d / "run"),
              "tasks": {"sentiment": {"type": "classification", "data": {"train": str(toy_data / "sentiment.csv")}},
                        "score": {"type": "regression", "data": {"train": str(toy_data / "score.jsonl")}},
                        "ner": {"type": "token_classification", "data": {"train": str(toy_data / "ner.jsonl")}},
                        "emotions": {"type": "multilabel", "data": {"train": str(toy_data / "emotions.jsonl")}}},
              "train": {"batch_size": 8, "max_steps": 12, "eval_every": 12, "lr": 1e-3}}
    return fit(load_recipe(write_recipe(d / "r.yaml", recipe)), progress=False)


@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_exported_heads_give_mtlms_logits(toy_run, tmp_path, pooling):
    """Every mappable type, both poolings: the HF model's logits are mtlm's (regression in target units)."""
    bundle = toy_run / "model"
    if pooling == "cls":       # the same weights read through [CLS] pooling: a different model, also exported
        meta = json.loads((bundle / "tasks.json").read_text())
        meta["pooling"] = "cls"
        (bundle / "tasks.json").write_text(json.dumps(meta))
    try:
        texts = ["the movie was great fun", "john smith went to paris and the film was bad", "good good the"]
        for task, ttype in [("sentiment", "classification"), ("score", "regression"), ("ner", "token_classification")]:
            out = export_hf(toy_run, task, tmp_path / task)
            cfg = json.loads((out / "config.json").read_text())
            ref, enc = mtlm_logits(bundle, task, texts)
            got = hf_logits(out, ttype, enc)
            if ttype == "regression":
                _, _, tasks, _ = load_bundle(bundle)
                ref = ref * tasks["score"].std + tasks["score"].mean
                assert cfg["problem_type"] == "regression" and len(cfg["id2label"]) == 1
            else:
                _, _, tasks, _ = load_bundle(bundle)
                assert cfg["id2label"] == {str(i): lab for i, lab in enumerate(tasks[task].labels)}
                assert cfg["label2id"] == {lab: i for i, lab in enumerate(tasks[task].labels)}
            assert got.shape == ref.shape
            assert torch.allclose(got, ref, atol=1e-5), (task, (got - ref).abs().max())
            if ttype == "classification":
                assert cfg["mtlm_pooling"] == pooling
    finally:
        if pooling == "cls":
            meta["pooling"] = "mean"
            (bundle / "tasks.json").write_text(json.dumps(meta))


def test_types_without_a_one_to_one_export_are_refused_clearly(toy_run, tmp_path, capsys):
    with pytest.raises(ExportError, match="multilabel task has no one-to-one Hugging Face export: .*thresholds"):
        export_hf(toy_run, "emotions", tmp_path / "e")
    assert main(["export", str(toy_run), "--format", "hf", "--task", "nope"]) == 2
    assert "--task 'nope': the bundle's tasks are sentiment, score, ner, emotions" in capsys.readouterr().err
    assert main(["export", str(toy_run), "--format", "hf"]) == 2
    assert "give --task NAME" in capsys.readouterr().err
    assert main(["export", str(toy_run), "--task", "sentiment", "--format", "bogus"]) == 2
    assert "unknown export format 'bogus'" in capsys.readouterr().err


def test_export_output_is_never_a_file_nor_a_foreign_folder(toy_run, tmp_path, capsys):
    """--output naming a file, or a non-empty folder that is not an earlier export, is refused and left
    untouched (it used to be removed with shutil.rmtree); an earlier export is replaced."""
    (tmp_path / "notes.txt").write_text("keep me")
    assert main(["export", str(toy_run), "--task", "sentiment", "--format", "hf",
                 "--output", str(tmp_path / "notes.txt")]) == 2
    assert "a file is there" in capsys.readouterr().err
    assert main(["export", str(toy_run), "--task", "sentiment", "--format", "hf", "--output", str(tmp_path)]) == 2
    assert "holds no earlier export" in capsys.readouterr().err
    assert (tmp_path / "notes.txt").read_text() == "keep me"
    out = export_hf(toy_run, "sentiment", tmp_path / "hf")
    assert main(["export", str(toy_run), "--task", "sentiment", "--format", "hf", "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"transformers.pipeline('text-classification', model={str(out)!r}, trust_remote_code=True)" in printed


def test_pipeline_gives_mtlms_predictions_on_real_texts(real_run, tmp_path, capsys):
    """The real MiniLM run: text-classification, token-classification and question-answering pipelines
    answer as `mtlm.load(run).predict` does on real dev texts."""
    from transformers import pipeline
    from conftest import SHARED_DATA

    predictor = load(real_run, engine="torch")
    sst = [json.loads(x)["text"] for x in (SHARED_DATA / "sst2/dev.jsonl").read_text().splitlines()[:24]]
    assert main(["export", str(real_run), "--task", "sentiment", "--format", "hf", "--output",
                 str(tmp_path / "sentiment")]) == 0
    assert "trust_remote_code=True" in capsys.readouterr().out
    clf = pipeline("text-classification", model=str(tmp_path / "sentiment"), trust_remote_code=True, device="cpu")
    ours = predictor.predict(sst, tasks=["sentiment"])
    theirs = clf(sst, truncation=True)
    assert [t["label"] for t in theirs] == [o["sentiment"]["label"] for o in ours]
    assert [t["score"] for t in theirs] == pytest.approx([o["sentiment"]["score"] for o in ours], abs=1e-4)

    # mtlm's words are the text's whitespace-separated words; the pipeline's are its tokenizer's pre-tokens,
    # which also split inside a word at punctuation ("O'Gorman" -> O ' Gorman): compare on sentences whose
    # words are letters/digits or one punctuation mark, where the two agree (README: HF export)
    conll = [json.loads(x)["tokens"] for x in (SHARED_DATA / "conll2003/dev.jsonl").read_text().splitlines()[:80]]
    plain = re.compile(r"^(\w+|[^\w\s])$")
    sentences = [" ".join(t) for t in conll if len(t) > 5 and all(plain.match(w) for w in t)][:16]
    assert len(sentences) == 16
    export_hf(real_run, "ner", tmp_path / "ner")
    tagger = pipeline("token-classification", model=str(tmp_path / "ner"), aggregation_strategy="first", device="cpu")
    ours = [[(e["entity"], e["start"], e["end"]) for e in o["ner"]["entities"]]
            for o in predictor.predict(sentences, tasks=["ner"])]
    theirs = [[(e["entity_group"], e["start"], e["end"]) for e in t] for t in tagger(sentences)]
    assert sum(map(len, ours)) >= 5        # the short run finds entities: the comparison is not of empty lists
    assert theirs == ours

    # transformers 5 removed the question-answering pipeline: the folder loads with
    # AutoModelForQuestionAnswering, whose start / end logits are mtlm's on real SQuAD questions
    from transformers import AutoModelForQuestionAnswering, AutoTokenizer
    squad = [json.loads(x) for x in (SHARED_DATA / "squad/dev.jsonl").read_text().splitlines()[:8]]
    export_hf(real_run, "qa", tmp_path / "qa")
    tok = AutoTokenizer.from_pretrained(tmp_path / "qa")
    enc = tok([r["question"] for r in squad], [r["context"] for r in squad], truncation="only_second",
              max_length=128, padding=True, return_tensors="pt")
    model, *_ = load_bundle(real_run / "model")
    with torch.no_grad():
        ref = model.infer(enc["input_ids"], enc["attention_mask"], enc["token_type_ids"], tasks=["qa"])["qa"]
        out = AutoModelForQuestionAnswering.from_pretrained(tmp_path / "qa").eval()(**enc)
    got = torch.stack([out.start_logits, out.end_logits], -1)
    assert torch.allclose(got, ref, atol=1e-4), (got - ref).abs().max()


def test_a_task_with_private_layers_is_exported_with_its_own_top_layers(tiny_backbone, toy_data, tmp_path):
    """tasks.<name>.private_layers: the HF folder's encoder holds the task's own top layers, so the plain
    encoder gives mtlm's logits (with the shared top layers it would not)."""
    from conftest import write_recipe
    recipe = {"name": "hfp", "backbone": tiny_backbone, "max_length": 32, "output_dir": str(tmp_path / "run"),
              "tasks": {"sentiment": {"type": "classification", "private_layers": 2,
                                      "data": {"train": str(toy_data / "sentiment.csv")}},
                        "ner": {"type": "token_classification", "private_layers": 1,
                                "data": {"train": str(toy_data / "ner.jsonl")}}},
              "train": {"batch_size": 8, "max_steps": 6, "eval_every": 6, "lr": 1e-3}}
    run = fit(load_recipe(write_recipe(tmp_path / "r.yaml", recipe)), progress=False)
    texts = ["the movie was great fun", "john smith went to paris and the film was bad"]
    for task, ttype in [("sentiment", "classification"), ("ner", "token_classification")]:
        out = export_hf(run, task, tmp_path / task)
        ref, enc = mtlm_logits(run / "model", task, texts)
        got = hf_logits(out, ttype, enc)
        assert torch.allclose(got, ref, atol=1e-5), (task, (got - ref).abs().max())


def test_onnx_export_and_int8_compress_without_onnx_name_the_install(toy_run, monkeypatch, capsys):
    """The default install has no onnx/onnxruntime (the test extra does): a clear message and exit 2, and no
    half-written derived run (it used to crash with OnnxExporterError after creating --output)."""
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnx" else real(name, *a))
    out = toy_run.parent / "no-onnx"
    assert main(["export", str(toy_run), "--output", str(out)]) == 2
    assert "needs onnx: pip install onnx onnxruntime" in capsys.readouterr().err
    assert not out.exists()
    assert main(["compress", str(toy_run), "--method", "int8"]) == 2
    assert "needs onnx: pip install onnx onnxruntime" in capsys.readouterr().err
