"""Build the secondary-capture overlay: the windowed X-ray, the mask, and a banner with the finding.

For PACS and viewers that do not display DICOM SEG. The image is the source as the node decoded
and windowed it (:meth:`DecodedImage.to_uint8`), in RGB, with the mask filled semi-transparent
red and outlined in yellow, under a banner strip added above the image, so that the banner never
hides anatomy. The banner states the finding, the model and "NOT FOR DIAGNOSTIC USE" (and DEMO
for a demo model), in text scaled to the image and wrapped to its width; it carries no patient
data.

The object is a Secondary Capture Image in the source's study and a new series, with the
source's Patient and Study modules, Study Description, Patient Orientation, Body Part Examined
``CHEST``, a Source Image Sequence pointing at the source, and Conversion Type ``SYN`` (synthetic
image), in Explicit VR Little Endian or, on request, JPEG-LS Lossless (the same pixels in about a
quarter of the bytes; dciodvfy, DCMTK, Orthanc's preview and OHIF open it: tests/outputs,
tests/interop). Same inputs, UIDs and ``created`` give a byte-identical object.
"""

from __future__ import annotations

import datetime

import cv2
import highdicom as hd
import numpy as np
import numpy.typing as npt
from pydicom import Dataset
from pydicom.uid import ExplicitVRLittleEndian, JPEGLSLossless

from pneumonode.dicom.pixels import DecodedImage
from pneumonode.findings import Finding
from pneumonode.inference.card import ModelCard
from pneumonode.outputs.identity import (
    NODE_MANUFACTURER,
    NODE_MODEL_NAME,
    NOT_FOR_DIAGNOSTIC_USE,
    model_equipment,
    node_software_version,
    series_description,
    stamp_creation_time,
    truncate,
)
from pneumonode.outputs.source import (
    patient_orientation,
    quiet_person_name_warnings,
    source_metadata,
)

__all__ = ["OVERLAY_TRANSFER_SYNTAXES", "banner_lines", "build_overlay", "render_overlay"]

#: The transfer syntaxes :func:`build_overlay` writes: uncompressed, or lossless JPEG-LS.
OVERLAY_TRANSFER_SYNTAXES = (ExplicitVRLittleEndian, JPEGLSLossless)

_FILL_RGB = np.array([255.0, 32.0, 32.0])
_FILL_ALPHA = 0.35
_OUTLINE_RGB = (255, 225, 0)
_BANNER_RGB = (24, 24, 24)
_POSITIVE_RGB = (255, 96, 80)
_NEGATIVE_RGB = (120, 230, 120)
_TEXT_RGB = (235, 235, 235)
_WARNING_RGB = (255, 210, 0)
_FONT = cv2.FONT_HERSHEY_SIMPLEX
_MIN_FONT_SCALE = 0.35
# Rows and Columns are US: the banner plus the picture must fit in 65535 rows.
_MAX_ROWS = 0xFFFF
# highdicom requires an orientation for the PATIENT coordinate system; it is replaced by the
# source's own (possibly empty, Type 2C) Patient Orientation right after construction.
_PLACEHOLDER_ORIENTATION = ("L", "F")


def banner_lines(finding: Finding, card: ModelCard) -> list[str]:
    """The banner's text, one string per line, ASCII only.

    Parameters
    ----------
    finding:
        The model's result.
    card:
        The model card.

    Returns
    -------
    list of str
        The finding with the decision threshold, the model, and the not-for-diagnostic-use
        warning (with DEMO when so).
    """
    if finding.present:
        if finding.area_mm2 is not None:
            area = f"area {finding.area_mm2:.0f} mm2"
        else:
            area = f"area {finding.area_pixels} pixels (no pixel spacing)"
        headline = f"Pneumothorax suspected, score {finding.score:.2f}, {area}"
    else:
        headline = f"No pneumothorax detected, score {finding.score:.2f}"
    headline += f" (decision threshold {card.thresholds.top:.2f})"
    warning = f"AI-generated - {NOT_FOR_DIAGNOSTIC_USE}"
    if card.demo:
        warning += " - DEMO MODEL"
    lines = [headline, f"Model: {card.display_name}", warning]
    return [line.encode("ascii", "replace").decode("ascii") for line in lines]


def render_overlay(
    image: DecodedImage, finding: Finding, card: ModelCard
) -> npt.NDArray[np.uint8]:
    """Draw the overlay: banner strip on top, then the X-ray with the mask filled and outlined.

    Parameters
    ----------
    image:
        The decoded source image.
    finding:
        The model's result on the same grid.
    card:
        The model card.

    Returns
    -------
    numpy.ndarray
        ``uint8`` RGB array of shape (banner + Rows, Columns, 3), or of a picture scaled down
        so that the whole stays within 65535 rows (see :func:`_render`).
    """
    return _render(image, finding, card)[0]


def _render(
    image: DecodedImage, finding: Finding, card: ModelCard
) -> tuple[npt.NDArray[np.uint8], float]:
    """Draw the overlay; return it and the factor by which the picture was scaled (<= 1).

    A picture so tall that the banner would take the total past 65535 rows (US) is scaled down,
    keeping its aspect ratio, until it fits.
    """
    gray = image.to_uint8()
    rows, columns = gray.shape
    if finding.mask.shape != gray.shape:
        raise ValueError(
            f"rule: the mask must have the image's shape {gray.shape}; it has "
            f"{finding.mask.shape}"
        )
    picture = np.asarray(cv2.cvtColor(gray, cv2.COLOR_GRAY2RGB), dtype=np.uint8)
    if finding.present:
        mask_u8 = finding.mask.astype(np.uint8)
        x, y, width, height = cv2.boundingRect(mask_u8)
        box = picture[y : y + height, x : x + width]  # a view: tinted in place
        inside = finding.mask[y : y + height, x : x + width]
        tinted = np.asarray(cv2.LUT(np.ascontiguousarray(box), _tint_table()), dtype=np.uint8)
        box[inside] = tinted[inside]
        contours, _ = cv2.findContours(mask_u8, cv2.RETR_LIST, cv2.CHAIN_APPROX_SIMPLE)
        thickness = max(1, round(min(rows, columns) / 400))
        cv2.drawContours(picture, contours, -1, _OUTLINE_RGB, thickness, cv2.LINE_AA)
    banner = _banner(banner_lines(finding, card), columns, rows, finding.present)
    factor = 1.0
    if banner.shape[0] + rows > _MAX_ROWS:
        factor = (_MAX_ROWS - banner.shape[0]) / rows
        size = (max(1, round(columns * factor)), _MAX_ROWS - banner.shape[0])
        picture = np.asarray(cv2.resize(picture, size, interpolation=cv2.INTER_AREA), np.uint8)
        banner = _banner(banner_lines(finding, card), size[0], size[1], finding.present)
        picture = picture[: _MAX_ROWS - banner.shape[0]]
    return np.ascontiguousarray(np.concatenate([banner, picture], axis=0)), factor


def _tint_table() -> npt.NDArray[np.uint8]:
    """Each gray level of each channel blended with the fill colour, as a (256, 1, 3) table.

    ``rint(value * (1 - alpha) + fill * alpha)``, computed once per level instead of per pixel.
    """
    levels = np.arange(256, dtype=np.float64)[:, np.newaxis]
    blended = levels * (1.0 - _FILL_ALPHA) + _FILL_RGB * _FILL_ALPHA
    return np.rint(blended).astype(np.uint8).reshape(256, 1, 3)


def _banner(lines: list[str], columns: int, rows: int, positive: bool) -> npt.NDArray[np.uint8]:
    usable = 0.94 * columns
    scale = max(_MIN_FONT_SCALE, min(columns / 1100.0, rows / 700.0))
    words = [word for line in lines for word in line.split()]
    widest_word = max(_text_width(word, scale) for word in words)
    if widest_word > usable:
        scale *= usable / widest_word
    thickness = max(1, round(scale * 2))
    colors = [_POSITIVE_RGB if positive else _NEGATIVE_RGB, _TEXT_RGB, _WARNING_RGB]
    wrapped = [
        (piece, color)
        for line, color in zip(lines, colors, strict=True)
        for piece in _wrap(line, scale, usable)
    ]
    (_, text_height), baseline = cv2.getTextSize("Ag", _FONT, scale, thickness)
    line_height = text_height + baseline + max(2, round(text_height * 0.45))
    margin = max(2, round(text_height * 0.6))
    height = 2 * margin + line_height * len(wrapped)
    banner = np.empty((height, columns, 3), dtype=np.uint8)
    banner[:] = _BANNER_RGB
    x = max(1, round(columns * 0.02))
    for index, (piece, color) in enumerate(wrapped):
        y = margin + index * line_height + text_height
        cv2.putText(banner, piece, (x, y), _FONT, scale, color, thickness, cv2.LINE_AA)
    return banner


def _text_width(text: str, scale: float) -> int:
    (width, _), _ = cv2.getTextSize(text, _FONT, scale, max(1, round(scale * 2)))
    return int(width)


def _wrap(line: str, scale: float, usable: float) -> list[str]:
    pieces: list[str] = []
    current = ""
    for word in line.split():
        candidate = f"{current} {word}" if current else word
        if current and _text_width(candidate, scale) > usable:
            pieces.append(current)
            current = word
        else:
            current = candidate
    pieces.append(current)
    return pieces


def build_overlay(
    source: Dataset,
    image: DecodedImage,
    finding: Finding,
    card: ModelCard,
    *,
    series_instance_uid: str,
    sop_instance_uid: str,
    series_number: int = 9902,
    created: datetime.datetime | None = None,
    transfer_syntax_uid: str = ExplicitVRLittleEndian,
) -> hd.sc.SCImage:
    """Build the secondary-capture overlay of ``finding`` on ``source``.

    Parameters
    ----------
    source:
        The analysed image (its header is copied; its pixel data are not read again).
    image:
        The source as decoded by :func:`pneumonode.dicom.pixels.decode`.
    finding:
        The model's result on the source grid.
    card:
        The model card.
    series_instance_uid, sop_instance_uid:
        The UIDs fixed on the job row, so that a rebuild yields the same instance.
    series_number:
        Series Number of the overlay series.
    created:
        Creation date and time written into the object (now when None); pass the same value
        to rebuild a byte-identical object.
    transfer_syntax_uid:
        Explicit VR Little Endian (the default: raw RGB, about 3 bytes a pixel) or JPEG-LS
        Lossless (``1.2.840.10008.1.2.4.80``: the same pixels in about a quarter of the
        bytes, at the cost of encoding them; every reader tested opens it, see
        tests/interop). A sender must then offer it, or decompress for a peer that takes
        only uncompressed data.

    Returns
    -------
    highdicom.sc.SCImage
        RGB Secondary Capture Image in ``transfer_syntax_uid``.

    Raises
    ------
    ValueError
        When the mask or the decoded image does not have the source's Rows and Columns, or
        the transfer syntax is another; the message names the SOP Instance UID.
    """
    meta = source_metadata(source)
    sop_uid = str(meta.SOPInstanceUID)
    shape = (int(meta.Rows), int(meta.Columns))
    if image.image.shape != shape or finding.mask.shape != shape:
        raise ValueError(
            f"rule: image and mask must have the source's Rows x Columns {shape}; they have "
            f"{image.image.shape} and {finding.mask.shape} (SOP {sop_uid})"
        )
    if transfer_syntax_uid not in OVERLAY_TRANSFER_SYNTAXES:
        raise ValueError(
            f"rule: the overlay is written in one of {list(OVERLAY_TRANSFER_SYNTAXES)}; "
            f"{transfer_syntax_uid!r} is not (SOP {sop_uid})"
        )
    when = created if created is not None else datetime.datetime.now()
    pixels, factor = _render(image, finding, card)
    spacing = image.pixel_spacing_mm
    if spacing is not None and factor != 1.0:
        spacing = (spacing[0] / factor, spacing[1] / factor)
    with quiet_person_name_warnings():
        sc = hd.sc.SCImage(
            pixel_array=pixels,
            photometric_interpretation=hd.PhotometricInterpretationValues.RGB,
            bits_allocated=8,
            coordinate_system=hd.CoordinateSystemNames.PATIENT,
            study_instance_uid=str(meta.StudyInstanceUID),
            series_instance_uid=series_instance_uid,
            series_number=series_number,
            sop_instance_uid=sop_instance_uid,
            instance_number=1,
            manufacturer=NODE_MANUFACTURER,
            pixel_spacing=spacing,
            patient_orientation=_PLACEHOLDER_ORIENTATION,
            transfer_syntax_uid=transfer_syntax_uid,
            contributing_equipment=[model_equipment(card, when)],
            series_description=series_description("pneumothorax overlay", card),
            manufacturer_model_name=NODE_MODEL_NAME,
            software_versions=node_software_version(),
            content_date=when.date(),
            content_time=when.time(),
            specific_character_set=meta.get("SpecificCharacterSet"),
        )
        sc.copy_patient_and_study_information(meta)
    sc.PatientOrientation = patient_orientation(source)
    sc.BodyPartExamined = "CHEST"
    sc.ConversionType = "SYN"
    sc.BurnedInAnnotation = "NO"
    sc.SourceImageSequence = hd.ReferencedImageSequence(referenced_images=[meta])
    sc.DerivationDescription = truncate(
        f"AI pneumothorax overlay by {card.display_name}; not for diagnostic use", 1024
    )
    if str(meta.get("LossyImageCompression", "")) == "01":
        sc.LossyImageCompression = "01"
        if "LossyImageCompressionMethod" in meta:
            sc.LossyImageCompressionMethod = meta.LossyImageCompressionMethod
        if "LossyImageCompressionRatio" in meta:
            sc.LossyImageCompressionRatio = meta.LossyImageCompressionRatio
    stamp_creation_time(sc, when)
    return sc
