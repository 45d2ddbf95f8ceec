"""The overlay in JPEG-LS Lossless: the same pixels, a fraction of the bytes, valid, readable."""

from __future__ import annotations

import datetime
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
import synthetic
from pydicom.uid import ExplicitVRLittleEndian, JPEGLSLossless, RLELossless

from pneumonode.dicom.pixels import decode
from pneumonode.findings import Finding
from pneumonode.inference.card import ModelCard
from pneumonode.outputs.overlay import build_overlay

CREATED = datetime.datetime(2024, 1, 2, 3, 4, 5)


def _write_both(
    source_path: Path, card: ModelCard, make_finding: Callable[..., Finding], folder: Path
) -> tuple[Path, Path]:
    source = pydicom.dcmread(source_path)
    image = decode(source)
    finding = make_finding(synthetic.lesion_mask(source.Rows, source.Columns), image)
    paths = []
    for name, syntax in (("raw", ExplicitVRLittleEndian), ("jls", JPEGLSLossless)):
        sc = build_overlay(
            source, image, finding, card, series_instance_uid="1.2.826.0.1.3680043.8.498.88.1",
            sop_instance_uid="1.2.826.0.1.3680043.8.498.88.2", created=CREATED,
            transfer_syntax_uid=syntax,
        )  # fmt: skip
        path = folder / f"{name}.dcm"
        pydicom.dcmwrite(path, sc, enforce_file_format=True)
        paths.append(path)
    return paths[0], paths[1]


@pytest.fixture
def siim_source(shared_data: Path) -> Path:
    return sorted((shared_data / "siim-sample" / "dicom").glob("*.dcm"))[0]


def test_jpeg_ls_overlay_has_the_same_pixels_in_a_quarter_of_the_bytes(
    siim_source: Path,
    real_card: ModelCard,
    make_finding: Callable[..., Finding],
    assert_dciodvfy_clean: Callable[[Path], str],
    tmp_path: Path,
) -> None:
    raw_path, jls_path = _write_both(siim_source, real_card, make_finding, tmp_path)
    raw, jls = pydicom.dcmread(raw_path), pydicom.dcmread(jls_path)
    assert jls.file_meta.TransferSyntaxUID == JPEGLSLossless
    assert jls.PhotometricInterpretation == "RGB" and jls.PlanarConfiguration == 0
    np.testing.assert_array_equal(jls.pixel_array, raw.pixel_array)
    np.testing.assert_array_equal(hd.imread(jls_path).pixel_array, raw.pixel_array)
    assert jls_path.stat().st_size < raw_path.stat().st_size / 3
    for element in raw:  # the header is the same but for what describes the encoding
        if element.keyword != "PixelData":
            assert jls[element.tag] == element, element.keyword
    assert_dciodvfy_clean(jls_path)


def test_dcmtk_decodes_the_jpeg_ls_overlay_to_the_same_pixels(
    siim_source: Path, real_card: ModelCard, make_finding: Callable[..., Finding], tmp_path: Path
) -> None:
    dcmdjpls = shutil.which("dcmdjpls")
    if dcmdjpls is None:
        pytest.skip("dcmdjpls not installed (Debian package dcmtk)")
    raw_path, jls_path = _write_both(siim_source, real_card, make_finding, tmp_path)
    out = tmp_path / "dcmtk.dcm"
    subprocess.run([dcmdjpls, str(jls_path), str(out)], check=True, timeout=120)
    decoded = pydicom.dcmread(out)
    assert decoded.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    np.testing.assert_array_equal(decoded.pixel_array, pydicom.dcmread(raw_path).pixel_array)


def test_other_overlay_transfer_syntaxes_are_refused(
    real_card: ModelCard, make_finding: Callable[..., Finding]
) -> None:
    source = synthetic.make_radiograph(rows=32, columns=32)
    image = decode(source)
    finding = make_finding(synthetic.lesion_mask(32, 32), image)
    with pytest.raises(ValueError, match="overlay is written in one of") as info:
        build_overlay(
            source, image, finding, real_card, series_instance_uid="1.2.3",
            sop_instance_uid="1.2.4", transfer_syntax_uid=RLELossless,
        )  # fmt: skip
    assert str(source.SOPInstanceUID) in str(info.value)
