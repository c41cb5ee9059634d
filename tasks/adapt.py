"""Adaptation tasks: adapt a registered version to a site's unlabeled films, then log and register the result."""

from __future__ import annotations

import json
import re
import shutil
import time
from pathlib import Path

import keras
import mlflow
import pandas as pd
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from prefect import task
from prefect.cache_policies import NONE
from pydantic import BaseModel

import cxr_model.layers  # noqa: F401  (registers the model's own layers for loading)
from cxr_model import plots
from cxr_model.adapt import AdaptError, AdaptSettings, Calibration, adapt, check_settings, read_site_folder
from cxr_model.inference import compile_forward
from cxr_model.serving import INPUT_COLUMN, encode_file
from cxr_pneumonia.tasks.packaging import log_served_model
from cxr_pneumonia.tasks.tracking import IO_RETRIES, retry_on_io

_MODEL_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:/(?P<version>\d+)|@(?P<alias>[\w-]+))$")


class Parent(BaseModel):
    name: str
    version: str
    run_id: str
    local_dir: str  # the downloaded artifacts: model.keras and meta.json


class AdaptedModel(BaseModel):
    """An adaptation done in memory and saved to disk, ready to register (or a refusal)."""

    refused: str | None = None
    model_path: str = ""
    meta_path: str = ""
    example_file: str = ""
    record: dict = {}
    digest: str = ""
    seconds: float = 0.0
    skipped: list[tuple[str, str]] = []


NOT_IN_REGISTRY = ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE")  # MLflow's codes for an unknown name/version


def resolve_version(model_uri: str) -> tuple[str, str]:
    """(name, version) of `models:/NAME/VERSION` or `models:/NAME@ALIAS`; AdaptError for another URI or a version
    the registry does not hold (a server's failure is raised as it is)."""
    match = _MODEL_URI.match(model_uri)
    if not match:
        raise AdaptError(f"--model: expected models:/NAME/VERSION or models:/NAME@ALIAS, got {model_uri!r}")
    name = match["name"]
    try:
        version = match["version"] or MlflowClient().get_model_version_by_alias(name, match["alias"]).version
        MlflowClient().get_model_version(name, version)
    except MlflowException as exc:
        if exc.error_code not in NOT_IN_REGISTRY:
            raise  # the server's failure, not the user's: load-parent retries it
        raise AdaptError(f"--model: {model_uri} is not in the registry at {mlflow.get_tracking_uri()} "
                         f"({exc.message.splitlines()[0]})") from None
    return name, str(version)


@task(name="load-parent", cache_policy=NONE, retries=IO_RETRIES, retry_delay_seconds=5,
      retry_condition_fn=retry_on_io)
def load_parent(model_uri: str, work_dir: Path) -> Parent:
    """Download the version's Keras model and meta.json."""
    name, version = resolve_version(model_uri)
    mv = MlflowClient().get_model_version(name, version)
    dest = work_dir / "adapt" / f"{name}-v{version}"
    shutil.rmtree(dest, ignore_errors=True)
    local = Path(mlflow.artifacts.download_artifacts(f"models:/{name}/{version}", dst_path=str(dest)))
    return Parent(name=name, version=version, run_id=mv.run_id or "", local_dir=str(local))


def _artifact(parent: Parent, pattern: str) -> Path:
    found = sorted(Path(parent.local_dir).rglob(pattern))
    if not found:
        raise AdaptError(f"models:/{parent.name}/{parent.version} has no {pattern}: not a cxr-pneumonia model")
    return found[0]


@task(name="adapt", cache_policy=NONE)
def adapt_to_site(parent: Parent, images_dir: Path, settings: AdaptSettings, work_dir: Path) -> AdaptedModel:
    """Read the site's films, adapt the parent's network to them and save the result; a refusal is returned."""
    meta = json.loads(_artifact(parent, "meta.json").read_text())
    try:
        check_settings(settings)
        if "adaptation" in meta:
            raise AdaptError(f"models:/{parent.name}/{parent.version} is itself an adapted version: adapt its "
                             f"parent, {meta.get('adaptation_parent', 'the version it was adapted from')}, instead")
        if settings.calibration and not meta.get("calibration"):
            raise AdaptError(f"models:/{parent.name}/{parent.version} stores no calibration (it was registered "
                             "before `cxr train` fitted one on validation): train and register it again with "
                             "`cxr train`, or leave out --calibration")
        if (settings.prior or settings.batchnorm) and "source_prior" not in meta:
            raise AdaptError(f"models:/{parent.name}/{parent.version} does not record its training split's "
                             "PNEUMONIA share: train and register it again with `cxr train`")
        site = read_site_folder(images_dir, int(meta["image_size"]))
        started = time.perf_counter()
        model = keras.models.load_model(_artifact(parent, "*.keras"), compile=False)
        views = tuple((float(s), float(r)) for s, r in meta.get("views", [[1.0, 1.0]]))
        cal = meta.get("calibration")
        result = adapt(model, lambda m: compile_forward(m, views=views), site.images, float(meta["threshold"]),
                       float(meta.get("source_prior", 0.5)),  # read only by the prior and AdaBN, checked above
                       Calibration(cal["temperature"], cal["bias"]) if cal else None, settings)
        seconds = time.perf_counter() - started
    except AdaptError as exc:
        return AdaptedModel(refused=str(exc))
    out = work_dir / "adapt" / f"{parent.name}-v{parent.version}-adapted"
    out.mkdir(parents=True, exist_ok=True)
    model.save(out / "model.keras")
    record = result.record()
    new_meta = {**meta, "threshold": result.threshold, "adaptation": record,
                "adaptation_parent": f"{parent.name}/{parent.version}", "adaptation_digest": site.digest}
    (out / "meta.json").write_text(json.dumps(new_meta, indent=2))
    thresholds = {"unadapted": result.threshold_before, "calibrated": result.threshold,
                  "batchnorm": result.threshold, "adapted": result.threshold}
    for name, fig in {"score_histograms.png": plots.adaptation_scores(result.scores, thresholds),
                      **({"em_convergence.png": plots.em_convergence(result.prior.history, result.source_prior,
                                                                     result.prior.interval)}
                         if result.prior else {})}.items():
        fig.savefig(out / name, dpi=110)
    return AdaptedModel(model_path=str(out / "model.keras"), meta_path=str(out / "meta.json"),
                        example_file=site.files[0], record=record, digest=site.digest, seconds=seconds,
                        skipped=site.skipped)


def adapted_card(parent: Parent, adapted: AdaptedModel, images_dir: Path) -> str:
    r = adapted.record
    interval = r["prior_interval"]
    prior = "not estimated" if r["prior"] is None else f"{r['prior']:.3f}"
    if interval:
        prior += f" (bootstrap 95 % {interval[0]:.3f}-{interval[1]:.3f})"
    on = [k for k in ("calibration", "batchnorm", "prior") if r["settings"][k]]
    return (
        f"`models:/{parent.name}/{parent.version}` adapted to the unlabeled films of one site by `cxr adapt`.\n\n"
        f"**Site**: {r['n_films']} films from `{images_dir}` (digest `{adapted.digest[:12]}`); labels were not used.\n"
        f"**Components**: {', '.join(on) or 'none'}.\n**Estimated PNEUMONIA share**: {prior} (training: "
        f"{r['source_prior']:.3f}).\n**Threshold**: {r['threshold_before']:.4f} on the parent's score; the adapted "
        f"version answers PNEUMONIA from {r['threshold']:.4f} of its own probability (= {r['threshold_after_raw']:.4f} "
        "of its network's score).\n\nResearch use only: not a medical device."
    )


@task(name="register-adapted", cache_policy=NONE)
def register_adapted(parent: Parent, adapted: AdaptedModel, images_dir: Path, name: str | None,
                     alias: str | None) -> dict:
    """Log the adaptation as a run linked to the parent's, register the adapted model and tag it."""
    client = MlflowClient()
    name = name or parent.name
    experiment = client.get_run(parent.run_id).info.experiment_id if parent.run_id else None
    r = adapted.record
    tags = {"cxr.role": "adaptation", **({"mlflow.parentRunId": parent.run_id} if parent.run_id else {})}
    with mlflow.start_run(experiment_id=experiment, run_name=f"adapt-v{parent.version}", tags=tags) as run:
        mlflow.log_params({f"adapt/{k}": v for k, v in r["settings"].items()})
        mlflow.log_params({"adapt/parent": f"{parent.name}/{parent.version}", "adapt/images_digest": adapted.digest,
                           "adapt/n_films": r["n_films"], "adapt/skipped_files": len(adapted.skipped)})
        metrics = {k: r[k] for k in ("source_prior", "prior", "source_weight", "threshold_before", "threshold",
                                     "threshold_after_raw", "em_iterations") if r[k] is not None}
        if r["prior_interval"]:
            metrics |= {"prior_low": r["prior_interval"][0], "prior_high": r["prior_interval"][1]}
        mlflow.log_metrics({f"adapt/{k}": float(v) for k, v in metrics.items()} | {"adapt/seconds": adapted.seconds})
        out = Path(adapted.meta_path).parent
        for png in sorted(out.glob("*.png")):
            mlflow.log_artifact(str(png), artifact_path="plots")
        example = pd.DataFrame({INPUT_COLUMN: [encode_file(adapted.example_file)]})
        info = log_served_model(adapted.model_path, adapted.meta_path, example, registered_model_name=name)
        version = str(info.registered_model_version)
        client.update_model_version(name, version, description=adapted_card(parent, adapted, images_dir))
        version_tags = {
            "adapt.parent": f"{parent.name}/{parent.version}", "adapt.images_digest": adapted.digest,
            "adapt.n_films": str(r["n_films"]),
            "adapt.components": ",".join(k for k in ("calibration", "batchnorm", "prior") if r["settings"][k]),
            "adapt.prior": "" if r["prior"] is None else f"{r['prior']:.4f}",
            "adapt.prior_interval": "" if not r["prior_interval"] else
            f"{r['prior_interval'][0]:.4f}-{r['prior_interval'][1]:.4f}",
            "adapt.threshold_before": f"{r['threshold_before']:.4f}", "adapt.threshold_after": f"{r['threshold']:.4f}",
            "adapt.threshold_after_raw": f"{r['threshold_after_raw']:.4f}", "run_id": run.info.run_id,
        }
        for key, value in version_tags.items():
            client.set_model_version_tag(name, version, key, value)
        if alias:
            client.set_registered_model_alias(name, alias, version)
        mlflow.set_tags({"registered_version": version, **({"registered_alias": alias} if alias else {})})
    print(f"Registered {name} v{version}{f' as @{alias}' if alias else ''}: adapted from v{parent.version} on "
          f"{r['n_films']} films (prior {version_tags['adapt.prior'] or 'not estimated'})")
    return {"name": name, "version": version, "alias": alias, "run_id": run.info.run_id,
            "model_uri": f"models:/{name}/{version}", **version_tags}
