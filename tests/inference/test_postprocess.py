"""Exact-array tests of TTA and ensemble averaging, the triplet rule and source masks."""

from __future__ import annotations

import numpy as np
import pytest

from pneumonode.inference.card import Thresholds
from pneumonode.inference.postprocess import (
    average_members,
    average_tta,
    mask_on_source,
    remove_small_components,
    resize_probability,
    triplet,
)


def test_average_tta_flips_back_then_averages() -> None:
    probs = np.array([[0.0, 0.25, 0.5], [1.0, 0.75, 0.5]], dtype=np.float32)
    # The model saw the mirrored image; its output is mirrored too.
    flipped = np.array([[1.0, 0.75, 0.5], [0.0, 0.25, 0.5]], dtype=np.float32)
    expected = np.array([[0.25, 0.5, 0.75], [0.75, 0.5, 0.25]], dtype=np.float32)
    result = average_tta(probs, flipped)
    assert result.dtype == np.float32
    np.testing.assert_array_equal(result, expected)


def test_average_tta_batched_flips_last_axis_only() -> None:
    probs = np.zeros((2, 1, 2), dtype=np.float32)
    flipped = np.array([[[1.0, 0.0]], [[0.0, 0.5]]], dtype=np.float32)
    expected = np.array([[[0.0, 0.5]], [[0.25, 0.0]]], dtype=np.float32)
    np.testing.assert_array_equal(average_tta(probs, flipped), expected)


def test_average_tta_rejects_shape_mismatch() -> None:
    with pytest.raises(ValueError, match="TTA shapes differ"):
        average_tta(np.zeros((2, 2), np.float32), np.zeros((2, 3), np.float32))


def test_average_members_is_the_elementwise_mean() -> None:
    a = np.array([[0.0, 1.0], [0.5, 0.25]], dtype=np.float32)
    b = np.array([[1.0, 1.0], [0.0, 0.25]], dtype=np.float32)
    c = np.array([[0.5, 0.25], [0.25, 1.0]], dtype=np.float32)
    expected = np.array([[0.5, 0.75], [0.25, 0.5]], dtype=np.float32)
    result = average_members([a, b, c])
    assert result.dtype == np.float32
    np.testing.assert_array_equal(result, expected)
    np.testing.assert_array_equal(average_members([a]), a)


def test_average_members_validates() -> None:
    with pytest.raises(ValueError, match="at least one member"):
        average_members([])
    with pytest.raises(ValueError, match="disagree on shape"):
        average_members([np.zeros((2, 2), np.float32), np.zeros((3, 2), np.float32)])


PROB = np.array(
    [
        [0.9, 0.6, 0.0, 0.0, 0.0],
        [0.6, 0.4, 0.0, 0.0, 0.6],
        [0.0, 0.0, 0.0, 0.0, 0.0],
        [0.0, 0.0, 0.0, 0.7, 0.0],
    ],
    dtype=np.float32,
)


def test_triplet_confident_pixels_then_bottom_threshold() -> None:
    # One pixel above top (0.8) satisfies min_area=1: the mask is prob > bottom (0.5).
    result = triplet(PROB, Thresholds(top=0.8, bottom=0.5, min_area=1))
    expected = np.array(
        [
            [1, 1, 0, 0, 0],
            [1, 0, 0, 0, 1],
            [0, 0, 0, 0, 0],
            [0, 0, 0, 1, 0],
        ],
        dtype=bool,
    )
    np.testing.assert_array_equal(result, expected)


def test_triplet_too_few_confident_pixels_is_empty() -> None:
    # Only one pixel exceeds top=0.8 but min_area=2: empty although 5 pixels exceed bottom.
    result = triplet(PROB, Thresholds(top=0.8, bottom=0.5, min_area=2))
    np.testing.assert_array_equal(result, np.zeros_like(PROB, dtype=bool))
    # With top=0.65, two pixels (0.9, 0.7) are confident: the image becomes positive.
    result = triplet(PROB, Thresholds(top=0.65, bottom=0.5, min_area=2))
    assert int(result.sum()) == 5


def test_triplet_lower_bottom_grows_the_mask() -> None:
    result = triplet(PROB, Thresholds(top=0.8, bottom=0.3, min_area=1))
    assert result[1, 1]
    assert int(result.sum()) == 6


def test_triplet_removes_small_components() -> None:
    result = triplet(PROB, Thresholds(top=0.8, bottom=0.5, min_area=1, min_component_area=2))
    expected = np.zeros_like(PROB, dtype=bool)
    expected[0, 0] = expected[0, 1] = expected[1, 0] = True
    np.testing.assert_array_equal(result, expected)


def test_remove_small_components_uses_8_connectivity() -> None:
    mask = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 0]], dtype=bool)
    np.testing.assert_array_equal(remove_small_components(mask, 2), mask)
    np.testing.assert_array_equal(remove_small_components(mask, 3), np.zeros_like(mask))


def test_resize_probability_keeps_values_and_shape() -> None:
    prob = np.full((4, 4), 0.25, dtype=np.float32)
    resized = resize_probability(prob, (7, 3))
    assert resized.shape == (7, 3)
    assert resized.dtype == np.float32
    np.testing.assert_allclose(resized, 0.25)


def test_mask_on_source_empty_decision_is_empty() -> None:
    source = np.full((6, 6), 0.9, dtype=np.float32)
    result = mask_on_source(source, np.zeros((3, 3), bool), Thresholds())
    assert result.shape == (6, 6)
    assert not result.any()


def test_mask_on_source_drops_components_removed_at_model_resolution() -> None:
    thresholds = Thresholds(top=0.8, bottom=0.5, min_area=1, min_component_area=2)
    model_prob = np.zeros((4, 4), dtype=np.float32)
    model_prob[0:2, 0:2] = 0.9  # 4-pixel component: kept
    model_prob[3, 3] = 0.9  # 1-pixel component: removed
    model_mask = triplet(model_prob, thresholds)
    source_prob = resize_probability(model_prob, (8, 8))
    result = mask_on_source(source_prob, model_mask, thresholds)
    assert result[0:4, 0:4].any()
    assert not result[5:, 5:].any()
    # Without component filtering the same source pixels above bottom are all kept.
    loose = Thresholds(top=0.8, bottom=0.5, min_area=1)
    kept_all = mask_on_source(source_prob, triplet(model_prob, loose), loose)
    np.testing.assert_array_equal(kept_all, source_prob > 0.5)
    assert kept_all[6:, 6:].any()
