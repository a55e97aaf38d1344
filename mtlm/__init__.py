"""mtlm: one pretrained backbone, many NLP tasks.

Public surface: `load` (a trained bundle -> Predictor), `fit` (train a recipe), `load_recipe`,
`evaluate_bundle`, `derive_run` (a compressed/distilled run judged on its parent's rows), `create_app` (the
HTTP server's FastAPI app). Nothing heavy is imported until used."""

from __future__ import annotations

__version__ = "0.1.0"


def load(path, device=None, engine=None):
    """Load a run folder or bundle; returns a `mtlm.predict.Predictor` with `predict(inputs, tasks=None)`.
    engine: torch, torch-bf16, onnx, onnx-int8; default: the fastest engine the bundle holds that passes its
    check on this machine (see `mtlm.predict.load`; raises mtlm.engine.EngineError)."""
    from mtlm.predict import load as _load
    return _load(path, device, engine)


def fit(recipe, resume: bool = False, progress: bool = True, overwrite: bool = False, *, loss_fn=None,
        model_fn=None, callbacks=()):
    """Train a `Recipe` (see `mtlm.train.fit`: loss hooks, a model hook, callbacks); returns the run folder."""
    from mtlm.train import fit as _fit
    return _fit(recipe, resume=resume, progress=progress, overwrite=overwrite, loss_fn=loss_fn, model_fn=model_fn,
                callbacks=callbacks)


def load_recipe(path, overrides=()):
    """Read and validate a YAML recipe (see `mtlm.recipe.load_recipe`)."""
    from mtlm.recipe import load_recipe as _load_recipe
    return _load_recipe(path, overrides)


def evaluate_bundle(path, split: str = "test", batch_size: int = 64, data_dir=None):
    """Evaluate a run or bundle on the split rows stored at training (see `mtlm.evaluate.evaluate_bundle`)."""
    from mtlm.evaluate import evaluate_bundle as _evaluate_bundle
    return _evaluate_bundle(path, split, batch_size, data_dir=data_dir)


def derive_run(parent, run_dir, bundle=None, method: str = "copy", details=None):
    """A run folder for a model derived from run `parent`, judged on its rows (see `mtlm.contract.derive_run`)."""
    from mtlm.contract import derive_run as _derive_run
    return _derive_run(parent, run_dir, bundle, method, details)


def create_app(source, settings=None, handle_signals: bool = False):
    """The FastAPI app serving a run or bundle (see `mtlm.serve.app.create_app`)."""
    from mtlm.serve.app import create_app as _create_app
    return _create_app(source, settings, handle_signals)
