"""The paper's Attention U-Net: a 5-level U-Net with an additive attention gate on every skip.

Architecture (``base_filters=16``, ``depth=5``, the paper's values):

- encoder levels with 16, 32, 64, 128 and 256 filters, each two 3x3 convolutions + ReLU with
  dropout 0.2 between them, then 2x2 max-pooling;
- a 512-filter bottleneck of the same form;
- a decoder that, at each level, gates the encoder skip with an :class:`AttentionGate` driven by
  the coarser decoder features, up-samples those features 2x, concatenates them with the *gated*
  skip and applies the same double convolution;
- a 1x1 convolution with a sigmoid: one probability channel.

About 8.1 million parameters at ``base_filters=16`` (8,124,502 for a 256x256x1 input).

Correction of the paper's code
------------------------------
In the code published with the paper, the attention block multiplied the gate's own
intermediate sum (``theta_x + phi_g`` after the sigmoid) instead of the skip features, so the
skip reaching the decoder was not the encoder's features weighted by attention. Here the
attention coefficients multiply the skip features ``x`` themselves, as in Oktay et al. (2018):
``out = x * alpha``. See :mod:`pneumonode.nets.gates`. ``architecture="paper"`` builds the
published graph instead (the gate's output replaces the skip), to compare the two.

Every layer has an explicit, stable name (``enc{i}_*``, ``bottleneck_*``, ``dec{i}_*``,
``gate{i}``, ``output``) so that weights can be inspected and mapped by name.
"""

from __future__ import annotations

from typing import Any

import keras

from pneumonode.nets.gates import AttentionGate


def apply_conv_block(x: Any, filters: int, dropout: float, name: str) -> Any:
    """Two 3x3 convolutions + ReLU with dropout between them.

    Parameters
    ----------
    x:
        Input tensor ``(N, H, W, C)``.
    filters:
        Output channels of both convolutions.
    dropout:
        Dropout rate after the first convolution (0 disables the layer).
    name:
        Prefix of the layer names.

    Returns
    -------
    Tensor ``(N, H, W, filters)``.
    """
    x = keras.layers.Conv2D(
        filters, 3, padding="same", activation="relu", kernel_initializer="he_normal",
        name=f"{name}_conv1",
    )(x)
    if dropout > 0:
        x = keras.layers.Dropout(dropout, name=f"{name}_dropout")(x)
    return keras.layers.Conv2D(
        filters, 3, padding="same", activation="relu", kernel_initializer="he_normal",
        name=f"{name}_conv2",
    )(x)


def apply_encoder_level(x: Any, filters: int, dropout: float, name: str) -> tuple[Any, Any]:
    """One encoder level: the double convolution, then 2x2 max-pooling.

    Parameters
    ----------
    x:
        Input tensor.
    filters:
        Channels of the level.
    dropout:
        Dropout rate inside the double convolution.
    name:
        Prefix of the layer names.

    Returns
    -------
    (skip, pooled)
        The features passed to the decoder and the down-sampled tensor for the next level.
    """
    skip = apply_conv_block(x, filters, dropout, name)
    pooled = keras.layers.MaxPooling2D(2, name=f"{name}_pool")(skip)
    return skip, pooled


def apply_decoder_level(
    x: Any,
    skip: Any,
    filters: int,
    dropout: float,
    name: str,
    gate_name: str,
    gate_mode: str = "fixed",
) -> Any:
    """One decoder level: gate the skip with ``x``, up-sample ``x``, concatenate, convolve.

    Parameters
    ----------
    x:
        Decoder features at the coarser resolution (the gating signal).
    skip:
        Encoder features at twice the resolution of ``x``.
    filters:
        Channels of the level.
    dropout:
        Dropout rate inside the double convolution.
    name:
        Prefix of the layer names.
    gate_name:
        Name of the attention gate.
    gate_mode:
        ``"fixed"`` or ``"paper"`` (see :class:`AttentionGate`).

    Returns
    -------
    Tensor at the resolution of ``skip`` with ``filters`` channels.
    """
    gated = AttentionGate(subsample=2, mode=gate_mode, name=gate_name)([skip, x])
    up = keras.layers.UpSampling2D(2, name=f"{name}_upsample")(x)
    merged = keras.layers.Concatenate(name=f"{name}_concat")([up, gated])
    return apply_conv_block(merged, filters, dropout, name)


def build_attention_unet(
    input_shape: tuple[int, int, int] = (256, 256, 1),
    base_filters: int = 16,
    depth: int = 5,
    dropout: float = 0.2,
    name: str = "attention_unet",
    architecture: str = "fixed",
) -> keras.Model:
    """Build the paper's Attention U-Net.

    Parameters
    ----------
    input_shape:
        ``(height, width, channels)``; height and width must be divisible by ``2**depth``.
    base_filters:
        Filters of the first level; each level doubles them (16 gives 16...256 and a 512
        bottleneck).
    depth:
        Number of encoder levels (pooling steps).
    dropout:
        Dropout rate in every double convolution, in [0, 1).
    name:
        Name of the model.
    architecture:
        ``"fixed"`` (the skip is gated) or ``"paper"`` (the seed's gate output replaces the
        skip).

    Returns
    -------
    keras.Model
        Input ``input_shape``, output ``(height, width, 1)`` probabilities (sigmoid, float32).

    Raises
    ------
    ValueError
        For a non-positive size, filters or depth, a dropout outside [0, 1), a size that
        ``2**depth`` does not divide, or an unknown architecture.
    """
    if architecture not in ("fixed", "paper"):
        raise ValueError(f"architecture must be 'fixed' or 'paper', got {architecture!r}")
    height, width, channels = input_shape
    if min(height, width, channels) < 1:
        raise ValueError(f"input_shape must be positive, got {input_shape}")
    if base_filters < 1 or depth < 1:
        raise ValueError(f"base_filters and depth must be >= 1, got {base_filters}, {depth}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must lie in [0, 1), got {dropout}")
    factor = 2**depth
    if height % factor or width % factor:
        raise ValueError(
            f"input size {height}x{width} must be divisible by 2**depth = {factor}"
        )

    inputs = keras.Input(shape=input_shape, name="image")
    x = inputs
    skips = []
    for level in range(depth):
        skip, x = apply_encoder_level(x, base_filters * 2**level, dropout, f"enc{level}")
        skips.append(skip)
    x = apply_conv_block(x, base_filters * 2**depth, dropout, "bottleneck")
    for level in reversed(range(depth)):
        x = apply_decoder_level(
            x, skips[level], base_filters * 2**level, dropout, f"dec{level}", f"gate{level}",
            architecture,
        )
    outputs = keras.layers.Conv2D(
        1, 1, activation="sigmoid", dtype="float32", name="output"
    )(x)
    return keras.Model(inputs, outputs, name=name)
