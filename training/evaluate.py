"""Score a run on validation like the challenge, tune its thresholds, and tabulate every run."""

from __future__ import annotations

import csv
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from pneumonode.inference.card import ModelCard, Thresholds
from pneumonode.inference.predictor import Predictor
from training.export import export_package
from training.run import PACKAGE_DIR, EvaluationRecord, RunInfo, load_run_recipe
from training.store import PreparedData
from training.thresholds import TripletSearch

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


def evaluate_run(
    run_dir: Path,
    *,
    data: Path | None = None,
    batch_size: int = 8,
    progress: bool = True,
) -> EvaluationRecord:
    """Score a finished run on its validation split and choose its triplet thresholds.

    The run is exported to ``<run_dir>/package`` and scored through the node's own
    :class:`~pneumonode.inference.predictor.Predictor` (members averaged, TTA as the recipe
    says), at the original resolution of each image. The best thresholds and the scores are
    written to ``evaluation.json`` and into the package's card; the results table of the
    runs folder (``run_dir.parent``) is refreshed.

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
    store = PreparedData.open(data if data is not None else Path(info.data_path))
    package = export_package(
        run_dir, run_dir / PACKAGE_DIR, thresholds=Thresholds(), validation={}, overwrite=True
    )
    predictor = Predictor.load(package)
    search = TripletSearch(recipe.evaluation)
    ids = store.ids("val")
    bar = tqdm(total=len(ids), desc="evaluate", unit="img", disable=not progress)
    for first in range(0, len(ids), batch_size):
        chunk = ids[first : first + batch_size]
        batch = np.stack(
            [predictor.prepare(store.load_image(i).astype(np.float32) / 255.0) for i in chunk]
        )
        probabilities = predictor.probabilities(batch)
        for probability, truth in zip(probabilities, store.original_masks(chunk), strict=True):
            search.add(probability, truth)
        bar.update(len(chunk))
    bar.close()
    result = search.result()
    record = EvaluationRecord(
        thresholds=result.thresholds,
        scores={
            "challenge_dice": result.dice,
            "challenge_dice_default": result.default_dice,
        },
        images=result.images,
        positives=sum(store.entry(i).positive for i in ids),
        members=list(info.members),
        tta_hflip=recipe.evaluation.tta_hflip,
        seconds=time.monotonic() - start,
    )
    record.save(run_dir)
    card = ModelCard.load(package)
    card.model_copy(
        update={"thresholds": record.thresholds, "validation": dict(record.scores)}
    ).save(package)
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
                "paper model": paper.model if paper else "",
                "epochs": str(info.epochs),
                "members": str(len(evaluation.members)),
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
    "paper model",
    "epochs",
    "members",
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
        "original resolution) on our validation split. Paper: the challenge's private and "
        "public test-set Dice as published.",
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "|" + "|".join("---" for _ in COLUMNS) + "|",
    ]
    lines += ["| " + " | ".join(row.get(c, "") for c in COLUMNS) + " |" for row in rows]
    md_path = runs_root / RESULTS_MD
    md_path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return md_path, csv_path
