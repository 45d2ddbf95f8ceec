"""How a result object says what made it: node equipment, AI model, labels and creation time."""

from __future__ import annotations

import datetime

import highdicom as hd
from pydicom import Dataset
from pydicom.valuerep import DA, DT, TM

from pneumonode import __version__
from pneumonode.inference.card import ModelCard
from pneumonode.outputs.codes import ARTIFICIAL_INTELLIGENCE, PROCESSING_EQUIPMENT

__all__ = [
    "NODE_MANUFACTURER",
    "NODE_MODEL_NAME",
    "NOT_FOR_DIAGNOSTIC_USE",
    "algorithm_identification",
    "model_equipment",
    "node_software_version",
    "series_description",
    "stamp_creation_time",
    "truncate",
]

NODE_MANUFACTURER = "pneumonode project"
NODE_MODEL_NAME = "pneumonode"
NOT_FOR_DIAGNOSTIC_USE = "NOT FOR DIAGNOSTIC USE"
_LO_MAX = 64


def truncate(text: str, limit: int = _LO_MAX) -> str:
    """Cut ``text`` to a DICOM length limit (64 characters: LO).

    Parameters
    ----------
    text:
        The value.
    limit:
        Maximum length.

    Returns
    -------
    str
        ``text``, shortened with a trailing ``~`` when it was too long.
    """
    return text if len(text) <= limit else text[: limit - 1] + "~"


def node_software_version() -> str:
    """Software Versions of the node that writes the objects.

    Returns
    -------
    str
        ``pneumonode <version>``.
    """
    return f"pneumonode {__version__}"


def series_description(kind: str, card: ModelCard) -> str:
    """Series Description of a result series: AI-made, not for diagnostic use, DEMO when so.

    Parameters
    ----------
    kind:
        What the series holds, e.g. ``"pneumothorax SEG"``.
    card:
        The model card.

    Returns
    -------
    str
        At most 64 characters, e.g. ``"AI pneumothorax SEG (DEMO) - NOT FOR DIAGNOSTIC USE"``.
    """
    demo = " (DEMO)" if card.demo else ""
    return truncate(f"AI {kind}{demo} - {NOT_FOR_DIAGNOSTIC_USE}")


def algorithm_identification(card: ModelCard) -> hd.AlgorithmIdentificationSequence:
    """The Segmentation Algorithm Identification of the model: name, version, family AI.

    Parameters
    ----------
    card:
        The model card.

    Returns
    -------
    highdicom.AlgorithmIdentificationSequence
        One item; the source is the model's manufacturer; the model UID is a parameter.
    """
    return hd.AlgorithmIdentificationSequence(
        name=card.name,
        version=card.version,
        family=ARTIFICIAL_INTELLIGENCE,
        source=truncate(card.manufacturer),
        parameters={"model_uid": card.uid, "demo": "yes" if card.demo else "no"},
    )


def model_equipment(
    card: ModelCard, created: datetime.datetime
) -> hd.ContributingEquipment:
    """The AI model as Contributing Equipment (IHE AI Results: manufacturer, model, version).

    Parameters
    ----------
    card:
        The model card.
    created:
        When the model contributed (the objects' creation time).

    Returns
    -------
    highdicom.ContributingEquipment
        Purpose of reference "Processing Equipment".
    """
    equipment = hd.ContributingEquipment(
        manufacturer=truncate(card.manufacturer),
        purpose_of_reference=PROCESSING_EQUIPMENT,
        manufacturer_model_name=card.name,
        software_versions=card.version,
        contribution_datetime=created,
        contribution_description=truncate(
            f"AI pneumothorax segmentation, {card.display_name}"
        ),
    )
    return equipment


def stamp_creation_time(dataset: Dataset, created: datetime.datetime) -> None:
    """Set every creation date and time of a result object to ``created``.

    With the same ``created`` and the same UIDs, a rebuilt object is identical to the first.
    Contributing Equipment items of the processing software (the model, highdicom) get the
    same time; the source's acquisition equipment keeps its own.

    Parameters
    ----------
    dataset:
        The result object (changed in place).
    created:
        The creation time.
    """
    date, time = DA(created.date()), TM(created.time())
    dataset.InstanceCreationDate = date
    dataset.InstanceCreationTime = time
    dataset.ContentDate = date
    dataset.ContentTime = time
    dataset.SeriesDate = date
    dataset.SeriesTime = time
    if "DateOfSecondaryCapture" in dataset:
        dataset.DateOfSecondaryCapture = date
        dataset.TimeOfSecondaryCapture = time
    for item in dataset.get("ContributingEquipmentSequence", []):
        purposes = item.get("PurposeOfReferenceCodeSequence", [])
        processing = any(
            code.get("CodeValue") == PROCESSING_EQUIPMENT.value
            and code.get("CodingSchemeDesignator") == PROCESSING_EQUIPMENT.scheme_designator
            for code in purposes
        )
        if processing and "ContributionDateTime" in item:
            item.ContributionDateTime = DT(created)
