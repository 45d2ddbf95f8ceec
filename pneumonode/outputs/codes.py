"""The coded concepts that pneumonode's result objects carry (SNOMED CT and DICOM codes)."""

from __future__ import annotations

from typing import Final

from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

__all__ = [
    "ABSENT",
    "ARTIFICIAL_INTELLIGENCE",
    "CHEST",
    "MORPHOLOGICALLY_ABNORMAL_STRUCTURE",
    "PLAIN_CHEST_XRAY",
    "PNEUMOTHORAX",
    "PRESENT",
    "PROCESSING_EQUIPMENT",
]

#: Segmented Property Category (CID 7150): SCT 49755003.
MORPHOLOGICALLY_ABNORMAL_STRUCTURE: Final = codes.SCT.MorphologicallyAbnormalStructure

#: Segmented Property Type: SCT 36118008.
PNEUMOTHORAX: Final = codes.SCT.Pneumothorax

#: Algorithm Family (CID 7162 "Surface Processing Algorithm Families"): DCM 123110.
ARTIFICIAL_INTELLIGENCE: Final = codes.DCM.ArtificialIntelligence

#: Anatomic region of the segment (CID 4031 "Common Anatomic Regions"): SCT 816094009.
CHEST: Final = codes.SCT.Chest

#: Purpose of Reference of the AI model in the Contributing Equipment Sequence (CID 7005).
PROCESSING_EQUIPMENT: Final = codes.DCM.ProcessingEquipment

#: Procedure Reported of the measurement report (TID 1500): SCT 399208008 (not in pydicom's code
#: dictionary, hence written here).
PLAIN_CHEST_XRAY: Final = Code("399208008", "SCT", "Plain chest X-ray")

#: Values of the "pneumothorax" qualitative evaluation: SCT 52101004 / SCT 272519000.
PRESENT: Final = codes.SCT.Present
ABSENT: Final = codes.SCT.Absent
