"""The hostile-input corpus: C-STORE payloads a misbehaving sender may send, built at test time.

Each :class:`Case` is what goes on the wire: the SOP Class and Instance UIDs of the C-STORE
command, the transfer syntax proposed for it, and the encoded data set (no file meta) exactly as
sent - valid, odd or plain garbage. Most are synthetic radiographs from ``synthetic`` with one
thing changed, re-encoded element by element so that wrong VRs, odd lengths and truncations can
be spliced in by hand. Nothing binary is committed.

Expected outcomes (``Case.expected``), checked by ``test_corpus.py`` against one running node:

* ``status:0xC000`` / ``status:0xA700`` - the node answers that failure status; no job exists;
* ``no-context`` - the node accepts no presentation context for the SOP class or transfer
  syntax (the C-STORE is never sent); no job exists;
* ``skipped:<text>`` - answered 0x0000 and the job ends ``skipped`` with ``<text>`` in its
  reason (at intake, or by the worker before or instead of inference);
* ``done`` - answered 0x0000, inferred, results written; the job ends ``done``.

The table in ``tests/hostile/README.md`` lists every case with its expected outcome.
"""

from __future__ import annotations

import struct
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
import pydicom
import synthetic
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import (
    UID,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    generate_uid,
)

CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
MR_IMAGE = "1.2.840.10008.5.1.4.1.1.4"
US_IMAGE = "1.2.840.10008.5.1.4.1.1.6.1"
BASIC_TEXT_SR = "1.2.840.10008.5.1.4.1.1.88.11"
MPEG2_MAIN = "1.2.840.10008.1.2.4.100"
PRIVATE_SYNTAX = "1.2.826.0.1.3680043.9999.1"

#: Patient names in several character sets; none may ever appear in the node's log.
NAMES: dict[str, tuple[list[str] | str, str]] = {
    "latin1": ("ISO_IR 100", "Müller-Lüdenscheidt^Jürgen^Öykü"),
    "utf8": ("ISO_IR 192", "Σωκράτης^Ελένη^Žluťoučký"),
    "jis": (["", "ISO 2022 IR 87"], "Yamada^Tarou=山田^太郎=やまだ^たろう"),
    "jis-katakana": (["ISO 2022 IR 13", "ISO 2022 IR 87"], "ﾔﾏﾀﾞ^ﾀﾛｳ=山田^太郎=やまだ^たろう"),
    "gb18030": ("GB18030", "王^小东=龍^鳳凰"),
}
#: UTF-8 name sent without a Specific Character Set (18 bytes, even).
UNDECLARED_NAME = "Ñandú^Pingüino "
#: Other identifying values of the corpus; none may appear in the log either.
SECRETS = ("HOSTILE^PATIENT", "HOSTILEPID0042", "19010101")
#: A patient name sent with a wrong VR (its bytes would appear in a conversion error).
WRONG_VR_NAME = "SECRETPN^NAMEX"
#: Malformed identifiers (each of even length): birth date, patient ID, patient name.
MALFORMED_IDS = ("1901-01-01", "PID\x01SECRET", "SECRET\x07NAME^X ")


def log_forbidden() -> list[str]:
    """Every name component and identifier of the corpus, as text that must not be logged."""
    words = list(SECRETS)
    for _, name in NAMES.values():
        for group in name.split("="):
            words += [part for part in group.split("^") if len(part) >= 2]
    words += [part.strip() for part in UNDECLARED_NAME.split("^")]
    words += ["1901-01-01", "SECRET", "ECRET"]
    return words

_LONG_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "SV", "UC", "UN", "UR", "UT",
                       "UV"})


@dataclass(frozen=True)
class Case:
    """One C-STORE as sent, and what the node must do with it."""

    name: str
    what: str
    expected: str
    payload: bytes
    sop_class_uid: str = synthetic.DX_PRESENTATION_STORAGE
    sop_instance_uid: str = ""
    transfer_syntax: str = ExplicitVRLittleEndian


def case_uid(name: str, which: str = "sop") -> str:
    """A deterministic UID for a case (so reruns against a fresh node give the same corpus)."""
    return str(generate_uid(entropy_srcs=["pneumonode-hostile", name, which]))


def radiograph(name: str, **kw: object) -> Dataset:
    """A small valid DX for presentation with the corpus's identifying values and own UIDs."""
    args: dict[str, object] = {"rows": 32, "columns": 32, "lesion": False, "seed": 7}
    args.update(kw)
    ds = synthetic.make_radiograph(**args)  # type: ignore[arg-type]
    ds.SOPInstanceUID = case_uid(name)
    ds.SeriesInstanceUID = case_uid(name, "series")
    ds.StudyInstanceUID = case_uid(name, "study")
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.PatientName = SECRETS[0]
    ds.PatientID = SECRETS[1]
    ds.PatientBirthDate = SECRETS[2]
    return ds


def encode(ds: Dataset, syntax: str = ExplicitVRLittleEndian) -> bytes:
    """``ds`` encoded as a data set (no preamble, no file meta) in ``syntax``."""
    uid = UID(syntax)
    buffer = DicomBytesIO()
    buffer.is_little_endian = uid.is_little_endian
    buffer.is_implicit_VR = uid.is_implicit_VR
    write_dataset(buffer, ds)
    return buffer.getvalue()


def raw_element(tag: int, vr: str, value: bytes, length: int | None = None) -> bytes:
    """One explicit VR little endian element, with a length that may lie (``length``)."""
    size = len(value) if length is None else length
    head = struct.pack("<HH", tag >> 16, tag & 0xFFFF) + vr.encode("ascii")
    if vr in _LONG_VRS:
        head += b"\0\0" + struct.pack("<I", size)
    else:
        head += struct.pack("<H", size)
    return head + value


def spliced(ds: Dataset, replace: Mapping[int, bytes | None]) -> bytes:
    """``ds`` in explicit VR little endian, element by element, with raw replacements.

    ``replace`` maps a tag to the raw bytes written instead of that element (or added, in tag
    order), or to None to leave the element out.
    """
    parts: dict[int, bytes] = {}
    for element in ds:
        single = Dataset()
        single.add(element)
        parts[int(element.tag)] = encode(single)
    for tag, raw in replace.items():
        if raw is None:
            parts.pop(tag, None)
        else:
            parts[tag] = raw
    return b"".join(parts[tag] for tag in sorted(parts))


def _ds_value(text: str) -> bytes:
    data = text.encode("ascii")
    return data + b" " * (len(data) % 2)


def _valid(name: str, what: str, expected: str = "done", **kw: object) -> Case:
    ds = radiograph(name, **kw)
    return Case(name, what, expected, encode(ds), str(ds.SOPClassUID), str(ds.SOPInstanceUID))


def _changed(name: str, what: str, expected: str, change: Callable[[Dataset], None],
             syntax: str = ExplicitVRLittleEndian, **kw: object) -> Case:
    ds = radiograph(name, **kw)
    change(ds)
    return Case(name, what, expected, encode(ds, syntax), str(ds.SOPClassUID),
                case_uid(name), syntax)


def _raw(name: str, what: str, expected: str, replace: Mapping[int, bytes | None],
         **kw: object) -> Case:
    ds = radiograph(name, **kw)
    return Case(name, what, expected, spliced(ds, replace), str(ds.SOPClassUID), case_uid(name))


def _set(**values: object) -> Callable[[Dataset], None]:
    def change(ds: Dataset) -> None:
        for keyword, value in values.items():
            setattr(ds, keyword, value)
    return change


def _delete(*keywords: str) -> Callable[[Dataset], None]:
    def change(ds: Dataset) -> None:
        for keyword in keywords:
            delattr(ds, keyword)
    return change


def _named(charset: list[str] | str, name: str) -> Callable[[Dataset], None]:
    def change(ds: Dataset) -> None:
        ds.SpecificCharacterSet = charset
        ds.PatientName = name
        ds.ReferringPhysicianName = name
        ds.StudyDescription = name.split("^")[0][:16]
    return change


def _charset_text(charset: list[str] | str) -> str:
    return charset if isinstance(charset, str) else "\\".join(charset)


def _float_pixels(keyword: str, dtype: type[np.floating]) -> Callable[[Dataset], None]:
    def change(ds: Dataset) -> None:
        values = np.linspace(0.0, 1.0, int(ds.Rows) * int(ds.Columns), dtype=dtype)
        del ds.PixelData
        setattr(ds, keyword, values.tobytes())
        ds.BitsAllocated = 8 * np.dtype(dtype).itemsize
        del ds.BitsStored, ds.HighBit, ds.PixelRepresentation
    return change


def _rgb(ds: Dataset) -> None:
    gray = np.frombuffer(ds.PixelData, dtype=np.uint16).reshape(int(ds.Rows), int(ds.Columns))
    rgb = np.repeat((gray >> 4).astype(np.uint8)[..., None], 3, axis=2)
    ds.SamplesPerPixel = 3
    ds.PhotometricInterpretation = "RGB"
    ds.PlanarConfiguration = 0
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelData = rgb.tobytes()
    for keyword in ("WindowCenter", "WindowWidth", "VOILUTFunction"):
        delattr(ds, keyword)


def _multi_frame(ds: Dataset) -> None:
    ds.NumberOfFrames = 3
    ds.PixelData = bytes(ds.PixelData) * 3


def _huge_header(ds: Dataset) -> None:
    ds.Rows = ds.Columns = 20000
    ds.PixelData = b"\0\0" * 8


def _bomb(ds: Dataset) -> None:
    """A 20000 x 20000 JPEG 2000 header around a tiny (valid-looking) codestream."""
    ds.Rows = ds.Columns = 20000
    ds.PixelData = pydicom.encaps.encapsulate([b"\xff\x4f\xff\x51" + b"\0" * 60])
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    ds.file_meta.TransferSyntaxUID = JPEG2000Lossless


def _private(ds: Dataset) -> None:
    block = ds.private_block(0x0011, "HOSTILE VENDOR", create=True)
    block.add_new(0x01, "LO", "private text")
    block.add_new(0x02, "OB", bytes(range(256)) * 64)
    block.add_new(0x03, "UN", b"\x01\x02\x03\x04")
    ds.add_new(0x00131010, "LO", "no creator")


def _deep_sequence(levels: int) -> Callable[[Dataset], None]:
    def change(ds: Dataset) -> None:
        inner = Dataset()
        inner.CodeMeaning = "bottom"
        for _ in range(levels - 1):
            outer = Dataset()
            outer.ContentSequence = [inner]
            inner = outer
        ds.ContentSequence = [inner]
    return change


def _nested_undefined_length(levels: int) -> bytes:
    """Content Sequence in Content Sequence ``levels`` deep, all of undefined length."""
    sequence = struct.pack("<HH", 0x0040, 0xA730) + b"SQ\0\0" + b"\xff" * 4
    item, item_end, sequence_end = (struct.pack("<HHL", 0xFFFE, e, n) for e, n in
                                     ((0xE000, 0xFFFFFFFF), (0xE00D, 0), (0xE0DD, 0)))
    bottom = raw_element(0x00080104, "LO", b"bottom")
    return (sequence + item) * levels + bottom + (item_end + sequence_end) * levels


def _big_private(ds: Dataset) -> None:
    ds.add_new(0x00190010, "LO", "HOSTILE BULK")
    ds.add_new(0x00191000, "OB", b"\x5a" * (3 * 1024 * 1024))


def build_cases() -> list[Case]:
    """The whole corpus, in sending order; names are unique.

    pydicom's warnings about the invalid values the corpus sets on purpose are silenced here.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return _build_cases()


def _build_cases() -> list[Case]:
    base_bytes = encode(radiograph("base"))
    rng = np.random.default_rng(1234)
    cases = [
        # --- not DICOM at all, or cut short
        Case("garbage-bytes", "4 KiB of random bytes as the data set", "status:0xC000",
             rng.integers(0, 256, 4096, dtype=np.uint8).tobytes(), sop_instance_uid=case_uid("g")),
        Case("text-file", "a text file as the data set", "status:0xC000",
             b"This is not a DICOM file.\n" * 40, sop_instance_uid=case_uid("text")),
        Case("empty-dataset", "an empty data set", "status:0xC000", b"",
             sop_instance_uid=case_uid("empty")),
        _cut("truncated-in-header", "the data set cut after 100 bytes", "status:0xC000",
             lambda data, pixels: 100),
        _cut("truncated-mid-element", "cut inside the 8-byte header of Pixel Data",
             "skipped:no pixel data", lambda data, pixels: pixels + 5),
        _cut("truncated-pixel-data", "cut in the middle of Pixel Data", "skipped:pixel data",
             lambda data, pixels: pixels + 12 + 1024),
        _changed("no-pixel-data", "Pixel Data absent", "skipped:no pixel data",
                 _delete("PixelData")),
        _changed("short-pixel-data", "Pixel Data of 100 bytes for a 32x32x16-bit image",
                 "skipped:pixel data", _set(PixelData=b"\0" * 100)),
        _changed("empty-pixel-data", "Pixel Data present with length 0",
                 "skipped:no pixel data", _set(PixelData=b"")),
        _raw("odd-length-pixel-data", "8-bit 33x33 Pixel Data of odd length 1089",
             "done", {0x7FE00010: raw_element(0x7FE00010, "OB", bytes(range(33)) * 33)},
             rows=33, columns=33, bits_stored=8),
        # --- transfer syntaxes
        Case("mpeg2-syntax", "MPEG2 transfer syntax (no decoder)", "no-context",
             base_bytes, sop_instance_uid=case_uid("mpeg2"), transfer_syntax=MPEG2_MAIN),
        Case("private-syntax", "an unknown private transfer syntax", "no-context",
             base_bytes, sop_instance_uid=case_uid("private-ts"),
             transfer_syntax=PRIVATE_SYNTAX),
        _changed("jpeg-syntax-native-pixels", "JPEG Baseline negotiated, native Pixel Data sent",
                 "skipped:pixel data", lambda ds: None, syntax=JPEGBaseline8Bit),
        _changed("explicit-big-endian", "a valid image in Explicit VR Big Endian (retired)",
                 "done", lambda ds: None, syntax=ExplicitVRBigEndian),
        _changed("implicit-little-endian", "a valid image in Implicit VR Little Endian", "done",
                 lambda ds: None, syntax=ImplicitVRLittleEndian),
        # --- other objects
        _valid("ct-image", "CT Image Storage", "no-context", modality="CT",
               sop_class_uid=CT_IMAGE),
        _valid("mr-image", "MR Image Storage", "no-context", modality="MR",
               sop_class_uid=MR_IMAGE),
        _valid("us-image", "Ultrasound Image Storage", "no-context", modality="US",
               sop_class_uid=US_IMAGE),
        _sr("sr-document"),
        _valid("sc-modality-ot", "Secondary Capture with Modality OT", "skipped:modality 'OT'",
               modality="OT", sop_class_uid=synthetic.SC_STORAGE),
        _valid("dx-modality-ct", "DX object claiming Modality CT", "skipped:modality 'CT'",
               modality="CT"),
        _valid("body-part-head", "a skull radiograph", "skipped:body part examined 'HEAD'",
               body_part="HEAD"),
        # --- pixel formats
        _changed("rgb", "RGB secondary capture of a chest", "skipped:SamplesPerPixel must be 1",
                 _rgb, modality="CR", sop_class_uid=synthetic.SC_STORAGE),
        _changed("palette-color", "PALETTE COLOR photometric interpretation",
                 "skipped:PhotometricInterpretation", _set(PhotometricInterpretation=
                                                           "PALETTE COLOR")),
        _changed("multi-frame", "3 frames", "skipped:multi-frame", _multi_frame),
        _raw("frames-not-a-number", "Number of Frames 'abc'", "skipped:number of frames",
             {0x00280008: raw_element(0x00280008, "IS", b"abc ")}),
        _changed("float-pixel-data", "Float Pixel Data (7FE0,0008) instead of Pixel Data",
                 "skipped:no pixel data", _float_pixels("FloatPixelData", np.float32)),
        _changed("double-float-pixel-data", "Double Float Pixel Data (7FE0,0009)",
                 "skipped:no pixel data", _float_pixels("DoubleFloatPixelData", np.float64)),
        _valid("one-by-one", "a 1 x 1 image", "done", rows=1, columns=1, bits_stored=8,
               window=False),
        _changed("huge-header-20000", "20000 x 20000 header, 16 bytes of pixels",
                 "skipped:Rows*Columns must not exceed", _huge_header),
        _changed("jpeg2000-bomb", "20000 x 20000 JPEG 2000 header, 64-byte codestream",
                 "skipped:Rows*Columns must not exceed", _bomb, syntax=JPEG2000Lossless),
        _changed("zero-rows", "Rows 0", "skipped:Rows and Columns must be positive",
                 _set(Rows=0)),
        _raw("negative-columns", "Columns sent with VR SS as -32", "status:0xC000",
             {0x00280011: raw_element(0x00280011, "SS", struct.pack("<h", -32))}),
        _changed("bits-stored-over-allocated", "Bits Stored 24 > Bits Allocated 16",
                 "skipped:pixel data", _set(BitsStored=24, HighBit=23)),
        _changed("bits-allocated-12", "Bits Allocated 12", "skipped:pixel data",
                 _set(BitsAllocated=12)),
        _changed("huge-window-width", "Window Width 1e300", "done",
                 _set(WindowWidth="1e300")),
        _changed("zero-window-width", "Window Width 0 (invalid: automatic window)", "done",
                 _set(WindowWidth="0")),
        _raw("nan-rescale-slope", "Rescale Slope NaN", "skipped:not a finite number",
             {0x00281053: raw_element(0x00281053, "DS", _ds_value("NaN"))}, modality="CR",
             sop_class_uid=synthetic.CR_STORAGE),
        _raw("inf-rescale-intercept", "Rescale Intercept -inf", "skipped:not a finite number",
             {0x00281052: raw_element(0x00281052, "DS", _ds_value("-inf"))}, modality="CR",
             sop_class_uid=synthetic.CR_STORAGE),
        _raw("rescale-not-a-number", "Rescale Slope 'abc'", "skipped:is not a number",
             {0x00281053: raw_element(0x00281053, "DS", _ds_value("abc"))}, modality="CR",
             sop_class_uid=synthetic.CR_STORAGE),
        _valid("signed-mono1-16bit", "signed 16-bit MONOCHROME1 with a rescale", "done",
               modality="CR", sop_class_uid=synthetic.CR_STORAGE, bits_stored=16,
               photometric="MONOCHROME1", signed=True, rescale=(2.0, -100.0)),
        # --- UIDs
        _changed("uid-with-slash", "SOP Instance UID with '/' and '..'", "status:0xC000",
                 _set(SOPInstanceUID="1.2.3/../../../../etc/passwd")),
        _changed("uid-dot-dot", "SOP Instance UID '1.2..3'", "status:0xC000",
                 _set(SOPInstanceUID="1.2..3")),
        _changed("uid-too-long", "SOP Instance UID of 80 characters", "status:0xC000",
                 _set(SOPInstanceUID="1.2." + "3" * 76)),
        _changed("study-uid-traversal", "Study Instance UID '../../tmp/x'", "status:0xC000",
                 _set(StudyInstanceUID="../../tmp/x")),
        _changed("uid-leading-zero", "Series Instance UID '1.02.3'", "status:0xC000",
                 _set(SeriesInstanceUID="1.02.3")),
        _changed("no-sop-instance-uid", "SOP Instance UID absent", "status:0xC000",
                 _delete("SOPInstanceUID")),
        # --- character sets and names
        *[_changed(f"name-{key}", f"patient name in {_charset_text(charset)}",
                   "done", _named(charset, name))
          for key, (charset, name) in NAMES.items()],
        _raw("name-undeclared-charset", "UTF-8 name bytes without Specific Character Set",
             "done", {0x00080005: None,
                      0x00100010: raw_element(0x00100010, "PN", UNDECLARED_NAME.encode())}),
        _changed("unknown-charset", "Specific Character Set 'ISO_IR 999'",
                 "skipped:specific character set 'ISO_IR 999'",
                 _set(SpecificCharacterSet="ISO_IR 999")),
        # --- private tags, VRs, lengths
        _changed("private-tags", "private block, OB/UN private data, an orphan private tag",
                 "done", _private),
        _raw("modality-wrong-vr", "Modality sent with VR US (binary 2 bytes)", "status:0xC000",
             {0x00080060: raw_element(0x00080060, "US", b"\x44\x58")}),
        _raw("rows-wrong-vr", "Rows sent as text with VR DS", "status:0xC000",
             {0x00280010: raw_element(0x00280010, "DS", b"32")}),
        _raw("odd-length-text", "Modality with odd length 3 'DX\\0'", "done",
             {0x00080060: raw_element(0x00080060, "CS", b"DX\0")}),
        _raw("element-length-overrun", "a header element claiming 60000 bytes", "status:0xC000",
             {0x00081030: raw_element(0x00081030, "LO", b"XR CHEST PA ", 60000)}),
        _raw("identifiers-malformed", "birth date '1901-01-01', control characters in ID/name",
             "done", {0x00100030: raw_element(0x00100030, "DA", MALFORMED_IDS[0].encode()),
                      0x00100020: raw_element(0x00100020, "LO", MALFORMED_IDS[1].encode()),
                      0x00100010: raw_element(0x00100010, "PN", MALFORMED_IDS[2].encode())}),
        _changed("nested-sequences", "sequences nested 8 levels deep", "done", _deep_sequence(8)),
        _raw("sequence-bomb", "sequences of undefined length nested 5000 levels deep",
             "status:0xC000", {0x0040A730: _nested_undefined_length(5000)}),
        _raw("name-wrong-vr", "Patient Name sent with VR UL and 14 bytes", "status:0xC000",
             {0x00100010: raw_element(0x00100010, "UL", WRONG_VR_NAME.encode())}),
        _raw("name-as-sequence", "Patient Name sent as a sequence", "status:0xC000",
             {0x00100010: raw_element(0x00100010, "SQ", WRONG_VR_NAME.encode())}),
        _changed("oversized-instance", "3 MiB of private data (limit node.max_instance_mb=2)",
                 "status:0xA700", _big_private),
    ]
    names = [c.name for c in cases]
    assert len(names) == len(set(names)), "case names must be unique"
    return cases


def _cut(name: str, what: str, expected: str, where: Callable[[bytes, int], int]) -> Case:
    """A radiograph cut at ``where(data, offset of the Pixel Data element)``."""
    ds = radiograph(name)
    data = encode(ds)
    pixels = data.index(b"\xe0\x7f\x10\x00OW")
    return Case(name, what, expected, data[: where(data, pixels)], str(ds.SOPClassUID),
                case_uid(name))


def _sr(name: str) -> Case:
    ds = Dataset()
    ds.SOPClassUID = BASIC_TEXT_SR
    ds.SOPInstanceUID = case_uid(name)
    ds.StudyInstanceUID = case_uid(name, "study")
    ds.SeriesInstanceUID = case_uid(name, "series")
    ds.Modality = "SR"
    ds.PatientName = SECRETS[0]
    ds.ValueType = "CONTAINER"
    return Case(name, "Basic Text SR document", "no-context", encode(ds), BASIC_TEXT_SR,
                case_uid(name))
