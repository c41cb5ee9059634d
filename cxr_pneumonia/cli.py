"""`cxr` command line: `cxr train` runs the training flow, `cxr search-worker` a distributed search's worker, `cxr
adapt` registers a version adapted to a site's unlabeled films, `cxr predict` scores X-ray files.

The `cxr train` flags are derived from TrainConfig's fields (name, type, range, description), so a setting is
declared once. Heavy imports (TensorFlow, MLflow, Prefect) happen inside the commands so `cxr --help` stays fast.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import types
from pathlib import Path
from typing import Literal, Union, get_args, get_origin

from pydantic import ValidationError

from cxr_model.config import PROFILES, TrainConfig
from cxr_model.distributed import WORKER_WAIT_MINUTES, SearchFault
from cxr_model.errors import ConfigError, CxrError

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"  # the documented run store, whatever MLflow's own default is
TRAIN_ONLY_ARGS = ("func", "command", "profile", "result_json")  # `cxr train` arguments that are not config fields


def flag(field: str) -> str:
    return "--" + field.replace("_", "-")


def field_argument(name: str) -> dict:
    """`add_argument` keywords for one TrainConfig field: its type, choices or arity, and its description.

    Every default is None, so a flag left out leaves the field to the profile.
    """
    info = TrainConfig.model_fields[name]
    annotation = info.annotation
    if get_origin(annotation) in (Union, types.UnionType):  # X | None
        annotation = next(a for a in get_args(annotation) if a is not type(None))
    kwargs: dict = dict(default=None, help=info.description)
    if annotation is bool:
        return {**kwargs, "action": argparse.BooleanOptionalAction}
    if get_origin(annotation) is Literal:
        return {**kwargs, "choices": list(get_args(annotation))}
    if get_origin(annotation) is tuple:
        items = get_args(annotation)
        if len(items) == 2 and items[1] is Ellipsis:
            return {**kwargs, "type": items[0], "nargs": "+", "metavar": "N"}
        return {**kwargs, "type": items[0], "nargs": len(items), "metavar": ("MIN", "MAX")[: len(items)]}
    return {**kwargs, "type": annotation}


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="run the training flow (load, visualize, tune, train, evaluate, register)",
                       description="Run the whole training flow. Each flag overrides one field of the profile; "
                                   "docs/configuration.md lists them with their profiles' values.")
    p.add_argument("--profile", choices=sorted(PROFILES), default="default", help="preset (default: %(default)s)")
    for name in TrainConfig.model_fields:
        if name != "profile":
            p.add_argument(flag(name), dest=name, **field_argument(name))
    p.add_argument("--result-json", type=Path, help="also write the run summary (run id, test metrics, version) here")
    p.set_defaults(func=_train)


def train_overrides(args: argparse.Namespace) -> dict:
    """The `cxr train` arguments that are TrainConfig fields (None = not given, the profile decides)."""
    return {k: v for k, v in vars(args).items() if k not in TRAIN_ONLY_ARGS}


def print_validation_error(exc: ValidationError) -> None:
    """One line per bad setting, named as its flag."""
    for error in exc.errors():
        where = flag("-".join(map(str, error["loc"]))) if error["loc"] else "settings"
        print(f"error: {where}: {error['msg']}", file=sys.stderr)


def _train(args: argparse.Namespace) -> int:
    from cxr_model.config import load_config

    try:
        cfg = load_config(args.profile, **train_overrides(args))
    except ValidationError as exc:  # a value out of range, or settings that contradict each other
        print_validation_error(exc)
        return 2
    # fail before any server starts or any image is decoded: the data, the tracking server, the result path
    from cxr_model.data import check_layout
    from cxr_pneumonia.checks import check_prefect_server, check_search_role, check_tracking_server

    check_layout(cfg.resolved_data_dir())  # train/ and test/, NORMAL/ and PNEUMONIA/ in each; no image read
    check_tracking_server(os.environ.get("MLFLOW_TRACKING_URI", ""))
    check_prefect_server()
    check_search_role(cfg.tuner)
    if args.result_json and not args.result_json.parent.is_dir():
        raise ConfigError(f"--result-json: folder {args.result_json.parent} does not exist")

    from cxr_pneumonia.flows.train_flow import train_flow

    result = train_flow(cfg)
    text = json.dumps(result, indent=2, default=str)
    print(text)
    if args.result_json:
        args.result_json.write_text(text)
    _print_runs_view(cfg.experiment_name)
    return 0


def _print_runs_view(experiment: str) -> None:
    """Where to see the run: MLflow 3's UI opens on a GenAI overview unless the address asks for the runs."""
    from cxr_pneumonia.ui_link import runs_line

    try:
        line = runs_line(os.environ.get("MLFLOW_TRACKING_URI", DEFAULT_TRACKING_URI), experiment)
    except Exception as exc:  # the run is done and registered; a link is not worth failing it for
        line = f"(could not look up the experiment's address: {type(exc).__name__})"
    print(f"{line}  (`make ui` serves a local store)")


def _add_search_worker(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "search-worker", help="run trials of a distributed search for a `cxr train` chief",
        description="Ask the chief's Keras-Tuner oracle for trials and train them until it has no more. Set "
                    "KERASTUNER_TUNER_ID (a name per worker, e.g. tuner0), KERASTUNER_ORACLE_IP (the chief's "
                    "address) and KERASTUNER_ORACLE_PORT, and the chief's MLFLOW_TRACKING_URI: the settings come "
                    "from the chief's run, and each trial is logged as a nested run of it.")
    for name in ("data_dir", "work_dir", "threads"):  # this machine's; every other setting is the chief's
        p.add_argument(flag(name), dest=name, **field_argument(name))
    p.add_argument("--run-id", help="the chief's MLflow run (default: the running flow that serves on the port)")
    p.add_argument("--wait-minutes", type=float, default=WORKER_WAIT_MINUTES,
                   help="how long to wait for the chief's run to start serving (default: %(default)s)")
    p.set_defaults(func=_search_worker)


def _search_worker(args: argparse.Namespace) -> int:
    from cxr_model.distributed import worker_role
    from cxr_pneumonia.checks import check_tracking_server

    worker_role()  # the settings, before TensorFlow loads
    check_tracking_server(os.environ.get("MLFLOW_TRACKING_URI", ""))
    from cxr_pneumonia.flows.search_worker_flow import search_worker_flow

    result = search_worker_flow(args.data_dir, args.work_dir, args.threads, args.run_id, args.wait_minutes * 60)
    print(json.dumps(result))
    return 0


def _add_adapt(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "adapt", help="register a version of a model adapted to a site's unlabeled films",
        description="Adapt a registered version to the films of one site (any folder layout, size or mode; labels, "
                    "folder and file names are never read) and register the result as a new version "
                    "(docs/adaptation.md). The training data is not needed.")
    p.add_argument("--model", required=True, help="models:/NAME/VERSION or models:/NAME@ALIAS")
    p.add_argument("--images", type=Path, required=True, help="folder of the site's unlabeled films")
    p.add_argument("--name", help="registered model name of the adapted version (default: the parent's)")
    p.add_argument("--alias", help="alias to give the adapted version (default: none)")
    from cxr_model.adapt import DEFAULT_SETTINGS

    for component, what in (("calibration", "the calibration stored at training"),
                            ("batchnorm", "BatchNorm statistics re-estimated on the films (AdaBN)"),
                            ("prior", "the site's class prior estimated by EM and the threshold moved by it")):
        p.add_argument(f"--{component}", action=argparse.BooleanOptionalAction,
                       default=getattr(DEFAULT_SETTINGS, component), help=f"apply {what} (default: %(default)s)")
    for name in ("work_dir", "threads"):
        p.add_argument(flag(name), dest=name, **field_argument(name))
    p.set_defaults(func=_adapt)


def _adapt(args: argparse.Namespace) -> int:
    from cxr_model.adapt import AdaptSettings
    from cxr_pneumonia.checks import check_tracking_server
    from cxr_pneumonia.predict import PredictError, check_local_store

    uri = os.environ.get("MLFLOW_TRACKING_URI", "")
    try:  # the registry first: a missing SQLite store would be created empty
        check_local_store(uri)
    except PredictError as exc:
        raise ConfigError(str(exc)) from None
    check_tracking_server(uri)
    if not args.images.is_dir():
        raise ConfigError(f"--images: {args.images} is not a folder")
    from cxr_pneumonia.flows.adapt_flow import adapt_flow

    settings = AdaptSettings(calibration=args.calibration, batchnorm=args.batchnorm, prior=args.prior)
    result = adapt_flow(args.model, args.images, args.name, args.alias, settings, args.work_dir, args.threads)
    if result.get("refused"):
        print(f"error: {result['refused']}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    from cxr_pneumonia import predict

    parser = argparse.ArgumentParser(prog="cxr", description="Pneumonia detection on chest X-rays, tracked in MLflow.")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_train(sub)
    _add_search_worker(sub)
    _add_adapt(sub)
    predict.add_parser(sub)
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
    except CxrError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except SearchFault as exc:  # a distributed search that cannot finish: one line, not a traceback to read
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
