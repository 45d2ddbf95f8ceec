"""Build a prepared-data folder from SIIM DICOMs or a PNG repack plus ``train-rle.csv``."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pydicom
from numpy.typing import NDArray
from tqdm import tqdm

from pneumonode.dicom.pixels import decode as decode_pixels
from training.rle import RleFormat, decode_union, encode, is_positive, read_rle_csv
from training.store import (
    IMAGES,
    MASKS,
    Entry,
    prepare_folder,
    resize_image,
    resize_mask_uint8,
    stratified_split,
    write_manifest,
    write_png,
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Job:
    image_id: str
    path: Path
    out: Path
    size: int
    rles: tuple[str, ...]
    rle_format: RleFormat


def read_dicom_uint8(path: Path) -> tuple[str, NDArray[np.uint8]]:
    """Decode a radiograph the way the node does and return (SOP Instance UID, uint8 image).

    Parameters
    ----------
    path : pathlib.Path
        A DICOM file.

    Returns
    -------
    tuple
        The SOP Instance UID and the gray image (0 black, MONOCHROME1 inverted).
    """
    ds = pydicom.dcmread(path)
    return str(ds.SOPInstanceUID), decode_pixels(ds).to_uint8()


def read_png_uint8(path: Path) -> NDArray[np.uint8]:
    """Read a gray PNG (any bit depth) as uint8."""
    image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if image is None:
        raise FileNotFoundError(f"cannot read image {path}")
    if image.ndim == 3:
        image = cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)
    if image.dtype == np.uint16:
        image = (image.astype(np.float64) / 257.0).round().astype(np.uint8)
    return np.asarray(image, dtype=np.uint8)


def _process(job: _Job) -> tuple[str, int, int]:
    if job.path.suffix.lower() == ".dcm":
        uid, image = read_dicom_uint8(job.path)
        if uid != job.image_id:
            raise ValueError(f"file name must be the SOP Instance UID: {job.path.name} holds {uid}")
    else:
        image = read_png_uint8(job.path)
    height, width = image.shape
    mask = decode_union(job.rles, (height, width), job.rle_format)
    write_png(job.out / IMAGES / f"{job.image_id}.png", resize_image(image, job.size))
    write_png(job.out / MASKS / f"{job.image_id}.png", resize_mask_uint8(mask, job.size))
    return job.image_id, height, width


def find_images(folder: Path) -> dict[str, Path]:
    """Map image id (file stem) to path for every ``.dcm`` or ``.png`` under ``folder``.

    SIIM names each DICOM ``<SOPInstanceUID>.dcm`` (checked again when it is decoded); PNG
    repacks name each image ``<ImageId>.png``.
    """
    found: dict[str, Path] = {}
    for path in sorted(folder.rglob("*")):
        if path.suffix.lower() in (".dcm", ".png") and path.is_file():
            if path.stem in found:
                raise ValueError(f"image id {path.stem} appears twice: {found[path.stem]}, {path}")
            found[path.stem] = path
    return found


def _run(jobs: Sequence[_Job], workers: int) -> Iterator[tuple[str, int, int]]:
    if workers <= 1:
        yield from map(_process, jobs)
        return
    with ProcessPoolExecutor(max_workers=workers) as pool:
        yield from pool.map(_process, jobs, chunksize=16)


def prepare_siim(
    images: Path,
    rle_csv: Path,
    out: Path,
    *,
    size: int = 256,
    rle_format: RleFormat = RleFormat.RELATIVE,
    val_fraction: float = 0.3,
    seed: int = 42,
    workers: int | None = None,
    progress: bool = True,
) -> list[Entry]:
    """Cache SIIM images and masks at training size and split them 70/30, stratified.

    Parameters
    ----------
    images : pathlib.Path
        Folder searched recursively for ``<ImageId>.dcm`` or ``<ImageId>.png``.
    rle_csv : pathlib.Path
        The challenge's ``train-rle.csv``.
    out : pathlib.Path
        Prepared-data folder to write.
    size : int
        Training size, pixels.
    rle_format : RleFormat
        Convention of ``rle_csv``: stage 1 is relative, stage 2 absolute.
    val_fraction : float
        Share of each class (empty / not) kept for validation.
    seed : int
        Seed of the split.
    workers : int or None
        Decoding processes; None uses every core.
    progress : bool
        Show a progress bar.

    Returns
    -------
    list of Entry
        The prepared images.
    """
    rows = read_rle_csv(rle_csv)
    files = find_images(images)
    missing = [image_id for image_id in rows if image_id not in files]
    if missing:
        logger.warning(
            "%d images of %s have no file under %s, e.g. %s; they are left out",
            len(missing),
            rle_csv,
            images,
            missing[0],
        )
    ids = [image_id for image_id in rows if image_id in files]
    if not ids:
        raise ValueError(f"no image of {rle_csv} was found under {images}")
    positive = [is_positive(rows[i]) for i in ids]
    split = stratified_split(ids, positive, val_fraction, seed)
    prepare_folder(out)
    jobs = [_Job(i, files[i], out, size, tuple(rows[i]), rle_format) for i in ids]
    sizes: dict[str, tuple[int, int]] = {}
    n_workers = workers if workers is not None else (os.cpu_count() or 1)
    for image_id, height, width in tqdm(
        _run(jobs, n_workers), total=len(jobs), desc="prepare", unit="img", disable=not progress
    ):
        sizes[image_id] = (height, width)
    entries = [
        Entry(i, split[i], p, sizes[i][0], sizes[i][1]) for i, p in zip(ids, positive, strict=True)
    ]
    write_manifest(
        out,
        size=size,
        rle_format=rle_format,
        source=f"SIIM-ACR {images.name} + {rle_csv.name}",
        entries=entries,
        rles=rows,
        seed=seed,
        val_fraction=val_fraction,
    )
    return entries


def prepare_synthetic(
    out: Path,
    make: Callable[[np.random.Generator, int], tuple[NDArray[np.float32], NDArray[np.bool_]]],
    *,
    count: int,
    original_size: int,
    size: int,
    val_fraction: float = 0.3,
    seed: int = 0,
) -> list[Entry]:
    """Write a prepared-data folder of synthetic images with known masks.

    The images are made at ``original_size`` and cached at ``size``; their masks are kept as
    RLE at the original size so that scoring runs at the original resolution as for SIIM.

    Parameters
    ----------
    out : pathlib.Path
        Prepared-data folder to write.
    make : callable
        ``make(rng, size) -> (image float32 [0, 1], mask bool)``.
    count : int
        Number of images.
    original_size : int
        Size of the made images.
    size : int
        Training size.
    val_fraction : float
        Share of validation.
    seed : int
        Seed of the images and of the split.

    Returns
    -------
    list of Entry
        The prepared images.
    """
    prepare_folder(out)
    rows: dict[str, list[str]] = {}
    for index in range(count):
        rng = np.random.default_rng([seed, index])
        image, mask = make(rng, original_size)
        image_id = f"phantom-{seed}-{index:05d}"
        gray = np.rint(np.clip(image, 0.0, 1.0) * 255.0).astype(np.uint8)
        write_png(out / IMAGES / f"{image_id}.png", resize_image(gray, size))
        write_png(out / MASKS / f"{image_id}.png", resize_mask_uint8(mask, size))
        rows[image_id] = [encode(mask, RleFormat.RELATIVE)]
    ids = list(rows)
    positive = [is_positive(rows[i]) for i in ids]
    split = stratified_split(ids, positive, val_fraction, seed)
    entries = [
        Entry(i, split[i], p, original_size, original_size)
        for i, p in zip(ids, positive, strict=True)
    ]
    write_manifest(
        out,
        size=size,
        rle_format=RleFormat.RELATIVE,
        source=f"synthetic phantoms (seed {seed}, {count} images, {original_size} px)",
        entries=entries,
        rles=rows,
        seed=seed,
        val_fraction=val_fraction,
    )
    return entries
