"""`mtlm quickstart`: MiniLM-L6 on three real built-in tasks, trained jointly on the CPU in minutes.

Tasks: Rotten Tomatoes sentiment (Pang & Lee 2005), BBC News topic (Greene & Cunningham 2006) and
chatterbot-corpus intents, all read from pip packages. The recipe is written into the run folder
(`recipe.yaml`) so it can be copied and edited; then the held-out test splits are evaluated and a few
example sentences predicted."""

from __future__ import annotations

from pathlib import Path

import yaml

RECIPE = {
    "name": "quickstart",
    "backbone": "minilm-l6",
    "pooling": "mean",
    "max_length": 64,          # BBC articles are cut to their headline and first sentences
    "tasks": {
        "sentiment": {"type": "classification", "metric": "accuracy",
                      "data": {"train": "builtin:rotten_tomatoes", "split": {"dev": 0.1, "test": 0.1},
                               "limit": {"dev": 400}}},
        "topic": {"type": "classification", "metric": "accuracy",
                  "data": {"train": "builtin:bbc_news", "split": {"dev": 0.1, "test": 0.1}}},
        "intent": {"type": "classification", "metric": "macro_f1",
                   "data": {"train": "builtin:chatterbot_intents", "split": {"dev": 0.15, "test": 0.15}}},
    },
    "train": {"batch_size": 32, "max_steps": 300, "lr": 1.0e-4, "warmup_ratio": 0.06, "weight_decay": 0.01,
              "sampling": "temperature", "temperature": 2.0, "eval_every": 100, "early_stopping_patience": 3,
              "seed": 0},
}

EXAMPLES = [
    "An absolute delight from start to finish, with a cast that clearly loved making it.",
    "Shares in the carmaker slumped after it cut its profit forecast for the year.",
    "The striker scored twice as the champions came back to win the derby.",
    "Can you tell me a joke?",
]


def quickstart(output_dir: str | Path = "runs/quickstart", max_steps: int | None = None,
               overrides: list[str] | tuple[str, ...] = ()) -> Path:
    """Write the recipe into `output_dir`, train, evaluate on test, print the table and example predictions.

    overrides: dotted recipe overrides (`train.batch_size=8`), applied after `max_steps` (a reduced run for
    tests). Raises RecipeError (also when `output_dir` holds another run), BackboneError."""
    from mtlm.recipe import load_recipe
    from mtlm.evaluate import by_task, evaluate_bundle, format_table
    from mtlm.predict import load
    from mtlm.train import fit

    from mtlm.config import RecipeError

    out = Path(output_dir).resolve()
    previous = out / "recipe.yaml"
    if previous.is_file() and (yaml.safe_load(previous.read_text(encoding="utf-8")) or {}).get("name") != "quickstart":
        raise RecipeError([f"{out} holds another run ({previous}); quickstart only overwrites its own runs: "
                           f"choose another --output-dir"])
    out.mkdir(parents=True, exist_ok=True)
    raw = {**RECIPE, "output_dir": str(out)}
    recipe_path = out / "recipe.yaml"
    recipe_path.write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
    overrides = ([f"train.max_steps={max_steps}"] if max_steps is not None else []) + list(overrides)
    recipe = load_recipe(recipe_path, overrides)
    print(f"recipe: {recipe_path} (copy it to start your own)")
    fit(recipe, overwrite=True)
    metrics, tasks, path = evaluate_bundle(out, "test")
    print("\ntest split:")
    print(format_table(by_task(metrics), tasks))
    print(f"wrote {path}\n")
    predictor = load(out)
    for text, result in zip(EXAMPLES, predictor.predict(EXAMPLES)):
        shown = ", ".join(f"{task}={r['label']} ({r['score']:.2f})" for task, r in result.items())
        print(f"{text}\n    -> {shown}")
    print(f"\nnext: mtlm predict {out} \"your text\"   |   mtlm eval {out}   |   mtlm serve {out}")
    return out
