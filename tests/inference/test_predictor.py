"""Predictor: any source size in, masks on the source grid out; TTA, ensembles, thread safety."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import pytest

from pneumonode.inference.card import describe
from pneumonode.inference.package import load_package
from pneumonode.inference.postprocess import average_members, average_tta
from pneumonode.inference.predictor import CHECK_IMAGE_SHAPE, Predictor
from training.phantoms import make_phantom

PackageFactory = Callable[..., Path]


@pytest.fixture(scope="module")
def demo(demo_package: Path) -> Predictor:
    return Predictor.load(demo_package)


def _positive_phantoms(count: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [make_phantom(rng, 256, positive=True) for _ in range(count)]


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * float((a & b).sum()) / max(1, int(a.sum()) + int(b.sum()))


def test_demo_card_says_demo(demo: Predictor) -> None:
    assert demo.card.demo
    assert "DEMO" in demo.card.display_name
    assert "not for clinical use" in demo.card.intended_use.lower()


def test_mask_is_on_the_source_grid_with_area_from_spacing(demo: Predictor) -> None:
    image, truth = _positive_phantoms(1, seed=101)[0]
    # A non-square source: the phantom squeezed to 300 rows x 217 columns.
    source = cv2.resize(image, (217, 300), interpolation=cv2.INTER_LINEAR)
    truth_source = cv2.resize(
        truth.astype(np.uint8), (217, 300), interpolation=cv2.INTER_NEAREST
    ).astype(bool)
    with_spacing, without = demo.analyse([source, source], [(0.2, 0.15), None])
    assert with_spacing.mask.shape == (300, 217)
    assert with_spacing.present
    assert with_spacing.area_mm2 == pytest.approx(with_spacing.mask.sum() * 0.2 * 0.15)
    assert without.area_mm2 is None
    np.testing.assert_array_equal(without.mask, with_spacing.mask)
    assert _dice(with_spacing.mask, truth_source) > 0.5


def test_positive_phantoms_are_found(demo: Predictor) -> None:
    phantoms = _positive_phantoms(6, seed=202)
    findings = demo.analyse([p[0] for p in phantoms], [None] * len(phantoms))
    assert sum(f.present for f in findings) >= 5
    dices = [_dice(f.mask, p[1]) for f, p in zip(findings, phantoms, strict=True)]
    assert float(np.median(dices)) > 0.6
    assert all(0.0 <= f.score <= 1.0 for f in findings)


def test_black_image_and_negative_phantoms_are_negative(demo: Predictor) -> None:
    rng = np.random.default_rng(303)
    negatives = [make_phantom(rng, 256, positive=False)[0] for _ in range(4)]
    black = np.zeros((400, 333), dtype=np.float32)
    findings = demo.analyse([black, *negatives], [None] * 5)
    assert not findings[0].present
    assert findings[0].mask.shape == (400, 333)
    assert not any(f.present for f in findings[1:])


def test_three_member_ensemble_averages_members_with_tta(make_tiny_package: PackageFactory) -> None:
    folder = make_tiny_package(3)
    predictor = Predictor.load(folder)
    rng = np.random.default_rng(0)
    images = [rng.random((90, 70), dtype=np.float32), rng.random((64, 64), dtype=np.float32)]
    findings = predictor.analyse(images, [(0.5, 0.5), None])
    assert [f.mask.shape for f in findings] == [(90, 70), (64, 64)]

    batch = np.stack([predictor.prepare(image) for image in images])
    expected_members = []
    for member in load_package(folder).members:
        plain = np.asarray(member.predict_on_batch(batch))[..., 0]
        mirrored = np.asarray(member.predict_on_batch(batch[:, :, ::-1]))[..., 0]
        expected_members.append(average_tta(plain, mirrored))
    expected = average_members(expected_members)
    np.testing.assert_allclose(predictor.probabilities(batch), expected, atol=1e-6)
    # The members differ, so the ensemble is not just the first member.
    assert np.abs(expected_members[0] - expected_members[1]).max() > 1e-4
    assert findings[1].score == pytest.approx(float(expected[1].max()), abs=1e-6)


def test_prepare_resizes_normalises_and_repeats(make_tiny_package: PackageFactory) -> None:
    predictor = Predictor.load(make_tiny_package(1))
    prepared = predictor.prepare(np.full((500, 120), 0.75, dtype=np.float32))
    assert prepared.shape == (64, 64, 1)
    # card: mean 0.5, std 0.25
    np.testing.assert_allclose(prepared, 1.0, atol=1e-6)


def test_concurrent_calls_match_sequential_results(make_tiny_package: PackageFactory) -> None:
    predictor = Predictor.load(make_tiny_package(1))
    rng = np.random.default_rng(1)
    images = [rng.random((80, 60), dtype=np.float32) for _ in range(3)]
    reference = [f.score for f in predictor.analyse(images, [None] * 3)]
    results: list[list[float]] = []
    errors: list[BaseException] = []

    def work() -> None:
        try:
            results.append([f.score for f in predictor.analyse(images, [None] * 3)])
        except BaseException as exc:  # collected and re-raised by the test
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert len(results) == 4
    for scores in results:
        np.testing.assert_allclose(scores, reference, atol=1e-6)


def _with_one(value: float) -> np.ndarray:
    """A valid image but for one pixel."""
    image = np.full((10, 10), 0.5, dtype=np.float32)
    image[3, 7] = value
    return image


@pytest.mark.parametrize(
    ("image", "message"),
    [
        (np.zeros((10, 10), dtype=np.uint8), "2-D float32"),
        (np.zeros((10, 10, 3), dtype=np.float32), "2-D float32"),
        (np.full((10, 10), 1.5, dtype=np.float32), r"\[0, 1\]"),
        (np.full((10, 10), np.nan, dtype=np.float32), "non-finite"),
        (_with_one(np.nan), "non-finite"),
        (_with_one(np.inf), "non-finite"),
        (_with_one(-np.inf), "non-finite"),
    ],
)
def test_bad_images_are_refused(
    make_tiny_package: PackageFactory, image: np.ndarray, message: str
) -> None:
    predictor = Predictor.load(make_tiny_package(1))
    with pytest.raises(ValueError, match=message):
        predictor.analyse([image], [None])


def test_bad_spacing_and_lengths_are_refused(make_tiny_package: PackageFactory) -> None:
    predictor = Predictor.load(make_tiny_package(1))
    image = np.zeros((10, 10), dtype=np.float32)
    with pytest.raises(ValueError, match="pixel spacings"):
        predictor.analyse([image], [])
    with pytest.raises(ValueError, match="positive mm"):
        predictor.analyse([image], [(0.0, 0.1)])
    assert predictor.analyse([], []) == []


def test_check_and_describe(demo: Predictor) -> None:
    report = demo.check()
    assert report.source_shape == CHECK_IMAGE_SHAPE
    assert report.mask_shape == CHECK_IMAGE_SHAPE
    size = demo.card.input.size
    copies = 2 if demo.card.tta.hflip else 1
    assert report.output_shape == (copies, size, size, 1)
    assert report.seconds > 0
    assert "output shape" in str(report)
    text = describe(demo.card)
    assert "(DEMO)" in text
    assert demo.card.uid in text
    assert f"top {demo.card.thresholds.top:g}" in text
    assert len(text.splitlines()) >= 10
