"""Measure the training loader (cache read, augmentation, batching) in images/s on one core."""

from __future__ import annotations

import math
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from training.augment import Augmenter
from training.data import SegmentationData
from training.store import PreparedData


@dataclass(frozen=True)
class DataBench:
    """What ``bench-data`` measured and what it implies for a GPU host."""

    size: int
    images: int
    batch_size: int
    batches: int
    seconds: float
    target: float
    host_cores: int

    @property
    def per_core(self) -> float:
        """Augmented training images per second from one loader worker (one core)."""
        return self.batches * self.batch_size / self.seconds

    @property
    def workers_needed(self) -> int:
        """Workers (one core each) for ``target`` images/s, assuming linear scaling."""
        return math.ceil(self.target / self.per_core)

    def describe(self) -> str:
        """The report line."""
        fits = "fits" if self.workers_needed <= self.host_cores else "does NOT fit"
        return (
            f"bench-data at {self.size} px: {self.per_core:.0f} images/s per core (one worker: "
            f"uint8 memory-mapped cache, augmentation, batching of {self.batches} batches of "
            f"{self.batch_size}); {self.target:.0f} images/s needs {self.workers_needed} "
            f"workers, extrapolated linearly, which {fits} a {self.host_cores}-core GPU host"
        )

    def as_dict(self) -> dict[str, float | int]:
        """JSON-ready fields and the two derived figures."""
        row: dict[str, float | int] = dict(asdict(self))
        row["images_per_s_per_core"] = self.per_core
        row["workers_needed"] = self.workers_needed
        return row


def bench_data(
    size: int,
    *,
    images: int = 64,
    batches: int = 8,
    batch_size: int = 16,
    data: Path | None = None,
    target: float = 1000.0,
    host_cores: int = 16,
) -> DataBench:
    """Time the training loader in this process: ``batches`` augmented batches.

    The time is the process's CPU time (all its threads), so images per CPU-second is the
    rate of one core however busy the machine is; a GPU host with ``w`` loader processes
    gets about ``w`` times that.

    Without ``data``, ``images`` phantoms are prepared at ``size`` in a temporary folder (the
    loader's cost does not depend on what the pixels show). One batch is read first, untimed,
    so that the memory-mapped cache is built and warm, as during training.

    Parameters
    ----------
    size : int
        Training size, pixels.
    images : int
        Phantoms to prepare when no ``data`` is given.
    batches : int
        Batches timed.
    batch_size : int
        Images per batch.
    data : pathlib.Path or None
        A prepared-data folder to read instead.
    target : float
        Images per second the GPU consumes (about 1,000 for the Attention U-Net at 256 px on
        one H200).
    host_cores : int
        Cores of the GPU host, to say whether the workers fit.

    Returns
    -------
    DataBench
        The measurement.
    """
    if batches < 1 or batch_size < 1:
        raise ValueError(f"need batches >= 1 and batch_size >= 1, got {batches}, {batch_size}")
    with tempfile.TemporaryDirectory(prefix="bench-data-") as tmp:
        if data is None:
            from training.phantoms import make_phantom
            from training.prepare import prepare_synthetic

            data = Path(tmp) / "data"
            prepare_synthetic(
                data, make_phantom, count=images, original_size=size, size=size, seed=0
            )
        store = PreparedData.open(data)
        if store.size != size:
            raise ValueError(f"prepared data {data} is {store.size} px, not {size}")
        ids = [e.image_id for e in store.entries]
        loader = SegmentationData(
            store, ids, batch_size=batch_size, augmenter=Augmenter(), shuffle=True, seed=0
        )
        loader[0]
        start = time.process_time()
        for index in range(batches):
            if index and index % len(loader) == 0:
                loader.on_epoch_end()
            loader[index % len(loader)]
        seconds = time.process_time() - start
    return DataBench(
        size=size,
        images=len(ids),
        batch_size=batch_size,
        batches=batches,
        seconds=seconds,
        target=target,
        host_cores=host_cores,
    )
