"""The SIIM-ACR challenge metric: mean per-image Dice at the original resolution, in numpy."""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray

from pneumonode.inference.card import Thresholds
from pneumonode.inference.postprocess import mask_on_source, resize_probability, triplet

#: 0.5 everywhere and no area rule: the plain thresholded mask.
DEFAULT_THRESHOLDS = Thresholds()


def dice(prediction: NDArray[np.bool_], truth: NDArray[np.bool_]) -> float:
    """Dice coefficient of two boolean masks, 1.0 when both are empty.

    Parameters
    ----------
    prediction, truth : numpy.ndarray
        Boolean masks of the same shape.

    Returns
    -------
    float
        ``2 |P & T| / (|P| + |T|)``, or 1.0 when ``|P| + |T| == 0``.
    """
    if prediction.shape != truth.shape:
        raise ValueError(f"dice needs masks of one shape, got {prediction.shape} and {truth.shape}")
    total = int(np.count_nonzero(prediction)) + int(np.count_nonzero(truth))
    if total == 0:
        return 1.0
    return 2.0 * int(np.count_nonzero(prediction & truth)) / total


def per_image_dice(
    predictions: NDArray[np.bool_], truths: NDArray[np.bool_]
) -> NDArray[np.float64]:
    """Dice of each image of a batch ``(N, H, W)``; 1.0 where both masks are empty."""
    if predictions.shape != truths.shape or predictions.ndim != 3:
        raise ValueError(
            f"per_image_dice needs two (N, H, W) arrays, got {predictions.shape} and {truths.shape}"
        )
    flat_p = predictions.reshape(len(predictions), -1)
    flat_t = truths.reshape(len(truths), -1)
    inter = np.count_nonzero(flat_p & flat_t, axis=1).astype(np.float64)
    total = (np.count_nonzero(flat_p, axis=1) + np.count_nonzero(flat_t, axis=1)).astype(np.float64)
    out = np.ones(len(predictions), dtype=np.float64)
    nonempty = total > 0
    out[nonempty] = 2.0 * inter[nonempty] / total[nonempty]
    return out


def predicted_mask(
    probability: NDArray[np.floating], shape: tuple[int, int], thresholds: Thresholds
) -> NDArray[np.bool_]:
    """The mask the node would send for a probability map, on a ``shape`` pixel grid.

    The node's own post-processing is used (:mod:`pneumonode.inference.postprocess`): the
    triplet decision at model resolution, then the bilinearly resized probabilities
    thresholded at ``bottom`` on the original grid.

    Parameters
    ----------
    probability : numpy.ndarray
        Model output ``(h, w)`` at model resolution.
    shape : tuple of int
        Original ``(height, width)``.
    thresholds : Thresholds
        The card's triplet.

    Returns
    -------
    numpy.ndarray
        Boolean mask of ``shape``.
    """
    prob = np.asarray(probability, dtype=np.float32)
    model_mask = triplet(prob, thresholds)
    return mask_on_source(resize_probability(prob, shape), model_mask, thresholds)


def challenge_dice_at(
    probability: NDArray[np.floating],
    truth: NDArray[np.bool_],
    thresholds: Thresholds = DEFAULT_THRESHOLDS,
) -> float:
    """Dice of one image scored as the challenge did, at the truth's (original) resolution.

    Parameters
    ----------
    probability : numpy.ndarray
        Model output ``(h, w)`` at model resolution.
    truth : numpy.ndarray
        Ground truth at the original resolution ``(H, W)``.
    thresholds : Thresholds
        Post-processing (default: 0.5, no area rules).

    Returns
    -------
    float
        The image's Dice (1.0 when both masks are empty).
    """
    return dice(predicted_mask(probability, (truth.shape[0], truth.shape[1]), thresholds), truth)
