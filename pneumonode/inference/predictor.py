"""Run a model package on radiographs: resize, normalise, predict, TTA, ensemble, threshold."""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import keras
import numpy as np
import numpy.typing as npt

from pneumonode.findings import Finding
from pneumonode.inference.card import ModelCard
from pneumonode.inference.package import ModelPackage, load_package
from pneumonode.inference.postprocess import (
    average_members,
    average_tta,
    mask_on_source,
    resize_probability,
    triplet,
)
from pneumonode.inference.preprocess import model_input

logger = logging.getLogger(__name__)

#: Source size of the synthetic image used by :meth:`Predictor.check` (rows, cols).
CHECK_IMAGE_SHAPE = (300, 217)


@dataclass(frozen=True)
class CheckReport:
    """What ``pneumonode model check`` reports.

    Attributes
    ----------
    package:
        The package folder.
    display_name:
        Model name and version (with "(DEMO)" for a demo model).
    backend:
        The Keras backend that ran the prediction.
    members:
        Number of ensemble members.
    source_shape:
        Shape of the synthetic image analysed.
    output_shape:
        Shape of one member's raw output for that image (batch, rows, cols, channels),
        TTA copies included.
    mask_shape:
        Shape of the resulting mask (equals ``source_shape``).
    warmup_seconds:
        Time of the first analysis (includes tracing/compilation).
    seconds:
        Time of a second, steady-state analysis.
    """

    package: Path
    display_name: str
    backend: str
    members: int
    source_shape: tuple[int, int]
    output_shape: tuple[int, ...]
    mask_shape: tuple[int, int]
    warmup_seconds: float
    seconds: float

    def __str__(self) -> str:
        """Human-readable report, one fact per line."""
        return "\n".join(
            [
                f"package:        {self.package}",
                f"model:          {self.display_name}",
                f"backend:        {self.backend}",
                f"members:        {self.members}",
                f"source shape:   {self.source_shape}",
                f"output shape:   {self.output_shape}",
                f"mask shape:     {self.mask_shape}",
                f"first call:     {self.warmup_seconds:.3f} s",
                f"steady call:    {self.seconds:.3f} s",
            ]
        )


def _validate_image(image: Any, index: int) -> npt.NDArray[np.float32]:
    if not isinstance(image, np.ndarray):
        raise TypeError(f"image {index} must be a numpy array, got {type(image).__name__}")
    if image.dtype != np.float32 or image.ndim != 2:
        raise ValueError(
            f"image {index} must be a 2-D float32 array, got {image.dtype} {image.shape}"
        )
    if min(image.shape) < 1:
        raise ValueError(f"image {index} is empty: shape {image.shape}")
    low, high = float(image.min()), float(image.max())  # a NaN or an infinity shows in these
    if not (math.isfinite(low) and math.isfinite(high)):
        raise ValueError(f"image {index} has non-finite pixel values")
    if low < 0.0 or high > 1.0:
        raise ValueError(f"image {index} pixel values must lie in [0, 1], got [{low}, {high}]")
    return image


def _validate_spacing(spacing: Any, index: int) -> tuple[float, float] | None:
    if spacing is None:
        return None
    if len(spacing) != 2:
        raise ValueError(f"pixel spacing {index} must be (row, column) mm, got {spacing!r}")
    row, col = float(spacing[0]), float(spacing[1])
    if not (math.isfinite(row) and math.isfinite(col) and row > 0 and col > 0):
        raise ValueError(f"pixel spacing {index} must be two positive mm values, got {spacing!r}")
    return row, col


class Predictor:
    """Analyse radiographs with a loaded model package; safe to share between threads.

    Parameters
    ----------
    package:
        A loaded model package (see :meth:`load`).

    Attributes
    ----------
    card:
        The package's model card.
    """

    card: ModelCard

    def __init__(self, package: ModelPackage) -> None:
        self.card = package.card
        self._package = package
        self._lock = threading.Lock()

    @classmethod
    def load(cls, package: Path) -> Predictor:
        """Load the model package at ``package``.

        Parameters
        ----------
        package:
            Model package folder.

        Returns
        -------
        Predictor

        Raises
        ------
        ModelPackageError
            If the package cannot be used.
        """
        return cls(load_package(Path(package)))

    def prepare(self, image: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        """Turn one display-sense image in [0, 1] into a model input ``(size, size, channels)``.

        :func:`pneumonode.inference.preprocess.model_input`, the function training uses: the
        image is resized to the square model input (``cv2.INTER_AREA`` when neither side is
        smaller, bilinear otherwise; the aspect ratio is not kept), normalised with the card's
        mean and std and repeated into the card's channels.

        Parameters
        ----------
        image:
            2-D float32 image, values in [0, 1], 0 black.

        Returns
        -------
        numpy.ndarray
            float32 array ``(size, size, channels)``.
        """
        return model_input(image, self.card.input)

    def _run(self, model: keras.Model, batch: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        with self._lock:
            output = model.predict_on_batch(batch)
        return np.asarray(keras.ops.convert_to_numpy(output), dtype=np.float32)

    def probabilities(self, batch: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        """Probabilities at model resolution for a prepared batch, after TTA and ensembling.

        Parameters
        ----------
        batch:
            ``(N, size, size, channels)`` from :meth:`prepare`.

        Returns
        -------
        numpy.ndarray
            float32 ``(N, size, size)``.
        """
        count = batch.shape[0]
        per_member = []
        for model in self._package.members:
            if self.card.tta.hflip:
                both = np.concatenate([batch, batch[:, :, ::-1, :]], axis=0)
                output = self._run(model, both)[..., 0]
                per_member.append(average_tta(output[:count], output[count:]))
            else:
                per_member.append(self._run(model, batch)[..., 0])
        return average_members(per_member)

    def analyse(
        self,
        images: Sequence[npt.NDArray[np.float32]],
        pixel_spacings: Sequence[tuple[float, float] | None],
    ) -> list[Finding]:
        """Analyse several radiographs as one batch.

        The triplet decision and component filtering are made on the probability map at model
        resolution (where the card's areas are defined); the mask is then drawn on the exact
        source grid from the bilinearly resized probabilities
        (see :func:`~pneumonode.inference.postprocess.mask_on_source`).

        Parameters
        ----------
        images:
            2-D float32 images in [0, 1], display sense (0 black), any size and aspect.
        pixel_spacings:
            One (row, column) spacing in mm per image, or None where unknown.

        Returns
        -------
        list of Finding
            One per image, in order; each mask has its image's shape.

        Raises
        ------
        ValueError
            If the lists differ in length, or an image or spacing breaks the rules above.
        TypeError
            If an image is not a numpy array.
        """
        if len(images) != len(pixel_spacings):
            raise ValueError(
                f"got {len(images)} images but {len(pixel_spacings)} pixel spacings"
            )
        if not images:
            return []
        checked = [_validate_image(image, i) for i, image in enumerate(images)]
        spacings = [_validate_spacing(s, i) for i, s in enumerate(pixel_spacings)]
        batch = np.stack([self.prepare(image) for image in checked])
        probs = self.probabilities(batch)
        thresholds = self.card.thresholds
        findings = []
        for image, spacing, prob in zip(checked, spacings, probs, strict=True):
            model_mask = triplet(prob, thresholds)
            source_prob = resize_probability(prob, (image.shape[0], image.shape[1]))
            mask = mask_on_source(source_prob, model_mask, thresholds)
            area = None if spacing is None else float(mask.sum()) * spacing[0] * spacing[1]
            score = float(np.clip(prob.max(), 0.0, 1.0))
            findings.append(
                Finding(mask=mask, present=bool(mask.any()), score=score, area_mm2=area)
            )
        return findings

    def check(self) -> CheckReport:
        """Analyse a synthetic image twice and report timings and shapes.

        Returns
        -------
        CheckReport
        """
        rows, cols = CHECK_IMAGE_SHAPE
        ramp = np.linspace(0.0, 1.0, cols, dtype=np.float32)[np.newaxis, :]
        image = np.ascontiguousarray(np.broadcast_to(ramp, (rows, cols)), dtype=np.float32)
        start = time.perf_counter()
        self.analyse([image], [(0.2, 0.2)])
        warmup = time.perf_counter() - start
        start = time.perf_counter()
        (finding,) = self.analyse([image], [(0.2, 0.2)])
        steady = time.perf_counter() - start
        batch = self.prepare(image)[np.newaxis]
        copies = 2 if self.card.tta.hflip else 1
        output = self._run(self._package.members[0], np.concatenate([batch] * copies))
        return CheckReport(
            package=self._package.path,
            display_name=self.card.display_name,
            backend=keras.backend.backend(),
            members=len(self._package.members),
            source_shape=(rows, cols),
            output_shape=tuple(int(n) for n in output.shape),
            mask_shape=(int(finding.mask.shape[0]), int(finding.mask.shape[1])),
            warmup_seconds=warmup,
            seconds=steady,
        )
