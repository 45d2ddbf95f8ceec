"""Pure-numpy post-processing: TTA and ensemble averaging, the triplet threshold, source masks."""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np
import numpy.typing as npt

from pneumonode.inference.card import Thresholds

FloatArray = npt.NDArray[np.float32]
BoolArray = npt.NDArray[np.bool_]


def _check_probability_map(prob: FloatArray, what: str) -> None:
    if prob.ndim != 2:
        raise ValueError(f"{what} must be a 2-D probability map, got shape {prob.shape}")


def average_tta(probs: FloatArray, probs_of_flipped: FloatArray) -> FloatArray:
    """Average predictions with those made on horizontally flipped inputs.

    Parameters
    ----------
    probs:
        Probabilities for the original inputs, shape ``(..., H, W)``.
    probs_of_flipped:
        Probabilities the model gave for the left-right flipped inputs, *still flipped*
        (same shape); they are flipped back along the last axis before averaging.

    Returns
    -------
    numpy.ndarray
        ``(probs + flip(probs_of_flipped)) / 2`` as float32.

    Raises
    ------
    ValueError
        If the shapes differ.
    """
    if probs.shape != probs_of_flipped.shape:
        raise ValueError(
            f"TTA shapes differ: {probs.shape} and {probs_of_flipped.shape}"
        )
    unflipped = np.flip(probs_of_flipped, axis=-1)
    return ((probs.astype(np.float32) + unflipped.astype(np.float32)) / np.float32(2)).astype(
        np.float32
    )


def average_members(member_probs: Sequence[FloatArray]) -> FloatArray:
    """Average the probabilities of the members of an ensemble.

    Parameters
    ----------
    member_probs:
        One array per member, all of the same shape.

    Returns
    -------
    numpy.ndarray
        Element-wise mean as float32.

    Raises
    ------
    ValueError
        If there are no members or their shapes differ.
    """
    if not member_probs:
        raise ValueError("average_members needs at least one member")
    shapes = {p.shape for p in member_probs}
    if len(shapes) != 1:
        raise ValueError(f"ensemble members disagree on shape: {sorted(shapes)}")
    stacked = np.stack([p.astype(np.float32) for p in member_probs])
    return np.asarray(stacked.mean(axis=0, dtype=np.float32), dtype=np.float32)


def remove_small_components(mask: BoolArray, min_area: int) -> BoolArray:
    """Drop 8-connected components with fewer than ``min_area`` pixels.

    Parameters
    ----------
    mask:
        2-D boolean mask.
    min_area:
        Smallest component kept, in pixels; 0 or 1 keeps everything.

    Returns
    -------
    numpy.ndarray
        A new boolean mask.
    """
    if min_area <= 1 or not mask.any():
        return mask.copy()
    _, labels, stats, _ = cv2.connectedComponentsWithStats(
        mask.astype(np.uint8), connectivity=8
    )
    keep = stats[:, cv2.CC_STAT_AREA] >= min_area
    keep[0] = False
    return np.asarray(keep[labels], dtype=np.bool_)


def triplet(prob: FloatArray, thresholds: Thresholds) -> BoolArray:
    """The SIIM winners' "triplet" rule on a probability map at model resolution.

    Pixels with ``prob > top`` are confident. If fewer than ``min_area`` are confident the
    image is empty. Otherwise the mask is ``prob > bottom``, from which components smaller
    than ``min_component_area`` pixels are removed (when that is > 0).

    Parameters
    ----------
    prob:
        2-D float probabilities in [0, 1].
    thresholds:
        The card's thresholds.

    Returns
    -------
    numpy.ndarray
        Boolean mask of the same shape.
    """
    _check_probability_map(prob, "triplet input")
    confident = int(np.count_nonzero(prob > thresholds.top))
    if confident < thresholds.min_area:
        return np.zeros(prob.shape, dtype=np.bool_)
    mask = np.asarray(prob > thresholds.bottom, dtype=np.bool_)
    return remove_small_components(mask, thresholds.min_component_area)


def resize_probability(prob: FloatArray, shape: tuple[int, int]) -> FloatArray:
    """Resize a probability map to ``shape`` = (rows, cols) with bilinear interpolation.

    Parameters
    ----------
    prob:
        2-D float map.
    shape:
        Target (rows, cols).

    Returns
    -------
    numpy.ndarray
        float32 map of the target shape.
    """
    _check_probability_map(prob, "probability map")
    rows, cols = shape
    if prob.shape == (rows, cols):
        return prob.astype(np.float32, copy=True)
    resized = cv2.resize(prob.astype(np.float32), (cols, rows), interpolation=cv2.INTER_LINEAR)
    return np.asarray(resized, dtype=np.float32)


def mask_on_source(
    source_prob: FloatArray, model_mask: BoolArray, thresholds: Thresholds
) -> BoolArray:
    """Carry a triplet decision made at model resolution onto the source pixel grid.

    The decision (empty or not) and the component filtering are made at model resolution,
    where the card's ``min_area`` and ``min_component_area`` are defined; the outline comes
    from the probability map resized to the source (bilinear) and thresholded at ``bottom``,
    which follows the probabilities more closely than an enlarged model-resolution mask:

    - an empty model mask gives an empty source mask;
    - without component filtering (``min_component_area <= 1``) the mask is
      ``source_prob > bottom``;
    - with it, a source component (8-connected) is kept only if it overlaps the model mask
      resized to the source by nearest neighbour, so components removed at model resolution
      are removed on the source too.

    Parameters
    ----------
    source_prob:
        Probabilities resized to the source grid.
    model_mask:
        Output of :func:`triplet` at model resolution.
    thresholds:
        The card's thresholds.

    Returns
    -------
    numpy.ndarray
        Boolean mask with the shape of ``source_prob``.
    """
    _check_probability_map(source_prob, "source probability map")
    _check_probability_map(model_mask.astype(np.float32), "model mask")
    if not model_mask.any():
        return np.zeros(source_prob.shape, dtype=np.bool_)
    source_mask = np.asarray(source_prob > thresholds.bottom, dtype=np.bool_)
    if thresholds.min_component_area <= 1 or not source_mask.any():
        return source_mask
    rows, cols = source_prob.shape
    kept = cv2.resize(
        model_mask.astype(np.uint8), (cols, rows), interpolation=cv2.INTER_NEAREST_EXACT
    ).astype(np.bool_)
    count, labels = cv2.connectedComponents(source_mask.astype(np.uint8), connectivity=8)
    overlapping = np.zeros(count, dtype=np.bool_)
    overlapping[np.unique(labels[kept & source_mask])] = True
    overlapping[0] = False
    return np.asarray(overlapping[labels], dtype=np.bool_)
