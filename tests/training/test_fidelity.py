"""Recipe fidelity: how the ResNet34 encoder starts is explicit and recorded; input scales."""

from __future__ import annotations

import logging
from pathlib import Path

import keras
import numpy as np
import pytest

from training.__main__ import main
from training.export import build_card
from training.recipes import load_recipe
from training.run import RunInfo
from training.train import build_model, input_transform, resolve_encoder_weights


def test_resnet34_recipes_refuse_to_start_without_an_encoder_decision() -> None:
    for name in ("attention_resnet34", "attention_resnet34_swa"):
        rule = r"--encoder-weights PATH .* or --encoder-weights none"
        with pytest.raises(ValueError, match=rule):
            resolve_encoder_weights(load_recipe(name), None)
    # The Attention U-Net has no encoder: nothing to decide.
    assert resolve_encoder_weights(load_recipe("attention_unet"), None) == (None, None)


def test_cli_names_the_rule(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    assert main(["train", "--recipe", "attention_resnet34", "--run-dir", str(run)]) == 1
    assert "--encoder-weights" in capsys.readouterr().err
    assert not any(run.glob("*.keras"))


def test_encoder_weights_none_is_recorded_and_warned(caplog: pytest.LogCaptureFixture) -> None:
    recipe = load_recipe("attention_resnet34_swa")
    with caplog.at_level(logging.WARNING, logger="training.train"):
        path, record = resolve_encoder_weights(recipe, "none")
    assert path is None and record is not None and record.startswith("none")
    assert "RANDOM weights" in caplog.text
    with pytest.raises(FileNotFoundError, match="encoder weights file not found"):
        resolve_encoder_weights(recipe, Path("/nonexistent/resnet34.h5"))


def test_model_card_says_how_the_encoder_started() -> None:
    recipe = load_recipe("attention_resnet34_swa")
    info = RunInfo(
        recipe=recipe.name, variant=recipe.model.variant, data_source="x", data_path="x",
        epochs=1, members=["swa.keras"], untrained_val_dice=0.0, final_val_dice=0.0,
        seconds=1.0, backend="tensorflow", encoder_weights="none (random initialisation)",
        input_transform=input_transform(recipe.model),
    )
    from pneumonode.inference.card import Thresholds

    card = build_card(recipe, info, ["swa.keras"], thresholds=Thresholds(), validation={})
    assert "ResNet34 encoder start: none (random initialisation)" in card.training.notes
    assert "x * 255" in card.training.notes


def test_resnet34_model_feeds_its_encoder_0_255_three_channels() -> None:
    spec = load_recipe("attention_resnet34").model.model_copy(update={"input_size": 64})
    model = build_model(spec)
    assert tuple(model.inputs[0].shape[1:]) == (64, 64, 1)
    probe = keras.Model(model.inputs, model.get_layer("input_rgb").output)
    x = np.full((1, 64, 64, 1), 0.5, dtype=np.float32)
    out = np.asarray(keras.ops.convert_to_numpy(probe(x)))
    assert out.shape == (1, 64, 64, 3)
    np.testing.assert_allclose(out, 127.5)
    unet = build_model(load_recipe("smoke").model)
    assert "input_rgb" not in {layer.name for layer in unet.layers}
    assert unet.get_layer("input_scale").scale == 1.0
