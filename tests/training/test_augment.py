"""Augmentations: seeded, masks moved exactly like images, probabilities respected."""

from __future__ import annotations

import numpy as np
import pytest

from training.augment import (
    Augmenter,
    adjust_brightness,
    adjust_contrast,
    adjust_gamma,
    crop_resize,
    elastic_maps,
    grid_maps,
    identity_maps,
    optical_maps,
    remap,
)


def _pair(size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    mask = np.zeros((size, size), np.uint8)
    mask[10:30, 5:25] = 1
    image = np.where(mask > 0, 0.9, 0.1).astype(np.float32)
    return image, mask


def test_same_seed_same_result_other_seed_differs() -> None:
    image, mask = _pair()
    aug = Augmenter(hflip_p=0.5, intensity_p=1.0, distortion_p=1.0, crop_p=1.0)
    first = aug(image, mask, np.random.default_rng([1, 2]))
    again = aug(image, mask, np.random.default_rng([1, 2]))
    other = aug(image, mask, np.random.default_rng([1, 3]))
    assert np.array_equal(first[0], again[0]) and np.array_equal(first[1], again[1])
    assert not np.array_equal(first[0], other[0])
    assert first[0].dtype == np.float32 and first[1].dtype == np.uint8
    assert first[0].shape == image.shape and first[1].shape == mask.shape


def test_zero_probabilities_leave_the_pair_alone() -> None:
    image, mask = _pair()
    aug = Augmenter(hflip_p=0.0, intensity_p=0.0, distortion_p=0.0, crop_p=0.0)
    out_image, out_mask = aug(image, mask, np.random.default_rng(0))
    assert np.array_equal(out_image, image) and np.array_equal(out_mask, mask)


def test_geometric_steps_move_mask_and_image_together() -> None:
    image, mask = _pair()
    rng = np.random.default_rng(4)
    for maps in (
        elastic_maps(rng, image.shape, alpha=120.0 / 4, sigma=6.0 / 4),
        grid_maps(rng, image.shape, steps=5, limit=0.3),
        optical_maps(rng, image.shape, k_limit=0.3, shift_limit=0.1),
    ):
        warped, warped_mask = remap(image, mask, maps)
        inside = warped_mask > 0
        assert inside.any()
        # The image is a picture of its mask, so both must still agree almost everywhere.
        agreement = np.mean((warped > 0.5) == inside)
        assert agreement > 0.97
    xs, ys = identity_maps(image.shape)
    same, same_mask = remap(image, mask, (xs, ys))
    np.testing.assert_allclose(same, image, atol=1e-6)
    assert np.array_equal(same_mask, mask)


def test_crop_resize_and_flip_of_the_mask_follow_the_image() -> None:
    image, mask = _pair()
    out, out_mask = crop_resize(image, mask, top=8, left=4, side=32)
    assert out.shape == (64, 64)
    assert set(np.unique(out_mask)) <= {0, 1}
    assert np.mean((out > 0.5) == (out_mask > 0)) > 0.97
    with pytest.raises(ValueError, match="outside"):
        crop_resize(image, mask, top=40, left=0, side=32)
    flipped = Augmenter(hflip_p=1.0, intensity_p=0, distortion_p=0, crop_p=0)(
        image, mask, np.random.default_rng(0)
    )
    assert np.array_equal(flipped[1], mask[:, ::-1])


def test_crop_sizes_stay_within_176_to_256_of_256() -> None:
    image = np.tile(np.arange(256, dtype=np.float32) / 255.0, (256, 1))
    mask = np.zeros((256, 256), np.uint8)
    aug = Augmenter(hflip_p=0, intensity_p=0, distortion_p=0, crop_p=1.0)
    sides = []
    for seed in range(20):
        out, _ = aug(image, mask, np.random.default_rng(seed))
        # A ramp of one gray level per pixel, cropped to ``side`` and stretched to 256 pixels,
        # rises by side / 256 levels per output pixel.
        side = (out[128, 200] - out[128, 50]) * 255.0 / 150.0 * 256.0
        sides.append(side)
        assert 176 - 1 <= side <= 256 + 1
    assert min(sides) < 216 < max(sides)


def test_intensity_steps() -> None:
    image = np.linspace(0.0, 1.0, 16, dtype=np.float32).reshape(4, 4)
    assert adjust_brightness(image, 0.1).max() == pytest.approx(1.0)
    assert adjust_brightness(image, 0.1)[0, 1] == pytest.approx(image[0, 1] + 0.1)
    np.testing.assert_allclose(adjust_gamma(image, 2.0), image**2, rtol=1e-6)
    contrasted = adjust_contrast(image, 1.2)
    assert contrasted.mean() == pytest.approx(image.mean(), abs=0.02)
    assert contrasted.std() > image.std()
    with pytest.raises(ValueError, match="probability"):
        Augmenter(hflip_p=1.5)
