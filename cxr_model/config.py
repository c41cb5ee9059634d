"""One typed configuration for a run, its named profiles, and the one place that resolves paths."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from cxr_model.errors import DataError

DATA_ENV = "CXR_DATA_DIR"
WORK_ENV = "CXR_WORK_DIR"

DATASET_HELP = (
    "No dataset folder given. Download the Kaggle dataset 'paultimothymooney/chest-xray-pneumonia' "
    "(or Mendeley doi:10.17632/rscbjbr9sj, 'ChestXRay2017.zip'), unpack it, and point at the folder that "
    f"holds train/ and test/ with --data-dir DIR or the {DATA_ENV} environment variable."
)


# The network's fixed design choices (cxr_model.model.ConvNetConfig documents each); one definition for both.
Head = Literal["gap", "flatten", "gapmax"]
Block = Literal["plain", "residual", "separable"]
Antialias = Literal["none", "stem", "pools", "all"]
Intensity = Literal["standardize", "equalize", "rescale"]
Optimizer = Literal["adam", "sgd"]
# TrainConfig's settings that every network of a run shares (the search does not sample them)
NETWORK_SETTINGS = ("head", "block", "antialias", "intensity", "label_smoothing", "weight_decay", "ema", "optimizer")
# how the learning rate moves in the final training: plateau = cut by 0.3 when validation AUC stalls; cosine =
# from the learning rate down to 0 along half a cosine over the epochs (cxr_model.callbacks.CosineEpochs)
Schedule = Literal["plateau", "cosine"]

# Rules that pick the decision threshold on validation (see cxr_model.evaluate.choose_threshold). The stressed_
# ones fit the pooled scores of validation and its stressed copies (cxr_model.stress), the others clean validation.
ThresholdRule = Literal["margin", "youden", "balanced_accuracy", "f1", "stressed_margin", "stressed_youden",
                        "stressed_minimax"]
THRESHOLD_RULES: tuple[str, ...] = get_args(ThresholdRule)
STRESSED_RULES: tuple[str, ...] = tuple(r for r in THRESHOLD_RULES if r.startswith("stressed_"))
CLEAN_RULES: tuple[str, ...] = tuple(r for r in THRESHOLD_RULES if r not in STRESSED_RULES)

# Test-time views: the probability is averaged over the image magnified by `scale` and stretched to width:height
# `ratio` about its centre, for each (scale, ratio). Chosen on validation (docs/experiments.md, test-time views):
# the score of a single view follows how large and how wide the chest sits in the frame.
TestTimeViews = Literal["none", "scale", "aspect", "scale+aspect"]
_SCALES, _RATIOS = ((0.85, 1.0), (1.15, 1.0)), ((1.0, 0.85), (1.0, 1.18))  # zoomed out / in; narrower / wider
TTA_VIEWS: dict[str, tuple[tuple[float, float], ...]] = {
    "none": ((1.0, 1.0),),
    "scale": ((1.0, 1.0), *_SCALES),
    "aspect": ((1.0, 1.0), *_RATIOS),
    "scale+aspect": ((1.0, 1.0), *_SCALES, *_RATIOS),
}
assert set(get_args(TestTimeViews)) == set(TTA_VIEWS), "TestTimeViews must name every TTA_VIEWS entry"


def work_dir_from_environment() -> Path:
    """CXR_WORK_DIR of the machine the config is built on (a worker's, for a deployment), else ./work."""
    return Path(os.environ.get(WORK_ENV) or "work")


class TrainConfig(BaseModel):
    """Every setting of one flow run; profiles fill it, the CLI overrides single fields.

    However it is built (`load_config`, `TrainConfig(...)`, or a Prefect deployment's parameters), the fields it
    is not given come from its `profile` (PROFILES), then from the defaults below.
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    # Each field's description is its `cxr train` flag's help (cxr_pneumonia.cli derives the flags from these
    # fields) and its entry in docs; a comment above a field says why it is set as it is.
    profile: str = Field("default", frozen=True, description=(
        "preset the other fields start from (PROFILES); fixed once built, since only building a config fills it"))
    data_dir: Path | None = Field(None, description="dataset folder with train/ and test/ (or set CXR_DATA_DIR)")
    work_dir: Path = Field(default_factory=work_dir_from_environment, description=(
        "cache, tuner state and outputs (or set CXR_WORK_DIR; default ./work)"))
    # data
    image_size: int = Field(128, ge=16, le=1024, description="square side the images are resized to, in pixels")
    val_fraction: float = Field(0.15, gt=0.0, lt=0.5, description=(
        "share of train patients held out for validation: one of round(1/val_fraction) patient-grouped folds"))
    max_per_class: int | None = Field(None, ge=2, description="cap images per split and class (smoke runs)")
    seed: int = Field(42, description="one seed for the split, the tuner and weight initialisation")
    # search: the space (cxr_model.search.SearchSpace takes its ranges from these fields)
    search_blocks: tuple[int, int] = Field((3, 5), description="conv blocks after the stem (MIN MAX)")
    search_filters: tuple[int, ...] = Field((16, 24, 32), description="filters of the first block to choose from")
    search_convs_per_block: tuple[int, int] = Field((1, 2), description="3x3 convs per block (MIN MAX)")
    search_dropout: tuple[float, float] = Field((0.1, 0.5), description="dropout after pooling (MIN MAX, step 0.1)")
    search_dense_units: tuple[int, ...] = Field((0, 64, 128), description="hidden dense units to choose from (0: none)")
    search_learning_rate: tuple[float, float] = Field((3e-4, 3e-3), description="learning rate (MIN MAX, log-uniform)")
    head: Head = Field("gap", description=(
        "classifier head: global average pooling, flatten, or average and max pooling side by side"))
    block: Block = Field("plain", description=(
        "conv block: a chain of convs, the chain plus a shortcut from its input (ResNet), or depthwise-separable "
        "convs (a 3x3 filter per channel, then a 1x1 mix)"))
    antialias: Antialias = Field("none", description=(
        "low-pass filter before downsampling (BlurPool): in a full-resolution stem, in every max-pool, or both"))
    intensity: Intensity = Field("standardize", description=(
        "intensity normalisation inside the model: per image to zero mean and unit variance, per image by "
        "histogram equalization, or 0..255 to -1..1 for every image alike"))
    tuner: Literal["random", "bayesian", "hyperband"] = Field("random", description="Keras-Tuner's search algorithm")
    max_trials: int = Field(4, ge=1, description="random/bayesian trials (hyperband sizes itself from search_epochs)")
    search_epochs: int = Field(3, ge=1, description="epochs per trial (hyperband: max epochs)")
    search_fraction: float = Field(1.0, gt=0.0, le=1.0, description="share of the training split each trial sees")
    resume: bool = Field(False, description="continue the saved search state instead of starting over")
    # workers beat six times per period (cxr_model.distributed_faults); not part of the search state's key
    search_worker_timeout: float = Field(120.0, ge=5.0, le=86400.0, description=(
        "distributed search: drop a worker silent this many seconds and hand its trial to another"))
    # training
    epochs: int = Field(12, ge=1, description="most epochs of the final training; early stopping on validation decides")
    batch_size: int = Field(32, ge=1, description="images per training step")
    patience: int = Field(4, ge=1, description="early stopping: epochs without a validation AUC gain")
    train_minutes: float | None = Field(None, ge=0, description=(
        "wall-time budget of the final training in minutes, best epoch kept (0 or unset: none)"))
    snapshots: int = Field(1, ge=1, description=(
        "the model averages the predictions of this many best epochs by validation AUC (1: best only)"))
    # networks of one search trial trained from other seeds err less alike; the budget is shared by all of them
    members: int = Field(1, ge=1, le=16, description=(
        "train the chosen network this many times (seeds seed, seed+1, ...) and average them (1: one)"))
    # networks that differ in depth and width may err less alike than seeds of one network
    top_trials: int = Field(1, ge=1, le=8, description=(
        "train the networks of this many best search trials (each `members` times) and average them all"))
    augment: bool = Field(True, description="augment training images (the ranges below)")
    # Augmentation ranges (AUGMENTATION_FIELDS). Wide geometric ranges on purpose: without them the score follows
    # how large and how wide the chest sits in the frame (docs/experiments.md, augmentation).
    rotation: float = Field(0.04, ge=0.0, le=0.5, description="largest rotation, as a fraction of a full turn")
    zoom: float = Field(0.35, ge=0.0, le=0.5, description="largest scale change: 0.35 = scale 0.65..1.35")
    translation: float = Field(0.1, ge=0.0, le=0.5, description="largest shift, as a fraction of the side")
    aspect: float = Field(0.3, ge=0.0, le=1.0, description="log-range of the width:height stretch: 0.3 = 0.74..1.35")
    contrast: float = Field(0.3, ge=0.0, le=1.0, description="largest contrast change, as a factor - 1")
    brightness: float = Field(0.2, ge=0.0, le=1.0, description="largest brightness change, as a fraction of 255")
    gamma: float = Field(0.4, ge=0.0, le=1.0, description="log-range of the exposure-curve exponent: 0.4 = 0.67..1.49")
    resolution: float = Field(0.0, ge=0.0, lt=1.0,
                              description="largest loss of resolution: 0.5 = blended with a copy at half the side")
    erase: float = Field(0.0, ge=0.0, le=0.4,
                         description="largest band blanked at the top and at the bottom, as a fraction of the side")
    noise: float = Field(0.04, ge=0.0, le=0.5, description="largest sd of Gaussian noise, as a fraction of 255")
    label_smoothing: float = Field(0.0, ge=0.0, lt=0.5, description="softer targets: less overconfidence under shift")
    weight_decay: float = Field(0.0, ge=0.0, le=0.5,
                                description="AdamW's decoupled weight decay of the kernels (0: Adam)")
    ema: float = Field(0.0, ge=0.0, lt=1.0, description=(
        "judge, keep and save a moving average of the weights with this momentum per step, e.g. 0.99 (0: off)"))
    optimizer: Optimizer = Field("adam", description=(
        "adam, or SGD with Nesterov momentum 0.9 (give it ~10x Adam's search_learning_rate)"))
    schedule: Schedule = Field("plateau", description=(
        "final training's learning rate: cut when validation AUC stalls, or a cosine down to 0 over the epochs"))
    mixup: float = Field(0.0, ge=0.0, le=2.0, description=(
        "final training: blend image pairs by a Beta(a, a) weight, labels alike (0: off)"))
    # Off by default: without them the held-out, stressed-mean and worst-stress scores on validation were higher,
    # the stressed mean in 7 of 8 seeds (docs/experiments.md, class weights); the imbalance is left to the
    # threshold chosen on validation
    class_weights: bool = Field(False, description="weight the loss against the ~3:1 PNEUMONIA:NORMAL imbalance")
    balanced_sampling: bool = Field(False, description=(
        "draw both classes with equal odds in training instead (class weights are then not applied)"))
    # evaluation
    threshold_rule: ThresholdRule = Field("stressed_margin", description=(
        "how the decision threshold is chosen on validation (cxr_model.evaluate)"))
    tta: TestTimeViews = Field("scale", description="test-time views averaged in evaluation and serving")
    # tracking
    experiment_name: str = Field("cxr-pneumonia", description="MLflow experiment")
    model_name: str = Field("cxr-pneumonia", description="registered model name")
    champion_metric: Literal["roc_auc", "pr_auc", "f1", "accuracy"] = Field("roc_auc", description=(
        "validation metric a new version must beat to take the `champion` alias"))
    # compute
    threads: int | None = Field(None, ge=1, description="TensorFlow intra-op threads (default: one per core)")

    @model_validator(mode="before")
    @classmethod
    def _profile_fills_the_rest(cls, data: Any) -> Any:
        """The profile's settings under the given ones: {"profile": "smoke"} is the smoke profile, not a tag."""
        if not isinstance(data, dict):
            return data
        profile = data.get("profile", "default")
        if profile not in PROFILES:
            raise ValueError(f"Unknown profile {profile!r}; choose one of {sorted(PROFILES)}")
        return {**PROFILES[profile], **data}

    @model_validator(mode="after")
    def _enough_trials(self) -> TrainConfig:
        if self.tuner != "hyperband" and self.top_trials > self.max_trials:  # hyperband sizes itself
            raise ValueError(f"top_trials={self.top_trials} needs at least as many search trials "
                             f"(max_trials={self.max_trials})")
        return self

    @model_validator(mode="after")
    def _searchable_space(self) -> TrainConfig:
        """Ranges the tuner can sample, checked here rather than after the data has loaded."""
        ranges = dict(search_blocks=(self.search_blocks, 1), search_convs_per_block=(self.search_convs_per_block, 1))
        for name, ((low, high), least) in ranges.items():
            if not least <= low <= high:
                raise ValueError(f"{name}=({low}, {high}) needs {least} <= min <= max")
        low, high = self.search_dropout
        if not 0 <= low <= high < 1:
            raise ValueError(f"search_dropout=({low}, {high}) needs 0 <= min <= max < 1")
        low, high = self.search_learning_rate
        if not 0 < low <= high:
            raise ValueError(f"search_learning_rate=({low}, {high}) needs 0 < min <= max (sampled on a log scale)")
        if not self.search_filters or min(self.search_filters) < 1:
            raise ValueError(f"search_filters={self.search_filters} needs one or more widths, each >= 1")
        if not self.search_dense_units or min(self.search_dense_units) < 0:
            raise ValueError(f"search_dense_units={self.search_dense_units} needs one or more widths, each >= 0 "
                             "(0 = no hidden dense layer)")
        return self

    @field_validator("data_dir", "work_dir", mode="before")
    @classmethod
    def _expand(cls, value: Any) -> Any:
        return Path(value).expanduser() if isinstance(value, str | Path) else value

    def resolved_data_dir(self) -> Path:
        """The dataset root from the config or CXR_DATA_DIR; a clear error when neither is usable."""
        raw = self.data_dir or os.environ.get(DATA_ENV)
        if not raw:
            raise DataError(DATASET_HELP)
        path = Path(raw).expanduser().resolve()
        if not path.is_dir():
            raise DataError(f"Dataset folder {path} does not exist. {DATASET_HELP}")
        return path

    def search_space_params(self) -> dict[str, tuple]:
        """Keyword arguments of `SearchSpace` for this run."""
        return dict(blocks=self.search_blocks, filters=self.search_filters, convs_per_block=self.search_convs_per_block,
                    dropout=self.search_dropout, dense_units=self.search_dense_units,
                    learning_rate=self.search_learning_rate,
                    fixed={name: getattr(self, name) for name in NETWORK_SETTINGS})

    def search_state_key(self) -> str:
        """A short digest of every setting a search trial's score depends on (its state folder is named by it).

        `--resume` continues a search only under the same key: the same split (seed, val_fraction,
        max_per_class), input size, space, trial length and share of the data, batch size, augmentation and class
        weighting. Settings that only decide how many trials run or what happens after the search (max_trials,
        top_trials, epochs, the threshold rule, tracking) are left out, so a finished search can be extended.
        """
        settings = dict(space=self.search_space_params(), image_size=self.image_size, seed=self.seed,
                        val_fraction=self.val_fraction, max_per_class=self.max_per_class,
                        search_epochs=self.search_epochs, search_fraction=self.search_fraction,
                        batch_size=self.batch_size, patience=self.patience, augment=self.augment,
                        augmentation=self.augmentation_params(), class_weights=self.class_weights,
                        balanced_sampling=self.balanced_sampling)
        return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:8]

    def augmentation_params(self) -> dict[str, float | int]:
        """Keyword arguments of `build_augmentation` for this run."""
        return {**{name: getattr(self, name) for name in AUGMENTATION_FIELDS}, "seed": self.seed}

    @property
    def views(self) -> tuple[tuple[float, float], ...]:
        """(scale, width:height) of each test-time view."""
        return TTA_VIEWS[self.tta]

    @property
    def cache_dir(self) -> Path:
        return self.work_dir / "cache"

    @property
    def tuner_dir(self) -> Path:
        return self.work_dir / "tuner"

    @property
    def output_dir(self) -> Path:
        return self.work_dir / "outputs"


# the TrainConfig fields that are ranges of `cxr_model.augmentation.build_augmentation`
AUGMENTATION_FIELDS = ("rotation", "zoom", "translation", "aspect", "erase", "resolution", "contrast", "brightness",
                       "gamma", "noise")

# the whole dataset at 96 px, and the search and training lengths that the `default` and `full` profiles share
_WHOLE_DATA_RECIPE: dict[str, Any] = dict(
    # 96 px, not 128: over four seeds on validation it raised the stressed mean in every seed and held clean
    # validation and the worst stress, at about half the time (docs/experiments.md, input size)
    image_size=96, max_trials=6, search_epochs=3, search_fraction=0.5, epochs=12, patience=4,
    search_convs_per_block=(1, 1),  # one conv per block keeps an epoch under a minute on 2 cores
)

PROFILES: dict[str, dict[str, Any]] = {
    # a few dozen images, 2 trials of 1 epoch, 2 members of 2 epochs, all 4 epochs averaged: tests, a first look
    "smoke": dict(
        image_size=64, max_per_class=16, max_trials=2, search_epochs=1, epochs=2, snapshots=2, members=2,
        batch_size=16, patience=1, val_fraction=0.25,
    ),
    # the README's main job: whole dataset and a real search, within 20 minutes on the slowest 2-core machine
    # measured (2.5-3.3 minutes on a faster one)
    "default": dict(
        **_WHOLE_DATA_RECIPE,
        # on the slowest 2-core machine measured, the widest net the search can pick needed ~12.5 min for 12
        # epochs at 128 px (~7 at 96), the search ~6.5 and the rest ~2.5: the final training is cut at 10 minutes
        # so that the flow stays within 20 on such a machine too
        train_minutes=10.0,
    ),
    # the best model the project makes: the default's search, then the networks of its three best trials, each
    # trained in full (no time budget), averaged. Networks of different depth and width averaged beat the same
    # network trained twice under the held-out stresses; 160 px, 1.5x the width and 24 epochs, and residual
    # blocks lost there (docs/experiments.md).
    "full": dict(**_WHOLE_DATA_RECIPE, top_trials=3),
}


def load_config(profile: str = "default", **overrides: Any) -> TrainConfig:
    """Build a config from a named profile plus explicit overrides (None values are ignored)."""
    if profile not in PROFILES:
        raise ValueError(f"Unknown profile {profile!r}; choose one of {sorted(PROFILES)}")
    return TrainConfig(profile=profile, **{k: v for k, v in overrides.items() if v is not None})
