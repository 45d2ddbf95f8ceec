"""Export a run folder as a node model package: member ``.keras`` files plus ``model_card.json``."""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path

import keras
from pydicom.uid import generate_uid

from pneumonode.inference.card import TTA, InputSpec, ModelCard, Thresholds, TrainingInfo
from pneumonode.nets.gates import AttentionGate
from training.recipes import PhantomData, Recipe
from training.run import EvaluationRecord, RunInfo, load_run_recipe

INTENDED_USE_SIIM = (
    "Research reproduction of 'Attention U-Net with snapshot ensembles and SWA' on the SIIM-ACR "
    "Pneumothorax Segmentation data (NIH ChestX-ray14 images). Flags possible pneumothorax on "
    "frontal chest radiographs for research and workflow testing; not a medical device, not for "
    "diagnostic use."
)
INTENDED_USE_SYNTHETIC = (
    "Pipeline check trained on synthetic phantoms only; it knows nothing about real "
    "radiographs. Never use on patients; not for diagnostic use."
)


def load_member(path: Path) -> keras.Model:
    """Load a run's model file without its training configuration."""
    return keras.saving.load_model(
        path, custom_objects={"pneumonode>AttentionGate": AttentionGate}, compile=False
    )


def build_card(
    recipe: Recipe,
    info: RunInfo,
    members: Sequence[str],
    *,
    thresholds: Thresholds,
    validation: dict[str, float],
    name: str | None = None,
    version: str | None = None,
    uid: str | None = None,
) -> ModelCard:
    """The model card of a run's package.

    Parameters
    ----------
    recipe : Recipe
        The run's recipe.
    info : RunInfo
        What the run produced.
    members : sequence of str
        Files of the package, averaged by the node.
    thresholds : Thresholds
        Post-processing (from ``evaluate``).
    validation : dict
        Validation scores to record.
    name, version, uid : str or None
        Defaults: ``pneumonode-<recipe>``, ``1.0.<epochs>``, a new UID.

    Returns
    -------
    ModelCard
        The validated card.
    """
    synthetic = isinstance(recipe.data, PhantomData)
    notes = [recipe.description]
    if info.snapshot_epochs:
        notes.append(f"snapshots after epochs {info.snapshot_epochs} (0-based)")
    if info.swa_start_epoch is not None:
        recomputed = (
            f"BatchNorm recomputed over {info.swa_bn_batches} batches"
            if info.swa_bn_batches
            else "no BatchNorm to recompute"
        )
        notes.append(f"SWA from epoch {info.swa_start_epoch} (0-based), {recomputed}")
    notes.append(f"backend {info.backend}, {info.replicas} replica(s), {info.seconds:.0f} s")
    return ModelCard(
        name=name or f"pneumonode-{recipe.name.replace('_', '-')}",
        version=version or f"1.0.{info.epochs}",
        uid=uid or str(generate_uid()),
        variant=recipe.model.variant,
        demo=synthetic,
        input=InputSpec(
            size=recipe.model.input_size,
            channels=recipe.model.channels,
            mean=recipe.model.mean,
            std=recipe.model.std,
        ),
        thresholds=thresholds,
        tta=TTA(hflip=recipe.evaluation.tta_hflip),
        members=list(members),
        training=TrainingInfo(
            recipe=recipe.name, data=info.data_source, epochs=info.epochs, notes="; ".join(notes)
        ),
        validation=validation,
        intended_use=INTENDED_USE_SYNTHETIC if synthetic else INTENDED_USE_SIIM,
    )


def export_package(
    run_dir: Path,
    out: Path,
    *,
    members: Sequence[str] | None = None,
    thresholds: Thresholds | None = None,
    validation: dict[str, float] | None = None,
    name: str | None = None,
    version: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a node model package from a finished run.

    Each member is loaded and saved again without optimizer state. Thresholds and validation
    scores come from the run's ``evaluation.json`` unless given.

    Parameters
    ----------
    run_dir : pathlib.Path
        A finished run (``run.json``, ``recipe.json``, the members).
    out : pathlib.Path
        Package folder to create.
    members : sequence of str or None
        Subset of the run's members (default: all of them, e.g. every snapshot and SWA).
    thresholds : Thresholds or None
        Post-processing; default from ``evaluation.json``, else 0.5 / 0.5 / 0 / 0.
    validation : dict or None
        Scores for the card; default from ``evaluation.json``.
    name, version : str or None
        Card name and version (see :func:`build_card`).
    overwrite : bool
        Replace an existing package folder.

    Returns
    -------
    pathlib.Path
        The package folder.
    """
    info = RunInfo.load(run_dir)
    recipe = load_run_recipe(run_dir)
    chosen = list(members) if members else list(info.members)
    unknown = [m for m in chosen if m not in info.members]
    if unknown:
        raise ValueError(f"members {unknown} are not in run {run_dir} (has {info.members})")
    evaluation = EvaluationRecord.load(run_dir)
    if thresholds is None:
        thresholds = evaluation.thresholds if evaluation else Thresholds()
    if validation is None:
        validation = dict(evaluation.scores) if evaluation else {}
    if out.exists():
        if not overwrite:
            raise FileExistsError(f"package folder {out} exists; pass overwrite to replace it")
        shutil.rmtree(out)
    out.mkdir(parents=True)
    for member in chosen:
        load_member(run_dir / member).save(out / member)
    card = build_card(
        recipe,
        info,
        chosen,
        thresholds=thresholds,
        validation=validation,
        name=name,
        version=version,
    )
    card.save(out)
    return out
