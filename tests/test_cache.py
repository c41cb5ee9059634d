"""The decoded-image cache decodes once and serves any subset in order."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import cxr_model.cache as cache
from cxr_model.data import index_dataset
from cxr_model.preprocess import decode_file


def test_cache_decodes_once_and_matches_decoder(synthetic_dataset: Path, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    manifest = index_dataset(synthetic_dataset).manifest
    first = cache.decoded_images(manifest, 24, tmp_path)
    subset = manifest.iloc[[5, 0, 3]]
    expected = np.stack([decode_file(p, 24) for p in subset["path"]])
    np.testing.assert_array_equal(first.take(subset), expected)

    monkeypatch.setattr(cache, "decode_file", lambda *a, **k: pytest.fail("cache hit must not decode"))
    again = cache.decoded_images(manifest, 24, tmp_path)
    np.testing.assert_array_equal(again.take(subset), expected)
    assert len(list(tmp_path.glob("*.npy"))) == 1


def test_cache_key_depends_on_size_and_content(synthetic_dataset: Path, tmp_path: Path) -> None:
    manifest = index_dataset(synthetic_dataset).manifest
    cache.decoded_images(manifest, 16, tmp_path)
    cache.decoded_images(manifest, 24, tmp_path)
    cache.decoded_images(manifest.iloc[:4], 16, tmp_path)
    assert len(list(tmp_path.glob("*.npy"))) == 3


def test_a_new_decoder_version_decodes_again(synthetic_dataset: Path, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    manifest = index_dataset(synthetic_dataset).manifest
    cache.decoded_images(manifest, 16, tmp_path)
    decoded = []
    monkeypatch.setattr(cache, "decode_file", lambda path, size: decoded.append(path) or np.zeros((size, size, 1)))
    monkeypatch.setattr(cache, "DECODER_VERSION", cache.DECODER_VERSION + 1)
    cache.decoded_images(manifest, 16, tmp_path)
    assert len(decoded) == manifest["sha256"].nunique()  # the old arrays were not read
