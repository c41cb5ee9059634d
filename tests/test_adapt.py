"""Site adaptation's math on synthetic data: calibration, EM prior, threshold shift, AdaBN and refusals."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import requests

from cxr_model.adapt import (
    AdaptError,
    AdaptSettings,
    Calibration,
    PriorEstimate,
    adapt,
    adapt_batchnorm,
    batchnorm_state,
    calibration_record,
    check_prior,
    em_prior,
    fit_calibration,
    label_shift_weights,
    logit_shift,
    read_site_folder,
    restore_batchnorm,
    shifted_threshold,
)
from tests.conftest import FlowRun, write_xray


def _site(prior: float, n: int = 4000, seed: int = 0, source_prior: float = 0.74):
    """Labels at `prior` and exact posteriors under `source_prior` (class-conditional N(+-1.5, 1) scores)."""
    rng = np.random.default_rng(seed)
    y = rng.random(n) < prior
    z = np.where(y, 1.5, -1.5) + rng.normal(0, 1, n)
    return y, 1 / (1 + np.exp(-(3 * z + np.log(source_prior / (1 - source_prior))))), z


@pytest.mark.parametrize("prior", [0.3, 0.5, 0.74, 0.9])
def test_em_recovers_a_known_prior(prior):
    y, p, _ = _site(prior)
    assert em_prior(p, 0.74).prior == pytest.approx(y.mean(), abs=0.02)


def test_calibration_recovers_temperature_and_bias():
    y, _, z = _site(0.4, n=20000)
    raw = 1 / (1 + np.exp(-(2 * z + 0.5)))  # true logit 3z + log(0.4/0.6): 1/T = 1.5, bias = -0.405 - 0.75
    cal = fit_calibration(y, raw)
    assert cal.temperature == pytest.approx(1 / 1.5, rel=0.05)
    assert cal.bias == pytest.approx(np.log(0.4 / 0.6) - 0.75, abs=0.1)


def test_threshold_shift_matches_the_formula():
    t, ps, pt = 0.3, 0.74, 0.45
    expected = 1 / (1 + np.exp(-(np.log(t / (1 - t)) - (np.log(pt / (1 - pt)) - np.log(ps / (1 - ps))))))
    assert shifted_threshold(t, ps, pt) == pytest.approx(expected, abs=1e-9)
    assert logit_shift(ps, ps) == pytest.approx(0.0)


def test_batchnorm_reestimation_changes_only_moving_statistics():
    import keras

    from cxr_model.model import ConvNetConfig, build_convnet

    model = build_convnet(ConvNetConfig(image_size=32, blocks=2, filters=8), compile=False)
    before = {v.path: np.array(v) for v in model.weights}
    images = np.random.default_rng(0).integers(0, 255, (20, 32, 32, 1)).astype(np.uint8)
    adapt_batchnorm(model, images, source_weight=0.2)
    changed = {p for v in model.weights if not np.array_equal(before[p := v.path], np.array(v))}
    moving = {v.path for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)
              for v in (layer.moving_mean, layer.moving_variance)}
    assert changed == moving


def test_prior_at_the_edge_is_refused():
    with pytest.raises(AdaptError, match="one class"):
        check_prior(PriorEstimate(prior=0.97, iterations=3))
    check_prior(PriorEstimate(prior=0.5, iterations=3))


def test_too_few_films_and_a_junk_folder_are_refused(tmp_path):
    for i in range(4):
        write_xray(tmp_path / "few" / f"a{i}.png", i)
    with pytest.raises(AdaptError, match="at least 8"):
        read_site_folder(tmp_path / "few", 32, min_films=8)
    for i in range(2):
        write_xray(tmp_path / "junk" / f"a{i}.png", i)
    for i in range(3):
        (tmp_path / "junk" / f"b{i}.jpeg").write_bytes(b"not an image")
    with pytest.raises(AdaptError, match="3 of 5 files"):
        read_site_folder(tmp_path / "junk", 32, min_films=1)


def _tiny_model():
    from cxr_model.model import ConvNetConfig, build_convnet

    return build_convnet(ConvNetConfig(image_size=32, blocks=2, filters=8, dense_units=0), compile=False)


def _films(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 255, (n, 32, 32, 1)).astype(np.uint8)


def test_calibration_record_reports_ece_before_and_after():
    y, _, z = _site(0.6, n=5000)
    record = calibration_record(y, 1 / (1 + np.exp(-(0.5 * z + 1.0))))  # under-confident and biased
    assert set(record) == {"temperature", "bias", "val_ece_before", "val_ece_after"}
    assert record["val_ece_after"] < 0.02 < record["val_ece_before"]


def test_label_shift_weights_give_the_source_class_mix():
    """Films of a 30 % site, weighted, are a 74 % population in expectation under their posteriors, and their
    labels move most of the way there (films the model is unsure of weigh as either class); at the source prior
    every weight is 1."""
    from cxr_model.adapt import prior_shifted

    y, p, _ = _site(0.3, n=20000)
    target = em_prior(p, 0.74).prior
    w = label_shift_weights(p, 0.74, target)
    q = prior_shifted(p, 0.74, target)
    assert np.sum(q) * 0.74 / target / np.sum(w) == pytest.approx(0.74, abs=0.01)
    assert 0.6 < np.sum(w * y) / np.sum(w) < 0.74
    np.testing.assert_allclose(label_shift_weights(p, 0.74, 0.74), 1.0)


def test_restore_batchnorm_puts_back_the_source_statistics():
    model = _tiny_model()
    state = batchnorm_state(model)
    adapt_batchnorm(model, _films(16), source_weight=0.0)
    assert any(not np.array_equal(a, b) for (a, _), (b, _) in zip(state, batchnorm_state(model), strict=True))
    restore_batchnorm(model, state)
    for (m0, v0), (m1, v1) in zip(state, batchnorm_state(model), strict=True):
        np.testing.assert_array_equal(m0, m1)
        np.testing.assert_array_equal(v0, v1)


def test_adapt_moves_the_logit_by_the_prior_ratio():
    """Calibration and prior alone: served probability = sigmoid(logit(p) / T + b + shift); the served threshold
    is the parent's, calibrated."""
    _, raw, _ = _site(0.5, n=400)  # the network's scores of the site's films

    cal = Calibration(temperature=2.0, bias=-0.3)
    result = adapt(_tiny_model(), lambda _: lambda x: raw, _films(400), threshold=0.4, source_prior=0.74,
                   calibration=cal, settings=AdaptSettings(calibration=True, prior=True, bootstrap=20))
    assert 0.1 < result.prior.prior < 0.9
    shift = logit_shift(0.74, result.prior.prior)
    expected = 1 / (1 + np.exp(-(np.log(raw / (1 - raw)) / 2.0 - 0.3 + shift)))
    np.testing.assert_allclose(result.transform(raw), expected, rtol=1e-6)
    assert result.threshold == pytest.approx(float(cal.apply(0.4)))
    lo, hi = result.prior.interval
    assert lo <= result.prior.prior <= hi


def test_adapt_refuses_a_version_without_calibration_and_a_one_class_folder_before_changing_the_model():
    from cxr_model.inference import compile_forward

    model, films = _tiny_model(), _films(40)
    every = AdaptSettings(calibration=True, batchnorm=True, prior=True)
    with pytest.raises(AdaptError, match="no adaptation component"):
        adapt(model, compile_forward, films, 0.5, 0.74, Calibration())
    with pytest.raises(AdaptError, match="no calibration"):
        adapt(model, compile_forward, films, 0.5, 0.74, None, every)
    before = batchnorm_state(model)
    # a calibration that calls every film PNEUMONIA: the estimated share is at the edge
    with pytest.raises(AdaptError, match="one class"):
        adapt(model, compile_forward, films, 0.5, 0.74, Calibration(temperature=1.0, bias=20.0), every)
    for (m0, _), (m1, _) in zip(before, batchnorm_state(model), strict=True):
        np.testing.assert_array_equal(m0, m1)


def test_an_unknown_model_is_refused_and_a_failing_server_is_left_to_the_retries(tmp_path, monkeypatch):
    import mlflow
    from mlflow.exceptions import MlflowException

    from cxr_pneumonia.tasks.adapt import resolve_version

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    for uri in ("models:/nope@champion", "models:/nope/3", "runs:/abc/model"):
        with pytest.raises(AdaptError, match="--model"):
            resolve_version(uri)

    def down(*args, **kwargs):
        raise MlflowException("API request to http://mlflow:5000 failed: Connection refused")  # INTERNAL_ERROR

    monkeypatch.setattr(mlflow.MlflowClient, "get_model_version_by_alias", down)
    with pytest.raises(MlflowException, match="Connection refused") as raised:
        resolve_version("models:/cxr-pneumonia@champion")
    assert not isinstance(raised.value, AdaptError)


def test_served_classifier_answers_the_adapted_probability(tmp_path):
    import json

    import pandas as pd

    from cxr_model.inference import compile_forward
    from cxr_model.serving import INPUT_COLUMN, ServedClassifier, adapted_probability, encode_file

    model = _tiny_model()
    model.save(tmp_path / "model.keras")
    files = [write_xray(tmp_path / f"f{i}.png", i, size=(32, 32)) for i in range(4)]
    meta = {"threshold": 0.45, "image_size": 32, "adaptation": {"logit_scale": 0.5, "logit_offset": -1.2}}
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    served = ServedClassifier.from_meta(tmp_path / "model.keras", meta)
    out = served.predict(pd.DataFrame({INPUT_COLUMN: [encode_file(f) for f in files]}))
    from cxr_model.preprocess import decode_file

    raw = compile_forward(model)(np.stack([decode_file(f, 32) for f in files]))
    np.testing.assert_allclose(out["probability"], adapted_probability(raw, 0.5, -1.2), rtol=1e-6)
    assert list(out["label"]) == ["PNEUMONIA" if q >= 0.45 else "NORMAL" for q in out["probability"]]


# ---------------------------------------------------------------- integration: `cxr adapt` on the smoke model


def _cxr(flow: FlowRun, *argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cxr_pneumonia.cli", *argv], cwd=flow.cwd, env=flow.env,
                          capture_output=True, text=True, timeout=900)


@pytest.mark.integration
@pytest.mark.slow
def test_cxr_adapt_registers_a_version_that_serves_as_cxr_predict_answers(
        smoke_flow: FlowRun, real_subset: Path, tmp_path: Path) -> None:
    """Smoke model adapted on real test films copied into one flat folder (labels hidden): a new version with its
    tags and card, served by a real `mlflow models serve` with the answers `cxr predict` gives in process; a folder
    under the minimum is refused in one line with nothing registered."""
    from mlflow import MlflowClient

    from cxr_pneumonia.model_server import start_model_server, stop_model_server

    site = tmp_path / "site"
    site.mkdir()
    films = sorted((real_subset / "test").rglob("*.jpeg"))
    for i, path in enumerate(films):  # flat, and named by nothing that says the class
        shutil.copy(path, site / f"film{i:03d}.jpeg")
    (site / "notes.txt").write_text("not a film")  # junk is skipped, not fatal
    client = MlflowClient(smoke_flow.tracking_uri)
    parent = client.get_model_version_by_alias("cxr-pneumonia", "champion")

    few = tmp_path / "few"
    few.mkdir()
    for path in films[:5]:
        shutil.copy(path, few / path.name)
    refused = _cxr(smoke_flow, "adapt", "--model", "models:/cxr-pneumonia@champion", "--images", str(few),
                   "--name", "cxr-pneumonia-site", "--prior")
    assert refused.returncode == 2, refused.stderr[-2000:]
    errors = [line for line in refused.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "at least" in errors[0]
    assert not client.search_model_versions("name = 'cxr-pneumonia-site'")

    done = _cxr(smoke_flow, "adapt", "--model", "models:/cxr-pneumonia@champion", "--images", str(site),
                "--name", "cxr-pneumonia-site", "--alias", "site", "--calibration", "--batchnorm", "--prior")
    assert done.returncode == 0, done.stderr[-4000:]
    result = json.loads(done.stdout[done.stdout.index("{"):])
    version = client.get_model_version_by_alias("cxr-pneumonia-site", "site")
    assert str(version.version) == result["version"]
    tags = version.tags
    assert tags["adapt.parent"] == f"cxr-pneumonia/{parent.version}" and tags["adapt.n_films"] == str(len(films))
    assert tags["adapt.components"] == "calibration,batchnorm,prior"
    low, high = map(float, tags["adapt.prior_interval"].split("-"))
    assert low <= float(tags["adapt.prior"]) <= high
    assert f"models:/cxr-pneumonia/{parent.version}" in version.description
    run = client.get_run(tags["run_id"])
    assert run.data.tags["mlflow.parentRunId"] == parent.run_id
    plots = {a.path for a in client.list_artifacts(run.info.run_id, "plots")}
    assert plots == {"plots/score_histograms.png", "plots/em_convergence.png"}

    uri = f"models:/cxr-pneumonia-site/{version.version}"
    predicted = _cxr(smoke_flow, "predict", str(site), "--model", uri, "--csv", str(tmp_path / "local.csv"))
    assert predicted.returncode == 0, predicted.stderr[-2000:]
    local = pd.read_csv(tmp_path / "local.csv").dropna(subset=["probability"])
    proc, url = start_model_server(uri, tmp_path / "serve.log", env=smoke_flow.env, cwd=smoke_flow.cwd, timeout=240)
    try:
        import base64

        body = {"dataframe_split": {"columns": ["image"], "data": [[base64.b64encode(Path(p).read_bytes()).decode()]
                                                                    for p in local["path"]]}}
        answer = requests.post(f"{url}/invocations", json=body, timeout=120)
    finally:
        stop_model_server(proc)
    assert answer.status_code == 200, answer.text[:1000]
    served = pd.DataFrame(answer.json()["predictions"])
    np.testing.assert_allclose(served["probability"], local["probability"], rtol=0, atol=1e-6)
    assert list(served["label"]) == list(local["label"])
    assert served["threshold"].iloc[0] == pytest.approx(float(tags["adapt.threshold_after"]), abs=1e-4)
