"""Recipe probe on validation only: which training recipe and threshold rule hold up under acquisition shift.

    python benchmarks/recipe.py                       # every recipe in RECIPES, seed 0
    python benchmarks/recipe.py --recipes base geometry --seeds 2
    python benchmarks/recipe.py --recipes geometry --seeds 3 --first-seed 1

The test split is never read here (the script does not even load it). Each recipe trains the default
profile's architecture on the patient-grouped train split (a recipe with `members=N` trains it N times, seeds
seed..seed+N-1, and scores the mean of their predictions, as a flow's `--members N` does) and is scored on

- the clean validation split (ROC AUC, and each threshold rule's held-out balanced accuracy from
  repeated 2-fold cross-fitting inside validation, see `cxr_model.evaluate.cross_fit_rules`), and
- *stressed* validation: the same images after shifts a different scanner or hospital could cause
  (gamma, blur from a lower native resolution, a wider field of view, sensor noise, a chest 20% narrower or
  broader once the scan is squashed to a square). The threshold is
  fixed on clean validation and carried to the stressed copies, which is what happens to a deployed model.

and, as a view rather than a score, where the Grad-CAM evidence of the true class sits on 100 clean validation images
per class (`cam`: median share in the central box, the top and the bottom band; see gradcam_regions.py).

Validation carved from train is nearly separable here (AUC ~0.99), so the clean numbers barely separate
recipes; the stressed numbers are the tie-breaker. Adds to benchmarks/results/recipe.json (a rerun of a
recipe and seed replaces its earlier result).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent)]

from benchmarks.gradcam_regions import class_region_shares  # noqa: E402
from cxr_model.cache import decoded_images  # noqa: E402
from cxr_model.config import load_config  # noqa: E402
from cxr_model.data import index_dataset, split_by_patient, split_rows  # noqa: E402
from cxr_model.evaluate import CLEAN_RULES, binary_metrics, choose_threshold, cross_fit_rules  # noqa: E402
from cxr_model.fitting import fit_networks  # noqa: E402
from cxr_model.inference import compile_forward  # noqa: E402
from cxr_model.model import ConvNetConfig  # noqa: E402
from cxr_model.stress import stressed_scores  # noqa: E402

# the default's augmentation ranges (recipe `geometry`), the base of every later recipe
GEOMETRY = dict(zoom=0.35, translation=0.1, aspect=0.3, gamma=0.4, noise=0.04, resolution=0.0)
BASE = dict(blocks=4, filters=32, convs_per_block=1, dense_units=64, dropout=0.3)
# every recipe's input side unless it sets `image_size`: the default profile's when the probes began, pinned so
# that a recipe means the same whatever the default profile has become since
BASE_SIZE = 128
# name -> (ConvNetConfig overrides, TrainConfig overrides)
# (a list of ConvNetConfig overrides: one member network each, seeds seed, seed+1, ..., scored as their mean)
RECIPES: dict[str, tuple[dict | list[dict], dict]] = {
    # the first augmentation: mild geometry, contrast and brightness only
    "base": ({}, dict(zoom=0.1, translation=0.08, aspect=0.0, gamma=0.0, noise=0.0, resolution=0.0)),
    # what stressed validation of `base` pointed at: a brighter exposure curve (gamma 0.6), a wider field of
    # view and sensor noise cost specificity, so augment with random gamma, a wider zoom range and noise
    "robust": ({}, dict(zoom=0.2, translation=0.08, aspect=0.0, gamma=0.4, noise=0.04, resolution=0.0)),
    "robust+smooth": (dict(label_smoothing=0.1),
                      dict(zoom=0.2, translation=0.08, aspect=0.0, gamma=0.4, noise=0.04, resolution=0.0)),
    # every scan was squashed to a square whatever its shape, so the width:height of a chest is a property of
    # the scanner and the crop; the reference's ImageDataGenerator zooms width and height apart, Keras'
    # RandomZoom and our warp did not
    "robust+aspect": ({}, dict(zoom=0.2, translation=0.08, aspect=0.3, gamma=0.4, noise=0.04, resolution=0.0)),
    # what stressed validation of `robust` and `robust+aspect` pointed at: the score follows how large and how
    # wide the chest sits in the frame (narrower -> PNEUMONIA under `robust`, a wider view -> PNEUMONIA
    # under `robust+aspect`), so widen every geometric range together (the default's ranges)
    "geometry": ({}, GEOMETRY),
    # what stressed validation of `geometry` pointed at: a scan of half the resolution costs specificity (0.83),
    # so blend in a random loss of resolution. Its `blur` stress is the augmentation's own extreme, so judge
    # it by the other stresses and clean validation too, not by `blur` alone (so judged: a wash, and not the
    # default; docs/experiments.md, "A random loss of resolution")
    "geometry+resolution": ({}, dict(zoom=0.35, translation=0.1, aspect=0.3, gamma=0.4, noise=0.04, resolution=0.5)),
    # global average pooling counts a feature the same wherever it sits, at the edge of the frame or over the
    # abdomen as much as in the lungs; a flatten head (the reference's) lets the dense layer weigh it by place
    "geometry+flatten": (dict(head="flatten"), GEOMETRY),
    # softer targets: a model that is never pushed to p = 0 or 1 may drift less far when the scanner changes
    "geometry+smooth": (dict(label_smoothing=0.1), GEOMETRY),
    # no class weights: the ~3:1 imbalance is left to the threshold (a NORMAL image weighs as much as a PNEUMONIA
    # one, not ~2.9x as much)
    "geometry-class-weights": ({}, dict(**GEOMETRY, class_weights=False)),
    # balanced sampling instead of class weights: NORMAL images recur ~1.9x as often, each time under a new
    # augmentation, so the model sees more of how a normal chest can look instead of weighing the same few views
    # 2.9x; the shift costs specificity, and normals are the class it misreads
    "geometry+balanced": ({}, dict(**GEOMETRY, balanced_sampling=True)),
    # histogram equalization instead of standardization: the model sees each pixel's rank within its image, so
    # no monotone exposure curve (a scanner's gamma, window and level) can move its score; the stresses that
    # are not exposure curves (blur, field of view, noise, shape) judge whether it costs anything else
    "geometry+equalize": (dict(intensity="equalize"), GEOMETRY),
    # no per-image normalisation: 0..255 -> -1..1 for every image (the reference notebook's /255). Standardizing
    # measures the lungs against the whole frame, so more dark background (the `wider_view` stress, where
    # `geometry` loses most specificity) makes the same lungs read brighter, i.e. more opaque; exposure is left to
    # the augmentation's gamma, contrast and brightness
    "geometry+rescale": (dict(intensity="rescale"), GEOMETRY),
    # input resolution (the quality issue's first lever): 160 px instead of 128, the same network, 1.56x its
    # FLOPs. The stride-2 stem leaves the first block 64 px at 128; the reference notebook's first conv sees 150
    "geometry@160": ({}, dict(**GEOMETRY, image_size=160)),
    # the other way: 96 px, 0.56x the FLOPs. Coarser input leaves less fine texture to learn (the `blur`
    # stress, a scan of lower native resolution, is where `geometry` loses most specificity) and buys epochs
    # or members within a time budget
    "geometry@96": ({}, dict(**GEOMETRY, image_size=96)),
    # what 96 px buys: two members (seeds 0 and 1) averaged, in about the time of one network at 128 px
    "geometry@96x2": ({}, dict(**GEOMETRY, image_size=96, members=2)),
    # band erasing: the Grad-CAM maps of whole flows put up to 0.46 of the NORMAL evidence in the bottom band (the
    # upper abdomen), and one such model read test normals badly (docs/experiments.md, the Grad-CAM regions).
    # Blank a random band of up to 20% of the side at the top and at the bottom of every training image, so
    # what lies above and below the lungs stops being a reliable cue; judged by the stresses and by where the
    # Grad-CAM evidence of clean validation images sits (`cam`)
    "geometry+erase": ({}, dict(**GEOMETRY, erase=0.2)),
    # the reference notebook's rotation range (30 degrees; the default's 0.04 turn is ~14): the reference reads
    # test specificity 0.82 where this project's flows read 0.68-0.78
    "geometry+rot30": ({}, dict(**GEOMETRY, rotation=30 / 360)),
    # mixup (Zhang et al. 2018): train on blends of two images and of their labels. Soft targets between the
    # classes keep the score from resting on any one cue at full weight, and it is the textbook lever for
    # calibration under shift: what a shift moves is where on the score scale normals land
    "geometry+mixup": ({}, dict(**GEOMETRY, mixup=0.2)),
    # width: 48 filters in the first block instead of 32 (48-96-192-256), 2.06x the FLOPs. The reference notebook,
    # which reads test specificity 0.82, spends ~4x this project's FLOPs per image; a wider net is the `full`
    # profile's lever (no time budget), not the default's
    "geometry+wide": (dict(filters=48), GEOMETRY),
    # a longer schedule (the quality issue's lever): `geometry` runs all of its 12 epochs without early stopping
    # firing, so validation may still have been improving. 24 epochs, patience 6 (learning-rate cuts after 3 flat
    # epochs): the `full` profile's lever (no time budget), not the default's
    "geometry+long": ({}, dict(**GEOMETRY, epochs=24, patience=6)),
    # residual blocks (the quality issue's search-space lever): each block's conv plus a shortcut from its input
    # (a 1x1 projection, since every block here doubles the width), joined before the ReLU. At one conv per
    # block this is RepVGG's training-time block (Ding et al. 2021) without its identity branch: ~1.1x the
    # FLOPs, so it would fit the default's budget
    "geometry+residual": (dict(block="residual"), GEOMETRY),
    # two convs per block with the shortcut around them: ResNet's basic block (He et al. 2016), ~2x the FLOPs
    # anti-aliased downsampling (BlurPool, Zhang 2019): `blur` (a scan of half the native resolution) is where
    # `geometry` loses most specificity after the wider view, i.e. the model reads fine detail as NORMAL; a strided
    # stem and max-pools alias such detail into coarse patterns. Filtering before each subsampling keeps only what
    # the coarser grid can hold. The stem convolves at full resolution (its FLOPs x4, ~1.1x in all)
    "geometry+antialias": (dict(antialias="all"), GEOMETRY),  # its oldest JSON entry records it as `true`
    # the stem alone: its stride-2 conv on raw pixels is the first place detail aliases, and the cheap one to fix
    # (`all` took 1.66x the time for 1.04x the counted FLOPs)
    "geometry+antialias-stem": (dict(antialias="stem"), GEOMETRY),
    "geometry+residual2": (dict(block="residual", convs_per_block=2), GEOMETRY),
    # the max-pools alone (`all` raised every shape stress and the worst, `stem` alone bought none of
    # it for 1.40x the time, so the gains sit in the filtered max-pools); the stem stays a strided conv
    "geometry+antialias-pools": (dict(antialias="pools"), GEOMETRY),
    # the two levers that passed the four-seed rule (96 px, anti-aliasing), together
    "geometry@96+antialias": (dict(antialias="all"), dict(**GEOMETRY, image_size=96)),
    # levers that one seed rejected at 128 px, judged again on four seeds at the
    # default's 96 px. Band erasing: the Grad-CAM reason above still stands (NORMAL evidence in the abdomen)
    "geometry@96+erase": ({}, dict(**GEOMETRY, image_size=96, erase=0.2)),
    # label smoothing: softer targets, the calibration lever
    "geometry@96+smooth": (dict(label_smoothing=0.1), dict(**GEOMETRY, image_size=96)),
    # balanced sampling: more views of the class that the shift costs (NORMAL), each augmented anew
    "geometry@96+balanced": ({}, dict(**GEOMETRY, image_size=96, balanced_sampling=True)),
    # three more one-seed rejections at 128 px, on four seeds at 96 px
    "geometry@96+flatten": (dict(head="flatten"), dict(**GEOMETRY, image_size=96)),
    "geometry@96-class-weights": ({}, dict(**GEOMETRY, image_size=96, class_weights=False)),
    "geometry@96+mixup": ({}, dict(**GEOMETRY, image_size=96, mixup=0.2)),
    # further down the road that 128 -> 96 px took (the stressed mean rose in 4 of 4 seeds, and test
    # specificity followed, 0.735 -> 0.781): coarser input again, 80 and 64 px (0.69x and 0.44x the 96 px FLOPs)
    "geometry@80": ({}, dict(**GEOMETRY, image_size=80)),
    "geometry@64": ({}, dict(**GEOMETRY, image_size=64)),
    # weight decay (AdamW, decoupled, on the kernels; 0.05 as ConvNeXt and DeiT train with): the
    # optimizer is plain Adam, so nothing but early stopping and dropout keeps the weights
    # small; a smaller-weight model leans on fewer, stronger cues, the regularisation lever the issue does not list
    "geometry@96+wd": (dict(weight_decay=0.05), dict(**GEOMETRY, image_size=96)),
    # histogram equalization at the default's 96 px (one seed rejected it at 128 px): no monotone
    # exposure curve can move the score, so the gamma stresses cannot cost anything; the others judge it
    "geometry@96+equalize": (dict(intensity="equalize"), dict(**GEOMETRY, image_size=96)),
    # for the `full` profile, with class weights off: the two ways of spending
    # more compute that lost under class weights, asked again without them. 24 epochs with patience 6
    # (`geometry+long` at 128 px): the unweighted default trained all 12 epochs in every flow and kept epoch
    # 8-12, so it may stop short; and 128 px (96 px was chosen with class weights on)
    "geometry@96-class-weights+long": ({}, dict(**GEOMETRY, image_size=96, class_weights=False, epochs=24,
                                               patience=6)),
    "geometry@128-class-weights": ({}, dict(**GEOMETRY, image_size=128, class_weights=False)),
    # the two regularisers that tied under class weights, asked again
    # without them; neither costs compute, so an adopted one would move the default and the full profile alike
    "geometry@96-class-weights+wd": (dict(weight_decay=0.05), dict(**GEOMETRY, image_size=96, class_weights=False)),
    "geometry@96-class-weights+smooth": (dict(label_smoothing=0.1),
                                         dict(**GEOMETRY, image_size=96, class_weights=False)),
    # depthwise-separable blocks (the quality issue's "residual or separable blocks"):
    # a 3x3 filter per channel then a 1x1 mix, ~1/8 of a block's FLOPs at these widths; fewer weights
    # per block may lean on fewer texture cues
    "geometry@96-class-weights+separable": (dict(block="separable"),
                                            dict(**GEOMETRY, image_size=96, class_weights=False)),
    # Polyak averaging (`--ema 0.99`: the weights judged, kept and saved are an exponential moving
    # average over ~100 steps, about 0.7 of an epoch here). Averaging whole networks raised validation and not
    # test (the `full` profile's ensembles); averaging one network's weights along its path is the other kind,
    # found to land in flatter regions (Izmailov et al. 2018); it costs no FLOPs, so it would serve both profiles
    "geometry@96-class-weights+ema": (dict(ema=0.99), dict(**GEOMETRY, image_size=96, class_weights=False)),
    # batch 16 instead of 32: twice the steps per epoch and noisier gradients, which
    # lead small-batch training to flatter minima that generalise better (Keskar et al., ICLR 2017); ~1.3x the
    # time per image on 2 cores. And average and max pooling side by side (`--head gapmax`): the average says
    # how much of a feature the film shows, the max how strongly it shows at its strongest place, where one
    # consolidation in one lobe is the evidence; the classifier head is one of the levers
    "geometry@96-class-weights+b16": ({}, dict(**GEOMETRY, image_size=96, class_weights=False, batch_size=16)),
    "geometry@96-class-weights+gapmax": (dict(head="gapmax"), dict(**GEOMETRY, image_size=96, class_weights=False)),
    # augmentation strength (one of the levers), the one kind of change whose
    # validation gain has carried to test here (the wider geometry: test accuracy 0.842 -> 0.893). All
    # ranges 1.5x (zoom capped at its 0.5 limit): rotation, zoom, shift, stretch, gamma, contrast, brightness,
    # noise; and the geometric ranges alone 1.5x (rotation, zoom, shift, stretch)
    "geometry@96-class-weights+aug1.5": ({}, dict(rotation=0.06, zoom=0.5, translation=0.15, aspect=0.45, gamma=0.6,
                                                 contrast=0.45, brightness=0.3, noise=0.06, resolution=0.0,
                                                 image_size=96, class_weights=False)),
    "geometry@96-class-weights+geo1.5": ({}, dict(**{**GEOMETRY, "zoom": 0.5, "translation": 0.15, "aspect": 0.45},
                                                 rotation=0.06, image_size=96, class_weights=False)),
    # every range 0.75x, the other side of the current strength after 1.5x lost
    "geometry@96-class-weights+aug0.75": ({}, dict(rotation=0.03, zoom=0.2625, translation=0.075, aspect=0.225,
                                                  gamma=0.3, contrast=0.225, brightness=0.15, noise=0.03,
                                                  resolution=0.0, image_size=96, class_weights=False)),
    # the optimizer and the schedule (the speed issue's levers, never asked for quality). SGD with
    # Nesterov momentum 0.9 at 10x Adam's rate (0.01; 0.1 per 256 images, Goyal et al. 2017, is 0.0125 here):
    # adaptive methods find solutions that generalise worse than SGD's on image classifiers (Wilson et al. 2017),
    # and Adam has trained every network here. A cosine from the rate down to 0 over the 12
    # epochs (Adam), in place of the cut by 0.3 when validation AUC stalls: the last epochs take small steps
    # whatever validation says, where the plateau rule moves the rate by what the validation split rewards
    "geometry@96-class-weights+sgd": (dict(optimizer="sgd", learning_rate=0.01),
                                      dict(**GEOMETRY, image_size=96, class_weights=False)),
    "geometry@96-class-weights+cosine": ({}, dict(**GEOMETRY, image_size=96, class_weights=False, schedule="cosine")),
    # the quality issue's "longer schedules with cosine decay" as one lever, 24 epochs
    # (patience 6, as `+long`) along a cosine to 0; the cosine over 12 held clean validation best
    "geometry@96-class-weights+long-cosine": ({}, dict(**GEOMETRY, image_size=96, class_weights=False, epochs=24,
                                                      patience=6, schedule="cosine")),
    # ensembling different networks (the quality issue's "ensembling the top trials"; `cxr train --top-trials`):
    # the default network (seed 0) and a deeper, narrower one without a hidden dense layer (seed 1), the kind
    # the search picks next to it (5 blocks from 24 filters, dense 0). Members of one network err
    # alike (the three-member `full` profile); networks that see at other scales may err less alike
    "geometry+arch2": ([{}, dict(blocks=5, filters=24, dense_units=0)], GEOMETRY),
    # its control: the default network twice (seeds 0 and 1), which is what `--members 2` trains
    "geometry+seed2": ({}, dict(**GEOMETRY, members=2)),
}
CAM_PER_CLASS = 100  # validation images per class whose Grad-CAM maps are split into regions (a fixed draw)


def train_and_validation(data_dir: str | None, image_size: int | None = None) -> dict[str, tuple]:
    """{"train": (images, labels), "val": (images, labels)} of the default profile's patient-grouped split.

    Decoded at `image_size` (`BASE_SIZE` when None). The test split is dropped before anything is
    decoded: these probes never load it.
    """
    cfg = load_config("default", data_dir=data_dir, image_size=image_size or BASE_SIZE)
    manifest = split_by_patient(index_dataset(cfg.resolved_data_dir()).manifest, cfg.val_fraction, cfg.seed)
    manifest = manifest[manifest["split"] != "test"]  # never loaded, never scored
    images = decoded_images(manifest, cfg.image_size, cfg.cache_dir)
    parts = {s: split_rows(manifest, s) for s in ("train", "val")}
    return {s: (images.take(part), part["label"].to_numpy()) for s, part in parts.items()}


def run(name: str, seed: int, splits) -> dict:
    model_over, train_over = RECIPES[name]
    # no time budget: every recipe's 12 epochs
    # class weights were on in the default when most recipes ran: pinned, as the input side is, so that a
    # recipe means what it meant when it ran (`-class-weights` recipes turn them off)
    cfg = load_config("default", seed=seed, train_minutes=0,
                      **{"image_size": BASE_SIZE, "class_weights": True, **train_over})
    (xt, yt), (xv, yv) = splits["train"], splits["val"]
    nets = [ConvNetConfig(image_size=cfg.image_size, **{**BASE, **over})
            for over in (model_over if isinstance(model_over, list) else [model_over] * cfg.members)]
    started = time.perf_counter()
    # as the flow trains members: seeds seed, seed+1, ...; the mean of their kept epochs is the model
    fitted = fit_networks(nets, cfg, xt, yt, xv, yv)
    model = fitted.model()
    epochs = fitted.epochs
    minutes = (time.perf_counter() - started) / 60
    predict = compile_forward(model)
    p_val = predict(xv)
    thresholds = {rule: choose_threshold(yv, p_val, rule) for rule in CLEAN_RULES}
    p_stressed = stressed_scores(predict, xv)  # scored once, read by every rule
    # median share of the true class's Grad-CAM evidence in the central box, the top and the bottom band
    cam = class_region_shares(model, xv, yv, CAM_PER_CLASS, seed=0)
    result = dict(recipe=name, seed=seed, augmentation=cfg.augmentation_params(), model_overrides=model_over,
                  train_overrides=train_over,
                  minutes=minutes, epochs=epochs[0] if len(epochs) == 1 else epochs,
                  thresholds=thresholds, val_auc=binary_metrics(yv, p_val, 0.5)["roc_auc"],
                  cross_fit=cross_fit_rules(yv, p_val), cam=cam, stressed={})
    for rule, t in thresholds.items():
        result["stressed"][rule] = {}
        for stress, p in p_stressed.items():
            m = binary_metrics(yv, p, t)
            result["stressed"][rule][stress] = dict(auc=m["roc_auc"], sens=m["sensitivity"], spec=m["specificity"],
                                                    balanced_accuracy=(m["sensitivity"] + m["specificity"]) / 2)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipes", nargs="*", default=list(RECIPES), choices=list(RECIPES))
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument("--data-dir", default=os.environ.get("CXR_DATA_DIR"))
    parser.add_argument("--tag", default="", help="recorded as RECIPE#TAG: the same recipe run again after a code "
                                                  "change, kept beside its earlier results")
    args = parser.parse_args()
    results = []
    splits_by_size: dict[int, dict] = {}  # the same patient-grouped split, decoded once per input size
    for name in args.recipes:
        size = RECIPES[name][1].get("image_size", BASE_SIZE)
        if size not in splits_by_size:
            splits_by_size[size] = train_and_validation(args.data_dir, size)
        for seed in range(args.first_seed, args.first_seed + args.seeds):
            r = run(name, seed, splits_by_size[size])
            r["recipe"] = f"{name}#{args.tag}" if args.tag else name
            results.append(r)
            print(json.dumps(r), flush=True)
    print(f"\n{'recipe':24s} {'seed':>4s} {'min':>5s} {'ep':>3s} {'val AUC':>8s} {'stress AUC':>10s}  "
          + "  ".join(f"{r[:8]:>8s} cf/st" for r in CLEAN_RULES))
    for r in results:
        st_auc = statistics.mean(v["auc"] for v in r["stressed"]["margin"].values())
        cells = []
        for rule in CLEAN_RULES:
            cf = r["cross_fit"].get(rule, {}).get("balanced_accuracy", float("nan"))
            st = statistics.mean(v["balanced_accuracy"] for v in r["stressed"][rule].values())
            cells.append(f"{cf:.3f}/{st:.3f}")
        print(f"{r['recipe']:24s} {r['seed']:4d} {r['minutes']:5.1f} {str(r['epochs']):>3s} {r['val_auc']:8.4f} "
              f"{st_auc:10.4f}  " + "  ".join(f"{c:>14s}" for c in cells))
    out = HERE / "results" / "recipe.json"
    out.parent.mkdir(exist_ok=True)
    # runs accumulate: a new run replaces the same recipe and seed, and leaves the others
    fresh = {(r["recipe"], r["seed"]) for r in results}
    kept = [r for r in json.loads(out.read_text()) if (r["recipe"], r["seed"]) not in fresh] if out.exists() else []
    out.write_text(json.dumps(kept + results, indent=2))
    print(f"wrote {out} ({len(kept)} earlier results kept)")


if __name__ == "__main__":
    from errors import run_main

    run_main(main)
