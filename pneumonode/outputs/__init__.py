"""DICOM result objects: Segmentation, secondary-capture overlay and SR measurement report."""
