"""train --mixed-precision, --resume RUN and --init-from RUN on a tiny phantom recipe."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import keras
import numpy as np
import pytest

import training.callbacks as callbacks_module
from training.__main__ import main
from training.export import export_package, float32_member, load_member
from training.recipes import load_recipe
from training.run import RunInfo, load_run_recipe
from training.train import TOP_K, build_model, precision

pytestmark = pytest.mark.slow

TINY = """
name = "tiny"
description = "tiny phantom run for option tests"
[data]
kind = "phantoms"
count = 24
original_size = 32
seed = 5
[model]
variant = "attention_unet"
input_size = {size}
base_filters = 4
depth = 2
dropout = 0.0
[train]
epochs = 3
batch_size = 8
lr = 3e-3
augment = false
jit_compile = false
top_k = 2
[snapshots]
cycles = 1
lr0 = 3e-3
[swa]
start_epoch = 1
"""


def _recipe(tmp_path: Path, size: int = 32) -> Path:
    path = tmp_path / f"tiny{size}.toml"
    path.write_text(TINY.format(size=size), encoding="utf-8")
    return path


def _history(run: Path) -> list[dict[str, str]]:
    with (run / "history.csv").open() as handle:
        return list(csv.DictReader(handle))


class Interrupted(Exception):
    """Stands for a crash after an epoch's checkpoint."""


def test_resume_goes_on_from_the_last_finished_epoch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    recipe = _recipe(tmp_path)
    run = tmp_path / "run"
    real = callbacks_module.ResumeCheckpoint.on_epoch_end

    def crash_after_epoch_1(self: Any, epoch: int, logs: Any = None) -> None:
        real(self, epoch, logs)
        if epoch == 1:
            raise Interrupted

    monkeypatch.setattr(callbacks_module.ResumeCheckpoint, "on_epoch_end", crash_after_epoch_1)
    with pytest.raises(Interrupted):
        main(["train", "--recipe", str(recipe), "--run-dir", str(run), "--quiet"])
    assert not (run / "run.json").exists()
    assert [row["epoch"] for row in _history(run)] == ["0", "1"]
    monkeypatch.setattr(callbacks_module.ResumeCheckpoint, "on_epoch_end", real)
    assert main(["train", "--resume", str(run), "--quiet"]) == 0
    info = RunInfo.load(run)
    assert info.resumed_at_epochs == [2]
    assert [row["epoch"] for row in _history(run)] == ["0", "1", "2"]
    # SWA averaged epochs 1 and 2 across the interruption; top-k kept its epochs too.
    assert (run / "swa.keras").is_file() and (run / TOP_K).is_file()
    assert sorted(info.top_k_epochs) in ([0, 1], [0, 2], [1, 2])
    assert main(["train", "--resume", str(run), "--quiet"]) == 1


def test_init_from_starts_a_larger_run_from_the_smaller_ones_weights(tmp_path: Path) -> None:
    small = tmp_path / "small"
    assert main(["train", "--recipe", str(_recipe(tmp_path)), "--run-dir", str(small),
                 "--quiet"]) == 0
    large_recipe = load_recipe(_recipe(tmp_path, size=64))
    model = build_model(large_recipe.model)
    source = load_member(small / TOP_K)
    model.set_weights(source.get_weights())
    large = tmp_path / "large"
    assert main(["train", "--recipe", str(_recipe(tmp_path, size=64)), "--run-dir", str(large),
                 "--init-from", str(small), "--quiet"]) == 0
    info = RunInfo.load(large)
    assert info.init_from == str(small / TOP_K)
    # Started from the small run's weights: better than a fresh model before any step.
    assert info.untrained_val_dice > RunInfo.load(small).untrained_val_dice


def test_mixed_precision_trains_and_exports_float32(tmp_path: Path) -> None:
    run = tmp_path / "mixed"
    args = ["train", "--recipe", str(_recipe(tmp_path)), "--run-dir", str(run), "--quiet"]
    assert main([*args, "--mixed-precision", "bfloat16"]) == 0
    info = RunInfo.load(run)
    assert info.mixed_precision == "bfloat16"
    trained = load_member(run / "swa.keras")
    assert trained.get_layer("input_scale").dtype_policy.name == "mixed_bfloat16"
    assert keras.config.dtype_policy().name == "float32"  # restored after the run
    member = float32_member(run / "swa.keras", load_run_recipe(run))
    assert {layer.dtype_policy.compute_dtype for layer in member.layers} == {"float32"}
    x = np.random.default_rng(0).random((1, 32, 32, 1), dtype=np.float32)
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(member(x)), keras.ops.convert_to_numpy(trained(x)), atol=0.05
    )
    out = export_package(run, tmp_path / "package", members=["swa.keras"])
    card = (out / "model_card.json").read_text()
    assert "mixed bfloat16" in card
    with pytest.raises(ValueError, match="mixed precision must be one of"), precision("int8"):
        pass
