"""ResNet34 Attention U-Net: encoder structure, round trip, gates, local encoder weights."""

from __future__ import annotations

from pathlib import Path

import h5py
import keras
import numpy as np
import pytest

from pneumonode.nets.gates import attention_gates, open_gates
from pneumonode.nets.resnet34 import (
    SKIP_LAYERS,
    build_attention_resnet34_unet,
    build_resnet34_encoder,
    load_encoder_weights,
)

SHAPE = (64, 64, 3)


def _batch() -> np.ndarray:
    return np.random.default_rng(0).random((1, *SHAPE), dtype=np.float32)


def _predict(model: keras.Model, x: np.ndarray) -> np.ndarray:
    """Inference-mode call without tracing a predict function (faster for one call)."""
    return np.asarray(keras.ops.convert_to_numpy(model(x, training=False)))


def _randomise_batch_norm(model: keras.Model, seed: int) -> None:
    """Give BN statistics non-trivial values so that a weight mix-up would show."""
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.set_weights(
                [rng.uniform(0.5, 1.5, w.shape).astype(np.float32) for w in layer.get_weights()]
            )


def test_encoder_has_resnet34_blocks_and_five_feature_maps() -> None:
    encoder = build_resnet34_encoder(SHAPE)
    names = [layer.name for layer in encoder.layers]
    for stage, units in enumerate((3, 4, 6, 3), start=1):
        found = [n for n in names if n.startswith(f"stage{stage}_unit") and n.endswith("_conv1")]
        assert len(found) == units
        assert f"stage{stage}_unit1_sc" in names
    shapes = [tuple(t.shape) for t in encoder.outputs]
    assert shapes == [
        (None, 32, 32, 64),
        (None, 16, 16, 64),
        (None, 8, 8, 128),
        (None, 4, 4, 256),
        (None, 2, 2, 512),
    ]
    assert encoder.count_params() == 21_302_473


def test_unet_round_trip_and_gates_change_the_prediction(tmp_path: Path) -> None:
    keras.utils.set_random_seed(5)
    model = build_attention_resnet34_unet(SHAPE, name="tiny_resnet")
    assert model.output_shape == (None, 64, 64, 1)
    assert [model.get_layer(f"dec{i}_conv2").filters for i in range(1, 6)] == [
        256, 128, 64, 32, 16,
    ]
    gates = attention_gates(model)
    assert [gate.name for gate in gates] == ["gate1", "gate2", "gate3", "gate4"]
    # Each gate gates the segmentation_models skip of its stage.
    for gate, skip in zip(gates, SKIP_LAYERS, strict=True):
        assert gate.input[0] is model.get_layer(skip).output
    x = _batch()
    before = _predict(model, x)
    path = tmp_path / "resnet.keras"
    model.save(path)
    loaded = keras.saving.load_model(path, compile=False)
    np.testing.assert_allclose(_predict(loaded, x), before, atol=1e-6)
    assert open_gates(loaded) == 4
    assert np.abs(_predict(loaded, x) - before).max() > 1e-3


def _write_keras2_h5(encoder: keras.Model, path: Path) -> None:
    """Write weights the way Keras 2 ``save_weights`` did (classification_models' files)."""
    with h5py.File(path, "w") as handle:
        names = [layer.name for layer in encoder.layers if layer.weights]
        # Order and extra layers must not matter: loading is by name.
        names = [*reversed(names), "fc1"]
        handle.attrs["layer_names"] = [n.encode() for n in names]
        handle.attrs["keras_version"] = b"2.2.4"
        for name in names:
            group = handle.create_group(name)
            if name == "fc1":
                weight_names = ["fc1/kernel:0"]
                group.create_dataset(weight_names[0], data=np.zeros((512, 10), np.float32))
            else:
                layer = encoder.get_layer(name)
                weight_names = [f"{name}/{v.name}:0" for v in layer.weights]
                for weight_name, value in zip(weight_names, layer.get_weights(), strict=True):
                    group.create_dataset(weight_name, data=value)
            group.attrs["weight_names"] = [n.encode() for n in weight_names]


def test_loads_classification_models_h5_by_layer_name(tmp_path: Path) -> None:
    keras.utils.set_random_seed(11)
    source = build_resnet34_encoder(SHAPE)
    _randomise_batch_norm(source, 1)
    path = tmp_path / "resnet34_imagenet_1000_no_top.h5"
    _write_keras2_h5(source, path)
    keras.utils.set_random_seed(12)
    target = build_resnet34_encoder(SHAPE)
    x = _batch()
    want = [keras.ops.convert_to_numpy(t) for t in source(x, training=False)]
    assert not np.allclose(keras.ops.convert_to_numpy(target(x, training=False)[-1]), want[-1])
    load_encoder_weights(target, path)
    got = [keras.ops.convert_to_numpy(t) for t in target(x, training=False)]
    for got_map, want_map in zip(got, want, strict=True):
        np.testing.assert_allclose(got_map, want_map, atol=1e-5)


def test_unet_takes_keras3_encoder_weights(tmp_path: Path) -> None:
    keras.utils.set_random_seed(21)
    source = build_resnet34_encoder(SHAPE)
    _randomise_batch_norm(source, 2)
    path = tmp_path / "encoder.weights.h5"
    source.save_weights(path)
    keras.utils.set_random_seed(22)
    model = build_attention_resnet34_unet(SHAPE, encoder_weights=path)
    for name in ("conv0", "bn_data", "stage3_unit2_conv1", "bn1"):
        for got, want in zip(
            model.get_layer(name).get_weights(), source.get_layer(name).get_weights(), strict=True
        ):
            np.testing.assert_array_equal(got, want)


def test_missing_weights_file_is_named(tmp_path: Path) -> None:
    path = tmp_path / "absent.h5"
    with pytest.raises(FileNotFoundError, match=r"absent\.h5"):
        build_attention_resnet34_unet(SHAPE, encoder_weights=path)


def test_incomplete_or_mismatched_h5_is_rejected(tmp_path: Path) -> None:
    encoder = build_resnet34_encoder(SHAPE)
    partial = tmp_path / "partial.h5"
    with h5py.File(partial, "w") as handle:
        handle.attrs["layer_names"] = [b"conv0"]
        group = handle.create_group("conv0")
        group.attrs["weight_names"] = [b"conv0/kernel:0"]
        group.create_dataset("conv0/kernel:0", data=np.zeros((7, 7, 3, 64), np.float32))
    with pytest.raises(ValueError, match="no weights for encoder layer 'bn_data'"):
        load_encoder_weights(encoder, partial)
    gray = build_resnet34_encoder((64, 64, 1))
    full = tmp_path / "rgb.h5"
    _write_keras2_h5(encoder, full)
    with pytest.raises(ValueError, match="3 input channels"):
        load_encoder_weights(gray, full)
    not_hdf5 = tmp_path / "junk.h5"
    not_hdf5.write_bytes(b"not an hdf5 file")
    with pytest.raises(ValueError, match=r"junk\.h5"):
        load_encoder_weights(encoder, not_hdf5)
