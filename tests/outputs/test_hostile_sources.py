"""Results from hostile sources: only what the IOD needs is copied, VR-valid, fast, size-bounded."""

from __future__ import annotations

import datetime
import logging
import struct
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from io import BytesIO
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
import synthetic
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom.config import settings as pydicom_settings
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import generate_uid

from pneumonode.dicom.pixels import decode
from pneumonode.findings import Finding
from pneumonode.inference.card import ModelCard
from pneumonode.outputs.overlay import build_overlay
from pneumonode.outputs.seg import build_segmentation
from pneumonode.outputs.sr import build_report

CREATED = datetime.datetime(2024, 3, 4, 5, 6, 7)
# Values that break their VR: over-long, control characters, backslashes, wrong format.
HOSTILE_VALUES: dict[str, str] = {
    "PatientName": "DOE\x01^JOHN\x1b[2J" + "X" * 200 + "^A^B^C^D^E=F=G=H",
    "PatientID": "ID\x00\x07" + "9" * 100,
    "IssuerOfPatientID": "ISSUER\\TWO\x0b",
    "AccessionNumber": "ACC\r\n" + "1" * 40,
    "StudyID": "STUDY\x7f" + "2" * 30,
    "ReferringPhysicianName": "\x1b]0;pwned\x07" + "R" * 150,
    "StudyDescription": "CHEST\x1b[31m" + "D" * 100,
    "PatientBirthDate": "19A0-01-01",
    "PatientSex": "male\x00",
    "PatientAge": "38",
    "StudyDate": "2024/01/02",
    "StudyTime": "25:99",
    "BodyPartExamined": "chest;drop",
    "Manufacturer": "ACME\x08" + "M" * 90,
    "ManufacturerModelName": "MODEL\\X",
    "InstitutionName": "HOSP\x0c" + "I" * 80,
    "StationName": "STATION-NAME-TOO-LONG-FOR-SH",
    "DeviceSerialNumber": "SN\x1f" + "5" * 70,
    "AcquisitionDateTime": "yesterday",
}


@pytest.fixture
def lenient_pydicom() -> Iterator[None]:
    """Let pydicom write and read values that break their VR (the point of these tests)."""
    with _lenient():
        yield


@contextmanager
def _lenient() -> Iterator[None]:
    reading = pydicom_settings.reading_validation_mode
    writing = pydicom_settings.writing_validation_mode
    pydicom_settings.reading_validation_mode = pydicom.config.IGNORE
    pydicom_settings.writing_validation_mode = pydicom.config.IGNORE
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        pydicom_settings.reading_validation_mode = reading
        pydicom_settings.writing_validation_mode = writing


def _build_all(
    source: Dataset, card: ModelCard, make_finding: Callable[..., Finding], positive: bool = True
) -> dict[str, Dataset]:
    image = decode(source)
    mask = synthetic.lesion_mask(int(source.Rows), int(source.Columns)) & positive
    finding = make_finding(mask, image)
    seg = build_segmentation(
        source, finding, card,
        series_instance_uid=str(generate_uid()), sop_instance_uid=str(generate_uid()),
        created=CREATED,
    )  # fmt: skip
    sc = build_overlay(
        source, image, finding, card,
        series_instance_uid=str(generate_uid()), sop_instance_uid=str(generate_uid()),
        created=CREATED,
    )  # fmt: skip
    sr = build_report(
        source, finding, card, seg,
        series_instance_uid=str(generate_uid()), sop_instance_uid=str(generate_uid()),
        created=CREATED,
    )  # fmt: skip
    return {"seg": seg, "sc": sc, "sr": sr}


def _reread(source: Dataset, folder: Path) -> Dataset:
    return pydicom.dcmread(synthetic.write(source, folder / "source.dcm"))


def _has_control_characters(text: str) -> bool:
    return any(ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F for c in text)


def test_values_that_break_their_vr_are_fixed_or_dropped(
    real_card: ModelCard,
    make_finding: Callable[..., Finding],
    assert_dciodvfy_clean: Callable[[Path], str],
    lenient_pydicom: None,
    caplog: pytest.LogCaptureFixture,
    tmp_path: Path,
) -> None:
    source = synthetic.make_radiograph(rows=64, columns=64)
    for keyword, value in HOSTILE_VALUES.items():
        setattr(source, keyword, value)
    source = _reread(source, tmp_path)
    assert len(str(source.PatientID)) > 64  # the source really holds the hostile values
    with caplog.at_level(logging.WARNING, logger="pneumonode.outputs.source"):
        results = _build_all(source, real_card, make_finding)
    fixes = [r.getMessage() for r in caplog.records if r.name == "pneumonode.outputs.source"]
    assert len(fixes) == 3  # one line per result object built
    assert str(source.SOPInstanceUID) in fixes[0] and "PatientID" in fixes[0]
    assert not [m for m in fixes if "DOE" in m or "pwned" in m or "999" in m]  # no values
    for name, result in results.items():
        path = tmp_path / f"{name}.dcm"
        pydicom.dcmwrite(path, result, enforce_file_format=True)
        assert_dciodvfy_clean(path)
        back = pydicom.dcmread(path)
        limits = {
            "PatientID": 64, "IssuerOfPatientID": 64, "AccessionNumber": 16, "StudyID": 16,
            "StudyDescription": 64,
        }  # fmt: skip
        for keyword, limit in limits.items():
            text = str(back.get(keyword, "") or "")
            assert len(text) <= limit and not _has_control_characters(text), (name, keyword)
            assert "\\" not in text, (name, keyword)
        for keyword in ("PatientName", "ReferringPhysicianName"):
            text = str(back.get(keyword, "") or "")
            groups = text.split("=")
            assert len(groups) <= 3 and all(len(g) <= 64 for g in groups), (name, keyword)
            assert all(len(g.split("^")) <= 5 for g in groups), (name, keyword)
            assert not _has_control_characters(text), (name, keyword)
        assert str(back.PatientName).startswith("DOE^JOHN")  # a name is repaired, not lost
        assert back.get("PatientSex", "") == ""
        assert back.get("PatientBirthDate", "") == "" and back.get("StudyDate", "") == ""
        assert "PatientAge" not in back
        for item in back.get("ContributingEquipmentSequence", []):
            for keyword in ("Manufacturer", "InstitutionName", "DeviceSerialNumber"):
                text = str(item.get(keyword, "") or "")
                assert len(text) <= 64 and not _has_control_characters(text), (name, keyword)
            assert len(str(item.get("StationName", "") or "")) <= 16


@pytest.mark.parametrize(
    ("charsets", "name"),
    [
        ("ISO_IR 192", "山田^太郎=やまだ^たろう=YAMADA^TARO" + "あ" * 40),
        (["", "ISO 2022 IR 87"], "Yamada^Tarou=山田^太郎" + "郎" * 30 + "=やまだ^たろう"),
    ],
    ids=["utf8", "jis"],
)
def test_multibyte_values_are_cut_to_their_encoded_length(
    charsets: str | list[str],
    name: str,
    real_card: ModelCard,
    make_finding: Callable[..., Finding],
    assert_dciodvfy_clean: Callable[[Path], str],
    lenient_pydicom: None,
    tmp_path: Path,
) -> None:
    source = synthetic.make_radiograph(rows=48, columns=48)
    source.SpecificCharacterSet = charsets
    source.PatientName = name
    source.StudyDescription = "胸部" * 40  # 80 characters, 160+ bytes
    source.InstitutionName = "病院" * 30
    source = _reread(source, tmp_path)
    for kind, result in _build_all(source, real_card, make_finding).items():
        path = tmp_path / f"{kind}.dcm"
        pydicom.dcmwrite(path, result, enforce_file_format=True)
        assert_dciodvfy_clean(path)
        back = pydicom.dcmread(path)
        assert str(back.PatientName).startswith(name[:4])  # repaired, not emptied
        assert back.StudyDescription.startswith("胸部")


def test_valid_values_are_kept_as_they_are(
    real_card: ModelCard, make_finding: Callable[..., Finding], tmp_path: Path
) -> None:
    source = synthetic.make_radiograph(rows=32, columns=32)
    source.IssuerOfPatientID = "HOSPITAL A"
    source.PatientAge = "045Y"
    source = _reread(source, tmp_path)
    for result in _build_all(source, real_card, make_finding).values():
        for keyword in (
            "PatientName", "PatientID", "IssuerOfPatientID", "AccessionNumber", "StudyID",
            "ReferringPhysicianName", "StudyDescription", "PatientBirthDate", "PatientSex",
            "StudyDate", "StudyTime", "PatientAge",
        ):  # fmt: skip
            assert result.get(keyword) == source.get(keyword), keyword


def _rss_mb() -> float:
    with open("/proc/self/status") as status:
        fields = dict(line.split(":", 1) for line in status)
    return int(fields["VmRSS"].split()[0]) / 1024


def _peak_rss_mb() -> float:
    with open("/proc/self/status") as status:
        fields = dict(line.split(":", 1) for line in status)
    return int(fields["VmHWM"].split()[0]) / 1024


def _reset_peak_rss() -> None:
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)


def _with_huge_sequence(source: Dataset, items: int, path: Path) -> Path:
    """Write ``source`` with an Other Patient IDs Sequence of ``items`` items.

    pydicom writes a one-item sequence with defined lengths; its item is then repeated in the
    bytes (building 300,000 pydicom items would take the test a minute).
    """
    item = Dataset()
    item.PatientID = "OTHER-ID-0000001"
    item.TypeOfPatientID = "TEXT"
    source.OtherPatientIDsSequence = Sequence([item])
    buffer = BytesIO()
    pydicom.dcmwrite(buffer, source, enforce_file_format=True)
    raw = buffer.getvalue()
    start = raw.index(b"\x10\x00\x02\x10SQ\x00\x00")  # (0010,1002), explicit VR LE
    (length,) = struct.unpack("<I", raw[start + 8 : start + 12])
    body = raw[start + 12 : start + 12 + length]
    path.write_bytes(
        raw[: start + 8]
        + struct.pack("<I", length * items)
        + body * items
        + raw[start + 12 + length :]
    )
    return path


@pytest.mark.slow
@pytest.mark.skipif(sys.platform != "linux", reason="peak RSS is read from /proc (Linux only)")
def test_a_huge_source_sequence_is_not_copied_and_costs_nothing(
    real_card: ModelCard, make_finding: Callable[..., Finding], tmp_path: Path
) -> None:
    source = synthetic.make_radiograph(rows=64, columns=64)
    source.add_new(0x00091010, "LO", "PRIVATE CREATOR")
    source.add_new(0x00091011, "SQ", Sequence([Dataset(), Dataset()]))  # a private sequence
    source.OperatorsName = "OPERATOR^SECRET"  # not part of any result IOD's copied modules
    # Other Patient IDs Sequence is in the Patient module, which highdicom copies.
    path = _with_huge_sequence(source, 300_000, tmp_path / "source.dcm")
    assert path.stat().st_size > 7_000_000
    source = pydicom.dcmread(path)
    len(source.OtherPatientIDsSequence)  # parse it now, not inside the timed part
    # Warm up (imports, highdicom's code tables) on a clean source, so only the cost of the
    # hostile one is measured.
    _build_all(synthetic.make_radiograph(rows=64, columns=64), real_card, make_finding)
    before = _rss_mb()
    _reset_peak_rss()
    started = time.perf_counter()
    results = _build_all(source, real_card, make_finding)
    elapsed = time.perf_counter() - started
    growth = _peak_rss_mb() - before
    for name, result in results.items():
        assert "OtherPatientIDsSequence" not in result, name
        assert "OperatorsName" not in result, name
        assert not [e for e in result if e.tag.is_private], name
    assert elapsed < 5.0, f"building SEG, SC and SR took {elapsed:.1f} s"
    assert growth < 50, f"building SEG, SC and SR grew the process by {growth:.0f} MB"


def test_a_one_column_65535_row_source_gives_a_bounded_overlay(
    real_card: ModelCard,
    make_finding: Callable[..., Finding],
    assert_dciodvfy_clean: Callable[[Path], str],
    tmp_path: Path,
) -> None:
    source = synthetic.make_radiograph(rows=65535, columns=1, window=False)
    image = decode(source)
    mask = np.zeros((65535, 1), dtype=bool)
    mask[30000:30100] = True
    finding = make_finding(mask, image)
    sc = build_overlay(
        source, image, finding, real_card,
        series_instance_uid=str(generate_uid()), sop_instance_uid=str(generate_uid()),
        created=CREATED,
    )  # fmt: skip
    assert 1 <= sc.Rows <= 65535 and 1 <= sc.Columns <= 65535
    assert sc.Rows * sc.Columns * 3 == len(sc.PixelData)
    path = tmp_path / "sc.dcm"
    pydicom.dcmwrite(path, sc, enforce_file_format=True)
    assert_dciodvfy_clean(path)
    assert hd.imread(path).pixel_array.shape == (sc.Rows, sc.Columns, 3)


def test_a_wide_one_row_source_gives_a_bounded_overlay(
    real_card: ModelCard, make_finding: Callable[..., Finding]
) -> None:
    source = synthetic.make_radiograph(rows=1, columns=65535, window=False)
    image = decode(source)
    finding = make_finding(np.zeros((1, 65535), dtype=bool), image)
    sc = build_overlay(
        source, image, finding, real_card,
        series_instance_uid=str(generate_uid()), sop_instance_uid=str(generate_uid()),
        created=CREATED,
    )  # fmt: skip
    assert 1 <= sc.Rows <= 65535 and sc.Columns <= 65535
    assert sc.Rows * sc.Columns <= 65535 * 512  # the banner stays a banner


_TEXT_KEYWORDS = (
    "PatientName", "PatientID", "IssuerOfPatientID", "AccessionNumber", "StudyID",
    "ReferringPhysicianName", "StudyDescription", "Manufacturer", "InstitutionName",
    "StationName",
)  # fmt: skip
_ASCII_KEYWORDS = ("BodyPartExamined", "PatientSex", "PatientAge", "StudyDate", "StudyTime")


def _source_values(charset: str, top: int) -> st.SearchStrategy[tuple[str, dict[str, str]]]:
    """Any values the source's character set can hold (ASCII for dates, times and codes)."""
    text = st.text(st.characters(max_codepoint=top, exclude_categories=("Cs",)), max_size=90)
    ascii_text = st.text(st.characters(max_codepoint=127), max_size=40)
    values = st.fixed_dictionaries(
        {**{k: text for k in _TEXT_KEYWORDS}, **{k: ascii_text for k in _ASCII_KEYWORDS}}
    )
    return st.tuples(st.just(charset), values)


@pytest.mark.slow
@settings(
    max_examples=8, deadline=None, database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)  # fmt: skip
@given(
    case=st.one_of(_source_values("ISO_IR 100", 0xFF), _source_values("ISO_IR 192", 0x9FFF))
)
def test_any_text_values_give_results_that_pass_dciodvfy(
    case: tuple[str, dict[str, str]],
    real_card: ModelCard,
    make_finding: Callable[..., Finding],
    assert_dciodvfy_clean: Callable[[Path], str],
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    charset, values = case
    folder = tmp_path_factory.mktemp("fuzz")
    with _lenient():
        source = synthetic.make_radiograph(rows=32, columns=32)
        source.SpecificCharacterSet = charset
        for keyword, value in values.items():
            setattr(source, keyword, value)
        source = _reread(source, folder)
        for kind, result in _build_all(source, real_card, make_finding).items():
            path = folder / f"{kind}.dcm"
            pydicom.dcmwrite(path, result, enforce_file_format=True)
            assert_dciodvfy_clean(path)
