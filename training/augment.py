"""The paper's training augmentations, seeded, in numpy and OpenCV; masks follow the image."""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
from numpy.typing import NDArray

Image = NDArray[np.float32]
Mask = NDArray[np.uint8]
Maps = tuple[NDArray[np.float32], NDArray[np.float32]]


def hflip(image: Image, mask: Mask) -> tuple[Image, Mask]:
    """Mirror image and mask left to right."""
    return np.ascontiguousarray(image[:, ::-1]), np.ascontiguousarray(mask[:, ::-1])


def adjust_contrast(image: Image, factor: float) -> Image:
    """Scale the distance of each pixel from the image mean by ``factor``; clip to [0, 1]."""
    mean = float(image.mean())
    return np.asarray(np.clip((image - mean) * factor + mean, 0.0, 1.0), dtype=np.float32)


def adjust_gamma(image: Image, gamma: float) -> Image:
    """Raise pixels in [0, 1] to the power ``gamma``."""
    return np.asarray(np.power(np.clip(image, 0.0, 1.0), gamma), dtype=np.float32)


def adjust_brightness(image: Image, delta: float) -> Image:
    """Add ``delta`` to every pixel; clip to [0, 1]."""
    return np.asarray(np.clip(image + delta, 0.0, 1.0), dtype=np.float32)


def identity_maps(shape: tuple[int, int]) -> Maps:
    """Sampling maps that leave an image of ``shape`` unchanged (for :func:`remap`)."""
    ys, xs = np.indices(shape, dtype=np.float32)
    return xs, ys


def elastic_maps(
    rng: np.random.Generator, shape: tuple[int, int], alpha: float, sigma: float
) -> Maps:
    """Elastic deformation (Simard et al. 2003): smoothed uniform noise scaled by ``alpha``.

    Parameters
    ----------
    rng : numpy.random.Generator
        Source of randomness.
    shape : tuple of int
        ``(height, width)``.
    alpha : float
        Displacement scale, pixels.
    sigma : float
        Standard deviation of the Gaussian smoothing, pixels.

    Returns
    -------
    tuple of numpy.ndarray
        ``(map_x, map_y)`` source coordinates for every output pixel.
    """
    xs, ys = identity_maps(shape)
    noise = rng.uniform(-1.0, 1.0, size=(2, *shape)).astype(np.float32)
    dx = cv2.GaussianBlur(noise[0], (0, 0), sigma) * alpha
    dy = cv2.GaussianBlur(noise[1], (0, 0), sigma) * alpha
    return (xs + dx).astype(np.float32), (ys + dy).astype(np.float32)


def _grid_axis(
    rng: np.random.Generator, length: int, steps: int, limit: float
) -> NDArray[np.float32]:
    cells = 1.0 + rng.uniform(-limit, limit, size=steps)
    knots_src = np.concatenate(([0.0], np.cumsum(cells)))
    knots_src *= (length - 1) / knots_src[-1]
    knots_dst = np.linspace(0.0, length - 1, steps + 1)
    return np.interp(np.arange(length), knots_dst, knots_src).astype(np.float32)


def grid_maps(rng: np.random.Generator, shape: tuple[int, int], steps: int, limit: float) -> Maps:
    """Grid distortion: each of ``steps`` cells per axis stretched by a factor in 1 +- ``limit``.

    Parameters
    ----------
    rng : numpy.random.Generator
        Source of randomness.
    shape : tuple of int
        ``(height, width)``.
    steps : int
        Cells per axis.
    limit : float
        Largest relative change of a cell's size.

    Returns
    -------
    tuple of numpy.ndarray
        ``(map_x, map_y)``.
    """
    height, width = shape
    x_axis = _grid_axis(rng, width, steps, limit)
    y_axis = _grid_axis(rng, height, steps, limit)
    map_x = np.broadcast_to(x_axis[None, :], shape).astype(np.float32)
    map_y = np.broadcast_to(y_axis[:, None], shape).astype(np.float32)
    return map_x, map_y


def optical_maps(
    rng: np.random.Generator, shape: tuple[int, int], k_limit: float, shift_limit: float
) -> Maps:
    """Barrel or pincushion (optical) distortion around a slightly shifted centre.

    Parameters
    ----------
    rng : numpy.random.Generator
        Source of randomness.
    shape : tuple of int
        ``(height, width)``.
    k_limit : float
        The radial coefficient is drawn from ``[-k_limit, k_limit]``.
    shift_limit : float
        The centre moves by up to this fraction of the half size.

    Returns
    -------
    tuple of numpy.ndarray
        ``(map_x, map_y)``.
    """
    height, width = shape
    half_w, half_h = (width - 1) / 2.0, (height - 1) / 2.0
    k = rng.uniform(-k_limit, k_limit)
    cx = half_w + rng.uniform(-shift_limit, shift_limit) * half_w
    cy = half_h + rng.uniform(-shift_limit, shift_limit) * half_h
    xs, ys = identity_maps(shape)
    u = (xs - cx) / half_w
    v = (ys - cy) / half_h
    scale = 1.0 + k * (u * u + v * v)
    return (cx + u * scale * half_w).astype(np.float32), (cy + v * scale * half_h).astype(
        np.float32
    )


def remap(image: Image, mask: Mask, maps: Maps) -> tuple[Image, Mask]:
    """Sample image (bilinear) and mask (nearest) at the same source coordinates."""
    map_x, map_y = maps
    warped = cv2.remap(image, map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101)
    warped_mask = cv2.remap(
        mask, map_x, map_y, cv2.INTER_NEAREST, borderMode=cv2.BORDER_REFLECT_101
    )
    return np.asarray(warped, np.float32), np.asarray(warped_mask, np.uint8)


def crop_resize(image: Image, mask: Mask, top: int, left: int, side: int) -> tuple[Image, Mask]:
    """Cut a ``side`` x ``side`` square at (top, left) and resize it back to the input size."""
    height, width = image.shape
    if side < 1 or top < 0 or left < 0 or top + side > height or left + side > width:
        raise ValueError(f"crop ({top}, {left}, side {side}) is outside a {height}x{width} image")
    patch = np.ascontiguousarray(image[top : top + side, left : left + side])
    patch_mask = np.ascontiguousarray(mask[top : top + side, left : left + side])
    out = cv2.resize(patch, (width, height), interpolation=cv2.INTER_LINEAR)
    out_mask = cv2.resize(patch_mask, (width, height), interpolation=cv2.INTER_NEAREST)
    return np.asarray(out, np.float32), np.asarray(out_mask, np.uint8)


@dataclass(frozen=True)
class Augmenter:
    """The paper's pipeline, applied in this order, each step with its own probability.

    1. horizontal flip (``hflip_p``, 0.5);
    2. one of contrast, gamma or brightness (``intensity_p``, 0.3);
    3. one of elastic, grid or optical distortion (``distortion_p``, 0.3);
    4. a random square crop whose side is ``crop_min``-``crop_max`` of the image (176-256 of
       256 px), resized back (``crop_p``, 0.25).

    Sizes of the geometric steps are given for 256 px and scale with the image.
    """

    hflip_p: float = 0.5
    intensity_p: float = 0.3
    distortion_p: float = 0.3
    crop_p: float = 0.25
    crop_min: float = 176 / 256
    crop_max: float = 1.0
    contrast_limit: float = 0.2
    gamma_limit: float = 0.2
    brightness_limit: float = 0.2
    elastic_alpha: float = 120.0
    elastic_sigma: float = 6.0
    grid_steps: int = 5
    grid_limit: float = 0.3
    optical_k: float = 0.3
    optical_shift: float = 0.1

    def __post_init__(self) -> None:
        for name in ("hflip_p", "intensity_p", "distortion_p", "crop_p"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"augmentation probability {name} must be in [0, 1], got {value}")
        if not 0.0 < self.crop_min <= self.crop_max <= 1.0:
            raise ValueError(
                f"crop fractions must satisfy 0 < crop_min <= crop_max <= 1, "
                f"got {self.crop_min}, {self.crop_max}"
            )

    def __call__(self, image: Image, mask: Mask, rng: np.random.Generator) -> tuple[Image, Mask]:
        """Augment one (image, mask) pair.

        Parameters
        ----------
        image : numpy.ndarray
            Float32 ``(H, W)`` in [0, 1].
        mask : numpy.ndarray
            Uint8 ``(H, W)`` in {0, 1}.
        rng : numpy.random.Generator
            Decides every random choice; the same state gives the same result.

        Returns
        -------
        tuple of numpy.ndarray
            The augmented image and mask, same shapes and dtypes.
        """
        if image.shape != mask.shape or image.ndim != 2:
            raise ValueError(
                f"image and mask must be equal 2-D shapes: {image.shape}, {mask.shape}"
            )
        shape = (image.shape[0], image.shape[1])
        scale = min(shape) / 256.0
        if rng.random() < self.hflip_p:
            image, mask = hflip(image, mask)
        if rng.random() < self.intensity_p:
            choice = int(rng.integers(3))
            if choice == 0:
                factor = 1.0 + rng.uniform(-self.contrast_limit, self.contrast_limit)
                image = adjust_contrast(image, factor)
            elif choice == 1:
                image = adjust_gamma(image, 1.0 + rng.uniform(-self.gamma_limit, self.gamma_limit))
            else:
                delta = rng.uniform(-self.brightness_limit, self.brightness_limit)
                image = adjust_brightness(image, delta)
        if rng.random() < self.distortion_p:
            choice = int(rng.integers(3))
            if choice == 0:
                maps = elastic_maps(
                    rng, shape, self.elastic_alpha * scale, max(self.elastic_sigma * scale, 0.5)
                )
            elif choice == 1:
                maps = grid_maps(rng, shape, self.grid_steps, self.grid_limit)
            else:
                maps = optical_maps(rng, shape, self.optical_k, self.optical_shift)
            image, mask = remap(image, mask, maps)
        if rng.random() < self.crop_p:
            low = max(1, round(self.crop_min * min(shape)))
            high = max(low, round(self.crop_max * min(shape)))
            side = int(rng.integers(low, high + 1))
            top = int(rng.integers(0, shape[0] - side + 1))
            left = int(rng.integers(0, shape[1] - side + 1))
            image, mask = crop_resize(image, mask, top, left, side)
        return image, mask
