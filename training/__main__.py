"""Command line of the training package: ``python -m training <command>`` (``pneumonode-train``)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

from training.recipes import load_recipe, recipe_names
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

    recipe = load_recipe(args.recipe)
    run_dir = args.run_dir or _new_run_dir(args.runs, recipe.name)
    info = train(
        recipe,
        run_dir,
        data=args.data,
        encoder_weights=args.encoder_weights,
        distributed=args.data_parallel,
        verbose=0 if args.quiet else 2,
    )
    print(
        f"run {run_dir}: {info.epochs} epochs in {info.seconds:.0f} s; validation challenge "
        f"Dice {info.untrained_val_dice:.4f} untrained -> {info.final_val_dice:.4f} final model"
    )
    return run_dir


def _cmd_train(args: argparse.Namespace) -> int:
    _train(args)
    return 0


def _print_evaluation(run_dir: Path, data: Path | None, quiet: bool) -> None:
    from training.evaluate import evaluate_run

    record = evaluate_run(run_dir, data=data, progress=not quiet)
    t = record.thresholds
    print(
        f"{run_dir.name}: challenge Dice on {record.images} validation images: "
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
    _print_evaluation(run_dir, args.data, args.quiet)
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
    from training.export import export_package

    out = export_package(
        args.run,
        args.out,
        members=args.members,
        name=args.name,
        version=args.version,
        overwrite=args.overwrite,
    )
    print(f"model package: {out}")
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
            "--recipe", required=True, help=f"one of {', '.join(recipe_names())} or a .toml path"
        )
        p.add_argument("--runs", type=Path, default=Path("runs"), help="parent of run folders")
        p.add_argument("--run-dir", type=Path, default=None, help="exact run folder")
        p.add_argument("--data", type=Path, default=None, help="prepared-data folder override")
        p.add_argument(
            "--encoder-weights",
            type=Path,
            default=None,
            help="local ResNet34 ImageNet weights (.h5)",
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
    p.add_argument("--rle-format", choices=[f.value for f in RleFormat], default="relative")
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
