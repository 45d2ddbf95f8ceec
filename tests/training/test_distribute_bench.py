"""The data-parallel switch and the epoch timing tool."""

from __future__ import annotations

import json
import math

import keras
import numpy as np
import pytest

from training.__main__ import main
from training.bench import SIIM_IMAGES, bench_epoch
from training.distribute import data_parallel
from training.recipes import load_recipe


def test_disabled_data_parallel_is_one_replica() -> None:
    with data_parallel(False) as replicas:
        assert replicas == 1


def test_data_parallel_trains_on_the_local_devices() -> None:
    if keras.backend.backend() not in ("jax", "tensorflow"):
        pytest.skip("data-parallel training needs jax or tensorflow")
    x = np.random.default_rng(0).normal(size=(16, 4)).astype("float32")
    y = x.sum(axis=1, keepdims=True)
    with data_parallel(True) as replicas:
        model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
        model.compile(optimizer="sgd", loss="mse")
        history = model.fit(x, y, batch_size=8, epochs=2, verbose=0)
    assert replicas >= 1
    assert np.isfinite(history.history["loss"][-1])


def test_bench_epoch_extrapolates_to_the_siim_split(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench-epoch", "--recipe", "smoke", "--steps", "1", "--json"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert "s/epoch" in lines[0]
    row = json.loads(lines[-1])
    recipe = load_recipe("smoke")
    batch = recipe.train.batch_size
    n_train = round(0.7 * SIIM_IMAGES)
    train_steps = math.ceil(n_train / batch)
    val_steps = math.ceil((SIIM_IMAGES - n_train) / batch)
    assert row["recipe"] == "smoke" and row["epochs"] == recipe.train.epochs
    assert row["train_step_s"] > 0 and row["predict_step_s"] > 0
    expected = train_steps * row["train_step_s"] + val_steps * row["predict_step_s"]
    assert row["epoch_s"] == pytest.approx(expected)
    assert row["total_h"] == pytest.approx(recipe.train.epochs * expected / 3600)
    with pytest.raises(ValueError, match="steps"):
        bench_epoch(recipe, steps=0)
