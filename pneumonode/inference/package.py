"""Load a model package folder: validate its card and load every member ``.keras`` file."""

from __future__ import annotations

import json
import logging
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import keras
from pydantic import ValidationError

from pneumonode.inference.card import CARD_FILE, ModelCard
from pneumonode.nets.gates import AttentionGate

logger = logging.getLogger(__name__)


class ModelPackageError(Exception):
    """A model package cannot be used; the message is one line naming the path and the rule."""


@dataclass(frozen=True)
class ModelPackage:
    """A loaded, checked model package.

    Attributes
    ----------
    path:
        The package folder.
    card:
        Its validated model card.
    members:
        One Keras model per ``card.members`` entry, in the same order.
    """

    path: Path
    card: ModelCard
    members: tuple[keras.Model, ...]


def _one_line(error: ValidationError) -> str:
    parts = []
    for item in error.errors():
        where = ".".join(str(part) for part in item["loc"]) or "card"
        parts.append(f"{where}: {item['msg']}")
    return "; ".join(parts)


def read_card(path: Path) -> ModelCard:
    """Read and validate the card of a package folder.

    Parameters
    ----------
    path:
        The package folder.

    Returns
    -------
    ModelCard

    Raises
    ------
    ModelPackageError
        If the folder or its card is missing, or the card is not valid JSON or breaks a rule.
    """
    path = Path(path)
    if not path.is_dir():
        raise ModelPackageError(f"model package folder not found: {path}")
    card_path = path / CARD_FILE
    if not card_path.is_file():
        raise ModelPackageError(f"model package {path} has no {CARD_FILE}")
    try:
        raw = json.loads(card_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelPackageError(f"{card_path} is not readable JSON: {exc}") from exc
    try:
        return ModelCard.model_validate(raw)
    except ValidationError as exc:
        raise ModelPackageError(f"{card_path} is not a valid model card: {_one_line(exc)}") from exc


def _check_member(model: keras.Model, card: ModelCard, member: Path) -> None:
    expected = (card.input.size, card.input.size, card.input.channels)
    inputs: Any = model.inputs
    if len(inputs) != 1:
        raise ModelPackageError(f"{member} must have one input, has {len(inputs)}")
    shape = tuple(inputs[0].shape[1:])
    if len(shape) != 3 or any(
        got is not None and got != want for got, want in zip(shape, expected, strict=True)
    ):
        raise ModelPackageError(
            f"{member} takes input {shape}, the card says (size, size, channels) = {expected}"
        )
    outputs: Any = model.outputs
    if len(outputs) != 1 or tuple(outputs[0].shape[1:])[-1:] != (1,):
        raise ModelPackageError(
            f"{member} must have one output with 1 channel, has "
            f"{[tuple(o.shape) for o in outputs]}"
        )


def load_package(path: Path) -> ModelPackage:
    """Load a model package folder.

    Parameters
    ----------
    path:
        Folder holding ``model_card.json`` and the member ``.keras`` files it lists.

    Returns
    -------
    ModelPackage

    Raises
    ------
    ModelPackageError
        If the folder, card or a member is missing, the card is invalid, a member does not
        load, or a member's input/output does not match the card.
    """
    path = Path(path)
    card = read_card(path)
    models = []
    for name in card.members:
        member = path / name
        if not member.is_file():
            raise ModelPackageError(f"model package {path} lacks member {name} listed in its card")
        try:
            model = keras.saving.load_model(
                member, custom_objects={"pneumonode>AttentionGate": AttentionGate}, compile=False
            )
        except (ValueError, TypeError, KeyError, OSError, zipfile.BadZipFile) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ModelPackageError(f"cannot load model member {member}: {first}") from exc
        _check_member(model, card, member)
        models.append(model)
    logger.info(
        "loaded model package %s (%s, uid %s, %d member(s))",
        path, card.display_name, card.uid, len(models),
    )
    return ModelPackage(path=path, card=card, members=tuple(models))
