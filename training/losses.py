"""Training losses (BCE + soft Dice, smooth 1; weighted BCE/Dice/focal) and a Dice metric."""

from __future__ import annotations

from typing import Any

import keras
from keras import ops

SMOOTH = 1.0
_EPSILON = 1e-7


def soft_dice(y_true: Any, y_pred: Any, smooth: float = SMOOTH) -> Any:
    """Soft Dice over the whole batch: ``(2 sum(t p) + s) / (sum(t) + sum(p) + s)``.

    Parameters
    ----------
    y_true, y_pred : tensor
        Ground truth in {0, 1} and probabilities, same shape.
    smooth : float
        Added to numerator and denominator (1 in the paper).

    Returns
    -------
    tensor
        Scalar.
    """
    t = ops.reshape(ops.cast(y_true, "float32"), (-1,))
    p = ops.reshape(ops.cast(y_pred, "float32"), (-1,))
    intersection = ops.sum(t * p)
    return (2.0 * intersection + smooth) / (ops.sum(t) + ops.sum(p) + smooth)


@keras.saving.register_keras_serializable(package="pneumonode_training")  # type: ignore[untyped-decorator]
def bce_dice_loss(y_true: Any, y_pred: Any) -> Any:
    """Binary cross-entropy (mean over pixels) plus ``1 - soft_dice`` (smooth 1).

    Parameters
    ----------
    y_true, y_pred : tensor
        Masks in {0, 1} and sigmoid probabilities, shape ``(N, H, W, 1)``.

    Returns
    -------
    tensor
        Scalar loss.
    """
    t = ops.cast(y_true, "float32")
    p = ops.clip(ops.cast(y_pred, "float32"), _EPSILON, 1.0 - _EPSILON)
    bce = -ops.mean(t * ops.log(p) + (1.0 - t) * ops.log(1.0 - p))
    return bce + 1.0 - soft_dice(t, p)


def focal(y_true: Any, y_pred: Any, gamma: float = 2.0) -> Any:
    """Binary focal loss (Lin et al. 2017), mean over pixels: ``-(1 - p_t)^gamma log(p_t)``."""
    t = ops.cast(y_true, "float32")
    p = ops.clip(ops.cast(y_pred, "float32"), _EPSILON, 1.0 - _EPSILON)
    p_t = t * p + (1.0 - t) * (1.0 - p)
    return -ops.mean(ops.power(1.0 - p_t, gamma) * ops.log(p_t))


@keras.saving.register_keras_serializable(package="pneumonode_training")  # type: ignore[misc]
class WeightedLoss(keras.losses.Loss):  # type: ignore[misc]
    """``bce * BCE + dice * (1 - soft Dice) + focal * focal loss`` (the winners used 3:1:4).

    Parameters
    ----------
    bce, dice, focal : float
        Weights of the terms.
    focal_gamma : float
        Focusing exponent of the focal term.
    """

    def __init__(
        self,
        bce: float = 1.0,
        dice: float = 1.0,
        focal: float = 0.0,
        focal_gamma: float = 2.0,
        name: str = "weighted_loss",
        **kwargs: Any,
    ) -> None:
        super().__init__(name=name, **kwargs)
        self.bce = bce
        self.dice = dice
        self.focal = focal
        self.focal_gamma = focal_gamma

    def call(self, y_true: Any, y_pred: Any) -> Any:
        """The weighted sum (a scalar per batch)."""
        t = ops.cast(y_true, "float32")
        p = ops.clip(ops.cast(y_pred, "float32"), _EPSILON, 1.0 - _EPSILON)
        total = 0.0
        if self.bce:
            total = total - self.bce * ops.mean(t * ops.log(p) + (1.0 - t) * ops.log(1.0 - p))
        if self.dice:
            total = total + self.dice * (1.0 - soft_dice(t, p))
        if self.focal:
            total = total + self.focal * focal(t, p, self.focal_gamma)
        return total

    def get_config(self) -> dict[str, Any]:
        """Serialisable configuration."""
        config: dict[str, Any] = super().get_config()
        config.update(
            {"bce": self.bce, "dice": self.dice, "focal": self.focal,
             "focal_gamma": self.focal_gamma}
        )
        return config


@keras.saving.register_keras_serializable(package="pneumonode_training")  # type: ignore[untyped-decorator]
def hard_dice(y_true: Any, y_pred: Any) -> Any:
    """Batch Dice of the mask thresholded at 0.5 (a progress metric, not the challenge metric).

    Parameters
    ----------
    y_true, y_pred : tensor
        Masks and probabilities, same shape.

    Returns
    -------
    tensor
        Scalar; 1 when truth and prediction are both empty over the batch.
    """
    t = ops.reshape(ops.cast(y_true > 0.5, "float32"), (-1,))
    p = ops.reshape(ops.cast(y_pred > 0.5, "float32"), (-1,))
    total = ops.sum(t) + ops.sum(p)
    return ops.where(total > 0, 2.0 * ops.sum(t * p) / ops.maximum(total, 1.0), 1.0)
