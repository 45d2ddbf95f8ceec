"""prepare (SIIM DICOMs, PNG repack) and the PyDataset built on the prepared folder."""

from __future__ import annotations

from pathlib import Path

import cv2
import keras
import numpy as np
import pydicom
import pytest

from training.augment import Augmenter
from training.data import SegmentationData
from training.prepare import prepare_siim
from training.rle import RleFormat, encode, write_rle_csv
from training.store import PreparedData


def test_prepare_the_siim_sample_dicoms(shared_data: Path, tmp_path: Path) -> None:
    sample = shared_data / "siim-sample"
    if not (sample / "dicom").is_dir():
        pytest.skip(f"real test data absent: {sample / 'dicom'}")
    out = tmp_path / "prepared"
    entries = prepare_siim(
        sample / "dicom", sample / "train-rle.csv", out, size=64, workers=1, progress=False
    )
    assert len(entries) == 10
    store = PreparedData.open(out)
    assert store.size == 64 and store.rle_format is RleFormat.RELATIVE
    val = store.ids("val")
    train = store.ids("train")
    assert len(val) == 4 and len(train) == 6
    assert sum(store.entry(i).positive for i in val) == 2
    for image_id in store.ids("train") + val:
        entry = store.entry(image_id)
        assert (entry.height, entry.width) == (1024, 1024)
        (truth,) = store.original_masks([image_id])
        reference = cv2.imread(str(sample / "masks" / f"{image_id}.png"), cv2.IMREAD_GRAYSCALE)
        assert np.array_equal(truth, reference > 127)
        small = store.load_mask(image_id)
        assert small.shape == (64, 64)
        assert bool(small.any()) == entry.positive
    image_id = val[0]
    ds = pydicom.dcmread(sample / "dicom" / f"{image_id}.dcm")
    expected = cv2.resize(ds.pixel_array.astype(np.uint8), (64, 64), interpolation=cv2.INTER_AREA)
    assert np.abs(store.load_image(image_id).astype(int) - expected.astype(int)).max() <= 1


def test_prepare_a_png_repack_with_absolute_rle(tmp_path: Path) -> None:
    images = tmp_path / "png"
    images.mkdir()
    rows = {}
    rng = np.random.default_rng(0)
    for index in range(10):
        image = (rng.random((100, 80)) * 255).astype(np.uint8)
        mask = np.zeros((100, 80), bool)
        if index % 2:
            mask[20:60, 10:30] = True
        cv2.imwrite(str(images / f"img{index}.png"), image)
        rows[f"img{index}"] = [encode(mask, RleFormat.ABSOLUTE)]
    rle = tmp_path / "rle.csv"
    write_rle_csv(rle, rows)
    out = tmp_path / "prepared"
    prepare_siim(
        images, rle, out, size=32, rle_format=RleFormat.ABSOLUTE, workers=1, progress=False
    )
    store = PreparedData.open(out)
    (truth,) = store.original_masks(["img1"])
    assert truth.shape == (100, 80) and truth[30, 20] and not truth[10, 5]
    assert store.load_image("img1").shape == (32, 32)


def test_dataset_batches_channels_and_reshuffling(tmp_path: Path) -> None:
    images = tmp_path / "png"
    images.mkdir()
    rows = {}
    for index in range(12):
        image = np.full((64, 64), index * 20, np.uint8)
        mask = np.zeros((64, 64), bool)
        mask[: index + 1, :] = True
        cv2.imwrite(str(images / f"i{index:02d}.png"), image)
        rows[f"i{index:02d}"] = [encode(mask, RleFormat.RELATIVE)]
    write_rle_csv(tmp_path / "rle.csv", rows)
    prepare_siim(images, tmp_path / "rle.csv", tmp_path / "p", size=32, workers=1, progress=False)
    store = PreparedData.open(tmp_path / "p")
    ids = store.ids("train") + store.ids("val")
    data = SegmentationData(store, ids, batch_size=5, channels=3, mean=0.5, std=0.25)
    assert len(data) == 3
    x, y = data[2]
    assert x.shape == (2, 32, 32, 3) and y.shape == (2, 32, 32, 1)
    first_id = data.batch_ids(0)[0]
    expected = (store.load_image(first_id)[0, 0] / 255.0 - 0.5) / 0.25
    assert data[0][0][0, 0, 0, 1] == pytest.approx(expected, rel=1e-6)
    assert set(np.unique(y)) <= {0.0, 1.0}

    shuffled = SegmentationData(
        store, ids, batch_size=4, augmenter=Augmenter(), shuffle=True, seed=3
    )
    before = [shuffled.batch_ids(i) for i in range(len(shuffled))]
    batch_before = shuffled[0][0]
    assert np.array_equal(batch_before, shuffled[0][0])  # same epoch: same draws
    model = keras.Sequential([keras.Input((32, 32, 1)), keras.layers.Conv2D(1, 1)])
    model.compile(optimizer="sgd", loss="mse")
    model.fit(shuffled, epochs=2, verbose=0)
    assert shuffled.epoch >= 2  # keras called on_epoch_end after each epoch
    after = [shuffled.batch_ids(i) for i in range(len(shuffled))]
    assert before != after
    assert sorted(i for b in before for i in b) == sorted(i for b in after for i in b)
