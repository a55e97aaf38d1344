"""The saved bundle: safetensors-only layout, tasks.json, identical outputs after save/load, and the Python
prediction API over every task type. One tiny multi-task run is trained once for the module."""

from __future__ import annotations

import json
import pickle
import re
import shutil
from pathlib import Path

import pytest
import torch
import yaml

import mtlm
from mtlm.checkpoint import BundleError, find_bundle, load_bundle, save_bundle
from mtlm.recipe import load_recipe, parse_recipe
from mtlm.data import collate, encode_rows, prepare_rows
from mtlm.model import build_model, load_backbone
from mtlm.predict import InputError
from mtlm.tasks import build_task

TASKS = ("sentiment", "paraphrase", "score", "emotions", "ner")
PICKLE_SUFFIXES = {".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".npy", ".npz", ".joblib"}


@pytest.fixture(scope="module")
def backbone(tiny_backbone, tmp_path_factory) -> str:
    """tiny_backbone's weights with a tokenizer built from its vocab.txt (so words are not all [UNK])."""
    from transformers import AutoTokenizer, BertTokenizerFast

    d = tmp_path_factory.mktemp("tiny-bert-wordpiece")
    for name in ("config.json", "model.safetensors", "vocab.txt"):
        shutil.copy(Path(tiny_backbone) / name, d / name)
    BertTokenizerFast.from_pretrained(d).save_pretrained(d)
    assert AutoTokenizer.from_pretrained(d).tokenize("john went to paris") == ["john", "went", "to", "paris"]
    return str(d)


def recipe_dict(backbone: str, toy: Path, out: Path) -> dict:
    tasks = {
        "sentiment": {"type": "classification", "data": {"train": str(toy / "sentiment.csv")}},
        "paraphrase": {"type": "classification", "data": {"train": str(toy / "pairs.jsonl")},
                       "columns": {"text": "text_a", "text_pair": "text_b"}},
        "score": {"type": "regression", "data": {"train": str(toy / "score.jsonl")}},
        "emotions": {"type": "multilabel", "data": {"train": str(toy / "emotions.jsonl")}},
        "ner": {"type": "token_classification", "data": {"train": str(toy / "ner.jsonl")}},
    }
    return {"name": "bundle-test", "backbone": backbone, "max_length": 32, "output_dir": str(out),
            "tasks": tasks,
            "train": {"batch_size": 8, "max_steps": 8, "eval_every": 4, "lr": 1e-3, "warmup_ratio": 0.0,
                      "seed": 3}}


@pytest.fixture(scope="module")
def recipe(backbone, toy_data, tmp_path_factory):
    d = tmp_path_factory.mktemp("bundle-run")
    path = d / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe_dict(backbone, toy_data, d / "run"), sort_keys=False))
    return load_recipe(path)


@pytest.fixture(scope="module")
def run(recipe) -> Path:
    from mtlm.train import fit
    return fit(recipe, progress=False)


@pytest.fixture(scope="module")
def predictor(run):
    return mtlm.load(run, device="cpu")


def sample_batch(tokenizer, n: int = 4) -> dict:
    texts = ["john went to paris", "the movie was great fun", "stock market fell", "a"][:n]
    pairs = ["john went to london", "the film was bad", "shares rose", "b"][:n]
    return dict(tokenizer(texts, pairs, padding=True, return_tensors="pt"))


# ---------------------------------------------------------------- layout and tasks.json

def test_bundle_holds_only_safetensors_weights(run):
    from safetensors import safe_open

    bundle = run / "model"
    assert find_bundle(run) == bundle and find_bundle(bundle) == bundle
    files = {p.relative_to(bundle).as_posix() for p in bundle.rglob("*") if p.is_file()}
    assert {"tasks.json", "recipe.yaml", "heads.safetensors", "backbone/model.safetensors",
            "backbone/config.json"} <= files
    assert any(f.startswith("backbone/tokenizer") for f in files)
    assert not [f for f in files if Path(f).suffix in PICKLE_SUFFIXES]
    assert {Path(f).suffix for f in files} <= {".json", ".yaml", ".safetensors", ".txt", ".model"}
    with safe_open(str(bundle / "heads.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert {k.split(".", 1)[0] for k in keys} == set(TASKS)
    assert "sentiment.out.weight" in keys and "ner.out.bias" in keys
    # the run folder keeps its history next to the bundle
    assert (run / "metrics.json").is_file() and (run / "recipe.yaml").is_file()
    assert not list(run.glob("model.tmp")) and not list(run.glob("model.old"))


def test_tasks_json(run, recipe):
    meta = json.loads((run / "model" / "tasks.json").read_text())
    assert meta["format"] == 1 and meta["name"] == "bundle-test"
    assert meta["pooling"] == "mean" and meta["max_length"] == 32
    assert list(meta["tasks"]) == list(TASKS)
    t = meta["tasks"]
    assert {n: i["type"] for n, i in t.items()} == {"sentiment": "classification", "paraphrase": "classification",
                                                    "score": "regression", "emotions": "multilabel",
                                                    "ner": "token_classification"}
    assert t["sentiment"]["state"] == {"labels": ["negative", "positive"]}
    assert t["paraphrase"]["state"] == {"labels": ["different", "same"]}
    assert t["paraphrase"]["input_fields"] == ["text", "text_pair"]
    assert t["paraphrase"]["config"]["columns"] == {"text": "text_a", "text_pair": "text_b"}
    assert t["sentiment"]["input_fields"] == ["text"] and t["ner"]["input_fields"] == ["text"]
    assert t["emotions"]["state"]["labels"] == ["anger", "joy"]
    assert len(t["emotions"]["state"]["thresholds"]) == 2
    assert t["ner"]["state"]["labels"] == ["O", "B-LOC", "B-PER", "I-PER"]
    assert {n: i["metric"] for n, i in t.items()} == {"sentiment": "accuracy", "paraphrase": "accuracy",
                                                      "score": "pearson", "emotions": "micro_f1", "ner": "f1"}
    assert {n: i["head_input"] for n, i in t.items()}["ner"] == "tokens"
    # the fitted state is the one the train split gives (same seed, same splits)
    tasks = {n: build_task(n, c) for n, c in recipe.tasks.items()}
    prepare_rows(recipe, tasks)
    assert t["score"]["state"] == pytest.approx(tasks["score"].state())
    assert t["score"]["state"]["std"] > 0
    # the bundled recipe is the training recipe
    bundled = parse_recipe(yaml.safe_load((run / "model" / "recipe.yaml").read_text()), recipe.base_dir)
    assert bundled.model_dump() == recipe.model_dump()


# ---------------------------------------------------------------- identical outputs after save / load

def all_logits(model, batch) -> dict:
    with torch.inference_mode():
        return model(tasks=list(model.heads), **batch)


def test_loading_twice_gives_identical_logits(run):
    m1, tok1, _, _ = load_bundle(run)
    m2, tok2, _, _ = load_bundle(run / "model")
    assert not m1.training and not m2.training
    batch = sample_batch(tok1)
    assert torch.equal(batch["input_ids"], sample_batch(tok2)["input_ids"])
    out1, out2 = all_logits(m1, batch), all_logits(m2, batch)
    assert set(out1) == set(TASKS)
    for name in TASKS:
        assert torch.equal(out1[name], out2[name]), name
    assert out1["ner"].shape == (4, batch["input_ids"].shape[1], 4)
    assert out1["score"].shape == (4, 1) and out1["emotions"].shape == (4, 2)


def test_in_memory_model_matches_saved_bundle(recipe, tmp_path):
    tasks = {n: build_task(n, c) for n, c in recipe.tasks.items()}
    data = prepare_rows(recipe, tasks)
    backbone, tokenizer = load_backbone(recipe.backbone, dropout=0.1)
    torch.manual_seed(0)
    model = build_model(backbone, tasks, recipe.pooling, 0.1).eval()
    with torch.no_grad():                        # move every weight away from its initial value
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    save_bundle(model, tokenizer, tasks, recipe, tmp_path / "b1")
    loaded, tok, loaded_tasks, _ = load_bundle(tmp_path / "b1")
    batch = sample_batch(tokenizer)
    before, after = all_logits(model, batch), all_logits(loaded, batch)
    for name in TASKS:
        assert torch.equal(before[name], after[name]), name
    # per-task training path (one head) agrees with the all-heads path
    feats = encode_rows(tasks, data.rows, tokenizer, recipe.max_length)["ner"]["dev"][:5]
    one = collate(tasks["ner"], feats, tokenizer.pad_token_id)
    one.pop("labels")
    with torch.inference_mode():
        assert torch.equal(model(task="ner", **one), loaded(task="ner", **one))
    # saving the loaded bundle again round-trips exactly (weights and tasks.json)
    save_bundle(loaded, tok, loaded_tasks, recipe, tmp_path / "b2")
    again, _, _, _ = load_bundle(tmp_path / "b2")
    for name, value in all_logits(again, batch).items():
        assert torch.equal(value, before[name]), name
    assert (tmp_path / "b1" / "tasks.json").read_text() == (tmp_path / "b2" / "tasks.json").read_text()
    # overwriting an existing bundle replaces it atomically
    save_bundle(loaded, tok, loaded_tasks, recipe, tmp_path / "b2")
    assert not (tmp_path / "b2.tmp").exists() and not (tmp_path / "b2.old").exists()


def test_loading_never_unpickles(run, monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("bundle loading must not unpickle")
    monkeypatch.setattr(torch, "load", forbidden)
    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "loads", forbidden)
    model, tokenizer, tasks, _ = load_bundle(run)
    assert set(tasks) == set(TASKS)


def test_not_a_bundle(tmp_path):
    with pytest.raises(BundleError, match="not an mtlm run or bundle"):
        mtlm.load(tmp_path)
    (tmp_path / "tasks.json").write_text(json.dumps({"format": 99, "tasks": {}}))
    with pytest.raises(BundleError, match="format 99 is not supported"):
        mtlm.load(tmp_path)


# ---------------------------------------------------------------- predict

INPUTS = [{"text": "john smith went to paris", "text_pair": "john smith went to london"},
          {"text": "the movie was great fun , loved it", "text_pair": "the film was great"},
          {"text": "hated it", "text_pair": "hated it"}]


def forced_ner(run: Path, tag: str = "B-PER"):
    """The run's predictor, loaded afresh, whose tagging head answers `tag` for every word (through its bias)."""
    forced = mtlm.load(run, device="cpu")
    head = forced.model.heads["ner"].out
    with torch.no_grad():
        head.weight.zero_()
        head.bias.copy_(torch.tensor([10.0 if t == tag else 0.0 for t in forced.tasks["ner"].labels]))
    return forced


def test_predict_every_task_type(predictor, run):
    results = predictor.predict(INPUTS)
    assert len(results) == len(INPUTS)
    for item, res in zip(INPUTS, results):
        assert list(res) == list(TASKS)
        s = res["sentiment"]
        assert s["label"] in ("negative", "positive") and set(s["scores"]) == {"negative", "positive"}
        assert sum(s["scores"].values()) == pytest.approx(1.0, abs=1e-5)
        assert s["score"] == max(s["scores"].values()) and s["scores"][s["label"]] == s["score"]
        assert res["paraphrase"]["label"] in ("different", "same")
        assert isinstance(res["score"]["value"], float)
        e = res["emotions"]
        with torch.inference_mode():          # the scores are the head's sigmoids on the text alone
            logits = predictor.model(task="emotions", **predictor.tokenizer([item["text"]], return_tensors="pt"))
        want = dict(zip(predictor.tasks["emotions"].labels, torch.sigmoid(logits[0]).tolist()))
        assert e["scores"] == pytest.approx(want, abs=1e-5)
        thresholds = dict(zip(predictor.tasks["emotions"].labels, predictor.tasks["emotions"].thresholds))
        assert e["labels"] == [lab for lab, p in e["scores"].items() if p >= thresholds[lab]]
        assert not any("truncated" in r for r in res.values())
    # entities: with the tagging head forced to B-PER every word is one PER entity, spans into the text
    for item, res in zip(INPUTS, forced_ner(run).predict(INPUTS, tasks=["ner"])):
        ents = res["ner"]["entities"]
        assert [e["text"] for e in ents] == item["text"].split()
        assert all(set(e) == {"entity", "text", "start", "end", "score"} and e["entity"] == "PER" for e in ents)
        assert all(item["text"][e["start"]:e["end"]] == e["text"] for e in ents)


def test_predict_subset_of_tasks_and_plain_strings(predictor):
    res = predictor.predict("john went to paris", tasks=["ner", "score"])
    assert len(res) == 1 and list(res[0]) == ["ner", "score"]
    res = predictor.predict(["a movie", "john smith"], tasks=["sentiment"])
    assert [list(r) for r in res] == [["sentiment"], ["sentiment"]]
    only_pair = predictor.predict([{"text": "a", "text_pair": "b"}], tasks=["paraphrase"])
    assert list(only_pair[0]) == ["paraphrase"]


def test_default_tasks_follow_the_fields_each_input_carries(predictor):
    """Without `tasks`, a plain text gets the single-text tasks and a pair also gets the pair task, in
    one call; each result equals the same task predicted alone."""
    mixed = ["a movie", {"text": "b", "text_pair": "c"}, {"text": "d"}]
    res = predictor.predict(mixed, batch_size=2)
    single = [n for n, t in predictor.tasks.items() if tuple(t.input_fields()) == ("text",)]
    assert single and "paraphrase" not in single
    assert list(res[0]) == single and list(res[2]) == single
    assert list(res[1]) == [n for n in predictor.tasks if n in single or n == "paraphrase"]
    (pair,) = predictor.predict([mixed[1]], tasks=["paraphrase"])
    assert res[1]["paraphrase"]["label"] == pair["paraphrase"]["label"]
    assert res[1]["paraphrase"]["score"] == pytest.approx(pair["paraphrase"]["score"], abs=1e-5)


def test_predict_batched_equals_one_by_one(predictor):
    together = predictor.predict(INPUTS, batch_size=2)
    for item, res in zip(INPUTS, together):
        (alone,) = predictor.predict([item])
        assert alone["sentiment"]["label"] == res["sentiment"]["label"]
        assert alone["sentiment"]["score"] == pytest.approx(res["sentiment"]["score"], abs=1e-5)
        assert alone["score"]["value"] == pytest.approx(res["score"]["value"], abs=1e-4)
        assert alone["emotions"]["scores"] == pytest.approx(res["emotions"]["scores"], abs=1e-5)
        assert [(e["start"], e["end"]) for e in alone["ner"]["entities"]] == \
               [(e["start"], e["end"]) for e in res["ner"]["entities"]]


def test_predict_entity_offsets_with_forced_tags(run):
    """Force the tagging head's output through its bias and check the spans `predict` returns."""
    pred = mtlm.load(run, device="cpu")
    head = pred.model.heads["ner"].out
    labels = pred.tasks["ner"].labels
    text = "John  Smith went to Zürich."
    with torch.no_grad():
        head.weight.zero_()
        head.bias.copy_(torch.tensor([10.0 if t == "B-PER" else 0.0 for t in labels]))
    (res,) = pred.predict([text], tasks=["ner"])
    ents = res["ner"]["entities"]
    assert [e["text"] for e in ents] == ["John", "Smith", "went", "to", "Zürich", "."]
    assert [(e["start"], e["end"]) for e in ents] == [(0, 4), (6, 11), (12, 16), (17, 19), (20, 26), (26, 27)]
    assert all(e["entity"] == "PER" and e["score"] > 0.99 for e in ents)
    with torch.no_grad():
        head.bias.copy_(torch.tensor([10.0 if t == "I-PER" else 0.0 for t in labels]))
    (res,) = pred.predict([text], tasks=["ner"])
    assert [(e["entity"], e["text"], e["start"], e["end"]) for e in res["ner"]["entities"]] == \
           [("PER", text, 0, len(text))]


def test_predict_marks_truncated_inputs(predictor, run):
    long = " ".join(["john went to paris"] * 20)
    short, cut = predictor.predict([{"text": "hi there", "text_pair": "x"}, {"text": long, "text_pair": "y"}])
    assert all(r.get("truncated") is True for r in cut.values())
    assert not any("truncated" in r for r in short.values())
    (res,) = forced_ner(run).predict([long], tasks=["ner"])     # every word kept is one entity
    ents = res["ner"]["entities"]
    assert [e["text"] for e in ents] == long.split()[:30]              # 32 tokens - [CLS], [SEP]
    assert all(long[e["start"]:e["end"]] == e["text"] for e in ents)


def test_predict_input_errors(predictor):
    with pytest.raises(InputError, match=r"unknown task\(s\) \['topic'\]; valid tasks: sentiment, paraphrase"):
        predictor.predict(["a"], tasks=["sentiment", "topic"])
    with pytest.raises(InputError, match=r"inputs\[0, 2\]: task\(s\) paraphrase need 'text_pair'"):
        predictor.predict(["a", {"text": "b", "text_pair": "c"}, {"text": "d"}], tasks=["sentiment", "paraphrase"])
    with pytest.raises(InputError, match=r"inputs\[1\]\.text_pair: missing or empty"):   # present but blank
        predictor.predict(["a", {"text": "d", "text_pair": "  "}])
    with pytest.raises(InputError, match=r"inputs\[1\]\.text: missing or empty"):
        predictor.predict(["fine", ""], tasks=["sentiment"])
    with pytest.raises(InputError, match=r"inputs\[0\]\.text: missing or empty"):
        predictor.predict(["   "], tasks=["ner"])
    with pytest.raises(InputError, match=r"inputs\[0\]\.text: missing or empty"):
        predictor.predict([{"text_pair": "x"}], tasks=["paraphrase"])
    with pytest.raises(InputError, match=r"inputs\[0\]: expected a string or an object"):
        predictor.predict([42], tasks=["sentiment"])
    with pytest.raises(InputError, match=r"inputs\[0\]\.label: unknown field"):
        predictor.predict([{"text": "x", "label": "y"}], tasks=["sentiment"])
    with pytest.raises(InputError, match=r"inputs\[0\]\.text_pair: expected a string"):
        predictor.predict([{"text": "x", "text_pair": 3}], tasks=["paraphrase"])


# ---------------------------------------------------------------- evaluation of the bundle

def test_evaluate_bundle_reproduces_best_dev_metrics(run):
    history = json.loads((run / "metrics.json").read_text())
    best = next(h for h in history["eval"] if h["step"] == history["best_step"])
    metrics, tasks, out_path = mtlm.evaluate_bundle(run, "dev")
    assert out_path == run / "eval_dev.json" and out_path.is_file()
    assert {k.split("/")[0] for k in metrics if "/" in k} == set(TASKS)
    for key, value in metrics.items():
        if key.startswith("emotions/") or key == "mean":      # multilabel thresholds were tuned on dev since
            continue
        assert best[key] == pytest.approx(value, abs=1e-6), key
    # per-label tuning maximises each label's F1 on dev, so macro-F1 cannot drop below the 0.5-threshold one
    assert metrics["emotions/macro_f1"] >= best["emotions/macro_f1"] - 1e-9
    test_metrics, _, _ = mtlm.evaluate_bundle(run, "test")
    assert json.loads((run / "eval_test.json").read_text())["metrics"] == test_metrics


def test_multilabel_thresholds_are_tuned_on_dev(run, recipe):
    from mtlm.evaluate import task_outputs

    model, tokenizer, tasks, meta = load_bundle(run)
    fresh = {n: build_task(n, c) for n, c in recipe.tasks.items()}
    data = prepare_rows(recipe, fresh)
    dev = tasks["emotions"].encode(data.rows["emotions"]["dev"].records, tokenizer, recipe.max_length)
    preds, refs = task_outputs(model, tasks["emotions"], dev, 64, tokenizer.pad_token_id, torch.device("cpu"))
    tuned = build_task("emotions", recipe.tasks["emotions"])
    tuned.load_state({"labels": tasks["emotions"].labels, "thresholds": [0.5, 0.5]})
    tuned.tune_thresholds(preds, refs)
    assert meta["tasks"]["emotions"]["state"]["thresholds"] == pytest.approx(tuned.thresholds)


# ---------------------------------------------------------------- broken bundles and crash safety

def broken_copy(run: Path, dest: Path, edit) -> Path:
    """A copy of the run's bundle whose heads.safetensors went through `edit(tensors) -> tensors`."""
    from safetensors.torch import load_file, save_file
    shutil.copytree(run / "model", dest)
    save_file(edit(load_file(dest / "heads.safetensors")), dest / "heads.safetensors")
    return dest


def test_broken_heads_fail_with_one_error_naming_the_task(run, tmp_path, capsys):
    """A missing head, a head of the wrong label count and a head tasks.json does not list each fail with
    one BundleError naming the task, the tensors and the shapes, from mtlm.load, `mtlm eval` and
    `mtlm predict` alike (exit 2, no traceback): a random head is never served."""
    from mtlm.cli import main

    hidden = load_bundle(run)[0].backbone.config.hidden_size
    missing = broken_copy(run, tmp_path / "missing", lambda t: {k: v for k, v in t.items()
                                                                if not k.startswith("sentiment.")})
    wrong = broken_copy(run, tmp_path / "wrong", lambda t: {**t, "emotions.out.weight": torch.zeros(3, hidden),
                                                            "emotions.out.bias": torch.zeros(3)})
    extra = broken_copy(run, tmp_path / "extra", lambda t: {**t, "topic.out.weight": torch.zeros(2, hidden),
                                                            "topic.out.bias": torch.zeros(2)})
    cases = [(missing, ["task 'sentiment'", "sentiment.out.weight", "sentiment.out.bias", "missing"]),
             (wrong, ["task 'emotions'", f"emotions.out.weight has shape (3, {hidden}), expected (2, {hidden})",
                      "tasks.json lists 2 labels, the weights hold 3"]),
             (extra, ["task 'topic'", "topic.out.weight", "tasks.json does not list"])]
    for bundle, words in cases:
        with pytest.raises(BundleError) as err:
            mtlm.load(bundle)
        assert all(w in str(err.value) for w in words), (words, str(err.value))
        assert str(err.value).count("task '") == 1
        for argv in (["eval", str(bundle), "--split", "dev"], ["predict", str(bundle), "a text"]):
            assert main(argv) == 2
            out = capsys.readouterr()
            assert all(w in out.err for w in words) and "Traceback" not in out.err, out.err


def test_truncated_weight_files_are_a_bundle_error(run, tmp_path, capsys):
    """heads.safetensors or the backbone's weights cut short (a copy that died half way) -> one BundleError
    naming the file, exit 2 from the CLI, no traceback (safetensors' own error is no OSError)."""
    from mtlm.cli import main
    for rel in ("heads.safetensors", "backbone/model.safetensors"):
        bundle = tmp_path / rel.replace("/", "-")
        shutil.copytree(run / "model", bundle)
        data = (bundle / rel).read_bytes()
        (bundle / rel).write_bytes(data[: len(data) // 2])
        with pytest.raises(BundleError, match=re.escape(Path(rel).name)):
            mtlm.load(bundle)
        assert main(["predict", str(bundle), "a text"]) == 2
        err = capsys.readouterr().err
        assert Path(rel).name in err and "Traceback" not in err, err


def test_nan_weights_are_a_bundle_error(run, tmp_path):
    """A head with NaN weights (a diverged run) is refused at load, naming the tensor, instead of a server
    that is ready and answers 500 (or NaN scores) for that task."""
    nan = broken_copy(run, tmp_path / "nan",
                      lambda t: {**t, "sentiment.out.weight": torch.full_like(t["sentiment.out.weight"], float("nan"))})
    with pytest.raises(BundleError, match=r"NaN or infinite values: heads\.sentiment\.out\.weight"):
        mtlm.load(nan)


def test_sharded_backbone_weights_load(run, tmp_path):
    """A backbone saved in several safetensors shards (model.safetensors.index.json) loads like one file."""
    model, tokenizer, _, _ = load_bundle(run)
    bundle = tmp_path / "sharded"
    shutil.copytree(run / "model", bundle)
    shutil.rmtree(bundle / "backbone")
    model.backbone.save_pretrained(bundle / "backbone", max_shard_size="30KB")
    tokenizer.save_pretrained(bundle / "backbone")
    assert not (bundle / "backbone" / "model.safetensors").exists()
    assert len(list((bundle / "backbone").glob("model-*.safetensors"))) > 1
    loaded, _, _, _ = load_bundle(bundle)
    batch = sample_batch(tokenizer)
    for name, value in all_logits(loaded, batch).items():
        assert torch.equal(value, all_logits(model, batch)[name]), name


def test_interrupted_save_falls_back_to_the_old_bundle(run, recipe, tmp_path, monkeypatch):
    """A crash between save_bundle's two renames (old bundle moved away, new one not yet in place) leaves
    the old bundle loadable; the next save puts things right."""
    model, tokenizer, tasks, _ = load_bundle(run)
    bundle = save_bundle(model, tokenizer, tasks, recipe, tmp_path / "run" / "model")
    batch = sample_batch(tokenizer)
    first = all_logits(model, batch)
    with torch.no_grad():
        model.heads["sentiment"].out.bias.add_(1.0)
    real_rename = Path.rename

    def crash(self, target):
        if self.name.endswith(".tmp"):
            raise OSError("simulated crash between the renames")
        return real_rename(self, target)
    monkeypatch.setattr(Path, "rename", crash)
    with pytest.raises(OSError, match="simulated crash"):
        save_bundle(model, tokenizer, tasks, recipe, bundle)
    monkeypatch.undo()
    assert not bundle.exists() and (tmp_path / "run" / "model.old" / "tasks.json").is_file()
    assert find_bundle(tmp_path / "run") == tmp_path / "run" / "model.old"
    for name, value in all_logits(load_bundle(tmp_path / "run")[0], batch).items():
        assert torch.equal(value, first[name]), name
    assert mtlm.load(bundle).predict(["a movie"], tasks=["sentiment"])[0]["sentiment"]["label"]
    save_bundle(model, tokenizer, tasks, recipe, bundle)                  # recovers, then replaces
    assert not (tmp_path / "run" / "model.old").exists() and not (tmp_path / "run" / "model.tmp").exists()
    after = all_logits(load_bundle(bundle)[0], batch)
    # x @ W + (b + 1) vs (x @ W + b) + 1: equal up to float rounding
    torch.testing.assert_close(after["sentiment"], first["sentiment"] + 1.0, rtol=0, atol=1e-5)


def test_write_tasks_json_is_atomic(run, tmp_path, monkeypatch):
    """write_tasks_json replaces tasks.json whole; a failure mid-write leaves the old file and no temp file."""
    import os
    from mtlm.checkpoint import write_tasks_json

    bundle = tmp_path / "b"
    shutil.copytree(run / "model", bundle)
    before = (bundle / "tasks.json").read_text()
    meta = json.loads(before)
    meta["tasks"]["emotions"]["state"]["thresholds"] = [0.25, 0.75]

    def fail(fd):
        raise OSError("disk full")
    monkeypatch.setattr(os, "fsync", fail)
    with pytest.raises(OSError, match="disk full"):
        write_tasks_json(bundle, meta)
    assert (bundle / "tasks.json").read_text() == before
    assert sorted(p.name for p in bundle.iterdir()) == sorted(p.name for p in (run / "model").iterdir())
    monkeypatch.undo()
    assert write_tasks_json(bundle, meta) == bundle / "tasks.json"
    assert (bundle / "tasks.json").stat().st_mode == (bundle / "recipe.yaml").stat().st_mode   # umask, not 0600
    assert mtlm.load(bundle).tasks["emotions"].thresholds == [0.25, 0.75]
