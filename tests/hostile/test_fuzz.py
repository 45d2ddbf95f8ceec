"""Property-based fuzzing of intake (UIDs, skip policy, receive) and of pixel decoding."""

from __future__ import annotations

import functools
import math
import re
from io import BytesIO
from pathlib import Path

import numpy as np
import pydicom
import pytest
import synthetic
from hostile.corpus import raw_element, spliced
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom.errors import BytesLengthException
from pydicom.filereader import read_dataset

from pneumonode.dicom.instance import spool_file_bytes
from pneumonode.dicom.intake import Intake, Outcome, Status, skip_reason
from pneumonode.dicom.pixels import DecodedImage, PixelError, decode
from pneumonode.identifiers import is_valid_uid
from pneumonode.queue.db import create_schema, make_engine
from pneumonode.queue.repository import JobRepository

UID_PATTERN = re.compile(r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*")
FUZZ = settings(max_examples=150, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

uid_components = st.one_of(st.just("0"), st.from_regex(r"[1-9][0-9]{0,8}", fullmatch=True))


@FUZZ
@given(st.text(alphabet="0123456789./a-\\ ", max_size=80))
def test_is_valid_uid_agrees_with_the_uid_grammar(text: str) -> None:
    expected = len(text) <= 64 and UID_PATTERN.fullmatch(text) is not None
    assert is_valid_uid(text) is expected


@FUZZ
@given(st.lists(uid_components, min_size=1, max_size=12).map(".".join))
def test_every_short_grammatical_uid_is_valid(uid: str) -> None:
    assert is_valid_uid(uid) is (len(uid) <= 64)


#: Header elements a hostile sender may send with any VR and any bytes.
FUZZED_TAGS = {
    0x00080005: "SpecificCharacterSet",
    0x00080060: "Modality",
    0x00180015: "BodyPartExamined",
    0x00280002: "SamplesPerPixel",
    0x00280008: "NumberOfFrames",
    0x00280010: "Rows",
    0x00280011: "Columns",
    0x00280100: "BitsAllocated",
    0x00280101: "BitsStored",
    0x00281052: "RescaleIntercept",
    0x00281053: "RescaleSlope",
    0x7FE00010: "PixelData",
}
VRS = ["CS", "LO", "DS", "IS", "US", "SS", "UL", "OB", "OW", "UN", "PN", "SH", "FD", "UT"]
TEXTS = [b"DX", b"CR", b"CT", b"CHEST", b"HEAD", b"NaN", b"-inf", b"1e400", b"abc", b"0", b"-1",
         b"3", b"20000", b"ISO_IR 192", b"ISO 2022 IR 87", b"ISO_IR 999", b"\\", b"", b"\xff\xfe"]


@st.composite
def raw_elements(draw: st.DrawFn) -> dict[int, bytes | None]:
    """Replacements for a valid radiograph's header: dropped, or any VR with any value."""
    chosen = draw(st.lists(st.sampled_from(sorted(FUZZED_TAGS)), max_size=5, unique=True))
    out: dict[int, bytes | None] = {}
    for tag in chosen:
        if draw(st.booleans()) and tag != 0x7FE00010:
            out[tag] = None
            continue
        value = draw(st.one_of(st.sampled_from(TEXTS), st.binary(max_size=12)))
        value += b" " * (len(value) % 2)
        out[tag] = raw_element(tag, draw(st.sampled_from(VRS)), value)
    return out


@functools.cache
def _base(seed: int) -> tuple[pydicom.Dataset, bytes]:
    """A small valid radiograph and its explicit VR little endian encoding (built once)."""
    ds = synthetic.make_radiograph(rows=8, columns=8, seed=seed)
    return ds, spliced(ds, {})


def _header(replace: dict[int, bytes | None], seed: int) -> tuple[pydicom.Dataset, bytes] | None:
    """The radiograph with ``replace`` spliced in, parsed as the listener parses a data set; None
    when parsing fails (the listener then answers 0xC000, as the corpus shows)."""
    ds, _ = _base(seed % 4)
    data = spliced(ds, replace)
    try:
        header = read_dataset(BytesIO(data), is_implicit_VR=False, is_little_endian=True)
    except (ValueError, TypeError, KeyError, AttributeError, OverflowError, LookupError,
            BytesLengthException):
        return None
    header.file_meta = ds.file_meta
    return header, data


@FUZZ
@given(raw_elements(), st.integers(0, 3))
def test_skip_reason_is_none_or_a_reason_for_any_header(
    replace: dict[int, bytes | None], seed: int
) -> None:
    parsed = _header(replace, seed)
    if parsed is None:
        return
    try:
        reason = skip_reason(parsed[0])
    except (ValueError, TypeError, KeyError, AttributeError, IndexError, OverflowError,
            LookupError, NotImplementedError, BytesLengthException):
        return  # Intake.receive turns these into 0xC000 (tested below)
    assert reason is None or (isinstance(reason, str) and reason)


@pytest.fixture(scope="module")
def fuzz_intake(tmp_path_factory: pytest.TempPathFactory) -> tuple[Intake, JobRepository, Path]:
    folder = tmp_path_factory.mktemp("fuzz-intake")
    engine = make_engine(f"sqlite:///{folder / 'jobs.db'}")
    create_schema(engine)
    repo = JobRepository(engine)
    return Intake(folder / "data", repo), repo, folder / "data"


@settings(max_examples=40, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(raw_elements(), st.integers(1, 10**12))
def test_receive_never_raises_and_answers_a_documented_status(
    fuzz_intake: tuple[Intake, JobRepository, Path], replace: dict[int, bytes | None], seed: int
) -> None:
    intake, repo, data_dir = fuzz_intake
    uid = f"2.25.{seed}".encode()
    fresh = raw_element(0x00080018, "UI", uid + b"\0" * (len(uid) % 2))  # new instances too
    parsed = _header({**replace, 0x00080018: fresh}, seed)
    if parsed is None:
        return
    header, dataset = parsed
    data = spool_file_bytes(dataset, header.file_meta, 1 << 30)
    result = intake.receive(data, "FUZZER", "127.0.0.1")
    assert result.status in (Status.SUCCESS, Status.CANNOT_UNDERSTAND)
    if result.status == Status.CANNOT_UNDERSTAND:
        assert result.outcome == Outcome.REFUSED and result.job_id is None and result.reason
        return
    job = repo.get_job(result.job_id) if result.job_id is not None else None
    assert job is not None
    if result.outcome == Outcome.QUEUED:
        assert job.state == "received" and job.spool_path is not None
        assert (data_dir / job.spool_path).read_bytes() == data
    elif result.outcome == Outcome.SKIPPED:
        assert job.state == "skipped" and job.skip_reason == result.reason
    else:
        assert result.outcome == Outcome.DUPLICATE


@st.composite
def images(draw: st.DrawFn) -> pydicom.Dataset:
    """Small images with random geometry, bit depth, sign, photometric, rescale and window."""
    rows, columns = draw(st.integers(1, 12)), draw(st.integers(1, 12))
    allocated = draw(st.sampled_from([8, 16]))
    stored = draw(st.integers(1, allocated))
    signed = draw(st.booleans())
    dtype = {(8, False): np.uint8, (8, True): np.int8, (16, False): np.uint16,
             (16, True): np.int16}[(allocated, signed)]
    info = np.iinfo(dtype)
    low, high = (-(2 ** (stored - 1)), 2 ** (stored - 1) - 1) if signed else (0, 2**stored - 1)
    values = draw(st.lists(st.integers(max(low, info.min), min(high, info.max)),
                           min_size=rows * columns, max_size=rows * columns))
    ds = synthetic.make_radiograph(rows=4, columns=4, seed=1)
    ds.Rows, ds.Columns = rows, columns
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = allocated, stored, stored - 1
    ds.PixelRepresentation = int(signed)
    ds.PhotometricInterpretation = draw(st.sampled_from(
        ["MONOCHROME1", "MONOCHROME2", "MONOCHROME2", "RGB", "PALETTE COLOR"]))
    pixels = np.asarray(values, dtype=dtype).tobytes()
    ds.PixelData = pixels + b"\0" * (len(pixels) % 2)
    ds["PixelData"].VR = "OB" if allocated == 8 else "OW"
    finite = st.floats(-1e300, 1e300, allow_nan=False, allow_infinity=False)
    ds.RescaleSlope = f"{draw(finite):.6g}"
    ds.RescaleIntercept = f"{draw(finite):.6g}"
    if draw(st.booleans()):
        ds.WindowCenter = f"{draw(finite):.6g}"
        ds.WindowWidth = f"{draw(st.floats(-10, 1e7, allow_nan=False)):.6g}"
        ds.VOILUTFunction = draw(st.sampled_from(["LINEAR", "LINEAR_EXACT", "SIGMOID", "CUBIC"]))
    else:
        for keyword in ("WindowCenter", "WindowWidth", "VOILUTFunction"):
            if keyword in ds:
                delattr(ds, keyword)
    return ds


@FUZZ
@given(images())
def test_decode_gives_an_image_in_unit_range_or_a_pixel_error(ds: pydicom.Dataset) -> None:
    """Rescale values are finite here: non-finite ones are skipped at intake (skip_reason)."""
    try:
        decoded = decode(ds, max_pixels=10_000)
    except PixelError as exc:
        assert str(ds.SOPInstanceUID) in str(exc)
        return
    assert isinstance(decoded, DecodedImage)
    assert decoded.image.shape == (ds.Rows, ds.Columns)
    assert decoded.image.dtype == np.float32
    assert np.isfinite(decoded.image).all()
    assert float(decoded.image.min()) >= 0.0 and float(decoded.image.max()) <= 1.0


def test_non_finite_rescale_never_reaches_decoding() -> None:
    for text in ("NaN", "inf", "-inf", "1e999"):
        ds = synthetic.make_radiograph(rows=8, columns=8)
        raw = raw_element(0x00281053, "DS", (text + " " * (len(text) % 2)).encode())
        header = read_dataset(BytesIO(raw), is_implicit_VR=False, is_little_endian=True)
        ds.RescaleSlope = header.RescaleSlope
        assert not math.isfinite(float(ds.RescaleSlope))
        assert "is not a finite number" in str(skip_reason(ds))
