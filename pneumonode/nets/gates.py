"""The additive attention gate of Oktay et al. (2018), the one custom layer of pneumonode."""

from __future__ import annotations

from typing import Any

import keras

#: ``fixed``: the skip is gated (Oktay et al.); ``paper``: the seed's gate (see AttentionGate).
GATE_MODES = ("fixed", "paper")
#: Bias given to ``psi`` by :func:`open_gates`; ``sigmoid(30)`` rounds to exactly 1.0 in float32.
OPEN_GATE_BIAS = 30.0


@keras.saving.register_keras_serializable(package="pneumonode")
class AttentionGate(keras.layers.Layer):  # type: ignore[misc]
    """Additive attention gate: weights skip features by a learned map in [0, 1].

    Called on ``[x, g]`` where ``x`` is the skip connection (``H x W x Cx``) and ``g`` the gating
    signal from the coarser decoder level (``H/s x W/s x Cg``, ``s = subsample``). Following
    Oktay et al., "Attention U-Net: Learning Where to Look for the Pancreas" (MIDL 2018)::

        q     = relu(theta_x(x) + phi_g(g))        # at the gating resolution
        alpha = sigmoid(psi(q))                    # one coefficient per position
        out   = x * upsample(alpha)                # the SKIP FEATURES are gated

    ``theta_x`` is a ``s x s`` convolution with stride ``s`` and no bias (Oktay's choice: it
    brings ``x`` down to the gating resolution without discarding pixels the way a strided 1x1
    would), ``phi_g`` and ``psi`` are 1x1 convolutions, and ``alpha`` is brought back to the skip
    resolution by bilinear up-sampling. Every sub-layer is named after the gate.

    With ``mode="paper"`` the gate is the one of the code published with the paper (kept to
    compare "as published" with "fixed"): it returns the gate's own intermediate features
    weighted by the coefficients, ``upsample(q * alpha)`` (``inter_channels`` channels), so
    what replaces the skip in the decoder is not the encoder's features at all.

    Parameters
    ----------
    inter_channels:
        Channels of the intermediate space ``q``; ``None`` means half the skip channels (at
        least 1), as in the paper.
    subsample:
        Ratio between the skip and the gating resolutions (2 in a U-Net).
    mode:
        ``"fixed"`` (default, ``x * alpha``) or ``"paper"`` (``upsample(q * alpha)``).
    **kwargs:
        Passed to :class:`keras.layers.Layer` (``name``, ``dtype``...).
    """

    def __init__(
        self,
        inter_channels: int | None = None,
        subsample: int = 2,
        mode: str = "fixed",
        **kwargs: Any,
    ):
        super().__init__(**kwargs)
        if inter_channels is not None and inter_channels < 1:
            raise ValueError(f"AttentionGate inter_channels must be >= 1, got {inter_channels}")
        if subsample < 1:
            raise ValueError(f"AttentionGate subsample must be >= 1, got {subsample}")
        if mode not in GATE_MODES:
            raise ValueError(f"AttentionGate mode must be one of {GATE_MODES}, got {mode!r}")
        self.inter_channels = inter_channels
        self.subsample = subsample
        self.mode = mode

    def build(self, input_shape: Any) -> None:
        """Create the sub-layers for ``[x_shape, g_shape]``."""
        x_shape, g_shape = (tuple(s) for s in input_shape)
        if len(x_shape) != 4 or len(g_shape) != 4:
            raise ValueError(
                f"AttentionGate {self.name} needs two 4-D inputs [x, g], got {x_shape}, {g_shape}"
            )
        for axis in (1, 2):
            x_dim, g_dim = x_shape[axis], g_shape[axis]
            if x_dim is not None and g_dim is not None and x_dim != g_dim * self.subsample:
                raise ValueError(
                    f"AttentionGate {self.name}: skip size {x_shape[1:3]} must be "
                    f"subsample={self.subsample} times the gating size {g_shape[1:3]}"
                )
        x_channels = int(x_shape[-1])
        inter = self.inter_channels or max(1, x_channels // 2)
        s = self.subsample
        self.theta_x = keras.layers.Conv2D(
            inter, s, strides=s, padding="same", use_bias=False, name=f"{self.name}_theta_x"
        )
        self.phi_g = keras.layers.Conv2D(inter, 1, padding="same", name=f"{self.name}_phi_g")
        self.psi = keras.layers.Conv2D(1, 1, padding="same", name=f"{self.name}_psi")
        self.upsample = keras.layers.UpSampling2D(
            size=s, interpolation="bilinear", name=f"{self.name}_upsample"
        )
        self.theta_x.build(x_shape)
        self.phi_g.build(g_shape)
        coarse = (x_shape[0], g_shape[1], g_shape[2], inter)
        self.psi.build(coarse)
        self.upsample.build((x_shape[0], g_shape[1], g_shape[2], 1))
        self._inter = inter
        self.built = True

    def attention(self, x: Any, g: Any) -> Any:
        """Attention coefficients ``alpha`` at the skip resolution, shape ``(N, H, W, 1)``."""
        q = keras.ops.relu(self.theta_x(x) + self.phi_g(g))
        alpha = keras.ops.sigmoid(self.psi(q))
        return self.upsample(alpha)

    def call(self, inputs: Any) -> Any:
        """Return the skip features ``x`` multiplied by the attention coefficients.

        In ``paper`` mode: the intermediate features ``q`` weighted by the coefficients,
        brought to the skip resolution.
        """
        x, g = inputs
        if self.mode == "paper":
            q = keras.ops.relu(self.theta_x(x) + self.phi_g(g))
            alpha = keras.ops.sigmoid(self.psi(q))
            return self.upsample(keras.ops.multiply(q, alpha))
        return keras.ops.multiply(x, self.attention(x, g))

    def compute_output_shape(self, input_shape: Any) -> Any:
        """The gated skip has the shape of the skip (``inter`` channels in ``paper`` mode)."""
        x_shape = tuple(input_shape[0])
        if self.mode == "paper":
            inter = self.inter_channels or max(1, int(x_shape[-1]) // 2)
            return (*x_shape[:-1], inter)
        return x_shape

    def get_config(self) -> dict[str, Any]:
        """Serialisable configuration (round-trips through ``from_config``)."""
        config: dict[str, Any] = super().get_config()
        config.update({"inter_channels": self.inter_channels, "subsample": self.subsample})
        if self.mode != "fixed":
            config["mode"] = self.mode
        return config


def attention_gates(model: keras.Model) -> list[AttentionGate]:
    """Every :class:`AttentionGate` of a model, in layer order.

    Parameters
    ----------
    model:
        A Keras model, possibly with nested models.

    Returns
    -------
    list of AttentionGate
    """
    gates: list[AttentionGate] = []
    for layer in model.layers:
        if isinstance(layer, AttentionGate):
            gates.append(layer)
        elif isinstance(layer, keras.Model):
            gates.extend(attention_gates(layer))
    return gates


def open_gates(model: keras.Model) -> int:
    """Force every attention gate of ``model`` fully open (``alpha == 1``), in place.

    The ``psi`` kernel is zeroed and its bias set to :data:`OPEN_GATE_BIAS`, so the sigmoid
    saturates to exactly 1.0 and each gate passes its skip through unchanged: the network then
    behaves as the same U-Net without attention. Used to show that the gates matter.

    Parameters
    ----------
    model:
        A built model containing attention gates.

    Returns
    -------
    int
        Number of gates opened.

    Raises
    ------
    ValueError
        If the model has no attention gate.
    """
    gates = attention_gates(model)
    if not gates:
        raise ValueError(f"model {model.name!r} has no AttentionGate to open")
    for gate in gates:
        kernel, bias = gate.psi.get_weights()
        gate.psi.set_weights([kernel * 0.0, bias * 0.0 + OPEN_GATE_BIAS])
    return len(gates)
