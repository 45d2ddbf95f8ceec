"""Score a run on validation like the challenge, tune its thresholds, and tabulate every run."""

from __future__ import annotations

import csv
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numpy.typing import NDArray
from tqdm import tqdm

from pneumonode.inference.card import Thresholds
from pneumonode.inference.package import ModelPackage
from pneumonode.inference.postprocess import average_members
from pneumonode.inference.predictor import Predictor
from pneumonode.inference.preprocess import unit_from_uint8
from training.export import build_card, export_package, float32_member, package_input
from training.recipes import Evaluation
from training.run import PACKAGE_DIR, EvaluationRecord, RunInfo, load_run_recipe
from training.store import PreparedData
from training.thresholds import SearchResult, TripletSearch
from training.train import BEST, SWA, TOP_K

RESULTS_MD = "results.md"
RESULTS_CSV = "results.csv"


@dataclass(frozen=True)
class PaperResult:
    """One model of the paper's table: challenge Dice on the private and public test sets."""

    model: str
    private: float
    public: float


#: The paper's four models, keyed by the recipe that reproduces each.
PAPER_RESULTS: dict[str, PaperResult] = {
    "attention_unet": PaperResult("Attention U-Net", 0.7729, 0.6498),
    "attention_resnet34": PaperResult("Attention U-Net + ResNet34", 0.8006, 0.8766),
    "attention_unet_swa": PaperResult("Attention U-Net, snapshots + SWA", 0.733, 0.8789),
    "attention_resnet34_swa": PaperResult(
        "Attention U-Net + ResNet34, snapshots + SWA", 0.8222, 0.9082
    ),
}


def candidate_ensembles(info: RunInfo) -> dict[str, list[str]]:
    """The ensembles ``evaluate`` compares, by name, each a subset of the run's members.

    Snapshot + SWA runs: ``swa`` (the seed's final model), ``snapshots`` and ``all``; a plateau
    run: ``best``; a top-k average: ``top_k``; cross-validation: ``folds``; otherwise ``all``.
    """
    members = list(info.members)
    if info.folds:
        return {"folds": members}
    snapshots = [m for m in members if m.startswith("snapshot_")]
    out: dict[str, list[str]] = {}
    if SWA in members:
        out["swa"] = [SWA]
    if snapshots:
        out["snapshots"] = snapshots
    if BEST in members:
        out["best"] = [BEST]
    if TOP_K in members:
        out["top_k"] = [TOP_K]
    if len(members) > 1 and sorted(members) not in [sorted(v) for v in out.values()]:
        out["all"] = members
    return out or {"all": members}


def _predictor(run_dir: Path, members: Sequence[str]) -> Predictor:
    """The node's predictor over some members of a run (float32, the card the export writes)."""
    info = RunInfo.load(run_dir)
    recipe = load_run_recipe(run_dir)
    models = tuple(float32_member(run_dir / m, recipe) for m in members)
    card = build_card(
        recipe, info, members, thresholds=Thresholds(), validation={},
        input_spec=package_input(models[0], recipe),
    )
    return Predictor(ModelPackage(path=run_dir, card=card, members=models))


def member_probabilities(
    run_dir: Path,
    members: Sequence[str],
    store: PreparedData,
    ids: Sequence[str],
    *,
    batch_size: int = 8,
    progress: bool = False,
) -> dict[str, NDArray[np.float32]]:
    """Validation probabilities of each member alone, through the node's predictor (with TTA).

    Returns
    -------
    dict
        ``member -> (N, size, size)`` float32, in the order of ``ids``.
    """
    out: dict[str, NDArray[np.float32]] = {}
    for member in members:
        predictor = _predictor(run_dir, [member])
        chunks = []
        bar = tqdm(total=len(ids), desc=f"predict {member}", unit="img", disable=not progress)
        for first in range(0, len(ids), batch_size):
            chunk = ids[first : first + batch_size]
            batch = np.stack(
                [predictor.prepare(unit_from_uint8(store.load_image(i))) for i in chunk]
            )
            chunks.append(predictor.probabilities(batch))
            bar.update(len(chunk))
        bar.close()
        out[member] = np.concatenate(chunks)
    return out


def search_thresholds(
    probabilities: NDArray[np.float32],
    truths: Sequence[NDArray[np.bool_]],
    grid: Evaluation,
) -> SearchResult:
    """The triplet search over averaged probabilities and their ground truths."""
    search = TripletSearch(grid)
    for probability, truth in zip(probabilities, truths, strict=True):
        search.add(probability, truth)
    return search.result()


def score_members(
    run_dir: Path, members: Sequence[str], data: Path | None = None
) -> SearchResult:
    """Thresholds tuned for exactly ``members`` (averaged, with TTA) and their validation Dice.

    Parameters
    ----------
    run_dir : pathlib.Path
        A finished run.
    members : sequence of str
        The package's members.
    data : pathlib.Path or None
        Prepared-data folder (default: the run's).

    Returns
    -------
    SearchResult
        Measured on the run's validation split.
    """
    info = RunInfo.load(run_dir)
    recipe = load_run_recipe(run_dir)
    if info.folds:
        raise ValueError(
            f"run {run_dir} is a cross-validation run: its thresholds come from out-of-fold "
            "predictions of every fold; export all folds or evaluate again"
        )
    store = PreparedData.open(data if data is not None else Path(info.data_path))
    ids = store.ids("val")
    probs = member_probabilities(run_dir, members, store, ids)
    averaged = average_members([probs[m] for m in members])
    return search_thresholds(averaged, store.original_masks(ids), recipe.evaluation)


def evaluate_run(
    run_dir: Path,
    *,
    data: Path | None = None,
    batch_size: int = 8,
    progress: bool = True,
) -> EvaluationRecord:
    """Score a finished run on its validation split, choose its ensemble and its thresholds.

    Every member is scored through the node's own
    :class:`~pneumonode.inference.predictor.Predictor` (TTA as the recipe says) at the
    original resolution of each image. The candidate ensembles of
    :func:`candidate_ensembles` (SWA alone, the snapshots, all...) each get their triplet
    thresholds; the one with the best tuned challenge Dice is kept (the first listed among
    equals). A cross-validation run is scored on out-of-fold predictions: each fold's model on
    the images it did not train on. The choice, every candidate's scores and the thresholds go
    to ``evaluation.json``; the chosen members are exported to ``<run_dir>/package`` with them;
    the results table of the runs folder (``run_dir.parent``) is refreshed.

    Parameters
    ----------
    run_dir : pathlib.Path
        A finished run.
    data : pathlib.Path or None
        Prepared-data folder (default: the one the run trained on).
    batch_size : int
        Images per prediction batch.
    progress : bool
        Show a progress bar.

    Returns
    -------
    EvaluationRecord
        Also saved as ``evaluation.json``.
    """
    start = time.monotonic()
    info = RunInfo.load(run_dir)
    recipe = load_run_recipe(run_dir)
    if info.folds:
        from training.crossval import out_of_fold

        store = PreparedData.open(data if data is not None else Path(info.data_path))
        ids, probabilities = out_of_fold(run_dir, store, batch_size=batch_size)
        candidates = {"folds": list(info.members)}
        results = {"folds": search_thresholds(
            probabilities, store.original_masks(ids), recipe.evaluation
        )}
        positives = sum(store.entry(i).positive for i in ids)
    else:
        store = PreparedData.open(data if data is not None else Path(info.data_path))
        ids = store.ids("val")
        candidates = candidate_ensembles(info)
        needed = sorted({m for members in candidates.values() for m in members})
        probs = member_probabilities(
            run_dir, needed, store, ids, batch_size=batch_size, progress=progress
        )
        truths = store.original_masks(ids)
        results = {
            name: search_thresholds(
                average_members([probs[m] for m in members]), truths, recipe.evaluation
            )
            for name, members in candidates.items()
        }
        positives = sum(store.entry(i).positive for i in ids)
    choice = max(results, key=lambda name: results[name].dice)
    best = results[choice]
    scores = {"challenge_dice": best.dice, "challenge_dice_default": best.default_dice}
    record = EvaluationRecord(
        thresholds=best.thresholds,
        scores=scores,
        images=best.images,
        positives=positives,
        members=candidates[choice],
        tta_hflip=recipe.evaluation.tta_hflip,
        seconds=time.monotonic() - start,
        choice=choice,
        candidates={
            name: {"challenge_dice": r.dice, "challenge_dice_default": r.default_dice}
            for name, r in results.items()
        },
        out_of_fold=bool(info.folds),
    )
    record.save(run_dir)
    export_package(
        run_dir, run_dir / PACKAGE_DIR, members=record.members, thresholds=record.thresholds,
        validation=dict(scores), overwrite=True,
    )
    write_results_table(run_dir.parent)
    return record


def _fmt(value: float | None) -> str:
    return "" if value is None else f"{value:.4f}"


def results_rows(runs_root: Path) -> list[dict[str, str]]:
    """One row per evaluated run under ``runs_root``, then the paper's models not yet run."""
    rows: list[dict[str, str]] = []
    seen: set[str] = set()
    for run_dir in sorted(p.parent for p in runs_root.glob("*/run.json")):
        evaluation = EvaluationRecord.load(run_dir)
        if evaluation is None:
            continue
        info = RunInfo.load(run_dir)
        paper = PAPER_RESULTS.get(info.recipe)
        seen.add(info.recipe)
        t = evaluation.thresholds
        rows.append(
            {
                "run": run_dir.name,
                "recipe": info.recipe,
                "architecture": info.architecture,
                "paper model": paper.model if paper else "",
                "epochs": str(info.epochs),
                "ensemble": f"{evaluation.choice} ({len(evaluation.members)})",
                "untrained Dice": _fmt(info.untrained_val_dice),
                "last epoch Dice": _fmt(info.last_val_dice),
                "best epoch Dice": _fmt(info.best_val_dice),
                "val images": str(evaluation.images),
                "val Dice @0.5": _fmt(evaluation.scores.get("challenge_dice_default")),
                "val Dice tuned": _fmt(evaluation.scores.get("challenge_dice")),
                "thresholds (top/bottom/area/component)": (
                    f"{t.top}/{t.bottom}/{t.min_area}/{t.min_component_area}"
                ),
                "paper private": _fmt(paper.private) if paper else "",
                "paper public": _fmt(paper.public) if paper else "",
            }
        )
    for recipe, paper in PAPER_RESULTS.items():
        if recipe not in seen:
            rows.append(
                {
                    "run": "(not run)",
                    "recipe": recipe,
                    "paper model": paper.model,
                    "paper private": _fmt(paper.private),
                    "paper public": _fmt(paper.public),
                }
            )
    return rows


COLUMNS = (
    "run",
    "recipe",
    "architecture",
    "paper model",
    "epochs",
    "ensemble",
    "untrained Dice",
    "last epoch Dice",
    "best epoch Dice",
    "val images",
    "val Dice @0.5",
    "val Dice tuned",
    "thresholds (top/bottom/area/component)",
    "paper private",
    "paper public",
)


def write_results_table(runs_root: Path) -> tuple[Path, Path]:
    """Write ``results.md`` and ``results.csv`` in ``runs_root``.

    Our figures are the challenge metric on our validation split (30 % of the stage-1 training
    images); the paper's are the challenge's private and public test scores, so they are
    comparable in kind, not identical in data.

    Returns
    -------
    tuple of pathlib.Path
        The Markdown and CSV files.
    """
    rows = results_rows(runs_root)
    csv_path = runs_root / RESULTS_CSV
    with csv_path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS, lineterminator="\n")
        writer.writeheader()
        for row in rows:
            writer.writerow({c: row.get(c, "") for c in COLUMNS})
    lines = [
        "# Runs beside the paper",
        "",
        "Val Dice: the challenge metric (mean per-image Dice, 1 for two empty masks, at the "
        "original resolution) on our validation split (out-of-fold for cross-validation). "
        "Untrained / last epoch / best epoch: one model at 0.5, no TTA, during training. "
        "Val Dice @0.5 and tuned: the exported package (its ensemble, TTA; 0.5 or its tuned "
        "thresholds). Architecture: fixed (gates act on the skips) or paper (the seed's "
        "graphs as published). Paper: the challenge's private and public test-set Dice as "
        "published.",
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "|" + "|".join("---" for _ in COLUMNS) + "|",
    ]
    lines += ["| " + " | ".join(row.get(c, "") for c in COLUMNS) + " |" for row in rows]
    md_path = runs_root / RESULTS_MD
    md_path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return md_path, csv_path
