"""The model card: a versioned, validated description of a model package (``model_card.json``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Final, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from pneumonode.identifiers import uid_problem

CARD_FILE = "model_card.json"
SCHEMA_VERSION: Final = 1


class ModelPackageError(ValueError):
    """A model package cannot be used; the message is one line naming the path and the rule."""


def _one_line(error: ValidationError) -> str:
    parts = []
    for item in error.errors():
        where = ".".join(str(part) for part in item["loc"]) or "card"
        parts.append(f"{where}: {item['msg']}")
    return "; ".join(parts)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class InputSpec(_Strict):
    """What the network takes: a square image of ``size`` pixels with ``channels`` channels."""

    size: int = Field(ge=16, le=4096, description="Height and width of the model input, pixels")
    channels: Literal[1, 3] = Field(
        default=1, description="1 = gray; 3 = gray repeated into RGB (as the paper did)"
    )
    mean: float = Field(default=0.0, description="Subtracted after scaling pixels to [0, 1]")
    std: float = Field(default=1.0, gt=0.0, description="Divisor after subtracting mean")


class Thresholds(_Strict):
    """The "triplet" post-processing of the SIIM winners.

    A pixel counts as confident when its probability exceeds ``top``. When fewer than
    ``min_area`` pixels (at model resolution) are confident, the image is empty. Otherwise the
    mask is probability > ``bottom``. Components smaller than ``min_component_area`` pixels (at
    model resolution) are removed when that is > 0.
    """

    top: float = Field(default=0.5, gt=0.0, lt=1.0)
    bottom: float = Field(default=0.5, gt=0.0, lt=1.0)
    min_area: int = Field(default=0, ge=0)
    min_component_area: int = Field(default=0, ge=0)

    @model_validator(mode="after")
    def _bottom_not_above_top(self) -> Thresholds:
        if self.bottom > self.top:
            raise ValueError(f"thresholds.bottom ({self.bottom}) must be <= top ({self.top})")
        return self


class TTA(_Strict):
    """Test-time augmentation."""

    hflip: bool = Field(default=False, description="Average with the horizontally flipped input")


class TrainingInfo(_Strict):
    """How the members were made."""

    recipe: str
    data: str
    epochs: int = Field(ge=0)
    notes: str = ""


class ModelCard(_Strict):
    """Everything the node needs to know about a model package; nothing is hard-coded elsewhere."""

    schema_version: Literal[1] = SCHEMA_VERSION
    name: str = Field(min_length=1, max_length=64)
    version: str = Field(min_length=1, max_length=64)
    uid: str = Field(description="DICOM UID identifying this exact package")
    variant: Literal["attention_unet", "attention_resnet34"]
    demo: bool = Field(description="True for a model that must never be mistaken for a real one")
    manufacturer: str = "pneumonode project"
    input: InputSpec
    thresholds: Thresholds = Thresholds()
    tta: TTA = TTA()
    members: list[str] = Field(
        default_factory=lambda: ["model.keras"],
        min_length=1,
        description="Keras files in the package; their probabilities are averaged",
    )
    training: TrainingInfo
    validation: dict[str, float] = Field(default_factory=dict)
    intended_use: str

    @field_validator("uid")
    @classmethod
    def _valid_uid(cls, value: str) -> str:
        problem = uid_problem(value)
        if problem is not None:
            raise ValueError(f"uid {problem}")
        return value

    @field_validator("members")
    @classmethod
    def _plain_file_names(cls, value: list[str]) -> list[str]:
        for name in value:
            if "/" in name or "\\" in name or name.startswith(".") or not name.endswith(".keras"):
                raise ValueError(f"members must be plain .keras file names, got {name!r}")
        if len(set(value)) != len(value):
            raise ValueError("members must not repeat")
        return value

    @property
    def display_name(self) -> str:
        """Name shown in outputs; DEMO models say so."""
        return f"{self.name} {self.version}" + (" (DEMO)" if self.demo else "")

    @classmethod
    def load(cls, package: Path) -> ModelCard:
        """Read and validate ``model_card.json`` from a package folder; it needs no Keras.

        Raises
        ------
        ModelPackageError
            If the folder or its card is missing, or the card is not valid JSON or breaks a
            rule.
        """
        package = Path(package)
        if not package.is_dir():
            raise ModelPackageError(f"model package folder not found: {package}")
        path = package / CARD_FILE
        if not path.is_file():
            raise ModelPackageError(f"model package {package} has no {CARD_FILE}")
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ModelPackageError(f"{path} is not readable JSON: {exc}") from exc
        try:
            return cls.model_validate(raw)
        except ValidationError as exc:
            raise ModelPackageError(f"{path} is not a valid model card: {_one_line(exc)}") from exc

    def save(self, package: Path) -> Path:
        """Write the card into a package folder; returns the file written."""
        path = package / CARD_FILE
        path.write_text(self.model_dump_json(indent=2) + "\n", encoding="utf-8")
        return path


def describe(card: ModelCard) -> str:
    """Human-readable, multi-line description of a model card (``pneumonode model info``).

    It needs no Keras: printing a card never loads TensorFlow.

    Parameters
    ----------
    card:
        A validated model card.

    Returns
    -------
    str
    """
    t = card.thresholds
    lines = [
        f"name:           {card.display_name}",
        f"uid:            {card.uid}",
        f"variant:        {card.variant}",
        f"manufacturer:   {card.manufacturer}",
        f"demo:           {'yes: not a real model' if card.demo else 'no'}",
        f"input:          {card.input.size}x{card.input.size}x{card.input.channels}, "
        f"(x - {card.input.mean:g}) / {card.input.std:g}",
        f"thresholds:     top {t.top:g}, bottom {t.bottom:g}, min area {t.min_area} px, "
        f"min component {t.min_component_area} px (model resolution)",
        f"tta:            {'horizontal flip' if card.tta.hflip else 'none'}",
        f"members:        {len(card.members)} ({', '.join(card.members)})",
        f"training:       {card.training.recipe}, {card.training.epochs} epochs",
        f"data:           {card.training.data}",
    ]
    if card.training.notes:
        lines.append(f"notes:          {card.training.notes}")
    if card.validation:
        scores = ", ".join(f"{key} {value:.4f}" for key, value in sorted(card.validation.items()))
        lines.append(f"validation:     {scores}")
    lines.append(f"intended use:   {card.intended_use}")
    return "\n".join(lines)
