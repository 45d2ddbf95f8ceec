"""Fixtures for inference tests: the bundled demo package and tiny packages made on the fly."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import keras
import pytest

from pneumonode.inference.card import TTA, InputSpec, ModelCard, TrainingInfo
from pneumonode.nets.attention_unet import build_attention_unet

REPO_ROOT = Path(__file__).resolve().parents[2]
DEMO_PACKAGE = REPO_ROOT / "pneumonode" / "models" / "demo"
TINY_SIZE = 64

PackageFactory = Callable[..., Path]


def tiny_card(members: list[str], hflip: bool = True, channels: int = 1) -> ModelCard:
    """A valid card for a tiny untrained test model."""
    return ModelCard(
        name="tiny-test",
        version="0",
        uid="2.25.1234",
        variant="attention_unet",
        demo=True,
        input=InputSpec(size=TINY_SIZE, channels=channels, mean=0.5, std=0.25),  # type: ignore[arg-type]
        tta=TTA(hflip=hflip),
        members=members,
        training=TrainingInfo(recipe="tests", data="none", epochs=0),
        intended_use="tests only",
    )


@pytest.fixture(scope="session")
def card_factory() -> Callable[..., ModelCard]:
    """Return :func:`tiny_card`, for tests that write their own packages."""
    return tiny_card


@pytest.fixture(scope="session")
def demo_package() -> Path:
    """The package committed under pneumonode/models/demo."""
    assert (DEMO_PACKAGE / "model_card.json").is_file(), f"demo package missing: {DEMO_PACKAGE}"
    return DEMO_PACKAGE


@pytest.fixture(scope="session")
def make_tiny_package(tmp_path_factory: pytest.TempPathFactory) -> PackageFactory:
    """Return ``make(members=1, hflip=True) -> Path``: a package of tiny members, seeds 0..k-1."""

    def make(members: int = 1, hflip: bool = True) -> Path:
        folder = tmp_path_factory.mktemp(f"tiny{members}")
        names = [f"member{index}.keras" for index in range(members)]
        for seed, name in enumerate(names):
            keras.utils.set_random_seed(seed)
            model = build_attention_unet(
                (TINY_SIZE, TINY_SIZE, 1), base_filters=2, depth=3, name=f"tiny{seed}"
            )
            model.save(folder / name)
        tiny_card(names, hflip=hflip).save(folder)
        return folder

    return make
