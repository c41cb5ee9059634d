"""`cxr predict PATH...`: pneumonia probabilities for X-ray files, in-process from a model URI or from a server.

Both ways send the served model's input (base64 image files) and read its output, so a file gets the same
answer from either. A file the model rejects is reported in the `error` column and the rest of its batch
is sent again without it. MLflow, pandas and TensorFlow are imported inside the command so `cxr --help`
stays fast.
"""

from __future__ import annotations

import argparse
import base64
import http.client
import json
import sys
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable
from pathlib import Path

DEFAULT_MODEL_URI = "models:/cxr-pneumonia@champion"
IMAGE_SUFFIXES = {".jpeg", ".jpg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"}
COLUMNS = ["path", "probability", "label", "threshold", "error"]
NOT_SCORED = "not scored: "  # the error of a file left unscored because the model or server failed

# base64 image files in, one {"probability", "label", "threshold"} dict per file out
Predictor = Callable[[list[str]], list[dict]]


class BadRows(Exception):
    """The model rejected some rows of a batch; `errors` holds {"row", "error"} for each."""

    def __init__(self, message: str, errors: list[dict]):
        super().__init__(message)
        self.errors = errors


class PredictError(Exception):
    """The model or server could not be used at all (unreachable, not found, a request it rejects whole)."""


def find_images(paths: Iterable[Path]) -> list[Path]:
    """Files as given, plus image files (by suffix) found under folders, in sorted order."""
    found: list[Path] = []
    for path in paths:
        if path.is_dir():
            found += sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        elif path.is_file():
            found.append(path)
        else:
            raise FileNotFoundError(f"no such file or folder: {path}")
    return found


def invocations_url(url: str) -> str:
    """The scoring endpoint for a server address given with or without `/invocations`."""
    url = url.rstrip("/")
    return url if url.endswith("/invocations") else f"{url}/invocations"


def http_predictor(url: str, timeout: float = 120.0) -> Predictor:
    """Predict through a running `mlflow models serve`, one POST per batch."""
    endpoint = invocations_url(url)

    def predict(images: list[str]) -> list[dict]:
        body = json.dumps({"dataframe_split": {"columns": ["image"], "data": [[image] for image in images]}})
        request = urllib.request.Request(endpoint, data=body.encode(), headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return json.loads(response.read())["predictions"]
        except urllib.error.HTTPError as exc:
            text = exc.read().decode(errors="replace")
            try:
                answer = json.loads(text)
            except json.JSONDecodeError:
                answer = {"message": text[:500]}
            if answer.get("errors"):
                raise BadRows(answer.get("message", ""), answer["errors"]) from None
            raise PredictError(f"{endpoint} answered HTTP {exc.code}: {answer.get('message', text[:500])}") from None
        except urllib.error.URLError as exc:
            raise PredictError(f"cannot reach {endpoint}: {exc.reason}") from None
        except (OSError, http.client.HTTPException, ValueError) as exc:  # a timeout, a dropped or garbled answer
            raise PredictError(f"{endpoint} did not answer in full: {exc!r}") from None

    return predict


def check_local_store(uri: str) -> None:
    """PredictError for a SQLite run store whose file does not exist: MLflow would create an empty one (a stray
    mlflow.db in the current folder) and then fail to find the model."""
    if not uri.startswith("sqlite:///"):
        return
    path = Path(uri.removeprefix("sqlite:///").split("?")[0])
    if str(path) != ":memory:" and not path.is_file():
        raise PredictError(f"no run store at {path.resolve()} (MLFLOW_TRACKING_URI={uri}): run this where `cxr "
                           "train` ran, or point MLFLOW_TRACKING_URI at its store; nothing was created")


def local_predictor(model_uri: str) -> Predictor:
    """Predict in this process with the pyfunc model at `model_uri` (MLFLOW_TRACKING_URI picks the registry)."""
    import mlflow
    import pandas as pd
    from mlflow.exceptions import MlflowException

    from cxr_model.errors import ServerError
    from cxr_model.serving import INPUT_COLUMN
    from cxr_pneumonia.checks import check_tracking_server

    if model_uri.startswith(("models:/", "runs:/")):
        try:  # a store that is not there, or a server that does not answer: one clear line now
            for uri in {mlflow.get_tracking_uri(), mlflow.get_registry_uri()}:
                check_local_store(uri)
                check_tracking_server(uri)
        except ServerError as exc:
            raise PredictError(f"cannot load {model_uri}: {exc}") from None
    try:
        model = mlflow.pyfunc.load_model(model_uri)
    except MlflowException as exc:
        raise PredictError(f"cannot load {model_uri} from {mlflow.get_tracking_uri()}: {exc.message}") from None

    def predict(images: list[str]) -> list[dict]:
        try:
            return model.predict(pd.DataFrame({INPUT_COLUMN: images})).to_dict("records")
        except MlflowException as exc:  # the wrapper's RequestError (whichever copy of its code MLflow loaded)
            errors = exc.json_kwargs.get("errors", [])
            if not errors:
                raise PredictError(exc.message) from None
            raise BadRows(exc.message, errors) from None

    return predict


def score_files(files: list[Path], predict: Predictor, batch_size: int = 16) -> list[dict]:
    """One row per file (COLUMNS); a file that cannot be read or decoded gets an error instead of a score.

    If the model or server fails for a whole batch (PredictError), the files scored so far keep their scores and
    that batch and every later file get the error, `not scored: <why>`; nothing already scored is lost.
    """
    if batch_size < 1:
        raise PredictError(f"--batch-size must be at least 1, not {batch_size}")
    rows: dict[int, dict] = {}
    try:
        _score_batches(files, predict, batch_size, rows)
    except PredictError as exc:
        for i in range(len(files)):
            rows.setdefault(i, {"error": f"{NOT_SCORED}{exc}"})
    return [{**dict.fromkeys(COLUMNS), **rows[i], "path": str(path)} for i, path in enumerate(files)]


def _score_batches(files: list[Path], predict: Predictor, batch_size: int, rows: dict[int, dict]) -> None:
    for start in range(0, len(files), batch_size):
        pending: list[tuple[int, str]] = []  # (index into files, base64 file)
        for i in range(start, min(start + batch_size, len(files))):
            try:
                data = files[i].read_bytes()
            except OSError as exc:
                rows[i] = {"error": f"cannot read file ({exc.strerror or exc})"}
                continue
            if not data:
                rows[i] = {"error": "empty file (0 bytes)"}
                continue
            pending.append((i, base64.b64encode(data).decode("ascii")))
        while pending:
            try:
                answers = predict([image for _, image in pending])
            except BadRows as exc:
                # The model scores a batch whole or not at all: note the bad files, send the rest again.
                bad = {e["row"]: e["error"] for e in exc.errors if 0 <= e.get("row", -1) < len(pending)}
                if not bad:  # nothing to drop: resending would loop
                    raise PredictError(str(exc)) from None
                for row, (i, _) in enumerate(pending):
                    if row in bad:
                        rows[i] = {"error": bad[row]}
                pending = [item for row, item in enumerate(pending) if row not in bad]
                continue
            for (i, _), answer in zip(pending, answers, strict=True):
                rows[i] = answer
            pending = []


def format_table(rows: list[dict]) -> str:
    """A plain-text table: paths and labels left-aligned, numbers right-aligned, errors last."""
    columns = COLUMNS if any(row["error"] for row in rows) else COLUMNS[:-1]

    def cell(row: dict, column: str) -> str:
        value = row[column]
        return "" if value is None else f"{value:.4f}" if isinstance(value, float) else str(value)

    cells = [[cell(row, c) for c in columns] for row in rows]
    widths = [max([len(c)] + [len(line[k]) for line in cells]) for k, c in enumerate(columns)]
    numeric = {"probability", "threshold"}

    def line(values: list[str]) -> str:
        padded = (v.rjust(w) if c in numeric else v.ljust(w) for c, v, w in zip(columns, values, widths, strict=True))
        return "  ".join(padded).rstrip()

    return "\n".join([line(list(columns)), *(line(values) for values in cells)])


def write_csv(rows: list[dict], target: str) -> None:
    """Predictions as CSV to a file, or to stdout for '-'."""
    import pandas as pd

    table = pd.DataFrame(rows, columns=COLUMNS)
    if target == "-":
        table.to_csv(sys.stdout, index=False)
    else:
        table.to_csv(target, index=False)


def check_csv_target(target: str | None) -> None:
    """PredictError unless `--csv` names stdout ('-') or a file that can be created in an existing folder."""
    if target is None or target == "-":
        return
    path = Path(target)
    if path.is_dir():
        raise PredictError(f"--csv {target} is a folder; name a file")
    if not path.parent.is_dir():
        raise PredictError(f"--csv {target}: folder {path.parent} does not exist")


def run(args: argparse.Namespace) -> int:
    """Score the files; 0 if every file got a prediction, 1 if some failed (or the CSV could not be written), 2
    if nothing could be scored.

    When the server or model fails partway, what was scored is still printed and written, the rest marked. The
    table is printed before the CSV is written, so a CSV that cannot be written loses no score.
    """
    try:
        check_csv_target(args.csv)  # before the scoring, not after it
        files = find_images(args.paths)
        if not files:
            raise PredictError(f"no image files ({', '.join(sorted(IMAGE_SUFFIXES))}) under {args.paths}")
        if args.batch_size < 1:
            raise PredictError(f"--batch-size must be at least 1, not {args.batch_size}")
        predict = http_predictor(args.url, args.timeout) if args.url else local_predictor(args.model_uri)
        rows = score_files(files, predict, args.batch_size)
    except (PredictError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if all(str(row["error"]).startswith(NOT_SCORED) for row in rows):  # the model or server failed before any score
        print(f"error: {rows[0]['error'].removeprefix(NOT_SCORED)}", file=sys.stderr)
        return 2
    if args.csv != "-":
        print(format_table(rows))
    written = True
    if args.csv:
        try:
            write_csv(rows, args.csv)
        except OSError as exc:
            print(f"error: cannot write --csv {args.csv} ({exc}); the predictions are in the table above",
                  file=sys.stderr)
            written = False
    failed = sum(row["error"] is not None for row in rows)
    if failed:
        print(f"{failed} of {len(rows)} files could not be scored (see the error column)", file=sys.stderr)
    return 1 if failed or not written else 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "predict", help="predict pneumonia probability for X-ray files or folders",
        description="Pneumonia probability, label and threshold for each X-ray image (JPEG, PNG, ...), "
                    "from a registered model in this process or from a running `mlflow models serve`.",
    )
    p.add_argument("paths", nargs="+", type=Path, help="image files, or folders searched recursively")
    source = p.add_mutually_exclusive_group()
    source.add_argument("--model-uri", "--model", dest="model_uri", default=DEFAULT_MODEL_URI,
                        help="MLflow model to load in-process (default: %(default)s; MLFLOW_TRACKING_URI picks "
                             "the registry)")
    source.add_argument("--url", help="server to send the images to instead, e.g. http://127.0.0.1:5000")
    p.add_argument("--csv", metavar="FILE", help="also write the predictions as CSV ('-': CSV to stdout only)")
    p.add_argument("--batch-size", type=int, default=16, help="images per request (default: %(default)s)")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds per HTTP request (default: %(default)s)")
    p.set_defaults(func=run)
