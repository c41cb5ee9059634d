"""Registry task: log the pyfunc model, register it, and move `champion` only on a better validation score."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import mlflow
import pandas as pd
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from prefect import task
from prefect.cache_policies import NONE
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
from prefect.concurrency.sync import concurrency
from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound, PrefectHTTPStatusError
from pydantic import BaseModel

from cxr_model.config import TrainConfig
from cxr_model.data import split_rows
from cxr_model.serving import INPUT_COLUMN, encode_file
from cxr_pneumonia.tasks.data import DataHandle, read_manifest
from cxr_pneumonia.tasks.evaluate import Evaluation
from cxr_pneumonia.tasks.packaging import log_served_model
from cxr_pneumonia.tasks.tracking import IO_RETRIES, in_run, retry_on_io
from cxr_pneumonia.tasks.training import TrainedModel

CHAMPION, CHALLENGER = "champion", "challenger"
SCORE_TAG = "val_score"
BASIS_TAG = "val_score_basis"  # what the score measured (see score_basis)
LOCK_TIMEOUT_S = 600.0  # how long a registration waits for another flow's compare-and-set before it fails


class Registration(BaseModel):
    name: str
    version: str
    alias: str
    score: float
    champion_score: float | None  # the score of the champion it was compared with (None: first version)
    model_uri: str


def should_promote(new_score: float, champion_score: float | None) -> bool:
    """True when the new version beats the current champion (or there is none) on validation."""
    if math.isnan(new_score):
        return False
    return champion_score is None or math.isnan(champion_score) or new_score > champion_score


def _champion(client: MlflowClient, name: str):
    """The model version holding the champion alias, or None when no version holds it (or no model exists).

    Read from the registered model's aliases, so that "no champion" is an answer and not an error: a registry
    that cannot be read (a locked database, a server that does not answer) raises, where taking the failure for
    "no champion" would hand the alias to the new version whatever its score.
    """
    try:
        aliases = client.get_registered_model(name).aliases
    except MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise
    return None if CHAMPION not in aliases else client.get_model_version(name, str(aliases[CHAMPION]))


def _recorded_score(version) -> float | None:
    """The validation score tagged on a model version (NaN if it has none), or None for no version."""
    return None if version is None else float(version.tags.get(SCORE_TAG, "nan"))


def champion_score(client: MlflowClient, name: str) -> float | None:
    """The validation score recorded on the current champion, or None if no champion exists."""
    return _recorded_score(_champion(client, name))


def score_basis(cfg: TrainConfig, data_digest: str) -> str:
    """What a version's validation score measured: scores on different bases are not compared."""
    # a metric read at the threshold (f1, accuracy) also depends on the rule that chose it
    rule = f", threshold rule {cfg.threshold_rule}" if cfg.champion_metric in ("f1", "accuracy") else ""
    return (f"{cfg.champion_metric} on validation (data {data_digest[:12]}, split seed {cfg.seed}, "
            f"fraction {cfg.val_fraction}, test-time views {cfg.tta}{rule})")


def assign_alias(client: MlflowClient, name: str, version: str, score: float,
                 basis: str = "") -> tuple[str, float | None]:
    """Give `version` the champion alias if it beats the holder on the same basis, else the challenger alias.

    A champion scored on another basis (other validation images, other test-time views, or recorded before
    bases were) is not compared with: the new version becomes the challenger, and moving `champion` is a
    person's call (`MlflowClient().set_registered_model_alias`).
    """
    champion = _champion(client, name)  # one registry read for both the score and its basis
    current = _recorded_score(champion)
    comparable = champion is None or champion.tags.get(BASIS_TAG, "") == basis
    alias = CHAMPION if comparable and should_promote(score, current) else CHALLENGER
    client.set_model_version_tag(name, version, SCORE_TAG, f"{score:.6f}")
    client.set_model_version_tag(name, version, BASIS_TAG, basis)
    client.set_registered_model_alias(name, alias, version)
    if not comparable:
        print(f"{name} v{version} is {CHALLENGER}: the {CHAMPION} was scored on another basis, so the scores "
              "are not compared; move the alias by hand if the new version should serve")
    return alias, current


CARD_METRICS = ("roc_auc", "accuracy", "sensitivity", "specificity")
# The MLflow UI's table of a model's versions shows a description's first line cut to 32 characters (MLflow's
# ModelVersionTable: truncateToFirstLineWithMaxLength(description, 32)), and its column shows fewer (about 27 on a
# 1920-pixel screen), so the card's first line is test accuracy, test AUC and threshold in as few characters.
CARD_HEADLINE_CHARS = 27


def card_headline(evaluation: Evaluation) -> str:
    """The model card's first line, short enough for the registry's version list: 'acc 0.913, AUC 0.970 @ 0.59'."""
    return f"acc {evaluation.test['accuracy']:.3f}, AUC {evaluation.test['roc_auc']:.3f} @ {evaluation.threshold:.2f}"


def model_card(cfg: TrainConfig, evaluation: Evaluation, data_digest: str, run_id: str) -> str:
    """The registered version's description (Markdown, shown in the MLflow UI's model pages): a headline for the
    version list, then what the model takes and answers, what it was trained on, its validation and test numbers,
    and what it is not for."""
    rows = "\n".join(f"| {m} | {evaluation.val.get(m, float('nan')):.4f} | {evaluation.test[m]:.4f} |"
                     for m in CARD_METRICS)
    return (
        f"{card_headline(evaluation)}\n\n"
        f"**Test accuracy {evaluation.test['accuracy']:.4f}, ROC AUC {evaluation.test['roc_auc']:.4f}, at "
        f"threshold {evaluation.threshold:.4f}.** "
        f"Pneumonia against normal on pediatric chest X-rays: a convnet trained from scratch by cxr-pneumonia "
        f"(profile `{cfg.profile}`, seed {cfg.seed}, run `{run_id}`).\n\n"
        f"**Input**: one chest X-ray of any size and mode, made grayscale and resized to {cfg.image_size} px by "
        f"the served model. **Output**: the probability of pneumonia and the label at threshold "
        f"{evaluation.threshold:.4f} (rule `{cfg.threshold_rule}`, chosen on validation).\n\n"
        f"**Data**: Kermany et al., Cell 2018, \"Chest X-Ray Images (Pneumonia)\" (CC BY 4.0), data digest "
        f"`{data_digest[:12]}`; validation is a patient-grouped share of the training split.\n\n"
        f"| metric | validation | test (read once, after every choice) |\n|---|---:|---:|\n{rows}\n\n"
        "Research use only: not a medical device, and not validated on other hospitals, scanners or adults."
    )


def _left_without_alias(model_name: str, version: str, run_id: str, why: str) -> str:
    """What a registration that could not set an alias says: which version, from which run, and what to do."""
    return (f"{model_name} v{version} is registered (run {run_id}) but has no alias: {why}. Give it one by hand "
            "(MlflowClient().set_registered_model_alias)")


def registry_lock_name(model_name: str) -> str:
    """The Prefect global concurrency limit that serialises the alias moves of one registered model."""
    return "cxr-register-" + re.sub(r"[^A-Za-z0-9._-]", "-", model_name)


def _ensure_lock(name: str) -> bool:
    """Create the one-slot limit `name` if it does not exist; False if this Prefect server refuses (a role
    without that right, say): the registration then goes on without the lock rather than fail after training."""
    with get_client(sync_client=True) as client:
        try:
            client.read_global_concurrency_limit_by_name(name)
        except ObjectNotFound:
            try:
                client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=1))
            except ObjectAlreadyExists:
                pass  # another flow created it between the read and the create
            except PrefectHTTPStatusError as e:
                print(f"The Prefect server refused to create the concurrency limit {name!r} (HTTP "
                      f"{e.response.status_code}); registering without it. Create it once with `prefect gcl create "
                      f"{name} --limit 1` so that racing registrations cannot swap the champion")
                return False
    return True


@contextmanager
def registry_lock(model_name: str, timeout_s: float = LOCK_TIMEOUT_S) -> Iterator[None]:
    """Hold the one slot of `registry_lock_name(model_name)` on the Prefect server this process talks to.

    The limit is created with one slot on first use (a limit a person has already set up is used as it is).
    Flows that share a Prefect server (`PREFECT_API_URL`: the multi-worker stack) then read the champion's score
    and move the alias one at a time, so a better version cannot lose `champion` to a worse one registered at
    the same moment. Separate processes on their own temporary servers share no lock. Raises `TimeoutError`
    after `timeout_s` seconds of waiting.
    """
    name = registry_lock_name(model_name)
    with ExitStack() as held:
        if _ensure_lock(name):
            try:
                held.enter_context(concurrency(name, occupy=1, timeout_seconds=timeout_s, strict=True))
            except TimeoutError as e:
                raise TimeoutError(f"waited {timeout_s:.0f} s for the Prefect concurrency limit {name!r}, which "
                                   "another registration of this model holds") from e
        yield


@task(name="describe-version", cache_policy=NONE, retries=IO_RETRIES, retry_delay_seconds=5,
      retry_condition_fn=retry_on_io)
def describe_version(name: str, version: str, card: str, tags: dict[str, str]) -> None:
    """Set a registered version's model card and tags (idempotent, so retried when the registry fails)."""
    client = MlflowClient()
    client.update_model_version(name, version, description=card)
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, value)


@task(name="register", cache_policy=NONE)
def register(cfg: TrainConfig, data: DataHandle, trained: TrainedModel, evaluation: Evaluation,
             run_id: str) -> Registration:
    """Log the served model with signature and example, register it and set its alias."""
    out = Path(trained.model_path).parent
    meta = dict(threshold=evaluation.threshold, image_size=cfg.image_size, labels=["NORMAL", "PNEUMONIA"],
                threshold_rule=cfg.threshold_rule, views=[list(v) for v in cfg.views], data_digest=data.digest,
                run_id=run_id, calibration=evaluation.calibration)
    manifest = read_manifest(data)
    # the training split's PNEUMONIA share: the prior `cxr adapt` moves a site's threshold from
    meta["source_prior"] = float(split_rows(manifest, "train")["label"].mean())
    (out / "meta.json").write_text(json.dumps(meta, indent=2))
    example_path = split_rows(manifest, "val")["path"].iloc[0]
    example = pd.DataFrame({INPUT_COLUMN: [encode_file(example_path)]})
    score = float(evaluation.val[cfg.champion_metric])
    with in_run(run_id):
        info = log_served_model(trained.model_path, out / "meta.json", example, registered_model_name=cfg.model_name)
        version = str(info.registered_model_version)
        describe_version(cfg.model_name, version, model_card(cfg, evaluation, data.digest, run_id),
                         {"data_digest": data.digest, "profile": cfg.profile, "run_id": run_id,
                          "test_accuracy": f"{evaluation.test['accuracy']:.4f}"})
        client = MlflowClient()
        try:
            with registry_lock(cfg.model_name):  # the read of the champion and the alias move, as one step
                alias, previous = assign_alias(client, cfg.model_name, version, score, score_basis(cfg, data.digest))
        except TimeoutError as e:
            raise TimeoutError(_left_without_alias(cfg.model_name, version, run_id, str(e))) from e
        except MlflowException as e:  # the champion could not be read or the alias not set
            raise RuntimeError(_left_without_alias(
                cfg.model_name, version, run_id, f"the registry failed while comparing it with the champion "
                f"({e.message}); compare the versions' {SCORE_TAG} tags")) from e
        mlflow.set_tags({"registered_version": version, "registered_alias": alias})
    print(f"Registered {cfg.model_name} v{version} as @{alias} (validation {cfg.champion_metric}={score:.4f}; "
          f"champion had {previous})")
    return Registration(name=cfg.model_name, version=version, alias=alias, score=score,
                        champion_score=previous, model_uri=f"models:/{cfg.model_name}/{version}")
