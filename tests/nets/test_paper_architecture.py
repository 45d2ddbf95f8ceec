"""The seed's graphs as published ("paper") beside the corrected ones ("fixed")."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import keras
import numpy as np
import pytest

from pneumonode.inference.package import load_package
from pneumonode.nets.attention_unet import build_attention_unet
from pneumonode.nets.gates import AttentionGate, attention_gates
from pneumonode.nets.resnet34 import build_attention_resnet34_unet


def _call(model: keras.Model, x: np.ndarray) -> np.ndarray:
    return np.asarray(keras.ops.convert_to_numpy(model(x, training=False)))


def test_paper_gate_returns_its_own_features_not_the_skip() -> None:
    rng = np.random.default_rng(0)
    x = rng.random((1, 8, 8, 6), dtype=np.float32)
    g = rng.random((1, 4, 4, 5), dtype=np.float32)
    keras.utils.set_random_seed(1)
    paper = AttentionGate(mode="paper", name="gp")
    out = np.asarray(keras.ops.convert_to_numpy(paper([x, g])))
    assert out.shape == (1, 8, 8, 3)  # inter channels = half the skip's, not the skip's 6
    q = keras.ops.relu(paper.theta_x(x) + paper.phi_g(g))
    alpha = keras.ops.sigmoid(paper.psi(q))
    expected = keras.ops.convert_to_numpy(paper.upsample(q * alpha))
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)
    fixed = AttentionGate(name="gf")
    assert tuple(fixed([x, g]).shape) == (1, 8, 8, 6)
    with pytest.raises(ValueError, match="mode must be one of"):
        AttentionGate(mode="seed")


def test_paper_attention_unet_concatenates_the_gate_output_in_place_of_the_skip() -> None:
    paper = build_attention_unet((32, 32, 3), base_filters=4, depth=2, architecture="paper")
    fixed = build_attention_unet((32, 32, 3), base_filters=4, depth=2)
    # The finest level's skip has 4 channels; the paper gate passes on 2 (its inter channels).
    assert paper.get_layer("dec0_concat").output.shape[-1] == 8 + 2
    assert fixed.get_layer("dec0_concat").output.shape[-1] == 8 + 4
    assert {gate.mode for gate in attention_gates(paper)} == {"paper"}
    with pytest.raises(ValueError, match="architecture"):
        build_attention_unet((32, 32, 1), base_filters=2, depth=1, architecture="seed")


def test_paper_resnet34_has_no_gate_and_no_decoder_batchnorm() -> None:
    paper = build_attention_resnet34_unet((64, 64, 3), architecture="paper")
    fixed = build_attention_resnet34_unet((64, 64, 3))
    assert attention_gates(paper) == [] and len(attention_gates(fixed)) == 4
    names = {layer.name for layer in paper.layers}
    assert not any(n.startswith("dec") and "_bn" in n for n in names)
    assert paper.get_layer("dec1_conv1").use_bias and not fixed.get_layer("dec1_conv1").use_bias
    assert any(n.startswith("dec1_bn") for n in (layer.name for layer in fixed.layers))
    # The encoder is the same ResNet34 (ImageNet weights load into both).
    assert paper.get_layer("stage4_unit3_conv2").kernel.shape == (3, 3, 512, 512)


def test_paper_gate_round_trips_under_the_pneumonode_package_name(tmp_path: Path) -> None:
    model = build_attention_unet((32, 32, 3), base_filters=2, depth=1, architecture="paper")
    path = tmp_path / "paper.keras"
    model.save(path)
    with zipfile.ZipFile(path) as archive:
        config = json.loads(archive.read("config.json"))
    text = json.dumps(config)
    assert '"registered_name": "pneumonode>AttentionGate"' in text and '"mode": "paper"' in text
    loaded = keras.saving.load_model(
        path, custom_objects={"pneumonode>AttentionGate": AttentionGate}, compile=False
    )
    x = np.random.default_rng(2).random((1, 32, 32, 3), dtype=np.float32)
    np.testing.assert_allclose(_call(loaded, x), _call(model, x), atol=1e-6)
    # A fixed gate's config stays as before (no mode key), so older packages are unchanged.
    assert "mode" not in AttentionGate(name="g").get_config()


def test_demo_package_still_loads() -> None:
    demo = Path(__file__).resolve().parents[2] / "pneumonode" / "models" / "demo"
    package = load_package(demo)
    assert {gate.mode for m in package.members for gate in attention_gates(m)} == {"fixed"}
