"""Site adaptation benchmark (`cxr adapt`): defaults chosen on stand-in sites made from validation, then the
test split read once per model, cross-fitted by patient halves.

    python benchmarks/quality.py --profile default --seeds 5 --first-seed 40 \\
        --out quality-adaptation-models.json -- --model-name cxr-adapt-bench
    python benchmarks/adaptation.py --models quality-adaptation-models.json --stage sites
    python benchmarks/adaptation.py --models quality-adaptation-models.json --stage test

`--stage sites` follows the rule of docs/adaptation.md on each model's own validation split: 24 stand-in sites
per model (8 acquisitions: clean and the 7 stresses of `cxr_model.stress`, x 3 class mixes: 40, 55 and 70 %
PNEUMONIA), each two disjoint draws of films, one adapted on with its labels hidden and the other scored. It
writes benchmarks/results/adaptation-sites.json with every candidate's numbers and the settings the rule picks;
they become `cxr_model.adapt`'s defaults by hand. Test is never loaded in this stage.

`--stage test` reads the library's defaults as they ship. Per model the 624 test films are split into two halves
by a fixed hash of the patient id; the model is adapted on one half's images (labels unused) and scores the other,
then the reverse, so no film is scored by a model adapted on it. Accuracy, ROC AUC, sensitivity, specificity and
ECE over the 624 cross-fitted answers, for the unadapted model, each component alone and the default, and the
default against the number of unlabeled films. Writes benchmarks/results/adaptation.json.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent)]

import mlflow  # noqa: E402
import numpy as np  # noqa: E402
from mlflow import MlflowClient  # noqa: E402

from cxr_model.adapt import (  # noqa: E402
    DEFAULT_SETTINGS,
    MIN_FILMS,
    AdaptError,
    AdaptSettings,
    Calibration,
    adapt,
    batchnorm_state,
    em_prior,
    read_site_folder,
    restore_batchnorm,
)
from cxr_model.cache import decoded_images  # noqa: E402
from cxr_model.config import load_config  # noqa: E402
from cxr_model.data import index_dataset, split_by_patient, split_rows  # noqa: E402
from cxr_model.evaluate import binary_metrics, expected_calibration_error  # noqa: E402
from cxr_model.inference import compile_forward  # noqa: E402
from cxr_model.runtime import configure_threads  # noqa: E402
from cxr_model.stress import stresses  # noqa: E402

METRICS = ("accuracy", "roc_auc", "sensitivity", "specificity", "ece")
MIXES = (0.40, 0.55, 0.70)  # stand-in sites' PNEUMONIA shares (training's is 0.74)
SITE_FILMS = 140  # films per draw of a stand-in site
COMPONENTS = ("calibration", "batchnorm", "prior")
BLEND_PRIORS = (16.0, 64.0, 256.0)
FILM_COUNTS = (16, 32, 64, 128)
CURVE_COUNTS = (16, 32, 64, 128)  # and all of a half
MAX_SITE_DROP = 0.005  # never worse than unadapted by more than 0.5 point on any site (averaged over models)
TIE = 0.002  # accuracies within 0.2 point tie; the tie goes to fewer components
MAX_PRIOR_ERROR = 0.05


class Model:
    """A registered run's network, its meta.json and its own split, with the source BatchNorm statistics kept."""

    def __init__(self, run_id: str, data_dir: str | None):
        import keras

        import cxr_model.layers  # noqa: F401  (the model's own layers, for loading)

        client = MlflowClient()
        params = client.get_run(run_id).data.params
        self.run_id, self.seed = run_id, int(params["cfg/seed"])
        cfg = load_config(params["cfg/profile"], data_dir=data_dir, seed=self.seed,
                          val_fraction=float(params["cfg/val_fraction"]), image_size=int(params["cfg/image_size"]))
        manifest = split_by_patient(index_dataset(cfg.resolved_data_dir()).manifest, cfg.val_fraction, cfg.seed)
        self.val, self.test = split_rows(manifest, "val"), split_rows(manifest, "test")
        self.images = decoded_images(manifest, cfg.image_size, cfg.cache_dir)
        local = Path(mlflow.artifacts.download_artifacts(f"runs:/{run_id}/model",
                                                         dst_path=tempfile.mkdtemp(prefix="cxr-adapt-bench-")))
        self.meta = json.loads(next(local.rglob("meta.json")).read_text())
        self.network = keras.models.load_model(next(local.rglob("*.keras")), compile=False)
        views = tuple((float(s), float(r)) for s, r in self.meta.get("views", [[1.0, 1.0]]))
        self.forward = compile_forward(self.network, views=views)
        self.source_state = batchnorm_state(self.network)
        self.threshold = float(self.meta["threshold"])
        self.source_prior = float(self.meta["source_prior"])
        self.calibration = Calibration(self.meta["calibration"]["temperature"], self.meta["calibration"]["bias"])

    def adapt(self, x: np.ndarray, settings: AdaptSettings):
        """The adaptation on films `x`, from the source statistics (None: refused, the site keeps the parent)."""
        restore_batchnorm(self.network, self.source_state)
        try:
            return adapt(self.network, lambda _: self.forward, x, self.threshold, self.source_prior, self.calibration,
                         settings)
        except AdaptError:
            return None

    def answers(self, adaptation, x: np.ndarray) -> tuple[np.ndarray, float]:
        """(probabilities, threshold) on films `x`: the adapted version's, or the parent's when `adaptation` is
        None. The network must hold `adaptation`'s statistics (call right after `adapt`)."""
        p = self.forward(x).astype(np.float64)
        if adaptation is None:
            return p, self.threshold
        return adaptation.transform(p), adaptation.threshold


def metrics(y: np.ndarray, p: np.ndarray, threshold: float) -> dict[str, float]:
    m = binary_metrics(y, p, threshold)
    return {k: float(m[k]) for k in METRICS[:-1]} | {"ece": float(expected_calibration_error(y, p))}


def settings_name(s: AdaptSettings) -> str:
    on = [c for c in COMPONENTS if getattr(s, c)]
    name = "+".join(on) or "unadapted"
    if s.batchnorm:
        name += f" (N={s.blend_prior:g}{', guard' if s.label_shift_guard else ''})"
    return name


# --- stand-in sites on validation ------------------------------------------------------------------------------

def stand_in_sites(model: Model) -> list[dict]:
    """24 sites: for each acquisition and class mix, two disjoint seeded draws of SITE_FILMS validation films."""
    y = model.val["label"].to_numpy()
    x = model.images.take(model.val)
    acquisitions = {"clean": x, **stresses(x)}
    pos, neg = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
    sites = []
    for a_index, (acquisition, xa) in enumerate(acquisitions.items()):
        for m_index, mix in enumerate(MIXES):
            rng = np.random.default_rng([model.seed, a_index, m_index])
            k = round(SITE_FILMS * mix)
            if 2 * k > len(pos) or 2 * (SITE_FILMS - k) > len(neg):
                raise SystemExit(f"validation of seed {model.seed} has {len(pos)} PNEUMONIA and {len(neg)} NORMAL "
                                 f"films: too few for two draws of {SITE_FILMS} at {mix:.0%}")
            p, n = rng.permutation(pos), rng.permutation(neg)
            draws = [rng.permutation(np.concatenate([p[i * k:(i + 1) * k], n[i * (SITE_FILMS - k):
                                                                             (i + 1) * (SITE_FILMS - k)]]))
                     for i in (0, 1)]
            sites.append(dict(acquisition=acquisition, mix=mix, x_adapt=xa[draws[0]], y_adapt=y[draws[0]],
                              x_score=xa[draws[1]], y_score=y[draws[1]]))
    return sites


def score_sites(model: Model, sites: list[dict], candidates: list[AdaptSettings], films: int | None = None) -> dict:
    """candidate name -> per-site metrics (and the EM prior's error on the adapted draw)."""
    out: dict[str, list[dict]] = {}
    for site in sites:
        x_adapt = site["x_adapt"][:films] if films else site["x_adapt"]
        truth = float(np.mean(site["y_adapt"][:films] if films else site["y_adapt"]))
        restore_batchnorm(model.network, model.source_state)
        raw = model.forward(x_adapt)  # the parent's scores of the films adapted on
        for settings in candidates:
            on = any(getattr(settings, c) for c in COMPONENTS)
            started = time.perf_counter()
            adaptation = model.adapt(x_adapt, settings) if on else None
            p, t = model.answers(adaptation, site["x_score"])
            seconds = time.perf_counter() - started
            restore_batchnorm(model.network, model.source_state)
            if adaptation is not None and adaptation.prior is not None:
                estimate = adaptation.prior.prior
            else:  # what EM reads from the parent's (calibrated, when on) scores
                estimate = em_prior(model.calibration.apply(raw) if settings.calibration else raw,
                                    model.source_prior).prior
            out.setdefault(settings_name(settings), []).append(dict(
                acquisition=site["acquisition"], mix=site["mix"], refused=on and adaptation is None,
                seconds=seconds, prior_error=abs(estimate - truth), **metrics(site["y_score"], p, t)))
    return out


def pick(results: dict[str, list[list[dict]]], candidates: dict[str, AdaptSettings], baseline: str) -> dict:
    """The rule: highest mean accuracy over sites and models, among candidates never worse than `baseline` by
    more than MAX_SITE_DROP on any site averaged over models; ties go to fewer components."""
    table = {}
    base = np.array([[r["accuracy"] for r in per_model] for per_model in results[baseline]])  # (models, sites)
    for name, per_models in results.items():
        acc = np.array([[r["accuracy"] for r in per_model] for per_model in per_models])
        drop = float(np.max(base.mean(axis=0) - acc.mean(axis=0)))
        table[name] = dict(mean_accuracy=float(acc.mean()), worst_site_drop=drop, admissible=drop <= MAX_SITE_DROP,
                           mean_ece=float(np.mean([[r["ece"] for r in m] for m in per_models])),
                           mean_prior_error=float(np.mean([[r["prior_error"] for r in m] for m in per_models])),
                           refusals=int(sum(r["refused"] for m in per_models for r in m)),
                           components=sum(getattr(candidates[name], c) for c in COMPONENTS))
    admissible = {k: v for k, v in table.items() if v["admissible"]}
    best = max(v["mean_accuracy"] for v in admissible.values())
    tied = [k for k, v in admissible.items() if v["mean_accuracy"] >= best - TIE]
    chosen = min(tied, key=lambda k: (table[k]["components"], -table[k]["mean_accuracy"]))
    return dict(table=table, chosen=chosen)


def sites_stage(models: list[Model]) -> dict:
    sites = {m.run_id: stand_in_sites(m) for m in models}
    provisional = AdaptSettings(bootstrap=0)
    combos = {}
    for bits in range(8):
        on = {c: bool(bits >> i & 1) for i, c in enumerate(COMPONENTS)}
        s = replace(provisional, **on)
        combos[settings_name(s)] = s
    step1 = run_candidates(models, sites, combos)
    components = pick(step1, combos, "unadapted")
    print_table("components (N=16, guard on)", components)
    chosen = combos[components["chosen"]]
    blend = None
    if chosen.batchnorm:
        variants = {settings_name(s): s for s in (replace(chosen, blend_prior=n, label_shift_guard=g)
                                                   for n in BLEND_PRIORS for g in (True, False))}
        step2 = run_candidates(models, sites, {"unadapted": combos["unadapted"], **variants})
        blend = pick(step2, {"unadapted": combos["unadapted"], **variants}, "unadapted")
        print_table("AdaBN blend and label-shift guard", blend)
        chosen = variants[blend["chosen"]]
    counts = {}
    for n in FILM_COUNTS:
        per_models = run_candidates(models, sites, {"unadapted": combos["unadapted"], "chosen": chosen}, films=n)
        acc = {k: float(np.mean([[r["accuracy"] for r in m] for m in v])) for k, v in per_models.items()}
        error = float(np.mean([[r["prior_error"] for r in m] for m in per_models["chosen"]]))
        counts[n] = dict(mean_accuracy=acc["chosen"], unadapted_accuracy=acc["unadapted"], mean_prior_error=error,
                         ok=error <= MAX_PRIOR_ERROR and acc["chosen"] >= acc["unadapted"])
        print(f"{n:4d} films: accuracy {acc['chosen']:.4f} (unadapted {acc['unadapted']:.4f}), prior error {error:.4f}")
    minimum = next((n for n in FILM_COUNTS if counts[n]["ok"]), None)
    return dict(models=[dict(run_id=m.run_id, seed=m.seed, val_films=len(m.val)) for m in models],
                components=components, blend=blend, film_counts=counts, chosen=asdict(chosen),
                chosen_name=settings_name(chosen), min_films=minimum)


def run_candidates(models, sites, candidates: dict[str, AdaptSettings], films: int | None = None) -> dict:
    per_model = [score_sites(m, sites[m.run_id], list(candidates.values()), films) for m in models]
    return {name: [pm[settings_name(s)] for pm in per_model] for name, s in candidates.items()}


def print_table(title: str, picked: dict) -> None:
    print(f"\n{title}: chosen {picked['chosen']}")
    print(f"{'candidate':42s} {'accuracy':>8s} {'worst drop':>10s} {'ECE':>6s} {'prior err':>9s} refused")
    for name, row in sorted(picked["table"].items(), key=lambda kv: -kv[1]["mean_accuracy"]):
        print(f"{name:42s} {row['mean_accuracy']:8.4f} {row['worst_site_drop']:10.4f} {row['mean_ece']:6.3f} "
              f"{row['mean_prior_error']:9.4f} {row['refusals']:4d}{'' if row['admissible'] else '  (inadmissible)'}")


# --- the test split, cross-fitted -------------------------------------------------------------------------------

def patient_half(patient_id: str) -> int:
    """0 or 1 by a fixed hash of the patient id: every film of a patient on one side."""
    return hashlib.sha256(str(patient_id).encode()).digest()[0] & 1


def cross_fitted(model: Model, settings: AdaptSettings | None, films: int | None = None) -> dict:
    """Metrics over the test films, each scored by the model adapted on the other half (`films` of it)."""
    halves = model.test["patient_id"].map(patient_half).to_numpy()
    x, y = model.images.take(model.test), model.test["label"].to_numpy()
    p, t = np.zeros(len(y)), np.zeros(len(y))
    record, seconds = [], []
    for side in (0, 1):
        source, target = np.flatnonzero(halves == side), np.flatnonzero(halves != side)
        if films:
            source = np.random.default_rng([model.seed, side]).permutation(source)[:films]
        started = time.perf_counter()
        adaptation = model.adapt(x[source], settings) if settings is not None else None
        seconds.append(time.perf_counter() - started)
        p[target], t[target] = model.answers(adaptation, x[target])
        restore_batchnorm(model.network, model.source_state)
        if adaptation is not None:
            record.append(dict(films=len(source), prior=None if adaptation.prior is None else adaptation.prior.prior,
                               interval=None if adaptation.prior is None else adaptation.prior.interval,
                               threshold=adaptation.threshold, seconds=seconds[-1]))
        elif settings is not None:
            record.append(dict(films=len(source), refused=True))
    called = p >= t
    m = metrics(y, p, 0.5) | dict(accuracy=float(np.mean(called == y)),
                                  sensitivity=float(np.mean(called[y == 1])),
                                  specificity=float(np.mean(~called[y == 0])))
    return m | dict(halves=record, true_prior_halves=[float(y[halves == s].mean()) for s in (0, 1)])


def test_stage(models: list[Model]) -> dict:
    default = DEFAULT_SETTINGS
    every = replace(default, **{c: True for c in COMPONENTS}, bootstrap=200)
    configs = {"unadapted": None, **{f"{c} alone": replace(every, **{k: k == c for k in COMPONENTS})
                                     for c in COMPONENTS}, "all three": every,
               "default": default if any(getattr(default, c) for c in COMPONENTS) else None}
    curved = configs["default"] or every  # the film-count curve of what `cxr adapt` does with components on
    per_model = []
    for model in models:
        row = dict(run_id=model.run_id, seed=model.seed, **{k: cross_fitted(model, s) for k, s in configs.items()})
        row["curve"] = {str(n): cross_fitted(model, curved, n) for n in CURVE_COUNTS}
        per_model.append(row)
        print(f"seed {model.seed}: " + "  ".join(f"{k} acc {row[k]['accuracy']:.4f} spec {row[k]['specificity']:.3f}"
                                                 for k in configs), flush=True)
    timing = time_a_site(models[0], curved)

    def mean_sd(key, metric, curve=None):
        vals = [(r["curve"][curve] if curve else r[key])[metric] for r in per_model]
        return dict(mean=statistics.mean(vals), sd=statistics.stdev(vals) if len(vals) > 1 else 0.0)

    summary = {k: {m: mean_sd(k, m) for m in METRICS} for k in configs}
    curve = {str(n): {m: mean_sd("default", m, str(n)) for m in METRICS} for n in CURVE_COUNTS}
    curve["all"] = summary["default" if configs["default"] else "all three"]
    mean = {m: summary["default"][m]["mean"] for m in METRICS} | {
        "unadapted": {m: summary["unadapted"][m]["mean"] for m in METRICS}}
    return dict(settings=asdict(default), settings_name=settings_name(default), curve_settings=settings_name(curved),
                min_films=MIN_FILMS,
                models=per_model, summary=summary, curve=curve, mean=mean, timing=timing)


def time_a_site(model: Model, settings: AdaptSettings) -> dict:
    """`cxr adapt`'s work on one half of test (about 312 films) from files: reading the folder and adapting."""
    half = model.test[model.test["patient_id"].map(patient_half) == 0]
    with tempfile.TemporaryDirectory() as tmp:
        for i, path in enumerate(half["path"]):  # one flat folder, names that say nothing of the label
            os.symlink(path, Path(tmp) / f"film{i:04d}{Path(path).suffix}")
        started = time.perf_counter()
        site = read_site_folder(tmp, int(model.meta["image_size"]))
        read = time.perf_counter() - started
        adaptation = model.adapt(site.images, settings)
        total = time.perf_counter() - started
    restore_batchnorm(model.network, model.source_state)
    return dict(films=len(site.images), read_seconds=read, total_seconds=total, refused=adaptation is None,
                settings=settings_name(settings))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", required=True,
                        help="benchmarks/quality.py's output (under benchmarks/results/ or a path): the runs to adapt")
    parser.add_argument("--stage", choices=("sites", "test"), required=True)
    parser.add_argument("--data-dir", default=os.environ.get("CXR_DATA_DIR"))
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    configure_threads(args.threads)
    runs = json.loads((HERE / "results" / args.models).read_text())["runs"]
    models = [Model(r["run_id"], args.data_dir) for r in runs]
    if args.stage == "sites":
        result, out = sites_stage(models), HERE / "results" / "adaptation-sites.json"
    else:
        result, out = test_stage(models), HERE / "results" / "adaptation.json"
        print(f"\n{'':24s} " + " ".join(f"{m:>16s}" for m in METRICS))
        for k, row in result["summary"].items():
            print(f"{k:24s} " + " ".join(f"{row[m]['mean']:8.4f} ± {row[m]['sd']:.3f}" for m in METRICS))
        for n, row in result["curve"].items():
            print(f"default, {n:>4s} films      " + " ".join(f"{row[m]['mean']:8.4f} ± {row[m]['sd']:.3f}"
                                                         for m in METRICS))
        print(f"timing: {result['timing']}")
    out.write_text(json.dumps(result, indent=2, default=float))
    print(f"wrote {out}")


if __name__ == "__main__":
    from errors import run_main

    run_main(main)
