"""The run folder: its layout and ``run.json``, what training leaves for evaluate and export."""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from pneumonode.inference.card import Thresholds
from training.recipes import Recipe

RUN_FILE = "run.json"
RECIPE_FILE = "recipe.json"
HISTORY_FILE = "history.csv"
EVALUATION_FILE = "evaluation.json"
PACKAGE_DIR = "package"
DATA_DIR = "data"
CURVES_PNG = "curves.png"
LR_PNG = "lr_schedule.png"


class RunInfo(BaseModel):
    """What a finished training run produced (``run.json``)."""

    model_config = ConfigDict(extra="forbid")

    recipe: str
    variant: str
    data_source: str
    data_path: str
    epochs: int = Field(ge=0, description="Epochs completed")
    members: list[str] = Field(min_length=1, description="Model files of the run's ensemble")
    snapshot_epochs: list[int] = Field(default_factory=list, description="0-based")
    swa_start_epoch: int | None = None
    swa_bn_batches: int = 0
    untrained_val_dice: float
    final_val_dice: float
    seconds: float
    backend: str
    replicas: int = 1
    architecture: str = Field(default="fixed", description="fixed or paper (the seed's graphs)")
    encoder_weights: str | None = Field(
        default=None,
        description="ResNet34 encoder start: the weights file, or 'none' (random, by request)",
    )
    input_transform: str = Field(
        default="", description="What the model does to its [0, 1] gray input (in the graph)"
    )
    mixed_precision: str = "float32"
    init_from: str | None = Field(default=None, description="Model file the weights came from")
    resumed_at_epochs: list[int] = Field(
        default_factory=list, description="0-based epochs at which the run was resumed"
    )
    last_val_dice: float | None = Field(
        default=None, description="Validation challenge Dice (0.5) of the last epoch's weights"
    )
    best_val_dice: float | None = Field(
        default=None, description="Best per-epoch validation challenge Dice (0.5)"
    )
    best_epoch: int | None = Field(default=None, description="0-based epoch of best_val_dice")
    top_k_epochs: list[int] = Field(
        default_factory=list, description="0-based epochs averaged into top_k.keras"
    )
    folds: int | None = Field(default=None, description="Cross-validation folds (members)")

    def save(self, run_dir: Path) -> Path:
        """Write ``run.json``."""
        path = run_dir / RUN_FILE
        path.write_text(self.model_dump_json(indent=2) + "\n", encoding="utf-8")
        return path

    @classmethod
    def load(cls, run_dir: Path) -> RunInfo:
        """Read ``run.json`` of a finished run."""
        path = run_dir / RUN_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{run_dir} is not a finished run: {RUN_FILE} is missing")
        return cls.model_validate_json(path.read_text(encoding="utf-8"))


def save_recipe(recipe: Recipe, run_dir: Path) -> Path:
    """Keep the exact recipe a run used (``recipe.json``)."""
    path = run_dir / RECIPE_FILE
    path.write_text(recipe.model_dump_json(indent=2) + "\n", encoding="utf-8")
    return path


def load_run_recipe(run_dir: Path) -> Recipe:
    """The recipe a run used."""
    path = run_dir / RECIPE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir} has no {RECIPE_FILE}")
    return Recipe.model_validate(json.loads(path.read_text(encoding="utf-8")))


class EvaluationRecord(BaseModel):
    """Result of ``evaluate`` on a run (``evaluation.json``)."""

    model_config = ConfigDict(extra="forbid")

    thresholds: Thresholds
    scores: dict[str, float] = Field(
        description="challenge_dice (tuned thresholds) and challenge_dice_default (0.5)"
    )
    images: int = Field(ge=1)
    positives: int = Field(ge=0)
    members: list[str]
    tta_hflip: bool
    seconds: float
    choice: str = Field(
        default="all", description="Candidate ensemble kept: swa, snapshots, all, best, folds"
    )
    candidates: dict[str, dict[str, float]] = Field(
        default_factory=dict,
        description="Per candidate ensemble: challenge_dice (tuned) and challenge_dice_default",
    )
    out_of_fold: bool = Field(
        default=False, description="Scored on out-of-fold predictions (cross-validation)"
    )

    def save(self, run_dir: Path) -> Path:
        """Write ``evaluation.json``."""
        path = run_dir / EVALUATION_FILE
        path.write_text(self.model_dump_json(indent=2) + "\n", encoding="utf-8")
        return path

    @classmethod
    def load(cls, run_dir: Path) -> EvaluationRecord | None:
        """Read ``evaluation.json``; None when the run was not evaluated."""
        path = run_dir / EVALUATION_FILE
        if not path.is_file():
            return None
        return cls.model_validate_json(path.read_text(encoding="utf-8"))
