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
        # The seed's SWA models: init_lr = 1e-4.
        assert recipe.snapshots.lr0 == 1e-4 and recipe.train.lr == 1e-4
    for name in PAPER:
        assert load_recipe(name).model.architecture == "fixed"
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


def test_input_scale_is_what_each_encoder_expects() -> None:
    # ImageNet's bn_data statistics are of 0-255 pixels; the seed fed 0-255 images.
    assert load_recipe("attention_resnet34").model.input_scale == 255.0
    assert load_recipe("attention_resnet34_swa").model.input_scale == 255.0
    assert load_recipe("attention_unet").model.input_scale == 1.0
    paper = load_recipe("smoke_paper").model
    assert (paper.architecture, paper.channels, paper.input_scale) == ("paper", 3, 255.0)
    base = load_recipe("smoke").model_dump()
    gray_paper = {**base, "model": {**base["model"], "architecture": "paper"}}
    with pytest.raises(ValidationError, match="3-channel 0-255"):
        Recipe.model_validate(gray_paper)


def test_siim_winner_recipe_carries_the_winners_settings() -> None:
    recipe = load_recipe("siim_winner")
    assert recipe.cv is not None and recipe.cv.folds == 5
    assert recipe.model.input_size == 512
    assert recipe.upsize is not None and recipe.upsize.input_size == 1024
    assert recipe.upsize.prepared is not None
    assert (recipe.loss.bce, recipe.loss.dice, recipe.loss.focal) == (3.0, 1.0, 4.0)
    assert recipe.oversampling is not None
    assert (recipe.oversampling.start, recipe.oversampling.end) == (0.8, 0.4)
    assert recipe.train.top_k == 3
    smoke = load_recipe("siim_winner_smoke")
    assert smoke.data.kind == "phantoms" and smoke.cv is not None and smoke.cv.folds == 5
    assert smoke.upsize is not None and smoke.upsize.input_size > smoke.model.input_size
    assert (smoke.loss, smoke.oversampling, smoke.train.top_k) == (
        recipe.loss, recipe.oversampling, 3
    )
    base = recipe.model_dump()
    with pytest.raises(ValidationError, match=r"upsize\.input_size"):
        Recipe.model_validate({**base, "upsize": {**base["upsize"], "input_size": 256}})
    with pytest.raises(ValidationError, match=r"upsize\.prepared"):
        Recipe.model_validate({**base, "upsize": {**base["upsize"], "prepared": None}})
    with pytest.raises(ValidationError, match="at least one of"):
        Recipe.model_validate({**base, "loss": {"bce": 0, "dice": 0, "focal": 0}})
