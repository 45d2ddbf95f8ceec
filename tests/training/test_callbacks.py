"""Snapshot schedule, SWA mean and BatchNorm recomputation against hand computations."""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

import keras
import numpy as np
import pytest

from training.callbacks import (
    EpochLog,
    SnapshotEnsemble,
    StochasticWeightAveraging,
    batchnorm_layers,
    cosine_annealing_lr,
    recompute_batchnorm,
    running_mean,
    snapshot_epochs,
)


def test_cosine_schedule_matches_hand_values() -> None:
    lr0 = 1e-3
    # T = 132, M = 4: cycles of 33 epochs.
    assert cosine_annealing_lr(0, lr0, 132, 4) == pytest.approx(1e-3)
    assert cosine_annealing_lr(11, lr0, 132, 4) == pytest.approx(7.5e-4)  # cos(pi/3) = 1/2
    assert cosine_annealing_lr(22, lr0, 132, 4) == pytest.approx(2.5e-4)  # cos(2pi/3) = -1/2
    assert cosine_annealing_lr(32, lr0, 132, 4) == pytest.approx(
        lr0 / 2 * (math.cos(math.pi * 32 / 33) + 1)
    )
    assert cosine_annealing_lr(33, lr0, 132, 4) == pytest.approx(1e-3)  # warm restart
    assert cosine_annealing_lr(44, lr0, 132, 4) == pytest.approx(7.5e-4)
    assert cosine_annealing_lr(131, lr0, 132, 4) == pytest.approx(
        cosine_annealing_lr(32, lr0, 132, 4)
    )
    # A period that is not a whole number of epochs: T = 10, M = 3.
    assert cosine_annealing_lr(4, 1.0, 10, 3) == pytest.approx(
        0.5 * (math.cos(math.pi * (4 - 10 / 3) / (10 / 3)) + 1)
    )
    with pytest.raises(ValueError):
        cosine_annealing_lr(0, lr0, 3, 4)


def test_snapshot_epochs_are_the_last_epoch_of_each_cycle() -> None:
    assert snapshot_epochs(132, 4) == [32, 65, 98, 131]
    assert snapshot_epochs(12, 2) == [5, 11]
    assert snapshot_epochs(10, 3) == [3, 6, 9]
    assert snapshot_epochs(5, 1) == [4]


def _np(variable: Any) -> np.ndarray:
    return np.asarray(keras.ops.convert_to_numpy(variable))


def _tiny_model(batchnorm: bool = False) -> keras.Model:
    inputs = keras.Input((3,), name="x")
    x = keras.layers.Dense(2, name="dense")(inputs)
    if batchnorm:
        x = keras.layers.BatchNormalization(name="bn")(x)
    outputs = keras.layers.Dense(1, name="head")(x)
    model = keras.Model(inputs, outputs)
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="mse")
    return model


def _data(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(24, 3)).astype("float32")
    return x, (x @ np.array([[1.0], [-2.0], [0.5]], "float32")).astype("float32")


class _Recorder(keras.callbacks.Callback):  # type: ignore[misc]
    def __init__(self) -> None:
        super().__init__()
        self.weights: list[list[np.ndarray]] = []

    def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
        self.weights.append([np.array(w) for w in self.model.get_weights()])


def test_snapshot_callback_sets_rates_and_saves_at_cycle_ends(tmp_path: Path) -> None:
    keras.utils.set_random_seed(0)
    model = _tiny_model()
    x, y = _data()
    recorder = _Recorder()
    ensemble = SnapshotEnsemble(tmp_path, 0.01, total_epochs=6, cycles=3)
    log = EpochLog(tmp_path / "history.csv")
    model.fit(x, y, batch_size=8, epochs=6, verbose=0, callbacks=[ensemble, recorder, log])
    with (tmp_path / "history.csv").open() as handle:
        rates = [float(row["lr"]) for row in csv.DictReader(handle)]
    assert rates == pytest.approx([0.01, 0.005, 0.01, 0.005, 0.01, 0.005])
    assert [p.name for p in ensemble.saved] == [f"snapshot_{k}.keras" for k in (1, 2, 3)]
    for k, epoch in enumerate([1, 3, 5], start=1):
        saved = keras.saving.load_model(tmp_path / f"snapshot_{k}.keras", compile=False)
        for got, want in zip(saved.get_weights(), recorder.weights[epoch], strict=True):
            np.testing.assert_array_equal(got, want)


def test_running_mean_is_the_plain_mean() -> None:
    samples = [[np.full((2,), v), np.array([[v, 2 * v]])] for v in (1.0, 4.0, 7.0)]
    mean: list[np.ndarray] = []
    for count, sample in enumerate(samples, start=1):
        mean = running_mean(mean, sample, count)
    np.testing.assert_allclose(mean[0], [4.0, 4.0])
    np.testing.assert_allclose(mean[1], [[4.0, 8.0]])


def test_swa_averages_the_weights_of_the_epochs_from_the_start(tmp_path: Path) -> None:
    model = _tiny_model()
    swa = StochasticWeightAveraging(start_epoch=1, path=tmp_path / "swa.keras", bn_data=None)
    swa.set_model(model)
    epochs = []
    for epoch in range(4):
        weights = [
            np.full(w.shape, float(epoch * 10 + i), "float32")
            for i, w in enumerate(model.get_weights())
        ]
        model.set_weights(weights)
        epochs.append(weights)
        swa.on_epoch_end(epoch)
    assert swa.count == 3
    swa.on_train_end()
    for i, got in enumerate(model.get_weights()):
        hand = (epochs[1][i] + epochs[2][i] + epochs[3][i]) / 3
        np.testing.assert_allclose(got, hand, rtol=1e-6)
        np.testing.assert_allclose(got, np.full(got.shape, 20.0 + i), rtol=1e-6)
    assert swa.bn_batches_used == 0  # no BatchNorm: nothing recomputed
    reloaded = keras.saving.load_model(tmp_path / "swa.keras", compile=False)
    np.testing.assert_allclose(reloaded.get_weights()[0], epochs[2][0], rtol=1e-6)


def _hand_bn_statistics(model: keras.Model, batches: list[np.ndarray]) -> tuple[Any, Any]:
    kernel, bias = model.get_layer("dense").get_weights()
    means, variances = [], []
    for x in batches:
        h = x @ kernel + bias
        means.append(h.mean(axis=0))
        variances.append(h.var(axis=0))  # the biased batch variance, as Keras uses
    return np.mean(means, axis=0), np.mean(variances, axis=0)


def test_batchnorm_recomputation_matches_hand_statistics() -> None:
    keras.utils.set_random_seed(1)
    model = _tiny_model(batchnorm=True)
    (bn,) = batchnorm_layers(model)
    gamma_beta = [_np(bn.gamma), _np(bn.beta)]
    bn.moving_mean.assign(np.array([50.0, -50.0], "float32"))
    rng = np.random.default_rng(5)
    batches = [rng.normal(loc=i, size=(4, 3)).astype("float32") for i in range(3)]
    used = recompute_batchnorm(model, batches)
    assert used == 3
    mean, variance = _hand_bn_statistics(model, batches)
    np.testing.assert_allclose(_np(bn.moving_mean), mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(_np(bn.moving_variance), variance, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(_np(bn.gamma), gamma_beta[0])
    np.testing.assert_array_equal(_np(bn.beta), gamma_beta[1])
    assert bn.momentum == pytest.approx(0.99)
    assert recompute_batchnorm(_tiny_model(), batches) == 0


def test_swa_in_fit_averages_then_recomputes_batchnorm(tmp_path: Path) -> None:
    keras.utils.set_random_seed(2)
    model = _tiny_model(batchnorm=True)
    x, y = _data(1)
    batches = [(x[i : i + 8], y[i : i + 8]) for i in range(0, 24, 8)]
    recorder = _Recorder()
    swa = StochasticWeightAveraging(2, tmp_path / "swa.keras", bn_data=batches)
    model.fit(x, y, batch_size=8, epochs=4, verbose=0, callbacks=[recorder, swa])
    names = [w.path for w in model.weights]
    for index, name in enumerate(names):
        if "moving" in name:
            continue
        hand = (recorder.weights[2][index] + recorder.weights[3][index]) / 2
        np.testing.assert_allclose(model.get_weights()[index], hand, rtol=1e-5, atol=1e-7)
    mean, variance = _hand_bn_statistics(model, [b[0] for b in batches])
    (bn,) = batchnorm_layers(model)
    np.testing.assert_allclose(_np(bn.moving_mean), mean, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(_np(bn.moving_variance), variance, rtol=1e-4, atol=1e-6)
    assert swa.bn_batches_used == 3
    saved = keras.saving.load_model(tmp_path / "swa.keras", compile=False)
    np.testing.assert_allclose(_np(saved.get_layer("bn").moving_mean), mean, rtol=1e-4, atol=1e-6)
