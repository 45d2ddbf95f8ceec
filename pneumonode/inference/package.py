"""Load a model package folder: validate its card and load every member ``.keras`` file."""

from __future__ import annotations

import logging
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import keras

from pneumonode.inference.card import ModelCard, ModelPackageError
from pneumonode.nets.gates import AttentionGate

logger = logging.getLogger(__name__)


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
    card = ModelCard.load(path)
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
