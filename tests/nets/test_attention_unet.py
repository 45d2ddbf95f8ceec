"""The Attention U-Net: paper size, explicit names, save/load round trip, gates that matter."""

from __future__ import annotations

import re
from pathlib import Path

import keras
import numpy as np
import pytest

from pneumonode.nets.attention_unet import build_attention_unet
from pneumonode.nets.gates import AttentionGate, attention_gates, open_gates

NAME_PATTERN = re.compile(r"^(image|output|gate\d|(enc\d|dec\d|bottleneck)_[a-z0-9]+)$")


def _tiny() -> keras.Model:
    keras.utils.set_random_seed(3)
    return build_attention_unet((64, 64, 1), base_filters=2, depth=5, name="tiny")


def _batch() -> np.ndarray:
    return np.random.default_rng(0).random((2, 64, 64, 1), dtype=np.float32)


def test_paper_configuration() -> None:
    model = build_attention_unet()
    assert model.count_params() == 8_124_502
    assert model.output_shape == (None, 256, 256, 1)
    filters = [model.get_layer(f"enc{i}_conv2").filters for i in range(5)]
    assert filters == [16, 32, 64, 128, 256]
    assert model.get_layer("bottleneck_conv2").filters == 512
    assert model.get_layer("enc0_dropout").rate == pytest.approx(0.2)
    assert len(attention_gates(model)) == 5
    assert model.get_layer("output").activation.__name__ == "sigmoid"


def test_every_layer_has_an_explicit_name() -> None:
    model = _tiny()
    bad = [layer.name for layer in model.layers if not NAME_PATTERN.match(layer.name)]
    assert bad == []


def test_gate_receives_the_skip_and_the_coarser_decoder_features() -> None:
    model = _tiny()
    gate = model.get_layer("gate3")
    skip, gating = gate.input
    assert tuple(skip.shape) == (None, 8, 8, 16)
    assert tuple(gating.shape) == (None, 4, 4, 32)
    # The gated skip, not the raw skip, feeds the decoder concatenation.
    concat_inputs = model.get_layer("dec3_concat").input
    assert any(t is gate.output for t in concat_inputs)
    assert not any(t is model.get_layer("enc3_conv2").output for t in concat_inputs)


def test_save_load_round_trip_gives_identical_predictions(tmp_path: Path) -> None:
    model = _tiny()
    x = _batch()
    before = np.asarray(model.predict_on_batch(x))
    path = tmp_path / "tiny.keras"
    model.save(path)
    loaded = keras.saving.load_model(path, compile=False)
    after = np.asarray(loaded.predict_on_batch(x))
    assert after.shape == (2, 64, 64, 1)
    np.testing.assert_allclose(after, before, atol=1e-6)
    assert isinstance(loaded.get_layer("gate0"), AttentionGate)
    assert loaded.get_layer("gate0").get_config() == model.get_layer("gate0").get_config()


def test_forcing_the_gates_open_changes_the_prediction() -> None:
    model = _tiny()
    x = _batch()
    gated = np.asarray(model.predict_on_batch(x))
    assert open_gates(model) == 5
    ungated = np.asarray(model.predict_on_batch(x))
    assert np.abs(gated - ungated).max() > 1e-3


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"input_shape": (48, 64, 1), "depth": 5}, "divisible by 2\\*\\*depth = 32"),
        ({"dropout": 1.0}, "dropout"),
        ({"base_filters": 0}, "base_filters"),
    ],
)
def test_builder_rejects_bad_arguments(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build_attention_unet(**kwargs)  # type: ignore[arg-type]
