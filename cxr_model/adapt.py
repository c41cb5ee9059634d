"""Site adaptation from unlabeled films: calibration, AdaBN, EM class prior and the threshold shift.

The math of `cxr adapt` (docs/adaptation.md); imports neither Prefect nor MLflow. Scores are probabilities of
PNEUMONIA; "logit" is log(p / (1 - p)).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from cxr_model.errors import CxrError
from cxr_model.evaluate import expected_calibration_error
from cxr_model.preprocess import decode_image_and_colour
from cxr_model.serving import adapted_probability, check_not_blank, check_not_colour

PRIOR_EDGE = 0.05  # an estimated prior under it (or over 1 - it) is no site population: one class only
MAX_JUNK_SHARE = 0.5  # a folder where more than this share of files is unreadable is refused
MIN_FILMS = 32  # fewest readable films `cxr adapt` accepts (docs/adaptation.md, measured on stand-in sites)
BLEND_PRIOR = 16.0  # N of the AdaBN blend: source statistics weigh N / (N + n) (docs/adaptation.md)
EM_TOLERANCE = 1e-6
EM_MAX_ITER = 1000
BOOTSTRAP = 200  # resamples of the site's films for the prior's interval


class AdaptError(CxrError, ValueError):
    """A refusal of `cxr adapt`: one line, exit status 2, nothing registered."""


def _logit(p) -> np.ndarray:
    p = np.clip(np.asarray(p, dtype=np.float64), 1e-7, 1 - 1e-7)
    return np.log(p / (1 - p))


def _sigmoid(z) -> np.ndarray:
    return 1 / (1 + np.exp(-np.asarray(z, dtype=np.float64)))


# --- calibration ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Calibration:
    """p' = sigmoid(logit(p) / temperature + bias): a temperature and a bias on the logit."""

    temperature: float = 1.0
    bias: float = 0.0

    def apply(self, p) -> np.ndarray:
        return adapted_probability(p, 1 / self.temperature, self.bias)

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


def fit_calibration(y_true, y_prob) -> Calibration:
    """The temperature and bias that minimise the log-loss of `y_prob` against `y_true` (Platt scaling in the
    logit, bias-corrected temperature scaling of Alexandari et al. 2020)."""
    from scipy.optimize import minimize

    y = np.asarray(y_true, dtype=np.float64).ravel()
    z = _logit(y_prob).ravel()
    if len(np.unique(y)) < 2:
        raise ValueError("calibration needs scores of both classes")

    def loss(params):  # params: (log 1/T, bias); mean log-loss and its gradient
        a, b = np.exp(params[0]), params[1]
        s = a * z + b
        q = _sigmoid(s)
        nll = np.mean(np.logaddexp(0, s) - y * s)
        g = q - y
        return nll, np.array([np.mean(g * z) * a, np.mean(g)])

    res = minimize(loss, np.zeros(2), jac=True, method="L-BFGS-B")
    return Calibration(temperature=float(np.exp(-res.x[0])), bias=float(res.x[1]))


def calibration_record(y_true, y_prob) -> dict[str, float]:
    """What a trained version stores: the fitted calibration and validation ECE before and after it."""
    cal = fit_calibration(y_true, y_prob)
    return dict(**cal.to_dict(), val_ece_before=expected_calibration_error(y_true, y_prob),
                val_ece_after=expected_calibration_error(y_true, cal.apply(y_prob)))


# --- class prior (EM) and the threshold -------------------------------------------------------------------------

@dataclass
class PriorEstimate:
    prior: float  # estimated PNEUMONIA share of the site
    iterations: int
    history: list[float] = field(default_factory=list)  # the prior after each EM step (the convergence plot)
    interval: tuple[float, float] | None = None  # bootstrap 2.5 % / 97.5 % percentiles


def prior_shifted(p, source_prior: float, target_prior: float) -> np.ndarray:
    """Posteriors under `source_prior` re-weighted to `target_prior` (Bayes' rule on the class ratio)."""
    return _sigmoid(_logit(p) + logit_shift(source_prior, target_prior))


def logit_shift(source_prior: float, target_prior: float) -> float:
    """log(π̂/(1−π̂)) − log(π_s/(1−π_s)): what the prior change adds to every logit."""
    return float(_logit(target_prior) - _logit(source_prior))


def em_prior(p, source_prior: float, tol: float = EM_TOLERANCE, max_iter: int = EM_MAX_ITER) -> PriorEstimate:
    """The target class prior by EM from calibrated source posteriors `p` (Saerens et al. 2002): the prior is the
    mean posterior re-weighted to the current prior, until it moves by less than `tol`."""
    p = np.asarray(p, dtype=np.float64).ravel()
    if not len(p):
        raise ValueError("EM needs at least one score")
    prior, history = float(source_prior), []
    for _ in range(max_iter):
        new = float(np.mean(prior_shifted(p, source_prior, prior)))
        history.append(new)
        done = abs(new - prior) < tol
        prior = new
        if done:
            break
    return PriorEstimate(prior=prior, iterations=len(history), history=history)


def bootstrap_prior(p, source_prior: float, resamples: int = BOOTSTRAP, seed: int = 0,
                    tol: float = EM_TOLERANCE, max_iter: int = EM_MAX_ITER) -> tuple[float, float]:
    """2.5 % and 97.5 % percentiles of the EM prior over bootstrap resamples of the films."""
    p = np.asarray(p, dtype=np.float64).ravel()
    rng = np.random.default_rng(seed)
    draws = [em_prior(p[rng.integers(0, len(p), len(p))], source_prior, tol, max_iter).prior
             for _ in range(resamples)]
    lo, hi = np.percentile(draws, [2.5, 97.5])
    return float(lo), float(hi)


def shifted_threshold(threshold: float, source_prior: float, target_prior: float) -> float:
    """The threshold on source-prior scores that makes the same decisions as `threshold` on target posteriors:
    its logit moves by −logit_shift."""
    return float(_sigmoid(_logit(threshold) - logit_shift(source_prior, target_prior)))


def check_prior(estimate: PriorEstimate) -> None:
    if not PRIOR_EDGE <= estimate.prior <= 1 - PRIOR_EDGE:
        raise AdaptError(f"the estimated PNEUMONIA share of the films is {estimate.prior:.3f}, outside "
                         f"{PRIOR_EDGE:.2f}..{1 - PRIOR_EDGE:.2f}: the folder looks like one class, not a site's "
                         "population, so no version was registered")


# --- BatchNorm re-estimation (AdaBN) --------------------------------------------------------------------------

def batchnorm_layers(model) -> list:
    """Every BatchNormalization layer of `model`, nested sub-models (ensemble members) included, in graph order."""
    import keras

    found = []
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            found.append(layer)
        elif isinstance(layer, keras.Model):
            found += batchnorm_layers(layer)
    return found


def batchnorm_state(model) -> list[tuple[np.ndarray, np.ndarray]]:
    """Every BatchNorm layer's moving mean and variance, copied (to put back with `restore_batchnorm`)."""
    return [(np.array(bn.moving_mean), np.array(bn.moving_variance)) for bn in batchnorm_layers(model)]


def restore_batchnorm(model, state: list[tuple[np.ndarray, np.ndarray]]) -> None:
    for bn, (mean, var) in zip(batchnorm_layers(model), state, strict=True):
        bn.moving_mean.assign(mean)
        bn.moving_variance.assign(var)


def _weighted_moments(x: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and variance of (N, ..., C) activations, each image weighted by `weights` (N,)."""
    w = weights / weights.sum()
    axes = tuple(range(1, x.ndim - 1))
    m = x.mean(axis=axes)  # (N, C) per-image means
    m2 = (x.astype(np.float64) ** 2).mean(axis=axes)
    mean = (w[:, None] * m).sum(axis=0)
    return mean, np.maximum((w[:, None] * m2).sum(axis=0) - mean**2, 0.0)


def adapt_batchnorm(model, images: np.ndarray, source_weight: float, image_weights: np.ndarray | None = None,
                    batch_size: int = 64) -> None:
    """AdaBN in place: each BatchNorm layer's moving mean and variance become source_weight * source + (1 -
    source_weight) * the site's, layer after layer (a layer sees its input through the layers already adapted).

    `image_weights` (N,) weigh the films in the site's statistics (the label-shift guard). Only the moving
    statistics change; no other weight does.
    """
    import keras

    images = np.asarray(images)
    weights = np.ones(len(images)) if image_weights is None else np.asarray(image_weights, dtype=np.float64)
    members = [layer for layer in model.layers if isinstance(layer, keras.Model)] or [model]
    for member in members:
        for bn in batchnorm_layers(member):
            probe = keras.Model(member.inputs, bn.input)
            acts = np.concatenate([np.asarray(probe(images[i:i + batch_size].astype("float32"), training=False))
                                   for i in range(0, len(images), batch_size)])
            mean, var = _weighted_moments(acts, weights)
            src_mean, src_var = (np.asarray(v, dtype=np.float64) for v in (bn.moving_mean, bn.moving_variance))
            bn.moving_mean.assign((source_weight * src_mean + (1 - source_weight) * mean).astype("float32"))
            bn.moving_variance.assign((source_weight * src_var + (1 - source_weight) * var).astype("float32"))


def blend_weight(n_films: int, prior_strength: float = BLEND_PRIOR) -> float:
    """N / (N + n): the source statistics' share for n films (Schneider et al. 2020)."""
    return prior_strength / (prior_strength + n_films)


def label_shift_weights(p, source_prior: float, target_prior: float) -> np.ndarray:
    """Per-film importance weights that give the site's statistics training's class mix: the expected ratio
    π_s(y)/π̂(y) under the film's target posterior."""
    q = prior_shifted(p, source_prior, target_prior)
    return q * source_prior / target_prior + (1 - q) * (1 - source_prior) / (1 - target_prior)


# --- the site's folder ----------------------------------------------------------------------------------------

@dataclass
class SiteFilms:
    images: np.ndarray  # (N, S, S, 1) uint8
    files: list[str]
    skipped: list[tuple[str, str]]  # (file, reason)
    digest: str  # sha256 over the readable files' contents, in sorted order


def read_site_folder(folder: str | Path, image_size: int, min_films: int = MIN_FILMS) -> SiteFilms:
    """Every file under `folder` (any layout) decoded as the served model decodes a request; names are never read
    as labels.

    AdaptError when the folder is missing, when more than MAX_JUNK_SHARE of its files are unreadable (listed),
    or when fewer than `min_films` films are readable.
    """
    root = Path(folder)
    if not root.is_dir():
        raise AdaptError(f"--images: {root} is not a folder")
    paths = sorted(p for p in root.rglob("*") if p.is_file() and not p.name.startswith("."))
    images, files, skipped = [], [], []
    digest = hashlib.sha256()
    for path in paths:
        try:  # read as the served model reads a request: a colour picture or a blank frame is no film
            image, colour = decode_image_and_colour(path.read_bytes(), image_size)
            check_not_colour(colour)
            check_not_blank(image)
        except (ValueError, OSError) as exc:
            skipped.append((str(path), str(exc).splitlines()[0] if str(exc) else type(exc).__name__))
            continue
        images.append(image)
        files.append(str(path))
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    if paths and len(skipped) > MAX_JUNK_SHARE * len(paths):
        listed = "; ".join(f"{Path(f).name}: {why}" for f, why in skipped[:5])
        more = f"; and {len(skipped) - 5} more" if len(skipped) > 5 else ""
        raise AdaptError(f"{len(skipped)} of {len(paths)} files in {root} could not be read as films ({listed}"
                         f"{more}): not a folder of chest films, so no version was registered")
    if len(images) < min_films:
        raise AdaptError(f"{root} holds {len(images)} readable films; adaptation needs at least {min_films} "
                         "(fewer give an unreliable prior and BatchNorm statistics), so no version was registered")
    return SiteFilms(np.stack(images), files, skipped, digest.hexdigest())


# --- the whole adaptation -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class AdaptSettings:
    """Which components an adaptation applies. The defaults are what the rule of docs/adaptation.md chose on
    stand-in sites made from validation: no component beat the unadapted model there without costing more than
    half a point of accuracy on some site, so each is off until asked for."""

    calibration: bool = False  # apply the stored calibration to the scores
    batchnorm: bool = False  # re-estimate BatchNorm statistics on the site's films (AdaBN)
    prior: bool = False  # estimate the site's prior by EM and move the threshold
    blend_prior: float = BLEND_PRIOR  # N of the blend N / (N + n)
    label_shift_guard: bool = True  # weight the films to training's class mix in the BatchNorm statistics
    bootstrap: int = BOOTSTRAP


DEFAULT_SETTINGS = AdaptSettings()
COMPONENTS = ("calibration", "batchnorm", "prior")


def check_settings(settings: AdaptSettings) -> None:
    """AdaptError when no component is on: the version would only copy its parent."""
    if not any(getattr(settings, c) for c in COMPONENTS):
        raise AdaptError("no adaptation component is on, so the version would copy its parent: pass --calibration, "
                         "--batchnorm and/or --prior (docs/adaptation.md has what each did on stand-in sites and "
                         "on test)")


@dataclass
class Adaptation:
    """What an adaptation changed: served probability = sigmoid(scale * logit(p) + offset), label at threshold."""

    settings: AdaptSettings
    n_films: int
    source_prior: float
    calibration: Calibration
    prior: PriorEstimate | None
    source_weight: float | None  # the AdaBN blend weight on the source statistics (None: AdaBN off)
    threshold_before: float  # the parent's threshold, on its raw scores
    threshold: float  # the adapted threshold, on the served (adapted) probability
    threshold_after_raw: float  # the adapted decision's threshold on the raw score of the adapted network
    scale: float
    offset: float
    scores: dict[str, np.ndarray] = field(default_factory=dict)  # the site's scores after each step (plots)

    def transform(self, p) -> np.ndarray:
        return adapted_probability(p, self.scale, self.offset)

    def record(self) -> dict:
        """JSON-ready summary (tags, model card, meta.json)."""
        return dict(settings=asdict(self.settings), n_films=self.n_films, source_prior=self.source_prior,
                    calibration=self.calibration.to_dict(),
                    prior=None if self.prior is None else self.prior.prior,
                    prior_interval=None if self.prior is None else self.prior.interval,
                    em_iterations=None if self.prior is None else self.prior.iterations,
                    source_weight=self.source_weight, threshold_before=self.threshold_before,
                    threshold=self.threshold, threshold_after_raw=self.threshold_after_raw,
                    logit_scale=self.scale, logit_offset=self.offset)


def adapt(model, predict_factory: Callable, images: np.ndarray, threshold: float, source_prior: float,
          calibration: Calibration | None, settings: AdaptSettings = DEFAULT_SETTINGS, seed: int = 0) -> Adaptation:
    """Adapt `model` (changed in place when AdaBN is on) to the site's `images`.

    `predict_factory(model)` gives `uint8 images -> raw probabilities` (the served forward, with its views);
    `threshold` is the parent's, on raw scores; `source_prior` the training PNEUMONIA share. AdaptError for a
    missing calibration (when on) or a prior at the edge, before the model is changed where it can be.
    """
    check_settings(settings)
    if settings.calibration and calibration is None:
        raise AdaptError("this model version stores no calibration (registered before calibration was fitted at "
                         "training): train and register it again with `cxr train`, or leave out --calibration")
    cal = calibration if settings.calibration else Calibration()
    raw = predict_factory(model)(images)
    calibrated = cal.apply(raw)
    scores = {"unadapted": raw, "calibrated": calibrated}
    estimate = em_prior(calibrated, source_prior)
    if settings.prior:
        check_prior(estimate)
    source_weight = None
    if settings.batchnorm:
        weights = (label_shift_weights(calibrated, source_prior, estimate.prior)
                   if settings.label_shift_guard else None)
        source_weight = blend_weight(len(images), settings.blend_prior)
        adapt_batchnorm(model, images, source_weight, weights)
        raw = predict_factory(model)(images)
        calibrated = scores["batchnorm"] = cal.apply(raw)
        if settings.prior:  # the prior as the adapted network sees the films
            estimate = em_prior(calibrated, source_prior)
    offset = cal.bias
    if settings.prior:
        check_prior(estimate)
        if settings.bootstrap:
            estimate.interval = bootstrap_prior(calibrated, source_prior, settings.bootstrap, seed)
        offset += logit_shift(source_prior, estimate.prior)
    scale = 1 / cal.temperature
    served_threshold = float(cal.apply(threshold))  # the parent's rule's threshold on the calibrated scale
    # the raw score at which the adapted decision flips: scale * logit(p) + offset = logit(served_threshold)
    after_raw = float(_sigmoid((_logit(served_threshold) - offset) / scale))
    result = Adaptation(settings=settings, n_films=len(images), source_prior=source_prior, calibration=cal,
                        prior=estimate if settings.prior else None, source_weight=source_weight,
                        threshold_before=float(threshold), threshold=served_threshold,
                        threshold_after_raw=after_raw, scale=scale, offset=offset)
    result.scores = {**scores, "adapted": result.transform(raw)}
    return result
