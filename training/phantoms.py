"""Deterministic synthetic chest radiograph phantoms with known pneumothorax masks.

A phantom is drawn in display sense (0 black, 1 white) on a square grid: black air around a
gray body, two dark lungs carrying bright branching "lung markings" (vessels radiating from
the hilum), a bright mediastinum, spine and heart, curved bright ribs over the lungs, blur and
noise. A positive phantom has a pneumothorax: the lung collapses towards its hilum (a scaled
copy of the lung about a medial-inferior point), leaving a crescent along the lateral and
apical edge that is darker than lung and has no lung markings, bounded by a thin bright
visceral pleural line. Ribs still cross it, as on a real film. The mask is that crescent.

Everything depends only on the ``numpy.random.Generator`` passed in, so a seed fixes a
data set exactly. Used by the demo model (``training.demo``) and by training smoke tests.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
import numpy.typing as npt

Image = npt.NDArray[np.float32]
Mask = npt.NDArray[np.bool_]

_AIR = 0.04
_SOFT_TISSUE = 0.42
_LUNG = 0.2
_PNEUMOTHORAX = 0.09
_MEDIASTINUM = 0.72
_MIN_SIZE = 32


@dataclass(frozen=True)
class _Ellipse:
    cx: float
    cy: float
    ax: float
    ay: float

    def mask(self, size: int) -> Mask:
        canvas = np.zeros((size, size), dtype=np.uint8)
        cv2.ellipse(
            canvas,
            (round(self.cx * size), round(self.cy * size)),
            (max(1, round(self.ax * size)), max(1, round(self.ay * size))),
            0.0, 0.0, 360.0, 1, -1,
        )
        return canvas.astype(np.bool_)

    def outline(self, size: int, thickness: int) -> Mask:
        canvas = np.zeros((size, size), dtype=np.uint8)
        cv2.ellipse(
            canvas,
            (round(self.cx * size), round(self.cy * size)),
            (max(1, round(self.ax * size)), max(1, round(self.ay * size))),
            0.0, 0.0, 360.0, 1, thickness,
        )
        return canvas.astype(np.bool_)

    def scaled_towards(self, px: float, py: float, factor: float) -> _Ellipse:
        return _Ellipse(
            px + factor * (self.cx - px),
            py + factor * (self.cy - py),
            self.ax * factor,
            self.ay * factor,
        )


def _vessels(
    rng: np.random.Generator, size: int, hilum: tuple[float, float], lateral: float
) -> Image:
    """Bright branching lines radiating from the hilum towards the lateral side (+1 right)."""
    canvas = np.zeros((size, size), dtype=np.float32)
    thickness = max(1, round(size / 128))
    heading = 0.0 if lateral > 0 else np.pi
    for _ in range(int(rng.integers(14, 22))):
        angle = heading + rng.uniform(-1.4, 1.4)
        step = rng.uniform(0.12, 0.34) / 3
        x0, y0 = hilum
        for _segment in range(3):
            angle += rng.normal(0.0, 0.25)
            x1, y1 = x0 + np.cos(angle) * step, y0 + np.sin(angle) * step
            start = (round(x0 * size), round(y0 * size))
            end = (round(x1 * size), round(y1 * size))
            cv2.line(canvas, start, end, float(rng.uniform(0.5, 1.0)), thickness)
            if rng.random() < 0.4:
                branch = angle + float(rng.choice([-0.6, 0.6]))
                tip = (
                    round((x1 + np.cos(branch) * step * 0.8) * size),
                    round((y1 + np.sin(branch) * step * 0.8) * size),
                )
                cv2.line(canvas, end, tip, float(rng.uniform(0.3, 0.7)), 1)
            x0, y0 = x1, y1
    return canvas


def _ribs(rng: np.random.Generator, size: int) -> Image:
    """Curved bright bands across both hemithoraces."""
    canvas = np.zeros((size, size), dtype=np.float32)
    thickness = max(1, round(size * rng.uniform(0.012, 0.02)))
    start = rng.uniform(0.14, 0.2)
    spacing = rng.uniform(0.07, 0.085)
    xs = np.linspace(0.0, 1.0, 64)
    for index in range(9):
        y0 = start + index * spacing
        for side in (-1.0, 1.0):
            centre = 0.5 + side * 0.02
            span = (xs - centre) * side
            visible = span > 0
            curve = y0 - 0.3 * span + 1.1 * span**2
            points = np.stack([xs[visible] * size, curve[visible] * size], axis=1)
            cv2.polylines(
                canvas, [np.round(points).astype(np.int32)], False, 1.0, thickness
            )
    return canvas


def make_phantom(
    rng: np.random.Generator, size: int = 256, positive: bool | None = None
) -> tuple[Image, Mask]:
    """Draw one chest phantom.

    Parameters
    ----------
    rng:
        Source of all randomness.
    size:
        Height and width in pixels (>= 32).
    positive:
        Whether to draw a pneumothorax; ``None`` tosses a fair coin with ``rng``.

    Returns
    -------
    (image, mask)
        ``image``: float32 ``(size, size)`` in [0, 1], display sense; ``mask``: bool
        ``(size, size)``, True on the pneumothorax (all False for a negative phantom).

    Raises
    ------
    ValueError
        If ``size`` is below 32.
    """
    if size < _MIN_SIZE:
        raise ValueError(f"phantom size must be >= {_MIN_SIZE}, got {size}")
    if positive is None:
        positive = bool(rng.random() < 0.5)

    body = _Ellipse(
        0.5 + rng.normal(0, 0.01), 0.56 + rng.normal(0, 0.01),
        rng.uniform(0.42, 0.49), rng.uniform(0.5, 0.56),
    )
    image = np.full((size, size), _AIR, dtype=np.float32)
    image[body.mask(size)] = _SOFT_TISSUE + rng.normal(0, 0.02)

    lungs = []
    for side in (-1.0, 1.0):
        lungs.append(
            _Ellipse(
                0.5 + side * rng.uniform(0.18, 0.22),
                rng.uniform(0.44, 0.49),
                rng.uniform(0.12, 0.16),
                rng.uniform(0.26, 0.31),
            )
        )

    ptx_side = int(rng.integers(0, 2))
    crescent = np.zeros((size, size), dtype=np.bool_)
    pleural_line = np.zeros((size, size), dtype=np.bool_)
    collapsed: _Ellipse | None = None
    if positive:
        lung = lungs[ptx_side]
        medial = 1.0 if lung.cx < 0.5 else -1.0
        anchor_x = lung.cx + medial * 0.7 * lung.ax
        anchor_y = lung.cy + 0.5 * lung.ay
        collapsed = lung.scaled_towards(anchor_x, anchor_y, float(rng.uniform(0.68, 0.9)))
        crescent = lung.mask(size) & ~collapsed.mask(size)
        pleural_line = collapsed.outline(size, max(1, round(size / 256))) & lung.mask(size)

    for index, lung in enumerate(lungs):
        region = lung.mask(size)
        yy = np.linspace(0.0, 1.0, size, dtype=np.float32)[:, np.newaxis]
        shading = np.float32(0.06) * (yy - np.float32(lung.cy)) / np.float32(lung.ay)
        image[region] = (_LUNG + shading + np.zeros_like(image))[region]
        lateral = -1.0 if lung.cx < 0.5 else 1.0
        hilum = (lung.cx - lateral * 0.6 * lung.ax, lung.cy + 0.1 * lung.ay)
        markings = cv2.GaussianBlur(_vessels(rng, size, hilum, lateral), (0, 0), size / 300)
        texture = cv2.GaussianBlur(
            rng.normal(0.0, 1.0, (size, size)).astype(np.float32), (0, 0), size / 120
        )
        tissue = region.copy()
        if positive and index == ptx_side:
            tissue &= ~crescent
            image[tissue] += 0.025
        image[tissue] += (0.14 * markings + 0.04 * texture)[tissue]
        if positive and index == ptx_side:
            image[crescent] = _PNEUMOTHORAX + rng.normal(0, 0.01)
            image[pleural_line] += 0.12

    mediastinum = np.zeros((size, size), dtype=np.bool_)
    top = round(size * rng.uniform(0.12, 0.18))
    half_width = round(size * rng.uniform(0.05, 0.07))
    centre = round(size * body.cx)
    mediastinum[top : round(size * 0.95), centre - half_width : centre + half_width] = True
    heart = _Ellipse(
        0.5 + rng.uniform(0.03, 0.07), rng.uniform(0.64, 0.7),
        rng.uniform(0.12, 0.16), rng.uniform(0.1, 0.13),
    ).mask(size)
    dense = (mediastinum | heart) & body.mask(size)
    image[dense] = _MEDIASTINUM + rng.normal(0, 0.02)
    spine = np.zeros((size, size), dtype=np.bool_)
    spine_half = max(1, round(size * 0.025))
    spine[top:, centre - spine_half : centre + spine_half] = True
    image[spine & body.mask(size)] += 0.08

    ribs = cv2.GaussianBlur(_ribs(rng, size), (0, 0), size / 250)
    image += (0.11 * ribs) * body.mask(size)

    image = np.asarray(cv2.GaussianBlur(image, (0, 0), size / 350), dtype=np.float32)
    image += rng.normal(0.0, 0.015, (size, size)).astype(np.float32)
    gain = rng.uniform(0.85, 1.15)
    offset = rng.uniform(-0.05, 0.05)
    image = np.clip(image * gain + offset, 0.0, 1.0).astype(np.float32)

    mask = crescent & ~dense
    return image, mask


def make_blank(rng: np.random.Generator, size: int = 256) -> tuple[Image, Mask]:
    """Draw an image that is not a chest (a flat gray level, a soft gradient, noise).

    Such images, empty-masked, teach a model that darkness alone is not a pneumothorax: the
    crescent's darkness is abnormal only next to lung with markings.

    Parameters
    ----------
    rng:
        Source of all randomness.
    size:
        Height and width in pixels (>= 32).

    Returns
    -------
    (image, mask)
        float32 ``(size, size)`` in [0, 1] and an all-False mask.

    Raises
    ------
    ValueError
        If ``size`` is below 32.
    """
    if size < _MIN_SIZE:
        raise ValueError(f"phantom size must be >= {_MIN_SIZE}, got {size}")
    level = rng.uniform(0.0, 1.0)
    ramp = np.linspace(-0.5, 0.5, size, dtype=np.float32)
    angle = rng.uniform(0.0, 2.0 * np.pi)
    gradient = np.cos(angle) * ramp[np.newaxis, :] + np.sin(angle) * ramp[:, np.newaxis]
    image = level + rng.uniform(0.0, 0.3) * gradient
    image = image + rng.normal(0.0, rng.uniform(0.0, 0.03), (size, size))
    return np.clip(image, 0.0, 1.0).astype(np.float32), np.zeros((size, size), dtype=np.bool_)


def make_dataset(n: int, size: int = 256, seed: int = 0) -> tuple[Image, Mask]:
    """Draw ``n`` phantoms, half of them positive (the first of each shuffled pair).

    Parameters
    ----------
    n:
        Number of phantoms (>= 0).
    size:
        Height and width of each phantom.
    seed:
        Seed of the generator; the same seed gives the same arrays.

    Returns
    -------
    (images, masks)
        float32 ``(n, size, size)`` in [0, 1] and bool ``(n, size, size)``.

    Raises
    ------
    ValueError
        If ``n`` is negative or ``size`` below 32.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.arange(n) % 2 == 0)
    images = np.empty((n, size, size), dtype=np.float32)
    masks = np.empty((n, size, size), dtype=np.bool_)
    for index in range(n):
        images[index], masks[index] = make_phantom(rng, size, positive=bool(labels[index]))
    return images, masks
