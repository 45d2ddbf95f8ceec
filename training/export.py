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


def _mixed(model: keras.Model) -> bool:
    for layer in model.layers:
        policy = getattr(layer, "dtype_policy", None)
        if policy is not None and policy.compute_dtype != "float32":
            return True
        if isinstance(layer, keras.Model) and _mixed(layer):
            return True
    return False


def float32_member(path: Path, recipe: Recipe) -> keras.Model:
    """A run's model file in float32: a mixed-precision member is rebuilt and given its weights.

    The node runs packages in float32 on any backend and device, whatever the run trained in.
    """
    model = load_member(path)
    if not _mixed(model):
        return model
    from training.train import build_model, precision

    with precision("float32"):
        rebuilt = build_model(recipe.model)
    rebuilt.set_weights(model.get_weights())
    return rebuilt


def package_input(model: keras.Model, recipe: Recipe) -> InputSpec:
    """What the package's card says the member takes.

    Models built by ``training.train`` scale and repeat their input themselves: 1 channel in
    [0, 1], mean 0, std 1. Older members (input with the network's channels) keep the
    recipe's channels, mean and std.
    """
    channels = int(model.inputs[0].shape[-1])
    size = recipe.model.input_size if model.inputs[0].shape[1] is None else int(
        model.inputs[0].shape[1]
    )
    if channels == 1 and any(layer.name == "input_scale" for layer in model.layers):
        return InputSpec(size=size, channels=1, mean=0.0, std=1.0)
    return InputSpec(
        size=size, channels=recipe.model.channels, mean=recipe.model.mean, std=recipe.model.std
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
    input_spec: InputSpec | None = None,
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
    input_spec : InputSpec or None
        The members' input (default: the recipe's size, 1 channel in [0, 1]).

    Returns
    -------
    ModelCard
        The validated card.
    """
    synthetic = isinstance(recipe.data, PhantomData)
    notes = [recipe.description, f"architecture {info.architecture}"]
    if info.encoder_weights is not None:
        notes.append(f"ResNet34 encoder start: {info.encoder_weights}")
    if info.input_transform:
        notes.append(f"input: {info.input_transform}")
    if info.mixed_precision != "float32":
        notes.append(f"trained in mixed {info.mixed_precision}, packaged in float32")
    if info.init_from:
        notes.append(f"initialised from {info.init_from}")
    if info.folds:
        notes.append(f"{info.folds}-fold cross-validation ensemble")
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
        input=input_spec or InputSpec(size=recipe.model.input_size, channels=1),
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

    Each member is loaded and saved again without optimizer state, in float32. The members
    default to the ensemble ``evaluate`` chose (all of them before an evaluation). Thresholds
    and validation scores are those ``evaluate`` measured for exactly these members; for any
    other subset they are tuned again on the run's validation split
    (:func:`training.evaluate.score_members`) and the measured scores are written, so a card
    never carries another ensemble's figures.

    Parameters
    ----------
    run_dir : pathlib.Path
        A finished run (``run.json``, ``recipe.json``, the members).
    out : pathlib.Path
        Package folder to create.
    members : sequence of str or None
        Subset of the run's members (default: the evaluated choice, else all).
    thresholds : Thresholds or None
        Post-processing; default: measured for these members (see above).
    validation : dict or None
        Scores for the card; default: measured for these members.
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
    evaluation = EvaluationRecord.load(run_dir)
    if members:
        chosen = list(members)
    else:
        chosen = list(evaluation.members) if evaluation else list(info.members)
    unknown = [m for m in chosen if m not in info.members]
    if unknown:
        raise ValueError(f"members {unknown} are not in run {run_dir} (has {info.members})")
    if thresholds is None or validation is None:
        if evaluation is not None and sorted(evaluation.members) == sorted(chosen):
            measured_t, measured_v = evaluation.thresholds, dict(evaluation.scores)
        elif evaluation is None:
            measured_t, measured_v = Thresholds(), {}
        else:
            from training.evaluate import score_members

            result = score_members(run_dir, chosen)
            measured_t = result.thresholds
            measured_v = {
                "challenge_dice": result.dice, "challenge_dice_default": result.default_dice
            }
        thresholds = thresholds if thresholds is not None else measured_t
        validation = validation if validation is not None else measured_v
    if out.exists():
        if not overwrite:
            raise FileExistsError(f"package folder {out} exists; pass overwrite to replace it")
        shutil.rmtree(out)
    out.mkdir(parents=True)
    first = None
    for member in chosen:
        model = float32_member(run_dir / member, recipe)
        if first is None:
            first = model
        model.save(out / member)
    card = build_card(
        recipe,
        info,
        chosen,
        thresholds=thresholds,
        validation=validation,
        name=name,
        version=version,
        input_spec=package_input(first, recipe),
    )
    card.save(out)
    return out
