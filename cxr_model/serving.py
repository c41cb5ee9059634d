"""What the served model does, without MLflow: base64 image files in, probability, label and threshold out.

A request is one string column `image`, one base64-encoded image file per row (JPEG, PNG or anything
Pillow reads, any size and mode); each row is decoded by `decode_image`, the decoder training uses, and a blank
frame or a colour image is refused (`check_not_blank`, `check_not_colour`). A batch is scored whole or not at
all: if any row is bad, `BadRequest` names every bad row and its problem, and the good rows are not scored (send
them again without the bad ones; its `errors` list gives the bad row numbers, 0-based). The MLflow pyfunc
wrapper (`cxr_pneumonia.pyfunc`) turns `BadRequest` into HTTP 400.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Sequence
from pathlib import Path

import keras
import numpy as np
import pandas as pd

import cxr_model.layers  # noqa: F401  (registers the model's own layers before loading)
from cxr_model.evaluate import called_pneumonia
from cxr_model.inference import compile_forward
from cxr_model.preprocess import MAX_PIXELS, decode_image_and_colour

INPUT_COLUMN = "image"
OUTPUT_COLUMNS = ("probability", "label", "threshold")
LABELS = ("NORMAL", "PNEUMONIA")
MAX_ERRORS_IN_MESSAGE = 5  # the message stays short; the `errors` list has every bad row

_DATA_URL = re.compile(r"^data:[\w.+-]+/[\w.+-]+;base64,")
_WHITESPACE = re.compile(r"\s+")


class BadRequest(ValueError):
    """A request that cannot be scored: a one-line `message`, and `errors` ({"row", "error"}) for each bad row
    (empty when the whole request is bad, e.g. no `image` column)."""

    def __init__(self, message: str, errors: list[dict] | None = None):
        super().__init__(message)
        self.message, self.errors = message, list(errors or [])


def encode_file(path: str | Path) -> str:
    """Base64 text of a file, the served model's input format."""
    return base64.b64encode(Path(path).read_bytes()).decode("ascii")


def decode_base64(value: object) -> bytes:
    """Bytes from one request cell; ValueError with a readable reason for anything but base64 text."""
    if not isinstance(value, str):
        missing = pd.api.types.is_scalar(value) and pd.isna(value)  # None, NaN or pd.NA
        raise ValueError(f"expected a base64 string, got {'a missing value' if missing else type(value).__name__}")
    # Accept what tools emit: `base64` wraps lines at 76 characters, browsers send data: URLs.
    text = _WHITESPACE.sub("", _DATA_URL.sub("", value, count=1))
    if not text:
        raise ValueError("empty string")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ValueError(f"invalid base64 ({exc})") from None


# The least spread of grey levels a served image must have (sd, 0..255 scale, at the model's input size). Over the
# 5,808 training and test films at 96 px the smallest is 19 (median 56). Under it the frame is blank (a detector
# fault, a saturated export), which the network would still answer for: a flat grey square scores PNEUMONIA 1.00.
MIN_GREY_SD = 2.0


def adapted_probability(p, scale: float, offset: float) -> np.ndarray:
    """sigmoid(scale * logit(p) + offset): the probability a version registered by `cxr adapt` answers, from its
    network's score `p` (the calibration's temperature and bias and the site's prior shift, `cxr_model.adapt`)."""
    p = np.clip(np.asarray(p, dtype=np.float64), 1e-7, 1 - 1e-7)
    return 1 / (1 + np.exp(-(scale * np.log(p / (1 - p)) + offset)))


def check_not_blank(image: np.ndarray) -> None:
    """ValueError for a decoded image whose grey levels hardly vary (`MIN_GREY_SD`): nothing there to score."""
    sd = float(np.std(image))
    if sd < MIN_GREY_SD:
        raise ValueError(f"blank image: its grey levels vary by sd {sd:.1f} of 255 (a chest film: 19 or more), "
                         "so it was not scored")


# The largest share of coloured pixels (`coloured_share`) a served image may have. A chest film is grey (every one
# of the dataset's 5,840: 0); a red arrow or a coloured ruler on an export covers a few percent; a colour photograph
# (matplotlib's sample portrait: 51 %) is no film, and the network would still give it a score.
MAX_COLOURED_SHARE = 0.10


def check_not_colour(share: float) -> None:
    """ValueError for an image that is mostly colour (`MAX_COLOURED_SHARE`): not a radiograph."""
    if share > MAX_COLOURED_SHARE:
        raise ValueError(f"colour image: {share:.0%} of its pixels are coloured (a chest film is grey; annotations may "
                         f"colour up to {MAX_COLOURED_SHARE:.0%}), so it was not scored")


def decode_request_rows(values: Sequence, image_size: int, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """(N, S, S, 1) uint8 from base64 image files; BadRequest naming every bad row if any is bad (a file that is
    not a decodable image, a colour one: `check_not_colour`, or a blank one: `check_not_blank`)."""
    batch, errors = [], []
    for row, value in enumerate(values):
        try:
            image, colour = decode_image_and_colour(decode_base64(value), image_size, max_pixels=max_pixels)
            check_not_colour(colour)
            check_not_blank(image)
            batch.append(image)
        except ValueError as exc:  # ImageDecodeError is one
            errors.append({"row": row, "error": str(exc)})
    if errors:
        listed = "; ".join(f"row {e['row']}: {e['error']}" for e in errors[:MAX_ERRORS_IN_MESSAGE])
        more = f"; and {len(errors) - MAX_ERRORS_IN_MESSAGE} more" if len(errors) > MAX_ERRORS_IN_MESSAGE else ""
        raise BadRequest(
            f"{len(errors)} of {len(values)} rows could not be read as images, so no row was scored: {listed}{more}",
            errors=errors,
        )
    return np.stack(batch) if batch else np.zeros((0, image_size, image_size, 1), np.uint8)  # (N, S, S, 1)


class ServedClassifier:
    """The Keras model with the validation-chosen threshold and test-time views, scoring request rows."""

    logit_scale, logit_offset = 1.0, 0.0  # an unadapted version's probability is its network's score

    def __init__(self, model_path: str | Path, threshold: float, image_size: int,
                 views: Sequence[Sequence[float]] = ((1.0, 1.0),), logit_scale: float = 1.0,
                 logit_offset: float = 0.0):
        self.threshold, self.image_size = float(threshold), int(image_size)
        self.views = tuple((float(s), float(r)) for s, r in views)
        # a version registered by `cxr adapt` answers sigmoid(scale * logit(score) + offset) (cxr_model.adapt)
        self.logit_scale, self.logit_offset = float(logit_scale), float(logit_offset)
        self.model = keras.models.load_model(model_path, compile=False)
        self.forward = compile_forward(self.model, views=self.views)
        self.forward(np.zeros((1, self.image_size, self.image_size, 1), np.uint8))  # trace now, not on request 1

    @classmethod
    def from_meta(cls, model_path: str | Path, meta: dict) -> ServedClassifier:
        """From the `meta.json` registered with the model (models from before views were recorded: one view)."""
        adaptation = meta.get("adaptation") or {}
        return cls(model_path, meta["threshold"], meta["image_size"], meta.get("views", [[1.0, 1.0]]),
                   adaptation.get("logit_scale", 1.0), adaptation.get("logit_offset", 0.0))

    def predict(self, frame: pd.DataFrame) -> pd.DataFrame:
        """Probability, label and threshold per row of base64 image files in column `image`; BadRequest if any
        row (or the column) is bad."""
        if not isinstance(frame, pd.DataFrame) or INPUT_COLUMN not in frame.columns:
            # MLflow drops columns the signature lacks before `predict`, so over HTTP there is nothing to list
            found = list(frame.columns) if isinstance(frame, pd.DataFrame) else []
            raise BadRequest(
                f"the request has no column '{INPUT_COLUMN}'{f' (got {found})' if found else ''}: send one string "
                f"column named '{INPUT_COLUMN}' holding a base64-encoded image file per row (other columns are ignored)"
            )
        images = decode_request_rows(frame[INPUT_COLUMN].tolist(), self.image_size)
        prob = self.forward(images).astype("float64")
        if (self.logit_scale, self.logit_offset) != (1.0, 0.0):
            prob = adapted_probability(prob, self.logit_scale, self.logit_offset)
        return pd.DataFrame({
            "probability": prob,
            "label": np.where(called_pneumonia(prob, self.threshold), LABELS[1], LABELS[0]),
            "threshold": np.full(len(prob), self.threshold),
        })
