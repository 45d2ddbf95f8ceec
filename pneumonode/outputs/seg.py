"""Build the DICOM Segmentation (BINARY, one pneumothorax segment) of one analysed radiograph.

The SEG is in the source's study, in a new series, on the source's exact pixel grid, and
references the source SOP Instance. Its one segment is SCT 49755003 "Morphologically Abnormal
Structure" / SCT 36118008 "Pneumothorax", AUTOMATIC, with the model as Segmentation Algorithm
Identification (family DCM 123110 "Artificial Intelligence") and as Contributing Equipment
(IHE AI Results). A negative image gets a valid SEG whose single frame is empty. Its Content
Description always ends with "NOT FOR DIAGNOSTIC USE" and its Content Creator's Name (Type 2 in
DCMTK's reading) names the node.

Geometry of a projection radiograph. A CR or DX image has no patient-relative 3-D Frame of
Reference, so the SEG has none either: each SEG pixel corresponds to the source pixel at the same
row and column, stated by the Derivation Image functional group (PS3.3 A.51.5.1), which is what
the standard requires without a Frame of Reference. PS3.3 (2024) Table A.51-2 makes Pixel
Measures, Plane Position (Patient) and Plane Orientation (Patient) required only with a
patient-relative Frame of Reference and "may be present" only then; earlier editions, and
dciodvfy (dicom3tools 2022, which finds no error in the result), allow them beside the
Derivation Image group. The readers that open a SEG, however, need them: dcmqi stops with
"Plane Orientation (Patient) is missing", the pydicom-seg readers with "Pixel measures FG is
missing", ``@cornerstonejs/adapters`` and OHIF fail on the absent ImageOrientationPatient and
PixelMeasures, and highdicom reads Pixel Measures back only with a Slice Thickness. Adding an
invented Frame of Reference would satisfy the letter of the 2024 text but claim a 3-D space the
film does not have, and viewers would then no longer match the SEG to its (frame-of-reference-
less) radiograph. The choice here is therefore: no Frame of Reference, and the three groups
describing the pixel grid alone, completed after highdicom builds the object (highdicom 0.28
refuses ``plane_orientation`` without a Frame of Reference):

* shared Pixel Measures: the source's Pixel Spacing, else its Imager Pixel Spacing, else a
  nominal 1 mm; Slice Thickness a nominal 1 mm (a projection has no slice);
* shared Plane Orientation (Patient) ``1\\0\\0\\0\\1\\0``: rows and columns along the image axes;
* per-frame Plane Position (Patient) ``0\\0\\0``: the one frame at the origin of that grid.

None of these values places the SEG in the patient; the Derivation Image group does, and
Patient Orientation (copied from the source when valid) tells which way the film faces.

Deterministic: the same source, finding, card, UIDs and ``created`` give a byte-identical
object (the Dimension Organization UID, random in highdicom, is derived from the SOP UID).
"""

from __future__ import annotations

import datetime

import highdicom as hd
import numpy as np
from pydicom import Dataset
from pydicom.uid import generate_uid

from pneumonode.findings import Finding
from pneumonode.inference.card import ModelCard
from pneumonode.outputs.codes import CHEST, MORPHOLOGICALLY_ABNORMAL_STRUCTURE, PNEUMOTHORAX
from pneumonode.outputs.identity import (
    NODE_MANUFACTURER,
    NODE_MODEL_NAME,
    NOT_FOR_DIAGNOSTIC_USE,
    algorithm_identification,
    model_equipment,
    node_software_version,
    series_description,
    stamp_creation_time,
    truncate,
)
from pneumonode.outputs.source import (
    patient_orientation,
    pixel_spacing,
    quiet_person_name_warnings,
    source_metadata,
)

__all__ = ["SEGMENT_LABEL", "build_segmentation", "content_description"]

SEGMENT_LABEL = "Pneumothorax"
_CONTENT_LABEL = "PNEUMOTHORAX"
_DISPLAY_COLOR = hd.color.CIELabColor(53.2, 80.1, 67.2)  # red
_UNCONFIGURED_SERIAL = "unconfigured"
_NOMINAL_SPACING_MM = (1.0, 1.0)
_NOMINAL_SLICE_THICKNESS_MM = 1.0
_GRID_ORIENTATION = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
_GRID_ORIGIN = (0.0, 0.0, 0.0)


def content_description(card: ModelCard) -> str:
    """Content Description of the SEG: what made it, and the warning, in at most 64 characters.

    Parameters
    ----------
    card:
        The model card.

    Returns
    -------
    str
        E.g. ``"AI attention-unet 1.0 (DEMO) - NOT FOR DIAGNOSTIC USE"``; a long model name or
        version is shortened, the DEMO mark and the warning never are.
    """
    tail = (" (DEMO)" if card.demo else "") + f" - {NOT_FOR_DIAGNOSTIC_USE}"
    return truncate(f"AI {card.name} {card.version}", 64 - len(tail)) + tail


def build_segmentation(
    source: Dataset,
    finding: Finding,
    card: ModelCard,
    *,
    series_instance_uid: str,
    sop_instance_uid: str,
    series_number: int = 9901,
    device_serial: str | None = None,
    created: datetime.datetime | None = None,
) -> hd.seg.Segmentation:
    """Build the BINARY Segmentation of ``finding`` on ``source``.

    Parameters
    ----------
    source:
        The analysed image (CR, DX or Secondary Capture; pixel data are not read).
    finding:
        The model's result; ``finding.mask`` is on the source's (Rows, Columns) grid.
    card:
        The model card (algorithm name, version, UID, manufacturer, DEMO flag).
    series_instance_uid, sop_instance_uid:
        The UIDs fixed on the job row, so that a rebuild yields the same instance.
    series_number:
        Series Number of the SEG series.
    device_serial:
        Device Serial Number of the node; ``"unconfigured"`` when None (the attribute is
        Type 1 in the Enhanced General Equipment module).
    created:
        Creation date and time written into the object (now when None); pass the same value
        to rebuild a bit-identical object.

    Returns
    -------
    highdicom.seg.Segmentation
        The SEG, Explicit VR Little Endian, one frame.

    Raises
    ------
    ValueError
        When the mask does not have the source's Rows and Columns, or the source lacks a UID
        a derived object needs; the message names the SOP Instance UID.
    """
    meta = source_metadata(source)
    sop_uid = str(meta.SOPInstanceUID)
    shape = (int(meta.Rows), int(meta.Columns))
    if finding.mask.shape != shape:
        raise ValueError(
            f"rule: the mask must have the source's Rows x Columns {shape}; it has "
            f"{finding.mask.shape} (SOP {sop_uid})"
        )
    when = created if created is not None else datetime.datetime.now()
    description = hd.seg.SegmentDescription(
        segment_number=1,
        segment_label=SEGMENT_LABEL,
        segmented_property_category=MORPHOLOGICALLY_ABNORMAL_STRUCTURE,
        segmented_property_type=PNEUMOTHORAX,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm_identification(card),
        anatomic_regions=[CHEST],
        display_color=_DISPLAY_COLOR,
    )
    with quiet_person_name_warnings():
        seg = hd.seg.Segmentation(
            source_images=[meta],
            pixel_array=finding.mask.astype(np.uint8),
            segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
            segment_descriptions=[description],
            series_instance_uid=series_instance_uid,
            series_number=series_number,
            sop_instance_uid=sop_instance_uid,
            instance_number=1,
            manufacturer=NODE_MANUFACTURER,
            manufacturer_model_name=NODE_MODEL_NAME,
            software_versions=node_software_version(),
            device_serial_number=device_serial or _UNCONFIGURED_SERIAL,
            content_label=_CONTENT_LABEL,
            content_description=content_description(card),
            omit_empty_frames=False,
            contributing_equipment=[model_equipment(card, when)],
            series_description=series_description("pneumothorax SEG", card),
            content_date=when.date(),
            content_time=when.time(),
        )
    seg.PatientOrientation = patient_orientation(source)
    if "BodyPartExamined" in meta:
        seg.BodyPartExamined = meta.BodyPartExamined
    seg.ContentCreatorName = f"{NODE_MODEL_NAME}^AI"
    _add_pixel_grid_geometry(seg, pixel_spacing(source) or _NOMINAL_SPACING_MM)
    _fix_dimension_organization_uid(seg, sop_instance_uid)
    stamp_creation_time(seg, when)
    return seg


def _add_pixel_grid_geometry(
    seg: hd.seg.Segmentation, spacing: tuple[float, float]
) -> None:
    """Add Pixel Measures, Plane Orientation and Plane Position of the pixel grid (see above)."""
    shared = seg.SharedFunctionalGroupsSequence[0]
    shared.PixelMeasuresSequence = hd.PixelMeasuresSequence(
        pixel_spacing=spacing, slice_thickness=_NOMINAL_SLICE_THICKNESS_MM
    )
    shared.PlaneOrientationSequence = hd.PlaneOrientationSequence(
        coordinate_system=hd.CoordinateSystemNames.PATIENT, image_orientation=_GRID_ORIENTATION
    )
    for frame in seg.PerFrameFunctionalGroupsSequence:
        frame.PlanePositionSequence = hd.PlanePositionSequence(
            coordinate_system=hd.CoordinateSystemNames.PATIENT, image_position=_GRID_ORIGIN
        )


def _fix_dimension_organization_uid(seg: hd.seg.Segmentation, sop_instance_uid: str) -> None:
    """Replace highdicom's random Dimension Organization UID by one derived from the SOP UID."""
    uid = generate_uid(entropy_srcs=["pneumonode-seg-dimension-organization", sop_instance_uid])
    for item in seg.DimensionOrganizationSequence:
        item.DimensionOrganizationUID = uid
    for item in seg.DimensionIndexSequence:
        item.DimensionOrganizationUID = uid
