"""Prepare the source image's metadata that the result objects copy: only what they need, VR-valid.

highdicom copies the Patient and Study modules (and, for a SEG, the acquisition equipment and the
Specimen module) from the source image it is given, and references the source by its UIDs. A
received image can hold anything: a 300,000-item sequence, private data, values that break their
Value Representation (over-long, control characters, backslashes, malformed dates). A result
object must still be small, quick to build and pass dciodvfy. :func:`source_metadata` therefore
gives highdicom a *new* dataset holding only an allowlist of attributes, read one by one from the
source (nothing is iterated or deep-copied, so the source's size does not matter):

* the UIDs and matrix size a reference needs (SOP Class/Instance, Study/Series Instance UID,
  Rows, Columns), Specific Character Set, Modality;
* Patient: Patient's Name, Patient ID, Issuer of Patient ID, Birth Date, Sex, Patient Identity
  Removed, De-identification Method; Patient Study: Patient's Age;
* General Study: Study Date and Time, Referring Physician's Name, Study ID, Accession Number,
  Study Description;
* acquisition equipment (for the SEG's Contributing Equipment): Manufacturer, Manufacturer's
  Model Name, Software Versions, Device Serial Number, Institution Name, Institutional Department
  Name, Station Name, Acquisition Date, Time and DateTime;
* Body Part Examined, Lossy Image Compression (with Method and Ratio).

No sequence, no private element and no spatial attribute of the source is ever copied (a
projection radiograph has no Frame of Reference; see :mod:`pneumonode.outputs.seg`). Each value
is checked against its VR (PS3.5 6.2):

* identifiers (Patient ID, Issuer of Patient ID, Accession Number, Study ID) that are too long or
  hold a control character or a backslash are left empty (Type 2) or dropped (Type 3): a cut or
  edited identifier could match another patient or order, an empty one matches nothing;
* person names are repaired: control characters removed, at most 3 component groups of at most 5
  components, the phonetic and ideographic groups left out while the whole is longer than 64
  bytes, then the first group cut to 64 (dciodvfy's reading of the limit);
* descriptive text (descriptions, equipment names) is repaired: control characters and
  backslashes removed, cut to the VR's length;
* lengths are counted in bytes as the result encodes the value (its Specific Character Set),
  since dciodvfy counts so: 64 Kanji are 192 bytes in UTF-8;
* dates, times, code strings (Patient's Sex, Body Part Examined, ...) and ages that do not match
  their format are left empty (Type 2) or dropped.

The fixes are logged in one line with the attributes, the rules and the SOP Instance UID, never
the values.
:func:`quiet_person_name_warnings` silences highdicom's warning about single-component person
names, whose text quotes the name itself and so would put patient data into the logs.
"""

from __future__ import annotations

import logging
import math
import re
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Final

from pydicom import Dataset
from pydicom.charset import convert_encodings, encode_string
from pydicom.dataset import FileMetaDataset
from pydicom.multival import MultiValue
from pydicom.uid import ExplicitVRLittleEndian

from pneumonode.identifiers import is_valid_uid

__all__ = [
    "patient_orientation",
    "pixel_spacing",
    "quiet_person_name_warnings",
    "source_metadata",
]

LOGGER = logging.getLogger(__name__)

_REQUIRED_UIDS = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")
# Identifiers: (maximum length, Type 2 in the results). Invalid ones are emptied or dropped.
_IDENTIFIERS: Final = {
    "PatientID": (64, True),
    "IssuerOfPatientID": (64, False),
    "AccessionNumber": (16, True),
    "StudyID": (16, True),
}
_PERSON_NAMES: Final = {"PatientName": True, "ReferringPhysicianName": True}
# Descriptive text: maximum length per value. Repaired, never emptied for being long.
_TEXTS: Final = {
    "StudyDescription": 64,
    "DeidentificationMethod": 64,
    "Manufacturer": 64,
    "ManufacturerModelName": 64,
    "DeviceSerialNumber": 64,
    "InstitutionName": 64,
    "InstitutionalDepartmentName": 64,
    "StationName": 16,
}
_MULTI_TEXTS: Final = {"SoftwareVersions": 64}
_MAX_VALUES = 16
_DATE = re.compile(r"^\d{8}$")
_TIME = re.compile(r"^\d{2}(\d{2}(\d{2}(\.\d{1,6})?)?)?$")
_DATETIME = re.compile(r"^\d{4}(\d{2}(\d{2}(\d{2}(\d{2}(\d{2}(\.\d{1,6})?)?)?)?)?)?([+-]\d{4})?$")
_AGE = re.compile(r"^\d{3}[DWMY]$")
_CODE = re.compile(r"^[A-Z0-9 _]{1,16}$")
_DECIMAL = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")
_ORIENTATION = re.compile(r"^[APRLHF]{1,3}$")
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_PERSON_NAME_WARNING = r".*unlikely to represent the intended person name.*"


def source_metadata(source: Dataset) -> Dataset:
    """Return a new dataset with the allowlisted, VR-valid attributes of the source header.

    Parameters
    ----------
    source:
        The received image.

    Returns
    -------
    pydicom.Dataset
        The allowlisted attributes, with file meta declaring Explicit VR Little Endian.

    Raises
    ------
    ValueError
        When a UID that every result object needs is missing or malformed, or Rows or Columns
        is not a positive integer.
    """
    sop_uid = _sop_uid(source)
    meta = Dataset()
    for keyword in _REQUIRED_UIDS:
        value = _single_text(source.get(keyword))
        if not is_valid_uid(value):
            raise ValueError(
                f"rule: the source must have a valid {keyword} (a DICOM UID, PS3.5 9.1) to "
                f"derive results; it is {'absent' if not value else 'malformed'} (SOP {sop_uid})"
            )
        setattr(meta, keyword, value)
    for keyword in ("Rows", "Columns"):
        value = source.get(keyword)
        if not isinstance(value, int) or not 1 <= value <= 0xFFFF:
            raise ValueError(
                f"rule: the source must have {keyword} in 1..65535 to derive results "
                f"(SOP {sop_uid})"
            )
        setattr(meta, keyword, value)
    _copy_character_set(source, meta)
    fixes = _Fixes(meta.get("SpecificCharacterSet"))
    for keyword, (limit, type2) in _IDENTIFIERS.items():
        _copy_identifier(source, meta, keyword, limit, type2, fixes)
    for keyword, type2 in _PERSON_NAMES.items():
        _copy_person_name(source, meta, keyword, type2, fixes)
    for keyword, limit in _TEXTS.items():
        text = _repaired_text(source, keyword, limit, fixes)
        if text:
            setattr(meta, keyword, text)
    for keyword, limit in _MULTI_TEXTS.items():
        values = _repaired_values(source, keyword, limit, fixes)
        if values:
            setattr(meta, keyword, values)
    meta.PatientBirthDate = _formatted(source, "PatientBirthDate", _DATE, fixes)
    meta.StudyDate = _formatted(source, "StudyDate", _DATE, fixes)
    meta.StudyTime = _formatted(source, "StudyTime", _TIME, fixes)
    sex = _formatted(source, "PatientSex", _CODE, fixes)
    meta.PatientSex = sex if sex in ("M", "F", "O") else ""
    for keyword, pattern in (
        ("PatientAge", _AGE),
        ("AcquisitionDate", _DATE),
        ("AcquisitionTime", _TIME),
        ("AcquisitionDateTime", _DATETIME),
        ("Modality", _CODE),
        ("BodyPartExamined", _CODE),
        ("PatientIdentityRemoved", re.compile(r"^(YES|NO)$")),
        ("LossyImageCompression", re.compile(r"^0[01]$")),
    ):
        value = _formatted(source, keyword, pattern, fixes)
        if value:
            setattr(meta, keyword, value)
    methods = _matching_values(source, "LossyImageCompressionMethod", _CODE, fixes)
    if methods:
        meta.LossyImageCompressionMethod = methods
    ratios = _matching_values(source, "LossyImageCompressionRatio", _DECIMAL, fixes)
    if ratios and all(len(r) <= 16 for r in ratios):
        meta.LossyImageCompressionRatio = ratios
    if fixes:
        LOGGER.warning(
            "SOP %s: source attributes that break their VR, fixed for the results: %s",
            sop_uid,
            ", ".join(fixes),
        )
    meta.file_meta = FileMetaDataset()
    meta.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.file_meta.MediaStorageSOPClassUID = meta.SOPClassUID
    meta.file_meta.MediaStorageSOPInstanceUID = meta.SOPInstanceUID
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


def _sop_uid(source: Dataset) -> str:
    value = _single_text(source.get("SOPInstanceUID"))
    if is_valid_uid(value):
        return value
    return "<no valid SOP Instance UID>"


def _values(value: object) -> list[str]:
    """The string values of an element value (bytes decoded as Latin-1, None as none)."""
    if value is None:
        return []
    if isinstance(value, MultiValue | list | tuple):
        return [_single_text(v) for v in value]
    return [_single_text(value)]


def _single_text(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, bytes):
        return value.decode("latin-1")
    return str(value)


class _Fixes(list[str]):
    """What was fixed or dropped, one ``"Keyword (rule; action)"`` per attribute, no values.

    Also knows the character set the results encode text in: dciodvfy holds a value to its VR's
    maximum length in *bytes* as encoded, so a UTF-8 or ISO 2022 value is measured that way.
    """

    def __init__(self, charsets: object) -> None:
        super().__init__()
        values = _values(charsets)
        try:
            self.encodings = convert_encodings(values or None)
        except LookupError:
            self.encodings = convert_encodings(None)

    def add(self, keyword: str, rule: str, action: str) -> None:
        self.append(f"{keyword} ({rule}; {action})")

    def length(self, text: str) -> int:
        """Length of ``text`` in bytes as the results encode it."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # unencodable characters count as one replacement
            return len(encode_string(text, self.encodings))

    def cut(self, text: str, limit: int) -> str:
        """``text`` cut to at most ``limit`` characters and ``limit`` encoded bytes."""
        text = text[:limit]
        while text and self.length(text) > limit:
            text = text[:-1]
        return text


def _copy_character_set(source: Dataset, meta: Dataset) -> None:
    charsets = source.get("SpecificCharacterSet")
    if not charsets:
        return
    values = _values(charsets)
    if len(values) > 1 and not values[0].strip():
        # An empty first value means the default repertoire with ISO 2022 code extensions
        # (PS3.3 C.12.1.1.2); highdicom wants it spelled out.
        values[0] = "ISO 2022 IR 6"
    meta.SpecificCharacterSet = values if len(values) > 1 else values[0]


def _copy_identifier(
    source: Dataset, meta: Dataset, keyword: str, limit: int, type2: bool, fixes: _Fixes
) -> None:
    if keyword not in source:
        if type2:
            setattr(meta, keyword, "")
        return
    values = _values(source[keyword].value)
    text = values[0].strip() if len(values) == 1 else ""
    problem = None
    if len(values) > 1:
        problem = "holds a backslash (several values)"
    elif fixes.length(text) > limit:
        problem = f"is longer than {limit} characters (bytes as encoded)"
    elif _CONTROL.search(text) or "\\" in text:
        problem = "holds a control character or a backslash"
    if problem is None:
        if text or type2:
            setattr(meta, keyword, text)
        return
    fixes.add(keyword, problem, "left empty" if type2 else "left out")
    if type2:
        setattr(meta, keyword, "")


def _copy_person_name(
    source: Dataset, meta: Dataset, keyword: str, type2: bool, fixes: _Fixes
) -> None:
    values = _values(source.get(keyword))
    original = "\\".join(values)
    groups = [
        "^".join(group.split("^")[:5])
        for group in _CONTROL.sub("", original.replace("\\", " ")).split("=")[:3]
    ]
    while fixes.length("=".join(groups)) > 64 and len(groups) > 1:
        groups.pop()  # dciodvfy holds the whole value, not each group, to 64 bytes
    groups[0] = fixes.cut(groups[0], 64)
    repaired = "=".join(groups)
    if repaired != original:
        fixes.add(keyword, "does not fit the PN VR", "repaired")
    if repaired or type2:
        setattr(meta, keyword, repaired)


def _repair(text: str, limit: int, fixes: _Fixes) -> str:
    return fixes.cut(_CONTROL.sub("", text).replace("\\", "/").strip(), limit).rstrip()


def _repaired_text(source: Dataset, keyword: str, limit: int, fixes: _Fixes) -> str:
    values = _values(source.get(keyword))
    if not values:
        return ""
    original = "\\".join(values)
    repaired = _repair(original, limit, fixes)
    if repaired != original.strip():
        fixes.add(keyword, f"does not fit its VR (at most {limit} characters, no controls)",
               "repaired")  # fmt: skip
    return repaired


def _repaired_values(source: Dataset, keyword: str, limit: int, fixes: _Fixes) -> list[str]:
    values = _values(source.get(keyword))
    repaired = [_repair(v, limit, fixes) for v in values[:_MAX_VALUES]]
    if repaired != [v.strip() for v in values]:
        fixes.add(keyword, f"does not fit its VR (at most {limit} characters per value)",
               "repaired")  # fmt: skip
    return [v for v in repaired if v]


def _formatted(source: Dataset, keyword: str, pattern: re.Pattern[str], fixes: _Fixes) -> str:
    values = _values(source.get(keyword))
    if not values:
        return ""
    text = values[0].strip() if len(values) == 1 else ""
    if pattern.match(text):
        return text
    if any(v.strip() for v in values):
        fixes.add(keyword, "does not match its VR's format", "left empty or out")
    return ""


def _matching_values(
    source: Dataset, keyword: str, pattern: re.Pattern[str], fixes: _Fixes
) -> list[str]:
    values = [v.strip() for v in _values(source.get(keyword))]
    if not values:
        return []
    if len(values) <= _MAX_VALUES and all(pattern.match(v) for v in values):
        return values
    fixes.add(keyword, "does not match its VR's format", "left out")
    return []
