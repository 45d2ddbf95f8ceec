"""Time a few training steps of a recipe and extrapolate seconds per epoch and a full run."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import keras
import numpy as np

from training.distribute import data_parallel
from training.recipes import Recipe
from training.train import build_model, compile_model

#: Images of the SIIM-ACR stage-1 training set.
SIIM_IMAGES = 12047
#: The paper's (and our) share used for training; the rest is validation.
TRAIN_SHARE = 0.7


@dataclass(frozen=True)
class EpochEstimate:
    """Measured step times and what they imply for one epoch and for the whole recipe."""

    recipe: str
    backend: str
    replicas: int
    batch_size: int
    input_size: int
    steps_timed: int
    train_step_s: float
    predict_step_s: float
    train_steps: int
    val_steps: int

    @property
    def epoch_s(self) -> float:
        """Seconds per epoch: training steps plus one validation pass."""
        return self.train_steps * self.train_step_s + self.val_steps * self.predict_step_s

    def total_s(self, epochs: int) -> float:
        """Seconds for ``epochs`` epochs."""
        return epochs * self.epoch_s

    def describe(self, epochs: int) -> str:
        """One line for a report."""
        return (
            f"{self.recipe}: {self.backend} x{self.replicas}, {self.input_size} px, batch "
            f"{self.batch_size}: {self.train_step_s:.3f} s/train step, {self.predict_step_s:.3f} "
            f"s/val batch -> {self.epoch_s:.0f} s/epoch ({self.train_steps} + {self.val_steps} "
            f"steps), {epochs} epochs ~ {self.total_s(epochs) / 3600:.1f} h"
        )


def bench_epoch(
    recipe: Recipe,
    steps: int,
    *,
    warmup: int = 1,
    images: int = SIIM_IMAGES,
    distributed: bool = False,
) -> EpochEstimate:
    """Time ``steps`` training steps (after ``warmup``) on random batches of the recipe's shape.

    Data loading and augmentation are not timed (the loader runs in parallel threads); the
    validation pass is timed as ``predict_on_batch`` on the same batch.

    Parameters
    ----------
    recipe : Recipe
        Network, input size and batch size come from it.
    steps : int
        Timed steps (each of training and of prediction).
    warmup : int
        Untimed steps first (tracing, compilation).
    images : int
        Size of the data set the epoch is extrapolated to (SIIM stage 1 by default).
    distributed : bool
        Data-parallel on every local device.

    Returns
    -------
    EpochEstimate
        The timings and the extrapolation.
    """
    if steps < 1 or warmup < 0:
        raise ValueError(f"need steps >= 1 and warmup >= 0, got {steps} and {warmup}")
    spec = recipe.model
    batch = recipe.train.batch_size
    rng = np.random.default_rng(0)
    # The model takes one gray channel in [0, 1] and scales and repeats it itself.
    x = rng.random((batch, spec.input_size, spec.input_size, 1), dtype=np.float32)
    y = (rng.random((batch, spec.input_size, spec.input_size, 1)) > 0.9).astype(np.float32)
    with data_parallel(distributed) as replicas:
        model = build_model(spec)
        compile_model(model, recipe.train.lr, recipe.train.jit_compile)
        for _ in range(warmup):
            model.train_on_batch(x, y)
            model.predict_on_batch(x)
        start = time.perf_counter()
        for _ in range(steps):
            model.train_on_batch(x, y)
        train_step = (time.perf_counter() - start) / steps
        start = time.perf_counter()
        for _ in range(steps):
            keras.ops.convert_to_numpy(model.predict_on_batch(x))
        predict_step = (time.perf_counter() - start) / steps
    n_train = round(images * TRAIN_SHARE)
    return EpochEstimate(
        recipe=recipe.name,
        backend=keras.backend.backend(),
        replicas=replicas,
        batch_size=batch,
        input_size=spec.input_size,
        steps_timed=steps,
        train_step_s=train_step,
        predict_step_s=predict_step,
        train_steps=math.ceil(n_train / batch),
        val_steps=math.ceil((images - n_train) / batch),
    )
