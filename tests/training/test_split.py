"""The stratified 70/30 split keeps the share of pneumothorax images in both parts."""

from __future__ import annotations

from pathlib import Path

import pytest

from training.rle import is_positive, read_rle_csv
from training.store import stratified_split


def test_split_of_the_full_csv_keeps_the_positive_share(shared_data: Path) -> None:
    path = shared_data / "siim-train-rle-full.csv"
    if not path.is_file():
        pytest.skip(f"real test data absent: {path}")
    rows = read_rle_csv(path)
    ids = list(rows)
    positive = [is_positive(rows[i]) for i in ids]
    split = stratified_split(ids, positive, 0.3, seed=42)
    whole = sum(positive) / len(ids)
    assert round(100 * whole, 1) == 22.2
    label = dict(zip(ids, positive, strict=True))
    for part, expected in (("train", 0.7), ("val", 0.3)):
        members = [i for i in ids if split[i] == part]
        share = sum(label[i] for i in members) / len(members)
        print(f"{part}: {len(members)} images, {100 * share:.2f} % positive")
        assert abs(share - whole) < 0.01
        assert abs(len(members) / len(ids) - expected) < 0.001
    assert split == stratified_split(list(reversed(ids)), list(reversed(positive)), 0.3, seed=42)
    assert split != stratified_split(ids, positive, 0.3, seed=43)


def test_split_refuses_bad_input() -> None:
    with pytest.raises(ValueError, match="val_fraction"):
        stratified_split(["a"], [True], 1.0, 0)
    with pytest.raises(ValueError, match="unique"):
        stratified_split(["a", "a"], [True, False], 0.5, 0)
