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

from pneumonode.inference.predictor import Predictor

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


@pytest.mark.skipif(
    importlib.util.find_spec("jax") is None,
    reason="jax not installed (optional; `pip install jax[cpu]` to run this check)",
)
def test_package_loads_and_agrees_under_jax(make_tiny_package: Callable[..., Path]) -> None:
    folder = make_tiny_package(1)
    predictor = Predictor.load(folder)
    image = np.linspace(0, 1, 90 * 70, dtype=np.float32).reshape(90, 70)
    expected = predictor.probabilities(np.stack([predictor.prepare(image)]))
    env = {**os.environ, "KERAS_BACKEND": "jax"}
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(folder)],
        env=env, capture_output=True, text=True, timeout=120, check=False,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    payload = json.loads(result.stdout.strip().splitlines()[-1])
    assert payload["backend"] == "jax"
    np.testing.assert_allclose(np.asarray(payload["probs"]), expected, atol=1e-5)
