"""Progress in a non-interactive log: periodic lines, not carriage-return redraws (mtlm/progress.py)."""

from __future__ import annotations

import io
import subprocess
import sys

import pytest

from mtlm.progress import LineProgress, progress_mode


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_line_progress_writes_every_ten_percent_and_the_end():
    out, clock = io.StringIO(), Clock()
    bar = LineProgress(1000, "train", stream=out, clock=clock, unit="step")
    for i in range(1000):
        clock.t += 0.01          # 10 s in all: the 30 s rule never fires
        bar.set_postfix({"loss": f"{1 / (i + 1):.3f}"})
        bar.update(1)
    bar.close()
    lines = out.getvalue().splitlines()
    assert len(lines) == 10, lines
    assert "\r" not in out.getvalue()
    assert lines[0].startswith("train: 100/1000 (10%)") and lines[-1].startswith("train: 1000/1000 (100%)")
    assert "loss=0.001" in lines[-1] and "step/s" in lines[-1]


def test_line_progress_writes_every_30_seconds_when_steps_are_slow():
    out, clock = io.StringIO(), Clock()
    bar = LineProgress(10_000, "eval", stream=out, clock=clock)
    for _ in range(100):         # 1% of the total, 100 s
        clock.t += 1.0
        bar.update(1)
    bar.close()
    lines = out.getvalue().splitlines()
    assert len(lines) == 4, lines          # at 30, 60, 90 s and the close at 100 s
    assert lines[-1].startswith("eval: 100/10000 (1%) 100s")


def test_progress_mode_follows_the_stream_and_env(monkeypatch):
    monkeypatch.delenv("MTLM_PROGRESS", raising=False)
    assert progress_mode(io.StringIO()) == "lines"
    monkeypatch.setenv("MTLM_PROGRESS", "bar")
    assert progress_mode(io.StringIO()) == "bar"
    monkeypatch.setenv("MTLM_PROGRESS", "sometimes")
    with pytest.raises(ValueError, match="MTLM_PROGRESS"):
        progress_mode(io.StringIO())


def test_training_log_holds_lines_not_redraws(make_recipe, tmp_path):
    """`mtlm train` with stderr redirected to a file: a few progress lines, no carriage returns."""
    recipe = make_recipe(max_steps=40, eval_every=20)
    log = tmp_path / "train.log"
    with open(log, "w") as f:
        r = subprocess.run([sys.executable, "-m", "mtlm.cli", "train", str(recipe)], stdout=f, stderr=f,
                           env={**__import__("os").environ, "MTLM_PROGRESS": ""}, timeout=600)
    text = log.read_text()
    assert r.returncode == 0, text
    assert "\r" not in text
    lines = [x for x in text.splitlines() if x.startswith("train: ")]
    assert 4 <= len(lines) <= 11, lines
    assert lines[-1].startswith("train: 40/40 (100%)")


def test_mtlm_eval_shows_batches_done(make_recipe, capsys, monkeypatch):
    from mtlm.cli import main
    from mtlm.recipe import load_recipe
    from mtlm.train import fit
    monkeypatch.delenv("MTLM_PROGRESS", raising=False)
    run = fit(load_recipe(make_recipe(max_steps=10, eval_every=10)), progress=False)
    capsys.readouterr()                                   # training's output is not under test here
    assert main(["eval", str(run), "--split", "dev", "--batch-size", "4"]) == 0
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if x.startswith("eval dev: ")]
    assert lines and lines[-1].startswith("eval dev: ") and "(100%)" in lines[-1] and "\r" not in err
    done, total = lines[-1].split()[2].split("/")
    assert done == total and int(total) > 10          # 4 rows per batch over both tasks' dev rows


def test_a_resumed_runs_rate_counts_only_this_process_steps():
    """Resumed at step 60 of 80: 20 steps in 50 s is 0.40 step/s (it printed 1.60, counting the 60 steps done
    before the resume)."""
    out, clock = io.StringIO(), Clock()
    bar = LineProgress(80, "train", initial=60, stream=out, clock=clock, unit="step")
    for _ in range(20):
        clock.t += 2.5
        bar.update(1)
    bar.close()
    assert out.getvalue().splitlines()[-1].startswith("train: 80/80 (100%) 50s 0.40 step/s")
