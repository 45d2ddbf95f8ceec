"""Turn a radiograph into a model input: the one resize rule, normalisation and channels.

Training (``training.store`` when it caches images, ``training.data`` when it batches them) and
the node (:meth:`pneumonode.inference.predictor.Predictor.prepare`) both call these functions,
so an image reaches the network the same way in both. The node never imports ``training``;
``training`` imports this module.
"""

from __future__ import annotations

from typing import TypeVar

import cv2
import numpy as np
import numpy.typing as npt

from pneumonode.inference.card import InputSpec

Pixel = TypeVar("Pixel", np.uint8, np.float32)


def resize_square(image: npt.NDArray[Pixel], size: int) -> npt.NDArray[Pixel]:
    """Resize a 2-D gray image to ``size`` x ``size``; the aspect ratio is not kept.

    The rule: unchanged when already ``size`` x ``size``; area averaging (``cv2.INTER_AREA``)
    when neither side is smaller than ``size``; bilinear otherwise. The dtype is kept (uint8
    for the training cache, float32 in the node).

    Parameters
    ----------
    image:
        ``(rows, cols)`` uint8 or float32.
    size:
        Side of the model input, pixels.

    Returns
    -------
    numpy.ndarray
        ``(size, size)``, same dtype; a new array.
    """
    if image.ndim != 2:
        raise ValueError(f"resize_square needs a 2-D image, got shape {image.shape}")
    if size < 1:
        raise ValueError(f"resize_square size must be >= 1, got {size}")
    rows, cols = image.shape
    if (rows, cols) == (size, size):
        return image.copy()
    shrinking = rows >= size and cols >= size
    interpolation = cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR
    resized = cv2.resize(image, (size, size), interpolation=interpolation)
    return np.asarray(resized, dtype=image.dtype)


def unit_from_uint8(image: npt.NDArray[np.uint8]) -> npt.NDArray[np.float32]:
    """uint8 gray levels as float32 in [0, 1] (``/ 255``), the scale the node decodes to."""
    return image.astype(np.float32) / np.float32(255.0)


def normalise(
    images: npt.NDArray[np.float32], mean: float, std: float, channels: int
) -> npt.NDArray[np.float32]:
    """``(x - mean) / std`` and the gray channel repeated: ``(..., H, W)`` -> ``(..., H, W, c)``.

    Parameters
    ----------
    images:
        One ``(H, W)`` image or a ``(N, H, W)`` batch in [0, 1], float32.
    mean, std:
        From the model card (``InputSpec``).
    channels:
        1, or 3 to repeat the gray channel.

    Returns
    -------
    numpy.ndarray
        float32 with a trailing channel axis; with mean 0, std 1 and one channel (what models
        from ``training`` take) a view of ``images``, without a copy.
    """
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    if std <= 0:
        raise ValueError(f"std must be > 0, got {std}")
    scaled = np.asarray(images, dtype=np.float32)
    if mean != 0.0 or std != 1.0:
        scaled = (scaled - np.float32(mean)) / np.float32(std)
    if channels == 1:
        return scaled[..., np.newaxis]
    return np.repeat(scaled[..., np.newaxis], channels, axis=-1)


def model_input(image: npt.NDArray[np.float32], spec: InputSpec) -> npt.NDArray[np.float32]:
    """One display-sense image in [0, 1] as the package's input ``(size, size, channels)``.

    Parameters
    ----------
    image:
        2-D float32, 0 black.
    spec:
        The card's input section.

    Returns
    -------
    numpy.ndarray
        float32 ``(size, size, channels)``.
    """
    resized = resize_square(image.astype(np.float32, copy=False), spec.size)
    return normalise(resized, spec.mean, spec.std, spec.channels)
