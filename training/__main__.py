"""Command line of the training package: ``python -m training <command>`` (``pneumonode-train``)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

from training.recipes import Recipe, load_recipe, recipe_names
from training.rle import RleFormat

logger = logging.getLogger("training")


def _new_run_dir(runs: Path, recipe: str) -> Path:
    return runs / f"{recipe}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"


def _cmd_prepare(args: argparse.Namespace) -> int:
    from training.prepare import prepare_siim

    entries = prepare_siim(
        args.images,
        args.rle,
        args.out,
        size=args.size,
        rle_format=RleFormat(args.rle_format),
        val_fraction=args.val_fraction,
        seed=args.seed,
        workers=args.workers,
    )
    for split in ("train", "val"):
        chosen = [e for e in entries if e.split == split]
        positive = sum(e.positive for e in chosen)
        print(
            f"{split}: {len(chosen)} images, {positive} with pneumothorax "
            f"({100 * positive / max(len(chosen), 1):.1f} %)"
        )
    print(f"prepared data: {args.out}")
    return 0


def _train(args: argparse.Namespace) -> Path:
    from training.train import train

    if args.resume is not None:
        run_dir = args.resume
        info = train(
            _run_recipe(run_dir),
            run_dir,
            data=args.data,
            distributed=args.data_parallel,
            verbose=0 if args.quiet else 2,
            mixed_precision=args.mixed_precision,
            resume=True,
        )
    else:
        if args.recipe is None:
            raise ValueError("train needs --recipe NAME (or --resume RUN)")
        recipe = load_recipe(args.recipe)
        run_dir = args.run_dir or _new_run_dir(args.runs, recipe.name)
        options = {
            "data": args.data,
            "encoder_weights": args.encoder_weights,
            "distributed": args.data_parallel,
            "verbose": 0 if args.quiet else 2,
            "mixed_precision": args.mixed_precision,
        }
        if recipe.cv is not None:
            from training.crossval import train_cv

            if args.init_from is not None:
                raise ValueError("--init-from does not apply to a cross-validation recipe")
            info = train_cv(recipe, run_dir, **options)
        else:
            info = train(recipe, run_dir, init_from=args.init_from, **options)
    print(
        f"run {run_dir}: {info.epochs} epochs in {info.seconds:.0f} s; validation challenge "
        f"Dice (one model, 0.5, no TTA) {info.untrained_val_dice:.4f} untrained -> "
        f"{_fmt(info.last_val_dice)} last epoch, {_fmt(info.best_val_dice)} best epoch"
        f"{'' if info.best_epoch is None else f' ({info.best_epoch})'}"
    )
    if info.encoder_weights is not None and info.encoder_weights.startswith("none"):
        print("warning: the ResNet34 encoder was trained from random weights", file=sys.stderr)
    return run_dir


def _run_recipe(run_dir: Path) -> Recipe:
    from training.run import load_run_recipe

    return load_run_recipe(run_dir)


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def _cmd_train(args: argparse.Namespace) -> int:
    _train(args)
    return 0


def _print_evaluation(run_dir: Path, data: Path | None, quiet: bool) -> None:
    from training.evaluate import evaluate_run

    record = evaluate_run(run_dir, data=data, progress=not quiet)
    t = record.thresholds
    where = "out-of-fold" if record.out_of_fold else "validation"
    for name, scores in record.candidates.items():
        print(
            f"  candidate {name}: tuned {scores['challenge_dice']:.4f}, "
            f"0.5 {scores['challenge_dice_default']:.4f}"
        )
    print(
        f"{run_dir.name}: ensemble '{record.choice}' ({', '.join(record.members)}) kept; "
        f"challenge Dice of the exported package on {record.images} {where} images: "
        f"{record.scores['challenge_dice_default']:.4f} at 0.5, "
        f"{record.scores['challenge_dice']:.4f} with top {t.top}, bottom {t.bottom}, "
        f"min_area {t.min_area}, min_component_area {t.min_component_area}"
    )
    print(f"table: {run_dir.parent / 'results.md'}")


def _cmd_evaluate(args: argparse.Namespace) -> int:
    _print_evaluation(args.run, args.data, args.quiet)
    return 0


def _cmd_reproduce(args: argparse.Namespace) -> int:
    from training.export import export_package

    run_dir = _train(args)
    _print_evaluation(run_dir, args.data if args.resume is None else None, args.quiet)
    out = export_package(run_dir, args.package or run_dir / "export", overwrite=True)
    print(f"model package: {out}")
    return 0


def _cmd_table(args: argparse.Namespace) -> int:
    from training.evaluate import write_results_table

    md_path, csv_path = write_results_table(args.runs)
    print(md_path.read_text(encoding="utf-8"))
    print(f"written: {md_path}, {csv_path}")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from pneumonode.inference.card import ModelCard
    from training.export import export_package

    out = export_package(
        args.run,
        args.out,
        members=args.members,
        name=args.name,
        version=args.version,
        overwrite=args.overwrite,
    )
    card = ModelCard.load(out)
    dice = card.validation.get("challenge_dice")
    print(
        f"model package: {out} ({', '.join(card.members)}); validation challenge Dice of this "
        f"package: {_fmt(dice)}"
    )
    return 0


def _cmd_submit(args: argparse.Namespace) -> int:
    from training.submit import write_submission

    count = write_submission(
        args.package,
        args.images,
        args.out,
        rle_format=RleFormat(args.rle_format),
        batch_size=args.batch_size,
        progress=not args.quiet,
    )
    print(f"{count} images -> {args.out}")
    return 0


def _cmd_plot(args: argparse.Namespace) -> int:
    from training.plots import plot_run
    from training.run import RunInfo

    info = RunInfo.load(args.run)
    for path in plot_run(args.run, info.recipe, info.snapshot_epochs, info.swa_start_epoch):
        print(path)
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    from training.bench import bench_epoch

    recipe = load_recipe(args.recipe)
    estimate = bench_epoch(recipe, args.steps, warmup=args.warmup, distributed=args.data_parallel)
    print(estimate.describe(recipe.train.epochs))
    if args.json:
        row = {
            "recipe": estimate.recipe,
            "backend": estimate.backend,
            "replicas": estimate.replicas,
            "train_step_s": estimate.train_step_s,
            "predict_step_s": estimate.predict_step_s,
            "epoch_s": estimate.epoch_s,
            "epochs": recipe.train.epochs,
            "total_h": estimate.total_s(recipe.train.epochs) / 3600,
        }
        print(json.dumps(row))
    return 0


def _cmd_bench_data(args: argparse.Namespace) -> int:
    from training.bench_data import bench_data

    result = bench_data(
        args.size, images=args.images, batches=args.batches, batch_size=args.batch_size,
        data=args.data, target=args.target, host_cores=args.host_cores,
    )
    print(result.describe())
    if args.json:
        print(json.dumps(result.as_dict()))
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pneumonode-train",
        description="Reproduce the paper's models on SIIM-ACR and export them for the node.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("prepare", help="cache SIIM images and masks at training size + split")
    p.add_argument("--images", type=Path, required=True, help="folder of .dcm or .png images")
    p.add_argument("--rle", type=Path, required=True, help="train-rle.csv")
    p.add_argument("--out", type=Path, required=True, help="prepared-data folder to write")
    p.add_argument("--size", type=int, default=256)
    p.add_argument(
        "--rle-format",
        choices=[f.value for f in RleFormat],
        default="relative",
        help="relative: stage 1; absolute: stage 2",
    )
    p.add_argument("--val-fraction", type=float, default=0.3)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--workers", type=int, default=None, help="decoding processes (all cores)")
    p.set_defaults(func=_cmd_prepare)

    for name, func, text in (
        ("train", _cmd_train, "train a recipe into a run folder"),
        ("reproduce", _cmd_reproduce, "train, evaluate and export a recipe in one go"),
    ):
        p = sub.add_parser(name, help=text)
        p.add_argument(
            "--recipe", default=None, help=f"one of {', '.join(recipe_names())} or a .toml path"
        )
        p.add_argument("--runs", type=Path, default=Path("runs"), help="parent of run folders")
        p.add_argument("--run-dir", type=Path, default=None, help="exact run folder")
        p.add_argument("--data", type=Path, default=None, help="prepared-data folder override")
        p.add_argument(
            "--encoder-weights",
            default=None,
            metavar="PATH|none",
            help=(
                "ResNet34 recipes: local ImageNet weights (resnet34_imagenet_1000_no_top.h5, "
                "as the paper), or 'none' to train the encoder from random weights on purpose "
                "(recorded in run.json and the model card); required for ResNet34"
            ),
        )
        p.add_argument(
            "--mixed-precision",
            choices=["bfloat16", "float16"],
            default=None,
            help="mixed-precision training (outputs and the exported package stay float32)",
        )
        p.add_argument(
            "--resume",
            type=Path,
            default=None,
            metavar="RUN",
            help="go on with an interrupted run from its last finished epoch",
        )
        p.add_argument(
            "--init-from",
            type=Path,
            default=None,
            metavar="RUN",
            help="start from another run's final weights (or a .keras file), e.g. to up-train",
        )
        p.add_argument(
            "--data-parallel", action="store_true", help="train data-parallel on every local GPU"
        )
        p.add_argument("--quiet", action="store_true", help="no per-epoch output")
        if name == "reproduce":
            p.add_argument(
                "--package",
                type=Path,
                default=None,
                help="where to write the model package (default <run>/export)",
            )
        p.set_defaults(func=func)

    p = sub.add_parser("evaluate", help="validation Dice, threshold search, results table")
    p.add_argument("run", type=Path)
    p.add_argument("--data", type=Path, default=None)
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_cmd_evaluate)

    p = sub.add_parser("table", help="results table of every evaluated run beside the paper")
    p.add_argument("--runs", type=Path, default=Path("runs"))
    p.set_defaults(func=_cmd_table)

    p = sub.add_parser("export", help="write a node model package from a run")
    p.add_argument("run", type=Path)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--members", nargs="+", default=None, help="subset of the run's model files")
    p.add_argument("--name", default=None)
    p.add_argument("--version", default=None)
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser("submit", help="challenge submission CSV for a folder of test images")
    p.add_argument("--package", type=Path, required=True)
    p.add_argument("--images", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument(
        "--rle-format",
        choices=[f.value for f in RleFormat],
        required=True,
        help=(
            "relative: run starts counted from the end of the previous run, as in the "
            "challenge's stage-1 train-rle.csv; absolute: 1-based run starts (Kaggle's "
            "standard run-length encoding), as in the stage-2 files and submissions"
        ),
    )
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_cmd_submit)

    p = sub.add_parser("plot", help="redraw a run's PNG plots")
    p.add_argument("run", type=Path)
    p.set_defaults(func=_cmd_plot)

    p = sub.add_parser("bench-epoch", help="time training steps, extrapolate epoch and run time")
    p.add_argument("--recipe", required=True)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--data-parallel", action="store_true")
    p.add_argument("--json", action="store_true", help="also print a JSON line")
    p.set_defaults(func=_cmd_bench)

    p = sub.add_parser(
        "bench-data", help="images/s of the training loader on one core, workers for a target"
    )
    p.add_argument("--size", type=int, default=256, help="training size, pixels")
    p.add_argument("--images", type=int, default=64, help="phantoms cached (without --data)")
    p.add_argument("--data", type=Path, default=None, help="prepared-data folder to read")
    p.add_argument("--batches", type=int, default=8, help="batches timed")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--target", type=float, default=1000.0, help="images/s the GPU needs")
    p.add_argument("--host-cores", type=int, default=16, help="cores of the GPU host")
    p.add_argument("--json", action="store_true", help="also print a JSON line")
    p.set_defaults(func=_cmd_bench_data)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status.

    Parameters
    ----------
    argv : sequence of str or None
        Arguments (default ``sys.argv[1:]``).

    Returns
    -------
    int
        0 on success, 1 on a handled error.
    """
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        status: int = args.func(args)
    except (OSError, ValueError, KeyError) as exc:
        logger.info("command failed", exc_info=True)
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return status


if __name__ == "__main__":
    sys.exit(main())
