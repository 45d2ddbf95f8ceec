"""Search of the triplet thresholds (top, min_area, bottom, min_component_area) on validation."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from pneumonode.inference.card import Thresholds
from pneumonode.inference.postprocess import (
    mask_on_source,
    remove_small_components,
    resize_probability,
)
from training.metrics import dice
from training.recipes import Evaluation


@dataclass(frozen=True)
class SearchResult:
    """The best triplet, its validation Dice and that of the plain 0.5 threshold."""

    thresholds: Thresholds
    dice: float
    default_dice: float
    images: int


class TripletSearch:
    """Accumulate per-image summaries, then score every combination of the grid exactly.

    For each image only these are kept: the number of pixels above each ``top`` (at model
    resolution), the original-resolution Dice of the node's mask for each (``bottom``,
    ``min_component_area``) when the image is not declared empty, and the Dice of an empty
    prediction (1 or 0). The Dice of any combination then follows without predicting again, so
    the search is exact and its memory does not grow with the image size.

    Parameters
    ----------
    grid : Evaluation
        The recipe's candidate values; 0.5 / 0.5 / 0 / 0 is always added so that the plain
        threshold can be reported.
    """

    def __init__(self, grid: Evaluation) -> None:
        self.tops = sorted({*grid.top, 0.5})
        self.bottoms = sorted({*grid.bottom, 0.5})
        self.min_areas = sorted({*grid.min_area, 0})
        self.component_areas = sorted({*grid.min_component_area, 0})
        self._counts: list[NDArray[np.int64]] = []
        self._dice: list[NDArray[np.float64]] = []
        self._empty: list[float] = []

    def add(self, probability: NDArray[np.floating], truth: NDArray[np.bool_]) -> None:
        """Summarise one image.

        Parameters
        ----------
        probability : numpy.ndarray
            Model output ``(h, w)`` at model resolution (after TTA and ensembling).
        truth : numpy.ndarray
            Ground truth at the original resolution.
        """
        prob = np.asarray(probability, dtype=np.float32)
        self._counts.append(np.array([np.count_nonzero(prob > t) for t in self.tops]))
        source = resize_probability(prob, (truth.shape[0], truth.shape[1]))
        table = np.empty((len(self.bottoms), len(self.component_areas)))
        for (i, bottom), (j, area) in itertools.product(
            enumerate(self.bottoms), enumerate(self.component_areas)
        ):
            rule = Thresholds(top=bottom, bottom=bottom, min_component_area=area)
            model_mask = remove_small_components(prob > bottom, area)
            table[i, j] = dice(mask_on_source(source, model_mask, rule), truth)
        self._dice.append(table)
        self._empty.append(0.0 if truth.any() else 1.0)

    def scores(self) -> NDArray[np.float64]:
        """Mean Dice of every combination, shape ``(top, min_area, bottom, min_component_area)``.

        Combinations with ``bottom > top`` are NaN.
        """
        if not self._counts:
            raise ValueError("the threshold search has no image")
        counts = np.stack(self._counts)
        table = np.stack(self._dice)
        empty = np.asarray(self._empty)
        n = len(empty)
        areas = np.asarray(self.min_areas)
        kept = (counts[:, :, None] >= areas[None, None, :]).astype(np.float64)
        filled = np.einsum("nta,nbc->tabc", kept, table)
        emptied = np.einsum("nta,n->ta", 1.0 - kept, empty)
        out = (filled + emptied[:, :, None, None]) / n
        tops = np.asarray(self.tops)
        bottoms = np.asarray(self.bottoms)
        invalid = bottoms[None, :] > tops[:, None]
        out[np.broadcast_to(invalid[:, None, :, None], out.shape)] = np.nan
        return np.asarray(out, dtype=np.float64)

    def result(self) -> SearchResult:
        """The best combination (the first in grid order among equals)."""
        scores = self.scores()
        best = np.unravel_index(int(np.nanargmax(scores)), scores.shape)
        t, a, b, c = (int(i) for i in best)
        default = scores[
            self.tops.index(0.5),
            self.min_areas.index(0),
            self.bottoms.index(0.5),
            self.component_areas.index(0),
        ]
        return SearchResult(
            thresholds=Thresholds(
                top=self.tops[t],
                bottom=self.bottoms[b],
                min_area=self.min_areas[a],
                min_component_area=self.component_areas[c],
            ),
            dice=float(scores[best]),
            default_dice=float(default),
            images=len(self._empty),
        )
