"""Prepare the source image's metadata that the result objects copy, valid and without pixels.

highdicom copies the Patient and Study modules from the source image and references the source
by its UIDs. Real sources are not always tidy (the SIIM files carry Patient's Age ``38``, which
is not a valid Age String; some films carry Pixel Spacing ``0\\0``), and a result object must
still pass dciodvfy. :func:`source_metadata` therefore returns a copy of the source header that

* has no pixel data (nothing large is copied);
* has no spatial attributes (Frame of Reference, Image Position/Orientation (Patient), Pixel
  Spacing, Imager Pixel Spacing, Slice Thickness): a projection radiograph has no 3-D frame of
  reference, so the SEG is built on the source's pixel grid alone, and highdicom then writes no
  Pixel Measures (the DESIGN trap: a Pixel Measures item without Slice Thickness cannot be read
  back by ``segread``, and a radiograph has no slice thickness to state);
* has every Type 2 Patient/Study attribute that highdicom reads (empty when absent or invalid);
* drops an invalid Patient's Age (Type 3) instead of copying it.

:func:`quiet_person_name_warnings` silences highdicom's warning about single-component person
names, whose text quotes the name itself and so would put patient data into the logs.
"""

from __future__ import annotations

import copy
import math
import re
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

from pydicom import Dataset
from pydicom.dataset import FileMetaDataset
from pydicom.multival import MultiValue
from pydicom.uid import ExplicitVRLittleEndian

__all__ = [
    "patient_orientation",
    "pixel_spacing",
    "quiet_person_name_warnings",
    "source_metadata",
]

_SPATIAL = frozenset(
    {
        "FrameOfReferenceUID",
        "PositionReferenceIndicator",
        "ImagePositionPatient",
        "ImageOrientationPatient",
        "PixelSpacing",
        "ImagerPixelSpacing",
        "SliceThickness",
        "SpacingBetweenSlices",
        "SliceLocation",
    }
)
_REQUIRED_UIDS = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")
_TYPE2_TEXT = (
    "PatientName",
    "PatientID",
    "ReferringPhysicianName",
    "StudyID",
    "AccessionNumber",
)
_DATE = re.compile(r"^\d{8}$")
_TIME = re.compile(r"^\d{2}(\d{2}(\d{2}(\.\d{1,6})?)?)?$")
_AGE = re.compile(r"^\d{3}[DWMY]$")
_ORIENTATION = re.compile(r"^[APRLHF]{1,3}$")
_PERSON_NAME_WARNING = r".*unlikely to represent the intended person name.*"


def source_metadata(source: Dataset) -> Dataset:
    """Return a pixel-free, spatial-free, VR-valid copy of the source header.

    Parameters
    ----------
    source:
        The received image.

    Returns
    -------
    pydicom.Dataset
        The copy, with file meta declaring Explicit VR Little Endian.

    Raises
    ------
    ValueError
        When a UID that every result object needs is missing.
    """
    sop_uid = str(source.get("SOPInstanceUID", "<no SOP Instance UID>"))
    for keyword in _REQUIRED_UIDS:
        if not str(source.get(keyword, "")).strip():
            raise ValueError(
                f"rule: the source must have {keyword} to derive results; it is absent "
                f"(SOP {sop_uid})"
            )
    meta = Dataset()
    for element in source:
        if element.tag.group in (0x7FE0, 0xFFFC) or element.keyword in _SPATIAL:
            continue
        meta.add(copy.deepcopy(element))
    for keyword in _TYPE2_TEXT:
        if keyword not in meta or meta[keyword].value is None:
            setattr(meta, keyword, "")
    charsets = meta.get("SpecificCharacterSet")
    if isinstance(charsets, MultiValue) and len(charsets) > 1 and not str(charsets[0]).strip():
        # An empty first value means the default repertoire with ISO 2022 code extensions
        # (PS3.3 C.12.1.1.2); highdicom wants it spelled out.
        meta.SpecificCharacterSet = ["ISO 2022 IR 6", *charsets[1:]]
    meta.PatientBirthDate = _valid_or_empty(source.get("PatientBirthDate"), _DATE)
    meta.StudyDate = _valid_or_empty(source.get("StudyDate"), _DATE)
    meta.StudyTime = _valid_or_empty(source.get("StudyTime"), _TIME)
    sex = str(source.get("PatientSex", "") or "").strip().upper()
    meta.PatientSex = sex if sex in ("M", "F", "O") else ""
    if "PatientAge" in meta and not _AGE.match(str(meta.PatientAge or "")):
        del meta.PatientAge
    meta.file_meta = FileMetaDataset()
    meta.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.file_meta.MediaStorageSOPClassUID = source.SOPClassUID
    meta.file_meta.MediaStorageSOPInstanceUID = source.SOPInstanceUID
    return meta


def patient_orientation(source: Dataset) -> list[str]:
    """Return the source's Patient Orientation when it is two valid values, else ``[]``.

    A result object on the source's pixel grid has the source's orientation; an absent or
    malformed value becomes empty (the attribute is Type 2C).

    Parameters
    ----------
    source:
        The received image.

    Returns
    -------
    list of str
        Two values such as ``["L", "F"]``, or an empty list.
    """
    value = source.get("PatientOrientation")
    if value is None or isinstance(value, str | bytes):
        values = [str(value)] if value else []
    else:
        values = [str(v) for v in value]
    if len(values) == 2 and all(_ORIENTATION.match(v) for v in values):
        return values
    return []


def pixel_spacing(source: Dataset) -> tuple[float, float] | None:
    """Return the source's (row, column) spacing in mm: Pixel Spacing, else Imager Pixel Spacing.

    Parameters
    ----------
    source:
        The received image.

    Returns
    -------
    tuple of float, or None
        Two finite positive numbers, or None when neither attribute holds such a pair.
    """
    for keyword in ("PixelSpacing", "ImagerPixelSpacing"):
        value = source.get(keyword)
        if value is None or isinstance(value, str | bytes):
            continue
        try:
            numbers = [float(v) for v in value]
        except (TypeError, ValueError):
            continue
        if len(numbers) == 2 and all(math.isfinite(v) and v > 0 for v in numbers):
            return numbers[0], numbers[1]
    return None


@contextmanager
def quiet_person_name_warnings() -> Iterator[None]:
    """Ignore highdicom's person-name warning, whose message contains the name.

    Yields
    ------
    None
        Inside the block, that one warning is ignored; every other warning is unchanged.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_PERSON_NAME_WARNING, category=UserWarning)
        yield


def _valid_or_empty(value: object, pattern: re.Pattern[str]) -> str:
    text = "" if value is None else str(value).strip()
    return text if pattern.match(text) else ""
