"""Write a challenge submission CSV (ImageId, EncodedPixels) for a folder of test images."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pydicom
from numpy.typing import NDArray
from tqdm import tqdm

from pneumonode.dicom.pixels import decode as decode_pixels
from pneumonode.inference.predictor import Predictor
from training.prepare import find_images, read_png_uint8
from training.rle import RleFormat, encode


def read_test_image(path: Path) -> tuple[str, NDArray[np.float32]]:
    """Image id and display-sense image in [0, 1] of a test ``.dcm`` (its SOP Instance UID)
    or ``.png`` (its file stem)."""
    if path.suffix.lower() == ".dcm":
        ds = pydicom.dcmread(path)
        return str(ds.SOPInstanceUID), decode_pixels(ds).image
    return path.stem, read_png_uint8(path).astype(np.float32) / 255.0


def write_submission(
    package: Path,
    images: Path,
    out: Path,
    *,
    rle_format: RleFormat,
    batch_size: int = 8,
    progress: bool = True,
) -> int:
    """Segment every test image with a model package and write the challenge CSV.

    The masks are the node's own (:meth:`Predictor.analyse`: the card's TTA, ensemble and
    thresholds) at each image's original size; an empty mask is written ``-1``.

    Parameters
    ----------
    package : pathlib.Path
        Model package folder (``export`` or ``evaluate`` writes one).
    images : pathlib.Path
        Folder searched recursively for ``.dcm`` or ``.png`` files.
    out : pathlib.Path
        CSV to write.
    rle_format : RleFormat
        No default, on purpose: the challenge's stage-1 ``train-rle.csv`` used relative starts
        (counted from the end of the previous run), its stage-2 files and submissions absolute,
        1-based starts (Kaggle's standard run-length encoding). See :class:`RleFormat`.
    batch_size : int
        Images per prediction batch.
    progress : bool
        Show a progress bar.

    Returns
    -------
    int
        Number of images written.
    """
    predictor = Predictor.load(package)
    files = list(find_images(images).values())
    if not files:
        raise ValueError(f"no .dcm or .png image under {images}")
    with out.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(["ImageId", "EncodedPixels"])
        bar = tqdm(total=len(files), desc="submit", unit="img", disable=not progress)
        for first in range(0, len(files), batch_size):
            loaded = [read_test_image(p) for p in files[first : first + batch_size]]
            findings = predictor.analyse([image for _, image in loaded], [None] * len(loaded))
            for (image_id, _), finding in zip(loaded, findings, strict=True):
                writer.writerow([image_id, encode(finding.mask, rle_format)])
            bar.update(len(loaded))
        bar.close()
    return len(files)
