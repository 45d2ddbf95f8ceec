"""@cornerstonejs/adapters 5.14 (the SEG code of OHIF and most web viewers) parses our SEGs."""

from __future__ import annotations

import json

import pytest
from interop.support import Case, require_node_module, run_node

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("name", ["positive", "negative", "siim"])
def test_cornerstone_adapters_parse_the_seg_onto_its_radiograph(
    name: str, cases: dict[str, Case]
) -> None:
    require_node_module("@cornerstonejs/adapters")
    if name not in cases:
        pytest.skip("the SIIM sample images are absent from the shared data")
    case = cases[name]
    result = run_node("cornerstone_seg.mjs", str(case.seg), str(case.source))
    assert result.returncode == 0, result.stderr[-4000:]
    parsed = json.loads(result.stdout.strip().splitlines()[-1])
    assert parsed["segments"] == [{"number": 1, "label": "Pneumothorax"}]
    assert parsed["images"] == 1
    assert (parsed["rows"], parsed["columns"]) == case.mask.shape
    assert parsed["voxels"] == int(case.mask.sum())
