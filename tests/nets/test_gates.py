"""The attention gate multiplies the skip features, serialises, and can be forced open."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from pneumonode.nets.gates import AttentionGate, attention_gates, open_gates


def _gate_model(inter_channels: int | None = None) -> keras.Model:
    x = keras.Input((8, 8, 4), name="x")
    g = keras.Input((4, 4, 6), name="g")
    out = AttentionGate(inter_channels=inter_channels, name="gate")([x, g])
    return keras.Model([x, g], out, name="gate_model")


def _inputs(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return (
        rng.normal(size=(2, 8, 8, 4)).astype(np.float32),
        rng.normal(size=(2, 4, 4, 6)).astype(np.float32),
    )


def test_gate_multiplies_the_skip_features() -> None:
    keras.utils.set_random_seed(1)
    model = _gate_model()
    gate = model.get_layer("gate")
    x, g = _inputs()
    out = keras.ops.convert_to_numpy(model([x, g], training=False))
    alpha = keras.ops.convert_to_numpy(gate.attention(x, g))
    assert alpha.shape == (2, 8, 8, 1)
    assert ((alpha > 0) & (alpha < 1)).all()
    # The output is the skip x weighted by alpha, not anything derived from the gate's sum.
    np.testing.assert_allclose(out, x * alpha, rtol=1e-6, atol=1e-6)
    assert not np.allclose(out, x)


def test_gate_sublayers_are_named_after_the_gate() -> None:
    gate = _gate_model(inter_channels=3).get_layer("gate")
    names = {gate.theta_x.name, gate.phi_g.name, gate.psi.name, gate.upsample.name}
    assert names == {"gate_theta_x", "gate_phi_g", "gate_psi", "gate_upsample"}
    assert gate.theta_x.filters == 3
    # Default intermediate channels: half the skip channels.
    assert _gate_model().get_layer("gate").theta_x.filters == 2


def test_gate_config_round_trip() -> None:
    gate = AttentionGate(inter_channels=5, subsample=2, name="g1")
    config = gate.get_config()
    assert config["inter_channels"] == 5
    assert config["subsample"] == 2
    clone = AttentionGate.from_config(config)
    assert clone.get_config() == config
    assert keras.saving.get_registered_name(AttentionGate) == "pneumonode>AttentionGate"


def test_open_gates_passes_the_skip_unchanged() -> None:
    model = _gate_model()
    x, g = _inputs(2)
    assert open_gates(model) == 1
    out = keras.ops.convert_to_numpy(model([x, g], training=False))
    np.testing.assert_array_equal(out, x)


def test_gate_rejects_sizes_that_do_not_match_subsample() -> None:
    x = keras.Input((8, 8, 4))
    g = keras.Input((3, 3, 6))
    with pytest.raises(ValueError, match="subsample=2"):
        AttentionGate(name="bad")([x, g])


def test_gate_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="inter_channels"):
        AttentionGate(inter_channels=0)
    with pytest.raises(ValueError, match="subsample"):
        AttentionGate(subsample=0)


def test_open_gates_needs_a_gate() -> None:
    inputs = keras.Input((4, 4, 1))
    model = keras.Model(inputs, keras.layers.Conv2D(1, 1, name="c")(inputs), name="plain")
    assert attention_gates(model) == []
    with pytest.raises(ValueError, match="no AttentionGate"):
        open_gates(model)
