"""How a trained model becomes an MLflow model: its signature, pinned requirements and the code it carries.

The served code is the library (`cxr_model`) and the pyfunc wrapper of the entry-point package, registered as
MLflow "models from code": this module names the wrapper's file for MLflow to store and never imports it.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import mlflow
import pandas as pd
from mlflow.models import ModelSignature
from mlflow.types import ColSpec, Schema

import cxr_model
from cxr_model.errors import ConfigError
from cxr_model.serving import INPUT_COLUMN

SIGNATURE = ModelSignature(
    # Optional only so that a missing column reaches `predict`, whose message is one line; MLflow's own
    # schema check would answer with the whole request (megabytes of base64) pasted into the message.
    inputs=Schema([ColSpec("string", INPUT_COLUMN, required=False)]),
    outputs=Schema([ColSpec("double", "probability"), ColSpec("string", "label"), ColSpec("double", "threshold")]),
)

# Packages the served model imports, pinned at the installed versions (saves MLflow's slow inference).
# TensorFlow is pinned under the name it was installed as: tensorflow-cpu here, tensorflow on a GPU worker or a Mac.
SERVED_PACKAGES = ("mlflow", ("tensorflow-cpu", "tensorflow"), "keras", "numpy", "pandas", "pillow", "scikit-learn")

SERVED_MODEL_MODULE = "cxr_pneumonia.served_model"  # the file MLflow stores as the model's code


def pip_requirements() -> list[str]:
    """`pip_requirements` for `mlflow.pyfunc.log_model`: the served model's imports at installed versions."""
    from importlib.metadata import PackageNotFoundError, version

    pins = []
    for names in SERVED_PACKAGES:
        for name in (names,) if isinstance(names, str) else names:
            try:
                pins.append(f"{name}=={version(name)}")
                break
            except PackageNotFoundError:
                continue
        else:
            raise ConfigError(f"None of {names} is installed; the served model needs it")
    return pins


def served_model_code() -> Path:
    """The wrapper's source file, found without importing it."""
    spec = importlib.util.find_spec(SERVED_MODEL_MODULE)
    if spec is None or spec.origin is None:
        raise ConfigError(f"{SERVED_MODEL_MODULE} is not installed: install the cxr-pneumonia package")
    return Path(spec.origin)


def code_paths() -> list[str]:
    """What the model version carries besides its artifacts: the library and the wrapper's package."""
    return [str(Path(cxr_model.__file__).parent), str(served_model_code().parent)]


def model_kwargs(keras_model: str | Path, meta: str | Path, example: pd.DataFrame) -> dict:
    """Keyword arguments of `mlflow.pyfunc.log_model` / `save_model` for a saved Keras model and its meta.json."""
    return dict(python_model=str(served_model_code()),
                artifacts={"keras_model": str(keras_model), "meta": str(meta)},
                code_paths=code_paths(), signature=SIGNATURE, input_example=example,
                pip_requirements=pip_requirements())


def log_served_model(keras_model: str | Path, meta: str | Path, example: pd.DataFrame,
                     registered_model_name: str | None = None):
    """Log the served model as `model` of the active run (and register it under `registered_model_name`)."""
    return mlflow.pyfunc.log_model(name="model", registered_model_name=registered_model_name,
                                   **model_kwargs(keras_model, meta, example))
