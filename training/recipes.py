"""Training recipes: TOML files in ``config/recipes/`` validated by pydantic."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

RECIPE_DIR = Path(__file__).resolve().parents[1] / "config" / "recipes"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SiimData(_Strict):
    """Data prepared from the challenge with ``python -m training prepare``."""

    kind: Literal["siim"] = "siim"
    prepared: Path = Field(description="Prepared-data folder (relative paths: to the cwd)")


class PhantomData(_Strict):
    """Synthetic phantoms from :mod:`training.phantoms`, made when the run starts."""

    kind: Literal["phantoms"] = "phantoms"
    count: int = Field(ge=8, description="Number of images (train + validation)")
    original_size: int = Field(ge=16, description="Size the phantoms are made at (scored at)")
    seed: int = 0


class ModelSpec(_Strict):
    """Network and input."""

    variant: Literal["attention_unet", "attention_resnet34"]
    input_size: int = Field(ge=16, le=2048)
    channels: Literal[1, 3] = 1
    base_filters: int = Field(default=16, ge=1, description="attention_unet only")
    depth: int = Field(default=5, ge=1, le=7, description="attention_unet only")
    dropout: float = Field(default=0.2, ge=0.0, lt=1.0, description="attention_unet only")
    encoder_weights: Path | None = Field(
        default=None, description="attention_resnet34 only: ImageNet ResNet34 weights file"
    )
    architecture: Literal["fixed", "paper"] = Field(
        default="fixed",
        description=(
            "fixed: the gates act on the skips as in Oktay et al.; paper: the seed's graphs as "
            "published (see pneumonode.nets), 3-channel 0-255 input"
        ),
    )
    mean: float = Field(default=0.0, description="Subtracted after input scaling, in the model")
    std: float = Field(default=1.0, gt=0.0, description="Divisor after mean, in the model")

    @property
    def input_scale(self) -> float:
        """Factor from the [0, 1] package input to what the network expects.

        255 for the ResNet34 encoder (ImageNet ``bn_data`` statistics are of 0-255 pixels) and
        for the seed's graphs (fed 0-255 images); 1 for the corrected Attention U-Net.
        """
        if self.variant == "attention_resnet34" or self.architecture == "paper":
            return 255.0
        return 1.0

    @model_validator(mode="after")
    def _consistent(self) -> ModelSpec:
        if self.architecture == "paper" and self.channels != 3:
            raise ValueError(
                "architecture 'paper' takes the seed's 3-channel 0-255 input, set channels = 3 "
                f"(got {self.channels})"
            )
        if self.variant == "attention_resnet34" and self.channels != 3:
            raise ValueError(
                "attention_resnet34 takes 3 channels (gray repeated), set channels = 3"
            )
        if self.variant == "attention_unet" and self.input_size % (2**self.depth):
            raise ValueError(
                f"input_size {self.input_size} must be divisible by 2**depth = {2**self.depth}"
            )
        if self.variant == "attention_resnet34" and self.input_size % 32:
            raise ValueError(
                f"attention_resnet34 needs input_size divisible by 32, got {self.input_size}"
            )
        return self


class Plateau(_Strict):
    """The conventional schedule: ReduceLROnPlateau on ``monitor``."""

    monitor: str = "val_loss"
    factor: float = Field(default=0.2, gt=0.0, lt=1.0)
    patience: int = Field(default=1, ge=0)
    min_delta: float = Field(default=1e-4, ge=0.0)
    cooldown: int = Field(default=2, ge=0)
    min_lr: float = Field(default=1e-7, ge=0.0)


class Snapshots(_Strict):
    """Cosine annealing with warm restarts and one snapshot per cycle."""

    cycles: int = Field(ge=1, description="M")
    lr0: float = Field(gt=0.0, description="Rate at the start of each cycle")


class Swa(_Strict):
    """Stochastic weight averaging."""

    start_epoch: int = Field(ge=0, description="0-based first averaged epoch")
    bn_batches: int | None = Field(
        default=None, ge=1, description="Batches of the BatchNorm pass (all when absent)"
    )


class Loss(_Strict):
    """Weights of the loss terms: binary cross-entropy, ``1 - soft Dice`` and focal loss."""

    bce: float = Field(default=1.0, ge=0.0)
    dice: float = Field(default=1.0, ge=0.0)
    focal: float = Field(default=0.0, ge=0.0)
    focal_gamma: float = Field(default=2.0, ge=0.0)

    @model_validator(mode="after")
    def _some_term(self) -> Loss:
        if self.bce + self.dice + self.focal <= 0.0:
            raise ValueError("loss: at least one of bce, dice, focal must be > 0")
        return self


class Oversampling(_Strict):
    """Share of images with pneumothorax in each epoch, linear from ``start`` to ``end``."""

    start: float = Field(gt=0.0, lt=1.0, description="Share of positives in the first epoch")
    end: float = Field(gt=0.0, lt=1.0, description="Share of positives in the last epoch")


class Upsize(_Strict):
    """A second stage: the first stage's weights trained further at a larger size."""

    input_size: int = Field(ge=16, le=2048)
    epochs: int = Field(ge=1)
    batch_size: int = Field(ge=1)
    lr: float = Field(gt=0.0, description="Rate at the start of the stage's cosine cycle")
    prepared: Path | None = Field(
        default=None, description="siim only: prepared-data folder at input_size"
    )


class CrossValidation(_Strict):
    """k-fold cross-validation over every prepared image, stratified by pneumothorax."""

    folds: int = Field(ge=2, le=10)
    seed: int = 42


class Train(_Strict):
    """Optimisation."""

    epochs: int = Field(ge=1)
    batch_size: int = Field(ge=1)
    lr: float = Field(
        default=1e-4, gt=0.0, description="Adam's rate (the plateau schedule's start)"
    )
    seed: int = 42
    augment: bool = True
    workers: int = Field(default=1, ge=1, description="Loader workers")
    processes: bool = Field(
        default=False, description="Loader workers are processes (threads when false)"
    )
    top_k: int | None = Field(
        default=None, ge=1, description="Also save the average of the k best epochs' weights"
    )
    checkpoint_every: int = Field(
        default=1, ge=1, description="Epochs between resume checkpoints (<run>/resume)"
    )
    jit_compile: bool | Literal["auto"] = Field(
        default="auto", description="XLA compilation (fast on GPUs; slow to compile on CPUs)"
    )


class Evaluation(_Strict):
    """Threshold search and test-time augmentation."""

    tta_hflip: bool = True
    top: list[float] = Field(default=[0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.9])
    bottom: list[float] = Field(default=[0.3, 0.4, 0.5])
    min_area: list[int] = Field(default=[0, 50, 100, 200, 400, 800, 1600])
    min_component_area: list[int] = Field(default=[0, 50, 150])

    @model_validator(mode="after")
    def _grids(self) -> Evaluation:
        for name in ("top", "bottom"):
            if not getattr(self, name) or any(not 0.0 < v < 1.0 for v in getattr(self, name)):
                raise ValueError(f"evaluation.{name} must be a non-empty list in (0, 1)")
        if not self.min_area or not self.min_component_area:
            raise ValueError("evaluation.min_area and min_component_area must not be empty")
        if min(self.bottom) > max(self.top):
            raise ValueError("no bottom threshold is <= a top threshold")
        return self


class Recipe(_Strict):
    """One reproducible training run."""

    name: str = Field(pattern=r"^[a-z0-9_]+$")
    description: str
    paper: str | None = Field(
        default=None, description="Row of the paper's table this recipe reproduces"
    )
    data: SiimData | PhantomData = Field(discriminator="kind")
    model: ModelSpec
    train: Train
    plateau: Plateau | None = None
    snapshots: Snapshots | None = None
    swa: Swa | None = None
    loss: Loss = Loss()
    oversampling: Oversampling | None = None
    upsize: Upsize | None = None
    cv: CrossValidation | None = None
    evaluation: Evaluation = Evaluation()

    @model_validator(mode="after")
    def _one_schedule(self) -> Recipe:
        if (self.plateau is None) == (self.snapshots is None):
            raise ValueError("a recipe has exactly one schedule: [plateau] or [snapshots]")
        if self.snapshots is not None and self.snapshots.cycles > self.train.epochs:
            raise ValueError(
                f"snapshots.cycles ({self.snapshots.cycles}) > train.epochs ({self.train.epochs})"
            )
        if self.swa is not None and self.swa.start_epoch >= self.train.epochs:
            raise ValueError(
                f"swa.start_epoch ({self.swa.start_epoch}) must be < train.epochs "
                f"({self.train.epochs})"
            )
        if self.upsize is not None:
            if self.upsize.input_size <= self.model.input_size:
                raise ValueError(
                    f"upsize.input_size ({self.upsize.input_size}) must exceed model.input_size "
                    f"({self.model.input_size})"
                )
            if isinstance(self.data, SiimData) and self.upsize.prepared is None:
                raise ValueError("upsize.prepared is required for siim data")
        return self


def load_recipe(name_or_path: str | Path) -> Recipe:
    """Load a recipe by name (``config/recipes/<name>.toml``) or by path.

    Parameters
    ----------
    name_or_path : str or pathlib.Path
        A recipe name such as ``"smoke"`` or a path to a TOML file.

    Returns
    -------
    Recipe
        The validated recipe.
    """
    path = Path(name_or_path)
    if path.suffix != ".toml":
        path = RECIPE_DIR / f"{name_or_path}.toml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in RECIPE_DIR.glob("*.toml")))
        raise FileNotFoundError(f"no recipe {name_or_path!r} ({path}); known: {known}")
    with path.open("rb") as handle:
        return Recipe.model_validate(tomllib.load(handle))


def recipe_names() -> list[str]:
    """Names of the recipes shipped in ``config/recipes/``."""
    return sorted(p.stem for p in RECIPE_DIR.glob("*.toml"))
