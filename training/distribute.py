"""Data-parallel training over every local accelerator: keras.distribution or MirroredStrategy."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import keras


@contextlib.contextmanager
def data_parallel(enabled: bool) -> Iterator[int]:
    """Build, compile and fit inside this context to train data-parallel on all local devices.

    On JAX a :class:`keras.distribution.DataParallel` distribution is set (and the previous
    one restored after); on TensorFlow the block runs in a ``tf.distribute.MirroredStrategy``
    scope. The recipe's batch size is the global batch, split across the replicas.

    Parameters
    ----------
    enabled : bool
        False makes this a no-op (one replica).

    Yields
    ------
    int
        The number of replicas.
    """
    if not enabled:
        yield 1
        return
    backend = keras.backend.backend()
    if backend == "jax":
        devices = keras.distribution.list_devices()
        previous = keras.distribution.distribution()
        keras.distribution.set_distribution(keras.distribution.DataParallel(devices=devices))
        try:
            yield len(devices)
        finally:
            keras.distribution.set_distribution(previous)
    elif backend == "tensorflow":
        import tensorflow as tf  # the one place TensorFlow is used directly

        strategy = tf.distribute.MirroredStrategy()
        with strategy.scope():
            yield int(strategy.num_replicas_in_sync)
    else:
        raise ValueError(
            f"data-parallel training needs the jax or tensorflow backend, not {backend!r}"
        )
