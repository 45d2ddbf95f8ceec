"""Deterministic synthetic chest radiographs as complete DICOM datasets, shared by all tests.

Pure functions, no pytest: ``make_radiograph`` builds a CR, DX or Secondary Capture instance
with the Patient, Study, Series, Equipment, Image and SOP Common modules filled in; the image is a
chest-like phantom (air, body, two lungs with rib shadows and vessel texture, mediastinum) with an
optional dark, texture-free pneumothorax-like region at the lateral apex of the image-left lung
(``lesion_mask`` gives its exact pixels). The same arguments always give the same dataset,
UIDs included.

``compress`` re-encodes the pixel data with the encoders installed here. Working, lossless:

* RLE Lossless (1.2.840.10008.1.2.5), pydicom's own encoder;
* JPEG-LS Lossless (1.2.840.10008.1.2.4.80), pyjpegls;
* JPEG 2000 Lossless (1.2.840.10008.1.2.4.90), pylibjpeg-openjpeg;
* Deflated Explicit VR Little Endian (1.2.840.10008.1.2.1.99): only the file meta changes; the
  deflation happens when the dataset is written (``write``).

Not encodable here (decode-only plugins): JPEG Baseline, JPEG Extended, JPEG Lossless (process
14 and SV1); lossy JPEG-LS and JPEG 2000 would not decode back to identical pixels.
"""

from __future__ import annotations

import copy
from pathlib import Path

import cv2
import numpy as np
import numpy.typing as npt
import pydicom
from pydicom.dataset import FileMetaDataset
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    RLELossless,
    generate_uid,
)

CR_STORAGE = UID("1.2.840.10008.5.1.4.1.1.1")
DX_PRESENTATION_STORAGE = UID("1.2.840.10008.5.1.4.1.1.1.1")
DX_PROCESSING_STORAGE = UID("1.2.840.10008.5.1.4.1.1.1.1.1")
SC_STORAGE = UID("1.2.840.10008.5.1.4.1.1.7")

LOSSLESS_SYNTAXES: tuple[UID, ...] = (
    RLELossless,
    JPEGLSLossless,
    JPEG2000Lossless,
    DeflatedExplicitVRLittleEndian,
)

_UID_NAMESPACE = "pneumonode-tests-synthetic"


def _uid(*parts: object) -> str:
    return str(generate_uid(entropy_srcs=[_UID_NAMESPACE, *(repr(p) for p in parts)]))


def _ellipse(
    yy: npt.NDArray[np.float64],
    xx: npt.NDArray[np.float64],
    center: tuple[float, float],
    axes: tuple[float, float],
) -> npt.NDArray[np.float64]:
    """Normalised squared radius: < 1 inside the ellipse."""
    result: npt.NDArray[np.float64] = ((yy - center[0]) / axes[0]) ** 2 + (
        (xx - center[1]) / axes[1]
    ) ** 2
    return result


def _grid(rows: int, columns: int) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    yy, xx = np.mgrid[0:rows, 0:columns].astype(np.float64)
    return (yy + 0.5) / rows, (xx + 0.5) / columns


_LEFT_LUNG = ((0.47, 0.31), (0.31, 0.15))  # image-left lung: (center y, x), (axis y, x)
_RIGHT_LUNG = ((0.47, 0.69), (0.31, 0.15))


def lesion_mask(rows: int, columns: int) -> npt.NDArray[np.bool_]:
    """Pixels of the pneumothorax-like region that ``make_radiograph(lesion=True)`` darkens.

    Parameters
    ----------
    rows, columns:
        Image size.

    Returns
    -------
    numpy.ndarray
        Boolean (rows, columns) mask; True inside the region.
    """
    yy, xx = _grid(rows, columns)
    (cy, cx), (ay, ax) = _LEFT_LUNG
    inside = _ellipse(yy, xx, (cy, cx), (ay, ax)) < 1.0
    lateral = (xx - cx) / ax < -0.35
    upper = yy < cy + 0.05
    result: npt.NDArray[np.bool_] = inside & lateral & upper
    return result


def chest_phantom(rows: int, columns: int, *, seed: int, lesion: bool) -> npt.NDArray[np.float64]:
    """A chest-like image in [0, 1], 0 = black (air, lungs), 1 = white (bone).

    Parameters
    ----------
    rows, columns:
        Image size.
    seed:
        Seed of the noise and the vessel texture.
    lesion:
        Whether to add the pneumothorax-like region of ``lesion_mask``.

    Returns
    -------
    numpy.ndarray
        float64 (rows, columns) image.
    """
    rng = np.random.default_rng(seed)
    yy, xx = _grid(rows, columns)
    image = np.full((rows, columns), 0.04)
    body = _ellipse(yy, xx, (0.52, 0.5), (0.55, 0.46)) < 1.0
    image[body] = 0.55
    lungs = np.zeros((rows, columns), dtype=bool)
    for center, axes in (_LEFT_LUNG, _RIGHT_LUNG):
        lungs |= _ellipse(yy, xx, center, axes) < 1.0
    coarse = rng.normal(0.0, 1.0, size=(max(2, rows // 12), max(2, columns // 12)))
    texture = cv2.resize(coarse, (columns, rows), interpolation=cv2.INTER_CUBIC)
    ribs = 0.5 + 0.5 * np.cos(2.0 * np.pi * (yy * 9.0 + 1.5 * (xx - 0.5) ** 2))
    image[lungs] = 0.22 + 0.05 * texture[lungs] + 0.10 * ribs[lungs]
    mediastinum = (np.abs(xx - 0.5) < 0.09) & (yy > 0.12) & body
    image[mediastinum] = 0.78
    heart = (_ellipse(yy, xx, (0.66, 0.55), (0.14, 0.13)) < 1.0) & body
    image[heart] = 0.7
    if lesion:
        region = lesion_mask(rows, columns)
        image[region] = 0.10
    image += rng.normal(0.0, 0.01, size=(rows, columns))
    clipped: npt.NDArray[np.float64] = np.clip(image, 0.0, 1.0)
    return clipped


def make_radiograph(
    *,
    modality: str = "DX",
    sop_class_uid: str = DX_PRESENTATION_STORAGE,
    rows: int = 512,
    columns: int = 512,
    bits_stored: int = 12,
    photometric: str = "MONOCHROME2",
    pixel_spacing: tuple[float, float] | None = (0.2, 0.2),
    spacing_attribute: str = "PixelSpacing",
    body_part: str | None = "CHEST",
    window: bool = True,
    number_of_frames: int | None = None,
    seed: int = 0,
    lesion: bool = True,
    study_instance_uid: str | None = None,
    sop_instance_uid: str | None = None,
    rescale: tuple[float, float] = (1.0, 0.0),
    signed: bool = False,
) -> pydicom.Dataset:
    """Build a complete, valid single- (or multi-) frame chest radiograph dataset.

    Parameters
    ----------
    modality:
        Modality (0008,0060): "DX", "CR", or anything else for negative tests.
    sop_class_uid:
        DX for presentation (default), DX for processing, CR or Secondary Capture.
    rows, columns:
        Pixel matrix size; any aspect ratio.
    bits_stored:
        1 to 16; Bits Allocated is 8 up to 8 bits stored, else 16.
    photometric:
        "MONOCHROME2" (lungs stored dark) or "MONOCHROME1" (lungs stored bright).
    pixel_spacing:
        (row, column) in mm, or None for no spacing at all.
    spacing_attribute:
        "PixelSpacing" (DX gets Imager Pixel Spacing too, which the DX IOD requires) or
        "ImagerPixelSpacing" (that attribute only).
    body_part:
        Body Part Examined, or None to leave it out.
    window:
        Add Window Center/Width (1st-99th percentile of the modality values).
    number_of_frames:
        When given, the frame is repeated and Number of Frames is set.
    seed:
        Seed of the phantom's noise; also part of every generated UID.
    lesion:
        Darken the pneumothorax-like region (see ``lesion_mask``).
    study_instance_uid, sop_instance_uid:
        Override the generated UIDs.
    rescale:
        (slope, intercept) written as Rescale Slope/Intercept.
    signed:
        Store signed pixels (Pixel Representation 1) centred on zero.

    Returns
    -------
    pydicom.Dataset
        Dataset with file meta (Explicit VR Little Endian).
    """
    if not 1 <= bits_stored <= 16:
        raise ValueError(f"bits_stored must be 1..16, got {bits_stored}")
    bits_allocated = 8 if bits_stored <= 8 else 16
    key = (
        modality, str(sop_class_uid), rows, columns, bits_stored, photometric, pixel_spacing,
        spacing_attribute, body_part, window, number_of_frames, seed, lesion, rescale, signed,
    )  # fmt: skip
    study_uid = study_instance_uid or _uid("study", seed)
    series_uid = _uid("series", *key)
    sop_uid = sop_instance_uid or _uid("sop", *key)

    phantom = chest_phantom(rows, columns, seed=seed, lesion=lesion)
    if photometric == "MONOCHROME1":
        phantom = 1.0 - phantom
    top = 2**bits_stored - 1
    stored = np.rint(phantom * top).astype(np.int64)
    if signed:
        stored -= 2 ** (bits_stored - 1)
    dtype = {(8, False): np.uint8, (8, True): np.int8, (16, False): np.uint16}.get(
        (bits_allocated, signed), np.int16
    )
    pixels = stored.astype(dtype)

    ds = pydicom.Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = sop_class_uid
    ds.SOPInstanceUID = sop_uid
    ds.StudyDate = "20240102"
    ds.StudyTime = "093000"
    ds.SeriesDate = "20240102"
    ds.SeriesTime = "093100"
    ds.ContentDate = "20240102"
    ds.ContentTime = "093105"
    ds.AccessionNumber = f"ACC{seed:05d}"
    ds.Modality = modality
    ds.Manufacturer = "pneumonode synthetic"
    ds.ManufacturerModelName = "phantom"
    ds.InstitutionName = "Synthetic Hospital"
    ds.ReferringPhysicianName = "REFERRER^SYNTHETIC"
    ds.StudyDescription = "XR CHEST PA"
    ds.SeriesDescription = "CHEST PA"
    ds.PatientName = "SYNTHETIC^PATIENT"
    ds.PatientID = f"SYN{seed:05d}"
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "O"
    if body_part is not None:
        ds.BodyPartExamined = body_part
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.StudyID = f"S{seed:05d}"
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.PatientOrientation = ["R", "F"]
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.BurnedInAnnotation = "NO"
    ds.LossyImageCompression = "00"

    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.Rows = rows
    ds.Columns = columns
    ds.BitsAllocated = bits_allocated
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 1 if signed else 0
    slope, intercept = rescale
    ds.RescaleSlope = f"{slope:g}"
    ds.RescaleIntercept = f"{intercept:g}"
    ds.RescaleType = "US"
    if pixel_spacing is not None:
        spacing = [f"{pixel_spacing[0]:g}", f"{pixel_spacing[1]:g}"]
        if spacing_attribute == "PixelSpacing":
            ds.PixelSpacing = spacing
        elif spacing_attribute != "ImagerPixelSpacing":
            raise ValueError(f"spacing_attribute must name a spacing, got {spacing_attribute}")
        if spacing_attribute == "ImagerPixelSpacing" or sop_class_uid in (
            DX_PRESENTATION_STORAGE,
            DX_PROCESSING_STORAGE,
        ):
            ds.ImagerPixelSpacing = spacing
    if window:
        values = pixels.astype(np.float64) * slope + intercept
        low, high = np.percentile(values, [1.0, 99.0])
        ds.WindowCenter = f"{(low + high) / 2.0:.1f}"
        ds.WindowWidth = f"{max(high - low, 2.0):.1f}"
        ds.VOILUTFunction = "LINEAR"

    if sop_class_uid in (DX_PRESENTATION_STORAGE, DX_PROCESSING_STORAGE):
        ds.ImageType = ["ORIGINAL", "PRIMARY", ""]
        ds.PresentationIntentType = (
            "FOR PRESENTATION" if sop_class_uid == DX_PRESENTATION_STORAGE else "FOR PROCESSING"
        )
        ds.ImageLaterality = "U"
        ds.PixelIntensityRelationship = "LIN"
        ds.PixelIntensityRelationshipSign = -1 if photometric == "MONOCHROME1" else 1
        ds.PresentationLUTShape = "INVERSE" if photometric == "MONOCHROME1" else "IDENTITY"
        ds.DetectorType = "SCINTILLATOR"
        ds.PositionerType = "NONE"
        ds.AnatomicRegionSequence = [_code("816094009", "SCT", "Chest")]
        ds.ViewCodeSequence = [_code("399348003", "SCT", "postero-anterior")]
        ds.PatientOrientation = ["L", "F"]
        ds.KVP = "120"
        ds.AcquisitionContextSequence = []
    elif sop_class_uid == SC_STORAGE:
        ds.ConversionType = "WSD"
    else:
        ds.ViewPosition = "PA"

    frame = pixels.tobytes()
    if number_of_frames is not None:
        ds.NumberOfFrames = number_of_frames
        frame = frame * number_of_frames
    ds.PixelData = frame + (b"\x00" if len(frame) % 2 else b"")
    ds["PixelData"].VR = "OB" if bits_allocated == 8 else "OW"

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.file_meta = meta
    return ds


def make_dx_monochrome1_16bit(**kw: object) -> pydicom.Dataset:
    """A DX for presentation with 16 bits stored, MONOCHROME1, a rescale and a window.

    The DX IOD fixes Rescale Slope 1 and Intercept 0 (enumerated values), so the rescale is the
    identity with Rescale Type US; use ``make_radiograph(modality="CR", ...)`` for a real one.

    Parameters
    ----------
    **kw:
        Any ``make_radiograph`` argument, overriding these defaults.

    Returns
    -------
    pydicom.Dataset
        The dataset.
    """
    args: dict[str, object] = {
        "bits_stored": 16,
        "photometric": "MONOCHROME1",
        "window": True,
        "seed": 16,
    }
    args.update(kw)
    return make_radiograph(**args)  # type: ignore[arg-type]


def _code(value: str, scheme: str, meaning: str) -> pydicom.Dataset:
    item = pydicom.Dataset()
    item.CodeValue = value
    item.CodingSchemeDesignator = scheme
    item.CodeMeaning = meaning
    return item


def compress(ds: pydicom.Dataset, transfer_syntax_uid: str) -> pydicom.Dataset:
    """Return a copy of ``ds`` re-encoded in a lossless transfer syntax.

    Parameters
    ----------
    ds:
        An uncompressed dataset (as from ``make_radiograph``).
    transfer_syntax_uid:
        One of ``LOSSLESS_SYNTAXES``.

    Returns
    -------
    pydicom.Dataset
        A new dataset; ``ds`` is unchanged.
    """
    out = copy.deepcopy(ds)
    uid = UID(transfer_syntax_uid)
    if uid == DeflatedExplicitVRLittleEndian:
        out.file_meta.TransferSyntaxUID = uid
        return out
    if uid not in LOSSLESS_SYNTAXES:
        raise ValueError(f"no lossless encoder here for {uid} ({uid.name})")
    out.compress(uid)
    return out


def write(ds: pydicom.Dataset, path: Path) -> Path:
    """Write ``ds`` as a DICOM Part 10 file (preamble, file meta) and return the path.

    Parameters
    ----------
    ds:
        The dataset, with file meta.
    path:
        Destination file.

    Returns
    -------
    pathlib.Path
        ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pydicom.dcmwrite(path, ds, enforce_file_format=True)
    return path
