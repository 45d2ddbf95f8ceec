"""Training callbacks: cosine snapshot ensembles, SWA with BatchNorm recomputation, validation."""

from __future__ import annotations

import csv
import json
import math
import os
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import keras
import numpy as np
from numpy.typing import NDArray

from training.data import SegmentationData
from training.losses import bce_dice_loss
from training.metrics import challenge_dice_at

VAL_DICE = "val_challenge_dice"


def cosine_annealing_lr(epoch: int, lr0: float, total_epochs: int, cycles: int) -> float:
    """Learning rate of a snapshot ensemble (Huang et al. 2017) at a 0-based epoch.

    ``lr = lr0 / 2 * (cos(pi * (t mod (T / M)) / (T / M)) + 1)``

    Parameters
    ----------
    epoch : int
        ``t``, 0-based.
    lr0 : float
        Rate at the start of every cycle.
    total_epochs : int
        ``T``.
    cycles : int
        ``M``, the number of snapshots.

    Returns
    -------
    float
        The rate for that epoch.
    """
    if total_epochs < 1 or not 1 <= cycles <= total_epochs:
        raise ValueError(f"need 1 <= cycles ({cycles}) <= total_epochs ({total_epochs})")
    period = total_epochs / cycles
    return lr0 / 2.0 * (math.cos(math.pi * math.fmod(epoch, period) / period) + 1.0)


def snapshot_epochs(total_epochs: int, cycles: int) -> list[int]:
    """0-based epochs at whose end a snapshot is saved: the last epoch of each cycle.

    Parameters
    ----------
    total_epochs : int
        ``T``.
    cycles : int
        ``M``.

    Returns
    -------
    list of int
        ``M`` epochs, the last being ``T - 1``.
    """
    if total_epochs < 1 or not 1 <= cycles <= total_epochs:
        raise ValueError(f"need 1 <= cycles ({cycles}) <= total_epochs ({total_epochs})")
    return [math.ceil((k + 1) * total_epochs / cycles) - 1 for k in range(cycles)]


def get_learning_rate(model: keras.Model) -> float:
    """The optimizer's current learning rate."""
    return float(keras.ops.convert_to_numpy(model.optimizer.learning_rate))


def set_learning_rate(model: keras.Model, value: float) -> None:
    """Set the optimizer's learning rate (a variable, so compiled steps see the change)."""
    model.optimizer.learning_rate.assign(value)


class SnapshotEnsemble(keras.callbacks.Callback):  # type: ignore[misc]
    """Cosine-annealed learning rate with warm restarts; a snapshot at the end of every cycle.

    Snapshots are written as ``<directory>/snapshot_<k>.keras`` (k = 1..M).

    Parameters
    ----------
    directory : pathlib.Path
        Where the snapshots go.
    lr0 : float
        Rate at the start of each cycle.
    total_epochs : int
        ``T``.
    cycles : int
        ``M``.
    """

    def __init__(self, directory: Path, lr0: float, total_epochs: int, cycles: int) -> None:
        super().__init__()
        self.directory = directory
        self.lr0 = lr0
        self.total_epochs = total_epochs
        self.cycles = cycles
        self.epochs = snapshot_epochs(total_epochs, cycles)
        self.saved: list[Path] = []

    def on_epoch_begin(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        """Set the epoch's rate."""
        set_learning_rate(
            self.model, cosine_annealing_lr(epoch, self.lr0, self.total_epochs, self.cycles)
        )

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        """Save a snapshot when a cycle ends."""
        if epoch in self.epochs:
            path = self.directory / f"snapshot_{self.epochs.index(epoch) + 1}.keras"
            self.model.save(path)
            self.saved.append(path)


def _float_variables(model: keras.Model) -> list[Any]:
    return [v for v in model.weights if "float" in str(v.dtype)]


def running_mean(
    mean: list[NDArray[np.float64]], values: list[NDArray[Any]], count: int
) -> list[NDArray[np.float64]]:
    """Fold the ``count``-th sample into a running mean: ``m + (x - m) / count``.

    Parameters
    ----------
    mean : list of numpy.ndarray
        Mean of the first ``count - 1`` samples (ignored when ``count == 1``).
    values : list of numpy.ndarray
        The new sample.
    count : int
        1-based index of the new sample.

    Returns
    -------
    list of numpy.ndarray
        The mean of ``count`` samples.
    """
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    if count == 1:
        return [np.asarray(v, dtype=np.float64).copy() for v in values]
    return [
        m + (np.asarray(v, dtype=np.float64) - m) / count for m, v in zip(mean, values, strict=True)
    ]


def batchnorm_layers(model: keras.Layer) -> list[keras.layers.BatchNormalization]:
    """Every BatchNormalization layer of a model, nested models included."""
    found: list[keras.layers.BatchNormalization] = []
    for layer in getattr(model, "layers", []):
        if isinstance(layer, keras.layers.BatchNormalization):
            found.append(layer)
        else:
            found.extend(batchnorm_layers(layer))
    return found


def recompute_batchnorm(model: keras.Model, batches: Iterable[Any]) -> int:
    """Recompute BatchNorm moving statistics for the current weights by a pass over data.

    Each BatchNormalization layer's moving mean and variance are reset and then set to the
    plain average, over the batches, of the batch statistics it sees in training mode (the
    momentum of batch ``k`` is ``(k - 1) / k``). Other weights are untouched. A model without
    BatchNormalization is left as it is and no batch is read.

    Parameters
    ----------
    model : keras.Model
        The model (typically with SWA weights).
    batches : iterable
        Inputs ``x`` or ``(x, y)`` tuples, e.g. a :class:`SegmentationData` without augmentation.

    Returns
    -------
    int
        Number of batches used (0 when the model has no BatchNormalization).
    """
    layers = batchnorm_layers(model)
    if not layers:
        return 0
    momenta = [layer.momentum for layer in layers]
    for layer in layers:
        shape, dtype = layer.moving_mean.shape, layer.moving_mean.dtype
        layer.moving_mean.assign(keras.ops.zeros(shape, dtype=dtype))
        layer.moving_variance.assign(keras.ops.ones(shape, dtype=dtype))
    count = 0
    as_list = isinstance(getattr(model, "input", None), list)
    try:
        for batch in batches:
            x = batch[0] if isinstance(batch, tuple) else batch
            count += 1
            for layer in layers:
                layer.momentum = (count - 1) / count
            model([x] if as_list else x, training=True)
    finally:
        for layer, momentum in zip(layers, momenta, strict=True):
            layer.momentum = momentum
    if count == 0:
        raise ValueError("recompute_batchnorm needs at least one batch")
    return count


class _Batches:
    """The first ``limit`` batches of a PyDataset (all when ``limit`` is None)."""

    def __init__(self, data: keras.utils.PyDataset, limit: int | None) -> None:
        self.data = data
        self.limit = len(data) if limit is None else min(limit, len(data))

    def __iter__(self) -> Any:
        for index in range(self.limit):
            yield self.data[index]


class StochasticWeightAveraging(keras.callbacks.Callback):  # type: ignore[misc]
    """Average the weights of every epoch from ``start_epoch`` (0-based) to the end.

    At the end of training the model gets the averaged weights, its BatchNorm statistics are
    recomputed with a pass over ``bn_data`` (see :func:`recompute_batchnorm`), and it is saved to
    ``path``. The weights of the last epoch are saved before, to ``last_path`` when given.

    Parameters
    ----------
    start_epoch : int
        First averaged epoch, 0-based (117 in the paper: the last 15 of 132 epochs).
    path : pathlib.Path
        Where the averaged model is saved.
    bn_data : keras.utils.PyDataset or None
        Training batches without augmentation for the BatchNorm pass.
    bn_batches : int or None
        Use only the first batches of ``bn_data``.
    """

    def __init__(
        self,
        start_epoch: int,
        path: Path,
        bn_data: keras.utils.PyDataset | None,
        bn_batches: int | None = None,
    ) -> None:
        super().__init__()
        if start_epoch < 0:
            raise ValueError(f"SWA start_epoch must be >= 0, got {start_epoch}")
        self.start_epoch = start_epoch
        self.path = path
        self.bn_data = bn_data
        self.bn_batches = bn_batches
        self.count = 0
        self.mean: list[NDArray[np.float64]] = []
        self.bn_batches_used = 0

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        """Fold this epoch's weights into the average."""
        if epoch < self.start_epoch:
            return
        self.count += 1
        values = [keras.ops.convert_to_numpy(v) for v in _float_variables(self.model)]
        self.mean = running_mean(self.mean, values, self.count)

    def apply_average(self) -> None:
        """Give the model the averaged weights and recompute its BatchNorm statistics."""
        if self.count == 0:
            raise ValueError(
                f"no epoch reached the SWA start epoch {self.start_epoch}; nothing to average"
            )
        for variable, value in zip(_float_variables(self.model), self.mean, strict=True):
            variable.assign(value.astype(str(variable.dtype)))
        if batchnorm_layers(self.model):
            if self.bn_data is None:
                raise ValueError("the model has BatchNormalization: SWA needs bn_data")
            self.bn_batches_used = recompute_batchnorm(
                self.model, _Batches(self.bn_data, self.bn_batches)
            )

    def on_train_end(self, logs: dict[str, Any] | None = None) -> None:
        """Apply the average and save the SWA model."""
        if self.count == 0:
            return
        self.apply_average()
        self.model.save(self.path)


class ValidationDice(keras.callbacks.Callback):  # type: ignore[misc]
    """Score the validation split each epoch: ``val_loss`` and the challenge Dice.

    The challenge Dice is the mean per-image Dice at the original resolution of the ground
    truth, with the node's post-processing at threshold 0.5 (no area rules). Both values are
    added to the epoch's logs, so later callbacks (ReduceLROnPlateau, ModelCheckpoint) see them.

    Parameters
    ----------
    data : SegmentationData
        Validation batches, without augmentation or shuffling.
    """

    def __init__(self, data: SegmentationData) -> None:
        super().__init__()
        self.data = data

    def score(self, model: keras.Model) -> tuple[float, float]:
        """Return ``(val_loss, val_challenge_dice)`` of a model on the validation data."""
        losses = []
        weights = []
        dices = []
        for index in range(len(self.data)):
            x, y = self.data[index]
            probabilities = np.asarray(model.predict_on_batch(x), dtype=np.float32)
            loss = keras.ops.convert_to_numpy(bce_dice_loss(y, probabilities))
            losses.append(float(loss))
            weights.append(len(x))
            truths = self.data.store.original_masks(self.data.batch_ids(index))
            for probability, truth in zip(probabilities[..., 0], truths, strict=True):
                dices.append(challenge_dice_at(probability, truth))
        return float(np.average(losses, weights=weights)), float(np.mean(dices))

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        """Add ``val_loss`` and ``val_challenge_dice`` to the logs."""
        val_loss, val_dice = self.score(self.model)
        if logs is not None:
            logs["val_loss"] = val_loss
            logs[VAL_DICE] = val_dice


class EpochLog(keras.callbacks.Callback):  # type: ignore[misc]
    """Append one row per epoch to a CSV: epoch (0-based), lr, seconds and every logged value.

    The learning rate is the one in force during the epoch (read when it begins, after the
    schedulers listed before this callback have set it).

    Parameters
    ----------
    path : pathlib.Path
        The CSV (``history.csv`` of the run).
    append : bool
        Keep the rows already there (a resumed run) instead of starting the file anew; rows of
        epochs at or after the first epoch trained now are dropped.
    """

    COLUMNS = ("epoch", "lr", "seconds", "loss", "hard_dice", "val_loss", VAL_DICE)

    def __init__(self, path: Path, append: bool = False) -> None:
        super().__init__()
        self.path = path
        self.append = append
        self._lr = 0.0
        self._start = 0.0
        self._first = True

    def on_train_begin(self, logs: dict[str, Any] | None = None) -> None:
        """Write the header (unless appending)."""
        self._first = True
        if self.append and self.path.is_file():
            return
        with self.path.open("w", newline="", encoding="utf-8") as handle:
            csv.writer(handle, lineterminator="\n").writerow(self.COLUMNS)

    def read(self) -> list[dict[str, str]]:
        """The rows written so far."""
        with self.path.open(newline="", encoding="utf-8") as handle:
            return list(csv.DictReader(handle))

    def on_epoch_begin(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        """Remember the epoch's rate and start time."""
        if self._first and self.append:
            kept = [row for row in self.read() if int(row["epoch"]) < epoch]
            with self.path.open("w", newline="", encoding="utf-8") as handle:
                writer = csv.DictWriter(handle, fieldnames=self.COLUMNS, lineterminator="\n")
                writer.writeheader()
                writer.writerows(kept)
        self._first = False
        self._lr = get_learning_rate(self.model)
        self._start = time.monotonic()

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        """Append the row."""
        values = dict(logs or {})
        row: list[Any] = [epoch, f"{self._lr:.6g}", f"{time.monotonic() - self._start:.2f}"]
        for key in self.COLUMNS[3:]:
            value = values.get(key)
            row.append("" if value is None else f"{float(value):.6f}")
        with self.path.open("a", newline="", encoding="utf-8") as handle:
            csv.writer(handle, lineterminator="\n").writerow(row)


class TopKAverage(keras.callbacks.Callback):  # type: ignore[misc]
    """Keep the weights of the ``k`` epochs with the best validation Dice; save their average.

    The SIIM winners' checkpoint averaging. At the end of training the model gets the plain
    mean of those weights, its BatchNorm statistics are recomputed over ``bn_data`` (as for
    SWA) and it is saved to ``path``; the model keeps the averaged weights afterwards.

    Parameters
    ----------
    k : int
        Number of epochs averaged.
    path : pathlib.Path
        Where the averaged model is saved.
    bn_data : keras.utils.PyDataset or None
        Training batches without augmentation for the BatchNorm pass.
    monitor : str
        Logged value to maximise (placed in the logs by :class:`ValidationDice`).
    """

    def __init__(
        self,
        k: int,
        path: Path,
        bn_data: keras.utils.PyDataset | None,
        monitor: str = VAL_DICE,
    ) -> None:
        super().__init__()
        if k < 1:
            raise ValueError(f"TopKAverage k must be >= 1, got {k}")
        self.k = k
        self.path = path
        self.bn_data = bn_data
        self.monitor = monitor
        self.kept: list[tuple[float, int, list[NDArray[Any]]]] = []

    @property
    def epochs(self) -> list[int]:
        """0-based epochs currently kept, best first."""
        return [epoch for _, epoch, _ in sorted(self.kept, key=lambda t: (-t[0], t[1]))]

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        """Keep this epoch's weights when they are among the ``k`` best so far."""
        value = (logs or {}).get(self.monitor)
        if value is None:
            raise ValueError(f"TopKAverage needs {self.monitor!r} in the logs (ValidationDice)")
        self.kept.append((float(value), epoch, [np.array(w) for w in self.model.get_weights()]))
        self.kept.sort(key=lambda t: (-t[0], t[1]))
        del self.kept[self.k :]

    def on_train_end(self, logs: dict[str, Any] | None = None) -> None:
        """Average, recompute BatchNorm, save."""
        if not self.kept:
            return
        averaged = [
            np.mean([weights[i] for _, _, weights in self.kept], axis=0).astype(w.dtype)
            for i, w in enumerate(self.kept[0][2])
        ]
        self.model.set_weights(averaged)
        if batchnorm_layers(self.model) and self.bn_data is not None:
            recompute_batchnorm(self.model, _Batches(self.bn_data, None))
        self.model.save(self.path)

    def state(self) -> tuple[dict[str, Any], dict[str, NDArray[Any]]]:
        """What :class:`ResumeCheckpoint` saves: scores and epochs, and the kept weights."""
        arrays = {
            f"top{rank}_{i}": w for rank, (_, _, ws) in enumerate(self.kept) for i, w in
            enumerate(ws)
        }
        return {"kept": [[score, epoch, len(ws)] for score, epoch, ws in self.kept]}, arrays

    def restore(self, values: dict[str, Any], arrays: dict[str, NDArray[Any]]) -> None:
        """Undo :meth:`state`."""
        self.kept = [
            (float(score), int(epoch), [arrays[f"top{rank}_{i}"] for i in range(int(n))])
            for rank, (score, epoch, n) in enumerate(values["kept"])
        ]


def swa_state(swa: StochasticWeightAveraging) -> tuple[dict[str, Any], dict[str, NDArray[Any]]]:
    """The running SWA mean and its count, for :class:`ResumeCheckpoint`."""
    return {"count": swa.count}, {f"swa_{i}": m for i, m in enumerate(swa.mean)}


def swa_restore(
    swa: StochasticWeightAveraging, values: dict[str, Any], arrays: dict[str, NDArray[Any]]
) -> None:
    """Undo :func:`swa_state`."""
    swa.count = int(values["count"])
    swa.mean = [arrays[f"swa_{i}"] for i in range(sum(k.startswith("swa_") for k in arrays))]


class ResumeCheckpoint(keras.callbacks.Callback):  # type: ignore[misc]
    """After every epoch, save what ``train --resume`` needs to go on from the next one.

    ``<directory>/model.keras`` (weights and optimizer state), ``state.json`` (the last
    finished epoch and the state of the stateful callbacks) and ``state.npz`` (their arrays:
    the SWA running mean, the top-k weights). Written to temporary names and renamed, so a
    crash leaves the previous epoch's complete checkpoint.

    Parameters
    ----------
    directory : pathlib.Path
        ``<run>/resume``.
    stateful : dict
        ``name -> (get, set)``: ``get() -> (json values, arrays)``, ``set(values, arrays)``.
    saved : tuple or None
        What :meth:`load` returned, restored when training begins (list this callback last).
    every : int
        Save after every ``every``-th epoch (and the last); 1 loses at most one epoch.
    """

    MODEL = "model.keras"
    STATE = "state.json"
    ARRAYS = "state.npz"

    def __init__(
        self,
        directory: Path,
        stateful: dict[str, tuple[Any, Any]],
        saved: tuple[dict[str, Any], dict[str, NDArray[Any]]] | None = None,
        every: int = 1,
    ) -> None:
        super().__init__()
        if every < 1:
            raise ValueError(f"checkpoint every must be >= 1 epoch, got {every}")
        self.directory = directory
        self.stateful = stateful
        self.saved = saved
        self.every = every

    def on_train_begin(self, logs: dict[str, Any] | None = None) -> None:
        """Restore the saved state, after the other callbacks have reset theirs."""
        if self.saved is not None:
            self.restore(*self.saved)

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        """Write the checkpoint of ``epoch`` (every ``every`` epochs and after the last)."""
        last = epoch + 1 == self.params.get("epochs") if self.params else False
        if (epoch + 1) % self.every and not last:
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        values: dict[str, Any] = {"epoch": epoch}
        arrays: dict[str, NDArray[Any]] = {}
        for name, (get, _) in self.stateful.items():
            part, part_arrays = get()
            values[name] = part
            arrays.update({f"{name}/{key}": value for key, value in part_arrays.items()})
        tmp_model = self.directory / f".partial.{self.MODEL}"
        self.model.save(tmp_model)
        with (self.directory / f".partial.{self.ARRAYS}").open("wb") as handle:
            np.savez(handle, **arrays)
        (self.directory / f".partial.{self.STATE}").write_text(
            json.dumps(values, indent=2) + "\n", encoding="utf-8"
        )
        for name in (self.MODEL, self.ARRAYS, self.STATE):
            os.replace(self.directory / f".partial.{name}", self.directory / name)

    @classmethod
    def load(cls, directory: Path) -> tuple[dict[str, Any], dict[str, NDArray[Any]]]:
        """The saved values and arrays of the last finished epoch."""
        state = directory / cls.STATE
        if not state.is_file():
            raise FileNotFoundError(f"no resume checkpoint in {directory} ({cls.STATE} missing)")
        values = json.loads(state.read_text(encoding="utf-8"))
        with np.load(directory / cls.ARRAYS) as handle:
            arrays = {key: handle[key] for key in handle.files}
        return values, arrays

    def restore(self, values: dict[str, Any], arrays: dict[str, NDArray[Any]]) -> None:
        """Give each stateful callback back its saved state."""
        for name, (_, put) in self.stateful.items():
            prefix = f"{name}/"
            put(
                values[name],
                {key[len(prefix) :]: value for key, value in arrays.items()
                 if key.startswith(prefix)},
            )
