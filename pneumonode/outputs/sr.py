"""Build the DICOM SR measurement report (TID 1500) of one analysed radiograph and its SEG.

What a RIS, a worklist or a report reads without looking at pixels (IHE AI Results). The object
is a Comprehensive 3D SR in the source's study and a new series, Explicit VR Little Endian, whose
content tree is an "Imaging Measurement Report" (TID 1500) with:

* the observer: the node as a device, with the model's UID, name and manufacturer;
* Procedure Reported SCT 399208008 "Plain chest X-ray";
* an Image Library entry for the source image;
* one ROI measurement group tracking "pneumothorax", finding type SCT 36118008 "Pneumothorax",
  algorithm identification (TID 4019: model name, version, family AI, model UID as parameter),
  and a reference to segment 1 of the SEG ("Referenced Segment", with its source image);
* in that group, the qualitative evaluation "Pneumothorax" = SCT 52101004 "Present" or
  SCT 272519000 "Absent"; the measurement SCT 42798000 "Area" in mm2 (left out when the source
  has no pixel spacing, since no area in mm2 can then be stated); and the model score as
  DCM 122157 "Probability" (UCUM "1"), the image-level score of :class:`Finding`.

The group is TID 1411, the one that references a whole segment. TID 1410 references a SEG
*frame*, and highdicom then writes Referenced Frame Number and Referenced Segment Number in one
IMAGE content item, where the standard allows the segment number only without a frame number
(dciodvfy: "Shall not be present when ReferencedFrameNumber is present"); the SEG has one frame,
so the segment number alone names it fully.

The report is not complete nor verified (Completion Flag PARTIAL, Verification Flag
UNVERIFIED): a machine wrote it and nobody signed it. Patient and study attributes come from
:func:`pneumonode.outputs.source.source_metadata` (allowlisted, VR-valid). The same inputs, UIDs
and ``created`` give a byte-identical object (the tracking UID is derived from the SOP UID).
"""

from __future__ import annotations

import datetime

import highdicom as hd
from pydicom import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid

from pneumonode.findings import Finding
from pneumonode.inference.card import ModelCard
from pneumonode.outputs.codes import (
    ABSENT,
    ARTIFICIAL_INTELLIGENCE,
    PLAIN_CHEST_XRAY,
    PNEUMOTHORAX,
    PRESENT,
)
from pneumonode.outputs.identity import (
    NODE_MANUFACTURER,
    NODE_MODEL_NAME,
    model_equipment,
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

__all__ = ["TRACKING_LABEL", "build_report"]

TRACKING_LABEL = "pneumothorax"
_SEG_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"


def build_report(
    source: Dataset,
    finding: Finding,
    card: ModelCard,
    seg: Dataset,
    *,
    series_instance_uid: str,
    sop_instance_uid: str,
    series_number: int = 9903,
    created: datetime.datetime | None = None,
) -> hd.sr.Comprehensive3DSR:
    """Build the TID 1500 measurement report of ``finding`` on ``source``.

    Parameters
    ----------
    source:
        The analysed image (its header is read; its pixel data are not).
    finding:
        The model's result on the source grid.
    card:
        The model card (algorithm name, version, UID, manufacturer, DEMO flag).
    seg:
        The SEG built for the same finding by
        :func:`pneumonode.outputs.seg.build_segmentation` (its segment 1 is referenced).
    series_instance_uid, sop_instance_uid:
        The UIDs fixed on the job row, so that a rebuild yields the same instance.
    series_number:
        Series Number of the SR series.
    created:
        Creation date and time written into the object (now when None); pass the same value
        to rebuild a byte-identical object.

    Returns
    -------
    highdicom.sr.Comprehensive3DSR
        The report, Explicit VR Little Endian.

    Raises
    ------
    ValueError
        When ``seg`` is not a Segmentation of ``source`` in its study, or the mask does not have
        the source's Rows and Columns; the message names the source SOP Instance UID.
    """
    meta = source_metadata(source)
    _check_seg(meta, finding, seg)
    when = created if created is not None else datetime.datetime.now()
    algorithm = hd.sr.AlgorithmIdentification(
        name=card.name,
        version=card.version,
        parameters=[f"model_uid={card.uid}", f"demo={'yes' if card.demo else 'no'}"],
        family=ARTIFICIAL_INTELLIGENCE,
        manufacturer=truncate(card.manufacturer),
    )
    measurements = []
    if finding.area_mm2 is not None:
        measurements.append(
            hd.sr.Measurement(
                name=codes.SCT.Area,
                value=float(finding.area_mm2),
                unit=codes.UCUM.SquareMillimeter,
                algorithm_id=algorithm,
            )
        )
    measurements.append(
        hd.sr.Measurement(
            name=codes.DCM.Probability,
            value=float(finding.score),
            unit=codes.UCUM.NoUnits,
            algorithm_id=algorithm,
        )
    )
    group = hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=generate_uid(entropy_srcs=["pneumonode-sr-tracking", sop_instance_uid]),
            identifier=TRACKING_LABEL,
        ),
        referenced_segment=hd.sr.ReferencedSegment(
            sop_class_uid=str(seg.SOPClassUID),
            sop_instance_uid=str(seg.SOPInstanceUID),
            segment_number=1,
            source_images=[
                hd.sr.SourceImageForSegmentation(
                    referenced_sop_class_uid=str(meta.SOPClassUID),
                    referenced_sop_instance_uid=str(meta.SOPInstanceUID),
                )
            ],
        ),
        finding_type=PNEUMOTHORAX,
        algorithm_id=algorithm,
        measurements=measurements,
        qualitative_evaluations=[
            hd.sr.QualitativeEvaluation(
                name=PNEUMOTHORAX, value=PRESENT if finding.present else ABSENT
            )
        ],
    )
    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=card.uid,
            name=truncate(card.display_name),
            manufacturer_name=NODE_MANUFACTURER,
            model_name=NODE_MODEL_NAME,
        ),
    )
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=PLAIN_CHEST_XRAY,
        imaging_measurements=[group],
        referenced_images=[_library_entry(source, meta)],
    )
    with quiet_person_name_warnings():
        sr = hd.sr.Comprehensive3DSR(
            evidence=[meta, seg],
            content=report[0],
            series_instance_uid=series_instance_uid,
            series_number=series_number,
            sop_instance_uid=sop_instance_uid,
            instance_number=1,
            manufacturer=NODE_MANUFACTURER,
            is_complete=False,
            is_final=False,
            is_verified=False,
            series_description=series_description("pneumothorax report", card),
            contributing_equipment=[model_equipment(card, when)],
        )
    sr.ManufacturerModelName = NODE_MODEL_NAME
    stamp_creation_time(sr, when)
    if "SpecificCharacterSet" in meta:
        sr.SpecificCharacterSet = meta.SpecificCharacterSet
    return sr


def _library_entry(source: Dataset, meta: Dataset) -> Dataset:
    """What highdicom's Image Library entry reads of the source (TID 1601/1603).

    highdicom writes the projection-radiography descriptors (TID 1603: Patient Orientation row
    and column, horizontal and vertical pixel spacing) for a CR or DX Modality and then needs
    both attributes; without a valid orientation and spacing the entry keeps only the modality
    and the matrix size.
    """
    entry = Dataset()
    for keyword in ("SOPClassUID", "SOPInstanceUID", "Rows", "Columns"):
        setattr(entry, keyword, meta[keyword].value)
    orientation, spacing = patient_orientation(source), pixel_spacing(source)
    if orientation and spacing is not None and "Modality" in meta:
        entry.Modality = meta.Modality
        entry.PatientOrientation = orientation
        entry.ImagerPixelSpacing = list(spacing)
    else:
        entry.Modality = "OT"  # read only to choose the descriptors: none beyond the size
    return entry


def _check_seg(meta: Dataset, finding: Finding, seg: Dataset) -> None:
    sop_uid = str(meta.SOPInstanceUID)
    shape = (int(meta.Rows), int(meta.Columns))
    if finding.mask.shape != shape:
        raise ValueError(
            f"rule: the mask must have the source's Rows x Columns {shape}; it has "
            f"{finding.mask.shape} (SOP {sop_uid})"
        )
    if str(seg.get("SOPClassUID", "")) != _SEG_STORAGE:
        raise ValueError(
            f"rule: the report references a Segmentation; got SOP Class "
            f"{str(seg.get('SOPClassUID', ''))[:64]!r} (SOP {sop_uid})"
        )
    if str(seg.get("StudyInstanceUID", "")) != str(meta.StudyInstanceUID):
        raise ValueError(
            f"rule: the SEG must be in the source's study {meta.StudyInstanceUID}; it is in "
            f"{str(seg.get('StudyInstanceUID', ''))[:64]!r} (SOP {sop_uid})"
        )
    referenced = [
        str(item.ReferencedSOPInstanceUID) for item in seg.get("SourceImageSequence", [])
    ]
    if sop_uid not in referenced:
        raise ValueError(
            f"rule: the SEG must be derived from the source; it references {referenced} "
            f"(SOP {sop_uid})"
        )
