"""Fixtures for the result-object tests: model cards, findings from masks, dciodvfy checks."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from pneumonode.dicom.pixels import DecodedImage
from pneumonode.findings import Finding
from pneumonode.inference.card import InputSpec, ModelCard, TrainingInfo


def make_card(*, demo: bool) -> ModelCard:
    """A valid model card for the tests."""
    return ModelCard(
        name="attention-unet-test",
        version="1.2.3",
        uid="1.2.826.0.1.3680043.8.498.1.2.3",
        variant="attention_unet",
        demo=demo,
        input=InputSpec(size=256),
        training=TrainingInfo(recipe="test", data="synthetic", epochs=1),
        intended_use="tests only",
    )


@pytest.fixture
def demo_card() -> ModelCard:
    """A model card marked DEMO."""
    return make_card(demo=True)


@pytest.fixture
def real_card() -> ModelCard:
    """A model card not marked DEMO."""
    return make_card(demo=False)


def _finding_from_mask(mask: np.ndarray, image: DecodedImage, score: float = 0.93) -> Finding:
    mask = mask.astype(bool)
    spacing = image.pixel_spacing_mm
    area = None if spacing is None else float(mask.sum() * spacing[0] * spacing[1])
    present = bool(mask.any())
    return Finding(mask=mask, present=present, score=score if present else 0.07, area_mm2=area)


@pytest.fixture
def make_finding() -> Callable[..., Finding]:
    """Return ``f(mask, image, score=0.93)``: the finding a model would report for ``mask``."""
    return _finding_from_mask


@pytest.fixture
def assert_dciodvfy_clean(dciodvfy: Path) -> Callable[[Path], str]:
    """Return a check that runs dciodvfy on a file and fails on any line containing "Error"."""

    def check(path: Path) -> str:
        out = subprocess.run(
            [str(dciodvfy), str(path)], capture_output=True, text=True, errors="replace",
            timeout=120, check=False,
        )
        text = out.stdout + out.stderr
        errors = [line for line in text.splitlines() if "Error" in line]
        assert not errors, f"dciodvfy on {path.name}:\n{text}"
        return text

    return check
