"""User errors on the command line: one message on stderr, exit status 2, never a Python traceback.

The main cases run as `python -m mtlm.cli ...` in subprocesses, started together by one module fixture (each
one spends seconds importing torch); each test checks one of them. Further cases call `mtlm.cli.main` in this
process, where a traceback shows up as an exception escaping `main`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml


def start(args: list[str], cwd: Path) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.Popen([sys.executable, "-m", "mtlm.cli", *args], cwd=cwd, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def make_bundle(backbone: str, toy: Path, d: Path) -> Path:
    """An (untrained) bundle with a single-text and a pair task, saved without running the training loop."""
    from mtlm.checkpoint import save_bundle
    from mtlm.recipe import load_recipe
    from mtlm.data import prepare_rows
    from mtlm.model import build_model, load_backbone
    from mtlm.tasks import build_task

    path = d / "bundle-recipe.yaml"
    path.write_text(yaml.safe_dump(sort_keys=False, data={
        "name": "cli", "backbone": backbone, "max_length": 32,
        "tasks": {"sentiment": {"type": "classification", "data": {"train": str(toy / "sentiment.csv")}},
                  "paraphrase": {"type": "classification", "data": {"train": str(toy / "pairs.jsonl")},
                                 "columns": {"text": "text_a", "text_pair": "text_b"}}}}))
    recipe = load_recipe(path)
    tasks = {n: build_task(n, c) for n, c in recipe.tasks.items()}
    prepare_rows(recipe, tasks)
    backbone_model, tokenizer = load_backbone(recipe.backbone)
    return save_bundle(build_model(backbone_model, tasks, "mean", 0.1), tokenizer, tasks, recipe, d / "bundle")


@pytest.fixture(scope="module")
def results(tiny_backbone, toy_data, tmp_path_factory) -> dict[str, tuple[int, str, str]]:
    d = tmp_path_factory.mktemp("cli")
    bad = {"name": "bad", "backbone": tiny_backbone, "colour": "blue",
           "tasks": {"s": {"type": "classifier", "data": {"train": str(toy_data / "sentiment.csv")}}},
           "train": {"batch_size": "big"}}
    (d / "bad.yaml").write_text(yaml.safe_dump(bad))
    (d / "rows.csv").write_text('text,label\n"a fine row",pos\n"another",neg\n"   ",pos\n"last",neg\n')
    good = {"name": "rows", "backbone": str(d / "no-such-backbone"), "output_dir": str(d / "runs" / "rows"),
            "tasks": {"s": {"type": "classification", "data": {"train": "rows.csv", "split": {}}}}}
    (d / "rows.yaml").write_text(yaml.safe_dump(good))
    (d / "empty_dir").mkdir()
    procs = {
        "bad_recipe": start(["train", "bad.yaml", "train.lr=fast"], d),
        "missing_file": start(["train", "nope.yaml"], d),
        "bad_row": start(["train", "rows.yaml", "--no-progress"], d),
        "eval_not_bundle": start(["eval", str(d / "empty_dir")], d),
    }
    bundle = make_bundle(tiny_backbone, toy_data, d)
    procs["predict_unknown_task"] = start(["predict", str(bundle), "hello", "--tasks", "sentiment,topic"], d)
    out = {"dir": d, "bundle": bundle}
    for name, proc in procs.items():
        try:
            stdout, stderr = proc.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            proc.kill()
            stdout, stderr = proc.communicate()
        out[name] = (proc.returncode, stdout, stderr)
    return out


def in_process(argv: list[str], capsys) -> tuple[int, str, str]:
    from mtlm.cli import main
    capsys.readouterr()
    try:
        rc = main(argv)
    except SystemExit as e:           # argparse errors
        rc = e.code if isinstance(e.code, int) else 1
    out, err = capsys.readouterr()
    return rc, out, err


def user_error(results, name: str) -> str:
    rc, stdout, stderr = results[name]
    assert "Traceback" not in stderr and "Traceback" not in stdout, stderr
    assert rc == 2, (rc, stderr)
    assert stderr.startswith("error: ") or "\nerror: " in stderr, stderr
    return stderr


def test_bad_recipe(results):
    err = user_error(results, "bad_recipe")
    assert "invalid recipe" in err
    for line in ("  - colour: unknown key", "  - train.batch_size:", "  - train.lr:"):
        assert line in err
    assert "'big'" in err and "'fast'" in err


def test_missing_recipe_file(results):
    err = user_error(results, "missing_file")
    assert "nope.yaml: file not found" in err


def test_bad_data_row(results):
    err = user_error(results, "bad_row")
    assert f"{results['dir'] / 'rows.csv'}, line 4, field 'text': empty text" in err
    assert "no-such-backbone" not in err                  # data errors come before the model loads
    assert not (results["dir"] / "runs" / "rows").exists()


def test_eval_on_a_folder_that_is_not_a_bundle(results):
    err = user_error(results, "eval_not_bundle")
    assert "not an mtlm run or bundle" in err and "empty_dir" in err


def test_predict_unknown_task(results):
    err = user_error(results, "predict_unknown_task")
    assert "unknown task(s) ['topic']; valid tasks: sentiment, paraphrase" in err
    assert results["predict_unknown_task"][1] == ""         # nothing half-written on stdout


def test_predict_works_on_the_same_bundle(results, capsys):
    """The control: the bundle the error cases use is a working one."""
    rc, stdout, stderr = in_process(["predict", str(results["bundle"]), "hello world", "the movie",
                                     "--tasks", "sentiment"], capsys)
    assert rc == 0, stderr
    lines = [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]
    assert [x["input"] for x in lines] == ["hello world", "the movie"]
    for x in lines:
        assert list(x["predictions"]) == ["sentiment"]
        assert x["predictions"]["sentiment"]["label"] in ("negative", "positive")


def test_predict_missing_text_pair_and_empty_text(results, capsys):
    rc, _, err = in_process(["predict", str(results["bundle"]), "hello", "--tasks", "sentiment,paraphrase"], capsys)
    assert rc == 2 and "error: inputs[0]: task(s) paraphrase need 'text_pair'" in err
    rc, _, err = in_process(["predict", str(results["bundle"]), "  ", "--tasks", "sentiment"], capsys)
    assert rc == 2 and "error: inputs[0].text: missing or empty" in err


def test_malformed_override(results, capsys):
    rc, out, err = in_process(["train", str(results["dir"] / "rows.yaml"), "train.lr=1e-4", "oops"], capsys)
    assert rc == 2 and "error: invalid recipe (1 problem):\n  - override 'oops': expected key.path=value" in err
    assert out == ""


def test_predict_documented_argument_order(results, capsys):
    rc, stdout, stderr = in_process(["predict", str(results["bundle"]), "--tasks", "sentiment", "hello world"],
                                    capsys)
    assert rc == 0, stderr
    assert json.loads(stdout.splitlines()[0])["input"] == "hello world"


def test_recipe_path_is_a_directory(results, capsys):
    rc, _, err = in_process(["train", str(results["dir"] / "empty_dir")], capsys)
    assert rc == 2 and "empty_dir" in err


def test_predict_missing_input_file(results, capsys):
    rc, _, err = in_process(["predict", str(results["bundle"]), "--input", str(results["dir"] / "missing.jsonl")],
                            capsys)
    assert rc == 2 and "missing.jsonl" in err


def test_predict_input_file_errors_name_the_line_and_keep_the_output(results, capsys, tmp_path):
    """A bad input in --input is reported at its file line (blank lines counted); an existing --output file
    is left as it was, and only replaced once every prediction is done."""
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text('"fine text"\n\n{"text": "   "}\n')
    out.write_text("earlier results\n")
    rc, _, err = in_process(["predict", str(results["bundle"]), "--tasks", "sentiment", "--input", str(inp),
                             "--output", str(out)], capsys)
    assert rc == 2 and f"error: {inp}, line 3, field 'text': missing or empty" in err, err
    assert out.read_text() == "earlier results\n"
    inp.write_text('"fine text"\n\n{"text": "also fine"}\n')
    rc, stdout, err = in_process(["predict", str(results["bundle"]), "--tasks", "sentiment", "--input", str(inp),
                                  "--output", str(out)], capsys)
    assert rc == 0, err
    assert [json.loads(x)["input"] for x in out.read_text().splitlines()] == ["fine text", {"text": "also fine"}]
    assert not list(tmp_path.glob("*.tmp"))


def test_serving_needs_only_the_plain_install():
    """The README's first command (`pip install -e .`) installs what `mtlm serve` needs: fastapi, uvicorn
    and prometheus-client are core dependencies, not an extra."""
    import tomllib
    project = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]
    core = {d.split("[")[0].split(">")[0].split("=")[0].strip().lower() for d in project["dependencies"]}
    assert {"fastapi", "uvicorn", "prometheus-client"} <= core


def test_serve_without_its_packages_names_the_pip_install(results, capsys, monkeypatch):
    """An install without fastapi (made with --no-deps, say): `mtlm serve` says which pip install brings
    it, exit 2, no traceback."""
    monkeypatch.delitem(sys.modules, "mtlm.serve.app", raising=False)
    monkeypatch.delitem(sys.modules, "mtlm.serve.process", raising=False)
    monkeypatch.setitem(sys.modules, "fastapi", None)            # import fastapi -> ModuleNotFoundError
    rc, _, err = in_process(["serve", str(results["bundle"])], capsys)
    assert rc == 2 and "'fastapi'" in err and "pip install fastapi" in err, err


def test_predict_lone_surrogate_names_the_line(results, capsys, tmp_path):
    """JSON that is valid but not Unicode text (a lone surrogate) is an input error at its file line."""
    inp = tmp_path / "in.jsonl"
    inp.write_text('"fine"\n"abc\\ud800"\n')
    rc, _, err = in_process(["predict", str(results["bundle"]), "--tasks", "sentiment", "--input", str(inp)], capsys)
    assert rc == 2 and f"{inp}, line 2, field 'text': not valid Unicode text" in err, err
