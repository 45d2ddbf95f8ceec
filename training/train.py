"""One training run from a recipe: data, model, schedule callbacks, fit, run folder."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import keras

from training.augment import Augmenter
from training.callbacks import (
    VAL_DICE,
    EpochLog,
    SnapshotEnsemble,
    StochasticWeightAveraging,
    ValidationDice,
)
from training.data import SegmentationData
from training.distribute import data_parallel
from training.losses import bce_dice_loss, hard_dice
from training.plots import plot_run
from training.prepare import prepare_synthetic
from training.recipes import ModelSpec, PhantomData, Recipe
from training.run import DATA_DIR, HISTORY_FILE, RunInfo, save_recipe
from training.store import MANIFEST, PreparedData

logger = logging.getLogger(__name__)

BEST = "best.keras"
SWA = "swa.keras"


def build_model(spec: ModelSpec, encoder_weights: Path | None = None) -> keras.Model:
    """Build the recipe's network (uncompiled).

    Parameters
    ----------
    spec : ModelSpec
        The recipe's model section.
    encoder_weights : pathlib.Path or None
        Overrides ``spec.encoder_weights`` (ResNet34 only).

    Returns
    -------
    keras.Model
        Input ``(size, size, channels)``, output ``(size, size, 1)`` probabilities.
    """
    shape = (spec.input_size, spec.input_size, spec.channels)
    if spec.variant == "attention_unet":
        from pneumonode.nets.attention_unet import build_attention_unet

        return build_attention_unet(
            input_shape=shape,
            base_filters=spec.base_filters,
            depth=spec.depth,
            dropout=spec.dropout,
        )
    from pneumonode.nets.resnet34 import build_attention_resnet34_unet

    return build_attention_resnet34_unet(
        input_shape=shape, encoder_weights=encoder_weights or spec.encoder_weights
    )


def compile_model(model: keras.Model, lr: float, jit_compile: bool | str = "auto") -> None:
    """Adam, BCE + soft Dice, and the batch Dice as a progress metric."""
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate=lr),
        loss=bce_dice_loss,
        metrics=[hard_dice],
        jit_compile=jit_compile,
    )


def open_data(recipe: Recipe, run_dir: Path, data: Path | None = None) -> PreparedData:
    """The run's prepared data: ``data`` if given, else the recipe's folder or new phantoms.

    Phantoms are written into ``<run_dir>/data`` the first time.
    """
    if data is not None:
        return PreparedData.open(data)
    if isinstance(recipe.data, PhantomData):
        folder = run_dir / DATA_DIR
        if not (folder / MANIFEST).is_file():
            from training.phantoms import make_phantom

            prepare_synthetic(
                folder,
                make_phantom,
                count=recipe.data.count,
                original_size=recipe.data.original_size,
                size=recipe.model.input_size,
                seed=recipe.data.seed,
            )
        return PreparedData.open(folder)
    return PreparedData.open(recipe.data.prepared)


def datasets(
    recipe: Recipe, store: PreparedData
) -> tuple[SegmentationData, SegmentationData, SegmentationData]:
    """Training (augmented, shuffled), validation and plain training batches (for BatchNorm)."""
    if store.size != recipe.model.input_size:
        raise ValueError(
            f"prepared data {store.root} is {store.size} px, the recipe trains at "
            f"{recipe.model.input_size} px"
        )

    def make(split: str, augmenter: Augmenter | None, shuffle: bool) -> SegmentationData:
        return SegmentationData(
            store,
            store.ids(split),
            batch_size=recipe.train.batch_size,
            channels=recipe.model.channels,
            mean=recipe.model.mean,
            std=recipe.model.std,
            augmenter=augmenter,
            shuffle=shuffle,
            seed=recipe.train.seed,
            workers=recipe.train.workers,
        )

    augmenter = Augmenter() if recipe.train.augment else None
    return make("train", augmenter, True), make("val", None, False), make("train", None, False)


def train(
    recipe: Recipe,
    run_dir: Path,
    *,
    data: Path | None = None,
    encoder_weights: Path | None = None,
    distributed: bool = False,
    verbose: int = 2,
) -> RunInfo:
    """Train a recipe into ``run_dir`` and return what the run produced.

    The folder receives ``recipe.json``, ``history.csv`` (one row per epoch), the members
    (``best.keras`` for the plateau schedule; ``snapshot_<k>.keras`` and ``swa.keras`` for
    snapshot/SWA recipes), ``run.json`` and the plots ``curves.png`` and ``lr_schedule.png``.

    Parameters
    ----------
    recipe : Recipe
        What to train.
    run_dir : pathlib.Path
        New or empty folder.
    data : pathlib.Path or None
        Prepared-data folder overriding the recipe's.
    encoder_weights : pathlib.Path or None
        Local ResNet34 ImageNet weights overriding the recipe's.
    distributed : bool
        Data-parallel on every local device (see :mod:`training.distribute`).
    verbose : int
        Keras ``fit`` verbosity.

    Returns
    -------
    RunInfo
        Also saved as ``run.json``.
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    if any(run_dir.glob("*.keras")):
        raise FileExistsError(f"run folder {run_dir} already holds models; use a new folder")
    save_recipe(recipe, run_dir)
    keras.utils.set_random_seed(recipe.train.seed)
    store = open_data(recipe, run_dir, data)
    train_data, val_data, plain_data = datasets(recipe, store)
    epochs = recipe.train.epochs
    start = time.monotonic()
    with data_parallel(distributed) as replicas:
        model = build_model(recipe.model, encoder_weights)
        compile_model(model, recipe.train.lr, recipe.train.jit_compile)
        validation = ValidationDice(val_data)
        untrained = validation.score(model)[1]
        logger.info("untrained validation challenge Dice: %.4f", untrained)
        callbacks: list[keras.callbacks.Callback] = [validation]
        members: list[str] = []
        snapshots: list[int] = []
        if recipe.plateau is not None:
            p = recipe.plateau
            callbacks.append(
                keras.callbacks.ReduceLROnPlateau(
                    monitor=p.monitor,
                    factor=p.factor,
                    patience=p.patience,
                    min_delta=p.min_delta,
                    cooldown=p.cooldown,
                    min_lr=p.min_lr,
                    mode="max" if p.monitor == VAL_DICE else "min",
                )
            )
            callbacks.append(
                keras.callbacks.ModelCheckpoint(
                    run_dir / BEST, monitor=VAL_DICE, mode="max", save_best_only=True
                )
            )
            members.append(BEST)
        if recipe.snapshots is not None:
            s = recipe.snapshots
            ensemble = SnapshotEnsemble(run_dir, s.lr0, epochs, s.cycles)
            callbacks.append(ensemble)
            snapshots = ensemble.epochs
            members += [f"snapshot_{k + 1}.keras" for k in range(s.cycles)]
        swa: StochasticWeightAveraging | None = None
        if recipe.swa is not None:
            swa = StochasticWeightAveraging(
                recipe.swa.start_epoch, run_dir / SWA, plain_data, recipe.swa.bn_batches
            )
            callbacks.append(swa)
            members.append(SWA)
        log = EpochLog(run_dir / HISTORY_FILE)
        callbacks.append(log)
        model.fit(train_data, epochs=epochs, callbacks=callbacks, verbose=verbose)
        final = validation.score(model)[1]
    info = RunInfo(
        recipe=recipe.name,
        variant=recipe.model.variant,
        data_source=store.source,
        data_path=str(store.root),
        epochs=epochs,
        members=members,
        snapshot_epochs=snapshots,
        swa_start_epoch=None if recipe.swa is None else recipe.swa.start_epoch,
        swa_bn_batches=0 if swa is None else swa.bn_batches_used,
        untrained_val_dice=untrained,
        final_val_dice=final,
        seconds=time.monotonic() - start,
        backend=keras.backend.backend(),
        replicas=replicas,
    )
    info.save(run_dir)
    plot_run(run_dir, recipe.name, info.snapshot_epochs, info.swa_start_epoch)
    return info
