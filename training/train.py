"""One training run from a recipe: data, model, schedule callbacks, fit, run folder."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import keras

from pneumonode.nets.gates import AttentionGate
from training.augment import Augmenter
from training.callbacks import (
    VAL_DICE,
    EpochLog,
    ResumeCheckpoint,
    SnapshotEnsemble,
    StochasticWeightAveraging,
    TopKAverage,
    ValidationDice,
    swa_restore,
    swa_state,
)
from training.data import SegmentationData
from training.distribute import data_parallel
from training.losses import WeightedLoss, hard_dice
from training.plots import plot_run
from training.prepare import prepare_synthetic
from training.recipes import Loss, ModelSpec, PhantomData, Recipe
from training.run import DATA_DIR, HISTORY_FILE, RunInfo, load_run_recipe, save_recipe
from training.store import MANIFEST, PreparedData

logger = logging.getLogger(__name__)

BEST = "best.keras"
SWA = "swa.keras"
TOP_K = "top_k.keras"
RESUME_DIR = "resume"
#: ``--encoder-weights none``: train the ResNet34 encoder from random weights, on purpose.
NO_ENCODER_WEIGHTS = "none"
#: ``--mixed-precision`` choices and the Keras dtype policy of each.
PRECISIONS = {"float32": "float32", "bfloat16": "mixed_bfloat16", "float16": "mixed_float16"}


def build_network(spec: ModelSpec, encoder_weights: Path | None = None) -> keras.Model:
    """The bare network, input ``(size, size, spec.channels)`` at the scale it expects."""
    shape = (spec.input_size, spec.input_size, spec.channels)
    if spec.variant == "attention_unet":
        from pneumonode.nets.attention_unet import build_attention_unet

        return build_attention_unet(
            input_shape=shape,
            base_filters=spec.base_filters,
            depth=spec.depth,
            dropout=spec.dropout,
            architecture=spec.architecture,
        )
    from pneumonode.nets.resnet34 import build_attention_resnet34_unet

    return build_attention_resnet34_unet(
        input_shape=shape, encoder_weights=encoder_weights, architecture=spec.architecture
    )


def input_transform(spec: ModelSpec) -> str:
    """Words for what the model does to its input (for ``run.json`` and the model card)."""
    text = f"x * {spec.input_scale:g}"
    if spec.mean or spec.std != 1.0:
        text = f"({text} - {spec.mean:g}) / {spec.std:g}"
    if spec.channels == 3:
        text += ", gray repeated into 3 channels"
    return text + " (in the model; the package takes 1 channel in [0, 1])"


def build_model(spec: ModelSpec, encoder_weights: Path | None = None) -> keras.Model:
    """Build the recipe's network (uncompiled) behind its input scaling and channel repeat.

    The model takes what the node's preprocessing gives (1 gray channel in [0, 1], see
    :mod:`pneumonode.inference.preprocess`) and itself scales it to what the network expects
    (:attr:`ModelSpec.input_scale`: 0-255 for the ResNet34 encoder, whose ImageNet
    ``bn_data`` statistics are of 0-255 pixels, and for the seed's graphs), applies
    ``(x - mean) / std`` and repeats the gray channel when the network takes 3. So loaders
    move uint8-sized data and the node needs no per-model rule.

    Parameters
    ----------
    spec : ModelSpec
        The recipe's model section.
    encoder_weights : pathlib.Path or None
        Local ResNet34 encoder weights (ResNet34 only).

    Returns
    -------
    keras.Model
        Input ``(size, size, 1)``, output ``(size, size, 1)`` probabilities.
    """
    network = build_network(spec, encoder_weights)
    inputs = keras.Input((spec.input_size, spec.input_size, 1), name="image")
    x = keras.layers.Rescaling(
        scale=spec.input_scale / spec.std, offset=-spec.mean / spec.std, name="input_scale"
    )(inputs)
    if spec.channels == 3:
        x = keras.layers.Concatenate(name="input_rgb")([x, x, x])
    return keras.Model(inputs, network(x), name=network.name)


def compile_model(
    model: keras.Model, lr: float, jit_compile: bool | str = "auto", loss: Loss | None = None
) -> None:
    """Adam, the recipe's loss (BCE + soft Dice by default), and the batch Dice as a metric."""
    weights = loss or Loss()
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate=lr),
        loss=WeightedLoss(weights.bce, weights.dice, weights.focal, weights.focal_gamma),
        metrics=[hard_dice],
        jit_compile=jit_compile,
    )


def resolve_encoder_weights(
    recipe: Recipe, encoder_weights: Path | str | None
) -> tuple[Path | None, str | None]:
    """The encoder weights file to load, and what ``run.json`` records about the start.

    ResNet34 recipes must say how the encoder starts: a weights file (``--encoder-weights
    PATH`` or the recipe's ``model.encoder_weights``; the paper used ImageNet) or, on purpose,
    ``--encoder-weights none`` (random weights; logged as a warning). Other variants have no
    encoder and ignore the option.

    Returns
    -------
    tuple
        ``(file or None, record or None)``.

    Raises
    ------
    ValueError
        For a ResNet34 recipe given neither.
    """
    if recipe.model.variant != "attention_resnet34":
        return None, None
    chosen = encoder_weights if encoder_weights is not None else recipe.model.encoder_weights
    if chosen is None:
        raise ValueError(
            f"recipe {recipe.name}: attention_resnet34 needs --encoder-weights PATH (ImageNet "
            "resnet34 .h5, as the paper) or --encoder-weights none to train the encoder from "
            "random weights; got neither"
        )
    if str(chosen).lower() == NO_ENCODER_WEIGHTS:
        logger.warning(
            "recipe %s: the ResNet34 encoder starts from RANDOM weights "
            "(--encoder-weights none); the paper started from ImageNet",
            recipe.name,
        )
        return None, "none (random initialisation, --encoder-weights none)"
    path = Path(chosen)
    if not path.is_file():
        raise FileNotFoundError(f"encoder weights file not found: {path}")
    return path, str(path)


@contextmanager
def precision(mixed: str | None) -> Iterator[str]:
    """Set Keras' global dtype policy for the block; yields the name recorded in ``run.json``."""
    name = mixed or "float32"
    if name not in PRECISIONS:
        raise ValueError(f"mixed precision must be one of {sorted(PRECISIONS)}, got {name!r}")
    before = keras.config.dtype_policy()
    keras.config.set_dtype_policy(PRECISIONS[name])
    try:
        yield name
    finally:
        keras.config.set_dtype_policy(before)


def open_data(
    recipe: Recipe, run_dir: Path, data: Path | None = None, size: int | None = None
) -> PreparedData:
    """The run's prepared data: ``data`` if given, else the recipe's folder or new phantoms.

    Phantoms are written into ``<run_dir>/data`` the first time (``data-<size>`` for a size
    other than the recipe's).
    """
    if data is not None:
        return PreparedData.open(data)
    size = size or recipe.model.input_size
    if isinstance(recipe.data, PhantomData):
        folder = run_dir / (DATA_DIR if size == recipe.model.input_size else f"{DATA_DIR}-{size}")
        if not (folder / MANIFEST).is_file():
            from training.phantoms import make_phantom

            prepare_synthetic(
                folder,
                make_phantom,
                count=recipe.data.count,
                original_size=recipe.data.original_size,
                size=size,
                seed=recipe.data.seed,
            )
        return PreparedData.open(folder)
    return PreparedData.open(recipe.data.prepared)


def datasets(
    recipe: Recipe,
    store: PreparedData,
    split: tuple[Sequence[str], Sequence[str]] | None = None,
) -> tuple[SegmentationData, SegmentationData, SegmentationData]:
    """Training (augmented, shuffled), validation and plain training batches (for BatchNorm).

    ``split`` overrides the folder's train/validation split (cross-validation folds).
    """
    if store.size != recipe.model.input_size:
        raise ValueError(
            f"prepared data {store.root} is {store.size} px, the recipe trains at "
            f"{recipe.model.input_size} px"
        )
    train_ids, val_ids = split if split is not None else (store.ids("train"), store.ids("val"))
    sampling = recipe.oversampling

    def make(
        ids: Sequence[str], augmenter: Augmenter | None, shuffle: bool, oversample: bool
    ) -> SegmentationData:
        return SegmentationData(
            store,
            ids,
            batch_size=recipe.train.batch_size,
            augmenter=augmenter,
            shuffle=shuffle,
            seed=recipe.train.seed,
            oversampling=(sampling.start, sampling.end) if oversample and sampling else None,
            epochs=recipe.train.epochs,
            workers=recipe.train.workers,
            use_multiprocessing=recipe.train.processes,
        )

    augmenter = Augmenter() if recipe.train.augment else None
    return (
        make(train_ids, augmenter, True, True),
        make(val_ids, None, False, False),
        make(train_ids, None, False, False),
    )


def final_member(info: RunInfo) -> str:
    """The model file that stands for a run: top-k average, SWA, best, else the last member."""
    for name in (TOP_K, SWA, BEST):
        if name in info.members:
            return name
    return info.members[-1]


def _load_weights_from(model: keras.Model, path: Path) -> None:
    from training.export import load_member

    source = load_member(path)
    if len(source.weights) != len(model.weights):
        raise ValueError(
            f"--init-from {path}: {len(source.weights)} weights, this recipe's model has "
            f"{len(model.weights)} (same variant and architecture needed)"
        )
    model.set_weights(source.get_weights())


def init_path(init_from: Path) -> Path:
    """A ``.keras`` file as is, or a run folder's final member (:func:`final_member`)."""
    if init_from.suffix == ".keras":
        return init_from
    return init_from / final_member(RunInfo.load(init_from))


def train(
    recipe: Recipe,
    run_dir: Path,
    *,
    data: Path | None = None,
    encoder_weights: Path | str | None = None,
    distributed: bool = False,
    verbose: int = 2,
    mixed_precision: str | None = None,
    init_from: Path | None = None,
    resume: bool = False,
    split: tuple[Sequence[str], Sequence[str]] | None = None,
) -> RunInfo:
    """Train a recipe into ``run_dir`` and return what the run produced.

    The folder receives ``recipe.json``, ``history.csv`` (one row per epoch), the members
    (``best.keras`` for the plateau schedule; ``snapshot_<k>.keras`` and ``swa.keras`` for
    snapshot/SWA recipes; ``top_k.keras`` when ``train.top_k`` is set), ``resume/`` (the last
    epoch's checkpoint), ``run.json`` and the plots ``curves.png`` and ``lr_schedule.png``.

    Parameters
    ----------
    recipe : Recipe
        What to train (for ``resume``, the run's own recipe is used).
    run_dir : pathlib.Path
        New or empty folder; for ``resume`` an interrupted run.
    data : pathlib.Path or None
        Prepared-data folder overriding the recipe's.
    encoder_weights : pathlib.Path, "none" or None
        ResNet34 encoder start (see :func:`resolve_encoder_weights`).
    distributed : bool
        Data-parallel on every local device (see :mod:`training.distribute`).
    verbose : int
        Keras ``fit`` verbosity.
    mixed_precision : str or None
        ``bfloat16`` or ``float16`` (mixed precision; the output stays float32).
    init_from : pathlib.Path or None
        Start from another run's weights (its final member) or a ``.keras`` file, e.g. a
        512 px run up-trained at 1024 px.
    resume : bool
        Go on from the last finished epoch of ``run_dir`` (``resume/``).
    split : tuple or None
        ``(train ids, validation ids)`` overriding the prepared split.

    Returns
    -------
    RunInfo
        Also saved as ``run.json``.
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    resume_dir = run_dir / RESUME_DIR
    saved: tuple[dict[str, Any], dict[str, Any]] | None = None
    if resume:
        recipe = load_run_recipe(run_dir)
        saved = ResumeCheckpoint.load(resume_dir)
        if saved[0]["epoch"] + 1 >= recipe.train.epochs and (run_dir / "run.json").is_file():
            raise ValueError(f"run {run_dir} is finished; nothing to resume")
    elif any(run_dir.glob("*.keras")):
        raise FileExistsError(f"run folder {run_dir} already holds models; use a new folder")
    else:
        save_recipe(recipe, run_dir)
    if saved is None and init_from is not None and encoder_weights is None:
        weights_file = None
        weights_record = (
            None if recipe.model.variant != "attention_resnet34" else f"from {init_from}"
        )
    elif saved is None:
        weights_file, weights_record = resolve_encoder_weights(recipe, encoder_weights)
    else:
        weights_file, weights_record = None, saved[0]["run"]["encoder_weights"]
    keras.utils.set_random_seed(recipe.train.seed)
    store = open_data(recipe, run_dir, data)
    train_data, val_data, plain_data = datasets(recipe, store, split)
    epochs = recipe.train.epochs
    start = time.monotonic()
    with precision(mixed_precision) as policy, data_parallel(distributed) as replicas:
        validation = ValidationDice(val_data)
        if saved is None:
            model = build_model(recipe.model, weights_file)
            if init_from is not None:
                _load_weights_from(model, init_path(init_from))
            compile_model(model, recipe.train.lr, recipe.train.jit_compile, recipe.loss)
            untrained = validation.score(model)[1]
            initial_epoch = 0
            resumed: list[int] = []
        else:
            model = keras.saving.load_model(
                resume_dir / ResumeCheckpoint.MODEL,
                custom_objects={"pneumonode>AttentionGate": AttentionGate},
            )
            run_values = saved[0]["run"]
            untrained = float(run_values["untrained_val_dice"])
            initial_epoch = int(saved[0]["epoch"]) + 1
            resumed = [*run_values["resumed_at_epochs"], initial_epoch]
            train_data.set_epoch(initial_epoch)
        logger.info("untrained validation challenge Dice: %.4f", untrained)
        callbacks: list[keras.callbacks.Callback] = [validation]
        stateful: dict[str, tuple[Any, Any]] = {}
        members: list[str] = []
        snapshots: list[int] = []
        if recipe.plateau is not None:
            p = recipe.plateau
            plateau = keras.callbacks.ReduceLROnPlateau(
                monitor=p.monitor,
                factor=p.factor,
                patience=p.patience,
                min_delta=p.min_delta,
                cooldown=p.cooldown,
                min_lr=p.min_lr,
                mode="max" if p.monitor == VAL_DICE else "min",
            )
            checkpoint = keras.callbacks.ModelCheckpoint(
                run_dir / BEST, monitor=VAL_DICE, mode="max", save_best_only=True
            )
            callbacks += [plateau, checkpoint]
            stateful["plateau"] = (
                lambda: ({"best": float(plateau.best), "wait": plateau.wait,
                          "cooldown": plateau.cooldown_counter}, {}),
                lambda v, _: _restore_plateau(plateau, v),
            )
            stateful["checkpoint"] = (
                lambda: ({"best": float(checkpoint.best)}, {}),
                lambda v, _: setattr(checkpoint, "best", float(v["best"])),
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
            kept_swa = swa
            stateful["swa"] = (
                lambda: swa_state(kept_swa),
                lambda v, a: swa_restore(kept_swa, v, a),
            )
        top: TopKAverage | None = None
        if recipe.train.top_k is not None:
            top = TopKAverage(recipe.train.top_k, run_dir / TOP_K, plain_data)
            callbacks.append(top)
            members.append(TOP_K)
            stateful["top_k"] = (top.state, top.restore)
        log = EpochLog(run_dir / HISTORY_FILE, append=saved is not None)
        callbacks.append(log)
        run_state = {"untrained_val_dice": untrained, "resumed_at_epochs": resumed,
                     "encoder_weights": weights_record}
        stateful["run"] = (lambda: (run_state, {}), lambda v, _: None)
        callbacks.append(
            ResumeCheckpoint(resume_dir, stateful, saved, recipe.train.checkpoint_every)
        )
        model.fit(
            train_data,
            epochs=epochs,
            initial_epoch=initial_epoch,
            callbacks=callbacks,
            verbose=verbose,
        )
        final = validation.score(model)[1]
    history = log.read()
    scores = [(float(row[VAL_DICE]), int(row["epoch"])) for row in history if row.get(VAL_DICE)]
    best_dice, best_epoch = max(scores, key=lambda t: (t[0], -t[1])) if scores else (None, None)
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
        architecture=recipe.model.architecture,
        encoder_weights=weights_record,
        input_transform=input_transform(recipe.model),
        mixed_precision=policy,
        init_from=None if init_from is None else str(init_path(init_from)),
        resumed_at_epochs=resumed,
        last_val_dice=float(history[-1][VAL_DICE]) if history else None,
        best_val_dice=best_dice,
        best_epoch=best_epoch,
        top_k_epochs=[] if top is None else sorted(top.epochs),
    )
    info.save(run_dir)
    plot_run(run_dir, recipe.name, info.snapshot_epochs, info.swa_start_epoch)
    return info


def _restore_plateau(plateau: keras.callbacks.ReduceLROnPlateau, values: dict[str, Any]) -> None:
    plateau.best = float(values["best"])
    plateau.wait = int(values["wait"])
    plateau.cooldown_counter = int(values["cooldown"])
