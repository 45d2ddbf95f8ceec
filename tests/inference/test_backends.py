"""The same model package gives the same prediction under the JAX backend as under TensorFlow."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from pneumonode.inference.card import ModelCard
from pneumonode.inference.predictor import Predictor
from pneumonode.nets.attention_unet import build_attention_unet

SCRIPT = """
import json, sys
import numpy as np
import keras
from pneumonode.inference.card import ModelCard
from pneumonode.inference.predictor import Predictor
from pneumonode.nets.attention_unet import build_attention_unet
predictor = Predictor.load(sys.argv[1])
image = np.linspace(0, 1, 90 * 70, dtype=np.float32).reshape(90, 70)
batch = np.stack([predictor.prepare(image)])
print(json.dumps({"backend": keras.backend.backend(),
                  "probs": predictor.probabilities(batch).tolist()}))
"""


@pytest.mark.slow
@pytest.mark.skipif(
    importlib.util.find_spec("jax") is None,
    reason="jax not installed (optional; `pip install jax[cpu]` to run this check)",
)
def test_package_loads_and_agrees_under_jax(
    tmp_path: Path, card_factory: Callable[..., ModelCard]
) -> None:
    # Depth 1 keeps the layer count low: JAX compiles every initializer while loading.
    folder = tmp_path / "package"
    folder.mkdir()
    build_attention_unet((64, 64, 1), base_filters=2, depth=1, name="jax_check").save(
        folder / "model.keras"
    )
    card_factory(["model.keras"]).save(folder)
    predictor = Predictor.load(folder)
    image = np.linspace(0, 1, 90 * 70, dtype=np.float32).reshape(90, 70)
    expected = predictor.probabilities(np.stack([predictor.prepare(image)]))
    env = {**os.environ, "KERAS_BACKEND": "jax"}
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(folder)],
        env=env, capture_output=True, text=True, timeout=300, check=False,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    payload = json.loads(result.stdout.strip().splitlines()[-1])
    assert payload["backend"] == "jax"
    np.testing.assert_allclose(np.asarray(payload["probs"]), expected, atol=1e-5)
