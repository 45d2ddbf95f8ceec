"""The same model package gives the same prediction under JAX and PyTorch as under TensorFlow."""

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
from pneumonode.inference.predictor import Predictor
predictor = Predictor.load(sys.argv[1])
image = np.linspace(0, 1, 90 * 70, dtype=np.float32).reshape(90, 70)
batch = np.stack([predictor.prepare(image)])
print(json.dumps({"backend": keras.backend.backend(),
                  "probs": predictor.probabilities(batch).tolist()}))
"""

#: Why a backend's check is skipped when its package is absent.
SKIP_REASONS = {
    "jax": "jax not installed (optional, in the test extra: `pip install jax[cpu]`)",
    "torch": (
        "torch not installed (optional extra `torch`, not in the test extra: PyPI's default "
        "Linux torch wheel pulls GBs of CUDA libraries; `pip install torch==2.13.0` takes a CPU "
        "wheel where one lies on disk, or use the CPU index)"
    ),
}


@pytest.mark.slow
@pytest.mark.parametrize(
    "backend",
    [
        pytest.param(
            name,
            marks=pytest.mark.skipif(
                importlib.util.find_spec(name) is None, reason=SKIP_REASONS[name]
            ),
        )
        for name in ("jax", "torch")
    ],
)
def test_package_loads_and_agrees_with_tensorflow(
    backend: str, tmp_path: Path, card_factory: Callable[..., ModelCard]
) -> None:
    # Depth 1 keeps the layer count low: JAX compiles every initializer while loading.
    folder = tmp_path / "package"
    folder.mkdir()
    build_attention_unet((64, 64, 1), base_filters=2, depth=1, name="backend_check").save(
        folder / "model.keras"
    )
    card_factory(["model.keras"]).save(folder)
    predictor = Predictor.load(folder)
    image = np.linspace(0, 1, 90 * 70, dtype=np.float32).reshape(90, 70)
    expected = predictor.probabilities(np.stack([predictor.prepare(image)]))
    env = {**os.environ, "KERAS_BACKEND": backend}
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(folder)],
        env=env, capture_output=True, text=True, timeout=300, check=False,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    payload = json.loads(result.stdout.strip().splitlines()[-1])
    assert payload["backend"] == backend
    np.testing.assert_allclose(np.asarray(payload["probs"]), expected, atol=1e-5)
