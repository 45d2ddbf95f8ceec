"""Loading model packages: members, and one clear error line for every broken package."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import keras
import pytest

from pneumonode.inference.card import CARD_FILE, ModelCard, ModelPackageError
from pneumonode.inference.package import load_package
from pneumonode.nets.attention_unet import build_attention_unet

PackageFactory = Callable[..., Path]
CardFactory = Callable[..., ModelCard]


def _one_line(error: pytest.ExceptionInfo[ModelPackageError]) -> str:
    message = str(error.value)
    assert "\n" not in message
    return message


def test_loads_every_member(make_tiny_package: PackageFactory) -> None:
    folder = make_tiny_package(3)
    package = load_package(folder)
    assert package.card.members == ["member0.keras", "member1.keras", "member2.keras"]
    assert [m.name for m in package.members] == ["tiny0", "tiny1", "tiny2"]
    assert package.path == folder


def test_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(ModelPackageError) as error:
        load_package(tmp_path / "nowhere")
    assert "folder not found" in _one_line(error)
    assert "nowhere" in str(error.value)


def test_missing_card(tmp_path: Path) -> None:
    with pytest.raises(ModelPackageError) as error:
        load_package(tmp_path)
    assert f"has no {CARD_FILE}" in _one_line(error)


def test_invalid_card_names_the_field(tmp_path: Path, card_factory: CardFactory) -> None:
    raw = json.loads(card_factory(["model.keras"]).model_dump_json())
    raw["uid"] = "1.2.03"
    raw["thresholds"] = {"top": 0.4, "bottom": 0.6}
    (tmp_path / CARD_FILE).write_text(json.dumps(raw), encoding="utf-8")
    with pytest.raises(ModelPackageError) as error:
        ModelCard.load(tmp_path)
    message = _one_line(error)
    assert "not a valid model card" in message
    assert "uid" in message
    assert "thresholds" in message


def test_card_that_is_not_json(tmp_path: Path) -> None:
    (tmp_path / CARD_FILE).write_text("{not json", encoding="utf-8")
    with pytest.raises(ModelPackageError) as error:
        ModelCard.load(tmp_path)
    assert "not readable JSON" in _one_line(error)


def test_missing_member(make_tiny_package: PackageFactory, tmp_path: Path) -> None:
    folder = tmp_path / "package"
    shutil.copytree(make_tiny_package(3), folder)
    (folder / "member1.keras").unlink()
    with pytest.raises(ModelPackageError) as error:
        load_package(folder)
    assert "lacks member member1.keras" in _one_line(error)


def test_corrupt_member(make_tiny_package: PackageFactory, tmp_path: Path) -> None:
    folder = tmp_path / "package"
    shutil.copytree(make_tiny_package(1), folder)
    (folder / "member0.keras").write_bytes(b"garbage")
    with pytest.raises(ModelPackageError) as error:
        load_package(folder)
    assert "cannot load model member" in _one_line(error)


def test_member_that_disagrees_with_the_card(tmp_path: Path, card_factory: CardFactory) -> None:
    model = build_attention_unet((32, 32, 1), base_filters=2, depth=2, name="small")
    model.save(tmp_path / "model.keras")
    card_factory(["model.keras"]).save(tmp_path)
    with pytest.raises(ModelPackageError) as error:
        load_package(tmp_path)
    assert "the card says (size, size, channels) = (64, 64, 1)" in _one_line(error)
    assert isinstance(keras.saving.load_model(tmp_path / "model.keras"), keras.Model)
