"""The shipped recipes validate and carry the paper's settings."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from training.recipes import Recipe, load_recipe, recipe_names

PAPER = ("attention_unet", "attention_unet_swa", "attention_resnet34", "attention_resnet34_swa")


def test_every_recipe_loads_and_the_paper_ones_match_the_paper() -> None:
    assert set(recipe_names()) >= {*PAPER, "smoke"}
    for name in PAPER:
        recipe = load_recipe(name)
        assert recipe.name == name
        assert recipe.model.input_size == 256
        assert recipe.train.batch_size == 16
        assert recipe.train.epochs == 132
        assert recipe.paper
    for name in ("attention_unet", "attention_resnet34"):
        plateau = load_recipe(name).plateau
        assert plateau is not None and load_recipe(name).train.lr == 1e-4
        assert (plateau.factor, plateau.patience, plateau.min_delta) == (0.2, 1, 1e-4)
        assert (plateau.cooldown, plateau.min_lr) == (2, 1e-7)
    for name in ("attention_unet_swa", "attention_resnet34_swa"):
        recipe = load_recipe(name)
        assert recipe.snapshots is not None and recipe.snapshots.cycles == 4
        assert recipe.swa is not None and recipe.swa.start_epoch == 117
    assert load_recipe("attention_resnet34").model.channels == 3
    assert load_recipe("smoke").data.kind == "phantoms"


def test_inconsistent_recipes_are_refused(tmp_path: Path) -> None:
    base = load_recipe("attention_unet_swa").model_dump()
    both = {**base, "plateau": {}}
    with pytest.raises(ValidationError, match="exactly one schedule"):
        Recipe.model_validate(both)
    late = {**base, "swa": {"start_epoch": 132}}
    with pytest.raises(ValidationError, match="start_epoch"):
        Recipe.model_validate(late)
    gray_resnet = {**base, "model": {"variant": "attention_resnet34", "input_size": 256}}
    with pytest.raises(ValidationError, match="3 channels"):
        Recipe.model_validate(gray_resnet)
    with pytest.raises(ValidationError):
        Recipe.model_validate({**base, "surprise": 1})
    with pytest.raises(FileNotFoundError, match="known"):
        load_recipe("no_such_recipe")
