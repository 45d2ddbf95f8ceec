"""Cross-validation runs (the SIIM winners' recipe): folds, two stages, out-of-fold scoring."""

from __future__ import annotations

import csv
import logging
import shutil
import time
from collections.abc import Sequence
from pathlib import Path

import keras
import numpy as np
from numpy.typing import NDArray

from pneumonode.inference.preprocess import unit_from_uint8
from training.recipes import PhantomData, Recipe, SiimData, Snapshots
from training.run import RunInfo, save_recipe
from training.store import PreparedData
from training.train import final_member, open_data, train

logger = logging.getLogger(__name__)

FOLDS_FILE = "folds.csv"


def fold_of(
    image_ids: Sequence[str], positive: Sequence[bool], folds: int, seed: int
) -> dict[str, int]:
    """Assign each image to one of ``folds`` folds (0-based), stratified by pneumothorax.

    Within each class the ids are sorted, shuffled with ``seed`` and dealt round-robin, so
    the folds differ in size by at most one per class and do not depend on input order.
    """
    if folds < 2:
        raise ValueError(f"cross-validation needs folds >= 2, got {folds}")
    if len(image_ids) != len(positive):
        raise ValueError(f"{len(image_ids)} ids but {len(positive)} labels")
    rng = np.random.default_rng(seed)
    out: dict[str, int] = {}
    for label in (False, True):
        members = sorted(i for i, p in zip(image_ids, positive, strict=True) if p is label)
        for rank, index in enumerate(rng.permutation(len(members))):
            out[members[index]] = rank % folds
    return out


def stage_recipes(recipe: Recipe) -> list[Recipe]:
    """The recipe of each stage: as written, then (``upsize``) the larger size, one cosine cycle.

    Stage 2 keeps the loss, oversampling and top-k averaging; it has no SWA.
    """
    first = recipe.model_copy(update={"cv": None, "upsize": None})
    if recipe.upsize is None:
        return [first]
    up = recipe.upsize
    data: SiimData | PhantomData = recipe.data
    if isinstance(recipe.data, SiimData) and up.prepared is not None:
        data = SiimData(prepared=up.prepared)
    second = first.model_copy(
        update={
            "model": recipe.model.model_copy(update={"input_size": up.input_size}),
            "train": recipe.train.model_copy(
                update={"epochs": up.epochs, "batch_size": up.batch_size, "lr": up.lr}
            ),
            "plateau": None,
            "snapshots": Snapshots(cycles=1, lr0=up.lr),
            "swa": None,
            "data": data,
        }
    )
    return [first, second]


def read_folds(run_dir: Path) -> dict[str, int]:
    """``folds.csv`` of a cross-validation run: image id -> 0-based fold."""
    with (run_dir / FOLDS_FILE).open(newline="", encoding="utf-8") as handle:
        return {row["image_id"]: int(row["fold"]) for row in csv.DictReader(handle)}


def train_cv(
    recipe: Recipe,
    run_dir: Path,
    *,
    data: Path | None = None,
    encoder_weights: Path | str | None = None,
    distributed: bool = False,
    verbose: int = 2,
    mixed_precision: str | None = None,
) -> RunInfo:
    """Train every fold of a cross-validation recipe; the members are the folds' final models.

    For fold ``k`` the images of fold ``k`` are its validation and the others its training
    data. Stage 1 trains at ``model.input_size`` into ``fold<k>/stage1``; with ``upsize``,
    stage 2 starts from stage 1's final model (its top-k average when the recipe sets
    ``train.top_k``) and trains at the larger size into ``fold<k>/stage2``. The last stage's
    final model is copied to ``fold<k>.keras``. Evaluation then scores each fold model on its
    own held-out images (out-of-fold) and tunes one set of thresholds on all of them.

    Parameters
    ----------
    recipe : Recipe
        A recipe with ``[cv]``.
    run_dir : pathlib.Path
        New folder.
    data : pathlib.Path or None
        Stage-1 prepared data overriding the recipe's.
    encoder_weights, distributed, verbose, mixed_precision
        As for :func:`training.train.train`.

    Returns
    -------
    RunInfo
        Also saved as ``run.json``; ``folds`` is set and ``data_path`` is the last stage's data.
    """
    if recipe.cv is None:
        raise ValueError(f"recipe {recipe.name} has no [cv] section")
    run_dir.mkdir(parents=True, exist_ok=True)
    if any(run_dir.glob("*.keras")):
        raise FileExistsError(f"run folder {run_dir} already holds models; use a new folder")
    save_recipe(recipe, run_dir)
    stages = stage_recipes(recipe)
    stores = [open_data(recipe, run_dir, data)]
    if recipe.upsize is not None:
        if recipe.upsize.prepared is not None:
            stores.append(PreparedData.open(recipe.upsize.prepared))
        else:
            stores.append(open_data(recipe, run_dir, None, size=recipe.upsize.input_size))
    ids = [e.image_id for e in stores[0].entries]
    for store in stores[1:]:
        if sorted(e.image_id for e in store.entries) != sorted(ids):
            raise ValueError(f"prepared data {store.root} does not hold the same images as stage 1")
    folds = fold_of(ids, [e.positive for e in stores[0].entries], recipe.cv.folds, recipe.cv.seed)
    with (run_dir / FOLDS_FILE).open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(["image_id", "fold"])
        writer.writerows(sorted(folds.items()))
    start = time.monotonic()
    members: list[str] = []
    infos: list[list[RunInfo]] = []
    for k in range(recipe.cv.folds):
        split = ([i for i in ids if folds[i] != k], [i for i in ids if folds[i] == k])
        previous: Path | None = None
        fold_infos = []
        for number, (stage, store) in enumerate(zip(stages, stores, strict=True), start=1):
            stage_dir = run_dir / f"fold{k + 1}" / f"stage{number}"
            logger.info("fold %d/%d, stage %d", k + 1, recipe.cv.folds, number)
            info = train(
                stage,
                stage_dir,
                data=store.root,
                encoder_weights=encoder_weights if previous is None else None,
                distributed=distributed,
                verbose=verbose,
                mixed_precision=mixed_precision,
                init_from=previous,
                split=split,
            )
            fold_infos.append(info)
            previous = stage_dir
        assert previous is not None
        member = f"fold{k + 1}.keras"
        shutil.copyfile(previous / final_member(fold_infos[-1]), run_dir / member)
        members.append(member)
        infos.append(fold_infos)

    def mean(values: list[float | None]) -> float | None:
        present = [v for v in values if v is not None]
        return float(np.mean(present)) if present else None

    first_stage = infos[0][0]
    info = RunInfo(
        recipe=recipe.name,
        variant=recipe.model.variant,
        data_source=stores[-1].source,
        data_path=str(stores[-1].root),
        epochs=sum(stage.train.epochs for stage in stages),
        members=members,
        untrained_val_dice=float(np.mean([f[0].untrained_val_dice for f in infos])),
        final_val_dice=float(np.mean([f[-1].final_val_dice for f in infos])),
        seconds=time.monotonic() - start,
        backend=keras.backend.backend(),
        replicas=first_stage.replicas,
        architecture=recipe.model.architecture,
        encoder_weights=first_stage.encoder_weights,
        input_transform=first_stage.input_transform,
        mixed_precision=first_stage.mixed_precision,
        last_val_dice=mean([f[-1].last_val_dice for f in infos]),
        best_val_dice=mean([f[-1].best_val_dice for f in infos]),
        folds=recipe.cv.folds,
    )
    info.save(run_dir)
    return info


def out_of_fold(
    run_dir: Path, store: PreparedData, *, batch_size: int = 8
) -> tuple[list[str], NDArray[np.float32]]:
    """Each fold's model on the images it did not train on, through the node's predictor.

    Returns
    -------
    tuple
        Image ids (every image of ``folds.csv``, fold by fold) and their probabilities
        ``(N, size, size)`` (TTA as the recipe says).
    """
    from training.evaluate import _predictor

    folds = read_folds(run_dir)
    info = RunInfo.load(run_dir)
    ids: list[str] = []
    chunks: list[NDArray[np.float32]] = []
    for k, member in enumerate(info.members):
        predictor = _predictor(run_dir, [member])
        held_out = sorted(i for i, f in folds.items() if f == k)
        for first in range(0, len(held_out), batch_size):
            chunk = held_out[first : first + batch_size]
            batch = np.stack(
                [predictor.prepare(unit_from_uint8(store.load_image(i))) for i in chunk]
            )
            chunks.append(predictor.probabilities(batch))
        ids += held_out
    return ids, np.concatenate(chunks)
