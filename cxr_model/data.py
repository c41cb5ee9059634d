"""Index a dataset folder into a manifest, split it by patient, and find duplicates across splits.

Raw data is read-only here: files that do not decode are listed in a report, never touched.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedGroupKFold

from cxr_model.config import TrainConfig
from cxr_model.errors import DataError
from cxr_model.preprocess import ImageDecodeError, check_convertible, exif_orientation, open_image

CLASSES = ("NORMAL", "PNEUMONIA")  # label 0, label 1
REQUIRED_SPLITS = ("train", "test")
OPTIONAL_SPLITS = ("val",)
MANIFEST_COLUMNS = [
    "path", "folder", "split", "label", "class_name", "patient_id", "width", "height", "mode", "sha256",
]

# person1000_bacteria_2931.jpeg, person1_virus_6.jpeg, person1619_virus_2806_1.jpeg
_PERSON = re.compile(r"^(person\d+)_(?:bacteria|virus)_\d+", re.IGNORECASE)
# IM-0115-0001.jpeg, IM-0117-0001-0002.jpeg, NORMAL2-IM-0381-0001.jpeg
_IM = re.compile(r"^((?:NORMAL\d*-)?IM-\d+)-\d+", re.IGNORECASE)


@dataclass(frozen=True)
class IndexResult:
    """What indexing found: the usable images and the files it skipped (with reasons)."""

    manifest: pd.DataFrame  # one row per decodable image, MANIFEST_COLUMNS
    skipped: pd.DataFrame  # columns path, reason


def parse_patient_id(filename: str) -> str:
    """Patient id from a Kermany file name; unknown patterns are their own patient (the stem)."""
    name = Path(filename).name
    for pattern in (_PERSON, _IM):
        match = pattern.match(name)
        if match:
            return match.group(1)
    return Path(name).stem


def check_layout(root: Path) -> list[tuple[str, Path]]:
    """(split, class folder) pairs to index; raise naming the first missing folder."""
    folders = []
    for split in REQUIRED_SPLITS + OPTIONAL_SPLITS:
        split_dir = root / split
        if not split_dir.is_dir():
            if split in REQUIRED_SPLITS:
                raise DataError(f"Missing split folder {split_dir} (expected train/ and test/ in {root})")
            continue
        for class_name in CLASSES:
            class_dir = split_dir / class_name
            if not class_dir.is_dir():
                raise DataError(f"Missing class folder {class_dir} (expected {', '.join(CLASSES)})")
            folders.append((split, class_dir))
    return folders


def _describe(path: Path) -> dict:
    data = path.read_bytes()
    img = open_image(data)
    check_convertible(img)  # so an image the cache could not decode is skipped here, not a crash there
    exif_orientation(img)  # likewise an EXIF block that cannot be read
    return dict(width=img.size[0], height=img.size[1], mode=img.mode, sha256=hashlib.sha256(data).hexdigest())


def index_dataset(root: str | Path) -> IndexResult:
    """Index a Kaggle-layout folder (train/, test/, optional val/; NORMAL/ and PNEUMONIA/ in each)."""
    root = Path(root)
    rows, skipped = [], []
    for split, class_dir in check_layout(root):
        found = 0
        for path in sorted(p for p in class_dir.rglob("*") if p.is_file()):
            try:
                info = _describe(path)
            except (ImageDecodeError, OSError) as exc:
                skipped.append(dict(path=str(path), reason=str(exc)))
                continue
            found += 1
            rows.append(dict(
                path=str(path), folder=split, split=split, label=CLASSES.index(class_dir.name),
                class_name=class_dir.name, patient_id=parse_patient_id(path.name), **info,
            ))
        if found == 0:
            raise DataError(f"Class folder {class_dir} has no decodable images")
    manifest = pd.DataFrame(rows, columns=MANIFEST_COLUMNS)
    return IndexResult(manifest, pd.DataFrame(skipped, columns=["path", "reason"]))


def split_by_patient(manifest: pd.DataFrame, val_fraction: float, seed: int) -> pd.DataFrame:
    """Carve validation from train (the shipped val/ folded in), grouped by patient, stratified by label."""
    out = manifest.copy()
    pool = out.index[out["folder"].isin(["train", "val"])]
    n_splits = max(2, round(1.0 / val_fraction))
    splitter = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    labels = out.loc[pool, "label"].to_numpy()
    groups = out.loc[pool, "patient_id"].to_numpy()
    _, val_pos = next(splitter.split(np.zeros(len(pool)), labels, groups))
    out.loc[pool, "split"] = "train"
    out.loc[pool[val_pos], "split"] = "val"
    return out


def cap_per_class(manifest: pd.DataFrame, max_per_class: int, seed: int) -> pd.DataFrame:
    """Keep at most `max_per_class` images of each (split, class), whole patients first (smoke runs)."""
    keep = []
    for _, group in manifest.groupby(["split", "label"], sort=True):
        patients = group["patient_id"].drop_duplicates().sample(frac=1.0, random_state=seed)
        chosen = group.set_index("patient_id").loc[patients].reset_index()
        keep.append(chosen.head(max_per_class)["path"])
    paths = set(pd.concat(keep))
    return manifest[manifest["path"].isin(paths)].reset_index(drop=True)


def cross_split_duplicates(manifest: pd.DataFrame) -> pd.DataFrame:
    """Byte-identical images whose copies sit in different splits (a leak worth knowing about)."""
    per_hash = manifest.groupby("sha256")["split"].nunique()
    leaking = per_hash[per_hash > 1].index
    dupes = manifest[manifest["sha256"].isin(leaking)]
    return dupes[["sha256", "split", "path", "label"]].sort_values(["sha256", "split"]).reset_index(drop=True)


def manifest_digest(manifest: pd.DataFrame) -> str:
    """A short digest of what a run sees: file names, contents, labels and assigned splits."""
    h = hashlib.sha256()
    for row in manifest.sort_values("path").itertuples():
        h.update(f"{Path(row.path).name}|{row.sha256}|{row.label}|{row.split}\n".encode())
    return h.hexdigest()[:16]


def class_weights(labels: np.ndarray) -> dict[int, float]:
    """Inverse-frequency weights so each class contributes equally to the loss."""
    counts = np.bincount(labels.astype(int), minlength=len(CLASSES))
    total = counts.sum()
    return {i: float(total / (len(CLASSES) * c)) if c else 0.0 for i, c in enumerate(counts)}


SPLITS = ("train", "val", "test")


def split_rows(manifest: pd.DataFrame, split: str) -> pd.DataFrame:
    """The manifest's rows of one split ("train", "val" or "test"), in manifest order."""
    if split not in SPLITS:
        raise ValueError(f"Unknown split {split!r}; one of {SPLITS}")
    return manifest[manifest["split"] == split]


def index_and_split(cfg: TrainConfig) -> tuple[IndexResult, pd.DataFrame, str]:
    """(the index, the manifest, its digest): the folder indexed, split by patient and capped as `cfg` says.

    Deterministic for the same files and settings, wherever the folder is mounted, so a search worker rebuilds
    the chief's manifest from its own copy and checks the digest.
    """
    indexed = index_dataset(cfg.resolved_data_dir())
    manifest = split_by_patient(indexed.manifest, cfg.val_fraction, cfg.seed)
    if cfg.max_per_class:
        manifest = cap_per_class(manifest, cfg.max_per_class, cfg.seed)
    return indexed, manifest, manifest_digest(manifest)
