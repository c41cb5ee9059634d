"""Stressed validation copies: each stress does what its name says, on synthetic images."""

from __future__ import annotations

import numpy as np

from cxr_model.stress import STRESSES, stressed_scores, stresses


def test_every_stress_keeps_shape_and_type_and_changes_the_image() -> None:
    x = np.random.default_rng(0).integers(30, 220, (3, 40, 40, 1)).astype("uint8")
    out = stresses(x)
    assert tuple(out) == STRESSES
    for name, images in out.items():
        assert images.shape == x.shape and images.dtype == np.uint8, name
        assert np.abs(images.astype(int) - x).mean() > 1, name


def test_stresses_move_exposure_detail_and_shape_the_right_way() -> None:
    x = np.full((1, 40, 40, 1), 100, np.uint8)
    x[:, ::2] = 160  # stripes: fine detail that blur removes
    out = stresses(x)
    assert out["gamma0.6"].mean() > x.mean() > out["gamma1.6"].mean()  # brighter / darker exposure curve
    assert out["blur"].std() < 0.5 * x.std()
    stripes = np.full((1, 40, 40, 1), 100, np.uint8)
    stripes[:, (np.arange(40) // 2) % 2 == 1] = 160  # two-pixel stripes: more than half the resolution holds
    assert stresses(stripes)["blur"].std() < 0.5 * stripes.std()  # a 5% resize would keep them
    assert (out["wider_view"][0, 0] == 0).all() and (out["wider_view"][0, 20, 20] > 0).all()  # black frame
    assert (out["narrower"][0, :, :3] == 0).all() and (out["narrower"][0, :, 20] > 0).all()  # bars at the sides
    assert (out["broader"] > 0).all()  # cropped at the sides, so no border


def test_stressed_scores_predict_each_copy() -> None:
    x = np.random.default_rng(1).integers(0, 255, (4, 24, 24, 1)).astype("uint8")
    scores = stressed_scores(lambda images: images.mean(axis=(1, 2, 3)) / 255, x)
    assert tuple(scores) == STRESSES
    for name, copy in stresses(x).items():
        np.testing.assert_allclose(scores[name], copy.mean(axis=(1, 2, 3)) / 255)
