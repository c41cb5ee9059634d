"""Indexing, junk files, patient ids, grouped splits and duplicate reports, on synthetic folders."""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from cxr_model.data import (
    cap_per_class,
    class_weights,
    cross_split_duplicates,
    index_dataset,
    manifest_digest,
    parse_patient_id,
    split_by_patient,
)
from cxr_model.errors import DataError
from tests.conftest import write_xray


@pytest.mark.parametrize(
    ("name", "patient"),
    [
        ("person1000_bacteria_2931.jpeg", "person1000"),
        ("person1_virus_6.jpeg", "person1"),
        ("person1619_virus_2806_1.jpeg", "person1619"),
        ("IM-0115-0001.jpeg", "IM-0115"),
        ("IM-0117-0001-0002.jpeg", "IM-0117"),
        ("NORMAL2-IM-0381-0001.jpeg", "NORMAL2-IM-0381"),
        ("scan_42.png", "scan_42"),
    ],
)
def test_parse_patient_id(name: str, patient: str) -> None:
    assert parse_patient_id(name) == patient


def test_index_builds_manifest(synthetic_dataset: Path) -> None:
    result = index_dataset(synthetic_dataset)
    m = result.manifest
    assert len(m) == 2 * (6 + 2)  # per class: 3 patients x 2 images in train, 2 in test
    assert result.skipped.empty
    assert set(m["split"]) == {"train", "test"}
    assert set(m["label"]) == {0, 1}
    assert (m.loc[m["class_name"] == "PNEUMONIA", "label"] == 1).all()
    assert {"width", "height", "mode", "sha256", "patient_id"} <= set(m.columns)
    assert (m["width"] == 40).all() and (m["height"] == 32).all() and (m["mode"] == "L").all()
    assert m["sha256"].str.len().eq(64).all()


def test_index_accepts_any_size_and_mode(synthetic_dataset: Path) -> None:
    folder = synthetic_dataset / "train" / "NORMAL"
    write_xray(folder / "IM-0900-0001.png", 1, size=(300, 200), mode="RGBA")
    write_xray(folder / "IM-0901-0001.png", 2, size=(50, 90), mode="P")
    arr16 = (np.arange(64 * 48, dtype=np.uint16).reshape(48, 64) * 20)
    Image.fromarray(arr16).save(folder / "IM-0902-0001.png")  # 16-bit grayscale
    write_xray(folder / "IM-0903-0001.jpeg", 3, size=(64, 64), mode="RGB")
    m = index_dataset(synthetic_dataset).manifest
    extra = m[m["path"].str.contains("IM-09")].set_index("patient_id")
    assert extra.loc["IM-0900", "mode"] == "RGBA" and extra.loc["IM-0900", "width"] == 300
    assert extra.loc["IM-0901", "mode"] == "P"
    assert extra.loc["IM-0902", "mode"].startswith("I")
    assert extra.loc["IM-0903", "mode"] == "RGB"


def _tiff(img: Image.Image) -> bytes:
    import io

    out = io.BytesIO()
    img.save(out, format="TIFF")
    return out.getvalue()


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def test_junk_files_are_reported_not_touched(synthetic_dataset: Path) -> None:
    folder = synthetic_dataset / "train" / "PNEUMONIA"
    good = next(folder.glob("*.jpeg")).read_bytes()
    junk = {
        ".DS_Store": b"\x00\x00\x00\x01Bud1",
        "person90_bacteria_1.jpeg": b"",  # zero bytes
        "person91_bacteria_1.jpeg": good[: len(good) // 2],  # truncated JPEG
        "person92_bacteria_1.jpeg": b"this is a text file, not an image\n",
        "person93_bacteria_1.jpeg": _tiff(Image.new("LAB", (8, 8))),  # opens and decodes, no grayscale from it
    }
    for name, data in junk.items():
        (folder / name).write_bytes(data)
    before = {name: (folder / name).read_bytes() for name in junk}
    result = index_dataset(synthetic_dataset)
    skipped = {Path(p).name: reason for p, reason in zip(result.skipped["path"], result.skipped["reason"], strict=True)}
    assert set(skipped) == set(junk)
    assert "empty" in skipped["person90_bacteria_1.jpeg"]
    assert "truncated" in skipped["person91_bacteria_1.jpeg"] or "corrupt" in skipped["person91_bacteria_1.jpeg"]
    assert "unsupported image mode LAB" in skipped["person93_bacteria_1.jpeg"]  # skipped here, not a cache crash
    assert not any(Path(p).name in junk for p in result.manifest["path"])
    assert {name: (folder / name).read_bytes() for name in junk} == before  # raw data untouched


def test_an_unreadable_exif_block_is_skipped_at_indexing(synthetic_dataset: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Listed with its reason when the data is indexed, so the cache's decode cannot fail on it later."""
    from PIL import PngImagePlugin

    def broken(self):
        raise TypeError("bad operand type for abs(): 'str'")

    odd = synthetic_dataset / "train" / "NORMAL" / "IM-0999-0001.jpeg"
    odd.write_bytes(_png(Image.new("L", (16, 16), 90)))  # a PNG named .jpeg: the one file whose EXIF reader breaks
    monkeypatch.setattr(PngImagePlugin.PngImageFile, "getexif", broken)
    result = index_dataset(synthetic_dataset)
    assert list(result.skipped["path"]) == [str(odd)]
    assert "unreadable EXIF block (TypeError" in result.skipped["reason"][0]


@pytest.mark.parametrize("missing", ["train", "test", "train/NORMAL", "test/PNEUMONIA"])
def test_missing_folder_stops_with_its_path(synthetic_dataset: Path, missing: str) -> None:
    shutil.rmtree(synthetic_dataset / missing)
    with pytest.raises(DataError, match=str(synthetic_dataset / missing)):
        index_dataset(synthetic_dataset)


def test_empty_class_stops_with_its_path(synthetic_dataset: Path) -> None:
    folder = synthetic_dataset / "test" / "NORMAL"
    for f in folder.iterdir():
        f.unlink()
    (folder / "notes.jpeg").write_text("not an image")
    with pytest.raises(DataError, match=f"{folder}.*no decodable images"):
        index_dataset(synthetic_dataset)


def _many_patients(n_patients: int = 60, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = []
    for p in range(n_patients):
        label = int(p % 4 != 0)  # 3:1 like the real data
        for i in range(int(rng.integers(1, 5))):
            rows.append(dict(path=f"/x/{p}_{i}.jpeg", folder="train", split="train", label=label,
                             class_name=["NORMAL", "PNEUMONIA"][label], patient_id=f"person{p}",
                             sha256=f"{p:032d}{i:032d}"))
    rows.append(dict(path="/x/t.jpeg", folder="test", split="test", label=0, class_name="NORMAL",
                     patient_id="IM-1", sha256="f" * 64))
    return pd.DataFrame(rows)


def test_split_groups_patients_and_stratifies() -> None:
    m = split_by_patient(_many_patients(), val_fraction=0.2, seed=3)
    train, val = m[m["split"] == "train"], m[m["split"] == "val"]
    assert set(train["patient_id"]).isdisjoint(set(val["patient_id"]))
    assert 0.1 < len(val) / (len(train) + len(val)) < 0.3
    assert set(val["label"]) == {0, 1}
    assert (m.loc[m["folder"] == "test", "split"] == "test").all()


def test_split_is_seeded() -> None:
    a = split_by_patient(_many_patients(), 0.2, seed=1)["split"]
    b = split_by_patient(_many_patients(), 0.2, seed=1)["split"]
    c = split_by_patient(_many_patients(), 0.2, seed=2)["split"]
    assert a.equals(b) and not a.equals(c)


def test_shipped_val_folder_is_folded_in(synthetic_dataset: Path) -> None:
    for cls in ("NORMAL", "PNEUMONIA"):
        for i in range(2):
            name = f"IM-07{i}0-0001.jpeg" if cls == "NORMAL" else f"person7{i}0_virus_1.jpeg"
            write_xray(synthetic_dataset / "val" / cls / name, 100 + i)
    m = split_by_patient(index_dataset(synthetic_dataset).manifest, val_fraction=0.34, seed=0)
    shipped = m[m["folder"] == "val"]
    assert len(shipped) == 4
    assert set(shipped["split"]) <= {"train", "val"}  # pooled with train, not used alone
    assert set(m.loc[m["folder"] == "train", "split"]) == {"train", "val"}


def test_cross_split_duplicates_are_reported(synthetic_dataset: Path) -> None:
    src = next((synthetic_dataset / "train" / "NORMAL").glob("*.jpeg"))
    shutil.copy(src, synthetic_dataset / "test" / "NORMAL" / "IM-0500-0001.jpeg")
    m = index_dataset(synthetic_dataset).manifest
    dupes = cross_split_duplicates(m)
    assert len(dupes) == 2 and set(dupes["split"]) == {"train", "test"}
    assert dupes["sha256"].nunique() == 1


def test_digest_changes_with_labels_and_splits(synthetic_dataset: Path) -> None:
    m = split_by_patient(index_dataset(synthetic_dataset).manifest, 0.34, seed=0)
    flipped = m.copy()
    flipped.loc[0, "label"] = 1 - flipped.loc[0, "label"]
    assert manifest_digest(m) == manifest_digest(m.sample(frac=1.0, random_state=0))
    assert manifest_digest(m) != manifest_digest(flipped)
    moved = m.copy()
    moved.loc[moved["split"] == "val", "split"] = "train"
    assert manifest_digest(m) != manifest_digest(moved)


def test_cap_per_class_keeps_whole_patients_first() -> None:
    m = split_by_patient(_many_patients(), 0.2, seed=0)
    capped = cap_per_class(m, 5, seed=0)
    counts = capped.groupby(["split", "label"]).size()
    assert (counts <= 5).all() and counts.loc[("train", 1)] == 5
    for (split, label), group in capped.groupby(["split", "label"]):
        whole = m[(m["split"] == split) & (m["label"] == label)].groupby("patient_id").size()
        kept = group.groupby("patient_id").size()
        assert (kept < whole[kept.index]).sum() <= 1, (split, label)  # only the last patient taken may be cut


def test_class_weights_balance_the_loss() -> None:
    w = class_weights(np.array([0] * 25 + [1] * 75))
    assert w[0] * 25 == pytest.approx(w[1] * 75) and w[0] == pytest.approx(2.0)
