"""Train the bundled DEMO model on synthetic phantoms and write it as a model package.

Run ``python -m training.demo --out pneumonode/models/demo``. Everything is seeded (phantoms,
weights, dropout, batch order, UID), so a re-run on the same software gives the same package
UID and, on the same CPU build, the same weights. The model is a small Attention U-Net (the
paper's builder with few filters) trained for a few CPU minutes; it only knows phantoms and
must never be used on patients, which its card says.
"""

from __future__ import annotations

import argparse
import hashlib
import time
import uuid
from collections.abc import Iterable
from pathlib import Path

import keras
import numpy as np
import numpy.typing as npt

from pneumonode import __version__
from pneumonode.inference.card import TTA, InputSpec, ModelCard, Thresholds, TrainingInfo
from pneumonode.inference.postprocess import average_tta, triplet
from pneumonode.nets.attention_unet import build_attention_unet
from training.phantoms import make_blank, make_dataset

SIZE = 256
BASE_FILTERS = 4
DEPTH = 4
DROPOUT = 0.2
BATCH = 8
LEARNING_RATE = 3e-3
NAME = "pneumonode-demo"
INTENDED_USE = (
    "DEMO ONLY: trained on synthetic phantoms (training.phantoms), never on patient images. "
    "It shows that the node works end to end. Not for clinical use, not for diagnosis."
)
TOPS = (0.5, 0.6, 0.7, 0.8, 0.9)
BOTTOMS = (0.3, 0.4, 0.5)
MIN_AREAS = (0, 50, 100, 200, 400, 800)
MIN_COMPONENTS = (0, 30)
#: One training or validation image in this many is a blank (not a chest) with an empty mask.
BLANK_EVERY = 16


def demo_uid(seed: int) -> str:
    """A DICOM UID under the UUID root ``2.25``, derived from the seed only.

    Parameters
    ----------
    seed:
        The training seed.

    Returns
    -------
    str
        ``2.25.<decimal of a version-4 UUID made from a hash of the seed>``.
    """
    digest = hashlib.sha256(f"{NAME}:{seed}".encode()).digest()[:16]
    return f"2.25.{uuid.UUID(bytes=digest, version=4).int}"


def phantoms_with_blanks(
    n: int, seed: int
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.bool_]]:
    """``n`` chest phantoms followed by ``n // BLANK_EVERY`` blank images (empty masks).

    Parameters
    ----------
    n:
        Number of chest phantoms.
    seed:
        Seed of both.

    Returns
    -------
    (images, masks)
    """
    images, masks = make_dataset(n, SIZE, seed=seed)
    rng = np.random.default_rng([seed, 1])
    blanks = [make_blank(rng, SIZE) for _ in range(n // BLANK_EVERY)]
    if not blanks:
        return images, masks
    return (
        np.concatenate([images, np.stack([b[0] for b in blanks])]),
        np.concatenate([masks, np.stack([b[1] for b in blanks])]),
    )


def dice_loss(y_true: keras.KerasTensor, y_pred: keras.KerasTensor) -> keras.KerasTensor:
    """Binary cross-entropy plus soft Dice loss over each image.

    Parameters
    ----------
    y_true, y_pred:
        ``(N, H, W, 1)`` target masks and predicted probabilities.

    Returns
    -------
    Per-image loss ``(N,)``.
    """
    axes = (1, 2, 3)
    bce = keras.ops.mean(keras.losses.binary_crossentropy(y_true, y_pred), axis=(1, 2))
    intersection = keras.ops.sum(y_true * y_pred, axis=axes)
    total = keras.ops.sum(y_true, axis=axes) + keras.ops.sum(y_pred, axis=axes)
    dice = (2.0 * intersection + 1.0) / (total + 1.0)
    return bce + (1.0 - dice)


def dice_score(prediction: npt.NDArray[np.bool_], truth: npt.NDArray[np.bool_]) -> float:
    """Dice of two masks; 1.0 when both are empty (the SIIM convention).

    Parameters
    ----------
    prediction, truth:
        Boolean masks of the same shape.

    Returns
    -------
    float
    """
    total = int(prediction.sum()) + int(truth.sum())
    if total == 0:
        return 1.0
    return 2.0 * int((prediction & truth).sum()) / total


def predict_probabilities(
    model: keras.Model, images: npt.NDArray[np.float32], spec: InputSpec, hflip: bool
) -> npt.NDArray[np.float32]:
    """Probabilities ``(N, H, W)`` for phantoms, normalised as the card says, with optional TTA.

    Parameters
    ----------
    model:
        The network.
    images:
        ``(N, H, W)`` phantoms in [0, 1].
    spec:
        Input normalisation.
    hflip:
        Average with the horizontally flipped prediction.

    Returns
    -------
    numpy.ndarray
    """
    x = ((images - spec.mean) / spec.std)[..., np.newaxis].astype(np.float32)
    outputs = []
    for start in range(0, len(x), BATCH):
        chunk = x[start : start + BATCH]
        prob = np.asarray(model.predict_on_batch(chunk))[..., 0]
        if hflip:
            flipped = np.asarray(model.predict_on_batch(chunk[:, :, ::-1]))[..., 0]
            prob = average_tta(prob, flipped)
        outputs.append(prob)
    return np.concatenate(outputs).astype(np.float32)


def mean_dice(
    probs: npt.NDArray[np.float32], masks: npt.NDArray[np.bool_], thresholds: Thresholds
) -> float:
    """Mean Dice of the triplet masks against the truth.

    Parameters
    ----------
    probs:
        ``(N, H, W)`` probabilities.
    masks:
        ``(N, H, W)`` truth.
    thresholds:
        Post-processing to apply.

    Returns
    -------
    float
    """
    scores = [dice_score(triplet(p, thresholds), m) for p, m in zip(probs, masks, strict=True)]
    return float(np.mean(scores))


def candidate_thresholds() -> Iterable[Thresholds]:
    """The grid searched on the validation split.

    Returns
    -------
    iterable of Thresholds
    """
    for top in TOPS:
        for bottom in BOTTOMS:
            if bottom > top:
                continue
            for min_area in MIN_AREAS:
                for component in MIN_COMPONENTS:
                    yield Thresholds(
                        top=top, bottom=bottom, min_area=min_area, min_component_area=component
                    )


def choose_thresholds(
    probs: npt.NDArray[np.float32], masks: npt.NDArray[np.bool_]
) -> tuple[Thresholds, float]:
    """The grid point with the best mean Dice (first one on ties).

    Parameters
    ----------
    probs:
        Validation probabilities.
    masks:
        Validation truth.

    Returns
    -------
    (thresholds, dice)
    """
    best: tuple[Thresholds, float] | None = None
    for candidate in candidate_thresholds():
        score = mean_dice(probs, masks, candidate)
        if best is None or score > best[1]:
            best = (candidate, score)
    assert best is not None
    return best


def export_model(model: keras.Model) -> keras.Model:
    """A copy of the trained network without optimizer state, for a small ``.keras`` file.

    Parameters
    ----------
    model:
        The trained network.

    Returns
    -------
    keras.Model
        A fresh, uncompiled network of the same architecture and name with the same weights.
    """
    clean = build_attention_unet(
        (SIZE, SIZE, 1), base_filters=BASE_FILTERS, depth=DEPTH, dropout=DROPOUT, name=model.name
    )
    clean.set_weights(model.get_weights())
    return clean


def train(out: Path, seed: int, epochs: int, train_size: int, val_size: int) -> ModelCard:
    """Train the demo network, choose thresholds, and write the package to ``out``.

    Parameters
    ----------
    out:
        Package folder (created if needed; ``model.keras`` and ``model_card.json`` replaced).
    seed:
        Seed of everything.
    epochs:
        Passes over the training phantoms.
    train_size, val_size:
        Number of training and validation phantoms (the test split has ``val_size`` too).

    Returns
    -------
    ModelCard
        The card written.
    """
    keras.utils.set_random_seed(seed)
    started = time.perf_counter()
    train_x, train_y = phantoms_with_blanks(train_size, seed * 3 + 1)
    val_x, val_y = phantoms_with_blanks(val_size, seed * 3 + 2)
    test_x, test_y = phantoms_with_blanks(val_size, seed * 3 + 3)
    spec = InputSpec(
        size=SIZE,
        channels=1,
        mean=round(float(train_x.mean()), 3),
        std=round(float(train_x.std()), 3),
    )
    print(f"phantoms ready in {time.perf_counter() - started:.1f} s; input {spec}")

    model = build_attention_unet(
        (SIZE, SIZE, 1), base_filters=BASE_FILTERS, depth=DEPTH, dropout=DROPOUT,
        name="attention_unet_demo",
    )
    untrained_probs = predict_probabilities(model, test_x, spec, hflip=True)
    untrained_val = predict_probabilities(model, val_x, spec, hflip=True)
    untrained_thresholds, _ = choose_thresholds(untrained_val, val_y)
    untrained_dice = mean_dice(untrained_probs, test_y, untrained_thresholds)

    steps_per_epoch = len(train_x) // BATCH
    schedule = keras.optimizers.schedules.CosineDecay(
        LEARNING_RATE, decay_steps=epochs * steps_per_epoch, alpha=0.05
    )
    model.compile(optimizer=keras.optimizers.Adam(learning_rate=schedule), loss=dice_loss)
    x = ((train_x - spec.mean) / spec.std)[..., np.newaxis].astype(np.float32)
    y = train_y[..., np.newaxis].astype(np.float32)
    order_rng = np.random.default_rng(seed)
    for epoch in range(1, epochs + 1):
        order = order_rng.permutation(len(x))
        losses = []
        for step in range(steps_per_epoch):
            batch = order[step * BATCH : (step + 1) * BATCH]
            losses.append(float(model.train_on_batch(x[batch], y[batch])))
        print(
            f"epoch {epoch}/{epochs}: loss {np.mean(losses):.4f} "
            f"({time.perf_counter() - started:.0f} s)"
        )

    val_probs = predict_probabilities(model, val_x, spec, hflip=True)
    thresholds, val_dice = choose_thresholds(val_probs, val_y)
    test_probs = predict_probabilities(model, test_x, spec, hflip=True)
    test_dice = mean_dice(test_probs, test_y, thresholds)
    print(f"thresholds {thresholds}")
    print(
        f"phantom Dice: validation {val_dice:.4f}, test {test_dice:.4f}, "
        f"untrained on test {untrained_dice:.4f}"
    )

    out.mkdir(parents=True, exist_ok=True)
    export_model(model).save(out / "model.keras")
    card = ModelCard(
        name=NAME,
        version=__version__,
        uid=demo_uid(seed),
        variant="attention_unet",
        demo=True,
        input=spec,
        thresholds=thresholds,
        tta=TTA(hflip=True),
        members=["model.keras"],
        training=TrainingInfo(
            recipe=(
                f"training.demo: Attention U-Net base_filters={BASE_FILTERS} depth={DEPTH} "
                f"dropout={DROPOUT}, BCE + soft Dice, Adam {LEARNING_RATE:g} with cosine decay, "
                f"batch {BATCH}, seed {seed}"
            ),
            data=(
                f"{train_size} synthetic phantoms (training.phantoms, seed {seed * 3 + 1}) "
                f"+ {train_size // BLANK_EVERY} blank non-chest images; thresholds chosen on "
                f"{val_size} validation phantoms + {val_size // BLANK_EVERY} blanks"
            ),
            epochs=epochs,
            notes=(
                "Scores are mean Dice on phantoms (empty/empty = 1), at model resolution; "
                "they say nothing about radiographs."
            ),
        ),
        validation={
            "phantom_val_dice": round(val_dice, 4),
            "phantom_test_dice": round(test_dice, 4),
            "phantom_test_dice_untrained": round(untrained_dice, 4),
        },
        intended_use=INTENDED_USE,
    )
    card.save(out)
    print(f"wrote {out} in {time.perf_counter() - started:.0f} s")
    return card


def main(argv: list[str] | None = None) -> int:
    """Command line entry point.

    Parameters
    ----------
    argv:
        Arguments (default: ``sys.argv[1:]``).

    Returns
    -------
    int
        Exit status.
    """
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="package folder to write")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--train-size", type=int, default=400)
    parser.add_argument("--val-size", type=int, default=64)
    args = parser.parse_args(argv)
    if args.epochs < 1 or args.train_size < BATCH or args.val_size < 2:
        parser.error(f"need epochs >= 1, train-size >= {BATCH}, val-size >= 2")
    train(args.out, args.seed, args.epochs, args.train_size, args.val_size)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
