"""`cxr` command line: `cxr train` runs the flow, `cxr predict` scores X-ray files.

Heavy imports (TensorFlow, MLflow, Prefect) happen inside the commands so `cxr --help` stays fast.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import get_args

from pydantic import ValidationError

from cxr_model.config import AUGMENTATION_FIELDS, PROFILES, THRESHOLD_RULES, TTA_VIEWS, DataConfigError, TrainConfig
from cxr_model.distributed import SearchFault

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"  # the documented run store, whatever MLflow's own default is


def _choices(field: str) -> tuple[str, ...]:
    """The values a `Literal` field of TrainConfig allows, so a flag offers what the config accepts."""
    return get_args(TrainConfig.model_fields[field].annotation)


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="run the training flow (load, visualize, tune, train, evaluate, register)")
    p.add_argument("--profile", choices=sorted(PROFILES), default="default", help="preset (default: %(default)s)")
    p.add_argument("--data-dir", type=Path, help="dataset folder with train/ and test/ (or set CXR_DATA_DIR)")
    p.add_argument("--work-dir", type=Path, help="cache, tuner state and outputs (or set CXR_WORK_DIR; default ./work)")
    p.add_argument("--image-size", type=int)
    p.add_argument("--val-fraction", type=float)
    p.add_argument("--max-per-class", type=int, help="cap images per split and class")
    p.add_argument("--seed", type=int)
    p.add_argument("--tuner", choices=["random", "bayesian", "hyperband"])
    p.add_argument("--max-trials", type=int)
    p.add_argument("--search-epochs", type=int)
    p.add_argument("--search-fraction", type=float)
    p.add_argument("--resume", action="store_true", default=None, help="continue the saved search state")
    p.add_argument("--search-worker-timeout", type=float, metavar="SECONDS",
                   help="distributed search: drop a worker silent this long and hand its trial to another (120)")
    # the search space: ranges (MIN MAX) or choices (N ...) of cxr_model.search.SearchSpace
    p.add_argument("--search-blocks", type=int, nargs=2, metavar=("MIN", "MAX"), help="conv blocks")
    p.add_argument("--search-filters", type=int, nargs="+", metavar="N", help="filters of the first block")
    p.add_argument("--search-convs-per-block", type=int, nargs=2, metavar=("MIN", "MAX"))
    p.add_argument("--search-dropout", type=float, nargs=2, metavar=("MIN", "MAX"))
    p.add_argument("--search-dense-units", type=int, nargs="+", metavar="N", help="hidden dense units (0: none)")
    p.add_argument("--search-learning-rate", type=float, nargs=2, metavar=("MIN", "MAX"), help="log-uniform")
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--patience", type=int)
    p.add_argument("--train-minutes", type=float,
                   help="wall-time budget of the final training in minutes, best epoch kept (0: none)")
    p.add_argument("--snapshots", type=int,
                   help="the model averages the predictions of this many best epochs by validation AUC (1: best only)")
    p.add_argument("--members", type=int,
                   help="train the chosen network this many times (seeds seed, seed+1, ...) and average them (1: one)")
    p.add_argument("--top-trials", type=int,
                   help="train the networks of this many best search trials (each --members times) and average "
                        "them all (1: the best only)")
    p.add_argument("--head", choices=_choices("head"),
                   help="classifier head: global average pooling, flatten, or average and max pooling side by side")
    p.add_argument("--block", choices=_choices("block"),
                   help="conv block: a chain of convs, the chain plus a shortcut from its input (ResNet), or a chain "
                        "of depthwise-separable convs (a 3x3 filter per channel, then a 1x1 mix)")
    p.add_argument("--antialias", choices=_choices("antialias"),
                   help="low-pass filter before downsampling (BlurPool): in a full-resolution stem, in every "
                        "max-pool, or both")
    p.add_argument("--intensity", choices=_choices("intensity"),
                   help="intensity normalisation: per image to zero mean and unit variance, per image by histogram "
                        "equalization, or 0..255 to -1..1 for every image alike")
    p.add_argument("--no-augment", dest="augment", action="store_false", default=None)
    for name in AUGMENTATION_FIELDS:
        p.add_argument(f"--{name}", type=float,
                       help=f"augmentation: {TrainConfig.model_fields[name].description} (0 = off)")
    p.add_argument("--label-smoothing", type=float)
    p.add_argument("--weight-decay", type=float, help="AdamW's decoupled weight decay of the kernels (0 = Adam)")
    p.add_argument("--ema", type=float, help="judge, keep and save a moving average of the weights with this "
                   "momentum per step, e.g. 0.99 (0 = off)")
    p.add_argument("--optimizer", choices=_choices("optimizer"),
                   help="adam, or SGD with Nesterov momentum 0.9 (give it ~10x Adam's --search-learning-rate)")
    p.add_argument("--schedule", choices=_choices("schedule"),
                   help="final training's learning rate: cut when validation AUC stalls, or a cosine down to 0 "
                        "over --epochs")
    p.add_argument("--mixup", type=float,
                   help="final training: blend image pairs by a Beta(a, a) weight, labels alike (0 = off)")
    p.add_argument("--class-weights", action=argparse.BooleanOptionalAction, default=None,
                   help="weight the loss against the class imbalance (default: off; --no-class-weights is the same)")
    p.add_argument("--balanced-sampling", action="store_true", default=None,
                   help="draw both classes with equal odds in training (instead of class weights)")
    p.add_argument("--threshold-rule", choices=THRESHOLD_RULES)
    p.add_argument("--tta", choices=list(TTA_VIEWS), help="test-time views averaged in evaluation and serving")
    p.add_argument("--experiment-name")
    p.add_argument("--model-name", help="registered model name (default cxr-pneumonia)")
    p.add_argument("--champion-metric", choices=_choices("champion_metric"),
                   help="validation metric a new version must beat to take the `champion` alias (default roc_auc)")
    p.add_argument("--threads", type=int, help="TensorFlow intra-op threads (default: all cores)")
    p.add_argument("--result-json", type=Path, help="also write the run summary (run id, test metrics, version) here")
    p.set_defaults(func=_train)


def train_overrides(args: argparse.Namespace) -> dict:
    """The `cxr train` arguments that are TrainConfig fields (None = not given, the profile decides)."""
    return {k: v for k, v in vars(args).items() if k not in ("func", "command", "profile", "result_json")}


def _train(args: argparse.Namespace) -> int:
    from cxr_model.config import load_config

    try:
        cfg = load_config(args.profile, **train_overrides(args))
    except ValidationError as exc:  # a value out of range, or settings that contradict each other
        for error in exc.errors():
            where = "--" + "-".join(map(str, error["loc"])).replace("_", "-") if error["loc"] else "settings"
            print(f"error: {where}: {error['msg']}", file=sys.stderr)
        return 2
    # fail before any server starts or any image is decoded: the data, the tracking server, the result path
    from cxr_model.data import check_layout

    check_layout(cfg.resolved_data_dir())  # train/ and test/, NORMAL/ and PNEUMONIA/ in each; no image read
    check_tracking_server(os.environ.get("MLFLOW_TRACKING_URI", ""))
    check_prefect_server()
    check_search_role(cfg.tuner)
    if args.result_json and not args.result_json.parent.is_dir():
        raise DataConfigError(f"--result-json: folder {args.result_json.parent} does not exist")

    from flows.train_flow import train_flow

    result = train_flow(cfg)
    text = json.dumps(result, indent=2, default=str)
    print(text)
    if args.result_json:
        args.result_json.write_text(text)
    return 0


class TrackingServerError(RuntimeError):
    """A server the run would depend on (MLflow tracking, the Prefect API) does not answer."""


def check_prefect_server(timeout: float = 10.0) -> None:
    """When a Prefect API is configured (PREFECT_API_URL, in the environment or the active Prefect profile), one
    request to its /health; any HTTP answer counts. Without one the flow starts a temporary server of its own."""
    url = os.environ.get("PREFECT_API_URL")
    if url is None:
        from prefect.settings import PREFECT_API_URL

        url = PREFECT_API_URL.value()
    if not url:
        return
    import requests

    try:
        requests.get(url.rstrip("/") + "/health", timeout=timeout).close()
    except requests.exceptions.RequestException as exc:
        raise TrackingServerError(f"Prefect API {url} does not answer ({_root_cause(exc)}). Start it (`prefect "
                                  "server start`), or unset PREFECT_API_URL to let the flow start a temporary "
                                  "server of its own.") from None


def check_tracking_server(uri: str, timeout: float = 10.0) -> None:
    """For an http(s) tracking URI, one request to the server's /health before hours of training depend on it.

    Any HTTP answer counts as reachable (an auth proxy may refuse /health); no answer at all is a clear error,
    and so is a TLS handshake that fails. TLS is checked as the MLflow client checks it
    (MLFLOW_TRACKING_SERVER_CERT_PATH, MLFLOW_TRACKING_INSECURE_TLS, MLFLOW_TRACKING_CLIENT_CERT_PATH).
    Local stores (sqlite, file, postgresql through a server) need no check here.
    """
    if not uri.startswith(("http://", "https://")):
        return
    import requests
    from mlflow.utils.credentials import get_default_host_creds

    creds = get_default_host_creds(uri)
    try:
        requests.get(uri.rstrip("/") + "/health", timeout=timeout, verify=creds.verify,
                     cert=creds.client_cert_path).close()
    except requests.exceptions.SSLError as exc:
        raise TrackingServerError(
            f"MLflow tracking server {uri}: the TLS handshake failed ({_root_cause(exc)}). For a private "
            "certificate authority, set MLFLOW_TRACKING_SERVER_CERT_PATH to its CA bundle (or "
            "MLFLOW_TRACKING_INSECURE_TLS=true to skip verification), as for the MLflow client.") from None
    except requests.exceptions.RequestException as exc:
        raise TrackingServerError(f"MLflow tracking server {uri} does not answer ({_root_cause(exc)}). Start it "
                                  "(see docker/), or point MLFLOW_TRACKING_URI at one that runs.") from None


def _root_cause(exc: BaseException) -> str:
    """The innermost reason of a requests/urllib3 error chain (its message, without the wrappers' retries)."""
    while exc.__cause__ is not None or (exc.args and isinstance(exc.args[0], BaseException)):
        exc = exc.__cause__ if exc.__cause__ is not None else exc.args[0]
    reason = getattr(exc, "reason", None)
    return str(reason if isinstance(reason, BaseException | str) else exc)


def check_search_role(tuner: str) -> None:
    """`cxr train` runs a search in its own process or as a distributed search's chief, never as a worker; a chief
    must be able to listen on its address, with a tuner that can run distributed. DataConfigError otherwise,
    before the flow starts."""
    from cxr_model.distributed import check_can_serve, flow_role

    role = flow_role(tuner)
    if role is not None:
        check_can_serve(role)


def _add_search_worker(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "search-worker", help="run trials of a distributed search for a `cxr train` chief",
        description="Ask the chief's Keras-Tuner oracle for trials and train them until it has no more. Set "
                    "KERASTUNER_TUNER_ID (a name per worker, e.g. tuner0), KERASTUNER_ORACLE_IP (the chief's "
                    "address) and KERASTUNER_ORACLE_PORT, and the chief's MLFLOW_TRACKING_URI: the settings come "
                    "from the chief's run, and each trial is logged as a nested run of it.")
    p.add_argument("--data-dir", type=Path, help="this machine's copy of the dataset (or set CXR_DATA_DIR)")
    p.add_argument("--work-dir", type=Path, help="decode cache and trial state (or set CXR_WORK_DIR; default ./work)")
    p.add_argument("--threads", type=int, help="TensorFlow intra-op threads (default: all cores)")
    p.add_argument("--run-id", help="the chief's MLflow run (default: the running flow that serves on the port)")
    p.add_argument("--wait-minutes", type=float, default=10.0,
                   help="how long to wait for the chief's run to start serving (default: %(default)s)")
    p.set_defaults(func=_search_worker)


def _search_worker(args: argparse.Namespace) -> int:
    from cxr_model.distributed import worker_role

    worker_role()  # the settings, before TensorFlow loads
    check_tracking_server(os.environ.get("MLFLOW_TRACKING_URI", ""))
    from tasks.search import search_worker

    result = search_worker(args.data_dir, args.work_dir, args.threads, args.run_id, args.wait_minutes * 60)
    print(json.dumps(result))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cxr", description="Pneumonia detection on chest X-rays, tracked in MLflow.")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_train(sub)
    _add_search_worker(sub)
    from cxr_model import predict_cli

    predict_cli.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # keep TensorFlow's C++ start-up chatter out of the CLI
    # Prefect's temporary server needs more than its default 20 s to migrate its database on 2 cores.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    # Its telemetry heartbeat races the flow for the temporary server's SQLite file ("database is locked").
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("MLFLOW_TRACKING_URI", DEFAULT_TRACKING_URI)
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (DataConfigError, TrackingServerError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except SearchFault as exc:  # a distributed search that cannot finish: one line, not a traceback to read
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
