"""The winners' recipe in miniature on CPU: 5 folds, two sizes, out-of-fold thresholds."""

from __future__ import annotations

import csv
import time
from collections import Counter
from pathlib import Path

import pytest

from pneumonode.inference.package import load_package
from training.__main__ import main
from training.crossval import fold_of, read_folds
from training.export import export_package
from training.recipes import load_recipe
from training.run import EvaluationRecord, RunInfo, load_run_recipe
from training.train import TOP_K

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def winner_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, float]:
    run_dir = tmp_path_factory.mktemp("runs") / "winner"
    start = time.monotonic()
    args = ["reproduce", "--recipe", "siim_winner_smoke", "--run-dir", str(run_dir), "--quiet"]
    assert main(args) == 0
    return run_dir, time.monotonic() - start


def test_folds_are_stratified_and_cover_every_image() -> None:
    ids = [f"i{k}" for k in range(53)]
    positive = [k % 3 == 0 for k in range(53)]
    folds = fold_of(ids, positive, 5, seed=1)
    assert set(folds) == set(ids)
    sizes = Counter(folds.values())
    assert max(sizes.values()) - min(sizes.values()) <= 2
    per_fold_pos = Counter(folds[i] for i, p in zip(ids, positive, strict=True) if p)
    assert max(per_fold_pos.values()) - min(per_fold_pos.values()) <= 1
    assert fold_of(list(reversed(ids)), list(reversed(positive)), 5, seed=1) == folds
    with pytest.raises(ValueError, match="folds >= 2"):
        fold_of(ids, positive, 1, seed=1)


def test_winner_smoke_trains_every_fold_and_beats_the_untrained_models(
    winner_run: tuple[Path, float],
) -> None:
    run_dir, seconds = winner_run
    info = RunInfo.load(run_dir)
    evaluation = EvaluationRecord.load(run_dir)
    assert evaluation is not None
    recipe = load_recipe("siim_winner_smoke")
    oof = evaluation.scores["challenge_dice"]
    print(
        f"\nsiim_winner_smoke: untrained validation Dice {info.untrained_val_dice:.4f} (mean of "
        f"folds), out-of-fold {evaluation.scores['challenge_dice_default']:.4f} at 0.5, "
        f"{oof:.4f} tuned; train + evaluate + export {seconds:.0f} s"
    )
    assert info.folds == 5
    assert info.members == [f"fold{k}.keras" for k in range(1, 6)]
    assert evaluation.out_of_fold and evaluation.choice == "folds"
    assert evaluation.images == recipe.data.count  # every image scored once, out of fold
    # An all-empty prediction scores about 0.5 (half of the phantoms are negative).
    assert oof > 0.6
    assert oof > info.untrained_val_dice + 0.3
    folds = read_folds(run_dir)
    sizes = Counter(folds.values())
    assert sorted(sizes) == [0, 1, 2, 3, 4] and sum(sizes.values()) == recipe.data.count
    assert max(sizes.values()) - min(sizes.values()) <= 2
    for k in range(1, 6):
        stage1 = RunInfo.load(run_dir / f"fold{k}" / "stage1")
        stage2 = RunInfo.load(run_dir / f"fold{k}" / "stage2")
        assert TOP_K in stage1.members and len(stage1.top_k_epochs) == 3
        assert stage2.init_from == str(run_dir / f"fold{k}" / "stage1" / TOP_K)
        assert load_run_recipe(run_dir / f"fold{k}" / "stage2").model.input_size == 96
        # Up-training improves on where the 64 px weights start at 96 px.
        assert stage2.best_val_dice is not None
        assert stage2.best_val_dice > stage2.untrained_val_dice
        with (run_dir / f"fold{k}" / "stage1" / "history.csv").open() as handle:
            assert len(list(csv.DictReader(handle))) == recipe.train.epochs


def test_fold_ensemble_is_one_package_with_out_of_fold_thresholds(
    winner_run: tuple[Path, float], tmp_path: Path
) -> None:
    run_dir, _ = winner_run
    evaluation = EvaluationRecord.load(run_dir)
    assert evaluation is not None
    package = load_package(run_dir / "export")
    assert len(package.members) == 5 and package.card.input.size == 96
    assert package.card.thresholds == evaluation.thresholds
    assert package.card.validation["challenge_dice"] == evaluation.scores["challenge_dice"]
    assert "5-fold cross-validation" in package.card.training.notes
    with pytest.raises(ValueError, match="out-of-fold"):
        export_package(run_dir, tmp_path / "one", members=["fold1.keras"])
