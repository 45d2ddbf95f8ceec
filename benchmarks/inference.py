"""CPU inference: the node's Predictor.analyse against bare Keras predict, fp32 and bf16."""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from _common import (
    BenchmarkError,
    Table,
    command_line,
    machine_info,
    median,
    run_main,
    say,
    write_results,
)
from _profile import Recorder, Sample, categories_table, top_lines_table, total

TARGET_RATIO = 0.9
POLICIES = ("float32", "mixed_bfloat16")


def with_policy(model: Any, policy: str) -> Any:
    """A copy of ``model`` whose layers compute under ``policy``, with the same weights.

    The global policy is set first (``keras.mixed_precision.set_global_policy``) so that
    sub-layers created at build time (the attention gates') follow it; every layer's saved
    policy is replaced except the model's last layer, which keeps float32 outputs as mixed
    precision requires.
    """
    import keras

    from pneumonode.nets.gates import AttentionGate

    keras.mixed_precision.set_global_policy(policy)
    config = model.get_config()
    last = model.layers[-1].name
    for layer in config["layers"]:
        if layer["class_name"] == "InputLayer" or layer["config"].get("name") == last:
            continue
        layer["config"]["dtype"] = {
            "module": "keras", "class_name": "DTypePolicy", "config": {"name": policy},
            "registered_name": None,
        }
    clone = keras.Model.from_config(config, custom_objects={"AttentionGate": AttentionGate})
    clone.set_weights(model.get_weights())
    keras.mixed_precision.set_global_policy("float32")
    return clone


def dice(a: Any, b: Any) -> float:
    """Dice of two boolean masks; two empty masks score 1."""
    import numpy as np

    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int(np.logical_and(a, b).sum()) / total


def analyse_rules() -> list[tuple[str, Callable[[Sample], bool]]]:
    """Where ``Predictor.analyse`` spends its time, most specific first."""
    return [
        ("model: predict_on_batch", lambda s: s.has("Predictor._run")),
        ("TTA: flip, concatenate, average", lambda s: s.has("Predictor.probabilities")),
        ("prepare: resize to the model input, normalise", lambda s: s.has("Predictor.prepare")),
        ("validate the input image (finite, range)", lambda s: s.has("_validate_image")),
        ("post: probability resized to the source", lambda s: s.has("resize_probability")),
        ("post: mask on the source grid", lambda s: s.has("mask_on_source")),
        ("post: triplet threshold at model size", lambda s: s.has("triplet")),
        ("analyse: other (stack, area, score)", lambda s: s.has("Predictor.analyse")),
    ]


def profile_analyse(predictor: Any, images: list[Any], spacing: tuple[float, float],
                    seconds: float, folder: Path) -> list[Table]:
    """py-spy on this process while ``analyse`` runs for ``seconds``; where its time goes."""
    rate = 200
    recorder = Recorder(os.getpid(), folder / "analyse.txt", rate=rate).start()
    calls = 0
    try:
        deadline = time.perf_counter() + seconds
        while time.perf_counter() < deadline:
            predictor.analyse(images, [spacing] * len(images))
            calls += 1
    finally:
        samples = recorder.stop()
    mine = [s for s in samples if s.has("Predictor.analyse")]
    table = categories_table(mine, analyse_rules(),
                             f"Profile: Predictor.analyse, float32, batch {len(images)}", rate,
                             calls * len(images), "image")
    table.note = (f"py-spy at {rate} Hz on this process: {total(mine)} samples over {calls} "
                  "calls. The model's share is the Python thread's time inside "
                  "predict_on_batch (TensorFlow's own threads do the work).")
    lines = top_lines_table([s for s in mine if not s.has("Predictor._run")],
                            "Profile: top lines by self time outside the model (same samples)",
                            rate, limit=10)
    return [table, lines]


def make_images(count: int, size: int, seed: int) -> list[Any]:
    """``count`` chest phantoms (half with a pneumothorax) of ``size`` px, float32 in [0, 1]."""
    from training.phantoms import make_dataset

    images, _ = make_dataset(count, size=size, seed=seed)
    return [image for image in images]


def variant_calls(
    predictor: Any, models: tuple[Any, ...], images: list[Any], spacing: tuple[float, float],
    prepared: Any, tta: Any,
) -> dict[str, Callable[[], object]]:
    """The four timed variants, each a call without arguments."""
    import keras

    def node() -> object:
        return predictor.analyse(images, [spacing] * len(images))

    def on_batch(x: Any) -> Callable[[], object]:
        return lambda: [keras.ops.convert_to_numpy(m.predict_on_batch(x)) for m in models]

    def predict() -> object:
        return [m.predict(tta, batch_size=len(tta), verbose=0) for m in models]

    return {
        "node analyse": node,
        "bare predict_on_batch (same tensors)": on_batch(tta),
        "bare predict (same tensors)": predict,
        "bare predict_on_batch, no TTA": on_batch(prepared),
    }


def _timed(call: Callable[[], object]) -> float:
    start = time.perf_counter()
    call()
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    """Run the inference benchmark; print the tables and write ``results/inference.md``."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", type=Path, help="model package (default: the bundled demo)")
    parser.add_argument("--size", type=int, default=1024, help="source image size (default 1024)")
    parser.add_argument("--batches", default="1,4",
                        help="comma-separated batch sizes (default 1,4; the node batches up to 4)")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (default 5)")
    parser.add_argument("--accuracy-images", type=int, default=8,
                        help="images compared between fp32 and bf16 (default 8)")
    parser.add_argument("--profile-seconds", type=float, default=8.0,
                        help="seconds of py-spy sampling of analyse, fp32 batch 1 (0: none)")
    parser.add_argument("--smoke", action="store_true", help="tiny run to check the script")
    args = parser.parse_args(argv)
    if args.smoke:
        args.size, args.batches, args.rounds, args.accuracy_images = 128, "1,2", 2, 2
        args.profile_seconds = 0.0
    batches = [int(b) for b in args.batches.split(",") if b.strip()]
    info = machine_info()
    say(f"inference: source {args.size} px, batches {batches}, {args.rounds} rounds, load "
        f"{info['load average at start (1, 5, 15 min)']}")

    import keras
    import numpy as np

    from pneumonode.inference.package import ModelPackage, ModelPackageError, load_package
    from pneumonode.inference.predictor import Predictor
    from pneumonode.settings import Settings

    try:
        package = load_package(args.model or Settings().model_path)
    except ModelPackageError as exc:
        raise BenchmarkError(f"{exc} (pass --model PATH to a model package)") from exc
    card = package.card
    members = {
        "float32": package.members,
        "mixed_bfloat16": tuple(with_policy(m, "mixed_bfloat16") for m in package.members),
    }
    predictors = {
        policy: Predictor(ModelPackage(package.path, card, models))
        for policy, models in members.items()
    }
    info["Keras backend"] = f"{keras.backend.backend()} (keras {keras.__version__})"

    images = make_images(max(max(batches), args.accuracy_images), args.size, seed=7)
    spacing = (0.2, 0.2)
    variants = ["node analyse", "bare predict_on_batch (same tensors)",
                "bare predict (same tensors)", "bare predict_on_batch, no TTA"]
    times: dict[tuple[str, int, str], list[float]] = {}
    for predictor in predictors.values():
        for b in batches:
            subset = images[:b]
            predictor.analyse(subset, [spacing] * b)  # warm-up: tracing, allocations
    for round_no in range(args.rounds):
        for policy, predictor in predictors.items():
            model_list = members[policy]
            for b in batches:
                subset = images[:b]
                prepared = np.stack([predictor.prepare(image) for image in subset])
                tta = np.concatenate([prepared, prepared[:, :, ::-1, :]]) if card.tta.hflip \
                    else prepared
                calls = variant_calls(predictor, model_list, subset, spacing, prepared, tta)
                shift = round_no % len(variants)
                for variant in variants[shift:] + variants[:shift]:
                    if round_no == 0:
                        calls[variant]()  # warm-up of this variant
                    times.setdefault((policy, b, variant), []).append(_timed(calls[variant]))
        say(f"  round {round_no + 1} done")

    table = Table(
        f"Inference on CPU: source {args.size}x{args.size}, model input {card.input.size} px, "
        f"TTA hflip {card.tta.hflip}, {len(card.members)} member(s); images/s (median of "
        f"{args.rounds})",
        ["policy", "batch", *variants, "node / bare (same tensors)", f">= {TARGET_RATIO:g}"],
    )
    for policy in POLICIES:
        for b in batches:
            rates = [b / median(times[(policy, b, v)]) for v in variants]
            ratio = rates[0] / rates[1]
            table.add(policy, b, *rates, ratio, "yes" if ratio >= TARGET_RATIO else "NO")
    table.note = (
        "node analyse: `Predictor.analyse` on decoded float images at source size (validation, "
        "resize to the model input, normalise, TTA, predict_on_batch, threshold, mask resized to "
        "the source). bare: `model.predict_on_batch` / `model.predict` on the tensors the "
        "predictor feeds the model (prepared, with the flipped copies when TTA is on), prepared "
        "outside the timing. Rates count source images. Rounds interleave every variant."
    )

    fp32, bf16 = predictors["float32"], predictors["mixed_bfloat16"]
    sample = images[: args.accuracy_images]
    prepared = np.stack([fp32.prepare(image) for image in sample])
    probs32, probs16 = fp32.probabilities(prepared), bf16.probabilities(prepared)
    found32 = fp32.analyse(sample, [spacing] * len(sample))
    found16 = bf16.analyse(sample, [spacing] * len(sample))
    dices = [dice(a.mask, b.mask) for a, b in zip(found32, found16, strict=True)]
    accuracy = Table(
        f"mixed_bfloat16 against float32 on {len(sample)} phantoms ({args.size} px)",
        ["max abs probability difference", "mean abs difference", "mask Dice (min)",
         "mask Dice (mean)", "same finding (present/absent)"],
    )
    accuracy.add(float(np.abs(probs32 - probs16).max()), float(np.abs(probs32 - probs16).mean()),
                 min(dices), float(np.mean(dices)),
                 f"{sum(a.present == b.present for a, b in zip(found32, found16, strict=True))}"
                 f"/{len(sample)}")
    accuracy.note = ("Probabilities at model resolution after TTA; masks on the source grid. "
                     "bf16 model: every layer's policy set to mixed_bfloat16 (output layer kept "
                     "float32), same weights.")
    sections = [table.markdown(), accuracy.markdown()]
    if args.profile_seconds > 0:
        sections += [t.markdown() for t in profile_analyse(
            fp32, images[:1], spacing, args.profile_seconds, Path(tempfile.mkdtemp()))]
    for block in sections:
        say()
        say(block)
    if args.smoke:
        say("\nsmoke run: results not written")
        return 0
    path = write_results("inference", "Inference (CPU)", command_line(), info, sections)
    say(f"\nwritten to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
