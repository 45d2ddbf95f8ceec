"""The result of analysing one radiograph: a mask on the source pixel grid and the finding."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt


@dataclass(frozen=True)
class Finding:
    """What the model concluded about one image.

    Attributes
    ----------
    mask:
        Boolean array of shape (Rows, Columns) of the *source* image: True where pneumothorax.
    present:
        Whether the image is positive after post-processing (``mask.any()``).
    score:
        Image-level score in [0, 1]: the highest pixel probability after TTA and ensembling.
    area_mm2:
        Area of the mask in square millimetres, or None when the source carries no pixel spacing.
    """

    mask: npt.NDArray[np.bool_]
    present: bool
    score: float
    area_mm2: float | None

    def __post_init__(self) -> None:
        if self.mask.dtype != np.bool_ or self.mask.ndim != 2:
            raise ValueError(
                f"Finding.mask must be a 2-D boolean array, got {self.mask.dtype} {self.mask.shape}"
            )
        if self.present != bool(self.mask.any()):
            raise ValueError("Finding.present must equal mask.any()")
        if not 0.0 <= self.score <= 1.0:
            raise ValueError(f"Finding.score must lie in [0, 1], got {self.score}")
        if self.area_mm2 is not None and self.area_mm2 < 0:
            raise ValueError(f"Finding.area_mm2 must be >= 0, got {self.area_mm2}")

    @property
    def area_pixels(self) -> int:
        """Number of source pixels in the mask."""
        return int(self.mask.sum())
