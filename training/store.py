"""The prepared-data folder: images and masks at training size, the split, and the original RLE."""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from numpy.typing import NDArray

from pneumonode.inference.preprocess import resize_square
from training.rle import RleFormat, decode_union, read_rle_csv, write_rle_csv

MANIFEST = "manifest.json"
SPLIT = "split.csv"
RLE = "rle.csv"
IMAGES = "images"
MASKS = "masks"
SPLITS = ("train", "val")
CACHE_IMAGES = "images.u8.npy"
CACHE_MASKS = "masks.u8.npy"


class PixelCache:
    """Every image and mask of a prepared folder in two uint8 memory-mapped ``.npy`` files.

    ``images.u8.npy`` and ``masks.u8.npy`` (``(N, size, size)``, masks in {0, 1}) follow the
    order of ``split.csv``. They are written once from the PNGs (:meth:`build`) and then read
    without decoding; the memory map is reopened in each loader process, never pickled.

    Parameters
    ----------
    root : pathlib.Path
        The prepared-data folder.
    ids : sequence of str
        Image ids in file order.
    """

    def __init__(self, root: Path, ids: Sequence[str]) -> None:
        self.root = root
        self.rows = {image_id: row for row, image_id in enumerate(ids)}
        self._arrays: tuple[NDArray[np.uint8], NDArray[np.uint8]] | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {"root": self.root, "rows": self.rows, "_arrays": None}

    @property
    def ready(self) -> bool:
        """Both files exist."""
        return (self.root / CACHE_IMAGES).is_file() and (self.root / CACHE_MASKS).is_file()

    def build(self, size: int) -> None:
        """Write the two files from the PNGs (atomically: a partial file is never used)."""
        ids = sorted(self.rows, key=self.rows.__getitem__)
        for name, folder, binary in ((CACHE_IMAGES, IMAGES, False), (CACHE_MASKS, MASKS, True)):
            partial = self.root / f".{name}.partial"
            out = np.lib.format.open_memmap(
                partial, mode="w+", dtype=np.uint8, shape=(len(ids), size, size)
            )
            for row, image_id in enumerate(ids):
                pixels = _read_png(self.root / folder / f"{image_id}.png")
                if pixels.shape != (size, size):
                    raise ValueError(
                        f"{folder}/{image_id}.png is {pixels.shape}, the folder's size is {size}"
                    )
                out[row] = (pixels > 127) if binary else pixels
            out.flush()
            del out
            os.replace(partial, self.root / name)

    def arrays(self) -> tuple[NDArray[np.uint8], NDArray[np.uint8]]:
        """The memory-mapped images and masks (opened read-only on first use)."""
        if self._arrays is None:
            images = np.load(self.root / CACHE_IMAGES, mmap_mode="r")
            masks = np.load(self.root / CACHE_MASKS, mmap_mode="r")
            self._arrays = (images, masks)
        return self._arrays

    def image(self, image_id: str) -> NDArray[np.uint8]:
        """One cached image (a copy)."""
        return np.array(self.arrays()[0][self.rows[image_id]])

    def mask(self, image_id: str) -> NDArray[np.uint8]:
        """One cached mask in {0, 1} (a copy)."""
        return np.array(self.arrays()[1][self.rows[image_id]])


@dataclass(frozen=True)
class Entry:
    """One prepared image: its id, split, whether it shows pneumothorax, original size."""

    image_id: str
    split: str
    positive: bool
    height: int
    width: int

    def __post_init__(self) -> None:
        if self.split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {self.split!r} ({self.image_id})")
        if self.height < 1 or self.width < 1:
            raise ValueError(f"original size must be positive, got {self.height}x{self.width}")


def stratified_split(
    image_ids: Sequence[str], positive: Sequence[bool], val_fraction: float, seed: int
) -> dict[str, str]:
    """Assign each image to ``train`` or ``val``, keeping the share of positives in both.

    Within each class (empty, not empty) the ids are sorted, shuffled with ``seed`` and the
    first ``round(val_fraction * n)`` go to validation, so the result does not depend on the
    order of the input.

    Parameters
    ----------
    image_ids : sequence of str
        Unique image ids.
    positive : sequence of bool
        Whether each image has pneumothorax.
    val_fraction : float
        Share of each class put in validation, in (0, 1).
    seed : int
        Seed of the shuffle.

    Returns
    -------
    dict
        ``{image_id: "train" | "val"}``.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    if len(image_ids) != len(positive):
        raise ValueError(f"{len(image_ids)} ids but {len(positive)} labels")
    if len(set(image_ids)) != len(image_ids):
        raise ValueError("image ids must be unique for a split")
    rng = np.random.default_rng(seed)
    out: dict[str, str] = {}
    for label in (False, True):
        members = sorted(i for i, p in zip(image_ids, positive, strict=True) if p is label)
        order = rng.permutation(len(members))
        n_val = round(val_fraction * len(members))
        for rank, index in enumerate(order):
            out[members[index]] = "val" if rank < n_val else "train"
    return out


@dataclass(frozen=True)
class PreparedData:
    """A prepared-data folder opened for reading (see :func:`write_manifest` for the layout)."""

    root: Path
    size: int
    rle_format: RleFormat
    source: str
    entries: tuple[Entry, ...]
    rles: Mapping[str, Sequence[str]]
    _masks: dict[str, NDArray[np.uint8] | None] = field(
        default_factory=dict, repr=False, compare=False
    )

    @cached_property
    def pixels(self) -> PixelCache:
        """The uint8 memory-mapped cache, built from the PNGs the first time it is needed."""
        cache = PixelCache(self.root, [e.image_id for e in self.entries])
        if not cache.ready:
            cache.build(self.size)
        return cache

    @classmethod
    def open(cls, root: Path) -> PreparedData:
        """Open and validate a folder written by ``prepare``.

        Parameters
        ----------
        root : pathlib.Path
            The folder.

        Returns
        -------
        PreparedData
            The index; images are read on demand.
        """
        manifest_path = root / MANIFEST
        if not manifest_path.is_file():
            raise FileNotFoundError(f"{root} is not prepared data: {MANIFEST} is missing")
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        entries = []
        with (root / SPLIT).open(newline="", encoding="utf-8") as handle:
            for row in csv.DictReader(handle):
                entries.append(
                    Entry(
                        image_id=row["image_id"],
                        split=row["split"],
                        positive=row["positive"] == "1",
                        height=int(row["height"]),
                        width=int(row["width"]),
                    )
                )
        rles = read_rle_csv(root / RLE)
        missing = [e.image_id for e in entries if e.image_id not in rles]
        if missing:
            raise ValueError(f"{root}: {len(missing)} images have no RLE row, e.g. {missing[0]}")
        return cls(
            root=root,
            size=int(manifest["size"]),
            rle_format=RleFormat(manifest["rle_format"]),
            source=str(manifest["source"]),
            entries=tuple(entries),
            rles=rles,
        )

    def ids(self, split: str) -> list[str]:
        """Image ids of one split, in file order."""
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        return [e.image_id for e in self.entries if e.split == split]

    def entry(self, image_id: str) -> Entry:
        """The entry of one image."""
        for e in self.entries:
            if e.image_id == image_id:
                return e
        raise KeyError(f"image {image_id} is not in {self.root}")

    def load_image(self, image_id: str) -> NDArray[np.uint8]:
        """The image at training size, uint8 ``(size, size)`` (from the memory-mapped cache)."""
        return self.pixels.image(image_id)

    def load_mask(self, image_id: str) -> NDArray[np.uint8]:
        """The mask at training size, uint8 in {0, 1} (from the memory-mapped cache)."""
        return self.pixels.mask(image_id)

    def original_masks(self, image_ids: Sequence[str]) -> list[NDArray[np.bool_]]:
        """Ground truth at the original resolution, decoded from the RLE rows.

        Each mask is decoded once per opened folder and kept bit-packed (empty masks as
        nothing), so scoring at 1024 px every epoch does not decode the RLE again: about
        128 kB per positive image.
        """
        shapes = {e.image_id: (e.height, e.width) for e in self.entries}
        out = []
        for image_id in image_ids:
            shape = shapes[image_id]
            if image_id not in self._masks:
                mask = decode_union(self.rles[image_id], shape, self.rle_format)
                self._masks[image_id] = np.packbits(mask) if mask.any() else None
            packed = self._masks[image_id]
            if packed is None:
                out.append(np.zeros(shape, dtype=bool))
            else:
                flat = np.unpackbits(packed, count=shape[0] * shape[1])
                out.append(flat.reshape(shape).astype(bool))
        return out


def _read_png(path: Path) -> NDArray[np.uint8]:
    image = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    if image is None:
        raise FileNotFoundError(f"cannot read image {path}")
    return np.asarray(image, dtype=np.uint8)


def write_png(path: Path, image: NDArray[np.uint8]) -> None:
    """Write a gray uint8 PNG, failing loudly."""
    if not cv2.imwrite(str(path), np.ascontiguousarray(image)):
        raise OSError(f"cannot write {path}")


def resize_image(image: NDArray[np.uint8], size: int) -> NDArray[np.uint8]:
    """Resize a gray image to ``size`` x ``size`` with the node's rule
    (:func:`pneumonode.inference.preprocess.resize_square`)."""
    return resize_square(image, size)


def resize_mask_uint8(mask: NDArray[np.bool_], size: int) -> NDArray[np.uint8]:
    """Resize a boolean mask to training size: area average, then cut at one half; 0/255."""
    source = np.ascontiguousarray(mask, dtype=np.float32)
    if source.shape != (size, size):
        source = np.asarray(
            cv2.resize(source, (size, size), interpolation=cv2.INTER_AREA), dtype=np.float32
        )
    return ((source >= 0.5) * 255).astype(np.uint8)


def prepare_folder(root: Path) -> None:
    """Create the image and mask folders of a new prepared-data folder."""
    (root / IMAGES).mkdir(parents=True, exist_ok=True)
    (root / MASKS).mkdir(parents=True, exist_ok=True)


def write_manifest(
    root: Path,
    *,
    size: int,
    rle_format: RleFormat,
    source: str,
    entries: Sequence[Entry],
    rles: Mapping[str, Sequence[str]],
    seed: int,
    val_fraction: float,
) -> None:
    """Write the index of a prepared-data folder.

    Layout: ``manifest.json`` (size, RLE format, source, seed, share of validation),
    ``split.csv`` (image_id, split, positive, height, width), ``rle.csv`` (the original rows),
    ``images/<id>.png`` and ``masks/<id>.png`` (uint8, training size; masks 0/255).

    Parameters
    ----------
    root : pathlib.Path
        The folder (images and masks already written).
    size : int
        Training size, pixels.
    rle_format : RleFormat
        Convention of ``rle.csv``.
    source : str
        Where the data came from (for the model card).
    entries : sequence of Entry
        Every image.
    rles : mapping
        Original RLE rows per image.
    seed : int
        Seed of the split.
    val_fraction : float
        Share of validation.
    """
    manifest = {
        "size": size,
        "rle_format": rle_format.value,
        "source": source,
        "seed": seed,
        "val_fraction": val_fraction,
        "images": len(entries),
        "positive": sum(e.positive for e in entries),
    }
    (root / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    with (root / SPLIT).open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(["image_id", "split", "positive", "height", "width"])
        for e in entries:
            writer.writerow([e.image_id, e.split, int(e.positive), e.height, e.width])
    write_rle_csv(root / RLE, {e.image_id: list(rles[e.image_id]) for e in entries})
