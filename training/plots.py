"""PNG plots of a run: loss and Dice curves; the learning rate with snapshot and SWA marks."""

from __future__ import annotations

import csv
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from training.callbacks import VAL_DICE
from training.run import CURVES_PNG, HISTORY_FILE, LR_PNG


def read_history(path: Path) -> dict[str, list[float]]:
    """Columns of ``history.csv`` as float lists (missing values are NaN)."""
    columns: dict[str, list[float]] = {}
    with path.open(newline="", encoding="utf-8") as handle:
        for row in csv.DictReader(handle):
            for key, value in row.items():
                columns.setdefault(key, []).append(float(value) if value else float("nan"))
    if not columns:
        raise ValueError(f"{path} has no epochs")
    return columns


def _save(figure: Figure, path: Path) -> Path:
    FigureCanvasAgg(figure)
    figure.savefig(path, dpi=110)
    return path


def plot_curves(history: dict[str, list[float]], path: Path, title: str) -> Path:
    """Loss (train, validation) and Dice (train batch Dice, validation challenge Dice)."""
    epochs = [int(e) + 1 for e in history["epoch"]]
    figure = Figure(figsize=(10, 4), layout="constrained")
    loss_ax, dice_ax = figure.subplots(1, 2)
    loss_ax.plot(epochs, history["loss"], label="train")
    loss_ax.plot(epochs, history["val_loss"], label="validation")
    loss_ax.set(xlabel="epoch", ylabel="BCE + (1 - soft Dice)", title="loss")
    loss_ax.legend()
    dice_ax.plot(epochs, history["hard_dice"], label="train (batch Dice @0.5)")
    dice_ax.plot(epochs, history[VAL_DICE], label="validation (challenge Dice @0.5)")
    dice_ax.set(xlabel="epoch", ylabel="Dice", title="Dice", ylim=(0.0, 1.0))
    dice_ax.legend(loc="lower right")
    figure.suptitle(title)
    return _save(figure, path)


def plot_lr(
    history: dict[str, list[float]],
    path: Path,
    title: str,
    snapshot_epochs: list[int],
    swa_start_epoch: int | None,
) -> Path:
    """Learning rate per epoch (log scale), snapshots as dashed lines, the SWA span shaded."""
    epochs = [int(e) + 1 for e in history["epoch"]]
    figure = Figure(figsize=(8, 4), layout="constrained")
    ax = figure.subplots()
    ax.step(epochs, history["lr"], where="mid", label="learning rate")
    ax.set_yscale("log")
    for index, epoch in enumerate(snapshot_epochs):
        ax.axvline(
            epoch + 1,
            color="tab:red",
            linestyle="--",
            label="snapshot saved" if index == 0 else None,
        )
    if swa_start_epoch is not None:
        ax.axvspan(
            swa_start_epoch + 0.5,
            max(epochs) + 0.5,
            color="tab:green",
            alpha=0.2,
            label=f"SWA (epochs {swa_start_epoch + 1}-{max(epochs)})",
        )
    ax.set(xlabel="epoch (1-based)", ylabel="learning rate", title=title)
    ax.legend(loc="lower left")
    return _save(figure, path)


def plot_run(
    run_dir: Path, name: str, snapshot_epochs: list[int], swa_start_epoch: int | None
) -> list[Path]:
    """Write ``curves.png`` and ``lr_schedule.png`` into a run folder from its history."""
    history = read_history(run_dir / HISTORY_FILE)
    return [
        plot_curves(history, run_dir / CURVES_PNG, f"{name}: loss and Dice"),
        plot_lr(history, run_dir / LR_PNG, f"{name}: schedule", snapshot_epochs, swa_start_epoch),
    ]
