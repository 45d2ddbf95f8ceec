"""benchmarks/gpu_pipeline.py --smoke runs on CPU and reports both of its rates."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_pipeline.py"


@pytest.mark.skipif(
    not (REPO / "pneumonode" / "models" / "demo" / "model_card.json").is_file(),
    reason="the bundled demo model package is absent",
)
def test_gpu_pipeline_smoke_reports_node_and_bare_rates(tmp_path: Path) -> None:
    # Synthetic images and pynetdicom peers: needs neither ../shared/data nor DCMTK.
    env = {**os.environ, "PNEUMONODE_BENCH_RESULTS": str(tmp_path / "results")}
    out = subprocess.run(
        [sys.executable, str(SCRIPT), "--smoke"], cwd=REPO, env=env, capture_output=True,
        text=True, timeout=240, check=False,
    )
    text = out.stdout + out.stderr
    assert out.returncode == 0, text[-3000:]
    node = re.search(r"^node pipeline: ([0-9.]+) images/s$", out.stdout, flags=re.MULTILINE)
    bare = re.search(r"^bare predict_on_batch: ([0-9.]+) images/s$", out.stdout,
                     flags=re.MULTILINE)
    assert node is not None and float(node.group(1)) > 0, text[-3000:]
    assert bare is not None and float(bare.group(1)) > 0, text[-3000:]
    assert not (tmp_path / "results").exists()  # a smoke run writes no result file
