"""The served model behind MLflow's pyfunc interface: `cxr_model.serving.ServedClassifier`, with bad requests
answered as HTTP 400.

Registered as MLflow "models from code" (`served_model.py` beside this file), so the model version holds this
code rather than a pickled object.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.pyfunc import PythonModel

from cxr_model.serving import BadRequest, ServedClassifier


class RequestError(MlflowException):
    """A bad request: HTTP 400 with a short message naming each bad row, and the rows as JSON `errors`."""

    def __init__(self, message: str, errors: list[dict] | None = None):
        super().__init__(message, error_code=INVALID_PARAMETER_VALUE, **({"errors": errors} if errors else {}))

    @property
    def message(self) -> str:
        return self._message

    @message.setter
    def message(self, value: str) -> None:
        # The scoring server rewrites the message to "Failed to predict data '<the request>'. Error: ...", which
        # buries the reason under the request's base64 text; clients get the message this error was raised with.
        if not hasattr(self, "_message"):
            self._message = value

    @property
    def errors(self) -> list[dict]:
        """[{"row": 0-based row, "error": reason}] for each bad row; empty when the whole request is bad."""
        return self.json_kwargs.get("errors", [])


class CxrPneumoniaModel(PythonModel):
    """Keras convnet + the validation-chosen threshold, behind the pyfunc interface."""

    def load_context(self, context) -> None:
        meta = json.loads(Path(context.artifacts["meta"]).read_text())
        self.classifier = ServedClassifier.from_meta(context.artifacts["keras_model"], meta)
        self.threshold, self.image_size = self.classifier.threshold, self.classifier.image_size

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        """Probability, label and threshold per row of base64 image files in column `image`."""
        try:
            return self.classifier.predict(model_input)
        except BadRequest as exc:
            raise RequestError(exc.message, exc.errors) from None
