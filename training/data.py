"""Batches of (image, mask) from a prepared-data folder as a backend-neutral keras PyDataset."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import keras
import numpy as np
from numpy.typing import NDArray

from pneumonode.inference.preprocess import normalise, unit_from_uint8
from training.augment import Augmenter
from training.store import PreparedData


def to_model_input(
    images: NDArray[np.float32], channels: int, mean: float, std: float
) -> NDArray[np.float32]:
    """Turn ``(N, H, W)`` images in [0, 1] into ``(N, H, W, channels)`` batches.

    The node's own :func:`pneumonode.inference.preprocess.normalise`. Models built by
    ``training.train`` normalise inside the graph and are fed with channels 1, mean 0, std 1.

    Parameters
    ----------
    images : numpy.ndarray
        Gray images scaled to [0, 1].
    channels : int
        1, or 3 to repeat the gray channel (as the ResNet34 encoder expects).
    mean, std : float
        Normalisation, applied after scaling: ``(x - mean) / std``.

    Returns
    -------
    numpy.ndarray
        Float32 batch.
    """
    return normalise(images.astype(np.float32, copy=False), mean, std, channels)


class SegmentationData(keras.utils.PyDataset):  # type: ignore[misc]
    """Batches ``(x, y)``: x ``(B, S, S, channels)`` float32, y ``(B, S, S, 1)`` float32 in {0,1}.

    Augmentation is seeded per item from ``(seed, epoch, position)``, so a run is reproducible
    whatever the number of loader workers. The order is shuffled at each epoch when ``shuffle``.

    Parameters
    ----------
    store : PreparedData
        The prepared-data folder.
    image_ids : sequence of str
        Images served, e.g. ``store.ids("train")``.
    batch_size : int
        Images per batch (the last batch may be smaller).
    channels : int
        Model input channels (1 or 3).
    mean, std : float
        Input normalisation.
    augmenter : Augmenter or None
        Applied to every item when given.
    shuffle : bool
        Reorder at every epoch.
    seed : int
        Seed of shuffling and augmentation.
    oversampling : tuple of float or None
        ``(start, end)``: each epoch draws as many items as there are images, a share of them
        with pneumothorax that falls linearly from ``start`` (first epoch) to ``end`` (epoch
        ``epochs - 1``); each class is drawn without replacement while it lasts. None: every
        image once per epoch.
    epochs : int
        Length of the oversampling schedule.
    **kwargs
        ``workers``, ``use_multiprocessing``, ``max_queue_size`` of :class:`keras.utils.PyDataset`.
    """

    def __init__(
        self,
        store: PreparedData,
        image_ids: Sequence[str],
        *,
        batch_size: int,
        channels: int = 1,
        mean: float = 0.0,
        std: float = 1.0,
        augmenter: Augmenter | None = None,
        shuffle: bool = False,
        seed: int = 0,
        oversampling: tuple[float, float] | None = None,
        epochs: int = 1,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not image_ids:
            raise ValueError("a dataset needs at least one image")
        self.store = store
        self.image_ids = list(image_ids)
        self.batch_size = batch_size
        self.channels = channels
        self.mean = mean
        self.std = std
        self.augmenter = augmenter
        self.shuffle = shuffle
        self.seed = seed
        self.oversampling = oversampling
        self.epochs = max(1, epochs)
        positive = np.array([store.entry(i).positive for i in self.image_ids], dtype=bool)
        self._positives = np.flatnonzero(positive)
        self._negatives = np.flatnonzero(~positive)
        if oversampling is not None and (not len(self._positives) or not len(self._negatives)):
            raise ValueError("oversampling needs images with and without pneumothorax")
        self.epoch = 0
        self._order = self._make_order()

    def positive_share(self, epoch: int) -> float | None:
        """Share of positives drawn in ``epoch`` (None without oversampling)."""
        if self.oversampling is None:
            return None
        start, end = self.oversampling
        return start + (end - start) * min(epoch, self.epochs - 1) / max(self.epochs - 1, 1)

    def _draw(self, rng: np.random.Generator, pool: NDArray[np.int64], k: int) -> NDArray[np.int64]:
        rounds = [rng.permutation(pool) for _ in range(-(-k // len(pool)))]
        return np.concatenate(rounds)[:k] if rounds else pool[:0]

    def _make_order(self) -> NDArray[np.int64]:
        share = self.positive_share(self.epoch)
        if share is not None:
            rng = np.random.default_rng([self.seed, self.epoch, 1])
            n = len(self.image_ids)
            k = round(share * n)
            drawn = np.concatenate(
                [self._draw(rng, self._positives, k), self._draw(rng, self._negatives, n - k)]
            )
            return np.asarray(rng.permutation(drawn), dtype=np.int64)
        if not self.shuffle:
            return np.arange(len(self.image_ids))
        return np.random.default_rng([self.seed, self.epoch]).permutation(len(self.image_ids))

    def set_epoch(self, epoch: int) -> None:
        """Jump to ``epoch`` (0-based), as when a run resumes."""
        self.epoch = epoch
        self._order = self._make_order()

    def __len__(self) -> int:
        return math.ceil(len(self._order) / self.batch_size)

    def batch_ids(self, index: int) -> list[str]:
        """Image ids of batch ``index`` in the current epoch's order."""
        if not 0 <= index < len(self):
            raise IndexError(f"batch {index} out of range ({len(self)} batches)")
        positions = self._order[index * self.batch_size : (index + 1) * self.batch_size]
        return [self.image_ids[int(p)] for p in positions]

    def __getitem__(self, index: int) -> tuple[NDArray[np.float32], NDArray[np.float32]]:
        start = index * self.batch_size
        images = []
        masks = []
        for offset, image_id in enumerate(self.batch_ids(index)):
            image = unit_from_uint8(self.store.load_image(image_id))
            mask = self.store.load_mask(image_id)
            if self.augmenter is not None:
                rng = np.random.default_rng([self.seed, self.epoch, start + offset])
                image, mask = self.augmenter(image, mask, rng)
            images.append(image)
            masks.append(mask)
        x = to_model_input(np.stack(images), self.channels, self.mean, self.std)
        y = np.stack(masks).astype(np.float32)[..., None]
        return x, y

    def on_epoch_end(self) -> None:
        """Advance the epoch: new order and new augmentation draws."""
        self.epoch += 1
        self._order = self._make_order()
