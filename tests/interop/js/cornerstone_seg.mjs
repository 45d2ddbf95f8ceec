// Parse a DICOM SEG the way OHIF 3.13 does, with @cornerstonejs/adapters 5.14 in Node.
// Usage: node cornerstone_seg.mjs SEG.dcm SOURCE.dcm
// Prints one JSON line: the segments, the label map size and its voxel count.
import fs from "node:fs";
import dcmjs from "dcmjs";
import * as core from "@cornerstonejs/core";
import { adaptersSEG } from "@cornerstonejs/adapters";

const [segPath, sourcePath] = process.argv.slice(2);
const read = (path) => {
  const bytes = fs.readFileSync(path);
  return bytes.buffer.slice(bytes.byteOffset, bytes.byteOffset + bytes.byteLength);
};
const source = dcmjs.data.DicomMetaDictionary.naturalizeDataset(
  dcmjs.data.DicomMessage.readFile(read(sourcePath)).dict,
);
// What a viewer's metadata provider says of a projection radiograph: no orientation or
// position in the header, so the identity plane at the origin (cornerstone's default).
const imageId = "pneumonode:source";
const spacing = (source.PixelSpacing || source.ImagerPixelSpacing || [1, 1]).map(Number);
const modules = {
  generalSeriesModule: {
    seriesInstanceUID: source.SeriesInstanceUID,
    studyInstanceUID: source.StudyInstanceUID,
    modality: source.Modality,
  },
  generalImageModule: { sopInstanceUID: source.SOPInstanceUID, instanceNumber: 1 },
  imagePlaneModule: {
    rows: source.Rows,
    columns: source.Columns,
    rowCosines: [1, 0, 0],
    columnCosines: [0, 1, 0],
    imagePositionPatient: [0, 0, 0],
    rowPixelSpacing: spacing[0],
    columnPixelSpacing: spacing[1],
    pixelSpacing: spacing,
  },
  imagePixelModule: {
    rows: source.Rows,
    columns: source.Columns,
    bitsAllocated: source.BitsAllocated,
    bitsStored: source.BitsStored,
    highBit: source.HighBit,
    pixelRepresentation: source.PixelRepresentation,
    samplesPerPixel: 1,
    photometricInterpretation: source.PhotometricInterpretation,
  },
  instance: source,
};
core.metaData.addProvider((type, id) => (id === imageId ? modules[type] : undefined), 10000);

const result = await adaptersSEG.Cornerstone3D.Segmentation.createFromDICOMSegBuffer(
  [imageId],
  read(segPath),
  { metadataProvider: core.metaData },
);
const images = result.labelMapImages.flat();
let voxels = 0;
for (const image of images) {
  const data = image.voxelManager ? image.voxelManager.getScalarData() : image.getPixelData();
  for (const value of data) voxels += value ? 1 : 0;
}
const segments = result.segMetadata.data
  .map((segment, number) => (segment ? { number, label: segment.SegmentLabel } : null))
  .filter(Boolean);
console.log(JSON.stringify({
  segments,
  images: images.length,
  rows: images[0].rows,
  columns: images[0].columns,
  voxels,
  segmentsOnFrame: result.segmentsOnFrame,
}));
