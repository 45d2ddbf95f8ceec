"""The loader: uint8 memory-mapped cache, cached validation masks, oversampling, bench-data."""

from __future__ import annotations

import itertools
import json
import pickle
from pathlib import Path

import numpy as np
import pytest

import training.store as store_module
from training.__main__ import main
from training.data import SegmentationData
from training.phantoms import make_phantom
from training.prepare import prepare_synthetic
from training.store import CACHE_IMAGES, CACHE_MASKS, IMAGES, MASKS, PreparedData, _read_png


@pytest.fixture
def prepared(tmp_path: Path) -> Path:
    out = tmp_path / "data"
    prepare_synthetic(out, make_phantom, count=20, original_size=64, size=32, seed=3)
    return out


def test_cache_is_built_once_and_matches_the_pngs(prepared: Path) -> None:
    store = PreparedData.open(prepared)
    assert not (prepared / CACHE_IMAGES).exists()
    for entry in store.entries:
        png = _read_png(prepared / IMAGES / f"{entry.image_id}.png")
        assert np.array_equal(store.load_image(entry.image_id), png)
        mask = _read_png(prepared / MASKS / f"{entry.image_id}.png") > 127
        assert np.array_equal(store.load_mask(entry.image_id), mask.astype(np.uint8))
    images = np.load(prepared / CACHE_IMAGES, mmap_mode="r")
    assert images.dtype == np.uint8 and images.shape == (20, 32, 32)
    assert np.load(prepared / CACHE_MASKS, mmap_mode="r").max() == 1
    stamp = (prepared / CACHE_IMAGES).stat().st_mtime_ns
    again = PreparedData.open(prepared)
    again.load_image(store.entries[0].image_id)
    assert (prepared / CACHE_IMAGES).stat().st_mtime_ns == stamp
    # Worker processes get the paths, not a copy of the pixels.
    assert len(pickle.dumps(store.pixels)) < 5_000


def test_validation_masks_are_decoded_once(
    prepared: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = PreparedData.open(prepared)
    calls: list[str] = []
    real = store_module.decode_union

    def counting(rles, shape, fmt):  # type: ignore[no-untyped-def]
        calls.append("x")
        return real(rles, shape, fmt)

    monkeypatch.setattr(store_module, "decode_union", counting)
    ids = store.ids("val")
    first = store.original_masks(ids)
    second = store.original_masks(ids)
    assert len(calls) == len(ids)
    for a, b in zip(first, second, strict=True):
        assert a.shape == (64, 64) and np.array_equal(a, b)


def test_oversampling_falls_from_start_to_end(prepared: Path) -> None:
    store = PreparedData.open(prepared)
    ids = store.ids("train") + store.ids("val")
    data = SegmentationData(
        store, ids, batch_size=4, shuffle=True, oversampling=(0.8, 0.4), epochs=5
    )
    shares = []
    for epoch in range(5):
        data.set_epoch(epoch)
        drawn = [i for b in range(len(data)) for i in data.batch_ids(b)]
        assert len(drawn) == len(ids)
        shares.append(np.mean([store.entry(i).positive for i in drawn]))
    assert shares[0] == pytest.approx(0.8, abs=0.03)
    assert shares[-1] == pytest.approx(0.4, abs=0.03)
    assert all(a >= b for a, b in itertools.pairwise(shares))
    assert data.positive_share(2) == pytest.approx(0.6)


def test_bench_data_reports_images_per_core_and_workers(
    capsys: pytest.CaptureFixture[str],
) -> None:
    args = ["bench-data", "--size", "64", "--images", "16", "--batches", "4", "--batch-size", "8"]
    assert main([*args, "--json"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert "images/s per core" in lines[0] and "workers" in lines[0]
    row = json.loads(lines[-1])
    assert row["images_per_s_per_core"] == pytest.approx(4 * 8 / row["seconds"])
    assert row["workers_needed"] == int(np.ceil(1000 / row["images_per_s_per_core"]))


@pytest.mark.slow
def test_loader_runs_in_worker_processes(prepared: Path) -> None:
    import keras

    store = PreparedData.open(prepared)
    ids = store.ids("train")
    data = SegmentationData(
        store, ids, batch_size=4, workers=2, use_multiprocessing=True, max_queue_size=4
    )
    inputs = keras.Input((32, 32, 1))
    model = keras.Model(inputs, keras.layers.Conv2D(1, 1, name="c")(inputs))
    out = model.predict(data, verbose=0)
    assert out.shape == (len(ids), 32, 32, 1)
    expected = np.stack([store.load_image(i) for i in ids]).astype(np.float32) / 255
    kernel, bias = model.get_layer("c").get_weights()
    np.testing.assert_allclose(out[..., 0], expected * kernel[0, 0, 0, 0] + bias[0], atol=1e-5)
