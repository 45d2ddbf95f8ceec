"""dcmqi's segimage2itkimage (the reference SEG converter, PyPI dcmqi) reads our SEGs."""

from __future__ import annotations

import gzip
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
from interop.support import Case

pytestmark = pytest.mark.slow


def _converter() -> str:
    beside = Path(sys.executable).parent / "segimage2itkimage"
    found = str(beside) if beside.exists() else shutil.which("segimage2itkimage")
    if found is None:
        pytest.skip("segimage2itkimage not installed (PyPI dcmqi, in the test extra)")
    return found


def _read_nrrd(path: Path) -> tuple[dict[str, str], np.ndarray]:
    raw = path.read_bytes()
    header, _, data = raw.partition(b"\n\n")
    fields = {}
    for line in header.decode("ascii").splitlines()[1:]:
        if ":" in line and not line.startswith("#"):
            key, _, value = line.partition(":")
            fields[key.strip()] = value.strip().lstrip("=").strip()
    assert fields["type"] == "short" and fields["endian"] == "little", fields
    payload = gzip.decompress(data) if fields["encoding"] == "gzip" else data
    sizes = [int(v) for v in fields["sizes"].split()]
    voxels = np.frombuffer(payload, dtype="<i2").reshape(sizes[::-1])
    return fields, voxels


@pytest.mark.parametrize("name", ["positive", "negative", "siim"])
def test_segimage2itkimage_geometry_and_voxels_equal_the_seg(
    name: str, cases: dict[str, Case], tmp_path: Path
) -> None:
    converter = _converter()
    if name not in cases:
        pytest.skip("the SIIM sample images are absent from the shared data")
    case = cases[name]
    out = subprocess.run(
        [converter, "--inputDICOM", str(case.seg), "--outputDirectory", str(tmp_path),
         "--outputType", "nrrd"],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    fields, voxels = _read_nrrd(tmp_path / "1.nrrd")
    seg = pydicom.dcmread(case.seg)
    rows, columns = int(seg.Rows), int(seg.Columns)
    assert [int(v) for v in fields["sizes"].split()] == [columns, rows, 1]
    spacing = seg.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].PixelSpacing
    directions = [
        [float(x) for x in vector.strip("()").split(",")]
        for vector in fields["space directions"].split()
    ]
    np.testing.assert_allclose(
        directions, [[float(spacing[1]), 0, 0], [0, float(spacing[0]), 0], [0, 0, 1.0]]
    )
    assert voxels.shape == (1, rows, columns)
    assert int(np.count_nonzero(voxels)) == int(case.mask.sum())
    np.testing.assert_array_equal(voxels[0] != 0, case.mask)
    meta = json.loads((tmp_path / "meta.json").read_text())
    segment = meta["segmentAttributes"][0][0]
    assert segment["SegmentLabel"] == "Pneumothorax"
    assert segment["SegmentedPropertyTypeCodeSequence"]["CodeValue"] == "36118008"
