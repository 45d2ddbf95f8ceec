"""RLE decoding/encoding against the challenge's own files (stage 1) and stage-2 round trips."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from training.rle import (
    RleFormat,
    decode,
    decode_union,
    encode,
    is_positive,
    read_rle_csv,
    write_rle_csv,
)

SIZE = (1024, 1024)


def _require(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"real test data absent: {path}")
    return path


def test_sample_rows_decode_to_the_reference_masks(shared_data: Path) -> None:
    sample = _require(shared_data / "siim-sample")
    rows = read_rle_csv(sample / "train-rle.csv")
    assert len(rows) == 10
    assert sum(is_positive(r) for r in rows.values()) == 5
    for image_id, rles in rows.items():
        reference = cv2.imread(str(sample / "masks" / f"{image_id}.png"), cv2.IMREAD_GRAYSCALE)
        assert reference is not None, image_id
        decoded = decode_union(rles, SIZE, RleFormat.RELATIVE)
        assert np.array_equal(decoded, reference > 127), image_id


def test_every_row_of_the_full_csv_encodes_back_to_itself(shared_data: Path) -> None:
    rows = read_rle_csv(_require(shared_data / "siim-train-rle-full.csv"))
    all_rows = [(i, rle) for i, rles in rows.items() for rle in rles]
    assert len(all_rows) == 12954
    assert len(rows) == 12047
    assert sum(is_positive(r) for r in rows.values()) == 2669
    mismatches = [
        image_id
        for image_id, rle in all_rows
        if encode(decode(rle, SIZE, RleFormat.RELATIVE), RleFormat.RELATIVE) != rle
    ]
    assert mismatches == []


def test_relative_starts_count_from_the_end_of_the_previous_run() -> None:
    # 4x3 image (height 4, width 3); column-major pixel numbers 0..11.
    mask = decode("1 2 3 1", (4, 3), RleFormat.RELATIVE)
    expected_flat = np.zeros(12, bool)
    expected_flat[[1, 2, 6]] = True
    assert np.array_equal(mask, expected_flat.reshape(3, 4).T)
    assert mask[1, 0] and mask[2, 0] and mask[2, 1]


def test_absolute_starts_are_one_based_and_round_trip() -> None:
    mask = decode("2 2 7 1", (4, 3), RleFormat.ABSOLUTE)
    assert np.array_equal(mask, decode("1 2 3 1", (4, 3), RleFormat.RELATIVE))
    rng = np.random.default_rng(3)
    for _ in range(20):
        blob = rng.random((37, 23)) > 0.7
        text = encode(blob, RleFormat.ABSOLUTE)
        assert np.array_equal(decode(text, blob.shape, RleFormat.ABSOLUTE), blob)
        relative = encode(blob, RleFormat.RELATIVE)
        assert np.array_equal(decode(relative, blob.shape, RleFormat.RELATIVE), blob)


def test_runs_touching_both_ends_and_empty_masks() -> None:
    full = np.ones((8, 8), bool)
    assert encode(full, RleFormat.RELATIVE) == "0 64"
    assert encode(full, RleFormat.ABSOLUTE) == "1 64"
    assert encode(np.zeros((8, 8), bool), RleFormat.RELATIVE) == "-1"
    assert not decode("-1", (8, 8), RleFormat.ABSOLUTE).any()
    odd = np.zeros((5, 3), np.uint8)
    odd[4, 2] = 7
    assert encode(odd, RleFormat.ABSOLUTE) == "15 1"


def test_union_of_several_rows() -> None:
    a = np.zeros((16, 16), bool)
    b = np.zeros((16, 16), bool)
    a[2:5, 2:5] = True
    b[4:9, 4:6] = True
    rows = [encode(a, RleFormat.RELATIVE), encode(b, RleFormat.RELATIVE), "-1"]
    assert np.array_equal(decode_union(rows, (16, 16), RleFormat.RELATIVE), a | b)


def test_malformed_rle_is_refused() -> None:
    with pytest.raises(ValueError, match="pairs"):
        decode("1 2 3", (4, 4), RleFormat.RELATIVE)
    with pytest.raises(ValueError, match="beyond the image"):
        decode("10 10", (4, 4), RleFormat.RELATIVE)
    with pytest.raises(ValueError, match="1-based"):
        decode("0 2", (4, 4), RleFormat.ABSOLUTE)
    with pytest.raises(ValueError, match="integers"):
        decode("a b", (4, 4), RleFormat.RELATIVE)


def test_csv_header_with_leading_space_and_write_back(tmp_path: Path) -> None:
    src = tmp_path / "in.csv"
    src.write_text("ImageId, EncodedPixels\nA, 1 2\nB,-1\nA,5 1\n", encoding="utf-8")
    rows = read_rle_csv(src)
    assert rows == {"A": ["1 2", "5 1"], "B": ["-1"]}
    out = tmp_path / "out.csv"
    write_rle_csv(out, rows)
    assert read_rle_csv(out) == rows
    bad = tmp_path / "bad.csv"
    bad.write_text("Id,Pixels\nA,1 2\n", encoding="utf-8")
    with pytest.raises(ValueError, match="header"):
        read_rle_csv(bad)
