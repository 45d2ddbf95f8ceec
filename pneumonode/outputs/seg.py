"""Build the DICOM Segmentation (BINARY, one pneumothorax segment) of one analysed radiograph.

The SEG is in the source's study, in a new series, on the source's exact pixel grid, and
references the source SOP Instance. Its one segment is SCT 49755003 "Morphologically Abnormal
Structure" / SCT 36118008 "Pneumothorax", AUTOMATIC, with the model as Segmentation Algorithm
Identification (family DCM 123110 "Artificial Intelligence") and as Contributing Equipment
(IHE AI Results). A negative image gets a valid SEG whose single frame is empty.

For a projection radiograph there is no Frame of Reference: the SEG carries the source's
Patient Orientation and no Pixel Measures (see :mod:`pneumonode.outputs.source`), which dciodvfy
accepts and ``highdicom.seg.segread`` reads back.

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
    algorithm_identification,
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

__all__ = ["SEGMENT_LABEL", "build_segmentation"]

SEGMENT_LABEL = "Pneumothorax"
_CONTENT_LABEL = "PNEUMOTHORAX"
_DISPLAY_COLOR = hd.color.CIELabColor(53.2, 80.1, 67.2)  # red
_UNCONFIGURED_SERIAL = "unconfigured"


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
            content_description=truncate(
                f"AI pneumothorax segmentation by {card.display_name}; not for diagnostic use"
            ),
            omit_empty_frames=False,
            contributing_equipment=[model_equipment(card, when)],
            series_description=series_description("pneumothorax SEG", card),
            content_date=when.date(),
            content_time=when.time(),
        )
    seg.PatientOrientation = patient_orientation(source)
    if "BodyPartExamined" in meta:
        seg.BodyPartExamined = meta.BodyPartExamined
    _fix_dimension_organization_uid(seg, sop_instance_uid)
    stamp_creation_time(seg, when)
    return seg


def _fix_dimension_organization_uid(seg: hd.seg.Segmentation, sop_instance_uid: str) -> None:
    """Replace highdicom's random Dimension Organization UID by one derived from the SOP UID."""
    uid = generate_uid(entropy_srcs=["pneumonode-seg-dimension-organization", sop_instance_uid])
    for item in seg.DimensionOrganizationSequence:
        item.DimensionOrganizationUID = uid
    for item in seg.DimensionIndexSequence:
        item.DimensionOrganizationUID = uid
