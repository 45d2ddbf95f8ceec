"""The triplet search scores every combination exactly as the node would post-process."""

from __future__ import annotations

import itertools

import cv2
import numpy as np

from pneumonode.inference.card import Thresholds
from training.metrics import challenge_dice_at
from training.recipes import Evaluation
from training.thresholds import TripletSearch


def _case(rng: np.random.Generator, positive: bool) -> tuple[np.ndarray, np.ndarray]:
    prob = cv2.GaussianBlur(rng.random((32, 32)).astype("float32"), (0, 0), 1.5) * 0.6
    truth = np.zeros((64, 64), bool)
    if positive:
        r, c = rng.integers(8, 40, size=2)
        truth[r : r + 16, c : c + 12] = True
        prob[r // 2 : r // 2 + 8, c // 2 : c // 2 + 6] += rng.uniform(0.3, 0.5)
    prob[rng.integers(0, 32), rng.integers(0, 32)] = 0.95  # an isolated confident speck
    return np.clip(prob, 0, 1), truth


def test_search_equals_direct_scoring_of_every_combination() -> None:
    rng = np.random.default_rng(11)
    cases = [_case(rng, positive=i % 3 == 0) for i in range(12)]
    grid = Evaluation(
        top=[0.6, 0.8], bottom=[0.4, 0.5], min_area=[0, 3, 30], min_component_area=[0, 4]
    )
    search = TripletSearch(grid)
    for prob, truth in cases:
        search.add(prob, truth)
    scores = search.scores()
    for (t, top), (a, area), (b, bottom), (c, comp) in itertools.product(
        enumerate(search.tops),
        enumerate(search.min_areas),
        enumerate(search.bottoms),
        enumerate(search.component_areas),
    ):
        if bottom > top:
            assert np.isnan(scores[t, a, b, c])
            continue
        rule = Thresholds(top=top, bottom=bottom, min_area=area, min_component_area=comp)
        direct = np.mean([challenge_dice_at(p, truth, rule) for p, truth in cases])
        assert abs(scores[t, a, b, c] - direct) < 1e-12, rule
    result = search.result()
    assert result.images == 12
    assert result.dice == np.nanmax(scores)
    assert result.dice >= result.default_dice
    assert result.default_dice == np.mean([challenge_dice_at(p, truth) for p, truth in cases])
