"""One preprocessing for training and serving: the same DICOM gives the same model input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest

from pneumonode.dicom.pixels import decode
from pneumonode.inference.card import InputSpec, ModelCard, TrainingInfo
from pneumonode.inference.package import ModelPackage
from pneumonode.inference.predictor import Predictor
from pneumonode.inference.preprocess import resize_square
from training.data import SegmentationData
from training.prepare import prepare_siim
from training.store import PreparedData, resize_image
from training.train import build_model


def card_for(size: int) -> ModelCard:
    """The card export writes for a training run's package: one gray channel in [0, 1]."""
    return ModelCard(
        name="skew-test",
        version="0",
        uid="2.25.4321",
        variant="attention_unet",
        demo=True,
        input=InputSpec(size=size, channels=1, mean=0.0, std=1.0),
        training=TrainingInfo(recipe="tests", data="none", epochs=0),
        intended_use="tests only",
    )


def _node_input(path: Path, size: int) -> np.ndarray:
    """What the node's Predictor feeds the model for one DICOM (a card of ``size``)."""
    predictor = Predictor(ModelPackage(path=path.parent, card=card_for(size), members=()))
    return predictor.prepare(decode(pydicom.dcmread(path)).image)


def _sample(shared_data: Path) -> Path:
    folder = shared_data / "siim-sample"
    if not (folder / "dicom").is_dir():
        pytest.skip(f"real test data absent: {folder / 'dicom'} (SIIM sample DICOMs)")
    return folder


@pytest.mark.parametrize("size", [1024, 256])
def test_same_dicom_same_model_input_in_training_and_in_the_node(
    shared_data: Path, tmp_path: Path, size: int
) -> None:
    sample = _sample(shared_data)
    out = tmp_path / f"prepared-{size}"
    prepare_siim(
        sample / "dicom", sample / "train-rle.csv", out, size=size, workers=1, progress=False
    )
    store = PreparedData.open(out)
    ids = store.ids("val")
    loader = SegmentationData(store, ids, batch_size=len(ids))
    x_train, _ = loader[0]
    for row, image_id in enumerate(ids):
        served = _node_input(sample / "dicom" / f"{image_id}.dcm", size)
        assert served.shape == x_train[row].shape == (size, size, 1)
        difference = np.abs(served - x_train[row]).max()
        if size == 1024:
            # No resize: the 8-bit image reaches the model bit for bit the same.
            assert difference == 0.0
        else:
            # The training cache is uint8: the same resize, rounded to the nearest gray level.
            assert difference <= 0.5 / 255 + 1e-6


def test_one_resize_rule_for_both() -> None:
    rng = np.random.default_rng(0)
    gray = (rng.random((300, 217)) * 255).astype(np.uint8)
    # One side smaller than the model input: bilinear in both, never area on one side only.
    assert np.array_equal(resize_image(gray, 256), resize_square(gray, 256))
    as_float = resize_square(gray.astype(np.float32) / 255, 256)
    # cv2's uint8 bilinear uses fixed-point weights: within one gray level of the float path.
    assert np.abs(as_float * 255 - resize_square(gray, 256)).max() <= 1.0
    with pytest.raises(ValueError, match="2-D"):
        resize_square(np.zeros((4, 4, 3), np.uint8), 2)


def test_training_models_take_what_the_node_gives() -> None:
    from training.recipes import load_recipe

    for name in ("smoke", "smoke_paper"):
        model = build_model(load_recipe(name).model)
        assert tuple(model.inputs[0].shape[1:]) == (64, 64, 1)
    assert InputSpec(size=64).channels == 1
