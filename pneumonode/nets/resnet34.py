"""ResNet34 encoder and the Attention U-Net built on it (the paper's best model), in Keras 3.

Encoder
-------
The pre-activation ResNet34 of the ``classification_models`` package (the encoder the paper
used through ``segmentation_models``): an input batch normalisation without scale
(``bn_data``), a 7x7/2 convolution, batch norm + ReLU, 3x3/2 max-pooling, then basic blocks
3-4-6-3 with 64, 128, 256 and 512 filters (``BN-ReLU-conv3x3-BN-ReLU-conv3x3`` plus the
shortcut; the first unit of each stage projects the shortcut with a 1x1 convolution) and a
final batch norm + ReLU. Layer names are the ones of ``classification_models``
(``conv0``, ``stage1_unit1_bn1``, ``stage1_unit1_sc``...), so that its ImageNet file
``resnet34_imagenet_1000_no_top.h5`` can be loaded by name (see :func:`load_encoder_weights`).

Decoder
-------
Five up-sampling stages with 256, 128, 64, 32 and 16 filters. Stages 1-4 take a skip from the
encoder (``stage4_unit1_relu1``, ``stage3_unit1_relu1``, ``stage2_unit1_relu1``, ``relu0``, the
``segmentation_models`` choice) through an :class:`~pneumonode.nets.gates.AttentionGate`
driven by the decoder features; each stage up-samples 2x, concatenates, and applies two
3x3 convolution + batch norm + ReLU. A 3x3 convolution with a sigmoid gives one probability
channel at the input resolution.

Correction of the paper's code
------------------------------
In the code published with the paper, the attention gate's output was computed and then not
used: the decoder concatenated the ungated skip, so its "attention" model was a plain ResNet34
U-Net. Here the decoder concatenates the *gated* skip (``x * alpha``); the gates really act.
``architecture="paper"`` builds the published graph (no gate in the graph, since its output
was discarded, and a decoder of convolutions with bias and no BatchNorm), to compare the two.

Nothing is ever downloaded: ImageNet weights are read only from a local file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import h5py
import keras
import numpy as np

from pneumonode.nets.gates import AttentionGate

#: Basic blocks per stage of ResNet34.
REPETITIONS = (3, 4, 6, 3)
#: Filters of the decoder's five up-sampling stages.
DECODER_FILTERS = (256, 128, 64, 32, 16)
#: Encoder layers whose outputs are the skips of decoder stages 1-4, coarsest first.
SKIP_LAYERS = ("stage4_unit1_relu1", "stage3_unit1_relu1", "stage2_unit1_relu1", "relu0")
#: Encoder layer at the bottom of the U (stride 32).
BOTTOM_LAYER = "relu1"
_BN_EPSILON = 2e-5
_BN_MOMENTUM = 0.99


def _bn(name: str, scale: bool = True) -> keras.layers.BatchNormalization:
    return keras.layers.BatchNormalization(
        axis=-1, momentum=_BN_MOMENTUM, epsilon=_BN_EPSILON, scale=scale, name=name
    )


def _conv(filters: int, size: int, name: str, strides: int = 1) -> keras.layers.Conv2D:
    return keras.layers.Conv2D(
        filters, size, strides=strides, padding="valid", use_bias=False,
        kernel_initializer="he_uniform", name=name,
    )


def apply_stem(x: Any) -> Any:
    """Input normalisation, 7x7/2 convolution, BN, ReLU (``relu0``) and 3x3/2 max-pooling.

    Parameters
    ----------
    x:
        Image tensor ``(N, H, W, C)``.

    Returns
    -------
    (relu0, pooled)
        Stride-2 features (a skip) and stride-4 features for the first stage.
    """
    x = _bn("bn_data", scale=False)(x)
    x = keras.layers.ZeroPadding2D(3, name="conv0_pad")(x)
    x = _conv(64, 7, "conv0", strides=2)(x)
    x = _bn("bn0")(x)
    relu0 = keras.layers.Activation("relu", name="relu0")(x)
    x = keras.layers.ZeroPadding2D(1, name="pooling0_pad")(relu0)
    pooled = keras.layers.MaxPooling2D(3, strides=2, padding="valid", name="pooling0")(x)
    return relu0, pooled


def apply_basic_block(
    x: Any, filters: int, stage: int, unit: int, strides: int
) -> tuple[Any, Any]:
    """One pre-activation basic block of ResNet34.

    Parameters
    ----------
    x:
        Input tensor.
    filters:
        Channels of the block.
    stage, unit:
        1-based stage and unit numbers, used in the layer names (``stage{stage}_unit{unit}_*``).
    strides:
        Stride of the first 3x3 convolution (2 in the first unit of stages 2-4).

    Returns
    -------
    (output, pre_activation)
        The block's output (``filters`` channels) and its input after ``bn1`` + ``relu1``
        (what the decoder takes as a skip from the first unit of a stage).
    """
    prefix = f"stage{stage}_unit{unit}_"
    pre = _bn(prefix + "bn1")(x)
    pre = keras.layers.Activation("relu", name=prefix + "relu1")(pre)
    if unit == 1:
        shortcut = _conv(filters, 1, prefix + "sc", strides=strides)(pre)
    else:
        shortcut = x
    y = keras.layers.ZeroPadding2D(1, name=prefix + "pad1")(pre)
    y = _conv(filters, 3, prefix + "conv1", strides=strides)(y)
    y = _bn(prefix + "bn2")(y)
    y = keras.layers.Activation("relu", name=prefix + "relu2")(y)
    y = keras.layers.ZeroPadding2D(1, name=prefix + "pad2")(y)
    y = _conv(filters, 3, prefix + "conv2")(y)
    return keras.layers.Add(name=prefix + "add")([y, shortcut]), pre


def build_resnet34_encoder(
    input_shape: tuple[int, int, int] = (256, 256, 3), name: str = "resnet34_encoder"
) -> keras.Model:
    """Build the ResNet34 encoder.

    Parameters
    ----------
    input_shape:
        ``(height, width, channels)``; height and width must be divisible by 32.
    name:
        Name of the model.

    Returns
    -------
    keras.Model
        Five outputs, finest first: ``relu0`` (stride 2, 64 channels), ``stage2_unit1_relu1``
        (stride 4, 64), ``stage3_unit1_relu1`` (stride 8, 128), ``stage4_unit1_relu1``
        (stride 16, 256) and ``relu1`` (stride 32, 512).

    Raises
    ------
    ValueError
        If the size is not a positive multiple of 32.
    """
    height, width, channels = input_shape
    if channels < 1 or height < 32 or width < 32 or height % 32 or width % 32:
        raise ValueError(
            f"input_shape must be a positive multiple of 32 in size, got {input_shape}"
        )
    inputs = keras.Input(shape=input_shape, name="image")
    relu0, x = apply_stem(inputs)
    outputs = [relu0]
    for stage, repetitions in enumerate(REPETITIONS, start=1):
        filters = 64 * 2 ** (stage - 1)
        for unit in range(1, repetitions + 1):
            strides = 2 if unit == 1 and stage > 1 else 1
            x, pre = apply_basic_block(x, filters, stage, unit, strides)
            if unit == 1 and stage > 1:
                outputs.append(pre)
    x = _bn("bn1")(x)
    outputs.append(keras.layers.Activation("relu", name=BOTTOM_LAYER)(x))
    return keras.Model(inputs, outputs, name=name)


def load_encoder_weights(encoder: keras.Model, path: Path) -> None:
    """Load ImageNet (or any) weights into a ResNet34 encoder from a local file, in place.

    Two layouts are read:

    - ``*.weights.h5``: Keras 3 weights written by ``encoder.save_weights(path)`` for an encoder
      from :func:`build_resnet34_encoder` (loaded by Keras, by topology);
    - any other ``*.h5``: a Keras 2 HDF5 weights file such as ``classification_models``'
      ``resnet34_imagenet_1000_no_top.h5``, matched layer by layer and weight by weight *by
      name* (``conv0/kernel:0`` goes to ``conv0``'s ``kernel``). Every encoder layer with
      weights must be present; extra layers in the file (a classifier head) are ignored.

    Parameters
    ----------
    encoder:
        Model from :func:`build_resnet34_encoder`. ImageNet files need 3 input channels.
    path:
        Local weights file. Nothing is downloaded.

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist.
    ValueError
        If the file is not an HDF5 weights file, lacks a layer or weight, or a shape differs.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"encoder weights file not found: {path}")
    if path.name.endswith(".weights.h5"):
        try:
            encoder.load_weights(path)
        except (ValueError, OSError, KeyError) as exc:
            raise ValueError(f"cannot load Keras encoder weights from {path}: {exc}") from exc
        return
    if path.suffix != ".h5":
        raise ValueError(f"encoder weights must be a .weights.h5 or .h5 file, got {path}")
    try:
        with h5py.File(path, "r") as handle:
            _load_legacy_h5(encoder, handle, path)
    except OSError as exc:
        raise ValueError(f"encoder weights file {path} is not readable HDF5: {exc}") from exc


def _text(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _load_legacy_h5(encoder: keras.Model, handle: h5py.File, path: Path) -> None:
    root = handle
    if "layer_names" not in root.attrs and "model_weights" in root:
        root = root["model_weights"]
    if "layer_names" not in root.attrs:
        raise ValueError(f"{path} is not a Keras HDF5 weights file (no 'layer_names' attribute)")
    file_layers = {_text(name) for name in root.attrs["layer_names"]}
    assignments: list[tuple[Any, np.ndarray[Any, Any]]] = []
    for layer in encoder.layers:
        if not layer.weights:
            continue
        if layer.name not in file_layers:
            raise ValueError(f"{path} has no weights for encoder layer {layer.name!r}")
        group = root[layer.name]
        stored: dict[str, np.ndarray[Any, Any]] = {}
        for weight_name in group.attrs.get("weight_names", []):
            full = _text(weight_name)
            short = full.rsplit("/", 1)[-1].split(":", 1)[0]
            stored[short] = np.asarray(group[full])
        for variable in layer.weights:
            key = variable.name.rsplit("/", 1)[-1]
            if key not in stored:
                raise ValueError(
                    f"{path}: layer {layer.name!r} has no weight {key!r} (has {sorted(stored)})"
                )
            value = stored[key]
            if tuple(value.shape) != tuple(variable.shape):
                raise ValueError(
                    f"{path}: {layer.name}/{key} has shape {value.shape}, the encoder needs "
                    f"{tuple(variable.shape)} (ImageNet weights need 3 input channels)"
                )
            assignments.append((variable, value))
    for variable, value in assignments:
        variable.assign(value)


def apply_decoder_stage(
    x: Any, skip: Any | None, filters: int, stage: int, architecture: str = "fixed"
) -> Any:
    """One decoder stage: gate the skip, up-sample 2x, concatenate, two conv + BN + ReLU.

    Parameters
    ----------
    x:
        Decoder features (also the gating signal of the skip).
    skip:
        Encoder features at twice the resolution of ``x``, or ``None`` (last stage).
    filters:
        Channels of the stage.
    stage:
        1-based stage number, used in the layer names (``dec{stage}_*``, ``gate{stage}``).
    architecture:
        ``"fixed"``, or ``"paper"``: the ungated skip, convolutions with bias, no BatchNorm.

    Returns
    -------
    Tensor at twice the resolution of ``x`` with ``filters`` channels.
    """
    prefix = f"dec{stage}_"
    up = keras.layers.UpSampling2D(2, name=prefix + "upsample")(x)
    paper = architecture == "paper"
    if skip is not None:
        gated = skip if paper else AttentionGate(subsample=2, name=f"gate{stage}")([skip, x])
        up = keras.layers.Concatenate(name=prefix + "concat")([up, gated])
    for index in (1, 2):
        up = keras.layers.Conv2D(
            filters, 3, padding="same", use_bias=paper, kernel_initializer="he_uniform",
            name=f"{prefix}conv{index}",
        )(up)
        if not paper:
            up = keras.layers.BatchNormalization(name=f"{prefix}bn{index}")(up)
        up = keras.layers.Activation("relu", name=f"{prefix}relu{index}")(up)
    return up


def build_attention_resnet34_unet(
    input_shape: tuple[int, int, int] = (256, 256, 3),
    encoder_weights: Path | None = None,
    name: str = "attention_resnet34_unet",
    architecture: str = "fixed",
) -> keras.Model:
    """Build the Attention U-Net with a ResNet34 encoder.

    Parameters
    ----------
    input_shape:
        ``(height, width, channels)``; height and width must be divisible by 32. The paper
        repeated the gray image into 3 channels (needed for ImageNet weights).
    encoder_weights:
        Optional local encoder weights file (see :func:`load_encoder_weights`); ``None`` keeps
        the random initialisation.
    name:
        Name of the model.
    architecture:
        ``"fixed"`` (gated skips, BatchNorm decoder) or ``"paper"`` (as published).

    Returns
    -------
    keras.Model
        Output ``(height, width, 1)`` probabilities (sigmoid, float32).

    Raises
    ------
    FileNotFoundError
        If ``encoder_weights`` does not exist.
    ValueError
        For a bad input shape or an unusable weights file.
    """
    if architecture not in ("fixed", "paper"):
        raise ValueError(f"architecture must be 'fixed' or 'paper', got {architecture!r}")
    encoder = build_resnet34_encoder(input_shape)
    if encoder_weights is not None:
        load_encoder_weights(encoder, Path(encoder_weights))
    *skips_fine_first, bottom = encoder.outputs
    skips: list[Any | None] = [*reversed(skips_fine_first), None]
    x = bottom
    for stage, (filters, skip) in enumerate(zip(DECODER_FILTERS, skips, strict=True), start=1):
        x = apply_decoder_stage(x, skip, filters, stage, architecture)
    x = keras.layers.Conv2D(1, 3, padding="same", name="output_conv")(x)
    outputs = keras.layers.Activation("sigmoid", dtype="float32", name="output")(x)
    return keras.Model(encoder.inputs, outputs, name=name)
