"""The served model: an MLflow pyfunc around the Keras model, base64 image files in, probabilities out.

Imports MLflow, so only the registry task and the serving process import this module.
"""

from __future__ import annotations

import base64
import binascii
import json
from pathlib import Path

import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.pyfunc import PythonModel
from mlflow.types import ColSpec, Schema

from cxr_model.preprocess import MAX_PIXELS, ImageDecodeError, decode_image

INPUT_COLUMN = "image"
LABELS = ("NORMAL", "PNEUMONIA")

SIGNATURE = ModelSignature(
    inputs=Schema([ColSpec("string", INPUT_COLUMN)]),
    outputs=Schema([ColSpec("double", "probability"), ColSpec("string", "label"), ColSpec("double", "threshold")]),
)


class RequestError(MlflowException):
    """A bad request row; the scoring server answers it with HTTP 400 and this message."""

    def __init__(self, message: str):
        super().__init__(message, error_code=INVALID_PARAMETER_VALUE)


def encode_file(path: str | Path) -> str:
    """Base64 text of a file, the served model's input format."""
    return base64.b64encode(Path(path).read_bytes()).decode("ascii")


def decode_request_rows(values: list, image_size: int, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """(N, S, S, 1) uint8 from base64 strings; the first bad row raises RequestError naming it."""
    batch = []
    for row, value in enumerate(values):
        if not isinstance(value, str) or not value.strip():
            raise RequestError(f"row {row}: empty or non-string value in column '{INPUT_COLUMN}'")
        try:
            data = base64.b64decode(value.strip(), validate=True)
        except (binascii.Error, ValueError) as exc:
            raise RequestError(f"row {row}: invalid base64 ({exc})") from None
        try:
            batch.append(decode_image(data, image_size, max_pixels=max_pixels))
        except ImageDecodeError as exc:
            raise RequestError(f"row {row}: {exc}") from None
    return np.stack(batch) if batch else np.zeros((0, image_size, image_size, 1), np.uint8)


class CxrPneumoniaModel(PythonModel):
    """Keras convnet + the validation-chosen threshold, behind the pyfunc interface."""

    def load_context(self, context) -> None:
        import keras

        import cxr_model.model  # noqa: F401  (registers the custom layer before loading)

        self.meta = json.loads(Path(context.artifacts["meta"]).read_text())
        self.model = keras.models.load_model(context.artifacts["keras_model"], compile=False)
        self.threshold = float(self.meta["threshold"])
        self.image_size = int(self.meta["image_size"])

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        if not isinstance(model_input, pd.DataFrame) or INPUT_COLUMN not in model_input.columns:
            found = list(model_input.columns) if isinstance(model_input, pd.DataFrame) else type(model_input)
            raise RequestError(f"expected one column named '{INPUT_COLUMN}' of base64 image files; got {found}")
        images = decode_request_rows(model_input[INPUT_COLUMN].tolist(), self.image_size)
        from cxr_model.train import predict_proba

        prob = predict_proba(self.model, images).astype("float64")
        return pd.DataFrame({
            "probability": prob,
            "label": np.where(prob >= self.threshold, LABELS[1], LABELS[0]),
            "threshold": np.full(len(prob), self.threshold),
        })
