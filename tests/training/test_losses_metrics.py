"""BCE + soft Dice in keras.ops and the challenge metric at the original resolution."""

from __future__ import annotations

import math

import keras
import numpy as np
import pytest

from pneumonode.inference.card import Thresholds
from training.losses import bce_dice_loss, hard_dice, soft_dice
from training.metrics import challenge_dice_at, dice, per_image_dice, predicted_mask


def _value(tensor: object) -> float:
    return float(keras.ops.convert_to_numpy(tensor))


def test_bce_dice_loss_matches_a_hand_computation() -> None:
    y = np.array([[1.0, 0.0], [1.0, 0.0]], "float32").reshape(1, 2, 2, 1)
    p = np.array([[0.8, 0.1], [0.6, 0.3]], "float32").reshape(1, 2, 2, 1)
    bce = -(math.log(0.8) + math.log(0.9) + math.log(0.6) + math.log(0.7)) / 4
    soft = (2 * (0.8 + 0.6) + 1) / (2 + (0.8 + 0.1 + 0.6 + 0.3) + 1)
    assert _value(soft_dice(y, p)) == pytest.approx(soft, rel=1e-6)
    assert _value(bce_dice_loss(y, p)) == pytest.approx(bce + 1 - soft, rel=1e-5)
    empty = np.zeros((1, 2, 2, 1), "float32")
    assert _value(soft_dice(empty, empty)) == pytest.approx(1.0)
    assert _value(hard_dice(empty, empty)) == pytest.approx(1.0)
    assert _value(hard_dice(y, p)) == pytest.approx(2 * 2 / (2 + 2))


def test_dice_is_one_when_both_masks_are_empty() -> None:
    empty = np.zeros((4, 4), bool)
    some = empty.copy()
    some[1, 1] = True
    assert dice(empty, empty) == 1.0
    assert dice(some, empty) == 0.0
    two = some.copy()
    two[2, 2] = True
    assert dice(some, two) == pytest.approx(2 / 3)
    batch = per_image_dice(np.stack([empty, some, some]), np.stack([empty, empty, two]))
    np.testing.assert_allclose(batch, [1.0, 0.0, 2 / 3])


def test_challenge_dice_is_scored_at_the_original_resolution() -> None:
    prob = np.zeros((8, 8), "float32")
    prob[2:6, 2:6] = 0.9
    truth = np.zeros((32, 32), bool)
    truth[8:24, 8:24] = True
    mask = predicted_mask(prob, (32, 32), Thresholds())
    assert mask.shape == (32, 32)
    assert challenge_dice_at(prob, truth) > 0.85
    assert challenge_dice_at(np.zeros((8, 8), "float32"), np.zeros((32, 32), bool)) == 1.0
    assert challenge_dice_at(np.zeros((8, 8), "float32"), truth) == 0.0
    # The triplet's min_area empties a prediction with too few confident pixels.
    strict = Thresholds(top=0.5, bottom=0.5, min_area=17)
    assert not predicted_mask(prob, (32, 32), strict).any()
