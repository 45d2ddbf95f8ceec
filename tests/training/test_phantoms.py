"""Phantoms: deterministic, chest-like, with a dark crescent pneumothorax where the mask says."""

from __future__ import annotations

import numpy as np
import pytest

from training.phantoms import make_blank, make_dataset, make_phantom


def test_same_seed_same_data_other_seed_other_data() -> None:
    images_a, masks_a = make_dataset(6, 64, seed=4)
    images_b, masks_b = make_dataset(6, 64, seed=4)
    np.testing.assert_array_equal(images_a, images_b)
    np.testing.assert_array_equal(masks_a, masks_b)
    images_c, _ = make_dataset(6, 64, seed=5)
    assert not np.array_equal(images_a, images_c)


def test_dataset_types_ranges_and_balance() -> None:
    images, masks = make_dataset(10, 96, seed=0)
    assert images.shape == (10, 96, 96) and images.dtype == np.float32
    assert masks.shape == (10, 96, 96) and masks.dtype == np.bool_
    assert images.min() >= 0.0 and images.max() <= 1.0
    positives = int(masks.any(axis=(1, 2)).sum())
    assert positives == 5


def test_pneumothorax_is_darker_than_lung_and_lateral() -> None:
    rng = np.random.default_rng(8)
    for _ in range(5):
        image, mask = make_phantom(rng, 256, positive=True)
        area = mask.mean()
        assert 0.005 < area < 0.12
        # Darker and smoother (no lung markings) than the same place in the other lung.
        mirrored = np.fliplr(image)[mask]
        assert image[mask].mean() < mirrored.mean() - 0.05
        assert image[mask].std() < mirrored.std()
        rows, cols = np.nonzero(mask)
        # The crescent lies in one hemithorax, away from the midline.
        centre = cols.mean() / 256
        assert abs(centre - 0.5) > 0.12
        # Its apical edge is near the lung apex: the mask reaches the upper chest.
        assert rows.min() < 0.3 * 256


def test_negative_phantoms_have_empty_masks_but_look_like_chests() -> None:
    rng = np.random.default_rng(9)
    image, mask = make_phantom(rng, 128, positive=False)
    assert not mask.any()
    # Dark air at the corners, bright mediastinum in the middle, darker lungs either side.
    assert image[:8, :8].mean() < 0.2
    middle = image[64:100, 60:68].mean()
    lungs = (image[50:70, 30:40].mean() + image[50:70, 88:98].mean()) / 2
    assert middle > lungs + 0.2


def test_blank_images_are_flat_and_empty() -> None:
    rng = np.random.default_rng(3)
    for _ in range(4):
        image, mask = make_blank(rng, 64)
        assert image.dtype == np.float32 and image.shape == (64, 64)
        assert image.min() >= 0.0 and image.max() <= 1.0
        assert not mask.any()
        assert image.std() < 0.15


def test_rejects_tiny_size_and_negative_count() -> None:
    with pytest.raises(ValueError, match="size"):
        make_phantom(np.random.default_rng(0), 16)
    with pytest.raises(ValueError, match="size"):
        make_blank(np.random.default_rng(0), 16)
    with pytest.raises(ValueError, match="n must be"):
        make_dataset(-1, 64, seed=0)
